r"""Random sketch operators :math:`S \in \mathbb{R}^{k \times n}`, all scaled so that :math:`\mathbb{E}[S^\top S] = I_n`.

- Gaussian: :math:`S_{ij} \sim \mathcal{N}(0, 1/k)` i.i.d.
- Rademacher: :math:`S_{ij} = \pm 1/\sqrt{k}`, independent fair signs.
- SRHT: :math:`S = \sqrt{n'/k}\, P H D` on :math:`x` zero-padded to :math:`n' = 2^{\lceil\log_2 n\rceil}`;
  :math:`D` random signs, :math:`H` the normalised :math:`n' \times n'` Walsh–Hadamard matrix, :math:`P`
  :math:`k` rows sampled without replacement.
- SJLT (sparse sign): each column has :math:`s` nonzeros :math:`\pm 1/\sqrt{s}` at distinct uniform rows.
- CountSketch: each column has one :math:`\pm 1` at a uniform row (:math:`h(j)`, :math:`\sigma_j`).

Every operator takes ``sketch_dim`` (:math:`k`), ``input_dim`` (:math:`n`) and keywords ``seed`` or
``generator``, ``device``, ``dtype``; draws come from that generator (never the global RNG), on the CPU
for a ``seed``, so the same seed gives the same operator on every device. :func:`apply_sketch` (or
``op.apply``) contracts the operator with one axis of a tensor using its structure: a fast Walsh–Hadamard
transform for SRHT (O(n log n)), ``index_add`` for the sparse ones (O(ns)), a matmul for the dense ones.

Examples::

    >>> import torch
    >>> from panther.sketch import make_sketch
    >>> S = make_sketch("srht", 64, 1000, seed=0)
    >>> y = S.apply(torch.randn(10, 1000))      # (10, 64)
    >>> y.shape
    torch.Size([10, 64])
"""

from panther.sketch.apply import apply_sketch
from panther.sketch.base import SketchOperator
from panther.sketch.dense import DenseSketch
from panther.sketch.factory import SKETCH_KINDS, make_sketch
from panther.sketch.gaussian import GaussianSketch
from panther.sketch.hadamard import fwht, hadamard_matrix
from panther.sketch.rademacher import RademacherSketch
from panther.sketch.sparse import CountSketch, SJLTSketch, SparseSignSketch
from panther.sketch.srht import SRHTSketch

__all__ = [
    "SketchOperator",
    "DenseSketch",
    "SparseSignSketch",
    "GaussianSketch",
    "RademacherSketch",
    "SRHTSketch",
    "SJLTSketch",
    "CountSketch",
    "apply_sketch",
    "make_sketch",
    "SKETCH_KINDS",
    "fwht",
    "hadamard_matrix",
]
