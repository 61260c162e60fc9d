"""benchmarks/harness/timing.py on the CPU: Clock.measure's interleaving, repetition counts and failures."""

import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

from harness import timing  # noqa: E402
from harness.timing import Budget, Clock  # noqa: E402

BUDGET = Budget(warmup_calls=1, warmup_s=0.0, run_s=1.0, min_reps=6, max_reps=30)


class FakeClock:
    """perf_counter of a host whose calls cost what they say: each call advances it."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now


@pytest.fixture
def fake_time(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(timing, "time", clock)
    return clock


def test_repetitions_are_shuffled_so_no_call_always_follows_the_same_one(fake_time):
    order = []

    def call(name, seconds):
        def fn():
            order.append(name)
            fake_time.now += seconds
        return fn

    calls = {"a": (call("a", 0.1), None), "b": (call("b", 0.1), None), "c": (call("c", 0.05), None)}
    got = Clock(torch.device("cpu")).measure(calls, BUDGET)
    timed = order[3:]  # after one warm-up call each
    assert Counter(timed) == {"a": 10, "b": 10, "c": 20}  # run_s over each call's time
    assert {n: r["reps"] for n, r in got.items()} == {"a": 10, "b": 10, "c": 20}
    assert got["a"]["median_ms"] == pytest.approx(100.0) and got["c"]["median_ms"] == pytest.approx(50.0)
    before = {n: {p for p, q in zip(timed, timed[1:]) if q == n and p != n} for n in "abc"}
    assert before == {"a": {"b", "c"}, "b": {"a", "c"}, "c": {"a", "b"}}  # each after each of the others
    halves = Counter(timed[: len(timed) // 2])
    assert all(2 <= halves[n] <= 3 * Counter(timed)[n] // 4 for n in "abc")  # spread over the whole timing


def test_the_order_is_the_same_from_run_to_run(fake_time):
    def run():
        order = []
        calls = {n: (lambda n=n: order.append(n), None) for n in "xyz"}
        Clock(torch.device("cpu")).measure(calls, Budget(1, 0.0, 0.0, 8, 8))
        return order

    assert run() == run()


def test_a_call_that_raises_gets_its_exception_and_the_others_go_on(fake_time):
    count = {"n": 0}

    def flaky():
        count["n"] += 1
        if count["n"] > 3:  # the warm-up and two timed calls pass
            raise RuntimeError("out of memory")

    calls = {"flaky": (flaky, None), "fine": (lambda: None, None)}
    got = Clock(torch.device("cpu")).measure(calls, Budget(1, 0.0, 0.0, 8, 8))
    assert isinstance(got["flaky"], RuntimeError) and count["n"] == 4  # not called again after it raised
    assert got["fine"]["reps"] == 8
