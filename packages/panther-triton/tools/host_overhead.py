"""Host-side cost of one sketched-linear call on the triton backend: wall time per call, and a profile.

GPU work at small sizes takes microseconds; in eager mode the Python on the way to the launches can
dominate. Run on a CUDA machine: python3 tools/host_overhead.py [--profile FILE]
"""

import argparse
import cProfile
import pstats
import time

import torch

import panther
import panther.ops


def per_call_us(fn, n=200):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e6


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default=None)
    ap.add_argument("--T", type=int, default=128)
    ap.add_argument("--features", type=int, default=1024)
    args = ap.parse_args()
    import panther_triton

    T, I, L, k = args.T, args.features, 1, 64
    dev, dt = "cuda", torch.bfloat16
    mk = lambda *s, g=False: torch.randn(*s, device=dev, dtype=dt).requires_grad_(g)  # noqa: E731
    x, S1, S2, U1, U2, b = mk(T, I, g=True), mk(L, I, k, g=True), mk(L, k, I, g=True), mk(L, k, I), mk(L, I, k), mk(I, g=True)
    W = mk(I, I, g=True)
    g = torch.randn(T, I, device=dev, dtype=dt)
    panther.available_backends()
    rows = {
        "F.linear fwd": lambda: torch.nn.functional.linear(x, W, b),
        "F.linear fwd+bwd": lambda: torch.nn.functional.linear(x, W, b).backward(g),
        "select()": lambda: panther.backends.select("sketched_linear", x, S1, S2, U1, U2, b, backend="triton"),
        "panther_triton fwd (no grad)": lambda: panther_triton.sketched_linear(x.detach(), S1.detach(), S2.detach(), U1, U2, b.detach()),
        "panther_triton fwd": lambda: panther_triton.sketched_linear(x, S1, S2, U1, U2, b),
        "panther_triton fwd+bwd": lambda: panther_triton.sketched_linear(x, S1, S2, U1, U2, b).backward(g),
        "ops fwd (triton)": lambda: panther.ops.sketched_linear(x, S1, S2, U1, U2, b, backend="triton"),
        "ops fwd+bwd (triton)": lambda: panther.ops.sketched_linear(x, S1, S2, U1, U2, b, backend="triton").backward(g),
        "ops fwd+bwd (torch)": lambda: panther.ops.sketched_linear(x, S1, S2, U1, U2, b, backend="torch").backward(g),
    }
    print(f"T={T} I=O={I} L={L} k={k} bf16: wall time per call (us), synchronised every 200 calls")
    for name, fn in rows.items():
        print(f"  {name:<32} {per_call_us(fn):9.1f}")
    if args.profile:
        fn = rows["ops fwd+bwd (triton)"]
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(200):
            fn()
        torch.cuda.synchronize()
        prof.disable()
        with open(args.profile, "w") as f:
            pstats.Stats(prof, stream=f).sort_stats("tottime").print_stats(40)


if __name__ == "__main__":
    main()
