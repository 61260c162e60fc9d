"""What selecting a backend costs the host per call: ``auto`` (after its first call) against each backend named.

    python benchmarks/diagnostics/dispatch_cost.py [--device cuda] [--calls 20000] [--rounds 7]

For the spec's linear and conv cases and an attention case (the harness's inputs, bfloat16 on a GPU,
float32 on the CPU), with and without gradients needed, times ``panther.backends.registry.select`` (the
whole per-call dispatch: the selection in force, the key or remembered choice, the backend's capability
check) for ``auto`` and for every backend that accepts the call named as ``backend=`` (as the benchmarks'
forced calls do). Each round times ``--calls`` calls of each in turn, the order shuffled per round;
prints the median over rounds in microseconds per call and auto's over that of its pick named.
On a GPU auto's first call measures the candidates (seconds) before the timing starts; on the CPU auto
never measures and takes the fixed bids.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the harness

import torch  # noqa: E402

from harness.cases import AttentionCase, ConvCase, LinearCase  # noqa: E402
from panther.backends import BackendError, registry  # noqa: E402

CASES = (
    LinearCase(rows=4096, size=1024, terms=1, rank=64),
    ConvCase(batch=32, in_channels=64, out_channels=128, height=56, width=56, kernel=3, stride=1, padding=1,
             terms=1, rank=16),
    AttentionCase(batch=4, heads=8, seq=1024, head_dim=64, sketch_dim=64, causal=False),
)


def args_of(case, inputs) -> tuple:
    args = tuple(inputs[a] for a in case.sketch_args)
    if case.op == "sketched_conv2d":
        s, p = case.stride, case.padding
        return args + ((s, s), (p, p), (1, 1))
    if case.op == "rfa_attention":
        return args + (case.causal,)
    return args


def per_call_us(fn, calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--calls", type=int, default=20000)
    p.add_argument("--rounds", type=int, default=7)
    a = p.parse_args()
    device = torch.device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rng = random.Random(0)
    print(f"torch {torch.__version__} | {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'} "
          f"| {dtype} | {a.calls} calls x {a.rounds} rounds | us per select() call, median over rounds")
    for case in CASES:
        inputs = case.build(device, dtype)
        for grad in (False, True):
            args = args_of(case, inputs)
            if not grad:
                args = tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in args)
            picked = registry.select(case.op, *args).name  # auto's first call: measures on a GPU
            named = {}
            for name in registry.available_backends():
                try:
                    registry.select(case.op, *args, backend=name)
                except BackendError:
                    continue
                named[name] = lambda n=name: registry.select(case.op, *args, backend=n)
            fns = {"auto": lambda: registry.select(case.op, *args), **named}
            times = {n: [] for n in fns}
            for _ in range(a.rounds):
                order = list(fns)
                rng.shuffle(order)
                for n in order:
                    times[n].append(per_call_us(fns[n], a.calls))
            med = {n: statistics.median(t) for n, t in times.items()}
            shown = "  ".join(f"{n} {med[n]:.2f}" for n in med)
            print(f"{case.op:16s} {case.label:40s} grad={'yes' if grad else 'no ':3s} auto->{picked:7s} {shown}  "
                  f"auto/{picked} {med['auto'] / med[picked]:.3f}")


if __name__ == "__main__":
    main()
