"""Launch plans of the sketched linear kernels: how the work is split over programs, chosen by a rule.

The GEMMs are skinny (rank R = 2Lk is small next to T, I, O), so the question is not tiling but
parallelism: each product reduces over one long axis (I for H = x A, O for dH = g Bᵀ, T for the weight
grads), and with a plain one-program-per-output-tile grid a shape like T = 128 or I = 1024 leaves most of
the GPU idle. A plan says which long reductions are split into partial sums over several programs:

* forward ``fused``: ONE launch; each program computes its BT rows of H = x A on chip over the whole I
  loop, then y = H B / (2L) + b over its O tiles. ``o_groups`` > 1 gives a row tile several programs,
  each recomputing H (buys parallelism with FLOPs; x is re-read from L2 by sibling programs).
* forward two-launch: H = x A as ``split_i`` partial sums over I (fp32, summed on load by the second
  launch), then y = H B / (2L) + b with ``o_groups`` programs per row tile.
* backward: dH = g Bᵀ / (2L) as ``split_o`` partial sums over O (summed on load by the x-pass), and the
  weight grads as ``split_t`` partial sums over T (summed by a third, tiny launch only when > 1).

The plan follows a rule a reader can check (:func:`forward_rule`, :func:`backward_rule`): split a long
reduction until the grid fills the SMs (the SM count is read off the device), and no further; the
dH split over O balances two costs instead. ``tools/check_gpu.py --plans`` times every plan on the GPU,
to check the rule against the chip.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from typing import Iterator, Optional

import torch

from panther.backends.toolkit import BoundedCache, cdiv, multiprocessors, next_power_of_2, size_hint
from panther_triton._runtime import WIDEST_CHUNK

BLK_MAX = WIDEST_CHUNK  # widest column chunk of H's halves held on chip (two halves: R <= 256 in one chunk)


@dataclasses.dataclass(frozen=True)
class ForwardPlan:
    fused: bool = True  # one launch, H on chip (needs R = 2Lk <= 2 * BLK_MAX)
    split_i: int = 1  # two launches: H = x A as this many partial sums over I
    o_groups: int = 1  # programs sharing one row tile in the launch that writes y


@dataclasses.dataclass(frozen=True)
class BackwardPlan:
    split_o: int = 1  # dH = g Bᵀ as this many partial sums over O
    split_t: int = 1  # dS1, dS2, db (and dU1, dU2) as this many partial sums over T


def device_sms(device) -> int:
    """SMs the plan fills: the device's, or a pretend 4-SM GPU under the interpreter (so that test-sized
    shapes take the split paths too)."""
    if device.type != "cuda":
        return 4
    return multiprocessors(device.index if device.index is not None else torch.cuda.current_device())


def column_chunk(Lk: int) -> int:
    """BLK: width of the column chunk of each half of H (a power of two in [16, BLK_MAX])."""
    return min(BLK_MAX, max(16, next_power_of_2(Lk)))


def _fill(programs_per_split: int, sms: int, cap: int) -> int:
    """The largest power of two s <= cap with programs_per_split * s <= sms (at least 1): split a
    reduction until the grid fills the SMs, and no further."""
    s = 1
    while 2 * s <= cap and programs_per_split * 2 * s <= sms:
        s *= 2
    return s


_forced_forward: contextvars.ContextVar[Optional[ForwardPlan]] = contextvars.ContextVar("fwd_plan", default=None)
_forced_backward: contextvars.ContextVar[Optional[BackwardPlan]] = contextvars.ContextVar("bwd_plan", default=None)


@contextlib.contextmanager
def use_plans(forward: Optional[ForwardPlan] = None, backward: Optional[BackwardPlan] = None) -> Iterator[None]:
    """Force launch plans in this context (benchmarks comparing plans, tests covering every path).

    A forced fused forward plan is ignored where it cannot run (R > 2 * BLK_MAX); split counts are
    clamped to the sizes. Under torch.compile the plan in force at trace time is baked into the graph.
    """
    tf = _forced_forward.set(forward)
    tb = _forced_backward.set(backward)
    try:
        yield
    finally:
        _forced_forward.reset(tf)
        _forced_backward.reset(tb)


def forced_forward_plan() -> Optional[ForwardPlan]:
    """The forward plan forced by :func:`use_plans` here, or None."""
    return _forced_forward.get()


def forced_backward_plan() -> Optional[BackwardPlan]:
    """The backward plan forced by :func:`use_plans` here, or None."""
    return _forced_backward.get()


_plans = BoundedCache()  # (direction, sizes, device) -> plan: a dict lookup on the eager hot path


def plan_forward(T: int, I: int, O: int, Lk: int, device) -> ForwardPlan:
    T, I, O, Lk = size_hint(T), size_hint(I), size_hint(O), size_hint(Lk)
    forced = _forced_forward.get()
    if forced is not None:
        return _clamp_forward(forced, T, I, O, Lk)
    key = ("f", T, I, O, Lk, device.type, device.index)
    plan = _plans.get(key)
    if plan is None:
        plan = _plans.put(key, forward_rule(T, I, O, Lk, device_sms(device)))
    return plan


def plan_backward(T: int, I: int, O: int, Lk: int, device) -> BackwardPlan:
    T, I, O, Lk = size_hint(T), size_hint(I), size_hint(O), size_hint(Lk)
    forced = _forced_backward.get()
    if forced is not None:
        return BackwardPlan(split_o=max(1, min(forced.split_o, O)), split_t=max(1, min(forced.split_t, T)))
    key = ("b", T, I, O, Lk, device.type, device.index)
    plan = _plans.get(key)
    if plan is None:
        plan = _plans.put(key, backward_rule(T, I, O, Lk, device_sms(device)))
    return plan


def _clamp_forward(p: ForwardPlan, T, I, O, Lk) -> ForwardPlan:
    one_chunk = Lk <= BLK_MAX
    fused = p.fused and one_chunk
    split_i = 1 if fused or not one_chunk else max(1, min(p.split_i, I))
    return ForwardPlan(fused=fused, split_i=split_i, o_groups=max(1, min(p.o_groups, O)))


FUSED_MAX_A = 1 << 18  # elements of A = [S1 | U2] (I x 2Lk) up to which the forward is one fused launch
MAX_SPLIT_I = 8  # fp32 partial sums of H that the y launch adds up on load
SPLIT_UNIT = 256  # columns (rows) a split of a reduction keeps at least


def forward_rule(T: int, I: int, O: int, Lk: int, sms: int) -> ForwardPlan:
    """The forward plan for a shape on a GPU of ``sms`` SMs.

    * fused (one launch) when H fits one chunk (2Lk <= 2 BLK_MAX) and A has at most FUSED_MAX_A
      elements: every fused program runs the whole x·A loop and re-reads A, which stops paying
      once A is large; else two launches;
    * two launches: x·A is split over I until its grid (row tiles of 128 × split_i) fills the SMs,
      at most MAX_SPLIT_I partial sums of at least SPLIT_UNIT columns each (one chunk only; past one
      chunk H is written once, unsplit);
    * o_groups: the launch that writes y gives each row tile (64 rows fused, 128 otherwise: the
      fused kernel's smaller tuned tile) more programs until the grid fills the SMs, at most one per
      128 output columns.
    """
    one_chunk = Lk <= BLK_MAX
    fused = one_chunk and I * 2 * Lk <= FUSED_MAX_A
    row_tiles = cdiv(T, 64 if fused else 128)
    split_i = 1
    if one_chunk and not fused:
        split_i = _fill(row_tiles, sms, min(MAX_SPLIT_I, cdiv(I, SPLIT_UNIT)))
    o_groups = _fill(row_tiles, sms, cdiv(O, 128))
    return ForwardPlan(fused=fused, split_i=split_i, o_groups=o_groups)


def backward_rule(T: int, I: int, O: int, Lk: int, sms: int) -> BackwardPlan:
    """The backward plan for a shape on a GPU of ``sms`` SMs.

    * split_t: the x pass (column tiles of 64 × chunks × split_t programs) is split over T until
      its grid fills the SMs, each split keeping at least SPLIT_UNIT rows;
    * split_o: only while the dH pass has fewer row tiles (64 rows) than SMs and T × split_o <= 4096
      (every x-pass program re-reads all the partials of dH): the power of two at or above
      sqrt(O / (SPLIT_UNIT × chunks)), which balances the dH programs' loop over O / split_o columns
      against the split_o partials each x-pass program adds up on load for every chunk; at most 16.
    """
    n_chunks = cdiv(Lk, column_chunk(Lk))
    split_t = _fill(cdiv(I, 64) * n_chunks, sms, cdiv(T, SPLIT_UNIT))
    split_o = 1
    if cdiv(T, 64) < sms:
        split_o = min(next_power_of_2(math.ceil(math.sqrt(O / (SPLIT_UNIT * n_chunks)))), 16)
        while split_o > 1 and T * split_o > 4096:
            split_o //= 2
    return BackwardPlan(split_o=split_o, split_t=split_t)


def describe(T, I, O, Lk, device) -> str:
    """One line: the plans picked for this shape (for check_gpu.py and kernel_report.py)."""
    return f"{plan_forward(T, I, O, Lk, device)}; {plan_backward(T, I, O, Lk, device)}"
