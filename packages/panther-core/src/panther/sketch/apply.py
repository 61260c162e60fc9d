"""Functional form of :meth:`SketchOperator.apply`."""

from __future__ import annotations

import torch

from panther.sketch.base import SketchOperator


def apply_sketch(op: SketchOperator, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    r"""Apply the sketch operator ``op`` (:math:`k \times n`) along axis ``dim`` of ``x``.

    Same as ``op.apply(x, dim)``. The result has size :math:`k` along ``dim`` and the sizes of ``x``
    elsewhere. The structure of ``op`` is used and no dense matrix is formed: SRHT runs a fast
    Walsh–Hadamard transform (O(n log n)), SJLT and CountSketch scatter with ``index_add`` (O(ns)),
    Gaussian and Rademacher multiply by their stored matrix (O(kn)). Differentiable with respect to ``x``.

    Args:
        op (SketchOperator): the operator.
        x (Tensor): floating-point tensor with ``x.shape[dim] == op.input_dim``, on ``op.device``, of
            dtype ``op.dtype``.
        dim (int): axis of ``x`` to sketch. Default: ``-1``.

    Returns:
        Tensor: ``x`` sketched along ``dim``.

    Examples::

        >>> from panther.sketch import SRHTSketch, apply_sketch
        >>> S = SRHTSketch(16, 100, seed=0)
        >>> x = torch.randn(8, 100, 3)
        >>> apply_sketch(S, x, dim=1).shape
        torch.Size([8, 16, 3])
    """
    if not isinstance(op, SketchOperator):
        raise TypeError(f"op must be a SketchOperator (e.g. from make_sketch), got {type(op).__name__}")
    return op.apply(x, dim=dim)
