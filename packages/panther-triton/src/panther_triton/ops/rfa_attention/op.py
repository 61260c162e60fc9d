"""Random-feature attention as a differentiable op, made from its forward and backward launchers by
:func:`panther.backends.toolkit.kernel_op`.

Library ops (``torch.ops.panther_triton``):
    rfa_attention_fwd(q, k, v, omega, key_padding_mask?, causal, relu) -> (out, kv, kz, kmax)
    rfa_attention_bwd(grad_out, q, k, v, omega, key_padding_mask?, kv, kz, kmax, need_q, need_k, need_v,
                      need_omega, need_key_padding_mask, causal, relu) -> (dq, dk, dv, domega, dmask)
``kv, kz, kmax`` are the non-causal key state and stabiliser (float32, O(m Dv) per batch·head; empty when
causal): the backward recomputes everything else. triton_op on a GPU, custom_op under the interpreter.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from panther.backends.toolkit import kernel_op
from panther_triton._launch import op_factory
from panther_triton.ops.rfa_attention.backward import (
    _causal_key_grad_kernel, _causal_query_grad_kernel, _key_grad_kernel, _query_grad_kernel,
    rfa_attention_backward,
)
from panther_triton.ops.rfa_attention.forward import (
    _causal_kernel, _kv_state_kernel, _query_kernel, forward_outputs, rfa_attention_forward,
)


def _forward(out, q: Tensor, k: Tensor, v: Tensor, omega: Tensor, key_padding_mask: Optional[Tensor],
             causal: bool, relu: bool, *, in_op: bool) -> None:
    rfa_attention_forward(q, k, v, omega, key_padding_mask, causal, relu, out=out, in_op=in_op)


def _backward(grads, g, inputs, residuals, needs, *, in_op: bool) -> None:
    q, k, v, omega, kpm, causal, relu = inputs
    rfa_attention_backward(grads, g, q, k, v, omega, kpm, *residuals, causal, relu, in_op)


_KERNELS = {
    "panther_triton::rfa_attention_fwd": [_kv_state_kernel, _query_kernel, _causal_kernel],
    "panther_triton::rfa_attention_bwd": [
        _query_grad_kernel, _key_grad_kernel, _causal_query_grad_kernel, _causal_key_grad_kernel,
    ],
}


RFA_ATTENTION = kernel_op(
    "panther_triton::rfa_attention",
    forward=_forward,
    backward=_backward,
    allocate=forward_outputs,
    outputs=("out", "kv", "kz", "kmax"),
    factory=op_factory(_KERNELS),
)
RFAttentionFunction = RFA_ATTENTION.function


def rfa_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    omega: Tensor,
    causal: bool = False,
    kernel: str = "softmax",
    key_padding_mask: Optional[Tensor] = None,
) -> Tensor:
    """Random-feature attention of q (B, H, T, D), k (B, H, S, D), v (B, H, S, Dv) -> (B, H, T, Dv) on the
    Triton kernels; the math is :mod:`panther.ops.rfa_attention`'s.

    omega: ``(m, D)`` or ``(H, m, D)``; one dtype (float32, float16 or bfloat16, float32 accumulation) and one
    device for all; q, k, v may be strided views. Differentiable in q, k, v and omega (first order: a
    second backward raises an error); traceable by ``torch.compile(fullgraph=True)``. Arguments are not
    validated here (:func:`panther.ops.rfa_attention` does that, and the backend's capability check
    refuses sizes past the kernels' limits).
    """
    return RFA_ATTENTION(q, k, v, omega, key_padding_mask, bool(causal), kernel == "relu")
