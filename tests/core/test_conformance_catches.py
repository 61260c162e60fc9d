"""The conformance suite fails backends that compute something else.

The tolerances of panther.testing.conformance admit rounding (more of it where terms cancel); these
tests make sure they admit nothing more: a backend that drops a term, scales wrongly, mixes up two
weights, ignores the causal or the padding mask, or rounds an intermediate to a coarser dtype is caught,
in every dtype the reference backend is tested in. The attention row's named cases catch what ordinary
inputs do not show: a causal stabiliser that looks at future keys, NaN or garbage for fully padded
samples, and a relu normaliser clamped at an absolute 1e-6. Every case goes through the suite's table: the row's
input generator, reference, gradients and tolerance model, as ``make_conformance_suite`` uses them; the
suite's own tests (drawn and named cases) fail such backends too.
"""

import dataclasses

import pytest
import torch

from panther.backends import load_backend
from panther.backends.torch_backend import rfa_attention as good_attention
from panther.backends.torch_backend import sketched_conv2d as good_conv2d
from panther.backends.torch_backend import sketched_linear as good_linear
from panther.testing import SPECS, NamedCase, check_case, make_conformance_suite

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]

# One case per row, drawn by the row's own generator.
LINEAR = dict(seed=3, lead=(2, 9), I=70, O=45, L=3, k=6, bias=True)
CONV = dict(seed=5, N=2, C=5, O=6, HW=(9, 11), ks=(3, 3), stride=1, padding=1, dilation=1, terms=3, k=4, bias=True)
CAUSAL_ATTENTION = dict(seed=4, B=2, H=2, T=33, D=8, m=16, causal=True, kernel="softmax", per_head=False, masked=False)
MASKED_ATTENTION = dict(seed=6, B=3, H=2, T=21, D=8, m=16, causal=False, kernel="softmax", per_head=True, masked=True)
PADDED_ATTENTION = {**MASKED_ATTENTION, "padded": True}  # the last sample fully padded
RELU_ATTENTION = dict(seed=8, B=2, H=2, T=24, D=8, m=16, causal=True, kernel="relu", per_head=False, masked=True)
CASES = [("sketched_linear", LINEAR), ("sketched_conv2d", CONV), ("rfa_attention", CAUSAL_ATTENTION),
         ("rfa_attention", MASKED_ATTENTION), ("rfa_attention", PADDED_ATTENTION), ("rfa_attention", RELU_ATTENTION)]


def check(op, params, dtype):
    spec = SPECS[op]
    check_case(spec, spec.make_case(**params), "torch", dtype, "cpu")


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


def conv_drop_last_term(x, S1s, U1s, bias, stride, padding, dilation):
    n = S1s.shape[0]
    y = good_conv2d(x, S1s[:-1], U1s[:-1], None, stride, padding, dilation) * ((n - 1) / n)
    return y + bias.view(1, -1, 1, 1) if bias is not None else y


def conv_transposed_filters(x, S1s, U1s, bias, stride, padding, dilation):
    return good_conv2d(x, S1s.transpose(-1, -2).contiguous(), U1s, bias, stride, padding, dilation)


def attention_without_causal_mask(q, k, v, omega, causal, kernel, key_padding_mask):
    return good_attention(q, k, v, omega, False, kernel, key_padding_mask)


def attention_without_padding_mask(q, k, v, omega, causal, kernel, key_padding_mask):
    return good_attention(q, k, v, omega, causal, kernel, None)


def _projections(q, k, omega):
    D, H = q.shape[-1], q.shape[1]
    om = omega if omega.dim() == 3 else omega.expand(H, -1, -1)
    qs, ks = q * D**-0.25, k * D**-0.25
    return qs, ks, torch.einsum("bhtd,hmd->bhtm", qs, om), torch.einsum("bhsd,hmd->bhsm", ks, om)


def _quadratic(qf, kf, v, causal, key_padding_mask, clamp=0.0):
    """φ(q)φ(k)ᵀ masked and row-normalised (rows without a key: 0, or the normaliser clamped at ``clamp``)."""
    if key_padding_mask is not None:
        kf = kf * ~key_padding_mask[:, None, :, None]
    scores = qf @ kf.transpose(-1, -2)
    if causal:
        scores = scores.tril()
    den = scores.sum(-1, keepdim=True)
    if clamp:
        return scores @ v / den.clamp_min(clamp)
    return torch.where(den > 0, scores @ v / torch.where(den > 0, den, 1.0), 0.0)


