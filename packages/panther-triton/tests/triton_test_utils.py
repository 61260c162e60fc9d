"""Inputs, the float64 reference and the error measure shared by the tests of this package."""

from __future__ import annotations

import pytest
import torch

from panther_triton._runtime import interpreting
from panther.testing.naive import sketched_linear as sketched_linear_naive

# Kernel tests run where the kernels can: on CPU tensors under the interpreter (TRITON_INTERPRET=1);
# otherwise on CUDA tensors, and then they are GPU tests (marker `gpu`: `-m gpu` runs them on the GPU
# machine, and without a GPU they skip, or fail under PANTHER_REQUIRE_GPU=1).
DEVICE = "cpu" if interpreting() else "cuda"
needs_kernels = pytest.mark.skipif(False, reason="") if interpreting() else pytest.mark.gpu

# Max-normalised error bounds, |got - ref|max / |ref|max, against float64 math on the same (rounded)
# inputs. Each product is exact in fp32 and accumulated in fp32, so the error is the roundings to the
# storage dtype along the chain (H, then y; dH, then dx; the grads): a handful of half-ulps of the
# largest element, u/2 = 2^-9 (bf16), 2^-11 (fp16, and tf32 operands), 2^-24 (fp32). The bounds allow
# ~15 u/2 for the 16-bit types (observed ~5); a wrong index or mask errs by O(1).
TOL = {torch.float32: 2e-5, torch.float16: 8e-3, torch.bfloat16: 3e-2}
TOL_TF32 = 8e-3


def make_inputs(T, I, O, L, k, dtype, device=DEVICE, bias=True, seed=0, lead=()):
    """x (*lead, T, I) ~ N(0, 1); weights scaled like SKLinear's (H and y of order 1); bias or None."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)

    x = rnd(*lead, T, I)
    S1s = rnd(L, I, k, scale=I**-0.5)
    S2s = rnd(L, k, O, scale=k**-0.5)
    U1s = rnd(L, k, O, scale=k**-0.5)
    U2s = rnd(L, I, k, scale=I**-0.5)
    b = rnd(O) if bias else None
    return x, S1s, S2s, U1s, U2s, b


def reference(inputs, grad_out, wants):
    """float64 forward and the grads of the inputs named by `wants` (indices into inputs)."""
    ins = [None if t is None else t.detach().double().requires_grad_(i in wants) for i, t in enumerate(inputs)]
    y = sketched_linear_naive(*ins)
    if wants:
        y.backward(grad_out.double())
    return y.detach(), [ins[i].grad for i in wants]


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    assert got.shape == ref.shape, (tuple(got.shape), tuple(ref.shape))
    assert torch.isfinite(got).all(), "non-finite values"
    return ((got.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def run_and_compare(fn, inputs, wants, tol, grad_out=None, seed=1):
    """Run fn(*inputs) forward and backward; assert y and the wanted grads match the float64 reference."""
    x = inputs[0]
    # detach(), not clone(): the leaves keep the inputs' strides and storage offsets (clone() would make a
    # strided or misaligned input a fresh contiguous one, and the layout under test would be lost)
    leaves = [None if t is None else t.detach().requires_grad_(i in wants) for i, t in enumerate(inputs)]
    y = fn(*leaves)
    if grad_out is None:
        gen = torch.Generator().manual_seed(seed)
        grad_out = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(x.dtype).to(x.device)
    y.backward(grad_out)
    y_ref, grads_ref = reference(inputs, grad_out, wants)
    errs = {"y": rel_err(y.detach(), y_ref)}
    names = ("x", "S1s", "S2s", "U1s", "U2s", "bias")
    for i, g_ref in zip(wants, grads_ref):
        assert leaves[i].grad is not None, f"no gradient for {names[i]}"
        errs["d" + names[i]] = rel_err(leaves[i].grad, g_ref)
    bad = {k: v for k, v in errs.items() if not v <= tol}
    assert not bad, f"errors above {tol:g}: {bad} (all: {errs})"
    for i, t in enumerate(leaves):
        if t is not None and i not in wants:
            assert t.grad is None
    return y, leaves
