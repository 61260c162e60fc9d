"""What every op does around its backend, whatever the backend: autocast and torch.func transforms.

- Autocast: the ops follow torch's policy for matmul-like ops (as :func:`torch.nn.functional.linear`
  does). Inside ``torch.autocast(device_type, dtype)`` for the inputs' device, every floating tensor
  argument but float64 ones is cast to the autocast dtype (the fixed sketches and random features
  alongside the input and the parameters), and the backend runs with autocast disabled, so it computes
  and returns that dtype. The casts are differentiable: gradients reach float32 parameters in float32.
- torch.func (grad, vmap, jvp, jacrev...): only the reference backend ``torch`` runs under these
  transforms. ``auto`` dispatch then takes it; a kernel backend asked for by name is refused with a
  :class:`panther.BackendError` that names it.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

from panther.backends import registry

_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu", "xla")


def autocast_dtype(x) -> Optional[torch.dtype]:
    """The autocast dtype in force for ``x``'s device, or ``None`` when autocast is off there."""
    if not isinstance(x, torch.Tensor):
        return None
    dev = x.device.type
    if dev not in _AUTOCAST_DEVICES or not torch.is_autocast_enabled(dev):
        return None
    return torch.get_autocast_dtype(dev)


def autocast_cast(dtype: Optional[torch.dtype], *tensors):
    """``tensors`` with the floating ones but float64 cast to ``dtype`` (autocast's eligibility rule)."""
    if dtype is None:
        return tensors
    return tuple(
        t.to(dtype)
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype not in (dtype, torch.float64)
        else t
        for t in tensors
    )


def no_autocast(x) -> contextlib.AbstractContextManager:
    """A context in which autocast is off for ``x``'s device (the op computes in its inputs' dtype)."""
    return torch.autocast(x.device.type, enabled=False)


def run(op: str, *args, backend: Optional[str] = None):
    """Run ``op`` on the backend selected for these arguments (the reference one under torch.func)."""
    if torch._C._are_functorch_transforms_active():
        name = backend if backend is not None else registry._selection()[0]
        if name not in (registry.AUTO, "torch"):
            raise registry.BackendError(
                f"Panther backend {name!r} cannot run {op} under torch.func transforms (grad, vmap, jvp, "
                f"jacrev, functional_call with these): only the reference backend does; pass backend='torch' "
                f"or run inside panther.use_backend('torch')"
            )
        backend = "torch"
    return registry.dispatch(op, *args, backend=backend)
