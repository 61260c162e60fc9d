"""SKLinear: construction, initialisation, conversion, serialisation, randomness.

SKLinear_triton is tested in test_linear_triton.py.
"""

import copy
import math
import warnings

import pytest
import torch

from panther.nn import SKLinear

# Small test layers save no memory; the warning itself is tested in test_parameter_count_warning.
pytestmark = pytest.mark.filterwarnings("ignore:.*not fewer than the:UserWarning")


def effective_weight(layer):
    """W_effᵀ (in, out) = 1/(2L) Σ_i S1_i U1_i + U2_i S2_i, in float64."""
    S1, S2, U1, U2 = (t.detach().double() for t in (layer.S1s, layer.S2s, layer.U1s, layer.U2s))
    return (S1 @ U1 + U2 @ S2).sum(0) / (2 * layer.num_terms)


def test_shapes_names_and_repr():
    layer = SKLinear(37, 21, num_terms=3, low_rank=2, seed=0)
    assert [n for n, _ in layer.named_parameters()] == ["S1s", "S2s", "bias"]
    assert [n for n, _ in layer.named_buffers()] == ["U1s", "U2s"]
    assert layer.S1s.shape == (3, 37, 2) and layer.S2s.shape == (3, 2, 21)
    assert layer.U1s.shape == (3, 2, 21) and layer.U2s.shape == (3, 37, 2)
    assert layer.bias.shape == (21,)
    assert repr(layer) == "SKLinear(in_features=37, out_features=21, num_terms=3, low_rank=2, bias=True)"
    assert set(SKLinear.__constants__) >= {"in_features", "out_features", "num_terms", "low_rank"}
    for n, buf in layer.named_buffers():
        assert torch.equal(buf.abs(), torch.full_like(buf, 1 / math.sqrt(2))), n  # ±1/sqrt(k)
    assert layer.seed == 0


def test_no_bias():
    layer = SKLinear(10, 6, 1, 2, bias=False, seed=0)
    assert layer.bias is None
    assert [n for n, _ in layer.named_parameters()] == ["S1s", "S2s"]
    assert "bias=False" in repr(layer)
    x = torch.randn(4, 10)
    torch.testing.assert_close(layer(x), x @ effective_weight(layer).float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(13,), (1, 13), (4, 13), (2, 3, 13), (2, 1, 3, 13), (0, 13)])
def test_any_leading_shape(shape):
    layer = SKLinear(13, 5, 1, 2, seed=1)
    x = torch.randn(shape)
    y = layer(x)
    assert y.shape == (*shape[:-1], 5)
    expected = x.double() @ effective_weight(layer) + layer.bias.double()
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)


def test_init_matches_design_from_w_init():
    W0 = torch.randn(9, 14, dtype=torch.float64)
    layer = SKLinear(14, 9, 2, 3, W_init=W0, dtype=torch.float64, seed=3)
    W = W0.t()
    for i in range(2):
        torch.testing.assert_close(layer.S1s[i], W @ layer.U1s[i].t())  # S1_i = W U1_iᵀ
        torch.testing.assert_close(layer.S2s[i], layer.U2s[i].t() @ W)  # S2_i = U2_iᵀ W
    assert torch.equal(layer.bias, torch.zeros(9, dtype=torch.float64))  # W_init: bias starts at zero


def test_default_init_is_linear_like():
    """The dense weight it starts from is U(±1/sqrt(in)) like nn.Linear: check via the bias and via S1 = W U1ᵀ."""
    layer = SKLinear(400, 30, 1, 4, seed=0)
    bound = 1 / math.sqrt(400)
    assert layer.bias.abs().max() <= bound and layer.bias.abs().max() > 0.8 * bound
    # S1ᵀ = U1 Wᵀ determines W when U1 (k, out) has full column rank: take k > out.
    full = SKLinear(40, 8, 1, 16, seed=0)
    W = torch.linalg.lstsq(full.U1s[0].double(), full.S1s[0].detach().t().double()).solution.t()
    assert W.abs().max() <= 1 / math.sqrt(40) + 1e-6
    assert W.std().item() == pytest.approx(1 / math.sqrt(40) / math.sqrt(3), rel=0.2)  # std of U(±b) is b/sqrt(3)


