"""Where the cuda conv forward's time goes: its CUDA-graph time as the input and output channels vary.

    python packages/panther-cuda/tools/conv_scaling.py --out conv_scaling.json [--variants default,async64s3]

At the spec conv's geometry (batch 32, 56x56, 3x3, padding 1, L=1, k=16, bf16), NCHW and channels_last, for
each forward.VARIANT given: the fused forward (y, under no_grad) with in_channels C in CHANNELS at 128 output
channels, and with O in CHANNELS at C = 64; and conv_rank (Z = conv(x, S) alone, written to memory, the
kernel the backward recomputes Z with) at each C. The slope over C is the main loop's cost per channel
(halo and S chunks, products), the slope over O the epilogue's (Z x U, the stores of y), their difference from
conv_rank what keeping Z on chip saves. Each time is the median of --reps replays, the L2 flushed before each
(tools/graph_timing.py). Prints a table; writes every number to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

import panther.ops
from panther_cuda.ops.sketched_conv2d import forward

sys.path.insert(0, str(Path(__file__).resolve().parent))  # graph_timing, conv_sweep, beside this file
from conv_sweep import variant  # noqa: E402
import graph_timing  # noqa: E402

N, H, W, L, K = 32, 56, 56, 1, 16
CHANNELS = (16, 32, 64, 128, 256)


def median_ms(fn, reps: int, flush: torch.Tensor) -> float:
    with torch.no_grad():
        return graph_timing.median_ms(fn, reps, flush=flush)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="conv_scaling.json")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--variants", default="default", help="comma-separated forward.VARIANT values ('default')")
    a = parser.parse_args()
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    R = 2 * L * K
    for v in [None if s == "default" else s for s in a.variants.split(",")]:
        for layout_name, layout in (("nchw", torch.contiguous_format), ("channels_last", torch.channels_last)):
            for what, C, O in ([("fused, C varies", c, 128) for c in CHANNELS] + [("fused, O varies", 64, o) for o in CHANNELS]
                               + [("conv_rank (Z)", c, None) for c in CHANNELS]):
                x = torch.randn(N, C, H, W, device="cuda", dtype=torch.bfloat16, generator=gen).contiguous(memory_format=layout)
                S1s = torch.randn(2 * L, K, C, 3, 3, device="cuda", dtype=torch.bfloat16, generator=gen) / math.sqrt(9 * C)
                with variant(v):
                    if O is None:
                        z = torch.empty(N, R, H, W, device="cuda", dtype=torch.bfloat16, memory_format=layout)
                        S = S1s.reshape(R, -1).contiguous()
                        fn = lambda: forward.conv_rank(z, x, S, (3, 3), (1, 1), (1, 1), (1, 1), 1.0, True)  # noqa: E731
                    else:
                        U1s = torch.randn(2 * L, K, O, device="cuda", dtype=torch.bfloat16, generator=gen) / math.sqrt(K)
                        b = torch.zeros(O, device="cuda", dtype=torch.bfloat16)
                        fn = lambda: panther.ops.sketched_conv2d(x, S1s, U1s, b, 1, 1, backend="cuda")  # noqa: E731
                    ms = median_ms(fn, a.reps, flush)
                row = {"variant": v or "default", "layout": layout_name, "what": what, "C": C, "O": O, "ms": ms}
                rows.append(row)
                print(f"{row['variant']:12s} {layout_name:14s} {what:16s} C={C:4d} O={str(O):>4s}  {ms:.4f} ms", flush=True)
    Path(a.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                       "reps": a.reps, "rows": rows}, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
