"""Time the sm_90a kernels of the linear op with parts of their work taken out, to tell what bounds them.

    python packages/panther-cuda/tools/sm90_bounds.py --out bounds.json [--shape TxIxO ...] [--replays 50]

Each variant is forward_sm90.cu (or backward_sm90.cu) with edits made to a copy of the op's sources in a temporary
folder (the package is left as it is), compiled by NVRTC and launched alone, bf16, L = 1, k = 64 (R = 128), H in the
forward rule's shares of I; each time is the median of --replays CUDA-graph replays. The edits (EDITS) take out:
* ``no-x`` / ``no-skinny``: ring_sm90's copies of its A operand (x in fwd_h) / of its B operand (A = [S1 | U2]) after
  the first S steps (the ring then multiplies stale tiles: the results are wrong, the time is what is left without
  that stream);
* ``no-mma``: the ring's products;
* ``no-store``: the epilogue's stores (fwd_h's fp32 shares of H, staged in shared memory and then stored whole rows
  at a time, or H; fwd_y's y), behind a test that never holds, so that the products stay live.
VARIANTS lists the combinations timed; fwd_y runs as it is and with ``no-store``. The backward (backward_sm90.cu, all
six gradients wanted, the backward rule's shares of T and of O) runs the same way: bwd_g_sm90 (G_VARIANTS: its ring's
copies and products as above, ``g-no-store`` its staged fp32 shares of dH and of the weight gradients) and
bwd_x_fused_sm90 (X_VARIANTS: ``fx-no-x`` / ``fx-no-dh`` its copies of x / dH after the first steps, ``fx-no-mma`` its
products, ``fx-no-dx`` its stores of dx, ``fx-no-wstore`` its staged fp32 shares of d[S1 | U2]). For reference, the same
run times a copy of x (read and write), y zeroed and x summed over its rows (read). Prints a table and writes every
number to --out as JSON. The results of a variant other than ``base`` are not checked (they are wrong by design).
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
    "g-no-store": [("backward_sm90.cu", "            store_staged_f32(d, reinterpret_cast<float*>(ring), ws_dh +",
                    "            if (Tn < 0) store_staged_f32(d, reinterpret_cast<float*>(ring), ws_dh +"),
                   ("backward_sm90.cu", "        store_staged_f32(d, reinterpret_cast<float*>(ring), ws + split * st",
                    "        if (Tn < 0) store_staged_f32(d, reinterpret_cast<float*>(ring), ws + split * st")],
    "fx-no-x": [("backward_sm90.cu", "        if (want_w) lx.load(Xs + s * SX, t0, rows.end);\n",
                 "        if (want_w && step < AHEAD) lx.load(Xs + s * SX, t0, rows.end);\n")],
    "fx-no-dh": [("backward_sm90.cu", "        lh.load(Hs + s * SH, t0, rows.end);\n",
                  "        if (step < AHEAD) lh.load(Hs + s * SH, t0, rows.end);\n")],
    "fx-no-mma": [("backward_sm90.cu",
                   "            sm90::Wgmma<T, true, true>::m64n128k16(dw, tile_descriptor<true, BT>(xs, k0, 64 * g),\n"
                   "                                                   tile_descriptor<true, BT>(hs, k0, 0), 1);\n",
                   "            (void)xs;\n"),
                  ("backward_sm90.cu",
                   "            sm90::Wgmma<T, false, false>::m64n64k16(dy, "
                   "tile_descriptor<false, RW, BT>(hs, k0, 0),\n                                                    "
                   "tile_descriptor<false, RW>(As, k0, 64 * g), 1);\n",
                   "            (void)hs;\n")],
    "fx-no-dx": [("backward_sm90.cu", "        if (want_dx) {\n            sm90::fence_operand(dy);\n",
                  "        if (want_dx && Tn < 0) {\n            sm90::fence_operand(dy);\n")],
    "fx-no-wstore": [("backward_sm90.cu", "        store_staged_f32(dw, reinterpret_cast<float*>(smem),",
                      "        if (Tn < 0) store_staged_f32(dw, reinterpret_cast<float*>(smem),")],
}
VARIANTS: Sequence[Tuple[str, ...]] = (
    (), ("no-x",), ("no-skinny",), ("no-x", "no-skinny"), ("no-mma",), ("no-store",), ("no-x", "no-skinny", "no-store"),
    ("no-x", "no-skinny", "no-mma", "no-store"),
)
Y_VARIANTS: Sequence[Tuple[str, ...]] = ((), ("no-store",))
G_VARIANTS: Sequence[Tuple[str, ...]] = ((), ("no-x", "no-skinny"), ("no-mma",), ("g-no-store",))
X_VARIANTS: Sequence[Tuple[str, ...]] = (
    (), ("fx-no-x",), ("fx-no-dh",), ("fx-no-x", "fx-no-dh"), ("fx-no-mma",), ("fx-no-dx",), ("fx-no-wstore",),
    ("fx-no-dx", "fx-no-wstore"),
)


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


def variant_source(edits: Sequence[str], root: Path, source: str = "forward_sm90.cu") -> Path:
    """``source`` (forward_sm90.cu or backward_sm90.cu) of the variant, written with the op's other sources to a folder
    of its own under ``root``."""
    files = patched_sources(edits)
    folder = root / ("base" if not edits else "+".join(edits))
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder / source


def _kernel(edits: Sequence[str], root: Path, source: str, name: str):
    from panther_cuda._nvrtc import Kernel

    path = variant_source(edits, root, source)
    return Kernel(str(path), name, arch="sm_90a", options=(f"-DPANTHER_BOUNDS_DIGEST=0x{_digest(path)}ULL",))


def _digest(path: Path) -> str:  # CuPy's disk cache keys on the .cu text and the options, not on the headers
    return hashlib.sha256("".join(p.read_text() for p in sorted(path.parent.iterdir())).encode()).hexdigest()[:16]


def run_shape(T: int, I: int, O: int, replays: int, root: Path) -> List[dict]:
    import torch

    from graph_timing import median_ms
    from panther.backends.toolkit import cdiv
    from panther_cuda._nvrtc import f32, i32, i64
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
        k = _kernel(edits, root, "forward_sm90.cu", f"panther::sl::sketched_linear_fwd_h_sm90<__nv_bfloat16, {stages}>")
        args = (x, S1, U2, h, ws, i64(T), i64(I), i32(L), i32(K), i32(splits))
        shared = sm90.ring_shared_bytes(dt, stages)
        ms = median_ms(lambda: k((blocks,), (sm90.THREADS,), *args, shared_mem=shared), replays)
        add("fwd_h_sm90", "+".join(edits) or "base", ms, f"{splits} shares of I, {stages} stages")
    h.normal_()  # y from a fresh H (the variants above leave it wrong or unwritten)
    for edits in Y_VARIANTS:
        k = _kernel(edits, root, "forward_sm90.cu", f"panther::sl::sketched_linear_fwd_y_sm90<__nv_bfloat16, {depth}>")
        args = (h, U1, S2, b, y, i64(T), i64(O), i32(L * K), i32(groups), f32(1.0 / (2 * L)))
        shared = sm90.y_shared_bytes(depth, dt)
        ms = median_ms(lambda: k((cdiv(T, sm90.BM) * groups,), (sm90.THREADS,), *args, shared_mem=shared), replays)
        add("fwd_y_sm90", "+".join(edits) or "base", ms, f"{groups} blocks per row tile")
    run_backward(T, I, O, replays, root, x, h, S1, U2, U1, S2, add)
    x2 = torch.empty_like(x)
    add("reference", "copy of x", median_ms(lambda: x2.copy_(x), replays), f"{2 * x.nbytes / 1e6:.0f} MB moved")
    add("reference", "y zeroed", median_ms(lambda: y.zero_(), replays), f"{y.nbytes / 1e6:.0f} MB written")
    add("reference", "x summed over rows", median_ms(lambda: x.sum(dim=1), replays), f"{x.nbytes / 1e6:.0f} MB read")
    return rows


def run_backward(T: int, I: int, O: int, replays: int, root: Path, x, h, S1, U2, U1, S2, add) -> None:
    """bwd_g_sm90 and bwd_x_fused_sm90 alone, every gradient wanted (bias too), with G_VARIANTS and X_VARIANTS; each
    time goes to ``add`` (run_shape's)."""
    import torch

    from graph_timing import median_ms
    from panther.backends.toolkit import cdiv
    from panther_cuda._nvrtc import f32, i32, i64
    from panther_cuda.ops.sketched_linear import sm90
    from panther_cuda.ops.sketched_linear.backward import _tiles, backward_splits, fused_x_split
    from panther_cuda.ops.sketched_linear.limits import LARGE

    dev, dt = x.device, x.dtype
    R, needs = 2 * L * K, (True,) * 6
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    g = torch.randn(T, O, device=dev).to(dt)
    dh = torch.empty(T, R, device=dev, dtype=dt)
    dx = torch.empty_like(x)
    dS1, dU2, dU1, dS2 = (torch.empty_like(w) for w in (S1, U2, U1, S2))
    db = torch.empty(O, device=dev, dtype=dt)
    tiles_g, _, tiles_dh = _tiles(I, O, T, R, needs, LARGE)
    split, dh_split = backward_splits(T, I, O, R, needs, LARGE, sms)
    ws2 = torch.empty(split, R + 1, O, device=dev, dtype=torch.float32) if split > 1 else None
    ws_dh = torch.empty(dh_split, T, R, device=dev, dtype=torch.float32) if dh_split > 1 else None
    n_dh = tiles_dh * dh_split
    blocks = n_dh + tiles_g * split
    stages = sm90.ring_stages(blocks, dt, dev)
    args = (g, h, U1, S2, dh, dU1, dS2, db, ws2, i64(T), i64(O), i32(L), i32(K), f32(1.0 / (2 * L)), i64(n_dh), i32(0),
            i32(R), i32(split), ws_dh, i32(dh_split))
    name = f"panther::sl::sketched_linear_bwd_g_sm90<__nv_bfloat16, {stages}>"
    shared = sm90.ring_shared_bytes(dt, stages)
    for edits in G_VARIANTS:
        k = _kernel(edits, root, "backward_sm90.cu", name)
        ms = median_ms(lambda: k((blocks,), (sm90.THREADS,), *args, shared_mem=shared), replays)
        add("bwd_g_sm90", "+".join(edits) or "base", ms,
            f"{dh_split} shares of O (dH), {split} of T (weights), {stages} stages")
    dh.normal_()  # the x pass from a fresh dH (the variants above leave it wrong or unwritten)
    x_split = fused_x_split(T, I, sms)
    ws1 = torch.empty(x_split, I, R, device=dev, dtype=torch.float32) if x_split > 1 else None
    args = (x, dh, S1, U2, dx, dS1, dU2, ws1, i64(T), i64(I), i32(L), i32(K), i32(0), i32(R), i32(x_split))
    grid = cdiv(I, sm90.BN) * x_split
    name = f"panther::sl::sketched_linear_bwd_x_fused_sm90<__nv_bfloat16, {sm90.FUSED_X_STAGES}>"
    shared = sm90.fused_x_shared_bytes(dt)
    for edits in X_VARIANTS:
        k = _kernel(edits, root, "backward_sm90.cu", name)
        ms = median_ms(lambda: k((grid,), (sm90.THREADS,), *args, shared_mem=shared), replays)
        add("bwd_x_fused_sm90", "+".join(edits) or "base", ms, f"{x_split} shares of T, {sm90.FUSED_X_STAGES} stages")


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
