"""The reference backend ``torch``: every op in plain PyTorch, any device and floating dtype.

It is the float64 reference the other backends are tested against, and the fallback of ``auto``.
"""

import torch

from panther.backends.base import Backend, tensor_reasons
from panther.backends.torch_backend.rfa_attention import rfa_attention
from panther.backends.torch_backend.sketched_conv2d import sketched_conv2d
from panther.backends.torch_backend.sketched_linear import sketched_linear


class TorchBackend(Backend):
    name = "torch"
    priority = 0
    version = torch.__version__

    def reasons_cannot_run(self, op, *args, **kwargs):
        reasons = super().reasons_cannot_run(op)
        devices = ("cpu", "cuda", "mps", "xpu", "meta")
        return reasons + tensor_reasons(*args, *kwargs.values(), devices=devices)

    sketched_linear = staticmethod(sketched_linear)
    sketched_conv2d = staticmethod(sketched_conv2d)
    rfa_attention = staticmethod(rfa_attention)


__all__ = ["TorchBackend", "sketched_linear", "sketched_conv2d", "rfa_attention"]
