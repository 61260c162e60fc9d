"""SKLinear_triton: refused where the triton backend cannot run, pinned to it where it can, equal to SKLinear.

Run by tox's ``triton`` env under TRITON_INTERPRET=1 (Triton's CPU interpreter), and by the ``gpu`` env on
CUDA. Without the triton backend, only the error paths run here.
"""

import os

import pytest
import torch

import panther as pr
from panther.backends import registry
from panther.nn import SKLinear, SKLinear_triton

pytestmark = pytest.mark.filterwarnings("ignore:.*not fewer than the:UserWarning")

TRITON_AVAILABLE = "triton" in pr.available_backends()
INTERPRETER = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on", "y")

needs_triton_here = pytest.mark.skipif(
    not (TRITON_AVAILABLE and INTERPRETER), reason="needs the triton backend under TRITON_INTERPRET=1"
)
DEVICES = [
    pytest.param("cpu", marks=needs_triton_here, id="interpreter"),
    pytest.param("cuda", marks=pytest.mark.gpu, id="cuda"),
]


def assert_close_scaled(actual, expected, rel):
    """Elementwise |a - e| <= rel * max|e|: float32 GEMMs may run in TF32 on GPUs."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=rel * expected.abs().max().item())


@pytest.fixture
def triton_cannot_run(monkeypatch):
    """Without TRITON_INTERPRET and without CUDA, the triton backend (installed or not) cannot run."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if "triton" in pr.available_backends():
        pytest.skip("the triton backend can run on this machine (a CUDA GPU)")


def test_construction_is_refused_without_triton(triton_cannot_run):
    with pytest.raises(pr.BackendError, match=r"'triton' \(required by SKLinear_triton\)"):
        SKLinear_triton(64, 32, 2, 8, seed=0)
    with pytest.raises(pr.BackendError, match="triton"):
        SKLinear_triton.from_linear(torch.nn.Linear(64, 32), 2, 8, seed=0)


def test_forward_never_falls_back(triton_cannot_run, monkeypatch):
    """Even if construction is let through, the forward asks for triton by name and refuses to run elsewhere."""
    import panther.backends as backends

    monkeypatch.setattr(backends, "load_backend", lambda name, **kw: None)
    layer = SKLinear_triton(64, 32, 2, 8, seed=0)
    assert isinstance(layer, SKLinear)
    with pytest.raises(pr.BackendError, match=r"'triton' \(requested by this layer\)"):
        layer(torch.randn(4, 64))


@needs_triton_here
def test_forward_is_pinned_to_triton_whatever_the_selection(monkeypatch):
    calls = []
    for info in registry.backend_infos():
        if info.backend is not None and info.backend.implements("sketched_linear"):
            real = info.backend.sketched_linear

            def spy(*args, _name=info.name, _real=real):
                calls.append(_name)
                return _real(*args)

            monkeypatch.setattr(info.backend, "sketched_linear", spy)
    layer = SKLinear_triton(24, 20, 1, 4, seed=0)
    x = torch.randn(3, 24)
    layer(x)
    with pr.use_backend("torch"):
        layer(x)
        SKLinear(24, 20, 1, 4, seed=0)(x)
    assert calls == ["triton", "triton", "torch"]
    # where triton cannot take the inputs it raises, it does not fall back
    with pytest.raises(pr.BackendError, match=r"'triton' \(requested by this layer\).*float64"):
        layer.double()(x.double())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "I,O,L,k,shape,bias",
    [(96, 80, 2, 16, (3, 37, 96), True), (37, 29, 3, 5, (1, 37), False), (50, 64, 1, 8, (50,), True)],
)
def test_matches_sklinear_on_the_same_weights(device, I, O, L, k, shape, bias):
    ref = SKLinear(I, O, L, k, bias=bias, seed=0, device=device)
    tri = SKLinear_triton(I, O, L, k, bias=bias, seed=1, device=device)
    tri.load_state_dict(ref.state_dict())
    x = torch.randn(shape, device=device, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    with pr.use_backend("torch"):
        y_ref = ref(x)
    y_tri = tri(x2)
    assert y_tri.shape == (*shape[:-1], O)
    assert_close_scaled(y_tri, y_ref, 5e-3)
    g = torch.randn_like(y_ref)
    with pr.use_backend("torch"):
        y_ref.backward(g)
    y_tri.backward(g)
    assert_close_scaled(x2.grad, x.grad, 5e-3)
    for name in ("S1s", "S2s", "bias") if bias else ("S1s", "S2s"):
        assert_close_scaled(getattr(tri, name).grad, getattr(ref, name).grad, 5e-3)


@pytest.mark.parametrize("device", DEVICES)
def test_from_linear_keeps_the_class(device):
    lin = torch.nn.Linear(40, 24, device=device)
    tri = SKLinear_triton.from_linear(lin, 1, 4, seed=0)
    assert type(tri) is SKLinear_triton and torch.equal(tri.bias, lin.bias.detach())
    ref = SKLinear.from_linear(lin, 1, 4, seed=0)
    x = torch.randn(5, 40, device=device)
    assert_close_scaled(tri(x), ref(x), 5e-3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(3, 5, 24), (4, 24)], ids=["3d", "2d"])
def test_output_can_be_modified_in_place(device, shape):
    # as nn.Linear's: the kernels' output is no view, so an in-place op after the layer trains
    layer = SKLinear_triton(24, 20, 1, 4, seed=0, device=device)
    x = torch.randn(shape, device=device)
    y = layer(x)
    assert y._base is None
    torch.nn.functional.relu(y.add_(1.0), inplace=True).sum().backward()
    assert layer.S1s.grad is not None and torch.isfinite(layer.S1s.grad).all()
