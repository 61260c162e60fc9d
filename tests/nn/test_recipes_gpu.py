"""The training recipes on a CUDA device: bf16 autocast on each backend, parameter-only bf16 (FSDP2-style),
and torch.compile(fullgraph=True) with the causal masks nn.Transformer passes.

Marked ``gpu``: skipped without CUDA, a failure under PANTHER_REQUIRE_GPU=1.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import panther as pr
from panther.nn import RandMultiHeadAttention, SKConv2d, SKLinear

pytestmark = [pytest.mark.gpu, pytest.mark.filterwarnings("ignore:.*not fewer than the:UserWarning")]

CUDA = "cuda"


OPS = {"linear": "sketched_linear", "conv": "sketched_conv2d", "attention": "rfa_attention"}


def _require_backend(backend, name):
    """Skip unless ``backend`` runs here and implements the op the ``name`` layer calls."""
    if backend not in pr.available_backends():
        pytest.skip(f"backend {backend!r} is not available here")
    if not pr.backends.registry.load_backend(backend).implements(OPS[name]):
        pytest.skip(f"backend {backend!r} does not implement {OPS[name]}")


CASES = {
    "linear": (lambda: SKLinear(96, 80, 2, 8, seed=0), lambda: (torch.randn(4, 33, 96),)),
    "conv": (
        lambda: SKConv2d(8, 12, 3, padding=1, num_terms=2, low_rank=4, seed=0),
        lambda: (torch.randn(2, 8, 15, 13),),
    ),
    "attention": (
        lambda: RandMultiHeadAttention(64, 4, 32, batch_first=True, seed=0),
        lambda: tuple(0.7 * torch.randn(2, 37, 64) for _ in range(3)),
    ),
}


def _out(module, inputs):
    out = module(*inputs)
    return out[0] if isinstance(out, tuple) else out


def _rel(a, e):
    return ((a.double() - e.double()).norm() / e.double().norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
@pytest.mark.parametrize("name", list(CASES))
def test_bf16_autocast_forward_backward_vs_float32(name, backend):
    _require_backend(backend, name)
    build, make = CASES[name]
    torch.manual_seed(0)
    layer = build().to(CUDA)
    inputs = tuple(t.to(CUDA) for t in make())
    with pr.use_backend("torch"):
        ref = _out(layer, inputs)
        ref.square().mean().backward()
    ref_grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()
    with pr.use_backend(backend), torch.autocast(CUDA, dtype=torch.bfloat16):
        out = _out(layer, inputs)
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    assert _rel(out, ref) < 3e-2
    for n, p in layer.named_parameters():
        assert p.grad.dtype == torch.float32, n
        assert _rel(p.grad, ref_grads[n]) < 6e-2, n


@pytest.mark.parametrize("name", list(CASES))
def test_parameter_only_bf16_buffers_follow(name):
    build, make = CASES[name]
    torch.manual_seed(0)
    layer = build().to(CUDA)
    inputs = tuple(t.to(CUDA) for t in make())
    ref = _out(layer, inputs)
    for p in layer.parameters():  # what FSDP2's MixedPrecisionPolicy(param_dtype=bf16) does
        p.data = p.data.to(torch.bfloat16)
    out = _out(layer, tuple(t.bfloat16() for t in inputs))
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert _rel(out, ref) < 3e-2


class _Causal(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.attn = RandMultiHeadAttention(64, 4, 32, batch_first=True, seed=0)
        self.kind = kind

    def forward(self, x, pad):
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1], device=x.device)
        if self.kind == "bool":
            mask = mask == float("-inf")
        return self.attn(x, x, x, attn_mask=mask, key_padding_mask=pad, need_weights=False)[0]


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_compile_fullgraph_causal_masks(kind):
    torch._dynamo.reset()
    model = _Causal(kind).to(CUDA)
    compiled = torch.compile(model, fullgraph=True)
    for T in (17, 40):
        x = torch.randn(2, T, 64, device=CUDA)
        pad = torch.zeros(2, T, device=CUDA)
        pad[1, T // 2 :] = float("-inf")
        torch.testing.assert_close(compiled(x, pad), model(x, pad), rtol=2e-3, atol=2e-3)
