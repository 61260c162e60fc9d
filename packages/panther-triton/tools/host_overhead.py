"""Host-side cost of one sketched-linear call on the triton backend: wall time per call, and a profile.

GPU work at small sizes takes microseconds; in eager mode the Python on the way to the launches can
dominate. Each row is timed with the cached eager launches of panther_triton._launch on and off.
Run on a CUDA machine: python3 tools/host_overhead.py [--T 128] [--features 1024] [--profile FILE] [--trace PREFIX]
(--trace writes PREFIX_<row>.json, torch.profiler Chrome traces with Python frames of every thread, the
autograd engine's device thread included, which cProfile does not see).
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
    ap.add_argument("--trace", default=None, help="prefix of Chrome traces of a few fwd+bwd calls")
    args = ap.parse_args()
    import panther_triton
    from panther_triton import _launch
    from panther_triton.ops.sketched_linear.backward import sketched_linear_backward
    from panther_triton.ops.sketched_linear.forward import sketched_linear_forward

    T, I, L, k = args.T, args.features, 1, 64
    dev, dt = "cuda", torch.bfloat16
    mk = lambda *s, g=False: torch.randn(*s, device=dev, dtype=dt).requires_grad_(g)  # noqa: E731
    x, S1, S2, U1, U2, b = mk(T, I, g=True), mk(L, I, k, g=True), mk(L, k, I, g=True), mk(L, k, I), mk(L, I, k), mk(I, g=True)
    W = mk(I, I, g=True)
    g = torch.randn(T, I, device=dev, dtype=dt)
    d = [t.detach() for t in (x, S1, S2, U1, U2, b)]
    _, h = sketched_linear_forward(*d)
    needs = (True, True, True, False, False, True)
    panther.available_backends()
    rows = {
        "F.linear fwd": lambda: torch.nn.functional.linear(x, W, b),
        "F.linear fwd+bwd": lambda: torch.nn.functional.linear(x, W, b).backward(g),
        "select()": lambda: panther.backends.select("sketched_linear", x, S1, S2, U1, U2, b, backend="triton"),
        "forward launches alone": lambda: sketched_linear_forward(*d),
        "backward launches alone": lambda: sketched_linear_backward(g, d[0], h, *d[1:5], needs),
        "panther_triton fwd (no grad)": lambda: panther_triton.sketched_linear(*d),
        "panther_triton fwd": lambda: panther_triton.sketched_linear(x, S1, S2, U1, U2, b),
        "panther_triton fwd+bwd": lambda: panther_triton.sketched_linear(x, S1, S2, U1, U2, b).backward(g),
        "ops fwd (triton)": lambda: panther.ops.sketched_linear(x, S1, S2, U1, U2, b, backend="triton"),
        "ops fwd+bwd (triton)": lambda: panther.ops.sketched_linear(x, S1, S2, U1, U2, b, backend="triton").backward(g),
        "ops fwd+bwd (torch)": lambda: panther.ops.sketched_linear(x, S1, S2, U1, U2, b, backend="torch").backward(g),
    }
    print(f"T={T} I=O={I} L={L} k={k} bf16: wall time per call (us), synchronised every 200 calls")
    print(f"  {'':<32} {'cached':>9} {'triton':>9}   (launches: panther_triton._launch cache / triton.autotune path)")
    for name, fn in rows.items():
        _launch.use_cache(True)
        fast = per_call_us(fn)
        _launch.use_cache(False)
        slow = per_call_us(fn)
        print(f"  {name:<32} {fast:9.1f} {slow:9.1f}")
    _launch.use_cache(True)
    if args.profile:
        with open(args.profile, "w") as f:
            for name in ("ops fwd+bwd (triton)", "backward launches alone"):
                fn = rows[name]
                per_call_us(fn)
                prof = cProfile.Profile()
                prof.enable()
                for _ in range(200):
                    fn()
                torch.cuda.synchronize()
                prof.disable()
                f.write(f"=== {name}, 200 calls\n")
                pstats.Stats(prof, stream=f).sort_stats("tottime").print_stats(25)
    if args.trace:
        from torch.profiler import ProfilerActivity, profile

        for name in ("F.linear fwd+bwd", "ops fwd+bwd (triton)", "panther_triton fwd+bwd"):
            fn = rows[name]
            per_call_us(fn)
            with profile(activities=[ProfilerActivity.CPU], with_stack=True) as prof:
                for _ in range(10):
                    fn()
                torch.cuda.synchronize()
            slug = "".join(c if c.isalnum() else "_" for c in name).strip("_")
            prof.export_chrome_trace(f"{args.trace}_{slug}.json")
            print("wrote", f"{args.trace}_{slug}.json")


if __name__ == "__main__":
    main()