def test_seed_generator_and_global_rng():
    a, b = SKLinear(20, 10, 2, 3, seed=5), SKLinear(20, 10, 2, 3, seed=5)
    for (n, t), (_, u) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(t, u), n
    c = SKLinear(20, 10, 2, 3, seed=6)
    assert not torch.equal(a.U1s, c.U1s)
    # A generator is used and advanced in place; it gives the same draws as the same seed.
    g = torch.Generator().manual_seed(5)
    d = SKLinear(20, 10, 2, 3, generator=g)
    assert d.seed is None and torch.equal(d.S1s, a.S1s)
    e = SKLinear(20, 10, 2, 3, generator=g)
    assert not torch.equal(e.U1s, d.U1s)
    # The global RNG is read (to seed the layer) but never reseeded: torch.manual_seed makes it reproducible.
    torch.manual_seed(123)
    f1 = SKLinear(20, 10, 2, 3)
    after = torch.rand(3)
    torch.manual_seed(123)
    f2 = SKLinear(20, 10, 2, 3)
    assert torch.equal(f1.S1s, f2.S1s) and torch.equal(torch.rand(3), after)
    # a seeded layer leaves the global RNG alone
    state = torch.get_rng_state()
    SKLinear(20, 10, 2, 3, seed=1)
    assert torch.equal(torch.get_rng_state(), state)


def test_reset_parameters_redraws_and_accepts_w_init():
    layer = SKLinear(16, 12, 2, 2, seed=0)
    before = copy.deepcopy(layer.state_dict())
    layer.reset_parameters()
    for n in ("S1s", "S2s", "U1s", "U2s", "bias"):
        assert not torch.equal(before[n], layer.state_dict()[n]), n
    W0 = torch.randn(12, 16)
    layer.reset_parameters(W0)
    torch.testing.assert_close(layer.S1s[1], W0.t() @ layer.U1s[1].t())
    assert torch.equal(layer.bias, torch.zeros(12))
    with pytest.raises(ValueError, match=r"W_init must have shape \(12, 16\)"):
        layer.reset_parameters(torch.randn(16, 12))


def test_from_linear_keeps_bias_dtype_device():
    lin = torch.nn.Linear(30, 20, dtype=torch.float64)
    layer = SKLinear.from_linear(lin, num_terms=2, low_rank=3, init="unbiased", seed=0)
    assert isinstance(layer, SKLinear)
    assert layer.S1s.dtype == torch.float64 and layer.U1s.dtype == torch.float64
    assert layer.S1s.device == lin.weight.device
    assert torch.equal(layer.bias, lin.bias.detach()) and layer.bias is not lin.bias
    torch.testing.assert_close(layer.S1s[0], lin.weight.detach().t() @ layer.U1s[0].t())
    no_bias = SKLinear.from_linear(torch.nn.Linear(30, 20, bias=False), 2, 3, seed=0)
    assert no_bias.bias is None
    # the generator keyword is honoured
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    a, b = SKLinear.from_linear(lin, 2, 3, generator=g1), SKLinear.from_linear(lin, 2, 3, generator=g2)
    assert torch.equal(a.U2s, b.U2s)


def test_state_dict_round_trip_weights_only(tmp_path):
    layer = SKLinear(23, 11, 2, 3, seed=0)
    with torch.no_grad():
        layer.S1s.add_(0.1)  # "trained"
    path = tmp_path / "sk.pt"
    torch.save(layer.state_dict(), path)
    state = torch.load(path, weights_only=True)
    assert set(state) == {"S1s", "S2s", "U1s", "U2s", "bias"}
    fresh = SKLinear(23, 11, 2, 3, seed=1)
    assert not torch.equal(fresh.U1s, layer.U1s)
    fresh.load_state_dict(state)
    x = torch.randn(5, 23)
    assert torch.equal(fresh(x), layer(x))


