"""Argument checks for sketch operators: each error names the argument, its value and what was expected."""

from __future__ import annotations

import sys

import torch

from panther._args import check_int


def check_floating_dtype(name: str, dtype) -> torch.dtype:
    """Return ``dtype`` if it is a real floating-point ``torch.dtype``, else raise naming ``name``."""
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"{name} must be a torch.dtype, got {dtype!r} ({type(dtype).__name__})")
    if not dtype.is_floating_point:
        raise TypeError(
            f"{name} must be a floating-point dtype (e.g. torch.float32 or torch.float64), got {dtype}"
        )
    return dtype


def check_input(x, dim, input_dim: int, dtype: torch.dtype, device: torch.device) -> int:
    """Check a tensor that a ``(k, input_dim)`` operator is applied to along ``dim``.

    Returns ``dim`` normalised to ``0 <= dim < x.dim()``.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() == 0:
        raise ValueError("x must have at least 1 dimension, got a 0-dimensional tensor")
    dim = check_int("dim", dim, minimum=-sys.maxsize)  # the range is checked against x below
    ndim = x.dim()
    if not -ndim <= dim < ndim:
        raise IndexError(
            f"dim={dim} is out of range for x with {ndim} dimension(s) (expected {-ndim} <= dim < {ndim})"
        )
    dim %= ndim
    if x.shape[dim] != input_dim:
        raise ValueError(
            f"x must have size input_dim={input_dim} along dim={dim}, got x.shape[{dim}]={x.shape[dim]} "
            f"(x.shape={tuple(x.shape)})"
        )
    if x.dtype != dtype:
        raise TypeError(
            f"x has dtype {x.dtype} but the sketch operator has dtype {dtype}; they must match "
            f"(convert the operator with op.to(dtype={x.dtype}))"
        )
    if x.device != device:
        raise RuntimeError(
            f"x is on {x.device} but the sketch operator is on {device}; they must be on one device "
            f"(move the operator with op.to(device=x.device))"
        )
    return dim
