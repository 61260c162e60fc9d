"""Times the cuda backend's sketched_conv2d, each kernel family forced, against F.conv2d and the torch backend.

    python packages/panther-cuda/tools/conv_sweep.py --out conv_sweep.json [--compiled] [--reps 30]
        [--variants default,async128] [--cudnn-benchmark]

For the two benchmark shapes (N=32 64->128 56x56 L=1 k=16; N=64 256->256 28x28 L=1 k=32; 3x3, padding 1,
bf16), NCHW and channels_last: the forward (under no_grad) and forward+backward (gradients of x, S1s /
W and bias, as a training step asks) of each implementation, each captured in a CUDA graph and replayed;
the L2 is flushed before each replay, outside the timed events; median and 20th / 80th percentiles of
--reps replays after warm-up. Implementations: ``cuda`` (the default choice), ``cuda:<variant>`` for each
forward.VARIANT in VARIANTS (halo64, halo128, their cp.async loaders async64 and async128 with rings of 2 to 4
buffers, "async64s3", the tap-major taps64 and taps128, generic, forced tiles; "composed": cuDNN's convolution
then cuBLAS's product; "+cl": cuDNN's convolutions channels_last for an NCHW x; "+fill": the composed NCHW
forward's bias by a kernel; "+timed": cuDNN's algorithms timed, in a sweep without untimed variants, whose
compiled peer then runs the plan the op chose for the convolution they share (where both take x in one layout:
not with +cl at NCHW); "+dx": the backward's dx by the halo kernels), ``torch`` (the torch backend), ``F.conv2d``
(the dense layer), and with --compiled the peer a user would write (one conv to 2Lk channels, then
the 1x1 projection, under torch.compile). Each cuda variant's y is checked against a float32 reference first
(max-normalised error printed). For those in KERNEL_TIMES also each kernel's time (torch.profiler, eager calls,
L2 not flushed), forward and fwd+bwd: where the time goes. Prints tables; writes every number and the halo plan
to --out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import panther.ops
from panther_cuda.ops.sketched_conv2d import backward, forward

sys.path.insert(0, str(Path(__file__).resolve().parent))  # graph_timing, beside this file
sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))  # harness: benchmarks/run.py's peers
from graph_timing import capture, kernel_times, replay_ms  # noqa: E402
from harness.cases import concat_conv2d as _concat_conv2d  # noqa: E402

CASES = [  # (N, C, O, H, W, L, k)
    (32, 64, 128, 56, 56, 1, 16),
    (64, 256, 256, 28, 28, 1, 32),
]
# forward.VARIANT values: the default choice, each family, and a few forced tiles (TH x TW output pixels)
# "composed": the forward composed of cuDNN's convolution to R channels and cuBLAS's projection (forward.FORWARD);
# "+timed": the op's cuDNN convolutions choosing their algorithms by timing them (forward.CUDNN_ALGORITHMS), only
# in a sweep of its own (torch keeps the plan a convolution first got on a thread, whichever way it was chosen)
# "+cl": the op's cuDNN convolutions channels_last for an NCHW x (forward.CUDNN_LAYOUT), x copied once per pass;
# "+fill": an NCHW y's bias written by fill_planes before the composed forward's product (forward.NCHW_BIAS)
# "+dx": with the backward's dx by the conv_rank kernels (backward.DX = "kernels") instead of cuDNN; "+uloads":
# the fused forward's U tiles loaded through registers when their tile comes (forward.U_TILES = "loads")
VARIANTS = [None, "+uloads", "halo64", "halo128", "async64", "async128", "async64s3", "async64s4", "async128s3",
            "async128s4", "async64+uloads", "async128+uloads",
            "taps64", "taps128", "taps64s3", "generic", "halo64+dx", "async64+dx", "taps64+dx", "taps128+dx",
            "halo64:4x16", "async64:4x16", "taps64:4x16", "halo64:2x32", "halo64:1x64", "halo128:4x32",
            "async64:1x56", "async64s3:1x56", "composed", "+cl", "composed+cl", "+timed",
            "composed+timed", "+cl+timed", "composed+cl+timed", "composed+fill", "composed+cl+fill"]
# the implementations whose kernels are timed one by one
KERNEL_TIMES = ("cuda", "cuda:async64", "cuda:taps64", "cuda:taps64+dx", "cuda:composed", "cuda:+cl",
                "cuda:composed+cl", "cuda:composed+fill", "cuda:composed+cl+fill", "cuda:+timed", "cuda:composed+timed", "cuda:+cl+timed", "cuda:composed+cl+timed",
                "F.conv2d")
FLUSH = torch.empty(0)
BENCHMARK = False  # torch.backends.cudnn.benchmark for the sweep (--cudnn-benchmark)


def timed(v) -> bool:
    """Whether a variant's cuDNN convolutions choose their algorithms by timing them ("+timed")."""
    return v is not None and "timed" in v.split("+")[1:]


