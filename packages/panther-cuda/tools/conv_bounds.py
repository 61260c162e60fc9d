"""Time the conv op's fused halo forward with parts of its work taken out, to tell what bounds it.

    python packages/panther-cuda/tools/conv_bounds.py --out conv_bounds.json [--replays 50]

Each variant is sketched_conv2d.cu with edits made to a copy in a temporary folder (the package is left as it is),
compiled by NVRTC and launched through the op's own launcher (forward.sketched_conv2d_forward with the fused
kernels forced, the default family and plan), bf16, NCHW, at the two benchmark convs (the spec's 32 x 64 -> 128 at
56², L = 1, k = 16; 64 x 256 -> 256 at 28², L = 1, k = 32; 3x3, padding 1); each time is the median of --replays
CUDA-graph replays. The edits (EDITS) take out:
* ``no-copies``: the cp.async ring's copies of the halo and of S after the first NS - 1 chunks (later chunks
  multiply stale buffers: the results are wrong, the time is what is left without that stream);
* ``no-products``: the main loop's products (Z stays zero);
* ``no-projection``: the epilogue's products by U (y = bias);
* ``no-store``: the epilogue's stores of y, behind a test of the value that never holds, so that the products stay
  live;
and, with all the work in, ``occupancy+1`` / ``occupancy+2``: launch bounds of one / two more blocks an SM (3 / 2
today for 64 / 128 pixels a block; fewer registers a thread).
VARIANTS lists the combinations timed. For reference, the same run times a copy of x (read and write), y zeroed and
x summed (read). Prints a table and writes every number to --out as JSON. The y of ``base`` and of the occupancy
variants is checked (against the torch backend); the others are wrong by design.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))  # graph_timing, beside this file

SOURCE = "sketched_conv2d.cu"
CASES = [(32, 64, 128, 56, 1, 16), (64, 256, 256, 28, 1, 32)]  # (N, C, O, H = W, L, k)

# name -> [(text, replacement)] in SOURCE: each text must occur exactly once (a CPU test checks it)
EDITS: Dict[str, List[Tuple[str, str]]] = {
    "no-copies": [("            if (ahead < g.C) {\n", "            if (ahead < g.C && g.C < 0) {\n")],
    "no-products": [("            products(Hs + (i % NS) * h.HB, Ss + (i % NS) * RP * LD);\n",
                     "            if (g.C < 0) products(Hs + (i % NS) * h.HB, Ss + (i % NS) * RP * LD);\n")],
    "no-projection": [("            warp_product<T, EXACT, BN / 8>(\n                acc2, [&](int r, int c) {",
                       "            if (O < 0) warp_product<T, EXACT, BN / 8>(\n                acc2, [&](int r, int c) {")],
    "no-store": [("                    if (pair) {\n                        store_pair<T>(y + ybase[mt][hh] + o, v0, v1);\n",
                  "                    if (v0 != 1234.5f) continue;\n"
                  "                    if (pair) {\n                        store_pair<T>(y + ybase[mt][hh] + o, v0, v1);\n")],
    "occupancy+1": [("    return (load & LOAD_TAPS) && !(load & LOAD_ASYNC) ? 2 : bm == 64 ? 3 : 2;\n",
                     "    return (load & LOAD_TAPS) && !(load & LOAD_ASYNC) ? 2 : bm == 64 ? 4 : 3;\n")],
    "occupancy+2": [("    return (load & LOAD_TAPS) && !(load & LOAD_ASYNC) ? 2 : bm == 64 ? 3 : 2;\n",
                     "    return (load & LOAD_TAPS) && !(load & LOAD_ASYNC) ? 2 : bm == 64 ? 5 : 4;\n")],
}
VARIANTS: Sequence[Tuple[str, ...]] = (
    (), ("no-store",), ("no-projection",), ("no-projection", "no-store"), ("no-products",), ("no-copies",),
    ("no-copies", "no-products"), ("no-copies", "no-products", "no-projection", "no-store"), ("occupancy+1",),
    ("occupancy+2",),
)


def _op_dir() -> Path:
    import panther_cuda

    return Path(panther_cuda.__file__).resolve().parent / "ops" / "sketched_conv2d"


def patched_source(edits: Sequence[str], op_dir: Optional[Path] = None) -> str:
    """SOURCE with the named edits made; raises ValueError when an edit's text does not occur exactly once."""
    text = ((op_dir or _op_dir()) / SOURCE).read_text()
    for name in edits:
        for old, new in EDITS[name]:
            count = text.count(old)
            if count != 1:
                raise ValueError(f"edit {name!r}: {old.strip()!r} occurs {count} times in {SOURCE} (expected once); "
                                 "update conv_bounds.EDITS to the source")
            text = text.replace(old, new)
    return text


