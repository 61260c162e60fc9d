"""Test-only backend ``reference64``: every op computed by the float64 references of panther.testing.naive.

Inputs are cast to float64 and the result back to the input dtype; autograd runs through the naive
code. It shows what a backend is: this class and one entry-point line in pyproject.toml.
"""

import torch

from panther.backends import Backend, tensor_reasons
from panther.testing import naive


def _in_float64(reference, *args):
    dtype = args[0].dtype
    wide = (a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
    return reference(*wide).to(dtype)


class Reference64Backend(Backend):
    name = "reference64"
    priority = -100  # slow on purpose: auto never picks it over torch
    version = "0.0.1"

    def reasons_cannot_run(self, op, *args, **kwargs):
        return super().reasons_cannot_run(op) + tensor_reasons(*args, *kwargs.values())

    def sketched_linear(self, x, S1s, S2s, U1s, U2s, bias):
        return _in_float64(naive.sketched_linear, x, S1s, S2s, U1s, U2s, bias)

    def sketched_conv2d(self, x, S1s, U1s, bias, stride, padding, dilation):
        return _in_float64(naive.sketched_conv2d, x, S1s, U1s, bias, stride, padding, dilation)

    def rfa_attention(self, q, k, v, omega, causal, kernel, key_padding_mask):
        return _in_float64(naive.rfa_attention, q, k, v, omega, causal, kernel, key_padding_mask)
