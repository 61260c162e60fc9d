"""Forward of the sketched linear op in Triton: y = H B / (2L) + b with H = x A.

Notation (DESIGN.md): x (T, I); S1s, U2s (L, I, K); U1s, S2s (L, K, O); Lk = L K; R = 2 Lk.
    A = [S1 | U2]   (I, R): column c < Lk of a half is S1s[c // K, :, c % K] (U2s for the second half),
                    read in place through strides: no per-call cat/copy of the weights.
    B = [U1; S2]    (R, O): row c < Lk of a half is U1s[c // K, c % K, :] (S2s for the second half).
    H = [H1 | H2] = [x S1 | x U2]   (T, R), kept for the backward (dS2 = H2ᵀ g / (2L)).
    y = (H1 U1 + H2 S2) / (2L) + b  (T, O)
Each half of H is computed in column chunks of BLK <= 128 (the block of the Lk axis), so R <= 256 is
one chunk, held on chip.

Launches (plan.py picks one by a rule):
* fused, R <= 256 — ONE launch, ``_sketch_out_kernel`` with FUSED: a program computes its BT rows of H
  over the whole I loop into registers, rounds them once to the input dtype, then streams y over its O
  tiles with 1/(2L) and the bias in the epilogue. ``o_groups`` programs may share a row tile, each
  recomputing H (the grid then counts rows × groups, siblings adjacent so x comes from L2).
* two launches — ``_sketch_in_kernel`` writes H (or fp32 partial sums over ``split_i`` slices of I),
  then ``_sketch_out_kernel`` sums the partials on load and writes y (and H for the backward).

Why two launches can win: the fused grid has only T/BT row tiles, each running the whole x·A loop
and re-reading A; splitting I instead keeps every SM busy for x·A without recomputation, at the cost
of fp32 partials and a second launch. plan.py's rule decides; ``tools/check_gpu.py --plans`` times
every plan on the GPU.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from panther.backends.toolkit import cdiv
from panther_triton._launch import launch, layout_key
from panther_triton._runtime import SIZES_NOT_SPECIALISED, Candidates, tune_bucket, tuning_bench
from panther_triton.ops.sketched_linear.common import dot_precision, lk_offsets, lko_offsets, mma, sum_splits
from panther_triton.ops.sketched_linear.plan import ForwardPlan, column_chunk, plan_forward


@triton.jit
def _x_times_a(
    x,  # [T, I]
    S1,  # [L, I, K]
    U2,  # [L, I, K]
    rows,  # [BT] int64 rows of x
    mask_t,  # [BT]
    cols,  # [BLK] columns c = l K + j of each half of A
    mask_c,  # [BLK]
    i_start, i_end, I,
    stride_xt, stride_xi,
    stride_s1l, stride_s1i, stride_s1k,
    stride_u2l, stride_u2i, stride_u2k,
    K: tl.constexpr, BT: tl.constexpr, BI: tl.constexpr, BLK: tl.constexpr, PREC: tl.constexpr,
):
    """(x S1[:, cols], x U2[:, cols]) for `rows`, summed over i in [i_start, i_end): two [BT, BLK] fp32."""
    ks = tl.arange(0, BI)
    x_ptrs = x + rows[:, None] * stride_xt + (i_start + ks).to(tl.int64)[None, :] * stride_xi
    a1_ptrs = S1 + lk_offsets(cols, stride_s1l, stride_s1k, K)[None, :] + (i_start + ks)[:, None] * stride_s1i
    a2_ptrs = U2 + lk_offsets(cols, stride_u2l, stride_u2k, K)[None, :] + (i_start + ks)[:, None] * stride_u2i
    acc1 = tl.zeros((BT, BLK), dtype=tl.float32)
    acc2 = tl.zeros((BT, BLK), dtype=tl.float32)
    for i in range(i_start, i_end, BI):
        mask_i = (i + ks) < I  # split ranges are BI-aligned, so only I itself cuts a tile
        xt = tl.load(x_ptrs, mask=mask_t[:, None] & mask_i[None, :], other=0.0)
        a1 = tl.load(a1_ptrs, mask=mask_i[:, None] & mask_c[None, :], other=0.0)
        a2 = tl.load(a2_ptrs, mask=mask_i[:, None] & mask_c[None, :], other=0.0)
        acc1 = mma(xt, a1, acc1, PREC)
        acc2 = mma(xt, a2, acc2, PREC)
        x_ptrs += BI * stride_xi
        a1_ptrs += BI * stride_s1i
        a2_ptrs += BI * stride_u2i
    return acc1, acc2


_IN = Candidates(
    gpu=[
        ({"BT": 128, "BI": 64}, 8, 3),
        ({"BT": 128, "BI": 128}, 8, 3),
        ({"BT": 64, "BI": 128}, 4, 4),
        ({"BT": 64, "BI": 64}, 4, 4),
        ({"BT": 128, "BI": 64}, 4, 4),
        ({"BT": 128, "BI": 64}, 8, 4),
        ({"BT": 64, "BI": 64}, 8, 4),
        ({"BT": 128, "BI": 32}, 8, 4),
        ({"BT": 64, "BI": 32}, 4, 1),
    ],
    shared=lambda m, blk, stages: stages * (m["BT"] * m["BI"] + 2 * m["BI"] * blk),  # x, [S1 | U2] chunk
    interpreter={"BT": 32, "BI": 32},
)


@triton.autotune(
    configs=_IN.configs, key=["T_BUCKET", "I", "Lk", "K", "BLK", "PREC"], do_bench=tuning_bench,
    prune_configs_by=_IN.prune_configs_by,
)
@triton.jit(do_not_specialize=SIZES_NOT_SPECIALISED)
def _sketch_in_kernel(
    x,  # [T, I]
    S1,  # [L, I, K]
    U2,  # [L, I, K]
    hp,  # [n_splits, T, 2 Lk]: H (input dtype) when n_splits == 1, else fp32 partial sums over I
    T, I, Lk, T_BUCKET,
    stride_xt, stride_xi,
    stride_s1l, stride_s1i, stride_s1k,
    stride_u2l, stride_u2i, stride_u2k,
    stride_hs, stride_ht,
    K: tl.constexpr, BLK: tl.constexpr, PREC: tl.constexpr,
    BT: tl.constexpr, BI: tl.constexpr,
):
    # grid (row tiles, column chunks, I splits): row tiles vary fastest so neighbours share A's slice in L2
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_s = tl.program_id(2)
    n_splits = tl.num_programs(2)
    rows = (pid_t * BT + tl.arange(0, BT)).to(tl.int64)
    mask_t = rows < T
    cols = pid_c * BLK + tl.arange(0, BLK)
    mask_c = cols < Lk
    i_per = tl.cdiv(tl.cdiv(I, n_splits), BI) * BI
    i_start = pid_s * i_per
    i_end = tl.minimum(I, i_start + i_per)
    acc1, acc2 = _x_times_a(
        x, S1, U2, rows, mask_t, cols, mask_c, i_start, i_end, I,
        stride_xt, stride_xi, stride_s1l, stride_s1i, stride_s1k, stride_u2l, stride_u2i, stride_u2k,
        K, BT, BI, BLK, PREC,
    )
    h_ptrs = hp + pid_s.to(tl.int64) * stride_hs + rows[:, None] * stride_ht + cols[None, :]
    mask = mask_t[:, None] & mask_c[None, :]
    tl.store(h_ptrs, acc1, mask=mask)  # empty splits store zeros: every partial is defined
    tl.store(h_ptrs + Lk, acc2, mask=mask)


@triton.jit
def _store_y(
    acc, y, bias, rows, mask_t, offs_o, mask_o, scale,
    stride_b, stride_yt, stride_yo, HAS_BIAS: tl.constexpr,
):
    out = acc * scale
    if HAS_BIAS:
        out += tl.load(bias + offs_o * stride_b, mask=mask_o, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y + rows[:, None] * stride_yt + offs_o.to(tl.int64)[None, :] * stride_yo
    tl.store(y_ptrs, out, mask=mask_t[:, None] & mask_o[None, :])  # the one cast to the output dtype


_OUT = Candidates(
    gpu=[
        ({"BT": 64, "BI": 64, "BO": 128}, 4, 3),
        ({"BT": 64, "BI": 128, "BO": 128}, 4, 3),
        ({"BT": 128, "BI": 64, "BO": 128}, 8, 3),
        ({"BT": 128, "BI": 64, "BO": 128}, 4, 3),
        ({"BT": 128, "BI": 64, "BO": 256}, 8, 3),
        ({"BT": 128, "BI": 128, "BO": 64}, 8, 2),
        ({"BT": 64, "BI": 64, "BO": 64}, 4, 2),
        ({"BT": 128, "BI": 64, "BO": 128}, 8, 2),
        ({"BT": 64, "BI": 64, "BO": 128}, 8, 2),
        ({"BT": 128, "BI": 64, "BO": 64}, 8, 3),
        ({"BT": 128, "BI": 64, "BO": 64}, 8, 2),
        ({"BT": 64, "BI": 32, "BO": 64}, 4, 1),
    ],
    # the larger of the y loop ([U1; S2] chunk per stage; the y tile and H's chunk once) and the fused
    # x·A loop (x and the [S1 | U2] chunk per stage)
    shared=lambda m, blk, stages: max(
        stages * 2 * blk * m["BO"] + m["BT"] * m["BO"] + 2 * m["BT"] * blk,
        stages * (m["BT"] * m["BI"] + 2 * m["BI"] * blk),
    ),
    interpreter={"BT": 32, "BI": 32, "BO": 32},
)


@triton.autotune(
    configs=_OUT.configs,
    key=["T_BUCKET", "I", "O", "Lk", "K", "BLK", "PREC", "ONE_CHUNK", "FUSED", "n_splits", "o_groups"],
    do_bench=tuning_bench,
    prune_configs_by=_OUT.prune_configs_by,
)
@triton.jit(do_not_specialize=SIZES_NOT_SPECIALISED)
def _sketch_out_kernel(
    x,  # [T, I]  read when FUSED
    S1,  # [L, I, K]  read when FUSED
    U2,  # [L, I, K]  read when FUSED
    hp,  # [n_splits, T, 2 Lk]  H or its partial sums over I, read when not FUSED
    h,  # [T, 2 Lk]  H kept for the backward, written when STORE_H
    U1,  # [L, K, O]
    S2,  # [L, K, O]
    bias,  # [O]  read when HAS_BIAS
    y,  # [T, O]
    T, I, O, Lk, T_BUCKET, n_splits, o_groups, scale,
    stride_xt, stride_xi,
    stride_s1l, stride_s1i, stride_s1k,
    stride_u2l, stride_u2i, stride_u2k,
    stride_hs, stride_ht,
    stride_u1l, stride_u1k, stride_u1o,
    stride_s2l, stride_s2k, stride_s2o,
    stride_b, stride_yt, stride_yo,
    K: tl.constexpr, BLK: tl.constexpr, PREC: tl.constexpr,
    ONE_CHUNK: tl.constexpr, FUSED: tl.constexpr, STORE_H: tl.constexpr, HAS_BIAS: tl.constexpr,
    BT: tl.constexpr, BI: tl.constexpr, BO: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_t = pid // o_groups  # the o_groups programs of a row tile are adjacent: a recomputing sibling finds x in L2
    pid_g = pid % o_groups
    rows = (pid_t * BT + tl.arange(0, BT)).to(tl.int64)
    mask_t = rows < T
    o_per = tl.cdiv(tl.cdiv(O, o_groups), BO) * BO
    o_start = pid_g * o_per
    o_end = tl.minimum(O, o_start + o_per)
    if ONE_CHUNK:
        # R <= 2 BLK: this program's H tile stays in registers across all its O tiles
        cols = tl.arange(0, BLK)
        mask_c = cols < Lk
        mask_h = mask_t[:, None] & mask_c[None, :]
        if FUSED:
            h1, h2 = _x_times_a(
                x, S1, U2, rows, mask_t, cols, mask_c, 0, I, I,
                stride_xt, stride_xi, stride_s1l, stride_s1i, stride_s1k, stride_u2l, stride_u2i, stride_u2k,
                K, BT, BI, BLK, PREC,
            )
        else:
            hp_ptrs = hp + rows[:, None] * stride_ht + cols[None, :]
            h1 = sum_splits(hp_ptrs, stride_hs, n_splits, mask_h)
            h2 = sum_splits(hp_ptrs + Lk, stride_hs, n_splits, mask_h)
        h1 = h1.to(h.dtype.element_ty)  # H rounded once to the input dtype, as the reference's x @ A
        h2 = h2.to(h.dtype.element_ty)
        if STORE_H:
            if pid_g == 0:
                h_ptrs = h + rows[:, None] * stride_ht + cols[None, :]
                tl.store(h_ptrs, h1, mask=mask_h)
                tl.store(h_ptrs + Lk, h2, mask=mask_h)
        u1_ptrs = U1 + lko_offsets(cols, stride_u1l, stride_u1k, K)[:, None]
        s2_ptrs = S2 + lko_offsets(cols, stride_s2l, stride_s2k, K)[:, None]
        for o in range(o_start, o_end, BO):
            offs_o = o + tl.arange(0, BO)
            mask_o = offs_o < O
            mask_b = mask_c[:, None] & mask_o[None, :]
            u1 = tl.load(u1_ptrs + offs_o[None, :] * stride_u1o, mask=mask_b, other=0.0)
            s2 = tl.load(s2_ptrs + offs_o[None, :] * stride_s2o, mask=mask_b, other=0.0)
            acc = mma(h1, u1, tl.zeros((BT, BO), dtype=tl.float32), PREC)
            acc = mma(h2, s2, acc, PREC)
            _store_y(acc, y, bias, rows, mask_t, offs_o, mask_o, scale, stride_b, stride_yt, stride_yo, HAS_BIAS)
    else:
        # R > 2 BLK: H (written by _sketch_in_kernel) is streamed chunk by chunk for every O tile
        for o in range(o_start, o_end, BO):
            offs_o = o + tl.arange(0, BO)
            mask_o = offs_o < O
            acc = tl.zeros((BT, BO), dtype=tl.float32)
            for c in range(0, Lk, BLK):
                cols = c + tl.arange(0, BLK)
                mask_c = cols < Lk
                mask_h = mask_t[:, None] & mask_c[None, :]
                hp_ptrs = hp + rows[:, None] * stride_ht + cols[None, :]
                h1 = sum_splits(hp_ptrs, stride_hs, n_splits, mask_h).to(h.dtype.element_ty)
                h2 = sum_splits(hp_ptrs + Lk, stride_hs, n_splits, mask_h).to(h.dtype.element_ty)
                mask_b = mask_c[:, None] & mask_o[None, :]
                u1 = tl.load(
                    U1 + lko_offsets(cols, stride_u1l, stride_u1k, K)[:, None] + offs_o[None, :] * stride_u1o,
                    mask=mask_b, other=0.0,
                )
                s2 = tl.load(
                    S2 + lko_offsets(cols, stride_s2l, stride_s2k, K)[:, None] + offs_o[None, :] * stride_s2o,
                    mask=mask_b, other=0.0,
                )
                acc = mma(h1, u1, acc, PREC)
                acc = mma(h2, s2, acc, PREC)
            _store_y(acc, y, bias, rows, mask_t, offs_o, mask_o, scale, stride_b, stride_yt, stride_yo, HAS_BIAS)


def forward_outputs(x, S1s, S2s, U1s=None, U2s=None, bias=None, allow_tf32=True) -> Tuple[torch.Tensor, torch.Tensor]:
    """y (..., O), contiguous (the kernels write it as (T, O)), and H (T, 2Lk): what the forward writes,
    allocated (the fake implementation of the library op too). y is not a view: autograd forbids in-place
    ops on views returned by a custom Function."""
    L, I, K = S1s.shape
    O = S2s.shape[-1]
    T = x.numel() // I if I else 0
    return x.new_empty((*x.shape[:-1], O)), x.new_empty((T, 2 * L * K))


def sketched_linear_forward(
    x: torch.Tensor,
    S1s: torch.Tensor,
    S2s: torch.Tensor,
    U1s: torch.Tensor,
    U2s: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    allow_tf32: bool = True,
    plan: Optional[ForwardPlan] = None,
    out: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    in_op: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernels: returns y (..., O) and H (T, 2Lk) for the backward.

    x may have any leading dims and strides (it is reshaped to (T, I), a view when strides allow).
    ``plan`` forces a launch plan (default: plan.py's rule for the shape). ``out`` is what
    :func:`forward_outputs` returns (allocated here when None). ``in_op``: called inside the library
    op (the kernels go through wrap_triton) rather than eagerly (see :mod:`panther_triton._launch`).
    """
    y, h = forward_outputs(x, S1s, S2s) if out is None else out
    L, I, K = S1s.shape
    O = S2s.shape[-1]
    Lk = L * K
    x2 = x.reshape(-1, I)
    T = x2.shape[0]
    if T == 0:
        return y, h
    if plan is None:
        plan = plan_forward(T, I, O, Lk, x.device)
    BLK = column_chunk(Lk)
    n_chunks = cdiv(Lk, BLK)
    one_chunk = n_chunks == 1
    fused = plan.fused and one_chunk
    split_i = 1 if (fused or not one_chunk) else plan.split_i
    o_groups = plan.o_groups
    layout = None if in_op else layout_key(x2, S1s, S2s, U1s, U2s, bias, allow_tf32, fused, split_i, o_groups)
    prec = dot_precision(x.dtype, allow_tf32)
    bucket = tune_bucket(T)
    weight_strides = (*S1s.stride(), *U2s.stride())
    hp_stride = T * 2 * Lk if split_i > 1 else 0  # hp: h itself, or fp32 partials (split_i, T, 2 Lk)
    if fused:
        hp = x2  # placeholder, not read when FUSED (an input: torch.compile then sees h as the only H written)
    else:
        hp = h if split_i == 1 else torch.empty((split_i, T, 2 * Lk), device=x.device, dtype=torch.float32)
        launch(
            _sketch_in_kernel, lambda META: (cdiv(T, META["BT"]), n_chunks, split_i),
            (x2, S1s, U2s, hp, T, I, Lk, bucket, *x2.stride(), *weight_strides, hp_stride, 2 * Lk),
            dict(K=K, BLK=BLK, PREC=prec), layout,
        )
    launch(
        _sketch_out_kernel, lambda META: (cdiv(T, META["BT"]) * o_groups,),
        (
            x2, S1s, U2s, hp, h, U1s, S2s, bias if bias is not None else x2, y,  # x2: placeholder, never read
            T, I, O, Lk, bucket, split_i, o_groups, 1.0 / (2 * L),
            *x2.stride(), *weight_strides,
            hp_stride, 2 * Lk,  # hp (when read) and h share the row stride 2 Lk
            *U1s.stride(), *S2s.stride(),
            bias.stride(0) if bias is not None else 0, O, 1,  # y: contiguous (T, O)
        ),
        dict(K=K, BLK=BLK, PREC=prec, ONE_CHUNK=one_chunk, FUSED=fused, STORE_H=fused or split_i > 1,
             HAS_BIAS=bias is not None),
        layout,
    )
    return y, h