def attention_with_one_key_max(q, k, v, omega, causal, kernel, key_padding_mask):
    """Causal softmax whose keys' stabiliser is one max over all keys, future ones included (a leak)."""
    if kernel != "softmax" or not causal or q.shape[2] == 0:
        return good_attention(q, k, v, omega, causal, kernel, key_padding_mask)
    qs, ks, pq, pk = _projections(q, k, omega)
    lq = pq - 0.5 * (qs * qs).sum(-1, keepdim=True)
    lk = pk - 0.5 * (ks * ks).sum(-1, keepdim=True)
    qf = torch.exp(lq - lq.amax(-1, keepdim=True).detach())
    kf = torch.exp(lk - lk.amax((-2, -1), keepdim=True).detach())  # over every key of the batch·head
    return _quadratic(qf, kf, v, causal, key_padding_mask)


def attention_nan_for_padded_samples(q, k, v, omega, causal, kernel, key_padding_mask):
    out = good_attention(q, k, v, omega, causal, kernel, key_padding_mask)
    if key_padding_mask is None:
        return out
    return torch.where(key_padding_mask.all(-1)[:, None, None, None], float("nan"), out)


def attention_mean_of_v_for_padded_samples(q, k, v, omega, causal, kernel, key_padding_mask):
    """A fully padded sample attends to all its keys alike (plausible garbage)."""
    out = good_attention(q, k, v, omega, causal, kernel, key_padding_mask)
    if key_padding_mask is None or not v.shape[2]:
        return out
    return torch.where(key_padding_mask.all(-1)[:, None, None, None], v.mean(-2, keepdim=True), out)


def relu_normaliser_clamped_at_1e_6(q, k, v, omega, causal, kernel, key_padding_mask):
    """relu features with the normaliser clamped at an absolute 1e-6 (not scale-invariant)."""
    if kernel != "relu":
        return good_attention(q, k, v, omega, causal, kernel, key_padding_mask)
    _, _, pq, pk = _projections(q, k, omega)
    m = omega.shape[-2]
    return _quadratic(torch.relu(pq) / m**0.5, torch.relu(pk) / m**0.5, v, causal, key_padding_mask, clamp=1e-6)


WRONG = [
    ("sketched_linear", LINEAR, drop_last_term),
    ("sketched_linear", LINEAR, scale_by_one_over_l),
    ("sketched_linear", LINEAR, swap_s1_and_u2),
    ("sketched_linear", LINEAR, intermediate_in_fp8),
    ("sketched_conv2d", CONV, conv_drop_last_term),
    ("sketched_conv2d", CONV, conv_transposed_filters),
    ("rfa_attention", CAUSAL_ATTENTION, attention_without_causal_mask),
    ("rfa_attention", MASKED_ATTENTION, attention_without_padding_mask),
    ("rfa_attention", PADDED_ATTENTION, attention_nan_for_padded_samples),
    ("rfa_attention", PADDED_ATTENTION, attention_mean_of_v_for_padded_samples),
]


@pytest.fixture
def torch_backend_doing(monkeypatch):
    backend = load_backend("torch")

    def use(op, fn):
        monkeypatch.setattr(backend, op, fn)

    return use


def test_every_row_has_a_wrong_backend_to_catch():
    assert {op for op, _, _ in WRONG} == set(SPECS)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op, params, wrong", WRONG, ids=[w.__name__ for _, _, w in WRONG])
