r"""Rademacher sketch: :math:`S_{ij} = \pm 1/\sqrt{k}` with independent fair signs."""

from __future__ import annotations

import math

import torch

from panther.sketch._random import random_signs
from panther.sketch.dense import DenseSketch


class RademacherSketch(DenseSketch):
    r"""Rademacher (scaled sign) sketch with i.i.d. entries :math:`S_{ij} = \pm 1/\sqrt{k}`, each sign fair.

    :math:`\mathbb{E}[S^\top S] = I_n` (the diagonal of :math:`S^\top S` is exactly 1). Applying costs
    O(kn) per vector (a matmul with the stored matrix).

    Args:
        sketch_dim (int): :math:`k`, number of rows (output size).
        input_dim (int): :math:`n`, number of columns (input size).
        seed (int, optional): seed for a fresh CPU generator. Mutually exclusive with ``generator``.
        generator (torch.Generator, optional): generator to draw from. With neither ``seed`` nor
            ``generator``, a fresh nondeterministic seed is used (see :attr:`seed`).
        device (torch.device, optional): device of the operator. Default: CPU.
        dtype (torch.dtype, optional): floating-point dtype. Default: ``torch.float32``.

    Examples::

        >>> S = RademacherSketch(4, 6, seed=0)
        >>> bool((S.to_dense().abs() == 0.5).all())
        True
        >>> S.apply(torch.randn(6, 3), dim=0).shape
        torch.Size([4, 3])
    """

    kind = "rademacher"
    _draw_dtype = torch.int64  # random_signs

    def _draw(self, generator: torch.Generator) -> None:
        signs = random_signs(self.sketch_dim * self.input_dim, generator)
        matrix = signs.view(self.sketch_dim, self.input_dim).to(self.dtype)
        self.matrix = matrix.mul_(1.0 / math.sqrt(self.sketch_dim))
