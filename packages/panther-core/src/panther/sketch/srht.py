r"""Subsampled randomized Hadamard transform: :math:`S = \sqrt{n'/k}\, P H D`, zero-padded to :math:`n' = 2^{\lceil \log_2 n \rceil}`."""

from __future__ import annotations

import math
from typing import ClassVar, List, Tuple

import torch
import torch.nn.functional as F

from panther.sketch._random import random_signs
from panther.sketch.base import SketchOperator
from panther.sketch.hadamard import _fwht_last, hadamard_entries, next_power_of_two


class SRHTSketch(SketchOperator):
    r"""Subsampled randomized Hadamard transform (SRHT).

    .. math::
        S x = \sqrt{n'/k}\; P\, \tfrac{1}{\sqrt{n'}} H\, D \begin{bmatrix} x \\ 0 \end{bmatrix},

    where :math:`n' \ge n` is the next power of two (``x`` is zero-padded to length :math:`n'`),
    :math:`D` is a diagonal of :math:`n'` independent fair signs, :math:`H` the :math:`n' \times n'`
    Sylvester–Hadamard matrix (:math:`H/\sqrt{n'}` orthogonal) and :math:`P` selects :math:`k` of its
    :math:`n'` rows uniformly without replacement (kept in increasing order). Hence
    :math:`\mathbb{E}[S^\top S] = I_n`, and the diagonal of :math:`S^\top S` is exactly 1. The operator
    is :math:`k \times n`: the columns of the padding are dropped.

    :meth:`apply` runs a fast Walsh–Hadamard transform: O(n' log n') per vector and no dense matrix.

    Args:
        sketch_dim (int): :math:`k`, number of rows (output size); ``1 <= sketch_dim <= n'``.
        input_dim (int): :math:`n`, number of columns (input size).
        seed (int, optional): seed for a fresh CPU generator. Mutually exclusive with ``generator``.
        generator (torch.Generator, optional): generator to draw from. With neither ``seed`` nor
            ``generator``, a fresh nondeterministic seed is used (see :attr:`seed`).
        device (torch.device, optional): device of the operator. Default: CPU.
        dtype (torch.dtype, optional): floating-point dtype. Default: ``torch.float32``.

    Attributes:
        padded_dim (int): :math:`n'`.
        signs (Tensor): the diagonal of :math:`D`, shape ``(padded_dim,)``.
        rows (Tensor): the sampled rows of :math:`H`, int64, shape ``(sketch_dim,)``.

    Examples::

        >>> S = SRHTSketch(8, 12, seed=0, dtype=torch.float64)   # padded to n' = 16
        >>> S.padded_dim
        16
        >>> x = torch.randn(5, 12, dtype=torch.float64)
        >>> torch.allclose(S.apply(x), x @ S.to_dense().T)
        True
    """

    kind = "srht"
    _tensor_attrs: ClassVar[Tuple[str, ...]] = ("signs", "rows")
    signs: torch.Tensor
    rows: torch.Tensor

    @property
    def padded_dim(self) -> int:
        return next_power_of_two(self.input_dim)

    def _check_dims(self) -> None:
        if self.sketch_dim > self.padded_dim:
            raise ValueError(
                f"sketch_dim must be <= {self.padded_dim} for SRHT with input_dim={self.input_dim}: it samples "
                f"rows of the {self.padded_dim}x{self.padded_dim} Hadamard matrix (next power of two >= "
                f"input_dim) without replacement; got sketch_dim={self.sketch_dim}"
            )

    def _memory_needs(self) -> List[Tuple[str, int]]:
        n_pad = self.padded_dim
        return [("signs", n_pad * self.dtype.itemsize), ("the int64 random signs", n_pad * 8),
                ("the permutation that samples rows", n_pad * 8)]

    def _draw(self, generator: torch.Generator) -> None:
        # Draw order (part of the seed contract): signs, then rows.
        self.signs = random_signs(self.padded_dim, generator).to(self.dtype)
        perm = torch.randperm(self.padded_dim, generator=generator, device=generator.device)
        self.rows = perm[: self.sketch_dim].sort().values

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        n, n_pad = self.input_dim, self.padded_dim
        # sqrt(n'/k) * (1/sqrt(n')) = 1/sqrt(k), folded into the signs.
        y = x * (self.signs[:n] * (1.0 / math.sqrt(self.sketch_dim)))
        if n_pad > n:
            y = F.pad(y, (0, n_pad - n))
        return _fwht_last(y).index_select(-1, self.rows)

    def to_dense(self) -> torch.Tensor:
        cols = torch.arange(self.input_dim, device=self.rows.device)
        h = hadamard_entries(self.rows.unsqueeze(1), cols.unsqueeze(0)).to(self.dtype)  # (k, n) rows of H
        return h * self.signs[: self.input_dim] * (1.0 / math.sqrt(self.sketch_dim))

    def extra_repr(self) -> str:
        return f"padded_dim={self.padded_dim}"
