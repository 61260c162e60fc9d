"""auto dispatch by measurement (panther.backends.autotune), on the CPU, through its seam.

The registry is replaced by fake backends that run the reference op and charge two fake clocks (eager
time and device time) with costs of their own; the measurer is replaced by one that counts every CPU call
as a GPU call (or not), says whether a CUDA graph is being captured, and reads those clocks. What is
checked: the faster is chosen (by eager time, and by device time for captured calls), keys, the disk
cache, the switches, tracing, threads, and that measuring leaves results, inputs and the random
generators alone. The real measurer's device-time rounds run here against a simulated device.
"""

import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
import types

import pytest
import torch

import panther
import panther.ops
from panther.backends import autotune, registry
from panther.backends.base import Backend, tensor_reasons
from panther.backends.torch_backend import sketched_linear as reference_linear

CLOCK = [0.0]  # fake milliseconds of eager calls, charged by the fake backends
GPU_CLOCK = [0.0]  # fake milliseconds of device time
CALLS = []  # (backend, op) of every op call


class Fake(Backend):
    """Runs the reference linear; ``offset`` is added to the output so that results tell backends apart."""

    def __init__(self, name, priority, cost, offset=0.0, accepts=lambda x: True, fails=False, gpu_cost=None):
        self.name, self.priority, self.version = name, priority, "1.0"
        self.cost, self.offset, self.accepts, self.fails = cost, offset, accepts, fails
        self.gpu_cost = gpu_cost or cost  # device time: by default the eager time (a device-bound call)

    def reasons_cannot_run(self, op, *args, **kwargs):
        reasons = super().reasons_cannot_run(op) + tensor_reasons(*args)
        if not reasons and not self.accepts(args[0]):
            reasons.append(f"{self.name} refuses x of shape {tuple(args[0].shape)}")
        return reasons

    def sketched_linear(self, x, *rest):
        CALLS.append(self.name)
        CLOCK[0] += self.cost(x)
        GPU_CLOCK[0] += self.gpu_cost(x)
        if self.fails:
            raise RuntimeError(f"{self.name} ran out of memory")
        return reference_linear(x, *rest) + self.offset


class FakeMeasurer(autotune.Measurer):
    """Times each candidate by the fake clocks; ``gpu`` says whether CPU calls count as GPU calls,
    ``capturing`` whether they are being captured into a CUDA graph, ``device_times`` whether the device
    times were measured."""

    def __init__(self, gpu=True, delay_s=0.0, device_times=True):
        self.gpu, self.delay_s, self.device_times, self.timed = gpu, delay_s, device_times, []
        self.capturing = False

    def is_gpu_call(self, args, kwargs):
        return True if self.gpu else super().is_gpu_call(args, kwargs)

    def is_capturing(self, device):
        return self.capturing

    def time(self, runs, device):
        self.timed.append(tuple(runs))
        time.sleep(self.delay_s)  # a wider window for threads to race
        out = {}
        for name, run in runs.items():
            t0, g0 = CLOCK[0], GPU_CLOCK[0]
            try:
                run()
            except Exception as exc:  # noqa: BLE001 - as the real measurer does
                out[name] = exc
                continue
            out[name] = autotune.Timing(CLOCK[0] - t0, GPU_CLOCK[0] - g0 if self.device_times else None)
        return out


def world(monkeypatch, *backends, measurer=None):
    """Install these backends as the only ones found, and the fake measurer; returns the measurer."""
    registry._discover()  # the real discovery first, so that it does not run over the fakes
    found = {be.name: registry.BackendInfo(be.name, "tests", None, be.version, backend=be) for be in backends}
    monkeypatch.setattr(registry, "_registry", found)
    measurer = measurer or FakeMeasurer()
    monkeypatch.setattr(autotune, "measurer", measurer)
    return measurer


