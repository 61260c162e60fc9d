"""Sketch operators stored as a dense ``(k, n)`` matrix and applied by matrix multiplication."""

from __future__ import annotations

from typing import ClassVar, List, Tuple

import torch

from panther.sketch.base import SketchOperator


class DenseSketch(SketchOperator):
    """Base of the operators held as a dense matrix :attr:`matrix` of shape ``(sketch_dim, input_dim)``.

    Applying costs one matmul, O(k n) per input vector.
    """

    _tensor_attrs: ClassVar[Tuple[str, ...]] = ("matrix",)
    # What _draw draws the (k, n) entries as, before the cast to the operator's dtype.
    _draw_dtype: ClassVar[torch.dtype] = torch.float32
    matrix: torch.Tensor

    def _memory_needs(self) -> List[Tuple[str, int]]:
        numel = self.sketch_dim * self.input_dim
        draws = (f"the {self._draw_dtype} draws", numel * self._draw_dtype.itemsize)
        return [("matrix", numel * self.dtype.itemsize), draws]

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.matrix.mT  # (..., n) @ (n, k) -> (..., k)

    def to_dense(self) -> torch.Tensor:
        return self.matrix.clone()
