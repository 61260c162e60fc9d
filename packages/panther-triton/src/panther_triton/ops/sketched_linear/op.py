"""The sketched linear op as torch.library ops, its autograd, and the public entry.

Ops:
    panther_triton::sketched_linear_fwd(x, S1s, S2s, U1s, U2s, bias?, allow_tf32) -> (y, H)
    panther_triton::sketched_linear_bwd(g, x, H, S1s, S2s, U1s, U2s, need_x, need_s1, need_s2,
                                        need_u1, need_u2, need_b, allow_tf32) -> (dx, dS1, dS2, dU1, dU2, db)
    (gradients not asked for come back as empty tensors: an op returns tensors, not None).

On a GPU they are ``torch.library.triton_op``s whose launches go through ``wrap_triton``, so that
torch.compile sees the kernels themselves (Inductor schedules and autotunes them) and the op's fake
implementation is its own code run on fake tensors: output shapes and strides match by construction.
Under ``TRITON_INTERPRET=1`` wrap_triton cannot trace interpreted kernels (torch hands them back
unwrapped and fake tensors reach the interpreter), so the same functions are registered as opaque
``torch.library.custom_op``s with a fake implementation that allocates exactly what the real one returns.
Either way, register_autograd makes the backward op the derivative of the forward op.

Eager calls take a shorter road: a torch.autograd.Function that launches the same kernels directly.
A custom op costs about three times an autograd.Function in dispatch (measured on the CPU here: ~65 us
vs ~19 us per call), which shows at T = 128, where a step is a few microseconds of GPU work.
Under torch.compile :func:`sketched_linear` calls the registered op instead.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from panther_triton._launch import eager
from panther_triton._runtime import device_guard, interpreting
from panther_triton.ops.sketched_linear.backward import sketched_linear_backward
from panther_triton.ops.sketched_linear.common import allow_tf32 as _allow_tf32
from panther_triton.ops.sketched_linear.forward import sketched_linear_forward

FWD = "panther_triton::sketched_linear_fwd"
BWD = "panther_triton::sketched_linear_bwd"
INTERPRETED = interpreting()  # decided once, when the kernels were defined


def _forward_outputs(x: Tensor, S1s: Tensor, S2s: Tensor) -> Tuple[Tensor, Tensor]:
    """What sketched_linear_forward returns, allocated alike (the fake kernel of the interpreter op)."""
    L, I, K = S1s.shape
    O = S2s.shape[-1]
    T = x.numel() // I if I else 0
    y = x.new_empty((T, O))
    return y.view(*x.shape[:-1], O), x.new_empty((T, 2 * L * K))


def _none_to_empty(grads, like: Tensor):
    return tuple(like.new_empty((0,)) if t is None else t for t in grads)


def _backward_outputs(g, x, S1s, S2s, needs) -> Tuple[Tensor, ...]:
    L, I, K = S1s.shape
    O = S2s.shape[-1]
    shapes = (x.shape, (L, I, K), (L, K, O), (L, K, O), (L, I, K), (O,))
    return tuple(x.new_empty(s) if n else x.new_empty((0,)) for s, n in zip(shapes, needs))


def _fwd_impl(x, S1s, S2s, U1s, U2s, bias, allow_tf32, wrap):
    return sketched_linear_forward(x, S1s, S2s, U1s, U2s, bias, allow_tf32, wrap_triton=wrap)


def _bwd_impl(g, x, h, S1s, S2s, U1s, U2s, needs, allow_tf32, wrap):
    grads = sketched_linear_backward(g, x, h, S1s, S2s, U1s, U2s, needs, allow_tf32, wrap_triton=wrap)
    return _none_to_empty(grads, x)


if INTERPRETED:
    @torch.library.custom_op(FWD, mutates_args=())
    def sketched_linear_fwd(
        x: Tensor, S1s: Tensor, S2s: Tensor, U1s: Tensor, U2s: Tensor, bias: Optional[Tensor], allow_tf32: bool
    ) -> Tuple[Tensor, Tensor]:
        return _fwd_impl(x, S1s, S2s, U1s, U2s, bias, allow_tf32, eager)

    @sketched_linear_fwd.register_fake
    def _(x, S1s, S2s, U1s, U2s, bias, allow_tf32):
        return _forward_outputs(x, S1s, S2s)

    @torch.library.custom_op(BWD, mutates_args=())
    def sketched_linear_bwd(
        g: Tensor, x: Tensor, h: Tensor, S1s: Tensor, S2s: Tensor, U1s: Tensor, U2s: Tensor,
        need_x: bool, need_s1: bool, need_s2: bool, need_u1: bool, need_u2: bool, need_b: bool, allow_tf32: bool,
    ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        needs = (need_x, need_s1, need_s2, need_u1, need_u2, need_b)
        return _bwd_impl(g, x, h, S1s, S2s, U1s, U2s, needs, allow_tf32, eager)

    @sketched_linear_bwd.register_fake
    def _(g, x, h, S1s, S2s, U1s, U2s, need_x, need_s1, need_s2, need_u1, need_u2, need_b, allow_tf32):
        return _backward_outputs(g, x, S1s, S2s, (need_x, need_s1, need_s2, need_u1, need_u2, need_b))

else:
    from torch.library import triton_op, wrap_triton

    @triton_op(FWD, mutates_args=())
    def sketched_linear_fwd(
        x: Tensor, S1s: Tensor, S2s: Tensor, U1s: Tensor, U2s: Tensor, bias: Optional[Tensor], allow_tf32: bool
    ) -> Tuple[Tensor, Tensor]:
        return _fwd_impl(x, S1s, S2s, U1s, U2s, bias, allow_tf32, wrap_triton)

    @triton_op(BWD, mutates_args=())
    def sketched_linear_bwd(
        g: Tensor, x: Tensor, h: Tensor, S1s: Tensor, S2s: Tensor, U1s: Tensor, U2s: Tensor,
        need_x: bool, need_s1: bool, need_s2: bool, need_u1: bool, need_u2: bool, need_b: bool, allow_tf32: bool,
    ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        needs = (need_x, need_s1, need_s2, need_u1, need_u2, need_b)
        return _bwd_impl(g, x, h, S1s, S2s, U1s, U2s, needs, allow_tf32, wrap_triton)


def _setup_context(ctx, inputs, output):
    x, S1s, S2s, U1s, U2s, bias, allow_tf32 = inputs
    ctx.save_for_backward(x, output[1], S1s, S2s, U1s, U2s)
    ctx.has_bias = bias is not None
    ctx.allow_tf32 = allow_tf32


def _backward(ctx, grad_y, grad_h):
    x, h, S1s, S2s, U1s, U2s = ctx.saved_tensors
    needs = tuple(bool(n) for n in ctx.needs_input_grad[:6])
    needs = needs[:5] + (needs[5] and ctx.has_bias,)
    grads = torch.ops.panther_triton.sketched_linear_bwd(grad_y, x, h, S1s, S2s, U1s, U2s, *needs, ctx.allow_tf32)
    return (*(gr if n else None for gr, n in zip(grads, needs)), None)


torch.library.register_autograd(FWD, _backward, setup_context=_setup_context)


class SketchedLinearFunction(torch.autograd.Function):
    """Eager autograd of the op: the same launchers, without the custom-op dispatch."""

    @staticmethod
    def forward(ctx, x, S1s, S2s, U1s, U2s, bias, allow_tf32):
        with device_guard(x):
            y, h = sketched_linear_forward(x, S1s, S2s, U1s, U2s, bias, allow_tf32)
        ctx.save_for_backward(x, h, S1s, S2s, U1s, U2s)
        ctx.has_bias = bias is not None
        ctx.allow_tf32 = allow_tf32
        return y

    @staticmethod
    def backward(ctx, g):
        x, h, S1s, S2s, U1s, U2s = ctx.saved_tensors
        needs = ctx.needs_input_grad[:5] + (ctx.needs_input_grad[5] and ctx.has_bias,)
        with device_guard(x):
            grads = sketched_linear_backward(g, x, h, S1s, S2s, U1s, U2s, needs, ctx.allow_tf32)
        return (*grads, None)


def sketched_linear(
    x: Tensor,
    S1s: Tensor,
    S2s: Tensor,
    U1s: Tensor,
    U2s: Tensor,
    bias: Optional[Tensor] = None,
) -> Tensor:
    """y = 1/(2L) Σ_i [(x S1_i) U1_i + (x U2_i) S2_i] + b on the Triton kernels, x of shape (..., I).

    S1s, U2s: (L, I, k); S2s, U1s: (L, k, O); bias: (O,) or None; one dtype (float32, float16 or
    bfloat16) and one device (CUDA, or CPU under TRITON_INTERPRET=1) for all. Float32 products use TF32
    unless ``torch.get_float32_matmul_precision() == "highest"``. Differentiable in every tensor
    argument; traceable by ``torch.compile(fullgraph=True)``. Arguments are not validated here
    (:func:`panther.ops.sketched_linear` does that before it dispatches).
    """
    tf32 = _allow_tf32()
    if torch.compiler.is_compiling():
        return torch.ops.panther_triton.sketched_linear_fwd(x, S1s, S2s, U1s, U2s, bias, tf32)[0]
    if torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, S1s, S2s, U1s, U2s, bias)
    ):
        return SketchedLinearFunction.apply(x, S1s, S2s, U1s, U2s, bias, tf32)
    with device_guard(x):
        return sketched_linear_forward(x, S1s, S2s, U1s, U2s, bias, tf32)[0]
