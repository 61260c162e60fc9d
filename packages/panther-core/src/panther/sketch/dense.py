"""Sketch operators stored as a dense ``(k, n)`` matrix and applied by matrix multiplication."""

from __future__ import annotations

from typing import ClassVar, Tuple

import torch

from panther.sketch.base import SketchOperator


class DenseSketch(SketchOperator):
    """Base of the operators held as a dense matrix :attr:`matrix` of shape ``(sketch_dim, input_dim)``.

    Applying costs one matmul, O(k n) per input vector.
    """

    _tensor_attrs: ClassVar[Tuple[str, ...]] = ("matrix",)
    matrix: torch.Tensor

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.matrix.mT  # (..., n) @ (n, k) -> (..., k)

    def to_dense(self) -> torch.Tensor:
        return self.matrix.clone()