def test_wrong_backend_is_caught(torch_backend_doing, op, params, wrong, dtype):
    torch_backend_doing(op, wrong)
    with pytest.raises(AssertionError):
        check(op, params, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op, params", CASES, ids=[f"{op}-{p['seed']}" for op, p in CASES])
def test_the_reference_itself_passes_the_same_cases(op, params, dtype):
    check(op, params, dtype)


def test_the_suite_refuses_an_op_without_a_row():
    with pytest.raises(ValueError, match=r"ops \['sketched_matmul'\] have no conformance spec; known ops"):
        make_conformance_suite("torch", ops=("sketched_linear", "sketched_matmul"))


# wrong backends that run on every shape the suite draws (and fail on the values only)
WRONG_EVERYWHERE = [("sketched_linear", scale_by_one_over_l), ("sketched_conv2d", conv_drop_last_term),
                    ("rfa_attention", attention_without_causal_mask),
                    ("rfa_attention", attention_nan_for_padded_samples)]  # the row's padded example


@pytest.mark.parametrize("op, wrong", WRONG_EVERYWHERE, ids=[w.__name__ for _, w in WRONG_EVERYWHERE])
def test_the_suite_built_from_the_table_catches_it(torch_backend_doing, op, wrong):
    suite = make_conformance_suite("torch", ops=(op,), dtypes=(torch.float32,), max_dim=64, max_examples=5)
    torch_backend_doing(op, wrong)
    with pytest.raises(AssertionError):
        getattr(suite(), f"test_{op}")(dtype=torch.float32)


def test_named_cases_become_tests_of_their_dtypes(monkeypatch, torch_backend_doing):
    spec = SPECS["sketched_linear"]
    cases = (NamedCase("one-row", lambda: spec.make_case(**LINEAR)),
             NamedCase("float64-only", lambda: spec.make_case(**{**LINEAR, "lead": (1,)}), dtypes=(torch.float64,)))
    monkeypatch.setitem(SPECS, "sketched_linear", dataclasses.replace(spec, cases=cases))
    suite = make_conformance_suite("torch", ops=("sketched_linear",), dtypes=(torch.float64, torch.float32))
    test = suite.test_sketched_linear_case
    runs = next(m for m in test.pytestmark if m.name == "parametrize").args[1]
    assert [r.id for r in runs] == ["one-row-torch.float64", "one-row-torch.float32", "float64-only-torch.float64"]
    for r in runs:
        test(suite(), *r.values)
    torch_backend_doing("sketched_linear", drop_last_term)
    for r in runs:
        with pytest.raises(AssertionError):
            test(suite(), *r.values)
    # a row without named cases gets no such test (a parametrization over nothing would only be skipped)
    assert not hasattr(make_conformance_suite("torch", ops=("sketched_conv2d",)), "test_sketched_conv2d_case")


# wrong backends that only the attention row's named cases catch: each passes an ordinary drawn case
ATTENTION_CASES = {c.id: c for c in SPECS["rfa_attention"].cases}
PADDED_IDS = [f"padded-sample-{kn}-{mode}" for kn in ("softmax", "relu") for mode in ("full", "causal")]
NAMED_CATCHES = [
    (attention_with_one_key_max, CAUSAL_ATTENTION, ["future-key-softmax", "future-keys-across-chunks"]),
    (attention_nan_for_padded_samples, MASKED_ATTENTION, PADDED_IDS),
    (attention_mean_of_v_for_padded_samples, MASKED_ATTENTION, PADDED_IDS),
    (relu_normaliser_clamped_at_1e_6, RELU_ATTENTION,
     ["scale-relu-qk0.001-v0.001-causal", "scale-relu-qk0.001-v1000-causal"]),  # row 0: one key, den ~ 1e-6
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("wrong, ordinary, ids", NAMED_CATCHES, ids=[w.__name__ for w, _, _ in NAMED_CATCHES])
def test_named_attention_cases_catch_it(torch_backend_doing, wrong, ordinary, ids, dtype):
    spec = SPECS["rfa_attention"]
    runs = [ATTENTION_CASES[i] for i in ids if ATTENTION_CASES[i].dtypes is None or dtype in ATTENTION_CASES[i].dtypes]
    assert runs
    for named in runs:  # the reference passes them
        check_case(spec, named.build(), "torch", dtype, "cpu")
    torch_backend_doing("rfa_attention", wrong)
    check("rfa_attention", ordinary, dtype)  # the wrong backend is right where the named cases do not look
    for named in runs:
        with pytest.raises(AssertionError):
            check_case(spec, named.build(), "torch", dtype, "cpu")