def inputs(N, C, O, H, W, L, k, layout, dtype=torch.bfloat16, device="cuda"):
    g = torch.Generator(device=device).manual_seed(0)
    new = lambda *s: torch.randn(*s, device=device, dtype=dtype, generator=g)  # noqa: E731
    terms = 2 * L
    x = new(N, C, H, W).contiguous(memory_format=layout)
    S1s = new(terms, k, C, 3, 3) / math.sqrt(C * 9)
    U1s = ((torch.randint(0, 2, (terms, k, O), device=device, generator=g) * 2 - 1) / math.sqrt(k)).to(dtype)
    W_ = new(O, C, 3, 3) / math.sqrt(C * 9)
    b = new(O) * 0.1
    gy = new(N, O, H, W).contiguous(memory_format=layout)
    return x, S1s, U1s, W_, b, gy


def concat_conv2d(x, S1s, U1s, b):
    """The harness's `compiled` peer (one conv to 2Lk channels, then the 1x1 projection) at this tool's stride 1,
    padding 1."""
    return _concat_conv2d(x, S1s, U1s, b, stride=1, padding=1)


def time_graph(graph, reps):
    """Median and 20th / 80th percentiles of ``reps`` replays, the L2 flushed before each."""
    samples = sorted(replay_ms(graph, reps, flush=FLUSH))
    q = lambda p: samples[min(len(samples) - 1, int(p * len(samples)))]  # noqa: E731
    return {"median_ms": statistics.median(samples), "p20_ms": q(0.2), "p80_ms": q(0.8)}


@contextlib.contextmanager
def variant(v):
    """forward.VARIANT = v while the graphs are captured (the forward and the backward's launches); "composed":
    forward.FORWARD = "composed" instead; suffixes "+dx": backward.DX = "kernels", "+uloads": forward.U_TILES =
    "loads", "+timed": forward.CUDNN_ALGORITHMS = "timed", "+cl": forward.CUDNN_LAYOUT = "channels_last",
    "+fill": forward.NCHW_BIAS = "kernel"."""
    previous = (forward.VARIANT, backward.DX, forward.U_TILES, forward.FORWARD, forward.CUDNN_ALGORITHMS,
                forward.CUDNN_LAYOUT, forward.NCHW_BIAS)
    family, *options = (v or "").split("+")
    forward.FORWARD = "composed" if family == "composed" else None
    family = "" if family == "composed" else family
    unknown = set(options) - {"dx", "uloads", "timed", "cl", "fill"}
    if unknown:
        raise ValueError(f"variant {v!r}: unknown suffixes {sorted(unknown)} (expected +dx, +uloads, +timed, +cl, "
                         "+fill)")
    forward.VARIANT = family or None
    backward.DX = "kernels" if "dx" in options else "cudnn"
    forward.U_TILES = "loads" if "uloads" in options else "async"
    forward.CUDNN_ALGORITHMS = "timed" if "timed" in options else "heuristic"
    forward.CUDNN_LAYOUT = "channels_last" if "cl" in options else "input"
    forward.NCHW_BIAS = "kernel" if "fill" in options else "torch"
    try:
        yield
    finally:
        (forward.VARIANT, backward.DX, forward.U_TILES, forward.FORWARD, forward.CUDNN_ALGORITHMS,
         forward.CUDNN_LAYOUT, forward.NCHW_BIAS) = previous