def test_whole_module_pickles_and_deepcopies(tmp_path):
    layer = SKLinear(12, 8, 1, 2, seed=0)
    clone = copy.deepcopy(layer)
    x = torch.randn(3, 12)
    assert torch.equal(clone(x), layer(x))
    torch.save(layer, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    assert torch.equal(loaded(x), layer(x))


def test_dtype_and_to():
    layer = SKLinear(12, 8, 1, 2, dtype=torch.float64, seed=0)
    assert all(t.dtype == torch.float64 for t in layer.state_dict().values())
    assert layer(torch.randn(2, 12, dtype=torch.float64)).dtype == torch.float64
    layer.float()
    assert layer(torch.randn(2, 12)).dtype == torch.float32
    bf = SKLinear(12, 8, 1, 2, dtype=torch.bfloat16, seed=0)
    assert bf(torch.randn(2, 12, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_meta_device_then_materialise():
    layer = SKLinear(12, 8, 1, 2, device="meta", seed=0)
    assert layer.S1s.is_meta and layer.U1s.is_meta
    assert layer(torch.empty(3, 12, device="meta")).shape == (3, 8)
    # the usual deferred-init pattern gives the layer a real build would
    layer.to_empty(device="cpu")
    layer.reset_parameters()
    real = SKLinear(12, 8, 1, 2, seed=0)
    for name, t in real.state_dict().items():
        assert torch.equal(layer.state_dict()[name], t), name


def test_gradients_flow_to_s_and_bias_only():
    layer = SKLinear(12, 8, 2, 2, seed=0)
    layer(torch.randn(4, 12)).sum().backward()
    assert layer.S1s.grad is not None and layer.S2s.grad is not None and layer.bias.grad is not None
    assert not layer.U1s.requires_grad and not layer.U2s.requires_grad


def test_parameter_count_warning():
    # the API page's rule: 2 * num_terms * low_rank * (in + out) < in * out
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SKLinear(100, 100, num_terms=2, low_rank=12, seed=0)  # 2*2*12*200 = 9600 < 10000
    with pytest.warns(UserWarning, match=r"num_terms=2 and low_rank=13.*10,400.*10,000") as rec:
        SKLinear(100, 100, num_terms=2, low_rank=13, seed=0)  # 10400 >= 10000
    assert rec[0].filename == __file__  # points at the caller


def test_params_plus_buffers_count():
    layer = SKLinear(100, 60, 2, 5, bias=False, seed=0)
    n_params = sum(p.numel() for p in layer.parameters())
    n_buffers = sum(b.numel() for b in layer.buffers())
    assert n_params == n_buffers == 2 * 5 * (100 + 60)


@pytest.mark.parametrize("cls", ["SKLinear", "SKLinear_triton", "SKConv2d"])
def test_device_then_dtype_as_in_torch_nn(cls):
    """The factory arguments close the positional ones in torch.nn's order: ``..., device=None, dtype=None``."""
    import inspect

    import panther.nn

    def positional(f):
        ps = inspect.signature(f).parameters.values()
        return [p.name for p in ps if p.kind == p.POSITIONAL_OR_KEYWORD]

    assert positional(torch.nn.Linear.__init__)[-2:] == ["device", "dtype"]
    assert positional(getattr(panther.nn, cls).__init__)[-2:] == ["device", "dtype"]


def test_device_and_dtype_positionally():
    with pytest.warns(UserWarning, match="not fewer than"):
        m = SKLinear(4, 3, 1, 2, None, True, "cpu", torch.float64, seed=0)
    assert m.S1s.dtype == torch.float64 and m.U2s.device.type == "cpu"


@pytest.mark.parametrize("num_terms", [1, 3])
def test_gradients_have_the_parameters_strides(num_terms):
    # DDP's gradient buckets are views with the parameters' strides; a gradient laid out otherwise makes it
    # warn and copy (with L = 1 a permuted view counts as contiguous but keeps other strides)
    layer = SKLinear(64, 48, num_terms=num_terms, low_rank=8, seed=0)
    layer(torch.randn(5, 64)).sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad.stride() == p.stride(), name


@pytest.mark.parametrize("shape", [(5, 64), (2, 3, 64), (64,)], ids=["2d", "3d", "1d"])
def test_output_can_be_modified_in_place(shape):
    # as nn.Linear's: an in-place activation or residual add right after the layer trains
    layer = SKLinear(64, 48, num_terms=2, low_rank=8, seed=0)
    x = torch.randn(*shape)
    y = layer(x)
    torch.nn.functional.relu(y.add_(1.0), inplace=True)
    y.sum().backward()
    ref = SKLinear(64, 48, num_terms=2, low_rank=8, seed=0)
    torch.relu(ref(x) + 1.0).sum().backward()
    torch.testing.assert_close(layer.S1s.grad, ref.S1s.grad)
