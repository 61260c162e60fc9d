"""Random-feature (FAVOR+) attention: checks the arguments, then dispatches.

Reference and math: :mod:`panther.backends.torch_backend.rfa_attention`.
"""

from __future__ import annotations

from typing import Optional

import torch

from panther.backends.registry import dispatch
from panther.ops._checks import check_floating, check_same, check_tensor

KERNELS = ("softmax", "relu")


def rfa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    omega: torch.Tensor,
    causal: bool = False,
    kernel: str = "softmax",
    key_padding_mask: Optional[torch.Tensor] = None,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Linear-time attention of q (B, H, T, D), k (B, H, S, D), v (B, H, S, Dv) -> (B, H, T, Dv).

    Args:
        omega: random feature directions, ``(m, D)`` or ``(H, m, D)``.
        causal: query t attends to keys s <= t (needs T == S).
        kernel: ``"softmax"`` (positive random features) or ``"relu"``.
        key_padding_mask: ``(B, S)`` bool, True where a key is ignored.
        backend: run on this backend instead of the selection in force.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=4)
        check_floating(name, t)
    B, H, T, D = q.shape
    S = k.shape[2]
    if k.shape != (B, H, S, D):
        raise ValueError(f"k must have shape (B={B}, H={H}, S, D={D}) to match q {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:3] != (B, H, S):
        raise ValueError(f"v must have shape (B={B}, H={H}, S={S}, Dv) to match k {tuple(k.shape)}, got {tuple(v.shape)}")
    check_tensor("omega", omega)
    if omega.dim() not in (2, 3) or omega.shape[-1] != D or (omega.dim() == 3 and omega.shape[0] != H):
        raise ValueError(f"omega must have shape (m, D={D}) or (H={H}, m, D={D}), got {tuple(omega.shape)}")
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if causal and T != S:
        raise ValueError(f"causal attention needs as many queries as keys, got T={T} and S={S}")
    if key_padding_mask is not None:
        check_tensor("key_padding_mask", key_padding_mask)
        if key_padding_mask.dtype != torch.bool or key_padding_mask.shape != (B, S):
            raise ValueError(
                f"key_padding_mask must be a bool tensor of shape (B={B}, S={S}), got "
                f"{key_padding_mask.dtype} of shape {tuple(key_padding_mask.shape)}"
            )
        if key_padding_mask.device != q.device:
            raise RuntimeError(f"key_padding_mask is on {key_padding_mask.device} but q is on {q.device}")
    check_same("q", q, [("k", k), ("v", v), ("omega", omega)])
    return dispatch("rfa_attention", q, k, v, omega, causal, kernel, key_padding_mask, backend=backend)
