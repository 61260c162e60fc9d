"""Construct a sketch operator by name: :func:`make_sketch`."""

from __future__ import annotations

from typing import Dict, Type

from panther.sketch.base import SketchOperator
from panther.sketch.gaussian import GaussianSketch
from panther.sketch.rademacher import RademacherSketch
from panther.sketch.sparse import CountSketch, SJLTSketch
from panther.sketch.srht import SRHTSketch

_KINDS: Dict[str, Type[SketchOperator]] = {
    cls.kind: cls for cls in (GaussianSketch, RademacherSketch, SRHTSketch, SJLTSketch, CountSketch)
}

#: Names accepted by :func:`make_sketch`.
SKETCH_KINDS = tuple(_KINDS)


def make_sketch(kind: str, sketch_dim: int, input_dim: int, **kwargs) -> SketchOperator:
    r"""Create a ``(sketch_dim, input_dim)`` sketch operator of the given kind.

    Args:
        kind (str): one of ``"gaussian"`` (:class:`GaussianSketch`), ``"rademacher"``
            (:class:`RademacherSketch`), ``"srht"`` (:class:`SRHTSketch`), ``"sjlt"`` (:class:`SJLTSketch`),
            ``"countsketch"`` (:class:`CountSketch`); case-insensitive.
        sketch_dim (int): :math:`k`, number of rows.
        input_dim (int): :math:`n`, number of columns.
        **kwargs: passed to the operator's constructor: ``seed``, ``generator``, ``device``, ``dtype``,
            and ``nnz_per_column`` for ``"sjlt"``.

    Examples::

        >>> S = make_sketch("sjlt", 32, 1000, nnz_per_column=4, seed=0)
        >>> S
        SJLTSketch(sketch_dim=32, input_dim=1000, nnz_per_column=4, dtype=torch.float32, device=cpu)
    """
    if not isinstance(kind, str):
        raise TypeError(f"kind must be a str, one of {list(SKETCH_KINDS)}, got {type(kind).__name__}")
    cls = _KINDS.get(kind.lower())
    if cls is None:
        raise ValueError(f"kind must be one of {list(SKETCH_KINDS)}, got {kind!r}")
    return cls(sketch_dim, input_dim, **kwargs)
