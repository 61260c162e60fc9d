"""The ``cuda`` backend object that the ``panther.backends`` entry point names.

Importing this module is cheap (no CuPy, no kernels, no CUDA initialisation): CuPy is imported by the
first availability check, the kernels compile on the first op call.
"""

from __future__ import annotations

from typing import List, Optional

import torch

from panther.backends.base import Backend
from panther.backends.toolkit import Requirements
from panther_cuda import __version__


def _sketched_linear_limits(*args, **kwargs) -> List[str]:
    from panther_cuda.ops.sketched_linear.limits import reasons

    return reasons(*args, **kwargs)


def _sketched_conv2d_limits(*args, **kwargs) -> List[str]:
    from panther_cuda.ops.sketched_conv2d.limits import reasons

    return reasons(*args, **kwargs)


REQUIREMENTS = Requirements(
    backend="cuda",
    dtypes=(torch.float32, torch.float16, torch.bfloat16),
    min_capability=(8, 0),
    dtype_advice={torch.float64: "the kernels run on tensor cores; use backend 'torch' for float64"},
    op_reasons={"sketched_linear": _sketched_linear_limits, "sketched_conv2d": _sketched_conv2d_limits},
)


def _torch_cuda_major() -> Optional[int]:
    return int(torch.version.cuda.split(".")[0]) if torch.version.cuda else None


def install_hint() -> str:
    """The install command matching torch's CUDA major version."""
    major = _torch_cuda_major()
    extra = f"cuda{major}" if major in (12, 13) else "cuda12|cuda13"
    return f'pip install "panther-randnla-cuda[{extra}]" (the CuPy wheel for the CUDA major version of torch)'


_UNCHECKED = "unchecked"
_cupy_error: Optional[str] = _UNCHECKED  # cached in a global: torch.compile traces this check
# auto_priority's bid for every accepted input: below the torch backend's (0)
FIXED_BID = -20
_priority: Optional[int] = None


def _cupy_reason() -> Optional[str]:
    """Why CuPy cannot serve the kernels (not importable, or built for another CUDA major version than
    torch's), or None."""
    global _cupy_error
    if _cupy_error is not _UNCHECKED:
        return _cupy_error
    try:
        import cupy
    except Exception as exc:  # any failure to import is a reason, never a crash
        _cupy_error = f"CuPy cannot be imported ({type(exc).__name__}: {exc}); install it with {install_hint()}"
        return _cupy_error
    torch_major = _torch_cuda_major()
    try:
        cupy_major = cupy.cuda.runtime.runtimeGetVersion() // 1000
    except Exception as exc:
        _cupy_error = f"CuPy cannot load the CUDA runtime ({type(exc).__name__}: {exc}); install it with {install_hint()}"
        return _cupy_error
    if torch_major is not None and cupy_major != torch_major:
        _cupy_error = (
            f"CuPy {cupy.__version__} is built for CUDA {cupy_major} but torch {torch.__version__} for CUDA "
            f"{torch.version.cuda}; replace it: pip uninstall cupy-cuda{cupy_major}x && {install_hint()}"
        )
        return _cupy_error
    _cupy_error = None
    return None


class CudaBackend(Backend):
    """Sketched ops as hand-written CUDA kernels (CuPy/NVRTC) on GPUs of compute capability >= 8.0.

    Device, dtype and capability reasons come from :data:`REQUIREMENTS`; per-op limits from each op's
    ``limits.py``. Unavailable, with the reason and the install command, when CuPy is missing or built
    for another CUDA major version than torch, when there is no CUDA GPU, or below compute capability 8.0.
    """

    name = "cuda"
    version = __version__

    @property
    def priority(self) -> int:
        global _priority
        if _priority is None:  # auto dispatch asks on every call: CUDA's presence is read once
            _priority = 5 if torch.cuda.is_available() else -10
        return _priority

    def unavailable_reason(self) -> Optional[str]:
        # every reason that applies (no GPU and no CuPy: both), so one fix does not reveal the next
        reasons = [r for r in (REQUIREMENTS.unavailable_reason(), _cupy_reason()) if r]
        return "; ".join(reasons) if reasons else None

    def reasons_cannot_run(self, op: str, *args, **kwargs) -> List[str]:
        return super().reasons_cannot_run(op) or REQUIREMENTS.reasons(op, *args, **kwargs)

    def auto_priority(self, op: str, *args, **kwargs) -> Optional[int]:
        """:data:`FIXED_BID`, below ``torch``'s: measured ``auto`` times these kernels against the other
        backends' and runs them where they are the fastest (the spec's conv forward in CUDA-graph time, in the
        recorded runs); the fixed bids, used where auto does not measure, never pick them, since at most
        recorded shapes another backend was faster (benchmarks/results/NOTES.md)."""
        return FIXED_BID

    def sketched_linear(self, x, S1s, S2s, U1s, U2s, bias=None):
        """y = 1/(2L) Σ_i [(x S1_i) U1_i + (x U2_i) S2_i] + b; see :func:`panther_cuda.sketched_linear`."""
        from panther_cuda.ops.sketched_linear.op import sketched_linear

        return sketched_linear(x, S1s, S2s, U1s, U2s, bias)

    def sketched_conv2d(self, x, S1s, U1s, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1)):
        """y = 1/(2L) Σ_i U1_iᵀ conv(x, S1_i) + b; see :func:`panther_cuda.sketched_conv2d`."""
        from panther_cuda.ops.sketched_conv2d.op import sketched_conv2d

        return sketched_conv2d(x, S1s, U1s, bias, stride, padding, dilation)


__all__ = ["CudaBackend", "REQUIREMENTS", "install_hint"]
