"""Conversion of trained layers and models: optimal and calibrated inits, panther.nn.convert, to_dense."""

import copy
import io
import re

import pytest
import torch
from torch import nn

from panther.nn import ConversionReport, RandMultiHeadAttention, SKConv2d, SKLinear, convert, to_dense

F64 = torch.float64
pytestmark = pytest.mark.filterwarnings("ignore:.*not fewer than the:UserWarning")


def effective(layer):
    """W_eff (I, O) = 1/(2L) Σ_i (S1_i U1_i + U2_i S2_i), differentiable in the layer's parameters."""
    terms = torch.einsum("lik,lko->io", layer.S1s, layer.U1s) + torch.einsum("lik,lko->io", layer.U2s, layer.S2s)
    return terms / (2 * layer.num_terms)


def linear_weight_error_objective(layer, W):
    """‖W - W_eff‖² as a function of the layer's parameters (W (O, I), nn.Linear's layout)."""
    return ((W.t() - effective(layer)) ** 2).sum()


def independent_optimum(layer, W):
    """‖(1 - Q) W (1 - P)‖ / ‖W‖ with P, Q from the pseudo-inverses of the stacked sketches."""
    L, k, O = layer.U1s.shape
    I = layer.in_features
    U1 = layer.U1s.detach().to(F64).reshape(L * k, O)
    U2 = layer.U2s.detach().to(F64).permute(1, 0, 2).reshape(I, L * k)
    P = torch.linalg.pinv(U1) @ U1
    Q = U2 @ torch.linalg.pinv(U2)
    Wt = W.t().to(F64)
    return ((torch.eye(I, dtype=F64) - Q) @ Wt @ (torch.eye(O, dtype=F64) - P)).norm() / Wt.norm()


def relative_weight_error(layer, W):
    return (layer.to_dense().weight.detach().to(F64) - W.to(F64)).norm() / W.to(F64).norm()


# ---------------------------------------------------------------- optimal init


@pytest.mark.parametrize("L, k", [(1, 16), (4, 16), (1, 64)])
def test_optimal_init_reaches_the_optimum_on_random_weights(L, k):
    torch.manual_seed(0)
    lin = nn.Linear(256, 256)
    nn.init.normal_(lin.weight)
    optimal = SKLinear.from_linear(lin, L, k, seed=1)
    unbiased = SKLinear.from_linear(lin, L, k, init="unbiased", seed=1)
    best = independent_optimum(optimal, lin.weight.detach())
    err = relative_weight_error(optimal, lin.weight.detach())
    assert err <= 1.02 * best, (err, best)
    assert relative_weight_error(unbiased, lin.weight.detach()) > 1.3 * best
    assert 0.5 < best < 1.0  # the sketches reach only part of a random weight


@pytest.mark.parametrize("I, O, L, k", [(37, 23, 2, 3), (23, 37, 1, 5), (12, 7, 3, 4), (5, 40, 2, 2)])
def test_optimal_init_is_a_stationary_point_that_no_perturbation_improves(I, O, L, k):
    torch.manual_seed(I * O)
    lin = nn.Linear(I, O, dtype=F64)
    layer = SKLinear.from_linear(lin, L, k, seed=0)
    W = lin.weight.detach()
    objective = linear_weight_error_objective(layer, W)
    g1, g2 = torch.autograd.grad(objective, [layer.S1s, layer.S2s])
    scale = W.norm() ** 2 / max(layer.S1s.norm(), layer.S2s.norm())
    assert g1.norm() < 1e-10 * scale and g2.norm() < 1e-10 * scale
    best = objective.item()
    assert best == pytest.approx(independent_optimum(layer, W).item() ** 2 * W.norm().item() ** 2, rel=1e-9)
    with torch.no_grad():
        S1, S2 = layer.S1s.clone(), layer.S2s.clone()
        for size in (1e-3, 1e-1, 1.0):
            for _ in range(5):
                layer.S1s.copy_(S1 + size * torch.randn_like(S1))
                layer.S2s.copy_(S2 + size * torch.randn_like(S2))
                assert linear_weight_error_objective(layer, W).item() >= best * (1 - 1e-12)
    # the unbiased init is not stationary: the test can tell the two apart
    unbiased = SKLinear.from_linear(lin, L, k, init="unbiased", seed=0)
    g = torch.autograd.grad(linear_weight_error_objective(unbiased, W), [unbiased.S1s])[0]
    assert g.norm() > 1e-3 * scale


