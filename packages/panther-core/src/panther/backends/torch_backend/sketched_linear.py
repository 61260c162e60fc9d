"""Reference sketched linear op in plain PyTorch (concatenated form, custom autograd).

Math (x: (T, I), L terms of rank k):
    A = [S1_1 .. S1_L | U2_1 .. U2_L]      (I, 2Lk)
    B = [U1_1; ..; U1_L; S2_1; ..; S2_L]    (2Lk, O)
    H = x A                                 (T, 2Lk)
    y = H B / (2L) + b                      (T, O)
Backward (g = dL/dy):
    dH = g Bᵀ / (2L);  dx = dH Aᵀ;  dS1 = xᵀ dH[:, :Lk];  dS2 = H[:, Lk:]ᵀ g / (2L);  db = Σ_T g
Double backward (``create_graph=True``): the same formulas in differentiable torch ops, from the saved
inputs (A, B and H recomputed under autograd), so that gradients of gradients are exact.
Under torch.func transforms (grad, vmap, jvp, jacrev) the forward runs as plain differentiable torch ops,
which every transform (forward mode included) differentiates itself.
"""

from __future__ import annotations

from typing import Optional

import torch


def concat_left(S1s: torch.Tensor, U2s: torch.Tensor) -> torch.Tensor:
    """A = [S1_1 .. S1_L | U2_1 .. U2_L], (I, 2Lk), from S1s and U2s of shape (L, I, k)."""
    L, I, k = S1s.shape
    return torch.cat([S1s.permute(1, 0, 2).reshape(I, L * k), U2s.permute(1, 0, 2).reshape(I, L * k)], dim=1)


def concat_right(U1s: torch.Tensor, S2s: torch.Tensor) -> torch.Tensor:
    """B = [U1_1; ..; U1_L; S2_1; ..; S2_L], (2Lk, O), from U1s and S2s of shape (L, k, O)."""
    L, k, O = S2s.shape
    return torch.cat([U1s.reshape(L * k, O), S2s.reshape(L * k, O)], dim=0)


