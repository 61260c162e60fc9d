"""Time the sm_90a forward kernels with parts of their work taken out, to tell what bounds them.

    python packages/panther-cuda/tools/sm90_bounds.py --out bounds.json [--shape TxIxO ...] [--replays 50]

Each variant is forward_sm90.cu with edits made to a copy of the op's sources in a temporary folder (the package is
left as it is), compiled by NVRTC and launched alone, bf16, L = 1, k = 64 (R = 128), H in the forward rule's shares of
I; each time is the median of --replays CUDA-graph replays. The edits (EDITS) take out:
* ``no-x`` / ``no-skinny``: ring_sm90's copies of its A operand (x in fwd_h) / of its B operand (A = [S1 | U2]) after
  the first S steps (the ring then multiplies stale tiles: the results are wrong, the time is what is left without
  that stream);
* ``no-mma``: the ring's products;
* ``no-store``: the epilogue's stores (fwd_h's fp32 shares of H, staged in shared memory and then stored whole rows
  at a time, or H; fwd_y's y), behind a test that never holds, so that the products stay live.
VARIANTS lists the combinations timed; fwd_y runs as it is and with ``no-store``. For reference, the same run times a
copy of x (read and write), y zeroed and x summed over its rows (read). Prints a table and writes every number to --out
as JSON. The results of a variant other than ``base`` are not checked (they are wrong by design).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))  # graph_timing, beside this file

OP = "ops/sketched_linear"
L, K = 1, 64
SHAPES = [(4096, 4096, 4096), (4096, 8192, 8192)]

# name -> [(file, text, replacement)]: each text must occur exactly once in its file (a CPU test checks it).
EDITS: Dict[str, List[Tuple[str, str, str]]] = {
    "no-x": [("tile_sm90.cuh", "        la.load(As + s * SA, k0, k_end);\n",
              "        if (step < S) la.load(As + s * SA, k0, k_end);\n")],
    "no-skinny": [("tile_sm90.cuh", "        lb.load(Bs + s * SB, k0, k_end);\n",
                   "        if (step < S) lb.load(Bs + s * SB, k0, k_end);\n")],
    "no-mma": [("tile_sm90.cuh",
                "        product<T, A_MN, B_MN, KD, true, false>(d, As + stage * SA, Bs + stage * SB);\n", "\n")],
    # (behind a test of the arguments, the same for the whole block: the staged stores pass barriers)
    "no-store": [("forward_sm90.cu", "        if (t >= Tn || col >= R) return;  // R even: both columns inside\n",
                  "        if (t >= Tn || col >= R || v0 != 1234.5f) return;\n"),
                 ("forward_sm90.cu", "        store_staged_f32(d, reinterpret_cast<float*>(ring),",
                  "        if (Tn < 0) store_staged_f32(d, reinterpret_cast<float*>(ring),"),
                 ("forward_sm90.cu", "            store_staged(d, Bs + stage * KP * BN, y,",
                  "            if (Tn < 0) store_staged(d, Bs + stage * KP * BN, y,")],
}
VARIANTS: Sequence[Tuple[str, ...]] = (
    (), ("no-x",), ("no-skinny",), ("no-x", "no-skinny"), ("no-mma",), ("no-store",), ("no-x", "no-skinny", "no-store"),
    ("no-x", "no-skinny", "no-mma", "no-store"),
)
Y_VARIANTS: Sequence[Tuple[str, ...]] = ((), ("no-store",))


def _op_dir() -> Path:
    import panther_cuda

    return Path(panther_cuda.__file__).resolve().parent / OP


def patched_sources(edits: Sequence[str], op_dir: Optional[Path] = None) -> Dict[str, str]:
    """The op's .cu and .cuh files with the named edits made (file name -> text); raises ValueError when an edit's
    text does not occur exactly once."""
    op_dir = op_dir or _op_dir()
    files = {p.name: p.read_text() for p in op_dir.iterdir() if p.suffix in (".cu", ".cuh")}
    for name in edits:
        for file, old, new in EDITS[name]:
            count = files[file].count(old)
            if count != 1:
                raise ValueError(f"edit {name!r}: {old.strip()!r} occurs {count} times in {file} (expected once); "
                                 "update sm90_bounds.EDITS to the source")
            files[file] = files[file].replace(old, new)
    return files


def variant_source(edits: Sequence[str], root: Path) -> Path:
    """forward_sm90.cu of the variant, written with its headers to a folder of its own under ``root``."""
    files = patched_sources(edits)
    folder = root / ("base" if not edits else "+".join(edits))
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder / "forward_sm90.cu"


def _digest(path: Path) -> str:  # CuPy's disk cache keys on the .cu text and the options, not on the headers
    return hashlib.sha256("".join(p.read_text() for p in sorted(path.parent.iterdir())).encode()).hexdigest()[:16]


def run_shape(T: int, I: int, O: int, replays: int, root: Path) -> List[dict]:
    import torch

    from graph_timing import median_ms
    from panther.backends.toolkit import cdiv
    from panther_cuda._nvrtc import Kernel, f32, i32, i64
    from panther_cuda.ops.sketched_linear import sm90
    from panther_cuda.ops.sketched_linear.forward import plan_forward

    dev, dt = torch.device("cuda"), torch.bfloat16
    R = 2 * L * K
    x = torch.randn(T, I, device=dev).to(dt)
    S1, U2 = [(torch.randn(L, I, K, device=dev) * I**-0.5).to(dt) for _ in range(2)]
    U1, S2 = [(torch.randn(L, K, O, device=dev) * K**-0.5).to(dt) for _ in range(2)]
    b = torch.randn(O, device=dev).to(dt)
    h = torch.empty(T, R, device=dev, dtype=dt)
    y = torch.empty(T, O, device=dev, dtype=dt)
    splits = max(1, plan_forward(T, I, O, R, dt, dev).h_splits)
    ws = torch.empty(splits, T, R, device=dev, dtype=torch.float32) if splits > 1 else None
    blocks = cdiv(T, sm90.BM) * cdiv(R, sm90.BN) * splits
    stages = sm90.ring_stages(blocks, dt, dev)
    depth = sm90.depth(R)
    groups = sm90.groups(T, O, depth, dt, torch.cuda.get_device_properties(dev).multi_processor_count)
    rows = []

    def add(kernel: str, variant: str, ms: float, detail: str) -> None:
        rows.append({"T": T, "I": I, "O": O, "kernel": kernel, "variant": variant, "us": ms * 1e3, "detail": detail})
        print(f"| {T}x{I}x{O} | {kernel} | {variant} | {ms * 1e3:.1f} | {detail} |", flush=True)

    for edits in VARIANTS:
        path = variant_source(edits, root)
        opts = (f"-DPANTHER_BOUNDS_DIGEST=0x{_digest(path)}ULL",)
        k = Kernel(str(path), f"panther::sl::sketched_linear_fwd_h_sm90<__nv_bfloat16, {stages}>", arch="sm_90a",
                   options=opts)
        args = (x, S1, U2, h, ws, i64(T), i64(I), i32(L), i32(K), i32(splits))
        shared = sm90.ring_shared_bytes(dt, stages)
        ms = median_ms(lambda: k((blocks,), (sm90.THREADS,), *args, shared_mem=shared), replays)
        add("fwd_h_sm90", "+".join(edits) or "base", ms, f"{splits} shares of I, {stages} stages")
    h.normal_()  # y from a fresh H (the variants above leave it wrong or unwritten)
    for edits in Y_VARIANTS:
        path = variant_source(edits, root)
        opts = (f"-DPANTHER_BOUNDS_DIGEST=0x{_digest(path)}ULL",)
        k = Kernel(str(path), f"panther::sl::sketched_linear_fwd_y_sm90<__nv_bfloat16, {depth}>", arch="sm_90a",
                   options=opts)
        args = (h, U1, S2, b, y, i64(T), i64(O), i32(L * K), i32(groups), f32(1.0 / (2 * L)))
        shared = sm90.y_shared_bytes(depth, dt)
        ms = median_ms(lambda: k((cdiv(T, sm90.BM) * groups,), (sm90.THREADS,), *args, shared_mem=shared), replays)
        add("fwd_y_sm90", "+".join(edits) or "base", ms, f"{groups} blocks per row tile")
    x2 = torch.empty_like(x)
    add("reference", "copy of x", median_ms(lambda: x2.copy_(x), replays), f"{2 * x.nbytes / 1e6:.0f} MB moved")
    add("reference", "y zeroed", median_ms(lambda: y.zero_(), replays), f"{y.nbytes / 1e6:.0f} MB written")
    add("reference", "x summed over rows", median_ms(lambda: x.sum(dim=1), replays), f"{x.nbytes / 1e6:.0f} MB read")
    return rows


def _shape(text: str) -> Tuple[int, int, int]:
    T, I, O = (int(v) for v in text.lower().split("x"))
    return T, I, O


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--shape", action="append", default=None, metavar="TxIxO", type=_shape,
                    help="shape to time (repeatable; default 4096x4096x4096 and 4096x8192x8192)")
    ap.add_argument("--replays", type=int, default=50, help="timed replays per variant (median)")
    args = ap.parse_args(argv)
    import torch

    from graph_timing import on_sm90

    if not on_sm90("sm90_bounds"):
        return 2
    torch.manual_seed(0)
    start, result = time.time(), {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    root = Path(tempfile.mkdtemp(prefix="sm90_bounds_"))
    try:
        print("| shape | kernel | variant | us | detail |\n|---|---|---|---:|---|")
        for T, I, O in args.shape or SHAPES:
            result["rows"] += run_shape(T, I, O, args.replays, root)
            result["seconds"] = time.time() - start
            Path(args.out).write_text(json.dumps(result, indent=1))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