def test_optimal_init_is_exact_when_the_sketches_span_the_weight():
    lin = nn.Linear(6, 5, dtype=F64)
    layer = SKLinear.from_linear(lin, 2, 4, seed=0)  # 2Lk = 8 > 5: U1's rows span every output
    assert relative_weight_error(layer, lin.weight.detach()) < 1e-12


def test_optimal_init_is_the_minimum_norm_solution():
    """Among the factors reaching the optimum, the init has the least norm: it is orthogonal to the moves
    (A + U2 C, B - C U1) that keep the effective weight."""
    torch.manual_seed(3)
    lin = nn.Linear(20, 16, dtype=F64)
    layer = SKLinear.from_linear(lin, 2, 3, seed=0)
    L, k = 2, 3
    A = layer.S1s.detach().permute(1, 0, 2).reshape(20, L * k)
    B = layer.S2s.detach().reshape(L * k, 16)
    U1 = layer.U1s.reshape(L * k, 16)
    U2 = layer.U2s.permute(1, 0, 2).reshape(20, L * k)
    for _ in range(5):
        C = torch.randn(L * k, L * k, dtype=F64)
        assert ((A * (U2 @ C)).sum() - (B * (C @ U1)).sum()).abs() < 1e-9 * A.norm() * B.norm()


def test_optimal_init_keeps_dtype_device_bias_and_float32_accuracy():
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    layer = SKLinear.from_linear(lin, 1, 8, seed=0)
    assert layer.S1s.dtype == torch.float32 and torch.equal(layer.bias, lin.bias.detach())
    ref = SKLinear.from_linear(lin.double(), 1, 8, seed=0)
    torch.testing.assert_close(layer.S1s.double(), ref.S1s, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.S2s.double(), ref.S2s, rtol=1e-4, atol=1e-5)


def conv_objective(layer, W0):
    W_eff = torch.einsum("tko,tkchw->ochw", layer.U1s, layer.S1s) / layer.S1s.shape[0]
    return ((W0 - W_eff) ** 2).sum()


@pytest.mark.parametrize("O, C, kernel, L, k", [(12, 3, (3, 2), 1, 2), (7, 5, (1, 1), 2, 1), (4, 2, (3, 3), 1, 3)])
def test_conv_optimal_init_is_the_projection_on_the_sketches(O, C, kernel, L, k):
    torch.manual_seed(O)
    conv = nn.Conv2d(C, O, kernel, dtype=F64)
    layer = SKConv2d.from_conv2d(conv, L, k, seed=0)
    W0 = conv.weight.detach()
    objective = conv_objective(layer, W0)
    (g,) = torch.autograd.grad(objective, [layer.S1s])
    assert g.norm() < 1e-10 * W0.norm() ** 2 / layer.S1s.norm()
    U1 = layer.U1s.reshape(-1, O)
    P = torch.linalg.pinv(U1) @ U1  # projector on U1's row space (output channels)
    best = ((torch.eye(O, dtype=F64) - P) @ W0.reshape(O, -1)).norm() ** 2
    assert objective.item() == pytest.approx(best.item(), rel=1e-9, abs=1e-20)
    unbiased = SKConv2d.from_conv2d(conv, L, k, init="unbiased", seed=0)
    assert conv_objective(unbiased, W0).item() > objective.item() * 1.01 + 1e-12


# ---------------------------------------------------------------- calibration


def correlated_inputs(n, I, seed):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(I, I, generator=g, dtype=F64) * torch.logspace(0, -2, I, dtype=F64)
    return torch.randn(n, I, generator=g, dtype=F64) @ mix + 0.5


