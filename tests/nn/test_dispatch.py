"""Every forward goes through the backend registry: selection applies to existing layers; torch.compile works."""

import pytest
import torch

import panther as pr
from panther.backends import registry
from panther.nn import RandMultiHeadAttention, SKConv2d, SKLinear

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*not fewer than the:UserWarning"),
    pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"),  # dynamo's
]


@pytest.fixture
def restore_default(monkeypatch):
    """Undo pr.set_backend at teardown (set_backend('auto') would also mask PANTHER_BACKEND)."""
    monkeypatch.setattr(registry, "_default", registry._default)


@pytest.fixture
def spy(monkeypatch):
    """Record (backend, op) for every op any discovered backend runs, by wrapping the registered objects."""
    calls = []
    for info in registry.backend_infos():
        backend = info.backend
        for op in pr.backends.OPS if backend is not None else ():
            if not backend.implements(op):
                continue

            def wrapped(*args, _name=backend.name, _op=op, _real=getattr(backend, op), **kwargs):
                calls.append((_name, _op))
                return _real(*args, **kwargs)

            monkeypatch.setattr(backend, op, wrapped)
    return calls


def layers_and_inputs():
    x = torch.randn(3, 4, 16)
    return [
        (SKLinear(16, 8, 1, 2, seed=0), (x,), "sketched_linear"),
        (SKConv2d(3, 4, 3, num_terms=1, low_rank=2, seed=0), (torch.randn(2, 3, 6, 6),), "sketched_conv2d"),
        (RandMultiHeadAttention(16, 2, 8, seed=0), (x, x, x), "rfa_attention"),
    ]


def test_every_forward_dispatches_through_the_registry(spy):
    for layer, inputs, op in layers_and_inputs():
        spy.clear()
        layer(*inputs)
        assert [called for _, called in spy] == [op]


def test_use_backend_applies_to_existing_layers(spy):
    for layer, inputs, op in layers_and_inputs():  # built before the selection
        with pytest.raises(pr.BackendError, match="'nope'"):
            with pr.use_backend("nope"):
                layer(*inputs)
        spy.clear()
        with pr.use_backend("torch"):
            layer(*inputs)
        assert spy == [("torch", op)]


def test_set_backend_applies_to_existing_layers(spy, restore_default):
    layer = SKLinear(16, 8, 1, 2, seed=0)
    with pytest.raises(pr.BackendError, match="'nope'"):
        pr.set_backend("nope")
    pr.set_backend("torch")
    assert pr.get_backend() == "torch"
    layer(torch.randn(2, 16))
    assert spy == [("torch", "sketched_linear")]


def test_environment_variable_applies_to_existing_layers(monkeypatch, restore_default):
    monkeypatch.setattr(registry, "_default", None)
    layers = layers_and_inputs()
    monkeypatch.setenv("PANTHER_BACKEND", "nope")
    for layer, inputs, _ in layers:
        with pytest.raises(pr.BackendError, match=r"'nope'.*PANTHER_BACKEND"):
            layer(*inputs)
    monkeypatch.setenv("PANTHER_BACKEND", "torch")
    for layer, inputs, _ in layers:
        layer(*inputs)


def test_construction_discovers_backends(monkeypatch):
    """The constructor runs discovery (lazy, first use) so that a compiled forward never has to."""
    monkeypatch.setattr(registry, "_registry", None)  # as before first use; restored afterwards
    SKLinear(8, 4, 1, 1, seed=0)
    assert registry._registry is not None and "torch" in registry._registry


def small_model():
    return torch.nn.Sequential(
        SKLinear(24, 19, 1, 3, seed=0), torch.nn.GELU(), SKLinear(19, 7, 2, 2, bias=False, seed=1)
    )


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    model = small_model()
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    x = torch.randn(5, 24)
    if backend == "inductor":  # inference only: keeps the C++ compile short
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)
        return
    y_ref = model(x)
    y_ref.sum().backward()
    grads_ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    y = compiled(x)
    y.sum().backward()
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    for g, g_ref in zip((p.grad for p in model.parameters()), grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-6)
    # a 3-D input recompiles and still matches
    x3 = torch.randn(2, 3, 24)
    torch.testing.assert_close(compiled(x3), model(x3), rtol=1e-5, atol=1e-6)


def test_torch_compile_fullgraph_conv_matches_eager():
    torch._dynamo.reset()
    layer = SKConv2d(3, 5, 3, padding="same", num_terms=1, low_rank=2, seed=0)
    x = torch.randn(2, 3, 7, 6, requires_grad=True)
    y_ref = layer(x)
    (gx_ref,) = torch.autograd.grad(y_ref.sum(), x)
    y = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
    (gx,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(gx, gx_ref)


def test_torch_compile_fullgraph_attention_inference():
    torch._dynamo.reset()
    attn = RandMultiHeadAttention(16, 2, 8, seed=0).eval()
    compiled = torch.compile(attn, fullgraph=True, backend="aot_eager")
    x = torch.randn(5, 2, 16)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, x, x)[0], attn(x, x, x)[0])
        torch.testing.assert_close(compiled(x, x, x, is_causal=True)[0], attn(x, x, x, is_causal=True)[0])


def test_torch_compile_fullgraph_attention_training():
    torch._dynamo.reset()
    attn = RandMultiHeadAttention(16, 2, 8, seed=0).eval()  # eval: no dropout, so both runs are equal
    x = torch.randn(5, 2, 16, requires_grad=True)
    y_ref = attn(x, x, x, is_causal=True)[0]
    (gx_ref,) = torch.autograd.grad(y_ref.sum(), x)
    y = torch.compile(attn, fullgraph=True, backend="aot_eager")(x, x, x, is_causal=True)[0]
    (gx,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(gx, gx_ref)


def test_torch_compile_attention_training_with_graph_breaks_matches_eager():
    torch._dynamo.reset()
    attn = RandMultiHeadAttention(16, 2, 8, seed=0).eval()  # eval: no dropout, so both runs are equal
    x = torch.randn(5, 2, 16, requires_grad=True)
    y_ref = attn(x, x, x)[0]
    (gx_ref,) = torch.autograd.grad(y_ref.sum(), x)
    y = torch.compile(attn, backend="aot_eager")(x, x, x)[0]
    (gx,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(gx, gx_ref)
