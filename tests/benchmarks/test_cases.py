"""benchmarks/harness/cases.py: the implementations each case times, the `compiled` peers' math, presets, the case
selection and the attention layer case, run on CPU at a small size."""

import math
import sys
from pathlib import Path

import pytest
import torch

from panther.backends.base import Backend

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

from harness import cases  # noqa: E402
from harness.cases import PRESETS, AttentionCase, AttentionLayerCase, ConvCase, LinearCase, layer_leaves, select  # noqa: E402


class BothOps(Backend):
    """Stands for `cuda` as on a GPU machine (installed and available): implements linear and conv."""

    name = "cuda"

    def sketched_linear(self, *args):
        raise AssertionError("not called: only listed")

    def sketched_conv2d(self, *args):
        raise AssertionError("not called: only listed")


class LinearOnly(Backend):
    """Stands for `triton`: no conv2d kernels."""

    name = "triton"

    def sketched_linear(self, *args):
        raise AssertionError("not called: only listed")


@pytest.fixture
def as_on_a_gpu(monkeypatch):
    """The backends run.py would pass on a GPU machine (it passes only available ones), whatever is
    installed here."""
    import panther.backends

    found = {"torch": panther.backends.load_backend("torch"), "cuda": BothOps(), "triton": LinearOnly()}
    monkeypatch.setattr(panther.backends, "load_backend", lambda name: found[name])


def float64_inputs(case):
    torch.manual_seed(0)
    inputs = case.build("cpu", torch.float64)
    return {n: t.detach() for n, t in inputs.items()}


@pytest.mark.parametrize("L, k", [(1, 4), (3, 5)])
def test_concat_linear_is_the_sketched_linear_math(L, k):
    """Two matmuls over the concatenated terms equal the term-by-term math and the reference backend."""
    case = LinearCase(7, 12, L, k)
    inp = float64_inputs(case)
    args = [inp[a] for a in case.sketch_args]
    got = cases.concat_linear(*args)
    torch.testing.assert_close(got, cases.plain_linear(*args), rtol=1e-12, atol=1e-12)
    ref = torch.zeros_like(got) + inp["b"]
    for i in range(L):  # y = 1/(2L) Σ_i (x S1_i) U1_i + (x U2_i) S2_i + b, written out
        ref = ref + (inp["x"] @ inp["S1s"][i] @ inp["U1s"][i] + inp["x"] @ inp["U2s"][i] @ inp["S2s"][i]) / (2 * L)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("terms, stride, padding", [(1, 1, 1), (3, 2, 0)])
def test_concat_conv2d_is_the_sketched_conv2d_math(terms, stride, padding):
    case = ConvCase(2, 3, 5, 9, 8, 3, stride, padding, terms, 4)
    inp = float64_inputs(case)
    args = [inp[a] for a in case.sketch_args]
    got = cases.concat_conv2d(*args, stride=stride, padding=padding)
    torch.testing.assert_close(got, cases.plain_conv2d(*args, stride, padding), rtol=1e-12, atol=1e-12)
    import panther.ops

    ref = panther.ops.sketched_conv2d(*args, stride, padding, backend="torch")
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    assert got.shape == (2, 5, *case.out_hw())


@pytest.mark.parametrize(
    "case", [LinearCase(4, 8, 1, 2), ConvCase(1, 2, 3, 5, 5, 3, 1, 1, 1, 2)], ids=["linear", "conv"]
)
def test_cases_time_every_backend_and_both_peers(as_on_a_gpu, case):
    """Each backend passed in that implements the op (cuda on both, triton on linear only), and the plain
    and compiled sketch-family peers (the compiled one really under torch.compile)."""
    impls = case.impls(["torch", "cuda", "triton"])
    expected_backends = {"torch", "cuda"} | ({"triton"} if case.op == "sketched_linear" else set())
    assert {n for n, i in impls.items() if i.kind == "backend"} == expected_backends
    baselines = {n: i for n, i in impls.items() if i.kind == "baseline"}
    assert set(baselines) == {case.base, "plain", "compiled"}
    compiled = baselines["compiled"]
    assert compiled.family == "sketch" and compiled.args == case.sketch_args
    wrapped = getattr(compiled.fn, "_torchdynamo_orig_callable", None)
    assert wrapped is not None, "the compiled peer is not a torch.compile'd function"
    if case.op == "sketched_linear":  # (conv's is a functools.partial, which torch.compile wraps again)
        assert wrapped is cases.concat_linear


