r"""Gaussian sketch: :math:`S_{ij} \sim \mathcal{N}(0, 1/k)` i.i.d."""

from __future__ import annotations

import math

import torch

from panther.sketch.dense import DenseSketch


class GaussianSketch(DenseSketch):
    r"""Gaussian sketch :math:`S \in \mathbb{R}^{k \times n}` with i.i.d. entries :math:`\mathcal{N}(0, 1/k)`.

    :math:`\mathbb{E}[S^\top S] = I_n`, and for every fixed :math:`x`, :math:`k \|Sx\|^2 / \|x\|^2` is
    :math:`\chi^2_k`. Applying costs O(kn) per vector (a matmul with the stored matrix).

    The normal draws are made in float32 on the generator's device, then cast to ``dtype`` and scaled, so
    the same seed gives the same operator in every dtype up to rounding.

    Args:
        sketch_dim (int): :math:`k`, number of rows (output size).
        input_dim (int): :math:`n`, number of columns (input size).
        seed (int, optional): seed for a fresh CPU generator. Mutually exclusive with ``generator``.
        generator (torch.Generator, optional): generator to draw from. With neither ``seed`` nor
            ``generator``, a fresh nondeterministic seed is used (see :attr:`seed`).
        device (torch.device, optional): device of the operator. Default: CPU.
        dtype (torch.dtype, optional): floating-point dtype. Default: ``torch.float32``.

    Examples::

        >>> S = GaussianSketch(64, 1000, seed=0)
        >>> x = torch.randn(32, 1000)
        >>> S.apply(x).shape
        torch.Size([32, 64])
        >>> torch.allclose(S.apply(x, dim=-1), x @ S.to_dense().T, atol=1e-5)
        True
    """

    kind = "gaussian"

    def _draw(self, generator: torch.Generator) -> None:
        g = torch.randn(
            self.sketch_dim, self.input_dim, generator=generator, device=generator.device, dtype=torch.float32
        )
        self.matrix = g.to(self.dtype).mul_(1.0 / math.sqrt(self.sketch_dim))
