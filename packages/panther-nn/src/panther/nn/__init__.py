"""Sketched layers with the conventions of :mod:`torch.nn`.

- :class:`SKLinear` and :class:`SKLinear_triton`: linear layers whose weight is a sum of randomized
  low-rank terms.
- :class:`SKConv2d`: the same idea for 2-D convolutions.
- :class:`RandMultiHeadAttention`: multi-head attention in linear time with random features.
- :func:`convert` and :func:`to_dense`: turn a trained model's dense layers into sketched ones (with a
  :class:`ConversionReport`), and back.
"""

from panther.nn.attention import RandMultiHeadAttention
from panther.nn.conv import SKConv2d
from panther.nn.conversion import ConversionReport, LayerConversion, convert, to_dense
from panther.nn.linear import SKLinear, SKLinear_triton

__all__ = [
    "SKLinear", "SKLinear_triton", "SKConv2d", "RandMultiHeadAttention",
    "convert", "to_dense", "ConversionReport", "LayerConversion",
]
