"""Backend discovery, selection and dispatch, with the test-only plugin distributions of tests/plugins/.

Those distributions (panther-test-healthy: backends ``healthy`` and ``picky``; panther-test-broken: a
backend that raises on import; panther-test-reference64: backend ``reference64``, the float64 references
at the lowest priority) are installed by the test environment (tox.ini).
"""

import os
import subprocess
import sys
import threading

import pytest
import torch

import panther
import panther.ops
from panther.backends import registry
from panther_test_healthy import HealthyBackend, PickyBackend


@pytest.fixture(autouse=True)
def _clean_selection(monkeypatch):
    monkeypatch.delenv("PANTHER_BACKEND", raising=False)
    registry._default = None
    yield
    registry._default = None


def _linear_inputs(I=8, O=5, L=2, k=3):
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(4, I, generator=g),
        torch.randn(L, I, k, generator=g),
        torch.randn(L, k, O, generator=g),
        torch.randn(L, k, O, generator=g),
        torch.randn(L, I, k, generator=g),
        torch.randn(O, generator=g),
    )


def test_discovery_finds_reference_and_plugins():
    infos = {i.name: i for i in registry.backend_infos()}
    assert {"torch", "healthy", "picky", "broken", "reference64"} <= set(infos)
    assert infos["torch"].distribution == "panther-randnla-core"
    assert infos["healthy"].distribution == "panther-test-healthy"
    assert infos["reference64"].distribution == "panther-test-reference64"
    assert panther.available_backends()[:1] == ["picky"]  # highest priority first
    assert panther.available_backends()[-1:] == ["reference64"]  # lowest: auto never picks it
    assert "torch" in panther.available_backends() and "broken" not in panther.available_backends()


def test_broken_plugin_is_recorded_and_skipped():
    info = {i.name: i for i in registry.backend_infos()}["broken"]
    assert info.backend is None and not info.available
    assert "ImportError: panther_test_broken is deliberately broken" in info.load_error
    assert "Traceback" in info.load_traceback
    with pytest.raises(panther.BackendError, match="'broken'.*cannot run: failed to load: ImportError.*deliberately broken"):
        panther.set_backend("broken")
    with pytest.raises(panther.BackendError, match="deliberately broken"):
        with panther.use_backend("broken"):
            pass


def test_import_is_lazy_and_survives_broken_plugin():
    code = "import panther, sys; from panther.backends import registry; print(registry._registry is None)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_info_lists_every_backend_with_status():
    out = subprocess.run([sys.executable, "-m", "panther", "info"], capture_output=True, text=True, check=True).stdout
    lines = {line.split()[0]: line for line in out.splitlines() if line.split()}
    assert "available" in lines["torch"] and "panther-randnla-core" in lines["torch"]
    assert "unavailable: failed to load: ImportError: panther_test_broken is deliberately broken" in lines["broken"]
    assert "0.0.1" in lines["healthy"]