@pytest.fixture(autouse=True)
def _clean(monkeypatch, tmp_path):
    for var in ("PANTHER_BACKEND", "PANTHER_AUTOTUNE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PANTHER_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(registry, "_default", None)
    monkeypatch.setattr(autotune, "_default", None)
    autotune.clear_dispatch_cache(disk=False)
    CALLS.clear()
    CLOCK[0] = GPU_CLOCK[0] = 0.0
    yield
    autotune.clear_dispatch_cache(disk=False)


def slow_and_fast(fast_ms=1.0, slow_ms=3.0):
    """``slow`` bids highest (the fixed choice) but costs more than ``fast``."""
    return Fake("slow", 10, lambda x: slow_ms, offset=1.0), Fake("fast", 5, lambda x: fast_ms)


def linear_inputs(rows=6, I=8, O=5, L=2, k=3, grad=False, dtype=torch.float32):
    g = torch.Generator().manual_seed(rows * 1000 + I)
    t = [torch.randn(rows, I, generator=g), torch.randn(L, I, k, generator=g), torch.randn(L, k, O, generator=g),
         torch.randn(L, k, O, generator=g), torch.randn(L, I, k, generator=g), torch.randn(O, generator=g)]
    t = [a.to(dtype) for a in t]
    for i in (0, 1, 2, 5) if grad else ():
        t[i].requires_grad_()
    return t


def chosen(*inputs):
    return registry.select("sketched_linear", *inputs).name


def cache_files(tmp_path):
    return sorted((tmp_path / "cache").glob("dispatch-*.json"))


# --- choice and keys ------------------------------------------------------------------------------


def test_auto_takes_the_measured_faster_where_the_fixed_bid_takes_the_slower(monkeypatch):
    m = world(monkeypatch, *slow_and_fast())
    x = linear_inputs()
    with panther.backends.use_autotune(False):
        assert chosen(*x) == "slow"  # the fixed bids
    assert m.timed == []
    assert chosen(*x) == "fast"
    assert m.timed == [("slow", "fast")]  # both measured, in the registry's order
    ((_, key), entry), = autotune._table.items()
    assert entry.winner == "fast" and entry.fixed == "slow"
    assert entry.times_ms == {"slow": 3.0, "fast": 1.0} and entry.gpu_ms == entry.times_ms
    assert entry.gpu_winner == "fast"
    assert key.startswith("sketched_linear[slow,fast] dtype=float32 rows=8 in=8 out=8 L=2 k=3 bias=True grad=none")


def test_the_faster_wins_whichever_bids_higher(monkeypatch):
    world(monkeypatch, Fake("slow", 10, lambda x: 1.0, offset=1.0), Fake("fast", 5, lambda x: 2.0))
    assert chosen(*linear_inputs()) == "slow"  # "slow" measured faster here: the fixed choice stands


def test_a_key_is_measured_once_and_reused_within_its_bucket(monkeypatch):
    m = world(monkeypatch, *slow_and_fast())
    assert chosen(*linear_inputs(rows=5)) == "fast"
    assert chosen(*linear_inputs(rows=5)) == "fast"
    assert chosen(*linear_inputs(rows=7)) == "fast"  # rows 5 and 7: both in the bucket 8
    assert chosen(*linear_inputs(rows=8, I=7, O=6)) == "fast"  # features 7, 8 and 5, 6: buckets 8
    assert len(m.timed) == 1
    for other in (dict(rows=9), dict(I=9), dict(O=9), dict(L=3), dict(k=4), dict(grad=True), dict(dtype=torch.float64)):
        before = len(m.timed)
        assert chosen(*linear_inputs(**other)) == "fast"
        assert len(m.timed) == before + 1, other
    x = linear_inputs()
    x[5] = None  # no bias
    chosen(*x)
    assert len(m.timed) == 9


def test_inputs_needing_gradients_and_grad_mode_are_part_of_the_key(monkeypatch):
    m = world(monkeypatch, *slow_and_fast())
    chosen(*linear_inputs(grad=True))
    with torch.no_grad():  # the same tensors, no gradients needed: another key
        chosen(*linear_inputs(grad=True))
    x = linear_inputs(grad=True)
    x[0].requires_grad_(False)  # the first layer's input: another key
    chosen(*x)
    keys = sorted(k for _, k in autotune._table)
    assert len(m.timed) == 3
    assert [k.split(" grad=")[1].split()[0] for k in keys] == ["S1s,S2s,bias", "none", "x,S1s,S2s,bias"]


def test_keys_of_conv_and_attention_bucket_the_sizes_and_keep_the_rest():
    def conv(N=3, H=10, W=9, stride=(1, 1), k=2, grad=False, layout=False):
        x = torch.randn(N, 4, H, W).to(memory_format=torch.channels_last if layout else torch.contiguous_format)
        x.requires_grad_(grad)
        return autotune.call_fields("sketched_conv2d", (x, torch.randn(2, k, 4, 3, 3), torch.randn(2, k, 6), None,
                                                        stride, (1, 1), (1, 1)), {})

    assert conv() == conv(N=4, H=16, W=15)
    for other in (dict(N=5), dict(H=17), dict(stride=(2, 1)), dict(k=3), dict(grad=True), dict(layout=True)):
        assert conv(**other) != conv(), other
    assert dict(conv(layout=True))["layout"] == "channels_last" and dict(conv())["layout"] is None
    assert dict(conv())["kernel"] == (3, 3) and dict(conv())["H"] == 16

    def attn(B=2, H=3, T=10, S=10, D=8, m=16, causal=False, mask=False):
        q, k, v = torch.randn(B, H, T, D), torch.randn(B, H, S, D), torch.randn(B, H, S, D)
        kpm = torch.zeros(B, S, dtype=torch.bool) if mask else None
        return autotune.call_fields("rfa_attention", (q, k, v, torch.randn(m, D), causal, "softmax", kpm), {})

    assert attn() == attn(B=1, H=7, T=16, S=9)  # B*H 6 and 7: bucket 8
    for other in (dict(B=3), dict(T=17), dict(S=17), dict(D=9), dict(m=17), dict(causal=True), dict(mask=True)):
        assert attn(**other) != attn(), other


def test_a_call_of_a_remembered_signature_runs_its_backend_without_asking_again(monkeypatch):
    asked = []

    class Counting(Fake):
        def reasons_cannot_run(self, op, *args, **kwargs):
            asked.append(self.name)
            return super().reasons_cannot_run(op, *args, **kwargs)

    m = world(monkeypatch, Counting("slow", 10, lambda x: 3.0, offset=1.0), Counting("fast", 5, lambda x: 1.0))
    x = linear_inputs()
    assert chosen(*x) == "fast" and len(m.timed) == 1
    asked.clear()
    assert chosen(*x) == "fast" and chosen(*linear_inputs()) == "fast"
    assert asked == []  # remembered: exactly this signature was accepted
    # anything a backend's answer may follow from is part of the signature: each of these asks again
    others = {
        "another dtype of a tensor after the first": lambda t: t.__setitem__(5, t[5].double()),
        "the first tensor's layout": lambda t: t.__setitem__(0, t[0].t().contiguous().t()),
        "gradients needed by a tensor after the first": lambda t: t[2].requires_grad_(),
    }
    for what, change in others.items():
        x = linear_inputs()
        change(x)
        asked.clear()
        registry.select("sketched_linear", *x)
        assert asked, what
    asked.clear()
    registry.select("sketched_linear", *linear_inputs()[:5], bias=None)
    registry.select("sketched_linear", *linear_inputs()[:5], bias=None)
    assert asked == ["slow", "fast"]  # keyword arguments are remembered too, with their names
    assert len(m.timed) == 3  # new keys: gradients of S2s, and no bias (the others keep linear's key)
    # how float32 products compute is read on every float32 call: a change of either flag asks again
    precision, cudnn_tf32 = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    flags = {
        "float32 matmul precision": lambda: torch.set_float32_matmul_precision(
            "medium" if precision != "medium" else "highest"),
        "cuDNN's TF32": lambda: setattr(torch.backends.cudnn, "allow_tf32", not cudnn_tf32),
    }
    try:
        for what, change in flags.items():
            change()
            asked.clear()
            registry.select("sketched_linear", *linear_inputs())
            assert asked, what
    finally:
        torch.set_float32_matmul_precision(precision)
        torch.backends.cudnn.allow_tf32 = cudnn_tf32
    asked.clear()
    registry.select("sketched_linear", *linear_inputs())
    assert asked == []  # the flags as they were: remembered


def test_backends_discovered_again_are_asked_again(monkeypatch):
    m = world(monkeypatch, *slow_and_fast())
    x = linear_inputs()
    assert chosen(*x) == "fast"
    picky = Fake("fast", 5, lambda x: 1.0, accepts=lambda x: False)  # an upgrade that refuses these inputs
    world(monkeypatch, slow_and_fast()[0], picky, measurer=m)
    assert chosen(*x) == "slow"


def test_a_backend_refusing_the_inputs_is_never_measured_nor_chosen(monkeypatch):
    picky = Fake("picky", 20, lambda x: 0.1, accepts=lambda x: x.shape[0] == 6)
    m = world(monkeypatch, picky, *slow_and_fast())
    assert chosen(*linear_inputs(rows=6)) == "picky"
    assert chosen(*linear_inputs(rows=7)) == "fast"  # same bucket, but picky refuses 7 rows: another key
    assert m.timed == [("picky", "slow", "fast"), ("slow", "fast")]


def test_a_failing_candidate_is_left_out_and_nothing_is_written(monkeypatch, tmp_path):
    world(monkeypatch, Fake("broken", 10, lambda x: 0.1, fails=True), Fake("ok", 5, lambda x: 1.0))
    assert chosen(*linear_inputs()) == "ok"
    (entry,) = autotune._table.values()
    assert entry.errors == {"broken": "RuntimeError: broken ran out of memory"} and entry.times_ms == {"ok": 1.0}
    assert cache_files(tmp_path) == []  # measured again by the next process


# --- CUDA graphs: the device-time winner ------------------------------------------------------------


def launchy_and_kernely():
    """``launchy``: costly launches, fast kernels; ``kernely``: cheap launches, slow kernels. Eager calls
    (host-bound here) favour kernely, CUDA graphs (device time only) favour launchy."""
    return (Fake("launchy", 10, lambda x: 3.0, gpu_cost=lambda x: 0.5, offset=1.0),
            Fake("kernely", 5, lambda x: 1.2, gpu_cost=lambda x: 1.0))


def test_captured_calls_run_the_device_time_winner_and_eager_calls_the_eager_one(monkeypatch):
    m = world(monkeypatch, *launchy_and_kernely())
    x = linear_inputs()
    assert chosen(*x) == "kernely"  # eager: measured
    (entry,) = autotune._table.values()
    assert entry.times_ms == pytest.approx({"launchy": 3.0, "kernely": 1.2})
    assert entry.gpu_ms == pytest.approx({"launchy": 0.5, "kernely": 1.0})
    assert (entry.winner, entry.gpu_winner) == ("kernely", "launchy")
    m.capturing = True
    assert chosen(*x) == "launchy"  # captured: the same entry, its device-time winner
    m.capturing = False
    assert chosen(*x) == "kernely"  # each regime remembers its own pick
    m.capturing = True
    assert chosen(*x) == "launchy"
    assert len(m.timed) == 1


def test_a_captured_call_with_nothing_cached_takes_the_fixed_bid_without_measuring(monkeypatch):
    m = world(monkeypatch, *launchy_and_kernely())
    m.capturing = True
    assert chosen(*linear_inputs()) == "launchy"  # the fixed bid (a coincidence of this pair)
    assert m.timed == [] and autotune._table == {}
    m.capturing = False
    assert chosen(*linear_inputs()) == "kernely"  # not remembered from the captured call: measured now
    assert len(m.timed) == 1


def test_without_device_times_captured_calls_run_the_eager_winner(monkeypatch):
    m = world(monkeypatch, *launchy_and_kernely(), measurer=FakeMeasurer(device_times=False))
    chosen(*linear_inputs())
    (entry,) = autotune._table.values()
    assert entry.gpu_ms == {} and entry.gpu_winner == ""
    m.capturing = True
    assert chosen(*linear_inputs()) == "kernely"


def test_device_times_rank_the_candidates_that_have_one(monkeypatch):
    class Partial(FakeMeasurer):  # launchy could not be timed so (it synchronises: it cannot be captured either)
        def time(self, runs, device):
            out = super().time(runs, device)
            out["launchy"] = autotune.Timing(out["launchy"].eager_ms, None)
            return out

    m = world(monkeypatch, *launchy_and_kernely(), measurer=Partial())
    chosen(*linear_inputs())
    (entry,) = autotune._table.values()
    assert entry.gpu_ms == pytest.approx({"kernely": 1.0}) and entry.gpu_winner == "kernely"
    m.capturing = True
    assert chosen(*linear_inputs()) == "kernely"


def test_a_cached_device_time_winner_runs_once_before_any_capture(monkeypatch):
    """Read back from the disk cache, the device-time winner has not run in this process: the first eager call
    runs it once (its one-time setup must not happen during a capture); a capture before that runs the eager
    winner."""
    m = world(monkeypatch, *launchy_and_kernely())
    x = linear_inputs()
    chosen(*x)  # measured (every candidate ran) and written
    autotune.clear_dispatch_cache(disk=False)  # a fresh process: the file stays
    CALLS.clear()
    m.capturing = True
    assert chosen(*x) == "kernely" and CALLS == []  # launchy never ran here: not captured first
    m.capturing = False
    assert chosen(*x) == "kernely" and CALLS == ["launchy"]  # eager, and launchy run once on copies
    assert chosen(*x) == "kernely" and CALLS == ["launchy"]  # once
    m.capturing = True
    assert chosen(*x) == "launchy"
    assert len(m.timed) == 1  # nothing measured again


class SimDevice:
    """A host and a device, in simulated milliseconds, behind torch.cuda's calls that the real measurer
    makes. A call costs host time, then queues device work, which starts when the device is free and
    not before it was queued; events stamp the moment the device reaches them. ``_sleep`` runs at
    ``actual_hz`` while the device reports ``clock_rate`` kHz. A capture runs the call without its cost
    (synchronising raises, as in a real capture) and returns a replay that costs ``replays[call]``
    ((host ms, device ms)), else what the call costs. ``pools`` lists the pools handed out, ``used`` the
    pool of each capture attempted."""

    def __init__(self, monkeypatch, clock_khz=1_000_000, actual_hz=1e9):
        self.host = self.free = 0.0
        self.clock_khz, self.actual_hz, self.sleeps = clock_khz, actual_hz, []
        self.capturing, self.captured, self.attempted, self.replays, self.mark = False, [], [], {}, 0
        self.pools, self.used = [], []
        sim = self

        class Event:
            def __init__(self, enable_timing=False):
                self.at = None

            def record(self):
                self.at = max(sim.host, sim.free)

            def query(self):
                return self.at <= sim.host

            def elapsed_time(self, end):
                return end.at - self.at

        monkeypatch.setattr(torch.cuda, "Event", Event)
        monkeypatch.setattr(torch.cuda, "synchronize", self.synchronize)
        monkeypatch.setattr(autotune.Measurer, "_capture", staticmethod(self.capture))
        monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: self.pools.append(f"pool{len(self.pools)}")
                            or self.pools[-1])
        monkeypatch.setattr(torch.cuda, "_sleep", self.sleep)
        monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: types.SimpleNamespace(clock_rate=clock_khz))
        monkeypatch.setattr(autotune, "time", types.SimpleNamespace(perf_counter=lambda: self.host / 1e3))

    def synchronize(self, *args):
        if self.capturing:
            raise RuntimeError("operation not permitted when stream is capturing")
        self.host = max(self.host, self.free)

    def capture(self, run, device, pool):
        self.attempted.append(run)
        self.used.append(pool)
        saved, self.capturing = (self.host, self.free), True
        try:
            run()
        finally:
            (self.host, self.free), self.capturing = saved, False
        self.captured.append(run)
        self.mark = len(self.sleeps)  # the device-time rounds' waits follow the last capture
        if run in self.replays:
            return lambda: self.call(*self.replays[run])
        return run

    @property
    def round_sleeps(self):
        return self.sleeps[self.mark:]

    def call(self, host_ms, device_ms):
        self.host += host_ms
        self.free = max(self.host, self.free) + device_ms

    def sleep(self, cycles):
        self.sleeps.append(cycles)
        self.call(0.0, cycles / self.actual_hz * 1e3)