def test_calibration_beats_the_weight_optimum_on_the_calibration_data():
    torch.manual_seed(0)
    lin = nn.Linear(48, 32, dtype=F64)
    x = correlated_inputs(2000, 48, 1)
    optimal = SKLinear.from_linear(lin, 1, 6, seed=0)
    calibrated = SKLinear.from_linear(lin, 1, 6, calibration_data=x.split(300), seed=0)
    assert torch.equal(calibrated.U1s, optimal.U1s)
    with torch.no_grad():
        target = lin(x)
        err = lambda m: ((m(x) - target).norm() / target.norm()).item()  # noqa: E731
        assert err(calibrated) < 0.8 * err(optimal), (err(calibrated), err(optimal))
        # the bias absorbs the mean output error
        assert (calibrated(x) - target).mean(0).abs().max() < 1e-8 * target.abs().max()
    # stationary point of the damped, centred objective the docstring states
    xc = x - x.mean(0)
    G = xc.t() @ xc / len(x)
    G = G + 1e-2 * G.diagonal().mean() * torch.eye(48, dtype=F64)
    R = torch.linalg.cholesky(G, upper=True)
    W = lin.weight.detach()
    objective = ((R @ (W.t() - effective(calibrated))) ** 2).sum()
    g1, g2 = torch.autograd.grad(objective, [calibrated.S1s, calibrated.S2s])
    assert max(g1.norm(), g2.norm()) < 1e-9 * objective.item()


def test_calibration_without_bias_fits_uncentred_inputs():
    lin = nn.Linear(30, 20, bias=False, dtype=F64)
    x = correlated_inputs(500, 30, 2)
    calibrated = SKLinear.from_linear(lin, 1, 4, calibration_data=x, seed=0)
    optimal = SKLinear.from_linear(lin, 1, 4, seed=0)
    with torch.no_grad():
        err = lambda m: (m(x) - lin(x)).norm().item()  # noqa: E731
        assert calibrated.bias is None and err(calibrated) < err(optimal)


def test_calibration_on_zero_inputs_falls_back_to_the_weight_fit():
    lin = nn.Linear(24, 16, dtype=F64)
    calibrated = SKLinear.from_linear(lin, 1, 3, calibration_data=torch.zeros(50, 24, dtype=F64), seed=0)
    optimal = SKLinear.from_linear(lin, 1, 3, seed=0)
    assert torch.isfinite(calibrated.S1s).all() and torch.isfinite(calibrated.bias).all()
    torch.testing.assert_close(calibrated.to_dense().weight, optimal.to_dense().weight, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(calibrated.bias, lin.bias.detach())


def test_conv_calibration_corrects_the_bias_only():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 16, 3, padding=1, stride=2, dtype=F64)
    x = torch.randn(6, 3, 9, 9, dtype=F64) + 1.0  # a mean the sketch cannot carry
    optimal = SKConv2d.from_conv2d(conv, 1, 2, seed=0)
    calibrated = SKConv2d.from_conv2d(conv, 1, 2, calibration_data=[x[:3], x[3:]], seed=0)
    torch.testing.assert_close(calibrated.S1s, optimal.S1s)
    with torch.no_grad():
        target = conv(x)
        mean_err = lambda m: (m(x) - target).mean((0, 2, 3)).abs().max().item()  # noqa: E731
        assert mean_err(calibrated) < 1e-10 < 1e-2 < mean_err(optimal)
        assert (calibrated(x) - target).norm() < (optimal(x) - target).norm()
    same = nn.Conv2d(3, 4, 4, padding="same", dtype=F64)  # uneven 'same' padding reaches the patches too
    fitted = SKConv2d.from_conv2d(same, 1, 1, calibration_data=x, seed=0)
    with torch.no_grad():
        assert (fitted(x) - same(x)).mean((0, 2, 3)).abs().max() < 1e-10


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: SKLinear.from_linear(nn.Linear(8, 8), 1, 1, init="best"), ValueError,
         "init must be one of ('optimal', 'unbiased'), got 'best'"),
        (lambda: SKLinear.from_linear(nn.Linear(8, 8), 1, 1, init="unbiased", calibration_data=torch.randn(4, 8)),
         ValueError, "calibration_data fits the factors to the data, which the unbiased init does not do"),
        (lambda: SKLinear.from_linear(nn.Linear(8, 8), 1, 1, calibration_data=torch.randn(4, 9)), ValueError,
         "calibration_data batches must have in_features=8 as last dimension, got (4, 9)"),
        (lambda: SKLinear.from_linear(nn.Linear(8, 8), 1, 1, calibration_data=[]), ValueError,
         "calibration_data holds no inputs"),
        (lambda: SKLinear.from_linear(nn.Linear(8, 8), 1, 1, calibration_data=3), TypeError,
         "calibration_data must be a tensor or an iterable of tensors, got int"),
        (lambda: SKLinear.from_linear(nn.Linear(8, 8), 1, 1, calibration_data=[[1.0]]), TypeError,
         "calibration_data must hold torch.Tensor batches, got list"),
        (lambda: SKConv2d.from_conv2d(nn.Conv2d(3, 8, 3), 1, 1, calibration_data=torch.randn(2, 4, 5, 5)),
         ValueError, "calibration_data batches must be (N, C, H, W) or (C, H, W) with C = 3, got (2, 4, 5, 5)"),
        (lambda: SKConv2d.from_conv2d(nn.Conv2d(3, 8, 3), 1, 1, init="unbiased", calibration_data=torch.ones(1)),
         ValueError, "use init='optimal' with calibration_data"),
    ],
)
def test_init_arguments_are_checked(call, error, message):
    with pytest.raises(error, match=re.escape(message)):
        call()


