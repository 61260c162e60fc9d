"""auto dispatch measures on a real GPU: it avoids a slow backend that the fixed bids would pick.

A test backend ``sleepy`` bids above every other and computes the reference after spinning the GPU for
about a millisecond; auto must measure it slower (CUDA events) and run the fastest competitor instead,
with results equal to that backend's, the caller's tensors and random generators untouched, and
torch.compile using the measured choice. Two more test backends, ``hosty`` (the host sleeps before each
launch, the kernels are quick) and ``spinny`` (a quick launch of a slow kernel), show the two regimes:
eager calls run spinny, calls captured into a CUDA graph run hosty. Marked ``gpu``: skipped without CUDA.
"""

import time

import pytest
import torch

import panther
from panther.backends import Backend, autotune, registry
from panther.backends.torch_backend import sketched_linear as reference_linear
from panther.nn import SKLinear

pytestmark = [pytest.mark.gpu, pytest.mark.filterwarnings("ignore:.*not fewer than the:UserWarning")]

SPIN_CYCLES = 2_000_000  # about 1 ms at H200 clocks: far above the op itself at these sizes
HOST_SLEEP_S = 0.003  # hosty's launch: three times spinny's kernel


class Sleepy(Backend):
    """Correct but slow: the fixed bids pick it (highest priority), a measurement must not."""

    name = "sleepy"
    priority = 1000
    version = "1"

    def reasons_cannot_run(self, op, *args, **kwargs):
        reasons = super().reasons_cannot_run(op)
        if not reasons and any(isinstance(a, torch.Tensor) and a.device.type != "cuda" for a in args):
            reasons.append("sleepy runs on CUDA tensors only")
        return reasons

    def sketched_linear(self, *args):
        torch.cuda._sleep(SPIN_CYCLES)
        return reference_linear(*args)


class Hosty(Sleepy):
    """A slow launch (the host sleeps) of quick kernels: slower eager calls, faster CUDA-graph replays. Its
    output is the reference plus one, so that results tell it from spinny's."""

    name = "hosty"
    priority = 800

    def sketched_linear(self, *args):
        time.sleep(HOST_SLEEP_S)
        return reference_linear(*args) + 1


class Spinny(Sleepy):
    """A quick launch of a slow kernel: faster eager calls, slower CUDA-graph replays."""

    name = "spinny"
    priority = 900  # the fixed bids' choice: a captured call that runs hosty ran the measured winner