def test_the_measurer_times_device_work_alone_behind_a_device_side_wait(monkeypatch):
    sim = SimDevice(monkeypatch)
    runs = {"launchy": lambda: sim.call(2.0, 0.1), "kernely": lambda: sim.call(0.05, 1.0),
            "fails": lambda: (_ for _ in ()).throw(RuntimeError("no"))}
    got = autotune.Measurer().time(runs, torch.device("cpu"))
    assert isinstance(got["fails"], RuntimeError)
    assert got["launchy"].eager_ms == pytest.approx(2.1) and got["kernely"].eager_ms == pytest.approx(1.05)
    assert got["launchy"].gpu_ms == pytest.approx(0.1) and got["kernely"].gpu_ms == pytest.approx(1.0)
    # before capture, each queued once behind a wait of twice its own queuing plus 1 ms (5 and 1.1 ms) ...
    assert sim.sleeps[:sim.mark] == [pytest.approx(5e6, abs=2), pytest.approx(1.1e6, abs=2)]
    # ... then the wait covers twice the host's queuing of a round (2.05 ms), plus 1 ms: one try per round
    rounds = sim.round_sleeps
    assert len(set(rounds)) == 1 and rounds[0] == pytest.approx((1e-3 + 2 * 2.05e-3) * 1e9, abs=2)


