"""SKConv2d: construction, padding rules, initialisation, conversion and serialisation."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from panther.nn import SKConv2d

pytestmark = pytest.mark.filterwarnings("ignore:.*not fewer than the:UserWarning")


def dense_equivalent(layer):
    """The (O, C, kh, kw) filters the layer applies: 1/(2L) Σ_i U1_iᵀ S1_i, in float64."""
    S1, U1 = layer.S1s.detach().double(), layer.U1s.detach().double()
    return torch.einsum("tko,tkchw->ochw", U1, S1) / S1.shape[0]


def test_shapes_names_and_repr():
    layer = SKConv2d(5, 7, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), num_terms=2, low_rank=3, seed=0)
    assert [n for n, _ in layer.named_parameters()] == ["S1s", "bias"]
    assert [n for n, _ in layer.named_buffers()] == ["U1s"]
    assert layer.S1s.shape == (4, 3, 5, 3, 2) and layer.U1s.shape == (4, 3, 7) and layer.bias.shape == (7,)
    assert torch.equal(layer.U1s.abs(), torch.full_like(layer.U1s, 1 / math.sqrt(3)))
    assert repr(layer) == (
        "SKConv2d(5, 7, kernel_size=(3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), num_terms=2, low_rank=3)"
    )
    assert (layer.kernel_size, layer.stride, layer.padding, layer.dilation) == ((3, 2), (2, 1), (1, 0), (1, 2))
    no_bias = SKConv2d(5, 7, 3, bias=False, padding="same", seed=0)
    assert no_bias.bias is None and repr(no_bias).endswith("padding='same', num_terms=1, low_rank=8, bias=False)")


@pytest.mark.parametrize(
    "kernel_size,stride,padding,dilation",
    [
        (3, 1, 0, 1),
        (3, 1, 1, 1),
        ((3, 2), (2, 1), (1, 0), 1),
        (3, 2, 1, (2, 1)),
        (2, 1, "same", 1),  # even kernel: uneven 'same' padding
        ((4, 3), 1, "same", (1, 2)),
        (3, 1, "valid", 1),
        (1, 3, 0, 1),
    ],
)
def test_shapes_and_values_match_conv2d_with_the_equivalent_filters(kernel_size, stride, padding, dilation):
    layer = SKConv2d(3, 5, kernel_size, stride, padding, dilation, num_terms=2, low_rank=2, seed=0)
    for x in (torch.randn(2, 3, 11, 9), torch.randn(3, 10, 7)):
        y = layer(x)
        ref = F.conv2d(x.double(), dense_equivalent(layer), layer.bias.double(), stride, padding, dilation)
        assert y.shape == ref.shape
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


def test_init_from_w_init():
    W0 = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    layer = SKConv2d(4, 6, 3, num_terms=1, low_rank=5, dtype=torch.float64, seed=2, W_init=W0)
    for i in range(2):
        expected = (layer.U1s[i] @ W0.reshape(6, -1)).reshape(5, 4, 3, 3)  # S1_i = U1_i W0
        torch.testing.assert_close(layer.S1s[i], expected)
    assert torch.equal(layer.bias, torch.zeros(6, dtype=torch.float64))


def test_default_init_is_conv_like():
    layer = SKConv2d(8, 4, 3, seed=0)
    bound = 1 / math.sqrt(8 * 9)
    assert 0 < layer.bias.abs().max() <= bound


def test_from_conv2d():
    conv = torch.nn.Conv2d(4, 6, (3, 2), stride=(1, 2), padding=(1, 1), dilation=(2, 1), dtype=torch.float64)
    layer = SKConv2d.from_conv2d(conv, num_terms=2, low_rank=3, init="unbiased", seed=0)
    assert (layer.kernel_size, layer.stride, layer.padding, layer.dilation) == (
        conv.kernel_size, conv.stride, conv.padding, conv.dilation,
    )
    assert layer.S1s.dtype == torch.float64 and torch.equal(layer.bias, conv.bias.detach())
    expected = (layer.U1s[3] @ conv.weight.detach().reshape(6, -1)).reshape(3, 4, 3, 2)
    torch.testing.assert_close(layer.S1s[3], expected)
    same = SKConv2d.from_conv2d(torch.nn.Conv2d(4, 6, 3, padding="same", bias=False), 1, 2, seed=0)
    assert same.padding == "same" and same.bias is None
    x = torch.randn(1, 4, 5, 5)
    assert same(x).shape == (1, 6, 5, 5)


def test_reset_parameters_redraws():
    layer = SKConv2d(3, 4, 3, num_terms=1, low_rank=2, seed=0)
    before = copy.deepcopy(layer.state_dict())
    layer.reset_parameters()
    for n in ("S1s", "U1s", "bias"):
        assert not torch.equal(before[n], layer.state_dict()[n]), n


def test_state_dict_round_trip_weights_only(tmp_path):
    layer = SKConv2d(3, 4, 3, padding=1, num_terms=1, low_rank=2, seed=0)
    torch.save(layer.state_dict(), tmp_path / "c.pt")
    fresh = SKConv2d(3, 4, 3, padding=1, num_terms=1, low_rank=2, seed=1)
    fresh.load_state_dict(torch.load(tmp_path / "c.pt", weights_only=True))
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(fresh(x), layer(x))


def test_seed_reproducible_and_generator():
    a, b = SKConv2d(3, 4, 3, seed=4), SKConv2d(3, 4, 3, seed=4)
    assert torch.equal(a.S1s, b.S1s) and torch.equal(a.U1s, b.U1s)
    g = torch.Generator().manual_seed(4)
    c = SKConv2d(3, 4, 3, generator=g)
    assert torch.equal(c.S1s, a.S1s) and c.seed is None


def test_parameter_count_warning():
    # dense: O*C*kh*kw = 64*32*9 = 18432; sketched: 2*L*k*(C*kh*kw + O) = 2*1*k*352
    with pytest.warns(UserWarning, match=r"SKConv2d with num_terms=1 and low_rank=27"):
        SKConv2d(32, 64, 3, num_terms=1, low_rank=27, seed=0)


@pytest.mark.filterwarnings("error")
def test_no_warning_when_it_saves():
    SKConv2d(32, 64, 3, num_terms=1, low_rank=26, seed=0)  # 2*1*26*352 = 18304 < 18432


def test_gradients():
    layer = SKConv2d(3, 4, 3, padding=1, num_terms=1, low_rank=2, seed=0)
    layer(torch.randn(2, 3, 5, 5)).sum().backward()
    assert layer.S1s.grad is not None and layer.bias.grad is not None and not layer.U1s.requires_grad


def test_meta_device_then_materialise():
    layer = SKConv2d(3, 4, 3, num_terms=1, low_rank=2, device="meta", seed=0)
    assert layer(torch.empty(1, 3, 5, 5, device="meta")).shape == (1, 4, 3, 3)
    layer.to_empty(device="cpu")
    layer.reset_parameters()
    real = SKConv2d(3, 4, 3, num_terms=1, low_rank=2, seed=0)
    for name, t in real.state_dict().items():
        assert torch.equal(layer.state_dict()[name], t), name