def test_attention_cases_leave_out_backends_without_attention(as_on_a_gpu):
    impls = AttentionCase(64, 16, False).impls(["torch", "cuda"])
    assert "cuda" not in impls and "torch" in impls


def test_gpu_presets_hold_both_conv_cases_of_the_issue():
    spec = ConvCase(32, 64, 128, 56, 56, 3, 1, 1, 1, 16)
    deep = ConvCase(64, 256, 256, 28, 28, 3, 1, 1, 1, 32)
    for name in ("gpu-quick", "gpu"):
        held = cases.PRESETS[name].cases
        assert spec in held and deep in held, name
    assert deep.out_hw() == (28, 28) and math.prod(deep.out_hw()) * deep.batch == 64 * 784

@pytest.mark.parametrize("preset", ["gpu-quick", "gpu"])
def test_attention_filter_selects_op_and_layer_cases(preset):
    cases, _ = select(PRESETS[preset], ["rfa_attention"])
    kinds = {type(c) for c in cases}
    assert kinds == {AttentionCase, AttentionLayerCase}
    layer_seqs = {c.seq for c in cases if isinstance(c, AttentionLayerCase)}
    assert {4096, 16384, 65536} <= layer_seqs


def test_attention_cases_time_the_triton_backend():
    """Where triton can run (a GPU, or TRITON_INTERPRET=1), both attention cases time it."""
    from panther.backends import available_backends

    if "triton" not in available_backends():
        pytest.skip("the triton backend cannot run here (no GPU; TRITON_INTERPRET unset)")
    for case in (AttentionCase(64, 16, True), AttentionLayerCase(64)):
        assert "triton" in case.impls(["torch", "triton"])


def test_layer_case_runs_and_matches_its_float64_reference():
    torch.manual_seed(0)
    case = AttentionLayerCase(40, sketch_dim=8, embed_dim=32, heads=4, batch=2)
    inputs = case.build("cpu", torch.float32)
    impls = case.impls(["torch"])
    assert set(impls) == {"torch", "nn.MultiheadAttention"}
    leaves = layer_leaves(inputs)
    params = {id(p) for name in ("mha", "rand") for p in inputs[name].parameters()}
    assert params <= {id(t) for t in leaves} and any(t is inputs["x"] for t in leaves)
    ref = case.reference(inputs)
    for impl in impls.values():
        for t in leaves:
            t.grad = None
        y = impl.fn(*(inputs[a] for a in impl.args))
        assert y.shape == inputs["x"].shape
        y.backward(inputs["g"])
        assert inputs["x"].grad is not None and inputs[impl.args[1]].out_proj.weight.grad is not None
        if impl.family == "sketch":
            assert ((y.double() - ref).norm() / ref.norm()).item() < 1e-5
    # the sketched layer does less work than exact attention at long sequences, more at short ones
    long, short = AttentionLayerCase(65536), AttentionLayerCase(64, sketch_dim=256)
    assert long.work("sketch", "fwd+bwd")[0] < long.work("dense", "fwd+bwd")[0] / 10
    assert short.work("sketch", "fwd")[0] > short.work("dense", "fwd")[0]


def test_every_case_runs_on_the_selection_in_force():
    """backend_fn(None), what autotune_check times as auto: the op's or the layer's call without naming a backend."""
    import panther

    torch.manual_seed(0)
    small = (LinearCase(16, 32, 1, 4), ConvCase(2, 3, 4, 6, 6, 3, 1, 1, 1, 2),
             AttentionCase(16, 8, True, batch=1, heads=2, head_dim=8),
             AttentionLayerCase(16, sketch_dim=8, embed_dim=32, heads=4, batch=2))
    for case in small:
        inputs = case.build("cpu", torch.float32)
        args = [inputs[a] for a in case.sketch_args]
        with panther.use_backend("torch"):
            expected = case.backend_fn("torch")(*args)
            got = case.backend_fn(None)(*args)
        torch.testing.assert_close(got, expected, msg=lambda m: f"{case.label}: {m}")