def test_a_wait_too_short_is_doubled_until_the_host_gets_ahead(monkeypatch):
    sim = SimDevice(monkeypatch, actual_hz=8e9)  # the wait runs 8x faster than the reported clock
    runs = {"launchy": lambda: sim.call(2.0, 0.1), "kernely": lambda: sim.call(0.05, 1.0)}
    got = autotune.Measurer().time(runs, torch.device("cpu"))
    assert got["launchy"].gpu_ms == pytest.approx(0.1) and got["kernely"].gpu_ms == pytest.approx(1.0)
    # before capture: launchy's 5 ms as reported run 0.63 ms, shorter than its 2 ms of queuing; doubled,
    # still; 20 ms (2.5 ms as run) is enough; kernely's 1.1 ms (0.14 as run) outlasts its 0.05 ms at once
    assert sim.sleeps[:sim.mark] == [pytest.approx(v * 1e6, abs=4) for v in (5, 10, 20, 1.1)]
    rounds = sim.round_sleeps
    first = rounds[0]
    assert first == pytest.approx((1e-3 + 2 * 2.05e-3) * 1e9, abs=2)
    # 5.1 ms as reported, 0.64 ms as run: shorter than launchy's 2 ms of queuing; doubled, still; then enough
    assert rounds[1:3] == [pytest.approx(2 * first, abs=2), pytest.approx(4 * first, abs=4)]
    assert len(set(rounds[3:])) == 1 and rounds[3] == pytest.approx(4 * first, abs=4)


