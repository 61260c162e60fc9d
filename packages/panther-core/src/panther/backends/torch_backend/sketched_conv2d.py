"""Reference sketched conv2d op in plain PyTorch (custom autograd).

Math (x: (N, C, H, W), 2L terms of rank k, S1s: (2L, k, C, kh, kw), U1s: (2L, k, O)):
    Z = conv2d(x, S)            S = S1s viewed as (2Lk, C, kh, kw)        Z: (N, 2Lk, H', W')
    y = Uᵀ Z / (2L) + b         U = U1s viewed as (2Lk, O), a 1x1 projection     y: (N, O, H', W')
Backward (g = dL/dy):
    dZ = U g / (2L);  dx = conv2d_input(dZ, S);  dS = conv2d_weight(x, dZ);  db = Σ g
Double backward (``create_graph=True``): the same formulas in differentiable torch ops, from the saved
inputs (Z recomputed under autograd), so that gradients of gradients are exact.
Under torch.func transforms (grad, vmap, jvp, jacrev) the forward runs as plain differentiable torch ops,
which every transform (forward mode included) differentiates itself.
On the CPU, 16-bit inputs are convolved in float32 and each result rounded once to its input's dtype: torch's
CPU convolution in bfloat16 (oneDNN) returns wrong values for some dilated, strided shapes (torch 2.13: x of
1 x 1 x 5 x 5, a 1 x 3 kernel, dilation 2, stride (1, 2), 17 output channels or more; the conformance row's
second example).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch.nn.grad import conv2d_input, conv2d_weight


def _on_cpu_in_16_bits(t: torch.Tensor) -> bool:
    """Whether ``t``'s convolutions run in float32 (the module's note: torch's CPU bfloat16 convolution)."""
    return t.device.type == "cpu" and t.dtype in (torch.float16, torch.bfloat16)


def _float(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.float()


def _rounded(grads, like):
    """Each gradient in its input's dtype (None stays None)."""
    return tuple(None if g is None else g.to(t.dtype) for g, t in zip(grads, like))


def _forward(x, S1s, U1s, bias, stride, padding, dilation):
    """``(y, Z)``: Z is returned (non-differentiable) for the backward to save."""
    if _on_cpu_in_16_bits(x):
        y, Z = _forward(x.float(), S1s.float(), U1s.float(), _float(bias), stride, padding, dilation)
        return y.to(x.dtype), Z.to(x.dtype)
    terms, k, C, kh, kw = S1s.shape
    O = U1s.shape[-1]
    Z = F.conv2d(x, S1s.reshape(terms * k, C, kh, kw), None, stride, padding, dilation)
    P = U1s.reshape(terms * k, O).t().reshape(O, terms * k, 1, 1)  # 1x1 projection weight
    y = F.conv2d(Z, P, None) * (1.0 / terms)
    if bias is not None:
        y = y + bias.view(1, O, 1, 1)
    return y, Z


def _setup_context(ctx, inputs, output):
    x, S1s, U1s, bias, stride, padding, dilation = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)
    # S1s and U1s are saved whole (inputs, no extra memory): the double backward differentiates through them
    ctx.save_for_backward(x, S1s, U1s, output[1] if ctx.needs_input_grad[2] else None)
    ctx.conf = (stride, padding, dilation, S1s.shape, bias is not None)


def _backward(ctx, g, _Z_grad):
    if g is None:  # only the non-differentiable Z was used
        return None, None, None, None, None, None, None
    if torch.is_grad_enabled():  # create_graph=True: a backward that autograd can differentiate
        return _differentiable_backward(ctx, g)
    x, S1s, U1s, Z = ctx.saved_tensors
    if _on_cpu_in_16_bits(g):
        grads = _gradients(ctx, g.float(), x.float(), S1s.float(), U1s.float(), _float(Z))
        return _rounded(grads, (x, S1s, U1s, g)) + (None, None, None)
    return _gradients(ctx, g, x, S1s, U1s, Z) + (None, None, None)


