"""benchmarks/distributed_step.py: the parameter counts and collective bytes it reports, and its summary."""

import importlib.util
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("distributed_step", ROOT / "benchmarks" / "distributed_step.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    try:
        spec.loader.exec_module(mod)
    finally:
        del sys.modules[spec.name]
    return mod


def test_models_have_the_same_shapes_and_the_sketched_one_fewer_parameters(bench):
    p = bench.PRESETS["gpu"]
    F, L, k = p.features, p.num_terms, p.low_rank
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dense, sketched = (bench.build(kind, p, "meta", None) for kind in ("dense", "sketched"))
    assert sum(t.numel() for t in dense.parameters()) == p.depth * (F * F + F)
    assert sum(t.numel() for t in sketched.parameters()) == p.depth * (2 * L * k * F + F)  # S1s, S2s, bias
    assert sum(t.numel() for t in sketched.buffers()) == p.depth * 2 * L * k * F  # U1s, U2s: not communicated
    assert [type(m).__name__ for m in sketched] == ["SKLinear", "ReLU"] * (p.depth - 1) + ["SKLinear"]


def test_collective_bytes_per_step(bench):
    assert bench.collective_bytes("ddp", 1000, 1)["total"] == 0
    assert bench.collective_bytes("ddp", 1000, 2) == {"all_reduce": 1000, "all_gather": 0, "reduce_scatter": 0,
                                                      "total": 1000}
    assert bench.collective_bytes("fsdp2", 1000, 4) == {"all_reduce": 0, "all_gather": 2000, "reduce_scatter": 1000,
                                                        "total": 3000}


def test_summary_gives_scaling_efficiency_and_bytes_against_dense(bench):
    def rec(model, n, ms, nbytes):
        return {"model": model, "wrapper": "ddp", "world_size": n, "step_ms": ms,
                "collective_bytes": bench.collective_bytes("ddp", nbytes, n)}

    records = [rec("dense", 1, 10.0, 800), rec("sketched", 1, 4.0, 100),
               rec("dense", 2, 12.5, 800), rec("sketched", 2, 5.0, 100)]
    got = {s["model"]: s for s in bench.summarise(records)}
    assert set(got) == {"dense", "sketched"}
    assert got["dense"]["scaling_efficiency"] == pytest.approx(0.8)
    assert got["sketched"]["scaling_efficiency"] == pytest.approx(0.8)
    assert got["sketched"]["collective_bytes_vs_dense"] == pytest.approx(0.125)
    assert got["sketched"]["step_speedup_vs_dense"] == pytest.approx(2.5)