def test_device_times_stay_unknown_when_the_host_never_gets_ahead(monkeypatch):
    sim = SimDevice(monkeypatch, actual_hz=1e15)  # the wait takes no time at all
    runs = {"launchy": lambda: sim.call(2.0, 0.1), "kernely": lambda: sim.call(0.05, 1.0)}
    got = autotune.Measurer().time(runs, torch.device("cpu"))
    assert got["launchy"].gpu_ms is None and got["kernely"].gpu_ms is None
    assert got["kernely"].eager_ms == pytest.approx(1.05)
    # each left out before capture, after spin_tries attempts (the wait doubled between them), the waits
    # queued in pieces of 50 ms at most; kernely's 1 ms of work is still queued when its call returns (it
    # does not synchronise), so it is captured, and its replays cannot be queued ahead either
    assert sim.attempted == [runs["kernely"]]
    piece = autotune.Measurer.spin_piece_s * 1e9
    waits = [w * 2 ** i for w in (5e-3, 1.1e-3) for i in range(autotune.Measurer.spin_tries)]
    before = sim.sleeps[:sim.mark]
    assert max(sim.sleeps) <= piece + 1 and sum(before) == pytest.approx(sum(waits) * 1e9, rel=1e-6)


def test_a_replay_the_host_cannot_queue_ahead_is_left_out(monkeypatch):
    sim = SimDevice(monkeypatch)
    runs = {"slow_replay": lambda: sim.call(0.05, 0.2), "kernely": lambda: sim.call(0.05, 1.0)}
    sim.replays[runs["slow_replay"]] = (3000.0, 0.2)  # its graph's launch outlasts the longest wait (2 s)
    got = autotune.Measurer().time(runs, torch.device("cpu"))
    assert got["slow_replay"].gpu_ms is None and got["slow_replay"].eager_ms == pytest.approx(0.25)
    assert got["kernely"].gpu_ms == pytest.approx(1.0)
    assert max(sim.round_sleeps) <= autotune.Measurer.spin_piece_s * 1e9 + 1  # the waits, in pieces


def test_a_candidate_that_synchronises_gets_no_device_time(monkeypatch):
    sim = SimDevice(monkeypatch)
    runs = {"launchy": lambda: sim.call(2.0, 0.1), "syncy": lambda: (sim.call(0.05, 0.2), torch.cuda.synchronize()),
            "kernely": lambda: sim.call(0.05, 1.0)}
    got = autotune.Measurer().time(runs, torch.device("cpu"))
    assert runs["syncy"] not in sim.attempted  # found to synchronise first: never captured
    assert got["syncy"].gpu_ms is None and got["syncy"].eager_ms == pytest.approx(0.25)
    assert got["launchy"].gpu_ms == pytest.approx(0.1) and got["kernely"].gpu_ms == pytest.approx(1.0)


def test_a_candidate_that_fills_the_launch_queue_is_captured_and_timed_by_its_replay(monkeypatch):
    """More launches than the device's queue holds keep the host waiting on the device, so no wait gets the
    host ahead of such a call; but its work is still queued when it returns (it does not synchronise): it is
    captured, and its graph, one launch, is timed as the others'."""
    sim = SimDevice(monkeypatch)

    def floods():
        for _ in range(100):
            sim.call(0.01, 0.5)
            sim.host = max(sim.host, sim.free - 5.0)  # the queue holds 5 ms of its work: the host waits for room

    runs = {"floods": floods, "kernely": lambda: sim.call(0.05, 1.0), "syncy": lambda: (sim.call(0.05, 0.2),
                                                                                       torch.cuda.synchronize())}
    sim.replays[floods] = (0.01, 40.0)  # replayed, its kernels without the gaps between launches
    got = autotune.Measurer().time(runs, torch.device("cpu"))
    assert sim.captured == [runs["floods"], runs["kernely"]]  # syncy: idle when it returns, never captured
    assert got["floods"].eager_ms == pytest.approx(50.0, rel=0.01) and got["floods"].gpu_ms == pytest.approx(40.0)
    assert got["kernely"].gpu_ms == pytest.approx(1.0) and got["syncy"].gpu_ms is None


def test_a_failed_capture_leaves_its_pool_and_the_others_are_captured(monkeypatch):
    sim = SimDevice(monkeypatch)

    def breaks():  # queues ahead of the device, but does what a capture forbids
        sim.call(0.05, 0.2)
        if sim.capturing:
            raise RuntimeError("operation not permitted when stream is capturing")

    runs = {"a": lambda: sim.call(0.05, 0.3), "breaks": breaks, "b": lambda: sim.call(0.05, 0.4),
            "c": lambda: sim.call(0.05, 0.5)}
    got = autotune.Measurer().time(runs, torch.device("cpu"))
    assert got["breaks"].gpu_ms is None and got["breaks"].eager_ms == pytest.approx(0.25)
    assert [got[n].gpu_ms for n in "abc"] == pytest.approx([0.3, 0.4, 0.5])
    assert sim.used == ["pool0", "pool0", "pool1", "pool1"]  # shared, but not the pool of a failed capture


def test_a_failed_captures_pool_is_released_only_where_it_was_still_recording(monkeypatch):
    """torch's capture_end stops recording to the pool, then may still fail (the graph then releases the pool
    when destroyed): released again here, a pool shared with a live graph could be freed under it."""
    calls = []

    def end(index, pool):
        calls.append(("end", index, pool))
        if pool == "stopped":
            raise RuntimeError("endAllocatePool: not currently recording to mempool_id")

    monkeypatch.setattr(torch._C, "_cuda_endAllocateToPool", end, raising=False)
    monkeypatch.setattr(torch._C, "_cuda_releasePool", lambda i, p: calls.append(("release", i, p)), raising=False)
    autotune._stop_recording(torch.device("cuda", 1), "recording")
    autotune._stop_recording(torch.device("cuda", 1), "stopped")
    assert calls == [("end", 1, "recording"), ("release", 1, "recording"), ("end", 1, "stopped")]


