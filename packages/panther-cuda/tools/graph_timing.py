"""Timing shared by the sweep tools: a call captured once in a CUDA graph, its replays timed by CUDA events (the
device's time, without the host's); the kernels a call launches, each timed by torch.profiler; the sm_90a tools'
check of their device."""

from __future__ import annotations

import statistics
import sys
from typing import Callable, List, Optional

import torch


def capture(fn: Callable[[], object], before: Optional[Callable[[], None]] = None) -> "torch.cuda.CUDAGraph":
    """``fn`` captured in a CUDA graph, after a warm-up on a side stream (as capture requires). ``before`` runs
    before each warm-up call and before the capture: what it resets is then allocated inside the graph and
    rewritten by each replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            if before is not None:
                before()
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    if before is not None:
        before()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def replay_ms(graph: "torch.cuda.CUDAGraph", reps: int, flush: Optional[torch.Tensor] = None) -> List[float]:
    """Milliseconds of ``reps`` replays of ``graph``, after a few untimed ones; with ``flush`` (a buffer larger
    than the L2), the buffer is overwritten before each replay, outside the timed events."""
    for _ in range(3):
        graph.replay()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        if flush is not None:
            flush.zero_()
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in events]


def median_ms(fn: Callable[[], object], reps: int, before: Optional[Callable[[], None]] = None,
              flush: Optional[torch.Tensor] = None) -> float:
    """Median milliseconds of one replay of ``fn`` captured in a CUDA graph (:func:`capture`, :func:`replay_ms`)."""
    return statistics.median(replay_ms(capture(fn, before), reps, flush))


def kernel_times(fn: Callable[[], object], calls: int = 10) -> List[dict]:
    """Each kernel ``fn`` launches, with its launches per call and mean microseconds (torch.profiler, CUPTI,
    over ``calls`` eager calls after one untimed call)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    out = []
    for e in prof.key_averages():
        total = getattr(e, "device_time_total", None)
        if total is None:
            total = getattr(e, "cuda_time_total", 0)
        if total > 0 and e.count:
            out.append({"kernel": e.key, "per_call": e.count / calls, "us": total / e.count})
    return sorted(out, key=lambda r: -r["us"] * r["per_call"])


def on_sm90(tool: str) -> bool:
    """Whether the current CUDA device runs the sm_90a kernels; if not, says so on stderr for ``tool`` (which then
    exits with status 2)."""
    if not torch.cuda.is_available():
        print(f"{tool} needs a CUDA GPU", file=sys.stderr)
        return False
    from panther_cuda.ops.sketched_linear import sm90

    if not sm90.on_sm90(torch.cuda.current_device()):
        print(f"{tool} needs an sm_90 GPU", file=sys.stderr)
        return False
    return True
