"""The sketched linear op, made from its forward and backward launchers by :func:`panther.backends.toolkit.kernel_op`.

Library ops (``torch.ops.panther_cuda``), opaque ``torch.library.custom_op``s with fake implementations:
    sketched_linear_fwd(x, S1s, S2s, U1s, U2s, bias?, allow_tf32) -> (y, H)
    sketched_linear_bwd(grad_y, x, S1s, S2s, U1s, U2s, bias?, H, need_x, need_S1s, need_S2s, need_U1s,
                        need_U2s, need_bias, allow_tf32) -> (dx, dS1s, dS2s, dU1s, dU2s, dbias)
    (gradients not asked for come back as empty tensors: an op returns tensors, not None).
Eager calls take the toolkit's autograd.Function, which calls the same launchers.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor

from panther.backends.toolkit import kernel_op
from panther_cuda.ops.sketched_linear.backward import sketched_linear_backward
from panther_cuda.ops.sketched_linear.common import allow_tf32 as _allow_tf32
from panther_cuda.ops.sketched_linear.forward import forward_outputs, sketched_linear_forward


def _on_device(t: Tensor):
    # kernels launch on the current device's current stream: make it the inputs' (the library op's body
    # runs wherever torch.compile's caller left the current device)
    if t.is_cuda and t.get_device() != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def _forward(out, x: Tensor, S1s: Tensor, S2s: Tensor, U1s: Tensor, U2s: Tensor, bias: Optional[Tensor],
             allow_tf32: bool, *, in_op: bool) -> None:
    with _on_device(x):
        sketched_linear_forward(x, S1s, S2s, U1s, U2s, bias, allow_tf32, out=out)


def _backward(grads, g, inputs, residuals, needs, *, in_op: bool) -> None:
    x, S1s, S2s, U1s, U2s, _, allow_tf32 = inputs
    with _on_device(g):
        sketched_linear_backward(g, x, residuals[0], S1s, S2s, U1s, U2s, needs, allow_tf32, out=grads)


SKETCHED_LINEAR = kernel_op(
    "panther_cuda::sketched_linear",
    forward=_forward,
    backward=_backward,
    allocate=forward_outputs,
    outputs=("y", "h"),
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
    """y = 1/(2L) Σ_i [(x S1_i) U1_i + (x U2_i) S2_i] + b on the CUDA kernels, x of shape (..., I).

    S1s, U2s: (L, I, k); S2s, U1s: (L, k, O); bias: (O,) or None; one dtype (float32, float16 or
    bfloat16) and one CUDA device for all; any strides (non-contiguous ones are copied once).
    bfloat16 and float16 run on the tensor cores with fp32 accumulation; float32 products use TF32 unless
    ``torch.get_float32_matmul_precision() == "highest"`` (then exact FFMA). Differentiable in every
    tensor argument (first order: a second backward raises an error); traceable by
    ``torch.compile(fullgraph=True)``. Arguments are not validated here
    (:func:`panther.ops.sketched_linear` does that before it dispatches).
    """
    return SKETCHED_LINEAR(x, S1s, S2s, U1s, U2s, bias, _allow_tf32())