def _scaled_mm(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """scale · (a @ b), scaled before the one rounding to the dtype (``mm(a, b).mul_(scale)`` rounds twice,
    which in bfloat16 shows next to the other backends' fp32 epilogues)."""
    return torch.addmm(a.new_zeros(()), a, b, beta=0, alpha=scale)


def _to_terms(d: torch.Tensor, L: int, k: int) -> torch.Tensor:
    """(I, Lk) gradient of one half of A -> (L, I, k), the layout of S1s / U2s."""
    # clone, not contiguous(): with L = 1 the permuted view already counts as contiguous but keeps strides
    # unlike the parameter's, which DDP's gradient buckets warn about
    return d.view(d.shape[0], L, k).permute(1, 0, 2).clone(memory_format=torch.contiguous_format)


def _forward(x, S1s, S2s, U1s, U2s, bias):
    """``(y, A, B, H)``: the intermediates are returned (non-differentiable) for the backward to save."""
    L, I, k = S1s.shape
    x2 = x.reshape(-1, I)
    A = concat_left(S1s, U2s)
    B = concat_right(U1s, S2s)
    H = x2 @ A
    scale = 1.0 / (2 * L)
    if bias is None:
        y = _scaled_mm(H, B, scale)
    else:
        y = torch.addmm(bias, H, B, alpha=scale)
    # not a view of y: autograd forbids in-place ops on views returned by a custom Function
    # (``F.relu(layer(x), inplace=True)``); aten's matmul returns its 3-D results the same way
    return torch.ops.aten._unsafe_view(y, (*x.shape[:-1], B.shape[1])), A, B, H


def _setup_context(ctx, inputs, output):
    x, S1s, S2s, U1s, U2s, bias = inputs
    _, A, B, H = output
    ctx.mark_non_differentiable(A, B, H)
    ctx.set_materialize_grads(False)
    # the inputs too (no extra memory): the double backward recomputes A, B, H from them under autograd
    ctx.save_for_backward(A, B, H, x, S1s, S2s, U1s, U2s)
    L, I, k = S1s.shape
    ctx.dims = (L, I, k, S2s.shape[-1], x.shape, bias is not None)


def _backward(ctx, g, *_intermediates):
    L, I, k, O, x_shape, has_bias = ctx.dims
    if g is None:  # only the non-differentiable intermediates were used
        return None, None, None, None, None, None
    if torch.is_grad_enabled():  # create_graph=True: a backward that autograd can differentiate
        return _differentiable_backward(ctx, g)
    A, B, H, x = ctx.saved_tensors[:4]
    x2 = x.reshape(-1, I)
    Lk = L * k
    scale = 1.0 / (2 * L)
    g2 = g.reshape(-1, O)
    dx = dS1 = dS2 = dU1 = dU2 = db = None
    need_x, need_S1, need_S2, need_U1, need_U2, need_b = ctx.needs_input_grad
    if need_x or need_S1 or need_U2:
        dH = _scaled_mm(g2, B.t(), scale)  # (T, 2Lk)
        if need_x:
            dx = torch.mm(dH, A.t()).view(x_shape)
        if need_S1:  # only the halves that are needed: U2s is normally a buffer
            dS1 = _to_terms(torch.mm(x2.t(), dH[:, :Lk]), L, k)
        if need_U2:
            dU2 = _to_terms(torch.mm(x2.t(), dH[:, Lk:]), L, k)
    if need_S2:
        dS2 = _scaled_mm(H[:, Lk:].t(), g2, scale).view(L, k, O)
    if need_U1:
        dU1 = _scaled_mm(H[:, :Lk].t(), g2, scale).view(L, k, O)
    if need_b and has_bias:
        db = g2.sum(0)
    return dx, dS1, dS2, dU1, dU2, db


def _differentiable_backward(ctx, g):
    """The backward of :func:`_backward`, built from the saved inputs with differentiable ops (no in-place, no no_grad)."""
    x, S1s, S2s, U1s, U2s = ctx.saved_tensors[3:]
    L, I, k, O, x_shape, has_bias = ctx.dims
    Lk = L * k
    scale = 1.0 / (2 * L)
    need_x, need_S1, need_S2, need_U1, need_U2, need_b = ctx.needs_input_grad
    x2 = x.reshape(-1, I)
    g2 = g.reshape(-1, O)
    dx = dS1 = dS2 = dU1 = dU2 = db = None
    if need_x or need_S1 or need_U2:
        A = concat_left(S1s, U2s)
        dH = torch.mm(g2, concat_right(U1s, S2s).t()) * scale
        if need_x:
            dx = torch.mm(dH, A.t()).reshape(x_shape)
        if need_S1:
            dS1 = torch.mm(x2.t(), dH[:, :Lk]).reshape(I, L, k).permute(1, 0, 2)
        if need_U2:
            dU2 = torch.mm(x2.t(), dH[:, Lk:]).reshape(I, L, k).permute(1, 0, 2)
    if need_S2:  # H[:, Lk:] = x U2
        dS2 = (torch.mm(torch.mm(x2, U2s.permute(1, 0, 2).reshape(I, Lk)).t(), g2) * scale).reshape(L, k, O)
    if need_U1:  # H[:, :Lk] = x S1
        dU1 = (torch.mm(torch.mm(x2, S1s.permute(1, 0, 2).reshape(I, Lk)).t(), g2) * scale).reshape(L, k, O)
    if need_b and has_bias:
        db = g2.sum(0)
    return dx, dS1, dS2, dU1, dU2, db


class SketchedLinearFunction(torch.autograd.Function):
    """The autograd Function of eager mode (forward takes ``ctx``, the cheapest ``Function.apply``)."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _forward(*inputs)
        _setup_context(ctx, inputs, output)
        return output

    backward = staticmethod(_backward)


def sketched_linear(
    x: torch.Tensor,
    S1s: torch.Tensor,
    S2s: torch.Tensor,
    U1s: torch.Tensor,
    U2s: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """y = 1/(2L) Σ_i [(x S1_i) U1_i + (x U2_i) S2_i] + b, for x of shape (..., I)."""
    if torch._C._are_functorch_transforms_active():  # grad, vmap, jvp: differentiate the plain math
        return _forward(x, S1s, S2s, U1s, U2s, bias)[0]
    return SketchedLinearFunction.apply(x, S1s, S2s, U1s, U2s, bias)[0]
