"""The one timing mechanism behind every figure: warm up, then the median of many timed calls.

GPU: CUDA events around each call; before each call the device is synchronised and the L2 flushed by
writing a 256 MiB buffer (outside the events), so repeated calls do not time the cache and no call
hides its host-side work behind the queue of an earlier one (the flush, ~60 us of GPU work, is the same
head start for every implementation). CPU: time.perf_counter around each call
(ops on CPU tensors return when done). Also here: CUDA-graph capture of a call, and its peak memory.
"""

from __future__ import annotations

import dataclasses
import random
import statistics
import time
from typing import Callable, Dict, Hashable, Optional, Tuple, Union

import torch

FLUSH_BYTES = 256 * 2**20  # > 4x the H200's 60 MB L2
Call = Tuple[Callable[[], object], Optional[Callable[[], None]]]  # (fn, before)


@dataclasses.dataclass(frozen=True)
class Budget:
    """How long to spend on one measurement."""

    warmup_calls: int  # at least this many untimed calls ...
    warmup_s: float  # ... and at least this long
    run_s: float  # timed calls: about this long in all, within [min_reps, max_reps] calls
    min_reps: int
    max_reps: int


class Clock:
    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self._flush = torch.empty(FLUSH_BYTES, dtype=torch.int8, device=device) if self.cuda else None

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def measure(self, calls: Dict[Hashable, Call], budget: Budget) -> Dict[Hashable, Union[dict, Exception]]:
        """Median time in ms of each call ``(fn, before)``; ``before()`` runs untimed before each ``fn()``.

        The calls are warmed up one after the other, then timed interleaved, in one random order (seeded)
        of all their repetitions: each call's repetitions spread over the whole timing, so that load from
        other processes, which comes and goes, falls on all of them alike, and no call always follows the
        same neighbour (what ran just before can move a call's time: benchmarks/results/NOTES.md). A call
        that raises gets its exception instead of a timing.
        """
        results: Dict[Hashable, Union[dict, Exception]] = {}
        target = {}
        for key, (fn, before) in calls.items():
            try:
                fastest = self._warm_up(fn, before, budget)
            except Exception as exc:  # noqa: BLE001 - recorded per call, the others go on
                results[key] = exc
                continue
            target[key] = max(budget.min_reps, min(budget.max_reps, int(budget.run_s / max(fastest, 1e-6))))
        stamps = {key: [] for key in target}
        schedule = [key for key, n in target.items() for _ in range(n)]
        random.Random(0).shuffle(schedule)
        for key in schedule:
            if key in results:
                continue
            fn, before = calls[key]
            try:
                stamps[key].append(self._time_one(fn, before))
            except Exception as exc:  # noqa: BLE001
                results[key] = exc
        self.sync()
        for key, st in stamps.items():
            if key in results:
                continue
            times = [self._ms(stamp) for stamp in st]
            q = statistics.quantiles(times, n=5)  # 20th, 40th, 60th, 80th percentiles
            results[key] = {"median_ms": statistics.median(times), "q20_ms": q[0], "q80_ms": q[3], "reps": len(times)}
        return results

    def _warm_up(self, fn, before, budget: Budget) -> float:
        """Untimed calls (compilation, autotuning, allocator); returns the fastest one's seconds."""
        fastest, spent, calls = float("inf"), 0.0, 0
        while calls < budget.warmup_calls or (spent < budget.warmup_s and calls < 100):
            if before:
                before()
            t0 = time.perf_counter()
            fn()
            self.sync()
            dt = time.perf_counter() - t0
            fastest, spent, calls = min(fastest, dt), spent + dt, calls + 1
        return fastest

    def _time_one(self, fn, before):
        """CPU: the call's milliseconds. GPU: its (start, end) events, read once all calls are queued."""
        if before:
            before()
        if not self.cuda:
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        # Each timed call starts from an idle GPU: calls are interleaved across implementations, and without
        # this a call queued behind a slow neighbour's kernels would have its host-side work hidden.
        self.sync()
        self._flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        return start, end

    def ratio(self, a: Call, b: Call, budget: Budget) -> dict:
        """The median, over pairs timed back to back, of ``a``'s time over ``b``'s (the order alternating
        from pair to pair): load that comes and goes, and the clock's drift, fall on both members of a
        pair alike, so a small steady difference (a dispatch's host overhead) shows through noise that
        is larger than it. Both calls are warmed up first; as many pairs as :meth:`measure` would time
        the slower call, times two. Raises what a call raises."""
        slowest = max(self._warm_up(*a, budget), self._warm_up(*b, budget))
        n = 2 * max(budget.min_reps, min(budget.max_reps, int(budget.run_s / max(slowest, 1e-6))))
        pairs = []
        for i in range(n):
            if i % 2 == 0:
                pairs.append((self._time_one(*a), self._time_one(*b)))
            else:
                second = self._time_one(*b)
                pairs.append((self._time_one(*a), second))
        self.sync()
        ratios = [self._ms(ta) / self._ms(tb) for ta, tb in pairs]
        q = statistics.quantiles(ratios, n=5)
        return {"median": statistics.median(ratios), "q20": q[0], "q80": q[3], "pairs": n}

    def _ms(self, stamp) -> float:
        """Milliseconds of one :meth:`_time_one` result."""
        return stamp[0].elapsed_time(stamp[1]) if self.cuda else stamp

    def measure_one(self, fn: Callable[[], object], budget: Budget, before=None) -> dict:
        """:meth:`measure` of a single call; raises what the call raises."""
        got = self.measure({0: (fn, before)}, budget)[0]
        if isinstance(got, Exception):
            raise got
        return got

    def peak_bytes(self, fn: Callable[[], object], before: Optional[Callable[[], None]] = None) -> Optional[int]:
        """Bytes the call allocates at its peak beyond what was allocated before it (GPU only, else None)."""
        if not self.cuda:
            return None
        if before:
            before()
        self.sync()
        base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        fn()
        self.sync()
        return torch.cuda.max_memory_allocated(self.device) - base

    def capture(self, fn: Callable[[], object], before: Optional[Callable[[], None]] = None) -> "torch.cuda.CUDAGraph":
        """``fn`` captured in a CUDA graph (warm-up on a side stream first, as capture requires)."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(3):
                if before:
                    before()
                fn()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        if before:
            before()  # grads set to None here are allocated inside the graph, and each replay rewrites them
        # the outer context puts the current stream back also when the capture fails (torch.cuda.graph's exit
        # does not when ending the capture raises)
        with torch.cuda.stream(torch.cuda.current_stream(self.device)), torch.cuda.graph(graph):
            fn()
        return graph


def cpu_snapshot() -> Optional[Tuple[int, int, int]]:
    """(busy, total, own) clock ticks so far: all CPUs' busy and total time, and this process's (Linux)."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
        with open("/proc/self/stat") as f:
            own = f.read().rsplit(")", 1)[1].split()
        return sum(v) - v[3] - v[4], sum(v), int(own[11]) + int(own[12])  # utime + stime, all threads
    except (OSError, ValueError, IndexError):
        return None


def foreign_cpu(before, after) -> Optional[float]:
    """Share of all CPUs' time that other processes used between two snapshots; None where unknown."""
    if not before or not after or after[1] == before[1]:
        return None
    return max(0.0, ((after[0] - before[0]) - (after[2] - before[2])) / (after[1] - before[1]))