# ---------------------------------------------------------------- to_dense


@pytest.mark.parametrize("bias", [True, False])
def test_linear_to_dense_computes_the_same_output(bias):
    layer = SKLinear(24, 18, 2, 3, bias=bias, seed=0)
    dense = layer.to_dense()
    assert type(dense) is nn.Linear and (dense.bias is None) == (not bias)
    x = torch.randn(5, 7, 24)
    torch.testing.assert_close(dense(x), layer(x), rtol=1e-5, atol=1e-6)
    layer64 = SKLinear(24, 18, 2, 3, bias=bias, dtype=F64, seed=0)
    torch.testing.assert_close(layer64.to_dense()(x.double()), layer64(x.double()), rtol=1e-12, atol=1e-12)
    assert not layer.eval().to_dense().training


@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(stride=2, padding=1), dict(padding="same"), dict(padding="same", dilation=2),
     dict(padding=(2, 0), bias=False)],
)
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths:UserWarning")
def test_conv_to_dense_computes_the_same_output(kwargs):
    layer = SKConv2d(4, 6, (3, 2), num_terms=2, low_rank=2, dtype=F64, seed=0, **kwargs)
    dense = layer.to_dense()
    assert type(dense) is nn.Conv2d
    assert (dense.stride, dense.padding, dense.dilation) == (layer.stride, layer.padding, layer.dilation)
    x = torch.randn(2, 4, 11, 9, dtype=F64)
    torch.testing.assert_close(dense(x), layer(x), rtol=1e-12, atol=1e-12)


def test_model_to_dense_round_trip_keeps_attention():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64))
    sketched, _ = convert(model, low_rank=8, seed=0)
    back = to_dense(sketched)
    assert [type(m) for m in back] == [nn.Linear, nn.ReLU, nn.Linear]
    assert isinstance(sketched[0], SKLinear)  # not in place by default
    x = torch.randn(10, 64)
    torch.testing.assert_close(back(x), sketched(x), rtol=1e-5, atol=1e-5)
    assert to_dense(sketched, inplace=True) is sketched and type(sketched[0]) is nn.Linear
    layer = SKLinear(16, 16, 1, 2, seed=0)
    assert type(to_dense(layer)) is nn.Linear
    attn = RandMultiHeadAttention(16, 2, 8, seed=0)
    assert to_dense(nn.Sequential(attn))[0].__class__ is RandMultiHeadAttention
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got int"):
        to_dense(3)


# ---------------------------------------------------------------- convert: rules


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)  # 72 weights: a sketch cannot save
        self.conv2 = nn.Conv2d(8, 32, 3, padding=1)
        self.grouped = nn.Conv2d(32, 32, 3, padding=1, groups=4)
        self.reflect = nn.Conv2d(32, 32, 3, padding=1, padding_mode="reflect")
        self.block = nn.ModuleDict({"fc1": nn.Linear(32 * 16, 256), "fc2": nn.Linear(256, 128)})
        self.head = nn.Linear(128, 10)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = self.reflect(self.grouped(x))
        x = nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)
        x = torch.relu(self.block["fc1"](x))
        return self.head(torch.relu(self.block["fc2"](x)))