def measure(fn, args, grads_of, gy, reps):
    """(fwd, fwd+bwd) timings of fn(*args); grads_of: the indices of args that get gradients."""
    with torch.no_grad():
        fwd = time_graph(capture(lambda: fn(*args)), reps)
    leaves = [a.detach().requires_grad_(i in grads_of) for i, a in enumerate(args)]

    def clear():
        for t in leaves:
            t.grad = None

    def step():
        fn(*leaves).backward(gy)

    both = time_graph(capture(step, clear), reps)
    return fwd, both


def kernels(fn, args, grads_of, gy):
    """The kernels of fn(*args): forward (no_grad) and fwd+bwd, each with its launches per call and microseconds."""
    leaves = [a.detach().requires_grad_(i in grads_of) for i, a in enumerate(args)]

    def fwd():
        with torch.no_grad():
            fn(*args)

    def step():
        for t in leaves:
            t.grad = None
        fn(*leaves).backward(gy)

    return {"fwd": kernel_times(fwd), "fwd+bwd": kernel_times(step)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="conv_sweep.json")
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--compiled", action="store_true", help="also the torch.compile peer (adds compile time)")
    parser.add_argument("--cudnn-benchmark", action="store_true",
                        help="torch.backends.cudnn.benchmark on for every implementation (cuDNN times its algorithms "
                        "on each convolution's first call and keeps the fastest)")
    parser.add_argument("--variants", help="comma-separated subset of VARIANTS to time ('default': the default "
                        "choice), e.g. default,async128; all of them if omitted")
    a = parser.parse_args()
    variants = [v for v in VARIANTS if not timed(v)]
    if a.variants:
        names = [None if v == "default" else v for v in a.variants.split(",")]
        unknown = [v for v in names if v not in VARIANTS]
        if unknown:
            parser.error(f"--variants: {unknown} not in {VARIANTS}")
        if len({timed(v) for v in names}) > 1:
            parser.error("--variants: torch keeps one cuDNN plan per convolution and thread, chosen on the "
                         "convolution's first call, so variants with +timed and without would all run the first "
                         "one's: time them in sweeps of their own")
        variants = names
    global FLUSH, BENCHMARK
    BENCHMARK = torch.backends.cudnn.benchmark = a.cudnn_benchmark
    FLUSH = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    t0 = time.time()
    rows = []
    for N, C, O, H, W, L, k in CASES:
        for layout_name, layout in (("nchw", torch.contiguous_format), ("channels_last", torch.channels_last)):
            x, S1s, U1s, W_, b, gy = inputs(N, C, O, H, W, L, k, layout)
            label = f"N={N} {C}->{O} {H}x{W} L={L} k={k} {layout_name}"
            R = 2 * L * k
            ref = concat_conv2d(x.float(), S1s.float(), U1s.float(), b.float())
            impls = []
            for v in variants:
                name = "cuda" if v is None else f"cuda:{v}"

                def run(x, S1s, U1s, b):
                    return panther.ops.sketched_conv2d(x, S1s, U1s, b, 1, 1, backend="cuda")

                extra = {"variant": v}
                try:
                    with variant(v):
                        halo = forward._halo(x, S1s.reshape(R, -1), R, (3, 3), (1, 1), (1, 1), (1, 1), (H, W))
                    composed = (v or "").startswith("composed")
                    fields = ("BM", "TH", "TW", "CC", "flags", "hb")
                    extra["plan"] = None if halo is None or composed else dict(zip(fields, (halo[0], *halo[1])))
                    with torch.no_grad(), variant(v):
                        y = run(x, S1s, U1s, b)
                    extra["rel_err"] = ((y.float() - ref).abs().max() / ref.abs().max()).item()
                except Exception as e:  # reported, the sweep goes on
                    rows.append({"case": label, "impl": name, "error": f"{type(e).__name__}: {e}", **extra})
                    print(f"{label:44s} {name:14s} ERROR {rows[-1]['error'][:100]}", flush=True)
                    continue
                impls.append((name, run, (x, S1s, U1s, b), (0, 1, 3), extra))
            torch_fn = lambda x, S1s, U1s, b: panther.ops.sketched_conv2d(x, S1s, U1s, b, 1, 1, backend="torch")  # noqa: E731
            impls.append(("torch", torch_fn, (x, S1s, U1s, b), (0, 1, 3), {}))
            impls.append(("F.conv2d", lambda x, W_, b: F.conv2d(x, W_, b, 1, 1), (x, W_, b), (0, 1, 2), {}))
            if a.compiled:
                impls.append(("compiled", torch.compile(concat_conv2d), (x, S1s, U1s, b), (0, 1, 3), {}))
            for name, fn, args, grads_of, extra in impls:
                try:
                    with variant(extra.get("variant")):
                        fwd, both = measure(fn, args, grads_of, gy, a.reps)
                        row = {"case": label, "impl": name, "fwd": fwd, "fwd_bwd": both, **extra}
                        if name in KERNEL_TIMES:
                            row["kernels"] = kernels(fn, args, grads_of, gy)
                except Exception as e:  # a failing variant is reported, the sweep goes on
                    row = {"case": label, "impl": name, "error": f"{type(e).__name__}: {e}", **extra}
                rows.append(row)
                print(f"{label:44s} {name:14s} " + (f"ERROR {row['error'][:100]}" if "error" in row else
                      f"fwd {row['fwd']['median_ms']:.3f} ms, fwd+bwd {row['fwd_bwd']['median_ms']:.3f} ms"), flush=True)
            save(a.out, rows, a.reps, t0)  # after each case: a sweep cut short keeps the cases finished
    print(f"{'case':44s} {'impl':14s} {'fwd ms':>8s} {'fwd+bwd':>8s} {'x conv':>7s} {'rel err':>9s}  plan")
    base = {r["case"]: r for r in rows if r["impl"] == "F.conv2d" and "fwd" in r}
    for r in rows:
        if "error" in r:
            print(f"{r['case']:44s} {r['impl']:14s} ERROR {r['error'][:120]}")
            continue
        b_ = base.get(r["case"])
        speed = b_["fwd_bwd"]["median_ms"] / r["fwd_bwd"]["median_ms"] if b_ else float("nan")
        err = f"{r['rel_err']:.2e}" if "rel_err" in r else ""
        plan = r.get("plan")
        plan_s = "" if plan is None else f"BM={plan['BM']} {plan['TH']}x{plan['TW']} CC={plan['CC']} flags={plan['flags']}"
        print(f"{r['case']:44s} {r['impl']:14s} {r['fwd']['median_ms']:8.3f} {r['fwd_bwd']['median_ms']:8.3f} "
              f"{speed:6.2f}x {err:>9s}  {plan_s}")
    print("\nkernels of KERNEL_TIMES' implementations (torch.profiler, eager calls, L2 not flushed)\n"
          "| case | impl | pass | kernel | per call | us |\n|---|---|---|---|---:|---:|")
    for r in rows:
        for what, ks in r.get("kernels", {}).items():
            for k in ks:
                print(f"| {r['case']} | {r['impl']} | {what} | {k['kernel'][:90]} | {k['per_call']:g} | {k['us']:.1f} |")
    print(f"wrote {a.out} ({save(a.out, rows, a.reps, t0)} s)")


def save(path, rows, reps, t0):
    """Writes the rows so far to path; returns the seconds since t0."""
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "reps": reps,
            "cudnn_benchmark": BENCHMARK,
            "seconds": round(time.time() - t0, 1)}
    with open(path, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return meta["seconds"]


if __name__ == "__main__":
    main()
