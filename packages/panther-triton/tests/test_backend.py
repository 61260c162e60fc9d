"""The backend object: packaging, discovery, cheap import, availability, capability reasons, priority."""

import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import torch

import panther
from panther.backends import BackendError, backend_infos, load_backend, select
from panther_triton._runtime import interpreting
from panther_triton.backend import TritonBackend
from triton_test_utils import DEVICE, TOL, make_inputs, needs_kernels, reference, rel_err

PACKAGE = Path(__file__).resolve().parents[1]


def _run(code: str, **env) -> str:
    full = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    full.update(env)
    out = subprocess.run([sys.executable, "-c", code], env=full, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_entry_point_and_discovery():
    eps = {ep.name: ep.value for ep in metadata.entry_points(group="panther.backends")}
    assert eps.get("triton") == "panther_triton.backend:TritonBackend"
    info = {i.name: i for i in backend_infos()}["triton"]
    assert info.load_error is None and isinstance(info.backend, TritonBackend)
    assert info.backend.name == "triton" and info.distribution == "panther-randnla-triton"


def test_packaging_metadata():
    """Siblings by their real names (the bare `panther-core` is a stranger's), no panther/__init__.py here."""
    reqs = metadata.requires("panther-randnla-triton") or []
    assert "panther-randnla-core==0.1.0" in [r.replace(" ", "") for r in reqs]
    assert not any(r.split("=")[0].split(">")[0].strip() in ("panther-core", "panther") for r in reqs)
    assert not list((PACKAGE / "src").rglob("panther/__init__.py"))
    assert (PACKAGE / "src" / "panther_triton" / "__init__.py").is_file()


def test_import_is_cheap():
    """Importing the package and the backend module (and building the backend) loads no triton, inits no CUDA."""
    out = _run(
        "import sys, torch, panther_triton, panther_triton.backend as b; be = b.TritonBackend(); be.priority; "
        "print('triton' in sys.modules, torch.cuda.is_initialized(), "
        "any(m.startswith('panther_triton.ops') for m in sys.modules))"
    )
    assert out == "False False False"


def test_availability_under_the_interpreter():
    assert _run("import panther_triton.backend as b; print(b.TritonBackend().unavailable_reason())",
                TRITON_INTERPRET="1") == "None"


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a CUDA machine the backend is available")
def test_unavailable_without_gpu_says_how_to_fix():
    reason = _run("import panther_triton.backend as b; print(b.TritonBackend().unavailable_reason())")
    assert "CUDA" in reason and "TRITON_INTERPRET=1" in reason
    if not interpreting():
        with pytest.raises(BackendError, match="TRITON_INTERPRET"):
            load_backend("triton")


@pytest.mark.skipif(torch.cuda.is_available(), reason="priority 10 with CUDA is a gpu test")
def test_priority_without_cuda_stays_below_torch():
    be = TritonBackend()
    assert be.priority == -10 < load_backend("torch").priority


def test_auto_bid_is_below_torch_where_torch_measured_faster(monkeypatch):
    """float32 and 2 L k > 256 (past the fused kernel) bid below torch; 16-bit up to 2 L k = 256 keeps 10."""
    monkeypatch.setattr(TritonBackend, "priority", 10)  # as on a CUDA machine
    be, torch_priority = TritonBackend(), load_backend("torch").priority
    bid = lambda T, L, k, dt: be.auto_priority("sketched_linear", *make_inputs(T, 8, 6, L, k, dt, device="cpu"))  # noqa: E731
    assert bid(4, 1, 2, torch.float32) < torch_priority
    for dt in (torch.bfloat16, torch.float16):
        assert bid(4, 1, 2, dt) == bid(1, 2, 64, dt) == bid(3, 4, 32, dt) == 10 > torch_priority  # 2Lk <= 256
        assert bid(4, 1, 129, dt) < torch_priority and bid(4, 8, 64, dt) < torch_priority


def test_reasons_cannot_run():
    be = TritonBackend()
    args = make_inputs(4, 8, 6, 1, 2, torch.float32, device="cpu")
    assert "does not implement" in " ".join(be.reasons_cannot_run("sketched_conv2d", *args))
    r64 = " ".join(be.reasons_cannot_run("sketched_linear", *[t.double() for t in args]))
    assert "float64" in r64 and "torch" in r64
    mixed = list(args)
    mixed[5] = mixed[5].half()
    assert any("one dtype" in r for r in be.reasons_cannot_run("sketched_linear", *mixed))
    assert any("int32" in r for r in be.reasons_cannot_run("sketched_linear", *[t.int() for t in args]))
    meta = [t.to("meta") for t in args]
    assert any("meta" in r for r in be.reasons_cannot_run("sketched_linear", *meta))
    empty = list(args)
    empty[1] = torch.empty(1, 8, 0)
    assert any("empty dimension" in r for r in be.reasons_cannot_run("sketched_linear", *empty))
    cpu_reasons = be.reasons_cannot_run("sketched_linear", *args)
    if interpreting():
        assert cpu_reasons == []
    else:
        assert any("CUDA tensors" in r for r in cpu_reasons)


@needs_kernels
def test_explicit_selection_runs_the_kernels():
    inputs = make_inputs(13, 40, 30, 2, 5, torch.float32)
    assert select("sketched_linear", *inputs, backend="triton").name == "triton"
    with panther.use_backend("triton"):
        y = panther.ops.sketched_linear(*inputs)
    y_ref, _ = reference(inputs, torch.zeros_like(y), ())
    assert rel_err(y, y_ref) <= TOL[torch.float32] * 10  # TF32 may be on


@needs_kernels
def test_explicit_float64_is_refused_with_the_reason():
    inputs = make_inputs(3, 8, 6, 1, 2, torch.float64)
    with pytest.raises(BackendError, match="float64"):
        panther.ops.sketched_linear(*inputs, backend="triton")


@pytest.mark.skipif(not interpreting(), reason="the interpreter's auto rule")
def test_auto_keeps_cpu_tensors_off_the_interpreter():
    inputs = make_inputs(3, 8, 6, 1, 2, torch.float32, device="cpu")
    assert select("sketched_linear", *inputs).name != "triton"
    assert DEVICE == "cpu"


def test_attention_is_offered_to_auto_at_the_backends_priority():
    be = load_backend("triton")
    q = torch.randn(1, 2, 5, 4)
    omega = torch.randn(8, 4)
    assert be.reasons_cannot_run("rfa_attention", q, q, q, omega, False, "softmax", None) == []
    assert be.auto_priority("rfa_attention", q, q, q, omega, False, "softmax", None) == be.priority