def converted_names(report):
    return [r.name for r in report.converted]


def test_convert_rules_types_names_sizes_and_savings():
    torch.manual_seed(0)
    net = Net()
    model, report = convert(net, low_rank=4, seed=0)
    assert converted_names(report) == ["conv2", "block.fc1", "block.fc2", "head"]
    reasons = {r.name: r.reason for r in report.skipped}
    assert reasons["grouped"] == "groups=4: SKConv2d has no grouped convolution"
    assert reasons["reflect"] == "padding_mode='reflect': SKConv2d pads with zeros only"
    assert reasons["conv1"] == (
        "a sketch with num_terms=1, low_rank=4 would store 136 values, not fewer than the dense weight's 72"
    )
    assert isinstance(model.conv2, SKConv2d) and isinstance(model.block["fc1"], SKLinear)
    assert type(model.conv1) is nn.Conv2d and type(net.conv2) is nn.Conv2d  # a copy by default
    model(torch.randn(2, 1, 8, 8))

    _, report = convert(net, low_rank=4, modules=(nn.Linear,))
    assert converted_names(report) == ["block.fc1", "block.fc2", "head"]
    assert {r.name: r.reason for r in report.skipped}["conv2"] == "Conv2d is not in modules"
    _, report = convert(net, low_rank=4, target_modules=r"block\..*")
    assert converted_names(report) == ["block.fc1", "block.fc2"]
    _, report = convert(net, low_rank=4, target_modules=["fc2", "conv2"])  # peft's suffix rule
    assert converted_names(report) == ["conv2", "block.fc2"]
    _, report = convert(net, low_rank=4, exclude_modules=["head"])
    assert converted_names(report) == ["conv2", "block.fc1", "block.fc2"]
    assert {r.name: r.reason for r in report.skipped}["head"] == "in exclude_modules"
    _, report = convert(net, low_rank=4, min_params=10_000)
    assert converted_names(report) == ["block.fc1", "block.fc2"]
    assert {r.name: r.reason for r in report.skipped}["head"] == "1,290 parameters, fewer than min_params=10,000"
    overrides = {"head": {"low_rank": 1}, r"block\.fc\d": {"low_rank": 16}}
    _, report = convert(net, num_terms=2, low_rank=4, overrides=overrides)
    config = {r.name: r.config for r in report.converted}
    assert config["head"] == {"num_terms": 2, "low_rank": 1} and config["block.fc1"] == {"num_terms": 2, "low_rank": 16}
    assert config["conv2"] == {"num_terms": 2, "low_rank": 4}


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(), ValueError, "layer 'conv1' has no low_rank: pass low_rank=, param_budget=, or overrides="),
        (dict(low_rank=4, param_budget=0.5), ValueError, "give low_rank or param_budget, not both"),
        (dict(low_rank=4, modules=(nn.Conv1d,)), ValueError, "modules may hold nn.Linear, nn.Conv2d and"),
        (dict(low_rank=4, target_modules=["fc9"]), ValueError, "target_modules entries ['fc9'] match no"),
        (dict(low_rank=4, target_modules="(fc"), ValueError, "target_modules is not a valid regular expression"),
        (dict(low_rank=4, target_modules=3), TypeError, "target_modules must be a regular expression (str) or"),
        (dict(low_rank=4, overrides={"fc9": {"low_rank": 2}}), ValueError, "overrides ['fc9'] match no Linear"),
        (dict(low_rank=4, overrides={"head": {"rank": 2}}), ValueError,
         "overrides['head'] has unknown settings ['rank']"),
        (dict(low_rank=4, overrides={"head": {"sketch_dim": 2}}), ValueError,
         "overrides['head'] sets ['sketch_dim'] for layer 'head', a Linear, which takes ['num_terms', 'low_rank']"),
        (dict(low_rank=0), ValueError, "low_rank for layer 'conv1' must be an int >= 1, got 0"),
        (dict(low_rank=4, min_params=-1), ValueError, "min_params must be an int >= 0, got -1"),
        (dict(low_rank=4, init="zeros"), ValueError, "init must be one of ('optimal', 'unbiased'), got 'zeros'"),
        (dict(param_budget=1.5), ValueError, "must be in (0, 1], got 1.5"),
        (dict(param_budget=True), TypeError, "param_budget must be a fraction (float) or a parameter count (int)"),
        (dict(param_budget=1000), ValueError, "param_budget allows 1,000 parameters, but the model holds at least"),
    ],
)
def test_convert_arguments_are_checked(kwargs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        convert(Net(), **kwargs)


def test_convert_refuses_non_modules_and_lazy_models():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got str"):
        convert("model", low_rank=2)
    lazy = nn.Sequential(nn.LazyLinear(64), nn.Linear(64, 64))
    with pytest.raises(ValueError, match="model has uninitialised parameters .* run a forward pass"):
        convert(lazy, low_rank=2)
    lazy(torch.randn(2, 40))
    model, report = convert(lazy, low_rank=2)
    assert converted_names(report) == ["0", "1"]


@pytest.mark.parametrize("budget", [0.3, 0.12, 60_000])
def test_param_budget_is_met_closely(budget):
    torch.manual_seed(0)
    net = Net()
    model, report = convert(net, param_budget=budget, seed=0)
    target = budget if isinstance(budget, int) else int(budget * report.params_before)
    assert report.params_after == sum(p.numel() for p in model.parameters())
    assert 0.85 * target <= report.params_after <= target
    ranks = {r.name: r.config["low_rank"] for r in report.converted}
    assert ranks["block.fc1"] > ranks["head"]  # a common fraction: larger layers get larger ranks


def test_param_budget_respects_overrides():
    net = Net()
    _, report = convert(net, param_budget=0.2, overrides={"head": {"low_rank": 3}})
    assert {r.name: r.config for r in report.converted}["head"] == {"num_terms": 1, "low_rank": 3}
    assert report.params_after <= int(0.2 * report.params_before)


def test_report_counts_and_text():
    torch.manual_seed(0)
    net = Net()
    model, report = convert(net, low_rank=4, seed=0)
    assert isinstance(report, ConversionReport)
    before = sum(p.numel() for p in net.parameters())
    assert report.params_before == before and report.params_after == sum(p.numel() for p in model.parameters())
    nbytes = lambda m: sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()])  # noqa: E731
    assert report.bytes_before == nbytes(net) and report.bytes_after == nbytes(model)
    fc1 = next(r for r in report.layers if r.name == "block.fc1")
    assert fc1.kind == "Linear -> SKLinear" and fc1.init == "optimal"
    assert fc1.params_before == 512 * 256 + 256 and fc1.params_after == 4 * (512 + 256) + 256
    assert fc1.bytes_after == 4 * (2 * 4 * (512 + 256) + 256)
    assert fc1.weight_error == pytest.approx(
        relative_weight_error(model.block["fc1"], net.block["fc1"].weight.detach()).item(), rel=1e-6
    )
    assert report.params_before - report.params_after == sum(r.params_before - r.params_after for r in report.layers)
    text = str(report)
    for r in report.layers:
        assert r.name in text
    assert "groups=4: SKConv2d has no grouped convolution" in text
    assert f"{report.params_before:,} -> {report.params_after:,}" in text
    assert "4 converted, 3 kept" in text
    assert repr(report).startswith("ConversionReport(converted=4, skipped=3, params=")


