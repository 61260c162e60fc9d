"""Check the sm_90a kernels with each ring of sm90.RING_STAGES against float64, on an sm_90 GPU.

    python packages/panther-cuda/tools/sm90_ring_check.py [--dtype bfloat16]

For each stage count and a few ragged shapes (T, I, O, L, k, shares of I), the forward with H and y by
forward_sm90.cu and the backward by backward_sm90.cu (every gradient), each against float64 loops on upcast inputs
(the weight gradients from the kernel's own H, as the backward reads it): prints |got - ref|max / |ref|max per
output and exits 1 if any is over --tol. The GPU tests (``-m gpu -k hopper``) check the ring each launch takes by
its grid (sm90.ring_stages); this checks both rings on every shape (the backward's x pass where R <= 128 by
bwd_x_fused_sm90 on its own ring).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # graph_timing, beside this file
from graph_timing import on_sm90  # noqa: E402

SHAPES = [(300, 392, 200, 2, 40, 3), (4096, 1024, 1024, 1, 64, 4), (1000, 2056, 512, 3, 16, 2)]


def errors(T, I, O, L, k, shares, dtype) -> dict:
    from panther_cuda.ops.sketched_linear.backward import sketched_linear_backward
    from panther_cuda.ops.sketched_linear.forward import ForwardPlan, sketched_linear_forward

    d = "cuda"
    x = torch.randn(T, I, device=d).to(dtype)
    S1, U2 = [(torch.randn(L, I, k, device=d) * I**-0.5).to(dtype) for _ in range(2)]
    U1, S2 = [(torch.randn(L, k, O, device=d) * k**-0.5).to(dtype) for _ in range(2)]
    b, g = torch.randn(O, device=d).to(dtype), torch.randn(T, O, device=d).to(dtype)
    plan = ForwardPlan(fused=False, tiles="large", h_splits=shares, hopper_h=True, hopper_y=True)
    y, h = sketched_linear_forward(x, S1, S2, U1, U2, b, plan=plan)
    dx, dS1, dS2, dU1, dU2, db = sketched_linear_backward(g, x, h, S1, S2, U1, U2, (True,) * 6, hopper=True)
    X, s1, s2, u1, u2, B, G = (t.double() for t in (x, S1, S2, U1, U2, b, g))
    Lk = L * k
    A = torch.cat([torch.cat(list(s1), 1), torch.cat(list(u2), 1)], 1)  # [S1 | U2], I x 2Lk
    Bm = torch.cat([torch.cat(list(u1), 0), torch.cat(list(s2), 0)], 0)  # [U1; S2], 2Lk x O
    H = X @ A
    dH = G @ Bm.T / (2 * L)
    dA, dB = X.T @ dH, h.double().T @ G / (2 * L)

    def terms(M, rows):  # (L, k, O) from 2Lk rows, (L, I, k) from 2Lk columns
        return M.reshape(L, k, -1) if rows else M.T.reshape(L, k, -1).transpose(1, 2)

    def err(got, ref):
        return ((got.double() - ref).abs().max() / ref.abs().max()).item()

    return {"H": err(h, H), "y": err(y, H @ Bm / (2 * L) + B), "dx": err(dx, dH @ A.T),
            "dS1": err(dS1, terms(dA[:, :Lk], False)), "dU2": err(dU2, terms(dA[:, Lk:], False)),
            "dU1": err(dU1, terms(dB[:Lk], True)), "dS2": err(dS2, terms(dB[Lk:], True)), "db": err(db, G.sum(0))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
    ap.add_argument("--tol", type=float, default=2e-2, help="largest max-normalised error passed (16-bit: ~4e-3)")
    args = ap.parse_args(argv)
    if not on_sm90("sm90_ring_check"):
        return 2
    from panther_cuda.ops.sketched_linear import sm90

    torch.manual_seed(0)
    dtype, worst = getattr(torch, args.dtype), 0.0
    for stages in sm90.RING_STAGES:
        with mock.patch.object(sm90, "ring_stages", lambda *_, stages=stages: stages):
            for shape in SHAPES:
                e = errors(*shape, dtype)
                worst = max(worst, *e.values())
                print(stages, shape, args.dtype, {n: f"{v:.1e}" for n, v in e.items()})
    print("WORST", worst, "OK" if worst <= args.tol else "OVER")
    return 0 if worst <= args.tol else 1


if __name__ == "__main__":
    sys.exit(main())
