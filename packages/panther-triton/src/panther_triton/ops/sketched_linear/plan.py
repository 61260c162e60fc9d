"""Launch plans of the sketched linear kernels: how the work is split over programs, chosen by a cost model.

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

The planner picks the cheapest plan under a roofline model of the device: per launch,
max(waves × per-program time, device-wide memory time) + a launch cost, where a program's time is the
larger of its MMA time and its bytes through L2 at one SM's share of the bandwidth. The constants below
are for an H100/H200-class GPU, fitted to plan timings measured on an H200 (see _gpu_model); the SM count
is read off the device.
``tools/check_gpu.py --plans`` times the alternatives so that the model can be checked against the chip.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from typing import Iterator, Optional

import torch

from panther_triton._runtime import WIDEST_CHUNK, interpreting, multiprocessors, remember, size_hint

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


@dataclasses.dataclass(frozen=True)
class DeviceModel:
    sms: int  # programs that run at once (one per SM for these register-heavy kernels)
    mma: float  # tensor-core FLOP/s per SM for 16-bit operands, achievable
    sm_bytes: float  # bytes/s one SM can pull through L2 on its own
    l2: float  # bytes/s L2 delivers to all SMs together
    hbm: float  # device memory bytes/s, achievable
    launch: float  # seconds a launch adds (gap + ramp), beyond its work


def _gpu_model(sms: int) -> DeviceModel:
    # H200 (datasheet: ~990 TFLOP/s dense bf16, 4.8 TB/s), derated to what these kernels reach. The
    # constants were fitted to CUDA-graph timings of every plan (tools/check_gpu.py --plans at 128 and
    # 4096 rows, 1024-4096 features, L=1, k=64: benchmarks/results/2026-11-28_nvidia-h200_ff7e7d9_runner.log)
    # by least regret of the plan picked: the measured time of the model's pick summed 65 us above the
    # fastest plan's over those 14 forward and backward cases with the datasheet-based constants used
    # before (0.65 of peak MMA, 110 GB/s per SM, 4 TB/s, 3 us a launch), 7.5 us with these. Skinny tiles
    # (N = R = 128) reach about a third of the tensor cores' peak; an SM streams ~60 GB/s.
    return DeviceModel(sms=sms, mma=0.3 * 990e12 / 132, sm_bytes=60e9, l2=7e12, hbm=3.0e12, launch=5e-6)


_models: dict = {}


def device_model(device) -> DeviceModel:
    key = (device.type, device.index)
    m = _models.get(key)
    if m is None:
        if device.type == "cuda":
            m = _gpu_model(multiprocessors(device.index if device.index is not None else torch.cuda.current_device()))
        else:  # the interpreter: a pretend 4-SM GPU, so that test-sized shapes exercise the split paths too
            m = _gpu_model(4)
        _models[key] = m
    return m


def column_chunk(Lk: int) -> int:
    """BLK: width of the column chunk of each half of H (a power of two in [16, BLK_MAX])."""
    return min(BLK_MAX, max(16, 1 << max(0, Lk - 1).bit_length()))


def _cdiv(a, b):
    return -(-a // b)


def _launch(m: DeviceModel, programs: int, flops: float, nbytes: float, hbm_total: float) -> float:
    """Seconds for one launch of `programs` programs doing `flops` and moving `nbytes` each."""
    if programs <= 0:
        return 0.0
    per_program = max(flops / m.mma, nbytes / _sm_bandwidth(m, programs))
    return max(_cdiv(programs, m.sms) * per_program, hbm_total / m.hbm) + m.launch


def _sm_bandwidth(m: DeviceModel, programs: int) -> float:
    """Bytes/s each running program gets through L2: its own limit, or its share when L2 is the limit."""
    return min(m.sm_bytes, m.l2 / min(programs, m.sms))


def _splits(limit: int, options=(1, 2, 4, 8, 16, 32, 64)):
    return [s for s in options if s == 1 or s <= limit]


def forward_cost(plan: ForwardPlan, T, I, O, Lk, es, m: DeviceModel) -> float:
    blk = column_chunk(Lk)
    nc = _cdiv(Lk, blk)
    R = 2 * nc * blk  # columns as the kernels see them (padded chunks)
    if plan.fused:  # the autotuner picks BT; model both candidates and keep the better
        og = plan.o_groups
        return min(
            _launch(
                m, _cdiv(T, bt) * og,
                2 * bt * I * R + 2 * bt * R * O / og,
                es * (bt * I + I * R + R * O / og + bt * O / og),
                es * T * (I + O + R),
            )
            for bt in (64, 128)
        )
    bt = 128
    s, og = plan.split_i, plan.o_groups
    hes = 4 if s > 1 else es  # partial sums are fp32
    t1 = _launch(
        m, _cdiv(T, bt) * nc * s,
        2 * bt * (I / s) * 2 * blk,
        es * (bt + 2 * blk) * I / s + hes * bt * 2 * blk,
        es * T * I + hes * s * T * R,
    )
    chunk_reload = 1 if nc == 1 else _cdiv(O, 128) / og  # H chunks re-read per O tile when R > 2 BLK_MAX
    t2 = _launch(
        m, _cdiv(T, bt) * og,
        2 * bt * R * O / og,
        hes * s * bt * R * chunk_reload + es * (R + bt) * O / og,
        es * T * (O + R),
    )
    return t1 + t2


def backward_cost(plan: BackwardPlan, T, I, O, Lk, es, m: DeviceModel, need_u1=False) -> float:
    blk = column_chunk(Lk)
    nc = _cdiv(Lk, blk)
    R = 2 * nc * blk
    so, st = plan.split_o, plan.split_t
    dhes = 4 if so > 1 else es
    # launch 1, role A: dH rows (BT = 64) over O / so; role B: dS2, db columns (BO = 128) over T / st
    pa = _cdiv(T, 64) * nc * so
    pb = _cdiv(O, 128) * nc * st
    bw = _sm_bandwidth(m, pa + pb)
    ta = max(2 * 64 * (O / so) * 2 * blk / m.mma, (es * (64 + 2 * blk) * O / so + dhes * 64 * 2 * blk) / bw)
    hb = 2 if need_u1 else 1
    tb = max(2 * (T / st) * hb * blk * 128 / m.mma, es * (128 + hb * blk) * (T / st) / bw)
    t1 = max(ta, tb, (pa * ta + pb * tb) / m.sms, es * 2 * T * O / m.hbm) + m.launch
    # launch 2: dx and dS1 (BI = 64) over T / st, reading dH (so partials) per program
    t2 = _launch(
        m, _cdiv(I, 64) * nc * st,
        2 * (T / st) * 64 * (R + blk),
        es * 2 * (T / st) * 64 + dhes * so * (T / st) * R,
        es * 2 * T * I,
    )
    # launch 3 (only when split over T): sum the partial weight grads
    t3 = 0.0 if st == 1 else m.launch + 4 * st * (2 * I * Lk + 2 * Lk * O + O) / m.hbm
    return t1 + t2 + t3


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


_plans: dict = {}  # (direction, sizes, device) -> plan: a dict lookup on the eager hot path


def plan_forward(T: int, I: int, O: int, Lk: int, es: int, device) -> ForwardPlan:
    T, I, O, Lk = size_hint(T), size_hint(I), size_hint(O), size_hint(Lk)
    forced = _forced_forward.get()
    if forced is not None:
        return _clamp_forward(forced, T, I, O, Lk)
    key = ("f", T, I, O, Lk, es, device.type, device.index)
    plan = _plans.get(key)
    if plan is None:
        plan = remember(_plans, key, _best_forward(T, I, O, Lk, es, device_model(device)))
    return plan


def plan_backward(T: int, I: int, O: int, Lk: int, es: int, device, need_u1: bool = False) -> BackwardPlan:
    T, I, O, Lk = size_hint(T), size_hint(I), size_hint(O), size_hint(Lk)
    forced = _forced_backward.get()
    if forced is not None:
        return BackwardPlan(split_o=max(1, min(forced.split_o, O)), split_t=max(1, min(forced.split_t, T)))
    key = ("b", T, I, O, Lk, es, device.type, device.index, need_u1)
    plan = _plans.get(key)
    if plan is None:
        plan = remember(_plans, key, _best_backward(T, I, O, Lk, es, device_model(device), need_u1))
    return plan


def _clamp_forward(p: ForwardPlan, T, I, O, Lk) -> ForwardPlan:
    one_chunk = Lk <= BLK_MAX
    fused = p.fused and one_chunk
    split_i = 1 if fused or not one_chunk else max(1, min(p.split_i, I))
    return ForwardPlan(fused=fused, split_i=split_i, o_groups=max(1, min(p.o_groups, O)))


def _best_forward(T, I, O, Lk, es, m: DeviceModel) -> ForwardPlan:
    one_chunk = Lk <= BLK_MAX
    cands = []
    groups = _splits(_cdiv(O, 128))
    if one_chunk:
        cands += [ForwardPlan(True, 1, g) for g in groups]
        cands += [ForwardPlan(False, s, g) for s in _splits(_cdiv(I, 256)) for g in groups]
    else:  # R > 2 BLK_MAX: two launches, H written once in the input dtype
        cands += [ForwardPlan(False, 1, g) for g in groups]
    # min by cost; ties go to the earlier (fewer launches, fewer splits)
    return min(cands, key=lambda p: forward_cost(p, T, I, O, Lk, es, m) * (1 + 1e-9 * cands.index(p)))


def _best_backward(T, I, O, Lk, es, m: DeviceModel, need_u1) -> BackwardPlan:
    cands = [
        BackwardPlan(so, st)
        for st in _splits(_cdiv(T, 256))
        for so in _splits(min(_cdiv(O, 256), 16))
        if so == 1 or T * so <= 4096  # the x-pass re-reads every dH partial: keep that traffic small
    ]
    return min(cands, key=lambda p: backward_cost(p, T, I, O, Lk, es, m, need_u1) * (1 + 1e-9 * cands.index(p)))


def describe(T, I, O, Lk, es, device) -> str:
    """One line: the plans the model picks for this shape and their modelled times (for check_gpu.py)."""
    m = device_model(device)
    f = plan_forward(T, I, O, Lk, es, device)
    b = plan_backward(T, I, O, Lk, es, device)
    return (
        f"{f} ~{forward_cost(f, T, I, O, Lk, es, m) * 1e6:.1f}us; "
        f"{b} ~{backward_cost(b, T, I, O, Lk, es, m) * 1e6:.1f}us (model{', interpreter' if interpreting() else ''})"
    )
