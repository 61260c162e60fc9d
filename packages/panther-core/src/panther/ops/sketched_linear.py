"""The sketched linear op: checks the arguments, then runs on the backend the registry selects.

    y = 1/(2L) Σ_{i<L} [ (x S1_i) U1_i + (x U2_i) S2_i ] + b
with S1s, U2s of shape (L, I, k), S2s, U1s of shape (L, k, O), x of shape (..., I). Reference:
:mod:`panther.backends.torch_backend.sketched_linear`.
"""

from __future__ import annotations

from typing import Optional

import torch

from panther.ops._policy import autocast_cast, autocast_dtype, no_autocast, run
from panther.ops._checks import check_floating, check_nonempty, check_same, check_shape, check_tensor


def sketched_linear(
    x: torch.Tensor,
    S1s: torch.Tensor,
    S2s: torch.Tensor,
    U1s: torch.Tensor,
    U2s: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Sketched linear map of ``x`` (..., in_features) -> (..., out_features).

    Args:
        x: input of shape ``(..., I)``.
        S1s, U2s: ``(L, I, k)``. S2s, U1s: ``(L, k, O)``. bias: ``(O,)`` or ``None``.
        backend: run on this backend instead of the selection in force (a name, or ``"auto"``).

    Inside :func:`torch.autocast` for ``x``'s device it computes and returns the autocast dtype, as
    :func:`torch.nn.functional.linear` does, the sketches cast alongside. Differentiable in every tensor
    argument; torch.func transforms (grad, vmap, jvp) run it on the reference backend. On the reference
    backend ``torch`` second-order gradients (``create_graph=True``: gradient penalties, Jacobian
    regularisation) are exact; the first-order backward keeps its fast path either way.

    Raises:
        TypeError: a non-tensor argument, a non-floating ``x``, mismatching dtypes, a non-str ``backend``.
        ValueError: wrong shapes, a size of zero (``L`` or ``I``), an empty ``backend``.
        RuntimeError: tensors on different devices.
        panther.BackendError: the backend asked for cannot run these inputs.
    """
    amp = autocast_dtype(x)
    if amp is not None:  # torch's autocast policy for matmul-like ops: compute in the autocast dtype
        x, S1s, S2s, U1s, U2s, bias = autocast_cast(amp, x, S1s, S2s, U1s, U2s, bias)
        with no_autocast(x):
            return sketched_linear(x, S1s, S2s, U1s, U2s, bias, backend=backend)
    if not _well_formed(x, S1s, S2s, U1s, U2s, bias):  # the checks below say what is wrong
        _check(x, S1s, S2s, U1s, U2s, bias)
    return run("sketched_linear", x, S1s, S2s, U1s, U2s, bias, backend=backend)


def _well_formed(x, S1s, S2s, U1s, U2s, bias) -> bool:
    """All that :func:`_check` checks, in one cheap expression (the common case: it holds)."""
    T = torch.Tensor
    if not (isinstance(x, T) and isinstance(S1s, T) and isinstance(S2s, T) and isinstance(U1s, T)
            and isinstance(U2s, T) and (bias is None or isinstance(bias, T))):
        return False
    if S1s.dim() != 3 or S2s.dim() != 3 or x.dim() < 1:
        return False
    L, I, k = S1s.shape
    O = S2s.shape[2]
    dt, dev = x.dtype, x.device
    return (
        L > 0 and I > 0
        and S2s.shape[:2] == (L, k) and U1s.shape == (L, k, O) and U2s.shape == (L, I, k) and x.shape[-1] == I
        and (bias is None or (bias.shape == (O,) and bias.dtype == dt and bias.device == dev))
        and x.is_floating_point()
        and S1s.dtype == dt and S2s.dtype == dt and U1s.dtype == dt and U2s.dtype == dt
        and S1s.device == dev and S2s.device == dev and U1s.device == dev and U2s.device == dev
    )


def _check(x, S1s, S2s, U1s, U2s, bias) -> None:
    check_tensor("S1s", S1s, ndim=3)
    check_nonempty("S1s", S1s, ("num_terms L", "in_features I"))
    L, I, k = S1s.shape
    check_tensor("S2s", S2s, ndim=3)
    O = S2s.shape[-1]
    check_shape("S2s", S2s, (L, k, O))
    check_tensor("U1s", U1s)
    check_shape("U1s", U1s, (L, k, O))
    check_tensor("U2s", U2s)
    check_shape("U2s", U2s, (L, I, k))
    check_tensor("x", x, min_ndim=1)
    if x.shape[-1] != I:
        raise ValueError(
            f"x (the input) must have in_features={I} (S1s.shape[1]) as its last dimension, got shape {tuple(x.shape)}"
        )
    check_floating("x", x)
    if bias is not None:
        check_tensor("bias", bias)
        check_shape("bias", bias, (O,))
    check_same("x", x, [("S1s", S1s), ("S2s", S2s), ("U1s", U1s), ("U2s", U2s), ("bias", bias)])
