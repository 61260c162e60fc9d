r"""Sparse sign sketches: SJLT (:math:`s` entries :math:`\pm 1/\sqrt{s}` per column at distinct random rows) and CountSketch (:math:`s = 1`)."""

from __future__ import annotations

import math
from typing import ClassVar, List, Optional, Tuple

import torch

from panther._args import check_int
from panther.sketch._random import random_signs, sample_distinct_rows
from panther.sketch.base import DeviceLike, SketchOperator


class SparseSignSketch(SketchOperator):
    r"""Base of the sparse sign sketches: column :math:`j` has ``nnz_per_column`` nonzeros.

    The nonzeros of column :math:`j` sit at rows ``rows[j]`` (distinct) with values ``values[j]``.
    :meth:`apply` scatters the scaled input into the output with ``index_add``: O(n s) per vector, no
    dense matrix.

    Attributes:
        nnz_per_column (int): :math:`s`.
        rows (Tensor): int64, shape ``(input_dim, nnz_per_column)``.
        values (Tensor): shape ``(input_dim, nnz_per_column)``, entries :math:`\pm 1/\sqrt{s}`.
    """

    _tensor_attrs: ClassVar[Tuple[str, ...]] = ("values", "rows")
    _axis: ClassVar[int] = 0  # scatter whole rows (n, M) -> (k, M)
    nnz_per_column: int
    rows: torch.Tensor
    values: torch.Tensor

    def _memory_needs(self) -> List[Tuple[str, int]]:
        numel = self.input_dim * self.nnz_per_column
        return [("rows", numel * 8), ("values", numel * self.dtype.itemsize), ("the int64 random signs", numel * 8)]

    def _draw(self, generator: torch.Generator) -> None:
        n, s = self.input_dim, self.nnz_per_column
        # Draw order (part of the seed contract): rows, then signs.
        self.rows = sample_distinct_rows(n, self.sketch_dim, s, generator)
        signs = random_signs(n * s, generator).view(n, s)
        self.values = signs.to(self.dtype) * (1.0 / math.sqrt(s))

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        n, k = self.input_dim, self.sketch_dim
        rest = x.shape[1:]
        cols = x.reshape(n, x.numel() // n)  # (n, M): row j holds every x[..., j, ...]
        out = cols.new_zeros(k, cols.shape[1])
        for t in range(self.nnz_per_column):
            # out[rows[j, t], :] += values[j, t] * cols[j, :]
            out.index_add_(0, self.rows[:, t], cols * self.values[:, t].unsqueeze(1))
        return out.view(k, *rest)

    def to_dense(self) -> torch.Tensor:
        dense = torch.zeros(self.sketch_dim, self.input_dim, dtype=self.dtype, device=self.rows.device)
        cols = torch.arange(self.input_dim, device=self.rows.device).unsqueeze(1).expand_as(self.rows)
        dense[self.rows, cols] = self.values  # rows of one column are distinct: plain assignment
        return dense

    def extra_repr(self) -> str:
        return f"nnz_per_column={self.nnz_per_column}"


class SJLTSketch(SparseSignSketch):
    r"""Sparse Johnson–Lindenstrauss transform (sparse sign sketch).

    Each column of :math:`S \in \mathbb{R}^{k \times n}` has exactly :math:`s` = ``nnz_per_column``
    nonzeros, at rows drawn uniformly without replacement, equal to :math:`\pm 1/\sqrt{s}` with
    independent fair signs; columns are independent. Hence :math:`\mathbb{E}[S^\top S] = I_n` (the
    diagonal is exactly 1). Applying costs O(ns) per vector.

    Args:
        sketch_dim (int): :math:`k`, number of rows (output size).
        input_dim (int): :math:`n`, number of columns (input size).
        nnz_per_column (int, optional): :math:`s`, with ``1 <= s <= sketch_dim``.
            Default: ``min(8, sketch_dim)``.
        seed (int, optional): seed for a fresh CPU generator. Mutually exclusive with ``generator``.
        generator (torch.Generator, optional): generator to draw from. With neither ``seed`` nor
            ``generator``, a fresh nondeterministic seed is used (see :attr:`seed`).
        device (torch.device, optional): device of the operator. Default: CPU.
        dtype (torch.dtype, optional): floating-point dtype. Default: ``torch.float32``.

    Examples::

        >>> S = SJLTSketch(16, 100, nnz_per_column=4, seed=0)
        >>> (S.to_dense() != 0).sum(dim=0).unique()
        tensor([4])
        >>> S.apply(torch.randn(2, 100, 3), dim=1).shape
        torch.Size([2, 16, 3])
    """

    kind = "sjlt"

    def __init__(
        self,
        sketch_dim: int,
        input_dim: int,
        *,
        nnz_per_column: Optional[int] = None,
        seed: Optional[int] = None,
        generator: Optional[torch.Generator] = None,
        device: DeviceLike = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        k = check_int("sketch_dim", sketch_dim)
        if nnz_per_column is None:
            nnz_per_column = min(8, k)
        else:
            nnz_per_column = check_int("nnz_per_column", nnz_per_column)
            if nnz_per_column > k:
                raise ValueError(
                    f"nnz_per_column must be between 1 and sketch_dim={k} (nonzeros sit at distinct rows), "
                    f"got nnz_per_column={nnz_per_column}"
                )
        self.nnz_per_column = nnz_per_column
        super().__init__(sketch_dim, input_dim, seed=seed, generator=generator, device=device, dtype=dtype)


class CountSketch(SparseSignSketch):
    r"""CountSketch: each column of :math:`S` has one nonzero :math:`\pm 1` at a uniformly random row.

    :math:`S_{h(j), j} = \sigma_j` with :math:`h(j)` uniform on :math:`\{0, \dots, k-1\}` and fair signs
    :math:`\sigma_j`, all independent; :math:`\mathbb{E}[S^\top S] = I_n`. Equal in distribution to
    :class:`SJLTSketch` with ``nnz_per_column=1``. Applying costs O(n) per vector.

    Args:
        sketch_dim (int): :math:`k`, number of rows (buckets).
        input_dim (int): :math:`n`, number of columns (input size).
        seed (int, optional): seed for a fresh CPU generator. Mutually exclusive with ``generator``.
        generator (torch.Generator, optional): generator to draw from. With neither ``seed`` nor
            ``generator``, a fresh nondeterministic seed is used (see :attr:`seed`).
        device (torch.device, optional): device of the operator. Default: CPU.
        dtype (torch.dtype, optional): floating-point dtype. Default: ``torch.float32``.

    Examples::

        >>> S = CountSketch(4, 10, seed=0)
        >>> S.to_dense().abs().sum(dim=0)
        tensor([1., 1., 1., 1., 1., 1., 1., 1., 1., 1.])
    """

    kind = "countsketch"
    nnz_per_column = 1

    def extra_repr(self) -> str:
        return ""