def run_case(N: int, C: int, O: int, H: int, L: int, k: int, replays: int, root: Path) -> List[dict]:
    import torch

    import panther.ops
    from graph_timing import median_ms
    from panther_cuda.ops.sketched_conv2d import forward

    dev, dt, R = torch.device("cuda"), torch.bfloat16, 2 * L * k
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(N, C, H, H, device=dev, dtype=dt, generator=gen)
    S1s = (torch.randn(2 * L, k, C, 3, 3, device=dev, generator=gen) * (C * 9) ** -0.5).to(dt)
    U1s = (torch.randn(2 * L, k, O, device=dev, generator=gen) * k**-0.5).to(dt)
    b = torch.randn(O, device=dev, dtype=dt, generator=gen)
    conv = ((1, 1), (1, 1), (1, 1))
    (y,) = forward.forward_outputs(x, S1s, U1s, b, 1, 1, 1, 1, 1, 1, False)
    want = panther.ops.sketched_conv2d(x, S1s, U1s, b, *conv, backend="torch").float()
    rows = []
    label = f"{N}x{C}->{O} {H}² R={R}"
    previous = forward.Kernel, forward.FORWARD, dict(forward._kernels)
    try:
        forward.FORWARD = "fused"
        for edits in VARIANTS:
            name = "+".join(edits) or "base"
            folder = root / name
            folder.mkdir(parents=True, exist_ok=True)
            (folder / SOURCE).write_text(patched_source(edits))
            # the launcher's kernels from the edited copy (an absolute path), compiled anew
            forward.Kernel = lambda source, name, _path=str(folder / SOURCE), **kw: previous[0](_path, name, **kw)
            forward._kernels.clear()
            run = lambda: forward.sketched_conv2d_forward(y, x, S1s, U1s, b, *conv, False)  # noqa: E731
            run()
            detail = ""
            if all(e.startswith("occupancy") for e in edits):  # all the work in: y is checked
                err = ((y.float() - want).abs().max() / want.abs().max()).item()
                detail = f"max-normalised error {err:.1e}"
            ms = median_ms(run, replays)
            rows.append({"case": label, "variant": name, "us": ms * 1e3, "detail": detail})
            print(f"| {label} | {name} | {ms * 1e3:.1f} | {detail} |", flush=True)
    finally:
        forward.Kernel, forward.FORWARD = previous[:2]
        forward._kernels.clear()
        forward._kernels.update(previous[2])
    x2, flat = torch.empty_like(x), x.view(-1)
    for name, fn, detail in (("copy of x", lambda: x2.copy_(x), f"{2 * x.nbytes / 1e6:.1f} MB moved"),
                             ("y zeroed", lambda: y.zero_(), f"{y.nbytes / 1e6:.1f} MB written"),
                             ("x summed", lambda: flat.sum(), f"{x.nbytes / 1e6:.1f} MB read")):
        ms = median_ms(fn, replays)
        rows.append({"case": label, "variant": f"reference: {name}", "us": ms * 1e3, "detail": detail})
        print(f"| {label} | reference: {name} | {ms * 1e3:.1f} | {detail} |", flush=True)
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="conv_bounds.json")
    parser.add_argument("--replays", type=int, default=50)
    a = parser.parse_args(argv)
    import torch

    start = time.time()
    print("| case | variant | µs | detail |\n|---|---|---:|---|")
    rows: List[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for case in CASES:
            rows += run_case(*case, a.replays, Path(tmp))
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "replays": a.replays,
            "seconds": round(time.time() - start, 1)}
    Path(a.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"wrote {a.out} ({meta['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
