"""Host time of the cuda backend's sketched_conv2d in eager calls, against F.conv2d, and where it goes (GPU only).

    python benchmarks/diagnostics/conv_host_time.py

At the spec's conv (batch 32, 64 -> 128 channels, 56x56, 3x3, padding 1, L = 1, k = 16, bf16, NCHW): the host
time and wall time per call of the forward (no grad) and of forward + backward, the op on the cuda backend and
the dense F.conv2d, over 100 calls after 20; then cProfile's table of the op's fwd+bwd and forward calls, and of
its backward launcher (backward.sketched_conv2d_backward) called directly on the main thread, 100 calls each,
ordered by time spent in each function itself. Eager calls on a host slower than the GPU are host-bound: these
say which Python and which library calls the host time goes to.
"""
from __future__ import annotations

import cProfile
import pstats
import time

import torch

import panther.ops
from panther_cuda.ops.sketched_conv2d.backward import sketched_conv2d_backward

CALLS, WARMUP = 100, 20


def main():
    dev, bf16 = "cuda", torch.bfloat16
    x = torch.randn(32, 64, 56, 56, device=dev, dtype=bf16, requires_grad=True)
    S1s = (torch.randn(2, 16, 64, 3, 3, device=dev, dtype=bf16) / 24).requires_grad_()
    U1s = torch.randn(2, 16, 128, device=dev, dtype=bf16)
    b = torch.zeros(128, device=dev, dtype=bf16, requires_grad=True)
    W = (torch.randn(128, 64, 3, 3, device=dev, dtype=bf16) / 24).requires_grad_()
    gy = torch.randn(32, 128, 56, 56, device=dev, dtype=bf16)

    def ours():
        panther.ops.sketched_conv2d(x, S1s, U1s, b, 1, 1, backend="cuda").backward(gy)

    def ours_fwd():
        with torch.no_grad():
            panther.ops.sketched_conv2d(x, S1s, U1s, b, 1, 1, backend="cuda")

    def dense():
        torch.nn.functional.conv2d(x, W, b, 1, 1).backward(gy)

    def dense_fwd():
        with torch.no_grad():
            torch.nn.functional.conv2d(x, W, b, 1, 1)

    grads = [torch.empty_like(x), torch.empty_like(S1s), torch.empty_like(U1s), torch.empty_like(b)]

    def bwd_direct():
        with torch.no_grad():
            sketched_conv2d_backward(grads, gy, x, S1s, U1s, (1, 1), (1, 1), (1, 1), (True, True, False, True), True)

    for name, f in (("ours fwd", ours_fwd), ("dense fwd", dense_fwd), ("ours fwd+bwd", ours),
                    ("dense fwd+bwd", dense), ("backward launcher", bwd_direct)):
        for _ in range(WARMUP):
            f()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(CALLS):
            f()
        host = (time.perf_counter() - t) / CALLS
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t) / CALLS
        print(f"{name:18s} host {host * 1e3:.3f} ms/call, wall {wall * 1e3:.3f} ms/call")
    for name, f in (("ours fwd+bwd", ours), ("ours fwd", ours_fwd), ("backward launcher", bwd_direct)):
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(CALLS):
            f()
        profile.disable()
        torch.cuda.synchronize()
        print(f"==== {name}: cProfile, {CALLS} calls")
        pstats.Stats(profile).sort_stats("tottime").print_stats(30)


if __name__ == "__main__":
    main()
