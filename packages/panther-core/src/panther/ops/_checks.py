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
    """Every other tensor shares ref's dtype and device."""
    for name, t in others:
        if t is None:
            continue
        if t.dtype != ref.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}; they must match")
        if t.device != ref.device:
            raise RuntimeError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; they must be on one device")


def check_shape(name: str, t: torch.Tensor, expected: Sequence[int]) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(t.shape)}")
