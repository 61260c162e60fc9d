"""The sketched linear op, made from its forward and backward launchers by :func:`panther.backends.toolkit.kernel_op`.

Library ops (``torch.ops.panther_triton``):
    sketched_linear_fwd(x, S1s, S2s, U1s, U2s, bias?, allow_tf32) -> (y, H)
    sketched_linear_bwd(grad_y, x, S1s, S2s, U1s, U2s, bias?, H, need_x, need_S1s, need_S2s, need_U1s,
                        need_U2s, need_bias, allow_tf32) -> (dx, dS1s, dS2s, dU1s, dU2s, dbias)
    (gradients not asked for come back as empty tensors: an op returns tensors, not None).

On a GPU they are ``torch.library.triton_op``s, whose kernels go through ``wrap_triton`` so that
torch.compile sees the kernels themselves. Under ``TRITON_INTERPRET=1`` wrap_triton cannot trace
interpreted kernels, so they are opaque ``torch.library.custom_op``s. Eager calls take the toolkit's
autograd.Function, which calls the same launchers without the library-op dispatch.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from panther.backends.toolkit import kernel_op
from panther_triton._launch import op_factory
from panther_triton.ops.sketched_linear.backward import (
    _grad_from_g_kernel, _grad_from_x_kernel, _sum_partials_kernel, sketched_linear_backward,
)
from panther_triton.ops.sketched_linear.common import allow_tf32 as _allow_tf32
from panther_triton.ops.sketched_linear.forward import (
    _sketch_in_kernel, _sketch_out_kernel, forward_outputs, sketched_linear_forward,
)


def _forward(out, x: Tensor, S1s: Tensor, S2s: Tensor, U1s: Tensor, U2s: Tensor, bias: Optional[Tensor],
             allow_tf32: bool, *, in_op: bool) -> None:
    sketched_linear_forward(x, S1s, S2s, U1s, U2s, bias, allow_tf32, out=out, in_op=in_op)


def _backward(grads, g, inputs, residuals, needs, *, in_op: bool) -> None:
    x, S1s, S2s, U1s, U2s, _, allow_tf32 = inputs
    sketched_linear_backward(g, x, residuals[0], S1s, S2s, U1s, U2s, needs, allow_tf32, out=grads, in_op=in_op)


_KERNELS = {
    "panther_triton::sketched_linear_fwd": [_sketch_in_kernel, _sketch_out_kernel],
    "panther_triton::sketched_linear_bwd": [_grad_from_g_kernel, _grad_from_x_kernel, _sum_partials_kernel],
}


SKETCHED_LINEAR = kernel_op(
    "panther_triton::sketched_linear",
    forward=_forward,
    backward=_backward,
    allocate=forward_outputs,
    outputs=("y", "h"),
    factory=op_factory(_KERNELS),
)
SketchedLinearFunction = SKETCHED_LINEAR.function


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
    argument (first order: a second backward raises an error); traceable by
    ``torch.compile(fullgraph=True)``. Arguments are not validated here
    (:func:`panther.ops.sketched_linear` does that before it dispatches).
    """
    return SKETCHED_LINEAR(x, S1s, S2s, U1s, U2s, bias, _allow_tf32())
