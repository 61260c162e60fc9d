"""benchmarks/harness/cases.py: the case selection and the attention layer case, run on CPU at a small size."""

import pathlib
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

from harness.cases import PRESETS, AttentionCase, AttentionLayerCase, layer_leaves, select  # noqa: E402


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
