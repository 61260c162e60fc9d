"""The sketched conv2d op: checks the arguments, resolves padding, then dispatches.

    y = 1/(2L) Σ_{i<2L} U1_iᵀ conv(x, S1_i) + b
with S1s of shape (2L, k, C, kh, kw), U1s of shape (2L, k, O), x of shape (N, C, H, W) or (C, H, W).
Reference: :mod:`panther.backends.torch_backend.sketched_conv2d`.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

from panther._args import check_int_pair
from panther.ops._policy import autocast_cast, autocast_dtype, no_autocast, run
from panther.ops._checks import check_floating, check_nonempty, check_same, check_shape, check_tensor

IntPair = Union[int, Tuple[int, int]]


def pair(name: str, value: IntPair, minimum: int) -> Tuple[int, int]:
    """An int or a pair of ints (numpy integers too; not bools), each at least ``minimum``, as a pair."""
    return check_int_pair(name, value, minimum)


def resolve_padding(padding, kernel_size: Tuple[int, int], stride: Tuple[int, int], dilation: Tuple[int, int]):
    """nn.Conv2d's padding rules: int, pair, 'valid' or 'same' (stride 1 only).

    Returns ``(symmetric_padding, extra)`` where ``extra`` is F.pad's (left, right, top, bottom) for the
    uneven part of 'same' padding with even kernels, or ``None``.
    """
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0), None
        if padding == "same":
            if stride != (1, 1):
                raise ValueError(f"padding='same' is not supported for strided convolutions, got stride={stride}")
            sym, extra, uneven = [], [0, 0, 0, 0], False
            for axis in (0, 1):
                total = dilation[axis] * (kernel_size[axis] - 1)
                left = total // 2
                sym.append(left)
                if total - left != left:
                    uneven = True
                    extra[2 * (1 - axis) + 1] = total - 2 * left  # F.pad order: (w_left, w_right, h_top, h_bottom)
            return tuple(sym), (tuple(extra) if uneven else None)
        raise ValueError(f"padding must be 'valid', 'same', an int or a pair of ints, got {padding!r}")
    return pair("padding", padding, 0), None


def sketched_conv2d(
    x: torch.Tensor,
    S1s: torch.Tensor,
    U1s: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    stride: IntPair = 1,
    padding: Union[str, IntPair] = 0,
    dilation: IntPair = 1,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Sketched 2-D convolution of ``x`` (N, C, H, W) or (C, H, W) -> (N, O, H', W') or (O, H', W').

    Args:
        S1s: ``(2L, k, C, kh, kw)`` sketched filters. U1s: ``(2L, k, O)`` fixed projection.
        bias: ``(O,)`` or ``None``. stride, padding, dilation: as in :func:`torch.nn.functional.conv2d`.
        backend: run on this backend instead of the selection in force (a name, or ``"auto"``).

    Inside :func:`torch.autocast` for ``x``'s device it computes and returns the autocast dtype, as
    :func:`torch.nn.functional.conv2d` does; a channels_last input gives a channels_last output.
    Differentiable in every tensor argument; torch.func transforms (grad, vmap, jvp) run it on the
    reference backend. On the reference backend ``torch`` second-order gradients (``create_graph=True``)
    are exact; the first-order backward keeps its fast path either way.

    Raises:
        TypeError: a non-tensor argument, a non-floating ``x``, mismatching dtypes, a non-str ``backend``.
        ValueError: wrong shapes, a size of zero (terms, rank, channels or kernel), an input smaller than the
            dilated kernel, bad ``stride`` / ``padding`` / ``dilation``, an empty ``backend``.
        RuntimeError: tensors on different devices.
        panther.BackendError: the backend asked for cannot run these inputs.
    """
    amp = autocast_dtype(x)
    if amp is not None:  # torch's autocast policy for convolutions: compute in the autocast dtype
        x, S1s, U1s, bias = autocast_cast(amp, x, S1s, U1s, bias)
        with no_autocast(x):
            return sketched_conv2d(x, S1s, U1s, bias, stride, padding, dilation, backend=backend)
    check_tensor("S1s", S1s, ndim=5)
    check_nonempty(
        "S1s", S1s, ("the number of terms 2L", "low_rank k", "in_channels C", "kernel height kh", "kernel width kw")
    )
    terms, k, C, kh, kw = S1s.shape
    check_tensor("U1s", U1s, ndim=3)
    O = U1s.shape[-1]
    check_shape("U1s", U1s, (terms, k, O))
    check_nonempty("U1s", U1s, ("", "", "out_channels O"))
    check_tensor("x", x)
    if x.dim() not in (3, 4):
        raise ValueError(f"x (the input) must be (N, C, H, W) or (C, H, W), got shape {tuple(x.shape)}")
    if x.shape[-3] != C:
        raise ValueError(
            f"x (the input) must have in_channels={C} (S1s.shape[2]) channels at dim -3, got shape {tuple(x.shape)}"
        )
    check_floating("x", x)
    if bias is not None:
        check_tensor("bias", bias)
        check_shape("bias", bias, (O,))
    check_same("x", x, [("S1s", S1s), ("U1s", U1s), ("bias", bias)])
    stride = pair("stride", stride, 1)
    dilation = pair("dilation", dilation, 1)
    sym, extra = resolve_padding(padding, (kh, kw), stride, dilation)
    for axis in (0, 1):
        uneven = 0 if extra is None else extra[3 - 2 * axis] + extra[2 - 2 * axis]
        size = x.shape[axis - 2] + 2 * sym[axis] + uneven
        span = dilation[axis] * ((kh, kw)[axis] - 1) + 1
        if size < span:
            raise ValueError(
                f"x of shape {tuple(x.shape)} is smaller than the dilated kernel: {size} after padding along "
                f"dimension {axis - 2}, but the kernel spans {span}"
            )
    unbatched = x.dim() == 3
    if unbatched:
        x = x.unsqueeze(0)
    if extra is not None:
        x = F.pad(x, extra)
    y = run("sketched_conv2d", x, S1s, U1s, bias, stride, sym, dilation, backend=backend)
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        y = y.contiguous(memory_format=torch.channels_last)  # nn.Conv2d keeps channels_last inputs so
    return y.squeeze(0) if unbatched else y