def _isolate(monkeypatch, tmp_path, found):
    monkeypatch.setattr(registry, "_registry", found)
    for var in ("PANTHER_BACKEND", "PANTHER_AUTOTUNE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PANTHER_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(registry, "_default", None)
    monkeypatch.setattr(autotune, "_default", None)
    autotune.clear_dispatch_cache(disk=False)


@pytest.fixture
def with_regimes(monkeypatch, tmp_path):
    registry._discover()
    _isolate(monkeypatch, tmp_path, {be.name: registry.BackendInfo(be.name, "tests", None, "1", backend=be)
                                     for be in (Hosty(), Spinny())})
    yield
    autotune.clear_dispatch_cache(disk=False)


@pytest.fixture
def with_sleepy(monkeypatch, tmp_path):
    registry._discover()
    found = dict(registry._registry)
    found["sleepy"] = registry.BackendInfo("sleepy", "tests", None, "1", backend=Sleepy())
    _isolate(monkeypatch, tmp_path, found)
    yield found["sleepy"].backend
    autotune.clear_dispatch_cache(disk=False)


def linear_args(dtype=torch.bfloat16, grad=False, rows=512, features=1024, L=1, k=32):
    g = torch.Generator(device="cuda").manual_seed(0)
    new = lambda *s: torch.randn(*s, device="cuda", dtype=dtype, generator=g)  # noqa: E731
    args = [new(rows, features), new(L, features, k) / 32, new(L, k, features) / 8, new(L, k, features).sign() / 8,
            new(L, features, k).sign() / 8, new(features)]
    for i in (0, 1, 2, 5) if grad else ():
        args[i].requires_grad_()
    return args


def only_entry():
    (entry,) = autotune._table.values()
    return entry


@pytest.mark.parametrize("grad", [False, True], ids=["forward", "forward+backward"])
def test_auto_measures_and_avoids_the_slow_backend_the_fixed_bids_pick(with_sleepy, grad):
    x = linear_args(grad=grad)
    with panther.backends.use_autotune(False):
        assert registry.select("sketched_linear", *x).name == "sleepy"
    chosen = registry.select("sketched_linear", *x)
    entry = only_entry()
    assert "sleepy" in entry.times_ms and len(entry.times_ms) >= 2, entry
    assert entry.fixed == "sleepy" and chosen.name == entry.winner != "sleepy"
    assert entry.times_ms[entry.winner] == min(entry.times_ms.values())
    # the spin shows in CUDA events (the winner's host-bound calls may take most of it: it overlaps them)
    spin_ms = SPIN_CYCLES / torch.cuda.get_device_properties(0).clock_rate  # cycles / kHz
    assert entry.times_ms["sleepy"] > 0.9 * spin_ms
    assert ("grad=x,S1s,S2s,bias" in next(iter(autotune._table))[1]) == grad


def test_results_equal_the_chosen_backends_and_inputs_and_rngs_are_untouched(with_sleepy):
    layer = SKLinear(1024, 1024, 2, 16, device="cuda", dtype=torch.bfloat16, seed=0)
    x = torch.randn(4, 128, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    x_saved, version = x.detach().clone(), x._version
    cpu_rng, cuda_rng = torch.get_rng_state(), torch.cuda.get_rng_state()
    y = layer(x)  # measured here: forward and backward on copies
    winner = only_entry().winner
    assert winner != "sleepy"
    assert torch.equal(torch.get_rng_state(), cpu_rng) and torch.equal(torch.cuda.get_rng_state(), cuda_rng)
    assert torch.equal(x.detach(), x_saved) and x._version == version and x.grad is None
    assert all(p.grad is None for p in layer.parameters())
    y.sum().backward()
    grads = [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
    x.grad = None
    layer.zero_grad(set_to_none=True)
    with panther.use_backend(winner):
        y_forced = layer(x)
        y_forced.sum().backward()
    torch.testing.assert_close(y, y_forced)  # the same backend (its own kernels may accumulate in any order)
    for g, g_forced in zip(grads, [x.grad] + [p.grad for p in layer.parameters()]):
        torch.testing.assert_close(g, g_forced)


def test_later_calls_and_a_fresh_process_reuse_the_measurement(with_sleepy, monkeypatch):
    x = linear_args()
    first = registry.select("sketched_linear", *x).name
    timed = []
    monkeypatch.setattr(autotune.measurer, "time", lambda runs, device: timed.append(runs) or {})
    assert registry.select("sketched_linear", *linear_args(rows=300)).name == first  # same bucket (512)
    autotune.clear_dispatch_cache(disk=False)  # memory gone, the file stays
    assert registry.select("sketched_linear", *x).name == first
    assert timed == []


def test_torch_compile_uses_the_measured_choice_without_graph_breaks(with_sleepy):
    torch._dynamo.reset()
    layer = SKLinear(256, 256, 1, 16, device="cuda", dtype=torch.bfloat16, seed=0).eval()
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        y = layer(x)  # measured
        winner = only_entry().winner
        calls = []
        sleepy = registry._registry["sleepy"].backend
        real = Sleepy.sketched_linear
        sleepy.sketched_linear = lambda *a: calls.append(1) or real(sleepy, *a)
        compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(x), y)
    assert winner != "sleepy" and calls == []


def test_the_cuda_measurer_times_with_events():
    x = torch.randn(256, 256, device="cuda")
    times = autotune.Measurer().time(
        {"spin": lambda: torch.cuda._sleep(SPIN_CYCLES), "matmul": lambda: x @ x,
         "fails": lambda: (_ for _ in ()).throw(RuntimeError("no"))}, x.device)
    assert isinstance(times["fails"], RuntimeError)
    spin, matmul = times["spin"], times["matmul"]
    assert spin.eager_ms > 0.3 and matmul.eager_ms < spin.eager_ms / 3
    assert spin.gpu_ms > 0.3 and matmul.gpu_ms < spin.gpu_ms / 3


def test_a_candidate_that_synchronises_is_never_captured_and_the_stream_is_kept(monkeypatch):
    x = torch.randn(256, 256, device="cuda")
    stream = torch.cuda.current_stream()
    captured, real = [], autotune.Measurer._capture
    monkeypatch.setattr(autotune.Measurer, "_capture",
                        staticmethod(lambda run, *a: captured.append(run) or real(run, *a)))
    runs = {"syncs": lambda: (x @ x).sum().item(), "matmul": lambda: x @ x}
    times = autotune.Measurer().time(runs, x.device)
    assert captured == [runs["matmul"]]  # found to synchronise first: a failed capture would leave state behind
    assert times["syncs"].gpu_ms is None and times["syncs"].eager_ms > 0
    assert 0 < times["matmul"].gpu_ms < 1.0
    assert torch.cuda.current_stream() == stream and not torch.cuda.is_current_stream_capturing()
    torch.testing.assert_close(x @ x, x.double().matmul(x.double()).float(), rtol=1e-2, atol=1e-2)  # usable


def test_a_candidate_of_more_launches_than_the_queue_holds_is_timed_by_its_graph():
    """The host waits for room in the device's launch queue, so no device-side wait gets it ahead of the call
    (as the torch backend's causal attention at 64k tokens); its work is still queued when it returns (it does
    not synchronise): it is captured, and its graph's replays give its device time."""
    x = torch.randn(256, 256, device="cuda")
    runs = {"floods": lambda: [torch.cuda._sleep(20_000) for _ in range(4000)], "matmul": lambda: x @ x}
    times = autotune.Measurer().time(runs, x.device)
    floods = times["floods"]
    assert floods.gpu_ms is not None and 0.5 * floods.eager_ms < floods.gpu_ms < 1.05 * floods.eager_ms
    assert 0 < times["matmul"].gpu_ms < 1.0


def test_a_capture_that_fails_leaves_no_device_time_and_a_usable_process():
    """A candidate that queues ahead of the device but does what a capture forbids (querying the capturing
    stream): its capture fails, it gets no device time, the others are timed, and graphs still work."""
    x = torch.randn(256, 256, device="cuda")
    stream = torch.cuda.current_stream()
    runs = {"queries": lambda: (x @ x, torch.cuda.current_stream().query()), "matmul": lambda: x @ x}
    times = autotune.Measurer().time(runs, x.device)
    assert times["queries"].gpu_ms is None and times["queries"].eager_ms > 0
    assert 0 < times["matmul"].gpu_ms < 1.0
    assert torch.cuda.current_stream() == stream and not torch.cuda.is_current_stream_capturing()
    graph, y = torch.cuda.CUDAGraph(), None
    side = torch.cuda.Stream()
    side.wait_stream(stream)
    with torch.cuda.stream(side):
        x @ x
    stream.wait_stream(side)
    with torch.cuda.graph(graph):
        y = x @ x
    graph.replay()
    torch.testing.assert_close(y, x @ x)


def test_a_failed_capture_gives_back_what_it_allocated():
    """torch's capture_end raises before it stops routing allocations to the capture's pool, which would
    keep that pool, and what the capture allocated there, for the rest of the process."""
    device = torch.device("cuda")

    def allocates_then_queries():
        y = torch.empty(64 << 20, dtype=torch.uint8, device=device).fill_(1)
        del y  # back to the pool before the capture fails (a live traceback would keep it)
        torch.cuda.current_stream().query()

    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_reserved()
    with pytest.raises(Exception):
        autotune.Measurer._capture(allocates_then_queries, device, torch.cuda.graph_pool_handle())
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    assert torch.cuda.memory_reserved() - before < 64 << 20


@pytest.mark.parametrize("grad", [False, True], ids=["forward", "forward+backward"])
def test_eager_calls_run_the_eager_winner_and_captured_calls_the_device_time_winner(with_regimes, grad):
    x = linear_args(grad=grad)
    assert registry.select("sketched_linear", *x).name == "spinny"  # eager: measured here
    entry = only_entry()
    assert (entry.winner, entry.gpu_winner) == ("spinny", "hosty"), entry
    assert entry.times_ms["hosty"] > HOST_SLEEP_S * 1e3 > entry.times_ms["spinny"]  # the host's sleep counts ...
    assert entry.gpu_ms["hosty"] < 0.3 < entry.gpu_ms["spinny"]  # ... the device's time alone does not show it
    with torch.no_grad():
        expected = registry._registry["hosty"].backend.sketched_linear(*x)
        spinny_y = registry._registry["spinny"].backend.sketched_linear(*x)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up before capture, as torch.cuda.graph asks
        registry.dispatch("sketched_linear", *x)
    torch.cuda.current_stream().wait_stream(side)
    graph, picked = torch.cuda.CUDAGraph(), []
    with torch.cuda.graph(graph):  # grad mode as measured: the same key
        picked.append(registry.select("sketched_linear", *x).name)
        y = registry.dispatch("sketched_linear", *x)
    graph.replay()
    torch.cuda.synchronize()
    assert picked == ["hosty"]
    torch.testing.assert_close(y.detach(), expected)  # the replay ran hosty's kernels ...
    assert not torch.allclose(y.detach(), spinny_y)  # ... not spinny's
    assert registry.select("sketched_linear", *x).name == "spinny"  # eager again
    assert len(autotune._table) == 1
