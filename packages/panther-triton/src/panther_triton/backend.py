"""The ``triton`` backend object that the ``panther.backends`` entry point names.

Importing this module is cheap (no triton, no kernels, no CUDA initialisation): triton is imported
by the first availability check, the kernels by the first op call.
"""

from __future__ import annotations

from typing import List, Optional

import torch

from panther.backends.base import Backend
from panther.backends.toolkit import Requirements
from panther_triton import __version__
from panther_triton._runtime import WIDEST_CHUNK, interpreting


def _sketched_linear_limits(x, S1s=None, S2s=None, U1s=None, U2s=None, *rest, **kwargs) -> List[str]:
    """What the sketched linear kernels cannot take beyond device and dtype: empty weights, 32-bit offsets."""
    reasons = []
    for name, w in (("S1s", S1s), ("S2s", S2s)):
        if isinstance(w, torch.Tensor) and 0 in w.shape:
            reasons.append(f"{name} of shape {tuple(w.shape)} has an empty dimension (L, k and features >= 1)")
    if any(isinstance(w, torch.Tensor) and w.numel() >= 2**31 for w in (S1s, S2s, U1s, U2s)):
        reasons.append("weights of 2**31 or more elements are not supported (32-bit weight offsets)")
    return reasons


def _rfa_attention_limits(q=None, k=None, v=None, omega=None, causal=False, kernel="softmax",
                          key_padding_mask=None, *rest, **kwargs) -> List[str]:
    """What the attention kernels cannot take beyond device and dtype: head dims past the one block of
    the head axis a program holds, more random features than its feature chunks cover."""
    from panther_triton.ops.rfa_attention.common import MAX_FEATURES, MAX_HEAD_DIM

    reasons = []
    for name, t in (("q", q), ("v", v)):
        if isinstance(t, torch.Tensor) and t.dim() == 4 and t.shape[-1] > MAX_HEAD_DIM:
            reasons.append(f"{name} has head dimension {t.shape[-1]}; the attention kernels take at most "
                           f"{MAX_HEAD_DIM} (split the embedding over more heads, or use backend 'torch')")
    if isinstance(omega, torch.Tensor) and omega.dim() in (2, 3) and omega.shape[-2] > MAX_FEATURES:
        reasons.append(f"omega has {omega.shape[-2]} random features; the attention kernels take at most "
                       f"{MAX_FEATURES} (a smaller sketch_dim, or backend 'torch')")
    return reasons


REQUIREMENTS = Requirements(
    backend="triton",
    dtypes=(torch.float32, torch.float16, torch.bfloat16),
    mask_dtypes=(torch.bool,),  # rfa_attention's key_padding_mask
    min_capability=(8, 0),
    interpreter=interpreting,
    interpreter_hint="set TRITON_INTERPRET=1 to run the kernels in Triton's CPU interpreter (slow; for tests)",
    dtype_advice={torch.float64: "the kernels run on tensor cores; use backend 'torch' for float64"},
    op_reasons={"sketched_linear": _sketched_linear_limits, "rfa_attention": _rfa_attention_limits},
)


_UNCHECKED = "unchecked"
_priority: Optional[int] = None
_triton_error: Optional[str] = _UNCHECKED  # cached in a global: torch.compile traces this check


def _triton_import_error() -> Optional[str]:
    global _triton_error
    if _triton_error is _UNCHECKED:
        try:
            import triton  # noqa: F401

            _triton_error = None
        except Exception as exc:  # any failure to import is a reason, never a crash
            _triton_error = f"{type(exc).__name__}: {exc}"
    return _triton_error


class TritonBackend(Backend):
    """Sketched ops as Triton kernels on CUDA GPUs of compute capability >= 8.0.

    Priority 10 where a CUDA device is present, so that ``auto`` prefers it to ``torch`` (0) for CUDA
    tensors (except where torch measured faster: :meth:`auto_priority`); -10 elsewhere, so that ``auto``
    keeps CPU tensors on ``torch`` even under the interpreter (which is for explicit selection and
    tests). Device, dtype and capability reasons come from :data:`REQUIREMENTS`.
    """

    name = "triton"
    version = __version__

    @property
    def priority(self) -> int:
        global _priority
        if _priority is None:  # auto dispatch asks on every call: CUDA's presence is read once
            _priority = 10 if torch.cuda.is_available() else -10
        return _priority

    def unavailable_reason(self) -> Optional[str]:
        err = _triton_import_error()
        if err is not None:
            return f"triton cannot be imported ({err}); install it with `pip install triton` (Linux, CUDA)"
        return REQUIREMENTS.unavailable_reason()

    def reasons_cannot_run(self, op: str, *args, **kwargs) -> List[str]:
        return super().reasons_cannot_run(op) or REQUIREMENTS.reasons(op, *args, **kwargs)

    def auto_priority(self, op: str, *args, **kwargs) -> Optional[int]:
        """Below ``torch`` (priority -10) for inputs where the torch backend measured faster on the H200 in
        CUDA-graph times (benchmarks/results/2026-11-29_nvidia-h200_fdab836.json and
        2026-11-29_nvidia-h200_4eb5fa2_wide-rank.json): float32, with or without TF32 (cuBLAS's GEMMs
        win), and 2·num_terms·low_rank > 256, past the fused kernel. Elsewhere (16-bit, 2Lk <= 256) the
        kernels were faster for forward+backward at every measured shape and keep :attr:`priority`.
        ``backend="triton"`` runs any accepted input here regardless. ``rfa_attention`` keeps
        :attr:`priority`: on a GPU the measured ``auto`` dispatch times it against ``torch`` per shape."""
        if op == "sketched_linear" and len(args) >= 2:
            x, S1s = args[0], args[1]
            if isinstance(x, torch.Tensor) and x.dtype == torch.float32:
                return -10
            if isinstance(S1s, torch.Tensor) and S1s.dim() == 3 and S1s.shape[0] * S1s.shape[2] > WIDEST_CHUNK:
                return -10  # 2 L k > 2 WIDEST_CHUNK: past the fused kernel
        return self.priority

    def sketched_linear(self, x, S1s, S2s, U1s, U2s, bias=None):
        """y = 1/(2L) Σ_i [(x S1_i) U1_i + (x U2_i) S2_i] + b; see :func:`panther_triton.sketched_linear`."""
        from panther_triton.ops.sketched_linear.op import sketched_linear

        return sketched_linear(x, S1s, S2s, U1s, U2s, bias)

    def rfa_attention(self, q, k, v, omega, causal=False, kernel="softmax", key_padding_mask=None):
        """Random-feature attention; see :func:`panther_triton.rfa_attention`."""
        from panther_triton.ops.rfa_attention.op import rfa_attention

        return rfa_attention(q, k, v, omega, causal, kernel, key_padding_mask)


__all__ = ["TritonBackend"]