def test_device_time_is_the_graph_replay_after_an_l2_flush(monkeypatch):
    sim = SimDevice(monkeypatch)
    runs = {"launchy": lambda: sim.call(2.0, 0.5), "kernely": lambda: sim.call(0.05, 0.4)}
    # replayed, launchy's kernels run without the gaps between its launches; kernely's as called
    sim.replays[runs["launchy"]] = (0.01, 0.3)
    flushes = []

    class Flush:  # the L2 flush: device work queued before each timed replay, outside its events
        def zero_(self):
            flushes.append(sim.host)
            sim.call(0.001, 0.06)

    monkeypatch.setattr(autotune.Measurer, "_flush_buffer", lambda self, device: Flush())
    m = autotune.Measurer()
    got = m.time(runs, torch.device("cpu"))
    assert sim.captured == [runs["launchy"], runs["kernely"]] and sim.used == ["pool0", "pool0"]  # one pool
    assert got["launchy"].eager_ms == pytest.approx(2.5) and got["kernely"].eager_ms == pytest.approx(0.45)
    assert got["launchy"].gpu_ms == pytest.approx(0.3) and got["kernely"].gpu_ms == pytest.approx(0.4)
    rounds = int(m.budget_s / 2.5e-3)  # as many as the slower eager call gets timed calls
    assert len(flushes) == 2 * rounds  # one before each timed replay


def test_replays_come_in_a_new_order_every_round(monkeypatch):
    sim = SimDevice(monkeypatch)
    order = []
    runs = {n: (lambda n=n: (order.append(n), sim.call(0.05, 0.2))) for n in "abc"}
    got = autotune.Measurer().time(runs, torch.device("cpu"))
    assert all(got[n].gpu_ms == pytest.approx(0.2) for n in "abc")
    m = autotune.Measurer
    replayed = order[-3 * min(m.max_reps, int(m.budget_s / 0.25e-3)):]  # the rounds: after warm-up, eager, capture
    rounds = [tuple(replayed[i:i + 3]) for i in range(0, len(replayed), 3)]
    assert all(sorted(r) == ["a", "b", "c"] for r in rounds)
    follows = {(r[i], r[i + 1]) for r in rounds for i in range(2)}
    assert len(follows) == 6  # each candidate right after each of the others


def test_the_flush_buffer_is_twice_the_l2_cache(monkeypatch):
    props = types.SimpleNamespace(clock_rate=1_000_000, L2_cache_size=3 * 2**10)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: props)
    assert autotune.Measurer()._flush_buffer(torch.device("cpu")).numel() == 6 * 2**10
    props.L2_cache_size = 0  # unknown: no flush
    assert autotune.Measurer()._flush_buffer(torch.device("cpu")) is None
    props.L2_cache_size = 2**10

    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(torch, "empty", no_memory)
    assert autotune.Measurer()._flush_buffer(torch.device("cpu")) is None  # the measurement goes on


# --- where it never measures -----------------------------------------------------------------------


def test_cpu_calls_never_measure(monkeypatch):
    m = world(monkeypatch, *slow_and_fast(), measurer=FakeMeasurer(gpu=False))
    assert chosen(*linear_inputs()) == "slow"  # the fixed bid
    assert m.timed == [] and autotune._table == {}


def test_a_single_candidate_is_never_measured(monkeypatch):
    only = Fake("only", 10, lambda x: 1.0)
    m = world(monkeypatch, only, Fake("none", 20, lambda x: 1.0, accepts=lambda x: False))
    assert chosen(*linear_inputs()) == "only"
    assert m.timed == []


@pytest.mark.parametrize("how", ["env", "set_autotune", "use_autotune"])
def test_switched_off_it_keeps_the_fixed_bids(monkeypatch, how):
    m = world(monkeypatch, *slow_and_fast())
    x = linear_inputs()
    if how == "env":
        monkeypatch.setenv("PANTHER_AUTOTUNE", "0")
        assert chosen(*x) == "slow"
        panther.backends.set_autotune(True)  # overrides the environment
        assert chosen(*x) == "fast"
    elif how == "set_autotune":
        panther.backends.set_autotune(False)
        assert not panther.backends.autotune_enabled()
        assert chosen(*x) == "slow"
        with panther.backends.use_autotune(True):  # the context wins over the process default
            assert chosen(*x) == "fast"
        assert chosen(*x) == "slow"  # measured, but off: the fixed bid
        panther.backends.set_autotune(None)
        assert chosen(*x) == "fast"
    else:
        with panther.backends.use_autotune(False):
            assert chosen(*x) == "slow"
        assert chosen(*x) == "fast"
    assert len(m.timed) == 1


def test_switch_arguments_are_checked(monkeypatch):
    with pytest.raises(TypeError, match="enabled must be a bool, got 'no'"):
        panther.backends.set_autotune("no")
    with pytest.raises(TypeError, match="enabled must be a bool, got 1"):
        with panther.backends.use_autotune(1):
            pass
    monkeypatch.setenv("PANTHER_AUTOTUNE", "maybe")
    with pytest.raises(ValueError, match="PANTHER_AUTOTUNE must be 1 or 0.*got 'maybe'"):
        panther.backends.autotune_enabled()
    for off in ("0", "false", "OFF", " no "):
        monkeypatch.setenv("PANTHER_AUTOTUNE", off)
        assert not panther.backends.autotune_enabled()


def test_an_explicit_backend_is_never_measured(monkeypatch):
    m = world(monkeypatch, *slow_and_fast())
    with panther.use_backend("slow"):
        assert chosen(*linear_inputs()) == "slow"
    assert registry.select("sketched_linear", *linear_inputs(), backend="slow").name == "slow"
    assert m.timed == []