def _gradients(ctx, g, x, S1s, U1s, Z):
    """``(dx, dS1s, dU1s, db)`` of :func:`_backward`, each None where not needed."""
    stride, padding, dilation, s_shape, has_bias = ctx.conf
    terms, k, C, kh, kw = s_shape
    O = U1s.shape[-1]
    S = S1s.reshape(terms * k, C, kh, kw)
    P = U1s.reshape(terms * k, O).t().reshape(O, terms * k, 1, 1)
    dx = dS = dU = db = None
    need_x, need_S, need_U, need_b = ctx.needs_input_grad[:4]
    if need_x or need_S:
        dZ = F.conv2d(g, P.transpose(0, 1)) * (1.0 / terms)  # (N, 2Lk, H', W')
        if need_x:
            dx = conv2d_input(x.shape, S, dZ, stride, padding, dilation)
        if need_S:
            dS = conv2d_weight(x, S.shape, dZ, stride, padding, dilation).view(s_shape)
    if need_U:
        dU = torch.einsum("nchw,nohw->co", Z, g).mul_(1.0 / terms).reshape(terms, -1, O)
    if need_b and has_bias:
        db = g.sum((0, 2, 3))
    return dx, dS, dU, db


def _differentiable_backward(ctx, g):
    """The backward of :func:`_backward`, built from the saved inputs with differentiable ops."""
    x, S1s, U1s = ctx.saved_tensors[:3]
    if _on_cpu_in_16_bits(g):  # .float() and .to() are differentiable: the graph keeps the dtypes straight
        grads = _differentiable_gradients(ctx, g.float(), x.float(), S1s.float(), U1s.float())
        return _rounded(grads, (x, S1s, U1s, g)) + (None, None, None)
    return _differentiable_gradients(ctx, g, x, S1s, U1s) + (None, None, None)


def _differentiable_gradients(ctx, g, x, S1s, U1s):
    """``(dx, dS1s, dU1s, db)`` of :func:`_differentiable_backward`, each None where not needed."""
    stride, padding, dilation, s_shape, has_bias = ctx.conf
    terms, k, C, kh, kw = s_shape
    O = U1s.shape[-1]
    S = S1s.reshape(terms * k, C, kh, kw)
    U = U1s.reshape(terms * k, O)
    dx = dS = dU = db = None
    need_x, need_S, need_U, need_b = ctx.needs_input_grad[:4]
    if need_x or need_S:
        dZ = F.conv2d(g, U.reshape(terms * k, O, 1, 1)) * (1.0 / terms)  # (N, 2Lk, H', W')
        if need_x:
            dx = conv2d_input(x.shape, S, dZ, stride, padding, dilation)
        if need_S:
            dS = conv2d_weight(x, S.shape, dZ, stride, padding, dilation).reshape(s_shape)
    if need_U:
        Z = F.conv2d(x, S, None, stride, padding, dilation)
        dU = (torch.einsum("nchw,nohw->co", Z, g) * (1.0 / terms)).reshape(terms, k, O)
    if need_b and has_bias:
        db = g.sum((0, 2, 3))
    return dx, dS, dU, db


class SketchedConv2dFunction(torch.autograd.Function):
    """The autograd Function of eager mode (forward takes ``ctx``, the cheapest ``Function.apply``)."""

    @staticmethod
    def forward(ctx, *inputs):
        output = _forward(*inputs)
        _setup_context(ctx, inputs, output)
        return output

    backward = staticmethod(_backward)


def sketched_conv2d(
    x: torch.Tensor,
    S1s: torch.Tensor,
    U1s: torch.Tensor,
    bias: Optional[torch.Tensor],
    stride: Tuple[int, int] = (1, 1),
    padding: Tuple[int, int] = (0, 0),
    dilation: Tuple[int, int] = (1, 1),
) -> torch.Tensor:
    """y = 1/(2L) Σ_i U1_iᵀ conv(x, S1_i) + b; padding is explicit (ints), see :func:`panther.ops.sketched_conv2d`."""
    if torch._C._are_functorch_transforms_active():  # grad, vmap, jvp: differentiate the plain math
        return _forward(x, S1s, U1s, bias, tuple(stride), tuple(padding), tuple(dilation))[0]
    return SketchedConv2dFunction.apply(x, S1s, U1s, bias, tuple(stride), tuple(padding), tuple(dilation))[0]
