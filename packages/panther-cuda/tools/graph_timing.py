"""CUDA-graph timing shared by the sweep tools: a call captured once in a CUDA graph, its replays timed by CUDA
events (the device's time, without the host's)."""

from __future__ import annotations

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
