"""The ``triton`` backend object that the ``panther.backends`` entry point names.

Importing this module is cheap (no triton, no kernels, no CUDA initialisation): triton is imported
by the first availability check, the kernels by the first op call.
"""

from __future__ import annotations

from typing import List, Optional

import torch

from panther.backends.base import Backend
from panther_triton import __version__
from panther_triton._runtime import WIDEST_CHUNK, cuda_capabilities, interpreting

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INTERPRETER_HINT = "set TRITON_INTERPRET=1 to run the kernels in Triton's CPU interpreter (slow; for tests)"


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
    keeps CPU tensors on ``torch`` even under the interpreter
    (which is for explicit selection and tests).
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
        if interpreting():
            return None
        caps = cuda_capabilities()
        if not caps:
            return (
                "no CUDA GPU is visible (torch.cuda.is_available() is False); run on a CUDA GPU of compute "
                f"capability >= 8.0 with a CUDA build of torch, or {_INTERPRETER_HINT}"
            )
        if max(caps) < (8, 0):
            found = ", ".join(f"{a}.{b}" for a, b in caps)
            return (
                f"the visible CUDA GPUs have compute capability {found}; the kernels need >= 8.0 (Ampere or "
                f"newer: bfloat16 tensor cores); use a newer GPU or backend 'torch'"
            )
        return None

    def reasons_cannot_run(self, op: str, *args, **kwargs) -> List[str]:
        reasons = super().reasons_cannot_run(op)
        if reasons:
            return reasons
        kinds = {(t.device, t.dtype) for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)}
        devices = {d for d, _ in kinds}
        dtypes = {dt for _, dt in kinds}
        interp = interpreting()
        for dev in devices:
            if interp and dev.type != "cpu":
                reasons.append(
                    f"TRITON_INTERPRET=1 runs the kernels on CPU tensors only, got a tensor on {dev} "
                    "(unset TRITON_INTERPRET to run on the GPU)"
                )
            elif not interp and dev.type != "cuda":
                reasons.append(
                    f"tensors on {dev} are not supported: the triton backend runs on CUDA tensors "
                    f"(move them with .cuda(), use backend 'torch', or {_INTERPRETER_HINT})"
                )
            elif not interp:
                cap = cuda_capabilities()[dev.index if dev.index is not None else torch.cuda.current_device()]
                if cap < (8, 0):
                    reasons.append(f"{dev} has compute capability {cap[0]}.{cap[1]}; the kernels need >= 8.0")
        for dt in dtypes:
            if dt == torch.float64:
                reasons.append(
                    "dtype float64 is not supported (the kernels run on tensor cores: float32 with or without "
                    "TF32, float16, bfloat16); use backend 'torch' for float64"
                )
            elif dt not in _DTYPES:
                reasons.append(f"dtype {dt} is not supported (supported: float32, float16, bfloat16)")
        if len(dtypes) > 1:
            reasons.append("the tensors must share one dtype, got " + ", ".join(sorted(map(str, dtypes))))
        if len(devices) > 1:
            reasons.append("the tensors must be on one device, got " + ", ".join(sorted(map(str, devices))))
        if op == "sketched_linear":
            for name, w in zip(("S1s", "S2s"), args[1:3]):
                if isinstance(w, torch.Tensor) and 0 in w.shape:
                    reasons.append(f"{name} of shape {tuple(w.shape)} has an empty dimension (L, k and features >= 1)")
            for w in args[1:5]:
                if isinstance(w, torch.Tensor) and w.numel() >= 2**31:
                    reasons.append("weights of 2**31 or more elements are not supported (32-bit weight offsets)")
                    break
        return sorted(set(reasons)) if reasons else reasons

    def auto_priority(self, op: str, *args, **kwargs) -> int:
        """Below ``torch`` where these kernels measured slower than the torch backend on the H200
        (benchmarks/results/2026-11-29_nvidia-h200_fdab836.json and 2026-11-29_nvidia-h200_4eb5fa2_wide-rank.json,
        CUDA-graph times):

        * float32, with or without TF32: cuBLAS's GEMMs win (4096 rows, 4096 features: TF32 0.24 ms on
          torch against 0.41 ms here, float32 0.59 against 1.75 ms; fdab836);
        * 2·num_terms·low_rank > 256, past the fused kernel (L=8, k=64, 4096 rows: 0.12 ms on torch
          against 0.23 ms here at 1024 features, 0.17 against 0.42 ms at 2048; 4eb5fa2).

        Elsewhere (16-bit, 2Lk <= 256) the kernels were faster for forward+backward at every measured
        shape, eager and captured, and keep their priority. Forward alone is not decided by the inputs: at
        4096 rows cuBLAS beat the fused forward on GPU time from 2048 features up (0.025 against 0.040 ms
        at 2048), while in eager calls (host-bound) the fused launch was faster at all 8 headline shapes
        (fdab836). ``backend="triton"`` runs any accepted input here regardless."""
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


__all__ = ["TritonBackend"]