def test_inplace_and_copy():
    net = Net()
    state = copy.deepcopy(net.state_dict())
    model, _ = convert(net, low_rank=4)
    assert model is not net and type(net.block["fc1"]) is nn.Linear
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    model, _ = convert(net, low_rank=4, inplace=True)
    assert model is net and isinstance(net.block["fc1"], SKLinear)
    _, again = convert(net, low_rank=4)  # sketched layers are no candidates
    assert [r.name for r in again.layers] == ["conv1", "grouped", "reflect"] and again.converted == []
    lin = nn.Linear(64, 64)
    layer, report = convert(lin, low_rank=2)  # the model itself is a layer
    assert isinstance(layer, SKLinear) and report.converted[0].name == ""


def test_state_dict_loads_into_a_freshly_converted_model():
    torch.manual_seed(0)
    net = Net()
    model, _ = convert(net, param_budget=0.3, calibration_data=torch.randn(8, 1, 8, 8))
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    fresh, _ = convert(Net(), param_budget=0.3)  # other weights, other sketches
    fresh.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(fresh(x), model(x))


def test_seed_makes_conversion_reproducible():
    net = Net()
    a, _ = convert(net, low_rank=4, seed=5)
    b, _ = convert(net, low_rank=4, seed=5)
    c, _ = convert(net, low_rank=4, seed=6)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert not torch.equal(a.block["fc1"].U1s, c.block["fc1"].U1s)
    assert not torch.equal(a.block["fc1"].U1s, a.block["fc2"].U1s[:, :, :1].expand_as(a.block["fc1"].U1s))


