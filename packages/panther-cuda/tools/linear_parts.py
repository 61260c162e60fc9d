"""Time each launch of the cuda sketched linear forward on its own, next to what the GPU does with the same bytes.

    python packages/panther-cuda/tools/linear_parts.py --out parts.json [--shape TxIxO ...] [--replays 30]
        [--tiles small,large] [--config 128x128x32x2x4x6 ...] [--splits 4,8]

For each shape (bfloat16, L = 1, k = 64, so R = 128; default T = 4096 rows with I = O in (4096, 8192)), in
CUDA-graph replays after an L2 flush (median of --replays):
* bandwidth references: a copy of x (reads and writes T x I), y zeroed (writes T x O);
* cuBLAS on the same products: x A (T x I times I x R, A contiguous) and H B (T x R times R x O);
* forward.cu's fwd_h alone (x A into fp32 shares of I, no summing launch) on each tile shape and split of I, and
  fwd_y alone (y from a given H) on each tile shape: those of limits.CONFIGS named by --tiles, and any other
  Tile<BM, BN, BK, WARPS_M, WARPS_N, STAGES> given by --config (NVRTC compiles each on first use).
Each row gives the time and the bytes the launch must move at least, as TB/s. The JSON has every number.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # graph_timing, beside this file
from graph_timing import median_ms  # noqa: E402
from linear_sweep import _shape  # noqa: E402  (--shape's parser)

L, K = 1, 64
SHAPES = [(4096, 4096, 4096), (4096, 8192, 8192)]
SPLITS = (1, 2, 4, 8, 16)


def rows_for(T: int, I: int, O: int, replays: int, flush: torch.Tensor, tiles: dict, splits) -> List[dict]:
    from panther_cuda._nvrtc import f32, i32, i64
    from panther_cuda.ops.sketched_linear.common import launch
    dev, dt = torch.device("cuda"), torch.bfloat16
    R = 2 * L * K
    x = torch.randn(T, I, device=dev).to(dt)
    S1, U2 = (torch.randn(L, I, K, device=dev) * I**-0.5).to(dt), (torch.randn(L, I, K, device=dev) * I**-0.5).to(dt)
    U1, S2 = (torch.randn(L, K, O, device=dev) * K**-0.5).to(dt), (torch.randn(L, K, O, device=dev) * K**-0.5).to(dt)
    A = torch.cat([S1[0], U2[0]], dim=1).contiguous()  # (I, R)
    B = torch.cat([U1[0], S2[0]], dim=0).contiguous()  # (R, O)
    h = (x.float() @ A.float()).to(dt)
    y = torch.empty(T, O, device=dev, dtype=dt)
    x2 = torch.empty_like(x)
    out = []

    def add(what, ms, nbytes, detail=""):
        out.append({"what": what, "detail": detail, "ms": ms, "bytes": nbytes, "tbps": nbytes / (ms * 1e-3) / 1e12})

    add("copy x", median_ms(lambda: x2.copy_(x), replays, flush=flush), 2 * x.numel() * 2)
    add("zero y", median_ms(lambda: y.zero_(), replays, flush=flush), y.numel() * 2)
    add("cuBLAS x A", median_ms(lambda: torch.mm(x, A), replays, flush=flush), (x.numel() + A.numel() + T * R) * 2)
    add("cuBLAS H B", median_ms(lambda: torch.mm(h, B), replays, flush=flush), (h.numel() + B.numel() + y.numel()) * 2)
    for name, c in tiles.items():
        for s in splits:
            ws = torch.empty((s, T, R), device=dev, dtype=torch.float32) if s > 1 else None
            hh = torch.empty(T, R, device=dev, dtype=dt)
            blocks = -(-T // c.bm) * -(-R // c.bn) * s

            def fwd_h(c=c, ws=ws, hh=hh, blocks=blocks, s=s):
                launch("forward.cu", "sketched_linear_fwd_h", dt, False, c, blocks, x, S1, U2, hh, ws, i64(T), i64(I),
                       i32(L), i32(K), i32(s))

            written = (ws.numel() * 4 if ws is not None else hh.numel() * 2)
            add("fwd_h", median_ms(fwd_h, replays, flush=flush), x.numel() * 2 + written,
                f"tiles={name} h_splits={s} blocks={blocks}")

        def fwd_y(c=c):
            launch("forward.cu", "sketched_linear_fwd_y", dt, False, c, -(-T // c.bm) * -(-O // c.bn), h, U1, S2, None,
                   y, i64(T), i64(O), i32(L), i32(K), f32(0.5))

        add("fwd_y", median_ms(fwd_y, replays, flush=flush), (h.numel() + y.numel()) * 2, f"tiles={name}")
    return out


def _config(text: str):
    """--config's value, "BMxBNxBKxWMxWNxS": a tile.cuh Tile (its static_asserts check it at compile time)."""
    from panther_cuda.ops.sketched_linear.limits import TileConfig

    parts = text.lower().split("x")
    if len(parts) != 6 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"--config {text!r}: expected BMxBNxBKxWMxWNxS, six positive integers")
    return TileConfig(*(int(p) for p in parts))


def main(argv: Optional[List[str]] = None) -> int:
    from panther_cuda.ops.sketched_linear.limits import CONFIGS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--shape", action="append", default=None, metavar="TxIxO", type=_shape)
    ap.add_argument("--replays", type=int, default=30)
    ap.add_argument("--tiles", default="small,large", metavar="NAME,...", help="tile shapes (limits.CONFIGS)")
    ap.add_argument("--config", action="append", default=[], type=_config, metavar="BMxBNxBKxWMxWNxS",
                    help="another tile shape to time (repeatable)")
    ap.add_argument("--splits", default=",".join(map(str, SPLITS)), help="shares of I of fwd_h (comma-separated)")
    args = ap.parse_args(argv)
    names = [t.strip() for t in args.tiles.split(",") if t.strip()]
    if any(t not in CONFIGS for t in names):
        ap.error(f"--tiles {args.tiles!r}: expected names among {sorted(CONFIGS)}")
    tiles = {t: CONFIGS[t] for t in names}
    tiles.update(("x".join(map(str, dataclasses.astuple(c))), c) for c in args.config)
    splits = [int(v) for v in args.splits.split(",") if v.strip()]
    if not tiles or not splits or min(splits) < 1:
        ap.error("expected at least one tile shape and splits >= 1")
    if not torch.cuda.is_available():
        print("linear_parts needs a CUDA GPU", file=sys.stderr)
        return 2
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")  # larger than any L2
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "dtype": "bfloat16", "L": L, "k": K,
              "replays": args.replays, "shapes": []}
    for T, I, O in args.shape or SHAPES:
        rows = rows_for(T, I, O, args.replays, flush, tiles, splits)
        result["shapes"].append({"T": T, "I": I, "O": O, "rows": rows})
        print(f"\nT={T} I={I} O={O} (L={L}, k={K}, bf16; CUDA graph after an L2 flush, median of {args.replays})")
        print("| launch | detail | ms | MB moved | TB/s |\n|---|---|---:|---:|---:|")
        for r in rows:
            print(f"| {r['what']} | {r['detail']} | {r['ms']:.4f} | {r['bytes'] / 1e6:.1f} | {r['tbps']:.2f} |")
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
