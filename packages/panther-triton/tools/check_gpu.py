"""Check the triton backend on a CUDA GPU: agreement with the torch backend, then timings.

    python packages/panther-triton/tools/check_gpu.py [--plans] [--quick] [--rows T ...] [--sizes N ...]
        [--terms LxK ...] [--json out.json]

For T in {128, 4096} and I = O in {1024, 2048, 4096, 8192} (or --rows, --sizes), (L, k) in {(1, 64), (2, 32)}
(or --terms, e.g. 4x32), bfloat16:
forward and forward+backward times (triton.testing.do_bench: median, warm-up excluded, CUDA events)
of nn.Linear, the torch backend and the triton backend, their ratios, the roofline floor of the
sketched op (max(FLOPs / 990 TFLOP/s, bytes / 4.8 TB/s), H200 datasheet), and the launch plans the
rule picked (plan.py). --plans also times the alternative launch plans of each shape (to check the rule).
Targets of the issue (T=4096, fwd+bwd): >= 2.5x / 5x / 10x / 20x nn.Linear at 1024 / 2048 / 4096 / 8192;
faster than nn.Linear at T=128 and than the torch backend everywhere.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

import torch


def _bench(fn, rep=200):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median") * 1e3  # us


def _bench_graph(fn):
    """GPU time of fn alone: median replay of a CUDA graph of it (host overhead excluded), in us."""
    import triton.testing

    for _ in range(2):  # tuning and compilation happen outside the capture
        fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median") * 1e3


def _inputs(T, I, O, L, k, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device="cuda", dtype=torch.float32) * scale).to(dtype)

    x = rnd(T, I).requires_grad_()
    S1s = rnd(L, I, k, scale=I**-0.5).requires_grad_()
    S2s = rnd(L, k, O, scale=k**-0.5).requires_grad_()
    U1s = rnd(L, k, O, scale=k**-0.5)
    U2s = rnd(L, I, k, scale=I**-0.5)
    b = rnd(O).requires_grad_()
    return x, S1s, S2s, U1s, U2s, b


def _timings(fn, leaves, grad_out):
    def fwd():
        with torch.no_grad():
            fn()

    def fwd_bwd():
        for t in leaves:
            t.grad = None
        fn().backward(grad_out)

    return _bench(fwd), _bench(fwd_bwd)


def _floor_us(T, I, O, L, k, es=2, backward=False):
    R = 2 * L * k
    flops = 2 * T * R * (I + O)
    nbytes = es * (T * I + T * O + 2 * I * R // 2 + 2 * R // 2 * O)
    if backward:  # dH, dS2, dx, dS1; g read twice, x read, dx written
        flops += 2 * T * O * R + 2 * T * L * k * O + 2 * T * R * I + 2 * T * I * L * k
        nbytes += es * (2 * T * O + 2 * T * I)
    return max(flops / 990e12, nbytes / 4.8e12) * 1e6


def _terms(text: str):
    L, sep, k = text.partition("x")
    if not sep or not L.isdigit() or not k.isdigit() or int(L) < 1 or int(k) < 1:
        raise argparse.ArgumentTypeError(f"--terms wants LxK with positive integers (e.g. 4x32), got {text!r}")
    return int(L), int(k)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--plans", action="store_true", help="also time the alternative launch plans")
    ap.add_argument("--quick", action="store_true", help="(L, k) = (1, 64) only")
    ap.add_argument("--terms", nargs="+", type=_terms, help="(num_terms, low_rank) pairs as LxK (default 1x64 2x32)")
    ap.add_argument("--rows", type=int, nargs="+", default=[128, 4096], help="row counts T (default 128 4096)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096, 8192], help="features I = O")
    ap.add_argument("--json", help="write the figures here (benchmarks/results/... keeps them traceable)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to check")
        return 1

    import triton

    import panther
    import panther_triton
    from panther.backends.torch_backend import sketched_linear as torch_backend
    from panther_triton import BackwardPlan, ForwardPlan, use_plans
    from panther_triton.ops.sketched_linear.plan import describe

    torch.backends.cuda.matmul.allow_tf32 = True
    dtype = torch.bfloat16
    props = torch.cuda.get_device_properties(0)
    commit = os.environ.get("PANTHER_COMMIT", "")  # the runner's, over a copied tree's possibly stale .git
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        except OSError:
            commit = ""
    meta = {
        "device": props.name, "sms": props.multi_processor_count, "torch": torch.__version__,
        "triton": triton.__version__, "python": platform.python_version(), "commit": commit, "dtype": str(dtype),
    }
    print(meta)
    results = []
    be = {i.name: i for i in panther.backends.backend_infos()}
    assert be["triton"].available, be["triton"].unavailable_reason
    ok = True
    Ts = tuple(args.rows)
    Lks = tuple(args.terms) if args.terms else ((1, 64),) if args.quick else ((1, 64), (2, 32))
    hdr = (f"{'T':>5} {'I=O':>5} {'L,k':>5} | {'fwd us: linear':>14} {'torch':>7} {'triton':>7} {'floor':>6} | "
           f"{'f+b us: linear':>14} {'torch':>7} {'triton':>7} {'floor':>6} | {'xLin f+b':>8} {'xTorch':>6}  err")
    print(hdr)
    for T in Ts:
        for n in args.sizes:
            for L, k in Lks:
                I = O = n
                leaves = _inputs(T, I, O, L, k, dtype)
                x, S1s, S2s, U1s, U2s, b = leaves
                trained = (x, S1s, S2s, b)
                g = torch.randn(T, O, device="cuda", dtype=dtype)
                with torch.no_grad():
                    y_t = panther_triton.sketched_linear(*leaves)
                    y_r = torch_backend(*(t.double() for t in leaves))
                err = ((y_t.double() - y_r).abs().max() / y_r.abs().max()).item()
                ok &= err < 3e-2
                lin = torch.nn.Linear(I, O, device="cuda", dtype=dtype)
                xl = x.detach().clone().requires_grad_()
                t_lin = _timings(lambda: lin(xl), [xl, *lin.parameters()], g)
                t_ref = _timings(lambda: torch_backend(*leaves), trained, g)
                t_tri = _timings(lambda: panther_triton.sketched_linear(*leaves), trained, g)
                floors = (_floor_us(T, I, O, L, k), _floor_us(T, I, O, L, k, backward=True))
                row = {
                    "T": T, "I": I, "O": O, "L": L, "k": k, "err_vs_torch_backend": err,
                    "linear_us": t_lin, "torch_backend_us": t_ref, "triton_us": t_tri, "floor_us": floors,
                    "plans": describe(T, I, O, L * k, x.device),
                }
                print(f"{T:5d} {n:5d} {L},{k:<3d} | {t_lin[0]:14.1f} {t_ref[0]:7.1f} {t_tri[0]:7.1f} {floors[0]:6.1f} | "
                      f"{t_lin[1]:14.1f} {t_ref[1]:7.1f} {t_tri[1]:7.1f} {floors[1]:6.1f} | "
                      f"{t_lin[1] / t_tri[1]:8.2f} {t_ref[1] / t_tri[1]:6.2f}  {err:.1e}")
                print(f"      plan: {row['plans']}")
                if args.plans:
                    alts = {}
                    fplans = [ForwardPlan(True, 1, g_) for g_ in (1, 2, 4)] + [
                        ForwardPlan(False, s, g_) for s in (1, 2, 4, 8) for g_ in (1, 4, 16)]
                    detached = [t.detach() for t in leaves]
                    for fp in fplans:
                        with use_plans(forward=fp):
                            alts[str(fp)] = _bench_graph(lambda: panther_triton.sketched_linear_forward(*detached))
                    with torch.no_grad():
                        y, h = panther_triton.sketched_linear_forward(*(t.detach() for t in leaves))
                    for bp in [BackwardPlan(so, st) for so in (1, 2, 4) for st in (1, 2, 4, 8)]:
                        alts[str(bp)] = _bench_graph(lambda: panther_triton.sketched_linear_backward(
                            g, x.detach(), h, *(t.detach() for t in leaves[1:5]),
                            (True, True, True, False, False, True), plan=bp))
                    chosen = (
                        _bench_graph(lambda: panther_triton.sketched_linear_forward(*detached)),
                        _bench_graph(lambda: panther_triton.sketched_linear_backward(
                            g, x.detach(), h, *detached[1:5], (True, True, True, False, False, True))),
                    )
                    row["chosen_plans_us"] = chosen
                    print(f"      CUDA graph: chosen forward {chosen[0]:.1f}us, backward {chosen[1]:.1f}us")
                    row["plans_us"] = alts
                    for kind in ("Forward", "Backward"):
                        best = sorted(((p, t) for p, t in alts.items() if p.startswith(kind)), key=lambda kv: kv[1])
                        print(f"      fastest {kind.lower()} plans:", ", ".join(f"{p[len(kind) + 4:]} {t:.1f}us" for p, t in best[:5]))
                results.append(row)
                del leaves, x, S1s, S2s, U1s, U2s, b, lin, xl, g, y_t, y_r
                torch.cuda.empty_cache()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)
        print("wrote", args.json)
    print("agreement with the torch backend:", "ok" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
