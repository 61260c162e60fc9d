"""The layers on a CUDA device: built there from the CPU generator's draws, and equal to the float64 CPU layer.

The float64 CPU path is itself checked against explicit per-term references in test_conformance.py.
Marked ``gpu``: skipped without CUDA, a failure under PANTHER_REQUIRE_GPU=1.
"""

import copy

import pytest
import torch

import panther as pr
from panther.nn import RandMultiHeadAttention, SKConv2d, SKLinear

pytestmark = [pytest.mark.gpu, pytest.mark.filterwarnings("ignore:.*not fewer than the:UserWarning")]

# |a - e| <= REL * max|e|: float32 convolutions use TF32 on Ampere and newer by default.
REL = {torch.float32: 1e-2, torch.bfloat16: 6e-2}


def assert_close_scaled(actual, expected, rel):
    expected = expected.double()
    torch.testing.assert_close(actual.double().cpu(), expected, rtol=0, atol=rel * expected.abs().max().item())


CASES = {
    "linear": (lambda **kw: SKLinear(67, 45, 2, 7, **kw), lambda: (torch.randn(3, 11, 67),)),
    "conv": (
        lambda **kw: SKConv2d(5, 9, 3, padding="same", num_terms=2, low_rank=3, **kw),
        lambda: (torch.randn(2, 5, 13, 10),),
    ),
    "attention": (
        lambda **kw: RandMultiHeadAttention(24, 3, 16, **kw),
        lambda: tuple(0.7 * torch.randn(9, 2, 24) for _ in range(3)),
    ),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_cuda_layer_matches_float64_cpu_layer(name, dtype):
    make, inputs = CASES[name]
    layer = make(seed=0, device="cuda", dtype=dtype)
    reference = copy.deepcopy(layer).cpu().double()
    args = [t.to("cuda", dtype).requires_grad_() for t in inputs()]
    ref_args = [t.detach().cpu().double().requires_grad_() for t in args]
    out = layer(*args)
    out = out[0] if isinstance(out, tuple) else out
    ref = reference(*ref_args)
    ref = ref[0] if isinstance(ref, tuple) else ref
    assert out.device.type == "cuda" and out.dtype == dtype
    assert_close_scaled(out, ref, REL[dtype])
    g = torch.randn(ref.shape, dtype=torch.float64)
    out.backward(g.to("cuda", dtype))
    ref.backward(g)
    for a, r in zip(args, ref_args):
        assert_close_scaled(a.grad, r.grad, REL[dtype])
    for (pname, p), (_, rp) in zip(layer.named_parameters(), reference.named_parameters()):
        assert_close_scaled(p.grad, rp.grad, REL[dtype]), pname


@pytest.mark.parametrize("name", list(CASES))
def test_cuda_construction_uses_the_same_draws(name):
    make, _ = CASES[name]
    on_cpu, on_cuda = make(seed=3), make(seed=3, device="cuda")
    for (key, a), (_, b) in zip(on_cpu.state_dict().items(), on_cuda.state_dict().items()):
        assert b.device.type == "cuda", key
        torch.testing.assert_close(b.cpu(), a, rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")


def test_conversions_stay_on_cuda():
    lin = torch.nn.Linear(30, 20, device="cuda")
    conv = torch.nn.Conv2d(3, 6, 3, device="cuda")
    mha = torch.nn.MultiheadAttention(16, 2, device="cuda")
    layers = [
        SKLinear.from_linear(lin, 1, 4, seed=0),
        SKConv2d.from_conv2d(conv, 1, 2, seed=0),
        RandMultiHeadAttention.from_multihead_attention(mha, 8, seed=0),
    ]
    for layer in layers:
        assert all(t.device.type == "cuda" for t in layer.state_dict().values())
    x = torch.randn(4, 30, device="cuda")
    with pr.use_backend("torch"):
        assert layers[0](x).device.type == "cuda"