def test_shared_layers_are_replaced_everywhere():
    shared = nn.Linear(64, 64)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    converted, report = convert(model, low_rank=4)
    assert converted[0] is converted[2] and isinstance(converted[0], SKLinear)
    assert converted_names(report) == ["0"]


# ---------------------------------------------------------------- convert: calibration


def test_model_calibration_beats_weight_only_conversion():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 16)).double()
    x = correlated_inputs(4000, 32, 3)
    optimal, _ = convert(model, low_rank=6, seed=0)
    calibrated, report = convert(model, low_rank=6, seed=0, calibration_data=x.split(500))
    assert [r.init for r in report.converted] == ["calibrated"] * 3
    with torch.no_grad():
        target = model(x)
        err = lambda m: ((m(x) - target).norm() / target.norm()).item()  # noqa: E731
        assert err(calibrated) < 0.8 * err(optimal), (err(calibrated), err(optimal))


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(32, 64)
        self.b = nn.Linear(32, 64)
        self.unused = nn.Linear(64, 64)
        self.drop = nn.Dropout(0.5)

    def forward(self, x, scale=1.0):
        return self.drop(self.a(x)) * scale + self.b(x)


def test_calibration_batches_as_tuples_and_dicts_and_modes_restored():
    torch.manual_seed(0)
    model = TwoInputs().double()
    model.train()
    model.b.eval()
    x = correlated_inputs(300, 32, 4)
    for data in ([(x,)], [{"x": x, "scale": 2.0}], x):
        converted, report = convert(model, low_rank=3, calibration_data=data, seed=0)
        inits = {r.name: r.init for r in report.converted}
        assert inits == {"a": "calibrated", "b": "calibrated", "unused": "optimal"}  # not reached: weight-only
        assert model.training and model.a.training and not model.b.training
        assert converted.training and not converted.b.training
    with pytest.raises(TypeError, match="calibration_data must yield model inputs: tensors, tuples/lists"):
        convert(model, low_rank=3, calibration_data=[3])
    with pytest.raises(ValueError, match="calibration_data fits the factors to the data"):
        convert(model, low_rank=3, init="unbiased", calibration_data=x)


def test_unbiased_init_through_convert():
    torch.manual_seed(0)
    lin = nn.Sequential(nn.Linear(64, 64))
    _, report = convert(lin, low_rank=4, init="unbiased", seed=0)
    _, best = convert(lin, low_rank=4, seed=0)
    assert report.converted[0].init == "unbiased"
    assert report.converted[0].weight_error > 1.3 * best.converted[0].weight_error


# ---------------------------------------------------------------- convert: attention


