r"""The fast Walsh–Hadamard transform and the Sylvester–Hadamard matrix.

:math:`H_{ij} = (-1)^{\mathrm{popcount}(i \,\&\, j)}` for :math:`0 \le i, j < 2^m` (Sylvester, natural
order); :math:`H/\sqrt{2^m}` is orthogonal and symmetric.
"""

from __future__ import annotations

import math
import operator

import torch

from panther._args import check_fits
from panther.sketch._checks import check_floating_dtype


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def next_power_of_two(n: int) -> int:
    """The smallest power of two ``>= n`` (``n >= 1``)."""
    return 1 << (n - 1).bit_length()


def _fwht_last(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised transform along the last axis, whose size is a power of two: ``(..., n) -> (..., n)``."""
    n = x.shape[-1]
    batch = x.numel() // n if n else 0
    y = x.reshape(batch, n)
    h = 1
    while h < n:
        # Butterfly on pairs (i, i + h) inside blocks of 2h: view as (batch, blocks, 2, h).
        pairs = y.view(batch, n // (2 * h), 2, h)
        a, b = pairs.unbind(dim=2)
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return y.reshape(x.shape)


def fwht(x: torch.Tensor, dim: int = -1, normalized: bool = False) -> torch.Tensor:
    r"""Fast Walsh–Hadamard transform of ``x`` along ``dim``: :math:`y = H x` in O(n log n).

    :math:`H` is the :math:`n \times n` Sylvester–Hadamard matrix (see :func:`hadamard_matrix`); with
    ``normalized=True`` the result is :math:`H x / \sqrt{n}`, an orthogonal transform that is its own
    inverse. Pure PyTorch (``log2(n)`` vectorised butterfly passes), differentiable.

    Args:
        x (Tensor): floating-point tensor whose size along ``dim`` is a power of two.
        dim (int): axis to transform. Default: ``-1``.
        normalized (bool): divide by :math:`\sqrt{n}`. Default: ``False``.

    Examples::

        >>> fwht(torch.tensor([1.0, 0.0, 0.0, 0.0]))
        tensor([1., 1., 1., 1.])
        >>> x = torch.randn(3, 8)
        >>> torch.allclose(fwht(fwht(x, normalized=True), normalized=True), x, atol=1e-6)
        True
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() == 0:
        raise ValueError("x must have at least 1 dimension, got a 0-dimensional tensor")
    dim = operator.index(dim)
    if not -x.dim() <= dim < x.dim():
        raise IndexError(
            f"dim={dim} is out of range for x with {x.dim()} dimension(s) "
            f"(expected {-x.dim()} <= dim < {x.dim()})"
        )
    n = x.shape[dim]
    if not _is_power_of_two(n):
        raise ValueError(
            f"x must have a power-of-two size along dim={dim}, got x.shape[{dim}]={n} "
            f"(zero-pad to {next_power_of_two(max(n, 1))})"
        )
    y = torch.movedim(_fwht_last(torch.movedim(x, dim, -1)), -1, dim)
    return y * (1.0 / math.sqrt(n)) if normalized else y


def hadamard_entries(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    r"""Entries :math:`H_{ij} = (-1)^{\mathrm{popcount}(i \& j)}` for broadcast integer tensors ``rows``, ``cols``.

    Returns an int64 tensor of ``±1``; lets one form selected rows of :math:`H` without the full matrix.
    """
    v = torch.bitwise_and(rows, cols)
    for shift in (32, 16, 8, 4, 2, 1):  # parity of the set bits by xor-folding
        v = torch.bitwise_xor(v, torch.bitwise_right_shift(v, shift))
    return 1 - 2 * torch.bitwise_and(v, 1)


def hadamard_matrix(n: int, *, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    r"""The unnormalised :math:`n \times n` Sylvester–Hadamard matrix (``n`` a power of two).

    Args:
        n (int): size, a power of two.
        dtype (torch.dtype, optional): dtype of the result. Default: ``torch.float32``.
        device (torch.device, optional): device of the result. Default: CPU.

    Examples::

        >>> hadamard_matrix(2)
        tensor([[ 1.,  1.],
                [ 1., -1.]])
    """
    try:
        size = None if isinstance(n, bool) else operator.index(n)
    except TypeError:
        size = None
    if size is None or not _is_power_of_two(size):
        raise ValueError(f"n must be a power of two (1, 2, 4, ...), got {n!r}")
    dtype = check_floating_dtype("dtype", dtype)
    check_fits(f"hadamard_matrix(n={size})", [("the matrix", size * size * dtype.itemsize),
                                               ("its int64 entries", size * size * 8)], device)
    idx = torch.arange(size, device=device)
    return hadamard_entries(idx.unsqueeze(1), idx.unsqueeze(0)).to(dtype)
