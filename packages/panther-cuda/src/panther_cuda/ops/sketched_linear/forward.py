"""Forward of the sketched linear op on the CUDA kernels of forward.cu: y = H B / (2L) + b, H = x A.

x (..., I) is read as a contiguous (T, I) matrix (a view where its strides allow, else one copy); the
weights as contiguous tensors (parameters already are: no copy). A = [S1 | U2] and B = [U1; S2] are
indexed in place by the kernels, never concatenated. H (T, R), R = 2Lk, is returned for the backward.

Plans (:func:`plan_forward`):
* split (H has few tiles and I is long: common.split_rule gives more than one share of I): H = x A
  as fp32 shares of I on ``h_splits`` blocks per tile, summed into H by a second launch, then
  y = H B / (2L) + b; each block's loop over I is ``h_splits`` times shorter;
* otherwise two launches: H = x A, then y = H B / (2L) + b;
* fused, only when forced (R <= FUSED_MAX_R and its shared memory fits the device): one launch, H on chip;
  ``o_groups`` blocks per row tile of BM rows (each recomputing H), at most one per BN output columns. The
  rule never picks it: its operand tiles load synchronously, without the ring of the other kernels, and
  tools/linear_sweep.py times it slower than the two launches (benchmarks/results/NOTES.md).
The two-launch plans run y on the tile shape ``tiles`` (limits.CONFIGS): "large" (128 x 128) when y's large
tiles alone fill the SMs, else "small" (64 x 64, also the fused kernel's); H on ``h_tiles`` (None: ``tiles``),
which the rule makes "deep64" (LARGE's tile, 64-deep steps) where y takes "large" and DEEP64's ring fits.

Hopper (``hopper_h``, ``hopper_y``): H, and y, by forward_sm90.cu's kernels, warpgroup MMA (wgmma) from shared
memory on sm_90 devices, for 16-bit inputs whose shapes sm90.h_fits and sm90.y_fits allow (each launch on its
own: where one does not fit, forward.cu's kernel of the plan's tiles runs it); H in ``h_splits`` shares of I as
in the other plans. The rule takes both on sm_90 where y runs on large tiles, where they were timed faster than
forward.cu's (benchmarks/results/NOTES.md).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import torch

from panther.backends.toolkit import BoundedCache, cdiv, multiprocessors, shared_memory_per_block
from panther_cuda._nvrtc import f32, i32, i64
from panther_cuda.ops.sketched_linear import sm90
from panther_cuda.ops.sketched_linear.common import (
    choose_config,
    contiguous_2d,
    device_index,
    fitting,
    fused_fits,
    is_exact,
    launch,
    split_rule,
    sum_shares,
)
from panther_cuda.ops.sketched_linear.limits import CONFIGS, DEEP64, FUSED_MAX_R, LARGE, SMALL


@dataclasses.dataclass(frozen=True)
class ForwardPlan:
    fused: bool  # one launch, H in shared memory
    o_groups: int = 1  # fused: blocks sharing a row tile, each writing a share of y's columns
    h_splits: int = 1  # not fused: shares of I of H = x A (fp32, summed by a launch of their own)
    tiles: str = "small"  # not fused: the tile shape of y's launch, a key of limits.CONFIGS (fused: small)
    h_tiles: Optional[str] = None  # not fused: the tile shape of H's launch (None: ``tiles``)
    hopper_h: bool = False  # not fused: H by forward_sm90.cu's wgmma kernel where it fits (sm90.h_fits)
    hopper_y: bool = False  # not fused: y by forward_sm90.cu's wgmma kernel where it fits (sm90.y_fits)

    def __post_init__(self):
        for name in ("tiles", "h_tiles"):
            value = getattr(self, name)
            if value not in CONFIGS and not (name == "h_tiles" and value is None):
                raise ValueError(f"ForwardPlan {name}={value!r}: expected one of {sorted(CONFIGS)}")
        if self.fused and (self.hopper_h or self.hopper_y):
            raise ValueError(f"ForwardPlan hopper_h={self.hopper_h}, hopper_y={self.hopper_y}: the sm_90a kernels "
                             "run plans of two launches, expected fused=False")


def forward_rule(T: int, I: int, O: int, R: int, dtype: torch.dtype, sms: int, shared_limit: int,
                 hopper: bool = False) -> ForwardPlan:
    """The plan for a shape on a device with ``sms`` SMs and ``shared_limit`` bytes of shared memory per block
    (``hopper``: an sm_90 device).

    Two launches, on LARGE tiles when y's LARGE tiles alone fill the SMs (common.choose_config), else
    SMALL; with LARGE tiles H = x A on DEEP64's where its ring fits (16-bit inputs), and on sm_90 H and y by the
    wgmma kernels (16-bit inputs; each launch checks that it fits). H is split into shares of I when its tiles (of
    that shape) leave the SMs idle and I is long (split_rule)."""
    config = choose_config(cdiv(T, LARGE.bm), cdiv(O, LARGE.bn), dtype, sms, shared_limit)
    tiles = "large" if config == LARGE else "small"
    h_config = DEEP64 if config == LARGE and DEEP64.shared_bytes(dtype) <= shared_limit else config
    wgmma = hopper and tiles == "large" and dtype in sm90.DTYPES
    return ForwardPlan(fused=False, h_splits=split_rule(I, cdiv(T, h_config.bm) * cdiv(R, h_config.bn), sms, h_config),
                       tiles=tiles, h_tiles="deep64" if h_config == DEEP64 else None, hopper_h=wgmma, hopper_y=wgmma)


def fused_groups(T: int, O: int, sms: int) -> int:
    """Blocks of the fused forward per row tile (each recomputing H, each writing a share of y's columns): the
    largest power of two, at most one per BN columns, whose grid still fits the SMs."""
    row_tiles, groups, cap = cdiv(T, SMALL.bm), 1, cdiv(O, SMALL.bn)
    while 2 * groups <= cap and row_tiles * 2 * groups <= sms:
        groups *= 2
    return groups


_plans = BoundedCache()


def plan_forward(T: int, I: int, O: int, R: int, dtype: torch.dtype, device: torch.device) -> ForwardPlan:
    index = device_index(device)
    key = (T, I, O, R, dtype, index)
    plan = _plans.get(key)
    if plan is None:
        plan = _plans.put(key, forward_rule(T, I, O, R, dtype, multiprocessors(index), shared_memory_per_block(index),
                                            hopper=sm90.on_sm90(index)))
    return plan


def forward_outputs(x, S1s, S2s, U1s=None, U2s=None, bias=None, allow_tf32=True) -> Tuple[torch.Tensor, torch.Tensor]:
    """y (..., O), contiguous and no view of another buffer (autograd forbids in-place ops on views a
    custom Function returns), and H (T, 2Lk): what the forward writes (the library op's fake too)."""
    L, I, k = S1s.shape
    O = S2s.shape[-1]
    T = x.numel() // I if I else 0
    return x.new_empty((*x.shape[:-1], O)), x.new_empty((T, 2 * L * k))


def sketched_linear_forward(
    x: torch.Tensor,
    S1s: torch.Tensor,
    S2s: torch.Tensor,
    U1s: torch.Tensor,
    U2s: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    allow_tf32: bool = True,
    out: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    plan: Optional[ForwardPlan] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernels on the current CUDA device and stream; returns (y, H).

    ``out``: what :func:`forward_outputs` returns (allocated here when None). ``plan`` forces a plan
    (tests covering both paths); a fused plan whose H does not fit falls back to two launches, and tiles (of y or
    of H) whose shared memory does not fit the device to the small ones.
    """
    y, h = forward_outputs(x, S1s, S2s) if out is None else out
    L, I, k = S1s.shape
    O = S2s.shape[-1]
    R = 2 * L * k
    x2 = contiguous_2d(x, I)
    T = x2.shape[0]
    if T == 0:
        return y, h
    S1c, S2c, U1c, U2c = S1s.contiguous(), S2s.contiguous(), U1s.contiguous(), U2s.contiguous()
    b = bias.contiguous() if bias is not None else None
    if plan is None:
        plan = plan_forward(T, I, O, R, x.dtype, x.device)
    elif plan.fused and (R > FUSED_MAX_R or not fused_fits(R, x.dtype, x.device)):
        plan = ForwardPlan(fused=False)
    elif not plan.fused:
        for name in ("tiles", "h_tiles"):
            value = getattr(plan, name)
            if value is not None and fitting(CONFIGS[value], x.dtype, x.device) is not CONFIGS[value]:
                plan = dataclasses.replace(plan, **{name: "small"})
    exact = is_exact(x.dtype, allow_tf32)
    scale = f32(1.0 / (2 * L))
    if plan.fused:
        launch("forward.cu", "sketched_linear_fwd_fused", x.dtype, exact, SMALL, cdiv(T, SMALL.bm) * plan.o_groups,
               x2, S1c, U2c, U1c, S2c, b, y, h, i64(T), i64(I), i64(O), i32(L), i32(k), i32(plan.o_groups), scale,
               shared_mem=SMALL.fused_bytes(R, x.dtype))
    else:
        c, ch = CONFIGS[plan.tiles], CONFIGS[plan.h_tiles or plan.tiles]
        splits = max(1, int(plan.h_splits))
        ws = torch.empty((splits, T, R), device=x.device, dtype=torch.float32) if splits > 1 else None
        if plan.hopper_h and sm90.h_fits(I, k, x.dtype, x.device, x2, S1c, U2c):
            sm90.ring_launch("forward_sm90.cu", "sketched_linear_fwd_h_sm90", x.dtype, x.device,
                             cdiv(T, sm90.BM) * cdiv(R, sm90.BN) * splits,
                             (x2, S1c, U2c, h, ws, i64(T), i64(I), i32(L), i32(k), i32(splits)))
        else:
            launch("forward.cu", "sketched_linear_fwd_h", x.dtype, exact, ch, cdiv(T, ch.bm) * cdiv(R, ch.bn) * splits,
                   x2, S1c, U2c, h, ws, i64(T), i64(I), i32(L), i32(k), i32(splits))
        if ws is not None:
            sum_shares(ws, h)
        if plan.hopper_y and sm90.y_fits(R, O, x.dtype, x.device, h, U1c, S2c):
            depth = sm90.depth(R)
            groups = sm90.groups(T, O, depth, x.dtype, multiprocessors(device_index(x.device)))
            sm90.kernel("forward_sm90.cu", "sketched_linear_fwd_y_sm90", x.dtype, depth)(
                (cdiv(T, sm90.BM) * groups,), (sm90.THREADS,), h, U1c, S2c, b, y, i64(T), i64(O), i32(L * k),
                i32(groups), scale, shared_mem=sm90.y_shared_bytes(depth, x.dtype))
        else:
            launch("forward.cu", "sketched_linear_fwd_y", x.dtype, exact, c, cdiv(T, c.bm) * cdiv(O, c.bn),
                   h, U1c, S2c, b, y, i64(T), i64(O), i32(L), i32(k), scale)
    return y, h
