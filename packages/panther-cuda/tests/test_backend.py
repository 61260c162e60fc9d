"""The backend object: entry point, cheap import, availability reasons with the install command, refusal
of inputs the kernels do not take, explicit selection failing clearly and auto falling back."""

import os
import subprocess
import sys
import types
from importlib import metadata
from pathlib import Path

import pytest
import torch

import panther
import panther_cuda.backend as cuda_backend
from panther.backends import BackendError, backend_infos, load_backend, select
from panther_cuda.backend import CudaBackend, install_hint

PACKAGE = Path(__file__).resolve().parents[1]
INSTALL = 'pip install "panther-randnla-cuda[cuda'  # the command every CuPy reason names


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, env=dict(os.environ))


def linear_args(device="cpu", dtype=torch.float32, T=5, I=8, O=6, L=1, k=2):
    new = lambda *s: torch.randn(*s, device=device, dtype=dtype)  # noqa: E731
    return new(T, I), new(L, I, k), new(L, k, O), new(L, k, O), new(L, I, k), new(O)


def conv_args(device="cpu", dtype=torch.float32, N=2, C=3, O=4, H=7, W=6, L=1, k=2, ks=3):
    new = lambda *s: torch.randn(*s, device=device, dtype=dtype)  # noqa: E731
    return new(N, C, H, W), new(2 * L, k, C, ks, ks), new(2 * L, k, O), new(O)


@pytest.fixture
def fresh_cupy_check(monkeypatch):
    """Forget the cached CuPy verdict (the check runs once per process) for this test only."""
    monkeypatch.setattr(cuda_backend, "_cupy_error", cuda_backend._UNCHECKED)


def fake_cupy(cuda_version: int, version: str = "13.6.0") -> types.ModuleType:
    """A module that answers CuPy's version questions: cupy.cuda.runtime.runtimeGetVersion()."""
    cupy = types.ModuleType("cupy")
    cupy.__version__ = version
    cupy.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(runtimeGetVersion=lambda: cuda_version))
    return cupy


def test_entry_point_and_discovery():
    eps = {ep.name: ep.value for ep in metadata.entry_points(group="panther.backends")}
    assert eps.get("cuda") == "panther_cuda.backend:CudaBackend"
    info = {i.name: i for i in backend_infos()}["cuda"]
    assert info.load_error is None and isinstance(info.backend, CudaBackend)
    assert info.backend.name == "cuda" and info.distribution == "panther-randnla-cuda"
    assert info.backend.implements("sketched_linear") and info.backend.implements("sketched_conv2d")
    assert not info.backend.implements("rfa_attention")


def test_packaging_metadata():
    """Siblings by their real names, one CuPy wheel per extra, no panther/__init__.py, kernels as package data."""
    reqs = [r.replace(" ", "") for r in metadata.requires("panther-randnla-cuda") or []]
    assert "panther-randnla-core==0.1.0" in reqs
    assert not any(r.split("=")[0].split(">")[0] in ("panther-core", "panther") for r in reqs)
    extras = {e: [r for r in reqs if f'extra=="{e}"' in r] for e in ("cuda12", "cuda13")}
    assert [r.split(";")[0] for r in extras["cuda12"]] == ["cupy-cuda12x>=13"]
    assert [r.split(";")[0] for r in extras["cuda13"]] == ["cupy-cuda13x>=13"]
    assert not list((PACKAGE / "src").rglob("panther/__init__.py"))


def test_import_is_cheap():
    """Importing the package and the backend module, building the backend and asking its priority loads
    no CuPy, no op module, and initialises no CUDA."""
    out = _run(
        "-c",
        "import sys, torch, panther_cuda, panther_cuda.backend as b; be = b.CudaBackend(); be.priority; "
        "print('cupy' in sys.modules, torch.cuda.is_initialized(), "
        "any(m.startswith('panther_cuda.ops.') for m in sys.modules))",
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False False False"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the listing on a machine without a GPU")
def test_info_lists_cuda_with_its_reason():
    out = _run("-m", "panther", "info")
    assert out.returncode == 0, out.stderr
    row = next(line for line in out.stdout.splitlines() if line.startswith("cuda "))
    assert "panther-randnla-cuda" in row and "0.1.0" in row
    assert "unavailable: no CUDA GPU is visible" in row


def test_cupy_missing_names_the_install_command(monkeypatch, fresh_cupy_check):
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy raises ImportError
    reason = CudaBackend().unavailable_reason()
    assert "CuPy cannot be imported" in reason and INSTALL in reason


