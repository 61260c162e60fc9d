"""The sketched conv2d op of the cuda backend, made from its launchers by
:func:`panther.backends.toolkit.kernel_op`.

Library ops (``torch.ops.panther_cuda``):
    sketched_conv2d_fwd(x, S1s, U1s, bias?, stride_h, stride_w, padding_h, padding_w, dilation_h,
                        dilation_w, allow_tf32) -> (y,)
    sketched_conv2d_bwd(grad_y, x, S1s, U1s, bias?, need_x, need_S1s, need_U1s, need_bias, stride_h, ...,
                        allow_tf32) -> (dx, dS1s, dU1s, dbias)
    (gradients not asked for come back as empty tensors: an op returns tensors, not None).
They are ``torch.library.custom_op``s: torch.compile keeps them as opaque calls with fake kernels (no
graph break). Eager calls take the toolkit's autograd.Function, which calls the same launchers.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from panther.backends.toolkit import kernel_op
from panther_cuda.ops.sketched_conv2d.backward import sketched_conv2d_backward
from panther_cuda.ops.sketched_conv2d.forward import forward_outputs, memory_format, sketched_conv2d_forward


def _forward(out, x: Tensor, S1s: Tensor, U1s: Tensor, bias: Optional[Tensor], stride_h: int, stride_w: int,
             padding_h: int, padding_w: int, dilation_h: int, dilation_w: int, allow_tf32: bool, *,
             in_op: bool) -> None:
    sketched_conv2d_forward(out[0], x, S1s, U1s, bias, (stride_h, stride_w), (padding_h, padding_w),
                            (dilation_h, dilation_w), allow_tf32)


def _backward(grads, g, inputs, residuals, needs, *, in_op: bool):
    x, S1s, U1s, _, sh, sw, ph, pw, dh, dw, allow_tf32 = inputs
    return sketched_conv2d_backward(grads, g, x, S1s, U1s, (sh, sw), (ph, pw), (dh, dw), needs, allow_tf32)


SKETCHED_CONV2D = kernel_op(
    "panther_cuda::sketched_conv2d",
    forward=_forward,
    backward=_backward,
    allocate=forward_outputs,
    outputs=("y",),
    grad_formats={"x": memory_format},  # dx channels_last for a channels_last x, as nn.Conv2d's
)
SketchedConv2dFunction = SKETCHED_CONV2D.function


@torch.compiler.assume_constant_result  # read once at trace time (a plain call graph-breaks)
def _allow_tf32() -> bool:
    """TF32 for float32 products follows torch: off only at matmul precision "highest"."""
    return torch.get_float32_matmul_precision() != "highest"


def sketched_conv2d(
    x: Tensor,
    S1s: Tensor,
    U1s: Tensor,
    bias: Optional[Tensor] = None,
    stride: Tuple[int, int] = (1, 1),
    padding: Tuple[int, int] = (0, 0),
    dilation: Tuple[int, int] = (1, 1),
) -> Tensor:
    """y = 1/(2L) Σ_i U1_iᵀ conv(x, S1_i) + b on the CUDA kernels; x: (N, C, H, W), y: (N, O, H', W').

    S1s: (2L, k, C, kh, kw) with 2·L·k <= 256; U1s: (2L, k, O); bias: (O,) or None; stride, padding
    (symmetric) and dilation: pairs of ints. One dtype (float32, float16 or bfloat16) and one CUDA device
    for all. x may be NCHW, channels_last or any strides; y is channels_last for a channels_last x, else
    contiguous. Float32 products use TF32 unless ``torch.get_float32_matmul_precision() == "highest"``.
    Differentiable in every tensor argument (first order); traceable by ``torch.compile(fullgraph=True)``.
    Arguments are not validated here (:func:`panther.ops.sketched_conv2d` does that before it dispatches).
    """
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    return SKETCHED_CONV2D(x, S1s, U1s, bias, int(sh), int(sw), int(ph), int(pw), int(dh), int(dw), _allow_tf32())
