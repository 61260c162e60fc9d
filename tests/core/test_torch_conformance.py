"""The reference backend passes the conformance suite and float64 gradcheck for all three ops."""

import pytest
import torch

import panther.ops
from panther.testing import make_conformance_suite

TestTorchConformance = make_conformance_suite(
    "torch", dtypes=(torch.float64, torch.float32, torch.bfloat16, torch.float16), device="cpu"
)


def _dbl(*shape, gen):
    return torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)


def test_gradcheck_sketched_linear():
    g = torch.Generator().manual_seed(0)
    L, I, k, O = 2, 11, 3, 7
    args = (_dbl(2, 3, I, gen=g), _dbl(L, I, k, gen=g), _dbl(L, k, O, gen=g), _dbl(L, k, O, gen=g), _dbl(L, I, k, gen=g), _dbl(O, gen=g))
    assert torch.autograd.gradcheck(lambda *a: panther.ops.sketched_linear(*a, backend="torch"), args)


@pytest.mark.parametrize("padding", [1, "same", "valid"])
def test_gradcheck_sketched_conv2d(padding):
    g = torch.Generator().manual_seed(1)
    args = (_dbl(2, 3, 6, 7, gen=g), _dbl(2, 2, 3, 2, 3, gen=g), _dbl(2, 2, 4, gen=g), _dbl(4, gen=g))
    fn = lambda *a: panther.ops.sketched_conv2d(*a, padding=padding, dilation=(1, 2), backend="torch")  # noqa: E731
    assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kernel", ["softmax", "relu"])
def test_gradcheck_rfa_attention(causal, kernel):
    g = torch.Generator().manual_seed(2)
    args = (_dbl(2, 2, 9, 4, gen=g), _dbl(2, 2, 9, 4, gen=g), _dbl(2, 2, 9, 3, gen=g), _dbl(2, 6, 4, gen=g))
    kpm = torch.zeros(2, 9, dtype=torch.bool)
    kpm[1, 3:5] = True
    fn = lambda *a: panther.ops.rfa_attention(*a, causal=causal, kernel=kernel, key_padding_mask=kpm, backend="torch")  # noqa: E731
    assert torch.autograd.gradcheck(fn, args)


def test_causal_attention_spans_several_chunks():
    """Sequences longer than the blockwise scan's chunk agree with the explicit causal matrix."""
    from panther.backends.torch_backend.rfa_attention import CHUNK
    from panther.testing import naive

    g = torch.Generator().manual_seed(3)
    T = 2 * CHUNK + 37
    q, k, v = (torch.randn(1, 2, T, 8, generator=g, dtype=torch.float64) for _ in range(3))
    om = torch.randn(16, 8, generator=g, dtype=torch.float64)
    got = panther.ops.rfa_attention(q, k, v, om, causal=True, backend="torch")
    torch.testing.assert_close(got, naive.rfa_attention(q, k, v, om, causal=True), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("precision, tf32", [("highest", False), ("high", True), ("medium", True)])
def test_float32_precision_is_in_force_while_the_backend_runs(monkeypatch, precision, tf32):
    """check_case(float32_precision=...) runs the op (and the naive baseline) under that precision, with
    cuDNN's TF32 switch to match, and restores both; an unknown precision is refused at once."""
    from panther.testing import SPECS, check_case

    seen = []
    op = panther.ops.sketched_linear

    def spy(*args, **kwargs):
        seen.append((torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32))
        return op(*args, **kwargs)

    monkeypatch.setattr(panther.ops, "sketched_linear", spy)
    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    spec = SPECS["sketched_linear"]
    case = spec.make_case(seed=3, lead=(2, 5), I=9, O=7, L=2, k=3, bias=True)
    check_case(spec, case, "torch", torch.float32, "cpu", float32_precision=precision)
    assert seen == [(precision, tf32)]
    assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32) == before
    with pytest.raises(ValueError, match=r"float32_precision must be one of .*got 'tf32'"):
        make_conformance_suite("torch", ops=("sketched_linear",), float32_precision="tf32")


def test_relu_attention_draws_at_the_kink_are_rejected():
    """A relu draw with a row whose features rounding to bfloat16 switches on (its exact output 0, with the rounded
    inputs about 0.4) is rejected; ordinary relu draws and every softmax draw are kept."""
    from panther.testing.specs import rfa_attention as spec

    kink = dict(B=1, H=3, T=92, D=15, m=8, causal=False, kernel="relu", per_head=True, masked=False, padded=False)
    assert spec.make_case(90, **kink) is None
    case = spec.make_case(91, **kink)
    assert case is not None and not spec.rounding_moves_output(case.inputs, case.kwargs)
    assert spec.make_case(90, **{**kink, "kernel": "softmax"}) is not None