def test_discovery_is_cached_and_thread_safe():
    registry.refresh()
    results = []
    threads = [threading.Thread(target=lambda: results.append(registry._discover())) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 8 and all(r is results[0] for r in results)
    assert registry._discover() is results[0]


def test_auto_takes_highest_priority_backend_that_accepts_the_inputs():
    before_picky, before_healthy = PickyBackend.calls, HealthyBackend.calls
    panther.ops.sketched_linear(*_linear_inputs(I=7))
    assert PickyBackend.calls == before_picky + 1
    assert registry.select("sketched_linear", *_linear_inputs(I=8)).name == "torch"  # picky refuses I=8
    assert HealthyBackend.calls == before_healthy


def test_auto_follows_each_backends_bid_for_the_inputs(monkeypatch):
    """A backend that accepts inputs may bid lower for them (auto_priority): auto then takes the best bid,
    the walk still stops early, and an explicit selection still runs the lower bidder."""
    x7 = _linear_inputs(I=7)
    monkeypatch.setattr(PickyBackend, "auto_priority", lambda self, op, *a, **k: -7, raising=False)
    assert registry.select("sketched_linear", *x7).name == "torch"  # picky bids -7: torch, at its priority 0, wins
    monkeypatch.setattr(HealthyBackend, "auto_priority", lambda self, op, *a, **k: -5, raising=False)
    monkeypatch.setattr("panther.backends.torch_backend.TorchBackend.auto_priority",
                        lambda self, op, *a, **k: -9, raising=False)
    assert registry.select("sketched_linear", *x7).name == "healthy"  # bids: picky -7, torch -9, healthy -5
    monkeypatch.setattr(PickyBackend, "auto_priority", lambda self, op, *a, **k: 3, raising=False)
    asked = []
    monkeypatch.setattr("panther.backends.torch_backend.TorchBackend.reasons_cannot_run",
                        lambda self, op, *a, **k: asked.append(op) or [], raising=False)
    assert registry.select("sketched_linear", *x7).name == "picky"  # 3 beats every static priority below it
    assert asked == []  # so the walk stopped before torch (0) and healthy (-5)
    monkeypatch.setattr(PickyBackend, "auto_priority", lambda self, op, *a, **k: -1, raising=False)
    assert registry.select("sketched_linear", *x7).name == "picky"  # -1 beats torch's -9 and healthy's -5 ...
    assert asked == ["sketched_linear"]  # ... but only once they were asked
    monkeypatch.setattr(PickyBackend, "auto_priority", lambda self, op, *a, **k: -20, raising=False)
    assert registry.select("sketched_linear", *x7, backend="picky").name == "picky"


def test_explicit_choice_is_honoured_or_refused_with_reasons():
    with pytest.raises(panther.BackendError, match="'picky'.*cannot run sketched_linear.*in_features == 7, got 8"):
        with panther.use_backend("picky"):
            panther.ops.sketched_linear(*_linear_inputs(I=8))
    with pytest.raises(panther.BackendError, match="healthy does not implement sketched_conv2d"):
        x = torch.randn(1, 2, 5, 5)
        panther.ops.sketched_conv2d(x, torch.randn(2, 1, 2, 3, 3), torch.randn(2, 1, 4), backend="healthy")


def test_auto_lists_every_backend_when_none_can_run():
    z = torch.zeros(2, 3, dtype=torch.complex64)
    with pytest.raises(panther.BackendError, match="No Panther backend can run sketched_linear") as err:
        registry.select("sketched_linear", z)
    msg = str(err.value)
    assert "torch: dtype torch.complex64 is not supported" in msg and "broken: failed to load" in msg


def test_selection_order_context_then_default_then_env(monkeypatch):
    monkeypatch.setenv("PANTHER_BACKEND", "healthy")
    assert panther.get_backend() == "healthy"
    panther.set_backend("torch")
    assert panther.get_backend() == "torch"
    with panther.use_backend("picky"):
        assert panther.get_backend() == "picky"
        with panther.use_backend("auto"):
            assert panther.get_backend() == "auto"
        assert panther.get_backend() == "picky"
    assert panther.get_backend() == "torch"


def test_environment_variable_selects_backend(monkeypatch):
    monkeypatch.setenv("PANTHER_BACKEND", "healthy")
    before = HealthyBackend.calls
    panther.ops.sketched_linear(*_linear_inputs())
    assert HealthyBackend.calls == before + 1


def test_unknown_backend_from_environment_fails_first_op_naming_it(monkeypatch):
    monkeypatch.setenv("PANTHER_BACKEND", "nope")
    import panther as pr  # noqa: F401  (import still works)

    with pytest.raises(panther.BackendError) as err:
        panther.ops.sketched_linear(*_linear_inputs())
    msg = str(err.value)
    assert "'nope'" in msg and "PANTHER_BACKEND" in msg and "Available backends: picky, torch, healthy" in msg


def test_unknown_name_is_refused_at_once():
    with pytest.raises(panther.BackendError, match="'nope'.*not installed.*Available backends"):
        panther.set_backend("nope")
    with pytest.raises(TypeError, match="backend name"):
        panther.set_backend(3)
    assert panther.get_backend() == "auto"


def test_set_backend_none_gives_the_environment_back(monkeypatch):
    monkeypatch.setenv("PANTHER_BACKEND", "healthy")
    panther.set_backend("auto")
    assert panther.get_backend() == "auto"
    panther.set_backend(None)
    assert panther.get_backend() == "healthy"


def test_use_backend_is_local_to_the_thread():
    seen = {}
    with panther.use_backend("healthy"):
        t = threading.Thread(target=lambda: seen.setdefault("other", panther.get_backend()))
        t.start()
        t.join()
        seen["here"] = panther.get_backend()
    assert seen == {"other": "auto", "here": "healthy"}


def test_cpu_tensors_never_reach_a_backend_that_refuses_them():
    """auto skips refusals silently; the reasons of every backend are in the error when none accepts."""
    x = torch.randn(3, 7)
    be = registry.select("sketched_linear", x, *_linear_inputs(I=7)[1:])
    assert be.name == "picky"


def test_python_m_panther_info_subprocess_env_selection():
    env = {**os.environ, "PANTHER_BACKEND": "torch"}
    out = subprocess.run([sys.executable, "-m", "panther", "info"], capture_output=True, text=True, env=env, check=True)
    assert "selection: torch" in out.stdout


@pytest.mark.parametrize("bad, exc, words", [
    ("", ValueError, "backend must be a backend name such as 'torch' or 'auto', got an empty string"),
    (123, TypeError, "backend must be a backend name (str) such as 'torch' or 'auto', got 123 (int)"),
    (b"torch", TypeError, "got b'torch' (bytes)"),
])
def test_op_backend_argument_is_checked(bad, exc, words):
    with pytest.raises(exc) as err:
        panther.ops.sketched_linear(*_linear_inputs(), backend=bad)
    assert words in str(err.value) and "panther-" not in str(err.value)


def test_set_backend_empty_name():
    with pytest.raises(ValueError, match="name must be a backend name .*empty string"):
        panther.set_backend("")
    with pytest.raises(ValueError, match="empty string"):
        with panther.use_backend(""):
            pass


@pytest.mark.parametrize("value", ["garbage", "broken"])
def test_info_flags_an_unusable_selection_from_the_environment(value):
    env = {**os.environ, "PANTHER_BACKEND": value}
    out = subprocess.run([sys.executable, "-m", "panther", "info"], capture_output=True, text=True, env=env)
    assert out.returncode == 1
    assert f"selection: {value} (from the environment variable PANTHER_BACKEND)" in out.stdout
    reason = "is not installed" if value == "garbage" else "cannot run: failed to load"
    assert f"error: the selection cannot be used, every op call will fail: Panther backend '{value}'" in out.stdout
    assert reason in out.stdout
    assert "torch" in out.stdout  # the table of backends is still printed


def test_a_backend_can_keep_inputs_out_of_auto(monkeypatch):
    """auto_priority None: auto never picks the backend for those inputs, explicit selection still runs it."""
    x7 = _linear_inputs(I=7)
    monkeypatch.setattr(PickyBackend, "auto_priority", lambda self, op, *a, **k: None, raising=False)
    assert registry.select("sketched_linear", *x7).name == "torch"
    assert registry.select("sketched_linear", *x7, backend="picky").name == "picky"
    monkeypatch.setattr("panther.backends.torch_backend.TorchBackend.auto_priority",
                        lambda self, op, *a, **k: None, raising=False)
    monkeypatch.setattr(HealthyBackend, "auto_priority", lambda self, op, *a, **k: None, raising=False)
    assert registry.select("sketched_linear", *x7).name not in ("picky", "torch", "healthy")
