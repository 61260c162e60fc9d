"""Probes of auto's device-time measurement against CUDA-graph replays, for the sketched linear op (GPU only).

    python benchmarks/diagnostics/graph_probes.py measurer OUT.json
    python benchmarks/diagnostics/graph_probes.py forms
    python benchmarks/diagnostics/graph_probes.py order

``measurer``: for a few shapes (128 rows with TF32 fwd+bwd, where auto's pick and the graph-time winner
disagreed on the H100; 4096 rows bf16 forward), each backend's call timed three ways on the copies auto
measures on: ``panther.backends.autotune.measurer`` three times (its eager and device times), a CUDA graph
of one call replayed from an idle device (median of 30), and 20 replays back to back (per call, median
of 7). Prints a table per shape; writes the numbers to OUT.json.

``forms``: one fwd+bwd at 128 rows captured in five call forms per backend: the backend's op called
directly or through ``panther.ops``, its gradients by ``torch.autograd.grad`` (from ones, as auto's
measurement does, or from a fixed gradient) or by ``.backward`` into the leaves (as the harness does);
each replayed from an idle device (median of 40). Shows whether the form of a call moves its graph time.

``order``: the spec's conv forward in bf16, captured four times: the cuda backend forced, twice (two
graphs of the same call), auto (after its first call measured), and the torch backend forced; the four
replays timed interleaved by the harness's clock (``Clock.measure``, L2 flushed) in two name orders, then
one after the other (``Clock.measure_one``). Shows whether a graph's place in the interleaving moves its
time, as two graphs of the same kernels should time alike.

Inputs are the harness's (``LinearCase.build``, L=1, k=64; ``ConvCase``); graphs are captured as the
harness captures them (``Clock.capture``).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the harness

import torch  # noqa: E402

import panther.ops  # noqa: E402
from harness.cases import LinearCase  # noqa: E402
from harness.modes import set_tf32  # noqa: E402
from harness.timing import Clock  # noqa: E402
from panther.backends import autotune  # noqa: E402
from panther.backends.registry import load_backend  # noqa: E402

BACKENDS = ("torch", "triton", "cuda")
CUDA = torch.device("cuda")


def replay_ms(graph, calls: int = 1, samples: int = 30) -> float:
    """Median milliseconds per replay, ``calls`` replays queued back to back from an idle device."""
    times = []
    for _ in range(samples):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def inputs(rows: int, size: int, dtype: torch.dtype):
    """The harness's inputs of the op (x, S1s, S2s, U1s, U2s, b) and its output gradient."""
    case = LinearCase(rows, size, 1, 64).build(CUDA, dtype)
    return [case[a] for a in LinearCase.sketch_args], case["g"]


def measurer_probe(out_path: str) -> None:
    clock, out = Clock(CUDA), {}
    for rows, size, dtype, tf32, grad in [(128, 1024, torch.float32, True, True),
                                          (128, 2048, torch.float32, True, True),
                                          (4096, 2048, torch.bfloat16, False, False),
                                          (128, 1024, torch.bfloat16, False, True)]:
        set_tf32(tf32)
        args, _ = inputs(rows, size, dtype)
        label = f"T={rows} I={size} {dtype} tf32={tf32} {'fwd+bwd' if grad else 'fwd'}"
        found = {}
        backends = [load_backend(n) for n in BACKENDS]
        with torch.set_grad_enabled(grad), \
                autotune._runs_on_copies("sketched_linear", backends, CUDA, tuple(args), {}) as runs:
            timings = [autotune.measurer.time(runs, CUDA) for _ in range(3)]
            for n in BACKENDS:
                graph = clock.capture(runs[n])
                found[n] = {"measurer_gpu_ms": [t[n].gpu_ms for t in timings],
                            "measurer_eager_ms": [t[n].eager_ms for t in timings],
                            "graph_one_ms": replay_ms(graph), "graph_20_ms": replay_ms(graph, calls=20, samples=7)}
                del graph
        out[label] = found
        print(label)
        for n, r in found.items():
            print(f"  {n:7s} measurer gpu {[round(v, 4) for v in r['measurer_gpu_ms']]} eager "
                  f"{[round(v, 4) for v in r['measurer_eager_ms']]}  graph one {r['graph_one_ms']:.4f}  "
                  f"graph x20 {r['graph_20_ms']:.4f}")
    Path(out_path).write_text(json.dumps(out, indent=1))


def forms_probe() -> None:
    clock = Clock(CUDA)
    set_tf32(True)
    for size, dtype in [(1024, torch.float32), (2048, torch.float32), (1024, torch.bfloat16)]:
        args, g = inputs(128, size, dtype)
        leaves = [a for a in args if a.requires_grad]
        ones = torch.ones_like(g)

        def reset():
            for t in leaves:
                t.grad = None

        print(f"T=128 I={size} {dtype}")
        for n in BACKENDS:
            be = load_backend(n)
            forms = {
                "direct+grad(ones)": lambda: torch.autograd.grad(be.sketched_linear(*args), leaves, ones),
                "direct+grad(g)": lambda: torch.autograd.grad(be.sketched_linear(*args), leaves, g),
                "ops+grad(g)": lambda: torch.autograd.grad(panther.ops.sketched_linear(*args, backend=n), leaves, g),
                "ops+backward(g)": lambda: panther.ops.sketched_linear(*args, backend=n).backward(g),
                "direct+backward(g)": lambda: be.sketched_linear(*args).backward(g),
            }
            times = {}
            for name, fn in forms.items():
                graph = clock.capture(fn, reset)
                times[name] = replay_ms(graph, samples=40)
                del graph
            print(f"  {n:7s} " + "  ".join(f"{k} {v:.4f}" for k, v in times.items()))


def order_probe() -> None:
    from harness.cases import PRESETS, spec_conv  # noqa: E402

    clock, budget = Clock(CUDA), PRESETS["gpu-quick"].budget  # as autotune_check times graphs
    case = spec_conv()
    x = case.build(CUDA, torch.bfloat16)
    args = [x[a] for a in case.sketch_args]
    panther.set_backend("auto")
    autotune.clear_dispatch_cache(disk=False)

    def call(name):
        fn = case.backend_fn(name)

        def run():
            with torch.no_grad():
                return fn(*args)
        return run

    call(None)()  # auto measures here
    graphs = {"cuda": clock.capture(call("cuda")), "cuda_again": clock.capture(call("cuda")),
              "auto": clock.capture(call(None)), "torch": clock.capture(call("torch"))}
    for prefix in ("", "z_"):
        names = {f"{prefix}{n}" if n == "auto" else n: g for n, g in graphs.items()}
        got = clock.measure({n: (g.replay, None) for n, g in names.items()}, budget)
        print("interleaved " + "  ".join(f"{n} {r['median_ms']:.4f}" for n, r in sorted(got.items())))
    one = {n: clock.measure_one(g.replay, budget)["median_ms"] for n, g in graphs.items()}
    print("one by one  " + "  ".join(f"{n} {v:.4f}" for n, v in one.items()))
    print("auto's entry", [(k, e.gpu_winner, e.gpu_ms) for k, e in autotune._table.items()])


if __name__ == "__main__":
    if sys.argv[1:2] == ["measurer"] and len(sys.argv) == 3:
        measurer_probe(sys.argv[2])
    elif sys.argv[1:] == ["forms"]:
        forms_probe()
    elif sys.argv[1:] == ["order"]:
        order_probe()
    else:
        sys.exit(__doc__)
