"""Public functional ops. Each checks its arguments and runs on the selected backend.

One module per op; the reference implementation of each lives in :mod:`panther.backends.torch_backend`.
"""

from panther.ops.rfa_attention import rfa_attention, rfa_attention_weights, rfa_features
from panther.ops.sketched_conv2d import resolve_padding, sketched_conv2d
from panther.ops.sketched_linear import sketched_linear

__all__ = [
    "sketched_linear",
    "sketched_conv2d",
    "rfa_attention",
    "rfa_features",
    "rfa_attention_weights",
    "resolve_padding",
]
