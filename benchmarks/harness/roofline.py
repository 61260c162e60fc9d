"""The device's two ceilings, measured in the same run, and the roofline floor of an op.

    floor = max(flops / peak_flops[dtype mode], bytes / bandwidth)

Bandwidth: a large device copy, counting bytes read plus bytes written. Peak flops: a large square
matrix product in each dtype mode (fp32 with TF32 off, fp32 with TF32 on, bf16), on random data.
"""

from __future__ import annotations

import torch

from harness.timing import Budget, Clock
from harness.modes import MODES, set_tf32


def roofline_floor_s(flops: float, nbytes: float, peak_flops: float, bandwidth: float) -> float:
    """The least time an op of ``flops`` operations moving ``nbytes`` bytes can take on this device."""
    return max(flops / peak_flops, nbytes / bandwidth)


def measure_ceilings(clock: Clock, modes, budget: Budget, rounds: int = 1) -> dict:
    """{"bandwidth_Bps": ..., "peak_flops": {mode: ...}, "how": {...}} for this device.

    With rounds > 1 (a shared CPU) each ceiling is the fastest of that many median times: a ceiling is
    what the device can do, and load from other processes only ever lowers it.
    """
    best_ms = lambda fn: min(clock.measure_one(fn, budget)["median_ms"] for _ in range(rounds))  # noqa: E731
    device = clock.device
    copy_bytes = 2**30 if clock.cuda else 2**28
    src = torch.randn(copy_bytes // 4, device=device)
    dst = torch.empty_like(src)
    bandwidth = 2 * copy_bytes / (best_ms(lambda: dst.copy_(src)) * 1e-3)
    del src, dst
    n = 8192 if clock.cuda else 2048
    peaks = {}
    for mode in modes:
        dtype, tf32 = MODES[mode]
        set_tf32(tf32)
        a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
        c = torch.empty(n, n, device=device, dtype=dtype)
        peaks[mode] = 2 * n**3 / (best_ms(lambda: torch.mm(a, b, out=c)) * 1e-3)
        del a, b, c
    return {
        "bandwidth_Bps": bandwidth,
        "peak_flops": peaks,
        "how": {
            "bandwidth": f"dst.copy_(src) of {copy_bytes // 2**20} MiB, bytes read + written over the median time",
            "peak_flops": f"torch.mm of two random {n}x{n} matrices per dtype mode, 2n^3 over the median time",
            "rounds": f"fastest of {rounds} median times",
        },
    }
