"""The conformance suite fails backends that compute something else.

The tolerances of panther.testing.conformance admit rounding (more of it where terms cancel); these
tests make sure they admit nothing more: a backend that drops a term, scales wrongly, mixes up two
weights, ignores the causal mask, or rounds an intermediate to a coarser dtype is caught, in every dtype
the reference backend is tested in.
"""

import pytest
import torch

from panther.backends import load_backend
from panther.backends.torch_backend import rfa_attention as good_attention
from panther.backends.torch_backend import sketched_conv2d as good_conv2d
from panther.backends.torch_backend import sketched_linear as good_linear
from panther.testing import naive
from panther.testing.conformance import _compare, _generator, _linear_case, _randn

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
LINEAR_SCALE = {"U1s": 1 / 6, "U2s": 1 / 6}  # the cases below have L = 3 terms


def drop_last_term(x, S1s, S2s, U1s, U2s, bias):
    L = S1s.shape[0]
    y = good_linear(x, S1s[:-1], S2s[:-1], U1s[:-1], U2s[:-1], bias)
    return bias + (y - bias) * (L - 1) / L if bias is not None else y * (L - 1) / L


def scale_by_one_over_l(x, S1s, S2s, U1s, U2s, bias):
    return good_linear(x, S1s, S2s, U1s, U2s, None) * 2 + (bias if bias is not None else 0)


def swap_s1_and_u2(x, S1s, S2s, U1s, U2s, bias):
    return good_linear(x, U2s, S2s, U1s, S1s, bias)


def intermediate_in_fp8(x, S1s, S2s, U1s, U2s, bias):
    h = torch.einsum("...i,lik->...lk", x, torch.cat([S1s, U2s], -1)).to(torch.float8_e4m3fn).to(x.dtype)
    L, _, k = S1s.shape
    y = (torch.einsum("...lk,lko->...o", h[..., :k], U1s) + torch.einsum("...lk,lko->...o", h[..., k:], S2s)) / (2 * L)
    return y + bias if bias is not None else y


@pytest.fixture
def torch_backend_doing(monkeypatch):
    backend = load_backend("torch")

    def use(op, fn):
        monkeypatch.setattr(backend, op, fn)

    return use


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("wrong", [drop_last_term, scale_by_one_over_l, swap_s1_and_u2, intermediate_in_fp8],
                         ids=lambda f: f.__name__)
def test_wrong_linear_is_caught(torch_backend_doing, wrong, dtype):
    torch_backend_doing("sketched_linear", wrong)
    inputs = _linear_case(3, (2, 9), 70, 45, 3, 6, True)
    with pytest.raises(AssertionError):
        _compare("sketched_linear", inputs, {}, naive.sketched_linear, "torch", dtype, "cpu",
                 ["x", "S1s", "S2s", "bias"], LINEAR_SCALE)


def conv_drop_last_term(x, S1s, U1s, bias, stride, padding, dilation):
    n = S1s.shape[0]
    y = good_conv2d(x, S1s[:-1], U1s[:-1], None, stride, padding, dilation) * ((n - 1) / n)
    return y + bias.view(1, -1, 1, 1) if bias is not None else y


def conv_transposed_filters(x, S1s, U1s, bias, stride, padding, dilation):
    return good_conv2d(x, S1s.transpose(-1, -2).contiguous(), U1s, bias, stride, padding, dilation)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("wrong", [conv_drop_last_term, conv_transposed_filters], ids=lambda f: f.__name__)
def test_wrong_conv2d_is_caught(torch_backend_doing, wrong, dtype):
    torch_backend_doing("sketched_conv2d", wrong)
    with pytest.raises(AssertionError):
        compare_conv(dtype)


def compare_conv(dtype):
    gen = _generator(5)
    terms, k, C, O = 3, 4, 5, 6  # 2 terms = 6 filter banks
    inputs = dict(x=_randn(gen, 2, C, 9, 11), S1s=_randn(gen, 2 * terms, k, C, 3, 3, scale=(9 * C) ** -0.5),
                  U1s=_randn(gen, 2 * terms, k, O, scale=k**-0.5), bias=_randn(gen, O))
    _compare("sketched_conv2d", inputs, dict(stride=1, padding=1, dilation=1), naive.sketched_conv2d, "torch",
             dtype, "cpu", ["x", "S1s", "bias"], {"U1s": 1 / (2 * terms)})


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_causal_attention_without_the_mask_is_caught(torch_backend_doing, dtype):
    torch_backend_doing("rfa_attention", lambda q, k, v, omega, causal, kernel, kpm: good_attention(
        q, k, v, omega, False, kernel, kpm))
    with pytest.raises(AssertionError):
        compare_causal_attention(dtype)


def compare_causal_attention(dtype):
    gen = _generator(4)
    inputs = dict(q=_randn(gen, 2, 2, 33, 8), k=_randn(gen, 2, 2, 33, 8), v=_randn(gen, 2, 2, 33, 5),
                  omega=_randn(gen, 16, 8))
    _compare("rfa_attention", inputs, dict(causal=True, kernel="softmax", key_padding_mask=None),
             naive.rfa_attention, "torch", dtype, "cpu", ["q", "k", "v"])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_the_reference_itself_passes_the_same_cases(dtype):
    inputs = _linear_case(3, (2, 9), 70, 45, 3, 6, True)
    _compare("sketched_linear", inputs, {}, naive.sketched_linear, "torch", dtype, "cpu",
             ["x", "S1s", "S2s", "bias"], LINEAR_SCALE)
    compare_conv(dtype)
    compare_causal_attention(dtype)
