"""The rows of the conformance suite: one :class:`~panther.testing.conformance.OpSpec` per op, one module
per op. Importing this package registers them (:mod:`panther.testing` does so)."""

from panther.testing.specs import rfa_attention, sketched_conv2d, sketched_linear

__all__ = ["sketched_linear", "sketched_conv2d", "rfa_attention"]
