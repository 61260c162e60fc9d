"""Backward of the sketched linear op on the CUDA kernels of backward.cu, in at most four launches.

With g = dL/dy (T, O), s = 1/(2L), A = [S1 | U2], B = [U1; S2], H saved by the forward:
    launch 1 (reads g):  dH = s g Bᵀ (T, R) when dx, dS1 or dU2 is wanted;  d[U1; S2] = s Hᵀ g;  db = Σ_T g
                         (db from the g tiles that the d[U1; S2] blocks load)
    when O is split for dH: dH from its fp32 shares over O (forward.cu's sketched_linear_sum_shares)
    launch 2 (reads dH): dx = dH Aᵀ;  d[S1 | U2] = xᵀ dH
    launch 3, when T is split: the weight gradients from their fp32 shares over T
Only the gradients asked for are computed: a weight gradient's rows (columns) of the R axis have blocks
only when that gradient is wanted, and launch 2 runs only when dx, dS1 or dU2 is. dH is a workspace in
the input dtype (rounded once, as the reference's dH). g and x are read as contiguous matrices.

The weight gradients reduce over all T rows, on few tiles when I, O and R are small: common.split_rule
splits T into shares (summed by launch 3) until their blocks fill the SMs; dH (few tiles when R is small)
reduces over O and is split the same way. Every launch runs on one tile shape (limits.CONFIGS), the one
:func:`backward_tiles` gives unless one is forced.

Hopper (:func:`hopper_rule`, or ``hopper=True``): launches 1 and 2 by backward_sm90.cu's kernels (warpgroup MMA,
the same roles and arguments on LARGE's 128 x 128 tiles), each where sm90.bwd_g_fits / sm90.bwd_x_fits allows, else
backward.cu's on LARGE tiles. The rule takes them on sm_90 for 16-bit inputs wherever the backward runs on LARGE
tiles, where they were timed faster than backward.cu's (benchmarks/results/NOTES.md). Where R <= 128
(sm90.bwd_x_fused_fits), launch 2 is bwd_x_fused_sm90 instead: each block owns 128 columns of I and walks a share of
T (:func:`fused_x_split`), so that x is read once, dx written once and A's tile stays on chip; its weight gradient's
shares of T may then differ in number from launch 1's (launch 3 takes both counts).
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from panther.backends.toolkit import cdiv, multiprocessors
from panther_cuda._nvrtc import f32, i32, i64
from panther_cuda.ops.sketched_linear import sm90
from panther_cuda.ops.sketched_linear.common import (
    choose_config,
    contiguous_2d,
    device_index,
    fitting,
    is_exact,
    kernel,
    launch,
    shared_limit,
    split_rule,
    sum_grid,
    sum_shares,
)
from panther_cuda.ops.sketched_linear.limits import CONFIGS, LARGE, SUM_THREADS, TileConfig

Grads = Tuple[Optional[torch.Tensor], ...]


def backward_tiles(T: int, I: int, O: int, dtype: torch.dtype, device: torch.device) -> str:
    """The backward's tile shape, a key of limits.CONFIGS: "large" when T x max(I, O) (the size of dx, T x I,
    the largest output, or of g, T x O, the longest operand) in LARGE tiles fills the SMs and fits the device
    (common.choose_config, the forward's rule), else "small" (tools/linear_sweep.py times both)."""
    config = choose_config(cdiv(T, LARGE.bm), cdiv(max(I, O), LARGE.bn), dtype, multiprocessors(device_index(device)),
                           shared_limit(device))
    return "large" if config == LARGE else "small"


def hopper_rule(tiles: str, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the backward's two product launches run backward_sm90.cu's kernels when not forced: on an sm_90
    device, for 16-bit inputs, where the backward runs on LARGE tiles (``tiles``, backward_tiles' choice)."""
    return tiles == "large" and dtype in sm90.DTYPES and sm90.on_sm90(device_index(device))


def _tiles(I: int, O: int, T: int, R: int, needs: Sequence[bool], c: TileConfig) -> Tuple[int, int, int]:
    """Output tiles of d[U1; S2] (or db alone), of d[S1 | U2], and of dH, for the gradients ``needs`` asks for."""
    need_x, need_s1, need_s2, need_u1, need_u2, need_b = (bool(n) for n in needs)
    Lk = R // 2
    _, w_n = half_range(need_u1, need_s2, Lk)
    _, c_n = half_range(need_s1, need_u2, Lk)
    tiles_g = cdiv(max(w_n, 1), c.bm) * cdiv(O, c.bn) if (w_n or need_b) else 0
    tiles_x = cdiv(I, c.bm) * cdiv(c_n, c.bn)
    tiles_dh = cdiv(T, c.bm) * cdiv(R, c.bn) if (need_x or need_s1 or need_u2) else 0
    return tiles_g, tiles_x, tiles_dh


def backward_splits(T: int, I: int, O: int, R: int, needs: Sequence[bool], c: TileConfig, sms: int) -> Tuple[int, int]:
    """(split, dh_split): the shares of T of the weight gradients and of O of dH that common.split_rule gives
    their tiles of shape ``c`` on ``sms`` SMs."""
    tiles_g, tiles_x, tiles_dh = _tiles(I, O, T, R, needs, c)
    split = split_rule(T, max(tiles_g, tiles_x), sms, c) if tiles_g + tiles_x else 1
    dh_split = split_rule(O, tiles_dh, sms, c) if tiles_dh else 1
    return split, dh_split


def fused_x_split(T: int, I: int, sms: int) -> int:
    """The shares of T of launch 2 by bwd_x_fused_sm90 (one block per SM, each owning 128 columns of I for its
    share): common.split_rule's, one block per column tile and share."""
    return split_rule(T, cdiv(I, sm90.BN), sms, LARGE)


def half_range(first: bool, second: bool, Lk: int) -> Tuple[int, int]:
    """(c_lo, c_n): the columns of the R = 2Lk axis whose gradient is wanted, when the first half
    (U1 / S1, columns < Lk) and / or the second (S2 / U2) is. (0, 0) when neither."""
    if first and second:
        return 0, 2 * Lk
    if first:
        return 0, Lk
    if second:
        return Lk, Lk
    return 0, 0


def sketched_linear_backward(
    g: torch.Tensor,
    x: torch.Tensor,
    h: torch.Tensor,
    S1s: torch.Tensor,
    S2s: torch.Tensor,
    U1s: torch.Tensor,
    U2s: torch.Tensor,
    needs: Sequence[bool] = (True, True, True, False, False, True),
    allow_tf32: bool = True,
    out: Optional[Sequence[torch.Tensor]] = None,
    split: Optional[int] = None,
    dh_split: Optional[int] = None,
    tiles: Optional[str] = None,
    hopper: Optional[bool] = None,
) -> Grads:
    """Launch the backward kernels on the current CUDA device and stream for dL/dy = g (..., O).

    ``needs`` says which of (x, S1s, S2s, U1s, U2s, bias) want a gradient (False for an absent bias);
    returns (dx, dS1, dS2, dU1, dU2, db), None where not wanted. ``h`` is the forward's H. ``out``:
    the gradients to write (contiguous tensors of their inputs' shapes where wanted; allocated here
    when None). ``split``: shares of T for the weight gradients; ``dh_split``: shares of O for dH (defaults:
    common.split_rule); ``tiles``: the tile shape of every launch, a key of limits.CONFIGS (default:
    :func:`backward_tiles`; tiles whose shared memory does not fit the device run as the small ones); ``hopper``:
    launches 1 and 2 by backward_sm90.cu's kernels where they fit (on LARGE tiles: ``tiles`` is then ignored); None
    (default): as :func:`hopper_rule` says when ``tiles`` is not forced, else not.
    """
    L, I, k = S1s.shape
    O = S2s.shape[-1]
    Lk, R = L * k, 2 * L * k
    need_x, need_s1, need_s2, need_u1, need_u2, need_b = (bool(n) for n in needs)
    shapes = (x.shape, (L, I, k), (L, k, O), (L, k, O), (L, I, k), (O,))
    wanted = (need_x, need_s1, need_s2, need_u1, need_u2, need_b)
    if out is None:
        out = [torch.empty(s, device=g.device, dtype=x.dtype) if n else None for s, n in zip(shapes, wanted)]
    grads = tuple(t if n else None for t, n in zip(out, wanted))
    dx, dS1, dS2, dU1, dU2, db = grads
    g2 = contiguous_2d(g, O)
    T = g2.shape[0]
    if T == 0:  # sums over no rows
        for t in (dS1, dS2, dU1, dU2, db):
            if t is not None:
                t.zero_()
        return grads
    need_dh = need_x or need_s1 or need_u2
    exact = is_exact(x.dtype, allow_tf32)
    S1c, S2c, U1c, U2c = S1s.contiguous(), S2s.contiguous(), U1s.contiguous(), U2s.contiguous()
    x2 = contiguous_2d(x, I) if need_dh else None
    rule_tiles = backward_tiles(T, I, O, x.dtype, x.device) if tiles is None else None  # once: the hopper rule's too
    if hopper is None:
        hopper = rule_tiles is not None and hopper_rule(rule_tiles, x.dtype, x.device)
    hopper_g = hopper and sm90.bwd_g_fits(O, k, x.dtype, g.device, g2, h, U1c, S2c)
    hopper_x = hopper and need_dh and sm90.bwd_x_fits(I, k, x.dtype, g.device, x2, S1c, U2c)
    fused_x = hopper_x and sm90.bwd_x_fused_fits(I, k, R, x.dtype, g.device, x2, S1c, U2c)
    if hopper_g or hopper_x:
        tiles = "large"  # the grids of the sm_90a kernels (128 x 128 tiles)
    if tiles is None:
        c = CONFIGS[rule_tiles]
    elif tiles in CONFIGS:
        c = fitting(CONFIGS[tiles], x.dtype, x.device)  # forced tiles that do not fit the device: the small ones
    else:
        raise ValueError(f"sketched_linear_backward tiles={tiles!r}: expected one of {sorted(CONFIGS)}")
    BM, BN = c.bm, c.bn
    scale = f32(1.0 / (2 * L))

    w_lo, w_n = half_range(need_u1, need_s2, Lk)  # rows of d[U1; S2]
    c_lo, c_n = half_range(need_s1, need_u2, Lk)  # columns of d[S1 | U2]
    tiles_g, tiles_x, tiles_dh = _tiles(I, O, T, R, needs, c)
    forced = split is not None
    if split is None or dh_split is None:
        rule = backward_splits(T, I, O, R, needs, c, multiprocessors(device_index(g.device)))
        split = rule[0] if split is None else split
        dh_split = rule[1] if dh_split is None else dh_split
    split = max(1, min(int(split), T))
    # launch 2's shares of T: the rule's for bwd_x_fused_sm90's grid unless forced, else launch 1's
    x_split = split if forced or not fused_x else fused_x_split(T, I, multiprocessors(device_index(g.device)))
    x_split = max(1, min(x_split, T))
    # fp32 shares of the weight gradients, summed by launch 3
    ws1 = torch.empty((x_split, I, c_n), device=g.device, dtype=torch.float32) if x_split > 1 and c_n else None
    rows = w_n + (1 if need_b else 0)  # db's shares as one more row
    ws2 = torch.empty((split, rows, O), device=g.device, dtype=torch.float32) if split > 1 and rows else None

    dh_split = max(1, int(dh_split))
    ws_dh = torch.empty((dh_split, T, R), device=g.device, dtype=torch.float32) if dh_split > 1 and need_dh else None
    n_dh = tiles_dh * dh_split
    dh = g2.new_empty((T, R)) if need_dh else None
    if n_dh + tiles_g:
        args = (g2, h, U1c, S2c, dh, dU1, dS2, db, ws2, i64(T), i64(O), i32(L), i32(k), scale, i64(n_dh), i32(w_lo),
                i32(w_n), i32(split), ws_dh, i32(dh_split))
        if hopper_g:
            sm90.ring_launch("backward_sm90.cu", "sketched_linear_bwd_g_sm90", x.dtype, g.device,
                             n_dh + tiles_g * split, args)
        else:
            launch("backward.cu", "sketched_linear_bwd_g", x.dtype, exact, c, n_dh + tiles_g * split, *args)
    if ws_dh is not None:
        sum_shares(ws_dh, dh, float(scale))
    if fused_x:
        sm90.kernel("backward_sm90.cu", "sketched_linear_bwd_x_fused_sm90", x.dtype, sm90.FUSED_X_STAGES)(
            (cdiv(I, sm90.BN) * x_split,), (sm90.THREADS,), x2, dh, S1c, U2c, dx, dS1, dU2, ws1, i64(T), i64(I), i32(L),
            i32(k), i32(c_lo), i32(c_n), i32(x_split), shared_mem=sm90.fused_x_shared_bytes(x.dtype))
    elif need_dh:
        n_dx = cdiv(T, BM) * cdiv(I, BN) if need_x else 0
        args = (x2, dh, S1c, U2c, dx, dS1, dU2, ws1, i64(T), i64(I), i32(L), i32(k), i64(n_dx), i32(c_lo), i32(c_n),
                i32(split))
        if hopper_x:
            sm90.ring_launch("backward_sm90.cu", "sketched_linear_bwd_x_sm90", x.dtype, g.device,
                             n_dx + tiles_x * split, args)
        else:
            launch("backward.cu", "sketched_linear_bwd_x", x.dtype, exact, c, n_dx + tiles_x * split, *args)
    if ws1 is not None or ws2 is not None:  # the gradients whose launch wrote shares
        c1_n = c_n if ws1 is not None else 0
        c2_n, db2 = (w_n, db) if ws2 is not None else (0, None)
        n = I * c1_n + (c2_n + (1 if db2 is not None else 0)) * O
        kernel("backward.cu", "sketched_linear_bwd_sum", x.dtype)(
            sum_grid(n), (SUM_THREADS,),
            ws1, ws2, dS1, dU2, dU1, dS2, db2, i64(I), i64(O), i32(L), i32(k), i32(c_lo), i32(c1_n), i32(w_lo),
            i32(c2_n), i32(x_split), i32(split),
        )
    return grads