@pytest.mark.parametrize("torch_cuda, cupy_runtime", [("13.0", 12080), ("12.8", 13000)])
def test_cupy_for_another_cuda_major_names_the_replacement(monkeypatch, fresh_cupy_check, torch_cuda, cupy_runtime):
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy(cupy_runtime))
    monkeypatch.setattr(torch.version, "cuda", torch_cuda)
    reason = cuda_backend._cupy_reason()
    cupy_major, torch_major = cupy_runtime // 1000, torch_cuda.split(".")[0]
    assert f"CuPy 13.6.0 is built for CUDA {cupy_major}" in reason and f"for CUDA {torch_cuda}" in reason
    assert f"pip uninstall cupy-cuda{cupy_major}x" in reason
    assert f'pip install "panther-randnla-cuda[cuda{torch_major}]"' in reason


def test_cupy_for_torchs_cuda_major_is_no_reason(monkeypatch, fresh_cupy_check):
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy(13020))
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    assert cuda_backend._cupy_reason() is None


def test_install_hint_follows_torchs_cuda(monkeypatch):
    for version, extra in (("12.4", "cuda12"), ("13.0", "cuda13"), (None, "cuda12|cuda13")):
        monkeypatch.setattr(torch.version, "cuda", version)
        assert install_hint().startswith(f'pip install "panther-randnla-cuda[{extra}]"')


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the reasons on a machine without a GPU")
def test_no_gpu_is_a_reason_even_with_cupy(monkeypatch, fresh_cupy_check):
    """CuPy fine, no GPU: the GPU reason alone; neither: both, so one fix does not reveal the next."""
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy(13000))
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    reason = CudaBackend().unavailable_reason()
    assert reason.startswith("no CUDA GPU is visible") and "compute capability >= 8.0" in reason
    assert "CuPy" not in reason
    monkeypatch.setattr(cuda_backend, "_cupy_error", cuda_backend._UNCHECKED)
    monkeypatch.setitem(sys.modules, "cupy", None)
    reason = CudaBackend().unavailable_reason()
    assert "no CUDA GPU is visible" in reason and "CuPy cannot be imported" in reason and INSTALL in reason


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour on a machine without a GPU")
def test_explicit_request_fails_clearly_and_auto_falls_back():
    args = linear_args()
    with pytest.raises(BackendError, match=r"Panther backend 'cuda' \(.*\) cannot run: no CUDA GPU is visible"):
        load_backend("cuda")
    with pytest.raises(BackendError, match="backend 'cuda'.*cannot run"):
        panther.ops.sketched_linear(*args, backend="cuda")
    with pytest.raises(BackendError, match="backend 'cuda'.*cannot run"):
        panther.ops.sketched_conv2d(*conv_args(), backend="cuda")
    with pytest.raises(BackendError, match="backend 'cuda'.*cannot run"):
        with panther.use_backend("cuda"):
            pass
    chosen = select("sketched_linear", *args, backend="auto")
    assert chosen.name != "cuda"
    y = panther.ops.sketched_linear(*args, backend="auto")
    torch.testing.assert_close(y, panther.ops.sketched_linear(*args, backend="torch"))


@pytest.mark.parametrize("op, make", [("sketched_linear", linear_args), ("sketched_conv2d", conv_args)])
def test_cpu_tensors_are_refused_with_the_reason(op, make):
    reasons = CudaBackend().reasons_cannot_run(op, *make())
    expected = ("tensors on cpu are not supported", "CUDA tensors", "'torch'")
    assert any(all(e in r for e in expected) for r in reasons), reasons


@pytest.mark.parametrize("op, make", [("sketched_linear", linear_args), ("sketched_conv2d", conv_args)])
def test_float64_is_refused_with_advice(op, make):
    reasons = " ".join(CudaBackend().reasons_cannot_run(op, *make(dtype=torch.float64)))
    assert "dtype float64 is not supported" in reasons and "use backend 'torch' for float64" in reasons


def test_ops_it_lacks_are_refused():
    assert any("does not implement" in r for r in CudaBackend().reasons_cannot_run("rfa_attention"))


def test_auto_measures_the_kernels_but_the_fixed_bids_never_pick_them():
    """Offered to auto (a bid, not None: measured auto times the kernels) with a fixed bid below torch's, so
    that auto without measuring keeps to the other backends."""
    from panther.backends.torch_backend import TorchBackend

    be = CudaBackend()
    torch_bid = TorchBackend().auto_priority("sketched_linear", *linear_args())
    for op, args in (("sketched_linear", linear_args()), ("sketched_conv2d", conv_args())):
        bid = be.auto_priority(op, *args)
        assert bid is not None and bid < torch_bid
