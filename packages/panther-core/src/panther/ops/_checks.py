"""Argument checks shared by the public ops: each error names the argument, its value and what was expected."""

from __future__ import annotations

from typing import Optional, Sequence

import torch


def check_tensor(name: str, t, ndim: Optional[int] = None, min_ndim: Optional[int] = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimension(s), got shape {tuple(t.shape)}")


def check_floating(name: str, t: torch.Tensor) -> None:
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def check_same(ref_name: str, ref: torch.Tensor, others: Sequence) -> None:
    """Every other tensor shares ref's dtype and device (``ref`` is the input, the others a layer's weights)."""
    for name, t in others:
        if t is None:
            continue
        if t.dtype != ref.dtype:
            raise TypeError(
                f"{ref_name} has dtype {ref.dtype} but {name} has dtype {t.dtype}; they must match (convert one: "
                f"{ref_name}.to({t.dtype}), or a layer's parameters with layer.to({ref.dtype}))"
            )
        if t.device != ref.device:
            raise RuntimeError(
                f"{ref_name} is on {ref.device} but {name} is on {t.device}; they must be on one device (move one: "
                f"{ref_name}.to({str(t.device)!r}), or a layer with layer.to({str(ref.device)!r}))"
            )


def check_nonempty(name: str, t: torch.Tensor, sizes: Sequence[str]) -> None:
    """``t.shape[d] >= 1`` for the sizes named in ``sizes`` (``sizes[d]`` names ``t.shape[d]``; ``""`` skips it)."""
    for d, size in enumerate(sizes):
        if size and t.shape[d] == 0:
            raise ValueError(f"{size} must be >= 1, got {name}.shape[{d}] = 0 ({name} of shape {tuple(t.shape)})")


def check_shape(name: str, t: torch.Tensor, expected: Sequence[int]) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(t.shape)}")