def test_fake_tensors_are_never_measured(monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode

    m = world(monkeypatch, *slow_and_fast())
    with FakeTensorMode() as mode:
        x = [mode.from_tensor(t) for t in linear_inputs()]
        assert chosen(*x) == "slow"
    assert m.timed == []
    chosen(*linear_inputs())  # measured in eager mode ...
    with FakeTensorMode() as mode:
        x = [mode.from_tensor(t) for t in linear_inputs()]
        assert chosen(*x) == "fast"  # ... then tracing uses the cached choice
    assert len(m.timed) == 1


def model_fn(*x):
    return torch.nn.functional.gelu(panther.ops.sketched_linear(*x)) * 2


@pytest.mark.parametrize("dynamic", [False, True])
def test_torch_compile_never_measures_and_uses_the_cached_choice(monkeypatch, dynamic):
    m = world(monkeypatch, *slow_and_fast())
    torch._dynamo.reset()
    x = linear_inputs(rows=6)
    with panther.backends.use_autotune(False):
        slow_y = model_fn(*x)
    compiled = torch.compile(model_fn, fullgraph=True, backend="eager", dynamic=dynamic)
    torch.testing.assert_close(compiled(*x), slow_y)  # nothing cached: the fixed bid, and no measuring
    assert m.timed == [] and autotune._table == {}

    fast_y = model_fn(*x)  # eager: measured, "fast" wins
    assert len(m.timed) == 1
    torch._dynamo.reset()
    compiled = torch.compile(model_fn, fullgraph=True, backend="eager", dynamic=dynamic)
    CALLS.clear()
    torch.testing.assert_close(compiled(*x), fast_y)  # the cached choice, baked in without a graph break
    x7 = linear_inputs(rows=7)
    torch.testing.assert_close(compiled(*x7), model_fn(*x7))  # same bucket, another size
    assert len(m.timed) == 1 and "slow" not in CALLS


# --- the disk cache -------------------------------------------------------------------------------


def test_measurements_are_written_and_read_back_by_a_fresh_process(monkeypatch, tmp_path):
    fast, slow = Fake("fast", 5, lambda x: 1.0), Fake("slow", 10, lambda x: 3.0, offset=1.0)
    m = world(monkeypatch, slow, fast)
    chosen(*linear_inputs())
    (path,) = cache_files(tmp_path)
    doc = json.loads(path.read_text())
    assert doc["fingerprint"]["backends"] == {"fast": "1.0", "slow": "1.0"}
    assert doc["fingerprint"]["versions"]["torch"] == torch.__version__
    (entry,) = doc["entries"].values()
    assert entry["winner"] == "fast" and entry["times_ms"] == {"slow": 3.0, "fast": 1.0}
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left

    autotune.clear_dispatch_cache(disk=False)  # a fresh process: memory empty, disk kept
    fast.cost = lambda x: 5.0  # would lose now, if measured again
    assert chosen(*linear_inputs()) == "fast"
    assert len(m.timed) == 1


def test_another_process_reads_the_file(monkeypatch, tmp_path):
    world(monkeypatch, *slow_and_fast())
    chosen(*linear_inputs())
    out = subprocess.run([sys.executable, "-m", "panther", "info", "--dispatch"], capture_output=True, text=True,
                         check=True, env={**os.environ, "PANTHER_CACHE_DIR": str(tmp_path / "cache")}).stdout
    assert f"dispatch cache: {tmp_path / 'cache'}" in out
    # written for the fake backends, read where the real ones are installed: listed, marked stale
    assert re.search(r"stale \(.*backends changed\): ignored", out)
    line = next(line for line in out.splitlines() if "sketched_linear[slow,fast]" in line)
    assert line.endswith("-> fast (fixed bid: slow): fast 1 ms, slow 3 ms")


def test_the_report_marks_the_current_file(monkeypatch):
    world(monkeypatch, *slow_and_fast())
    chosen(*linear_inputs())
    report = autotune.cache_report()
    assert "(measuring on)" in report and ": current" in report and "-> fast (fixed bid: slow)" in report
    monkeypatch.setenv("PANTHER_AUTOTUNE", "maybe")
    assert "(measuring error: the environment variable PANTHER_AUTOTUNE must be" in autotune.cache_report()


def test_a_version_change_invalidates_the_cache(monkeypatch, tmp_path):
    slow, fast = slow_and_fast()
    m = world(monkeypatch, slow, fast)
    chosen(*linear_inputs())
    autotune.clear_dispatch_cache(disk=False)
    registry._registry["fast"].version = "1.1"  # an upgrade of one backend
    assert chosen(*linear_inputs()) == "fast"
    assert len(m.timed) == 2  # measured again
    assert len(cache_files(tmp_path)) == 2  # the new versions have a file of their own
    autotune.clear_dispatch_cache(disk=False)
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    chosen(*linear_inputs())
    assert len(m.timed) == 3
    # backends discovered again in the same process (a plugin upgraded): memory is not trusted either
    found = {name: registry.BackendInfo(name, "tests", None, "2.0", backend=i.backend)
             for name, i in registry._registry.items()}
    monkeypatch.setattr(registry, "_registry", found)
    chosen(*linear_inputs())
    assert len(m.timed) == 4


@pytest.mark.parametrize("content", ["{not json", '{"format": 1}', '{"fingerprint": {}, "entries": []}', "\0\1\2"])
def test_a_corrupt_file_is_ignored_and_rewritten(monkeypatch, tmp_path, content):
    m = world(monkeypatch, *slow_and_fast())
    chosen(*linear_inputs())
    (path,) = cache_files(tmp_path)
    path.write_text(content)
    autotune.clear_dispatch_cache(disk=False)
    assert chosen(*linear_inputs()) == "fast"
    assert len(m.timed) == 2
    assert json.loads(path.read_text())["entries"]  # rewritten whole
    assert "unreadable or corrupt" not in autotune.cache_report()


def test_a_corrupt_entry_is_skipped(monkeypatch, tmp_path):
    m = world(monkeypatch, *slow_and_fast())
    chosen(*linear_inputs(rows=4))
    chosen(*linear_inputs(rows=16))
    (path,) = cache_files(tmp_path)
    doc = json.loads(path.read_text())
    first = sorted(doc["entries"])[0]
    doc["entries"][first]["winner"] = "nobody"  # not among the times
    path.write_text(json.dumps(doc))
    autotune.clear_dispatch_cache(disk=False)
    chosen(*linear_inputs(rows=4))
    chosen(*linear_inputs(rows=16))
    assert len(m.timed) == 3  # one of the two measured again


def test_an_unwritable_cache_warns_once_and_keeps_measurements_in_memory(monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("PANTHER_CACHE_DIR", str(blocker / "cache"))  # a folder under a file: mkdir fails
    monkeypatch.setattr(autotune, "_write_warned", False)
    m = world(monkeypatch, *slow_and_fast())
    with pytest.warns(RuntimeWarning, match="cannot write the dispatch cache.*PANTHER_CACHE_DIR"):
        assert chosen(*linear_inputs()) == "fast"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert chosen(*linear_inputs(rows=16)) == "fast"
        assert chosen(*linear_inputs()) == "fast"
    assert len(m.timed) == 2


def test_clear_dispatch_cache_empties_memory_and_disk(monkeypatch, tmp_path):
    m = world(monkeypatch, *slow_and_fast())
    chosen(*linear_inputs())
    (path,) = cache_files(tmp_path)
    assert panther.backends.clear_dispatch_cache() == [path]
    assert cache_files(tmp_path) == [] and autotune._table == {}
    chosen(*linear_inputs())
    assert len(m.timed) == 2


def test_driver_version_is_read_from_either_kernel_module():
    open_module = "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.159.04  Release Build  (nixbld@)\n"
    closed = "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 22:23:56 UTC 2024\n"
    assert autotune.nvidia_driver_version(open_module) == "580.159.04"
    assert autotune.nvidia_driver_version(closed) == "550.54.15"
    assert autotune.nvidia_driver_version("") is None


def test_cache_directory_follows_the_environment(monkeypatch, tmp_path):
    assert autotune.cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("PANTHER_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert autotune.cache_dir() == tmp_path / "xdg" / "panther"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert autotune.cache_dir() == tmp_path / "home" / ".cache" / "panther"


# --- threads, results, inputs, random generators ---------------------------------------------------


def test_inference_mode_measures_the_forward(monkeypatch):
    m = world(monkeypatch, *slow_and_fast())
    x = linear_inputs(grad=True)
    with torch.inference_mode():
        assert chosen(*x) == "fast"
    assert len(m.timed) == 1 and "grad=none" in next(iter(autotune._table))[1]


def test_threads_calling_at_once_measure_once(monkeypatch):
    m = world(monkeypatch, *slow_and_fast(), measurer=FakeMeasurer(delay_s=0.2))
    got, barrier = [], threading.Barrier(8)

    def call():
        barrier.wait()
        got.append(chosen(*linear_inputs()))

    threads = [threading.Thread(target=call) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == ["fast"] * 8 and len(m.timed) == 1


def test_results_are_the_chosen_backends_and_inputs_and_rng_are_untouched(monkeypatch):
    slow, fast = slow_and_fast()
    m = world(monkeypatch, slow, fast)
    x = linear_inputs(grad=True)
    saved = [t.detach().clone() for t in x]
    versions = [t._version for t in x]
    rng = torch.get_rng_state()
    y = panther.ops.sketched_linear(*x)  # measured here (forward and backward), then run on "fast"
    assert len(m.timed) == 1 and autotune._table
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(t.grad is None for t in x)  # the measurement's backward touched copies only
    assert all(torch.equal(t, s) for t, s in zip(x, saved)) and [t._version for t in x] == versions
    torch.testing.assert_close(y, fast.sketched_linear(*x), rtol=0, atol=0)
    y.sum().backward()
    expected = [g.clone() for g in torch.autograd.grad(fast.sketched_linear(*x).sum(), [x[0], x[1], x[2], x[5]])]
    for t, g in zip([x[0], x[1], x[2], x[5]], expected):
        torch.testing.assert_close(t.grad, g, rtol=0, atol=0)


def test_measuring_a_random_backend_leaves_the_rng_alone(monkeypatch):
    class Noisy(Fake):
        def sketched_linear(self, x, *rest):
            CLOCK[0] += 1.0
            return reference_linear(x, *rest) + 0 * torch.rand(())  # draws from the global generator

    world(monkeypatch, Noisy("noisy", 10, None), Fake("fast", 5, lambda x: 0.5))
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    chosen(*linear_inputs())
    torch.testing.assert_close(torch.rand(4), expected, rtol=0, atol=0)


def test_compile_marking_is_what_torch_sets():
    def probe():
        return 0

    before = set(vars(probe))
    torch.compiler.assume_constant_result(probe)
    marks = {k: v for k, v in vars(probe).items() if k not in before}
    assert marks and all(getattr(autotune._compiled_choice, k, None) == v for k, v in marks.items())


def test_a_backend_kept_out_of_auto_is_never_measured(monkeypatch):
    slow, fast = slow_and_fast()
    fast.auto_priority = lambda op, *a, **k: None  # e.g. kernels not yet validated on this device
    m = world(monkeypatch, slow, fast)
    assert chosen(*linear_inputs()) == "slow"
    assert m.timed == []  # one candidate left: nothing to measure
    assert registry.select("sketched_linear", *linear_inputs(), backend="fast").name == "fast"
