"""The interface every Panther backend implements.

A backend is a plain object with a ``name``, a ``priority`` (higher wins in ``auto`` dispatch), an
availability check that returns the reason it cannot run on this machine, a per-call check that lists
the reasons it cannot take given inputs, and the ops below. Math of the ops: see DESIGN.md and the
reference implementations in :mod:`panther.backends.torch_backend`.
"""

from __future__ import annotations

from typing import List, Optional

import torch

# The ops a backend may implement, with their positional signatures.
#   sketched_linear(x, S1s, S2s, U1s, U2s, bias)                   x: (..., I)        -> (..., O)
#   sketched_conv2d(x, S1s, U1s, bias, stride, padding, dilation)   x: (N, C, H, W)    -> (N, O, H', W')
#   rfa_attention(q, k, v, omega, causal, kernel, key_padding_mask) q: (B, H, T, D)    -> (B, H, T, Dv)
OPS = ("sketched_linear", "sketched_conv2d", "rfa_attention")


class Backend:
    """Base class of Panther backends.

    Subclasses set :attr:`name`, :attr:`priority` and :attr:`version`, override
    :meth:`unavailable_reason` and :meth:`reasons_cannot_run`, and implement any of :data:`OPS`.
    Constructing a backend must be cheap: compile kernels on first use.
    """

    name: str = ""
    priority: int = 0
    version: str = "0"

    def unavailable_reason(self) -> Optional[str]:
        """``None`` when the backend can run on this machine, else why not and how to fix it."""
        return None

    def implements(self, op: str) -> bool:
        return callable(getattr(self, op, None))

    def reasons_cannot_run(self, op: str, *args, **kwargs) -> List[str]:
        """Reasons this backend cannot run ``op`` on these inputs (empty list: it can).

        The answer must follow from each tensor's shape, dtype, device and ``requires_grad`` and from the
        other arguments (and from the machine): ``auto`` dispatch remembers a backend it chose for calls
        of that exact signature and does not ask again.
        """
        if not self.implements(op):
            return [f"{self.name} does not implement {op}"]
        return []

    def auto_priority(self, op: str, *args, **kwargs) -> Optional[int]:
        """Priority in ``auto`` dispatch for these inputs, which it can run; at most :attr:`priority`.

        Lower it for inputs the backend runs correctly but slower than another backend would (an
        explicit selection still runs them here). ``None`` keeps the inputs out of ``auto`` altogether,
        measured or not (for kernels not yet validated where auto would send them); an explicit selection
        still runs them. Called only after :meth:`reasons_cannot_run` found none.
        """
        return self.priority

    def __repr__(self) -> str:
        return f"<panther backend {self.name!r} v{self.version} priority={self.priority}>"


def tensor_reasons(
    *tensors: Optional[torch.Tensor],
    devices=("cpu", "cuda"),
    dtypes=(torch.float64, torch.float32, torch.bfloat16, torch.float16),
) -> List[str]:
    """Common device/dtype capability reasons for the tensors of one call (``None`` entries skipped)."""
    kinds = {(t.device.type, t.dtype) for t in tensors if isinstance(t, torch.Tensor)}
    reasons = set()
    for device_type, dtype in kinds:
        if device_type not in devices:
            reasons.add(f"device {device_type} is not supported (supported: {', '.join(devices)})")
        if (dtype.is_floating_point or dtype.is_complex) and dtype not in dtypes:  # masks are bool/int
            names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            reasons.add(f"dtype {dtype} is not supported (supported: {names})")
    return sorted(reasons)