def test_multihead_attention_conversion():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=True)
    model = nn.Sequential()
    model.attn = mha
    _, report = convert(model, low_rank=2)
    assert report.converted == [] and report.skipped[0].reason == "no sketch_dim given"
    converted, report = convert(model, low_rank=2, sketch_dim=16, seed=0)
    attn = converted.attn
    assert isinstance(attn, RandMultiHeadAttention) and attn.sketch_dim == 16
    assert isinstance(attn.out_proj, nn.Linear) and not isinstance(attn.out_proj, SKLinear)  # never inside
    assert torch.equal(attn.in_proj_weight, mha.in_proj_weight)
    assert torch.equal(attn.out_proj.weight, mha.out_proj.weight)
    r = report.converted[0]
    assert r.kind == "MultiheadAttention -> RandMultiHeadAttention" and r.params_after == r.params_before
    assert r.bytes_after == r.bytes_before + 4 * 4 * 16 * 8  # the random features
    # the random-feature error falls with sketch_dim (averaged over draws)
    x = torch.randn(2, 12, 32) * 0.5
    exact = mha(x, x, x, need_weights=False)[0]

    def error(m):
        errs = []
        for s in range(6):
            rand = convert(model, sketch_dim=m, seed=s, low_rank=2)[0].attn
            errs.append(((rand(x, x, x)[0] - exact).norm() / exact.norm()).item())
        return sum(errs) / len(errs)

    assert error(512) < 0.5 * error(8)
    _, report = convert(model, sketch_dim=16, overrides={"attn": {"sketch_dim": 8, "kernel": "relu"}})
    assert report.converted[0].config == {"sketch_dim": 8, "kernel": "relu"}
    _, report = convert(nn.Sequential(nn.MultiheadAttention(32, 4, add_bias_kv=True)), sketch_dim=8)
    assert report.skipped[0].reason == "add_bias_kv=True: not supported by RandMultiHeadAttention"
    _, report = convert(nn.Sequential(nn.MultiheadAttention(32, 4, add_zero_attn=True)), sketch_dim=8)
    assert report.skipped[0].reason == "add_zero_attn=True: not supported by RandMultiHeadAttention"
    _, report = convert(model, low_rank=2, sketch_dim=8, modules=(nn.Linear,))  # out_proj stays untouched
    assert [r.name for r in report.layers] == ["attn"] and report.converted == []


@pytest.mark.parametrize("modules", [(nn.MultiheadAttention,), (nn.Linear,), (nn.Linear, nn.MultiheadAttention)])
def test_transformer_encoder_fast_path_does_not_bypass_converted_layers(modules):
    """torch's fused encoder-layer inference path reads dense weights; after conversion, inference in
    eval/no_grad must run the sketched layers (as the module path with the fast path disabled does)."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)
    converted, report = convert(encoder, low_rank=4, sketch_dim=16, modules=modules, seed=0)
    assert report.converted
    converted.eval()
    x = torch.randn(3, 10, 32)
    mask = torch.zeros(3, 10, dtype=torch.bool)
    mask[1, 6:] = True
    with torch.no_grad():
        fast = converted(x, src_key_padding_mask=mask), converted(x), converted.layers[0](x)
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            slow = converted(x, src_key_padding_mask=mask), converted(x), converted.layers[0](x)
        finally:
            torch.backends.mha.set_fastpath_enabled(True)
    torch.testing.assert_close(fast[0][~mask], slow[0][~mask])
    torch.testing.assert_close(fast[1], slow[1])
    torch.testing.assert_close(fast[2], slow[2])


def test_model_calibration_fits_each_layer_to_its_converted_inputs():
    """Layers are calibrated in order, each on the inputs its converted predecessors give it, towards the
    dense model's outputs: better than fitting every layer on the dense model's own activations."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 96), nn.Tanh(), nn.Linear(96, 24)).double()
    x = correlated_inputs(3000, 32, 5)
    sequential, _ = convert(model, low_rank=4, seed=0, calibration_data=x)
    with torch.no_grad():
        hidden = model[1](model[0](x))
        second = SKLinear.from_linear(model[2], 1, 4, calibration_data=hidden, seed=sequential[2].seed)
        assert torch.equal(second.U1s, sequential[2].U1s)  # the same sketches, fitted on dense activations
        independent = nn.Sequential(sequential[0], nn.Tanh(), second)
        target = model(x)
        err = lambda m: ((m(x) - target).norm() / target.norm()).item()  # noqa: E731
        assert err(sequential) < 0.9 * err(independent), (err(sequential), err(independent))


class StateDependent(nn.Module):
    """Calls ``b`` a number of times that depends on what ``a`` is: calibration cannot pair its inputs."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(64, 64)
        self.b = nn.Linear(64, 64)

    def forward(self, x):
        h = self.a(x)
        for _ in range(1 if type(self.a) is nn.Linear else 2):
            h = self.b(h)
        return h


def test_calibration_refuses_models_whose_calls_change_with_conversion():
    with pytest.raises(RuntimeError, match=re.escape("layer 'b' received inputs of shapes [(8, 64), (8, 64)] in")):
        convert(StateDependent(), low_rank=2, calibration_data=torch.randn(8, 64))
    convert(StateDependent(), low_rank=2, calibration_data=torch.randn(8, 64), target_modules=["b"])
