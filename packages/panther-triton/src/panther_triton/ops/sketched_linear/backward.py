"""Backward of the sketched linear op in Triton: at most three launches.

With g = dL/dy (T, O), s = 1/(2L), and A, B, H as in forward.py:
    dH  = s g Bᵀ               (T, R)   dH1 = s g U1ᵀ, dH2 = s g S2ᵀ      reduces over O
    dS2 = s H2ᵀ g, dU1 = s H1ᵀ g (Lk, O)  -> (L, K, O)                     reduces over T
    db  = Σ_T g                (O)                                          reduces over T
    dx  = dH Aᵀ                (T, I)   dH1 S1ᵀ + dH2 U2ᵀ                  reduces over R (short)
    dS1 = xᵀ dH1, dU2 = xᵀ dH2 (I, Lk)  -> (L, I, K)                       reduces over T

Launch 1, ``_grad_from_g_kernel``, reads g: its programs take one of two roles. The first programs
(role A) each own BT rows of dH and loop over O; the others (role B) each own BO columns of dS2 (dU1)
and db and loop over T. g is read twice, once per role, because the two reductions run along
different axes: one program doing both would have to add its dS2 share into memory for every
(T tile, O tile), (T/BT) Lk O atomic adds (17 M at T=4096, O=8192, Lk=64), or its dH share for
every O tile; a second read of g costs T O elements of streaming instead, and one launch holds both.
Launch 2, ``_grad_from_x_kernel``, reads x: each program owns BI columns of x (and of dx) and loops
over T, computing its dx tiles (dH Aᵀ, K = R) and accumulating dS1 = xᵀ dH1 for its BI rows on chip:
x is read once, dx written once, and A's tile stays on chip. Past one chunk (R > 2 BLK) each chunk has
its programs, which read x for their chunk of dS1 and take the row tiles of dx in turn.
Launch 3, only when the plan splits T (small I or O leave too few programs otherwise): the T-split
partial sums of the weight grads (fp32) are added up and cast. dH itself may be split over O
(small T), its partials summed by launch 2 as it loads them.
Saved from the forward: x, the weights, and H (T, R) in the input dtype: H2 is needed for dS2 and
costs T R elements to keep, where recomputing it would re-read all of x in launch 1.
"""

from __future__ import annotations

import itertools
import math
from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from panther.backends.toolkit import cdiv
from panther_triton._launch import launch, layout_key
from panther_triton._runtime import SIZES_NOT_SPECIALISED, Candidates, tune_bucket, tuning_bench
from panther_triton.ops.sketched_linear.common import dot_precision, lk_offsets, lko_offsets, mma, store_grad, sum_splits
from panther_triton.ops.sketched_linear.plan import BackwardPlan, column_chunk, plan_backward

_G = Candidates(
    gpu=[
        ({"BT": 64, "BO": 128}, 4, 3),
        ({"BT": 64, "BO": 64}, 4, 4),
        ({"BT": 128, "BO": 64}, 8, 3),
        ({"BT": 128, "BO": 128}, 8, 3),
        ({"BT": 32, "BO": 128}, 4, 4),
        ({"BT": 64, "BO": 128}, 8, 2),
        ({"BT": 64, "BO": 64}, 4, 3),
        ({"BT": 128, "BO": 128}, 8, 2),
        ({"BT": 64, "BO": 64}, 8, 4),
        ({"BT": 64, "BO": 32}, 4, 1),
    ],
    shared=lambda m, blk, stages: stages * (m["BT"] * m["BO"] + 2 * blk * m["BO"]),  # role A: g, [U1; S2] chunk
    interpreter={"BT": 32, "BO": 32},
)


@triton.autotune(
    configs=_G.configs,
    key=["T_BUCKET", "O", "Lk", "K", "BLK", "PREC", "NEED_DH", "NEED_DS2", "NEED_DU1", "NEED_DB", "split_o", "split_t"],
    do_bench=tuning_bench,
    prune_configs_by=_G.prune_configs_by,
)
@triton.jit(do_not_specialize=SIZES_NOT_SPECIALISED)
def _grad_from_g_kernel(
    g,  # [T, O]  dL/dy
    h,  # [T, 2 Lk]  H = [H1 | H2] kept by the forward
    U1,  # [L, K, O]
    S2,  # [L, K, O]
    dhp,  # [split_o, T, 2 Lk]  dH (input dtype) when split_o == 1, else fp32 partial sums over O
    ds2,  # [L, K, O] contiguous, written unless SPLIT_T
    du1,  # [L, K, O] contiguous, written when NEED_DU1 and not SPLIT_T
    db,  # [O], written when NEED_DB and not SPLIT_T
    ws,  # [split_t, n_total] fp32 partial sums over T of all weight grads, written when SPLIT_T
    T, O, Lk, T_BUCKET, n_chunks, split_o, split_t, scale,
    off_ds2, off_du1, off_db, stride_ws,
    stride_gt, stride_go, stride_ht,
    stride_u1l, stride_u1k, stride_u1o,
    stride_s2l, stride_s2k, stride_s2o,
    stride_dhs, stride_dht,
    K: tl.constexpr, BLK: tl.constexpr, PREC: tl.constexpr,
    NEED_DH: tl.constexpr, NEED_DS2: tl.constexpr, NEED_DU1: tl.constexpr, NEED_DB: tl.constexpr,
    SPLIT_T: tl.constexpr, BT: tl.constexpr, BO: tl.constexpr,
):
    pid = tl.program_id(0)
    tiles_t = tl.cdiv(T, BT)
    n_dh = tiles_t * n_chunks * split_o if NEED_DH else 0
    if pid < n_dh:
        # role A: BT rows of dH = s g Bᵀ over this program's share of O (row tiles fastest: neighbours share B in L2)
        pid_t = pid % tiles_t
        pid_c = (pid // tiles_t) % n_chunks
        pid_s = pid // (tiles_t * n_chunks)
        rows = (pid_t * BT + tl.arange(0, BT)).to(tl.int64)
        mask_t = rows < T
        cols = pid_c * BLK + tl.arange(0, BLK)
        mask_c = cols < Lk
        o_per = tl.cdiv(tl.cdiv(O, split_o), BO) * BO
        o_start = pid_s * o_per
        o_end = tl.minimum(O, o_start + o_per)
        offs = tl.arange(0, BO)
        g_ptrs = g + rows[:, None] * stride_gt + (o_start + offs).to(tl.int64)[None, :] * stride_go
        u1_ptrs = U1 + lko_offsets(cols, stride_u1l, stride_u1k, K)[:, None] + (o_start + offs)[None, :] * stride_u1o
        s2_ptrs = S2 + lko_offsets(cols, stride_s2l, stride_s2k, K)[:, None] + (o_start + offs)[None, :] * stride_s2o
        acc1 = tl.zeros((BT, BLK), dtype=tl.float32)
        acc2 = tl.zeros((BT, BLK), dtype=tl.float32)
        for o in range(o_start, o_end, BO):
            mask_o = (o + offs) < O
            gt = tl.load(g_ptrs, mask=mask_t[:, None] & mask_o[None, :], other=0.0)
            u1 = tl.load(u1_ptrs, mask=mask_c[:, None] & mask_o[None, :], other=0.0)
            s2 = tl.load(s2_ptrs, mask=mask_c[:, None] & mask_o[None, :], other=0.0)
            acc1 = mma(gt, tl.trans(u1), acc1, PREC)
            acc2 = mma(gt, tl.trans(s2), acc2, PREC)
            g_ptrs += BO * stride_go
            u1_ptrs += BO * stride_u1o
            s2_ptrs += BO * stride_s2o
        dh_ptrs = dhp + pid_s.to(tl.int64) * stride_dhs + rows[:, None] * stride_dht + cols[None, :]
        mask_dh = mask_t[:, None] & mask_c[None, :]
        tl.store(dh_ptrs, acc1 * scale, mask=mask_dh)
        tl.store(dh_ptrs + Lk, acc2 * scale, mask=mask_dh)
    else:
        # role B: BO columns of dS2 = s H2ᵀ g (dU1 = s H1ᵀ g) and db = Σ g over this program's share of T
        q = pid - n_dh
        tiles_o = tl.cdiv(O, BO)
        pid_o = q % tiles_o
        pid_c = (q // tiles_o) % n_chunks
        pid_s = q // (tiles_o * n_chunks)
        offs_o = pid_o * BO + tl.arange(0, BO)
        mask_o = offs_o < O
        cols = pid_c * BLK + tl.arange(0, BLK)
        mask_c = cols < Lk
        t_per = tl.cdiv(tl.cdiv(T, split_t), BT) * BT
        t_start = pid_s * t_per
        t_end = tl.minimum(T, t_start + t_per)
        ts = tl.arange(0, BT)
        rows = (t_start + ts).to(tl.int64)
        g_ptrs = g + rows[:, None] * stride_gt + offs_o.to(tl.int64)[None, :] * stride_go
        h_ptrs = h + rows[:, None] * stride_ht + cols[None, :]
        acc_s2 = tl.zeros((BLK, BO), dtype=tl.float32)
        acc_u1 = tl.zeros((BLK, BO), dtype=tl.float32)
        acc_b = tl.zeros((BT, BO), dtype=tl.float32)  # summed over rows once, after the loop
        for t in range(t_start, t_end, BT):
            mask_t = (t + ts) < T
            gt = tl.load(g_ptrs, mask=mask_t[:, None] & mask_o[None, :], other=0.0)
            mask_h = mask_t[:, None] & mask_c[None, :]
            if NEED_DS2:
                h2 = tl.load(h_ptrs + Lk, mask=mask_h, other=0.0)
                acc_s2 = mma(tl.trans(h2), gt, acc_s2, PREC)
            if NEED_DU1:
                h1 = tl.load(h_ptrs, mask=mask_h, other=0.0)
                acc_u1 = mma(tl.trans(h1), gt, acc_u1, PREC)
            if NEED_DB:
                acc_b += gt.to(tl.float32)
            g_ptrs += BT * stride_gt
            h_ptrs += BT * stride_ht
        out = cols[:, None] * O + offs_o[None, :]  # row r = l K + j of a contiguous (L, K, O) tensor
        mask_out = mask_c[:, None] & mask_o[None, :]
        if NEED_DS2:
            store_grad(ds2, ws, off_ds2, stride_ws, pid_s, out, acc_s2 * scale, mask_out, SPLIT_T)
        if NEED_DU1:
            store_grad(du1, ws, off_du1, stride_ws, pid_s, out, acc_u1 * scale, mask_out, SPLIT_T)
        if NEED_DB:
            if pid_c == 0:
                store_grad(db, ws, off_db, stride_ws, pid_s, offs_o, tl.sum(acc_b, axis=0), mask_o, SPLIT_T)


_X = Candidates(
    gpu=[
        ({"BT": 64, "BI": 64}, 4, 3),
        ({"BT": 128, "BI": 64}, 8, 3),
        ({"BT": 128, "BI": 64}, 4, 4),
        ({"BT": 64, "BI": 128}, 8, 3),
        ({"BT": 64, "BI": 128}, 4, 3),
        ({"BT": 128, "BI": 128}, 8, 2),
        ({"BT": 32, "BI": 64}, 4, 4),
        ({"BT": 128, "BI": 64}, 8, 2),
        ({"BT": 64, "BI": 64}, 8, 3),
        ({"BT": 64, "BI": 128}, 8, 2),
        ({"BT": 32, "BI": 32}, 4, 1),
    ],
    shared=lambda m, blk, stages: stages * m["BT"] * m["BI"] + 2 * m["BT"] * blk,  # x per stage, dH chunk once
    interpreter={"BT": 32, "BI": 32},
)


@triton.autotune(
    configs=_X.configs,
    key=["T_BUCKET", "I", "Lk", "K", "BLK", "PREC", "ONE_CHUNK", "NEED_DX", "NEED_DS1", "NEED_DU2", "split_o", "split_t"],
    do_bench=tuning_bench,
    prune_configs_by=_X.prune_configs_by,
)
@triton.jit(do_not_specialize=SIZES_NOT_SPECIALISED)
def _grad_from_x_kernel(
    x,  # [T, I]
    dhp,  # [split_o, T, 2 Lk]  dH = [dH1 | dH2] or its partial sums over O
    S1,  # [L, I, K]
    U2,  # [L, I, K]
    dx,  # [T, I]
    ds1,  # [L, I, K] contiguous, written when NEED_DS1 and not SPLIT_T
    du2,  # [L, I, K] contiguous, written when NEED_DU2 and not SPLIT_T
    ws,  # [split_t, n_total] fp32 partial sums over T of all weight grads, written when SPLIT_T
    T, I, Lk, T_BUCKET, n_chunks, split_o, split_t,
    off_ds1, off_du2, stride_ws,
    stride_xt, stride_xi, stride_dhs, stride_dht,
    stride_s1l, stride_s1i, stride_s1k,
    stride_u2l, stride_u2i, stride_u2k,
    stride_dxt, stride_dxi,
    K: tl.constexpr, BLK: tl.constexpr, PREC: tl.constexpr, ONE_CHUNK: tl.constexpr,
    NEED_DX: tl.constexpr, NEED_DS1: tl.constexpr, NEED_DU2: tl.constexpr,
    LOAD_DH1: tl.constexpr, LOAD_DH2: tl.constexpr, SPLIT_T: tl.constexpr,
    BT: tl.constexpr, BI: tl.constexpr,
):
    # column tiles of x fastest: programs running together share the same rows of dH in L2
    pid = tl.program_id(0)
    tiles_i = tl.cdiv(I, BI)
    pid_i = pid % tiles_i
    pid_c = (pid // tiles_i) % n_chunks
    pid_s = pid // (tiles_i * n_chunks)
    offs_i = pid_i * BI + tl.arange(0, BI)
    mask_i = offs_i < I
    ar_c = tl.arange(0, BLK)
    cols = pid_c * BLK + ar_c
    mask_c = cols < Lk
    t_per = tl.cdiv(tl.cdiv(T, split_t), BT) * BT
    t_start = pid_s * t_per
    t_end = tl.minimum(T, t_start + t_per)
    ts = tl.arange(0, BT)
    rows = (t_start + ts).to(tl.int64)
    x_ptrs = x + rows[:, None] * stride_xt + offs_i.to(tl.int64)[None, :] * stride_xi
    dh_ptrs = dhp + rows[:, None] * stride_dht + cols[None, :]
    dx_ptrs = dx + rows[:, None] * stride_dxt + offs_i.to(tl.int64)[None, :] * stride_dxi
    dxt_ptrs = dx + offs_i.to(tl.int64)[:, None] * stride_dxi + rows[None, :] * stride_dxt  # the same, transposed
    mask_a = mask_i[:, None] & mask_c[None, :]
    if ONE_CHUNK:
        if NEED_DX:  # this program's tile of A, loaded once for all its row tiles
            a1 = tl.load(S1 + offs_i[:, None] * stride_s1i + lk_offsets(cols, stride_s1l, stride_s1k, K)[None, :],
                         mask=mask_a, other=0.0)
            a2 = tl.load(U2 + offs_i[:, None] * stride_u2i + lk_offsets(cols, stride_u2l, stride_u2k, K)[None, :],
                         mask=mask_a, other=0.0)
    acc_s1 = tl.zeros((BI, BLK), dtype=tl.float32)
    acc_u2 = tl.zeros((BI, BLK), dtype=tl.float32)
    for t in range(t_start, t_end, BT):
        mask_t = (t + ts) < T
        mask_h = mask_t[:, None] & mask_c[None, :]
        mask_x = mask_t[:, None] & mask_i[None, :]
        if LOAD_DH1:
            dh1 = sum_splits(dh_ptrs, stride_dhs, split_o, mask_h).to(x.dtype.element_ty)
        if LOAD_DH2:
            dh2 = sum_splits(dh_ptrs + Lk, stride_dhs, split_o, mask_h).to(x.dtype.element_ty)
        if NEED_DS1:
            xt = tl.load(x_ptrs, mask=mask_x, other=0.0)
            acc_s1 = mma(tl.trans(xt), dh1, acc_s1, PREC)
            if NEED_DU2:
                acc_u2 = mma(tl.trans(xt), dh2, acc_u2, PREC)
        else:
            if NEED_DU2:
                xt = tl.load(x_ptrs, mask=mask_x, other=0.0)
                acc_u2 = mma(tl.trans(xt), dh2, acc_u2, PREC)
        if NEED_DX:
            if ONE_CHUNK:
                # dxᵀ = A dHᵀ: A's tile, loaded once, is the first operand and goes to shared memory once;
                # as the second (dx = dH Aᵀ), Triton copied it into shared memory again on every row tile
                acc_xt = mma(a1, tl.trans(dh1), tl.zeros((BI, BT), dtype=tl.float32), PREC)
                acc_xt = mma(a2, tl.trans(dh2), acc_xt, PREC)
                tl.store(dxt_ptrs, acc_xt, mask=tl.trans(mask_x))
            else:
                # R > 2 BLK: a row tile's dx sums over every chunk; the n_chunks programs of this column tile
                # take the row tiles in turn (each reads all rows anyway, for its chunk of dS1), so that dx,
                # a GEMM with K = R, runs on all of them (one program of n_chunks doing it all made it the
                # backward's bottleneck)
                if (t // BT) % n_chunks == pid_c:
                    acc_x = tl.zeros((BT, BI), dtype=tl.float32)
                    dh_rows = dh_ptrs - pid_c * BLK  # column 0 of this row tile's dH
                    for c in range(0, Lk, BLK):
                        cc = c + ar_c
                        mask_cc = cc < Lk
                        mask_hc = mask_t[:, None] & mask_cc[None, :]
                        mask_ac = mask_i[:, None] & mask_cc[None, :]
                        e1 = sum_splits(dh_rows + c, stride_dhs, split_o, mask_hc).to(x.dtype.element_ty)
                        e2 = sum_splits(dh_rows + c + Lk, stride_dhs, split_o, mask_hc).to(x.dtype.element_ty)
                        b1 = tl.load(S1 + offs_i[:, None] * stride_s1i
                                     + lk_offsets(cc, stride_s1l, stride_s1k, K)[None, :], mask=mask_ac, other=0.0)
                        b2 = tl.load(U2 + offs_i[:, None] * stride_u2i
                                     + lk_offsets(cc, stride_u2l, stride_u2k, K)[None, :], mask=mask_ac, other=0.0)
                        acc_x = mma(e1, tl.trans(b1), acc_x, PREC)
                        acc_x = mma(e2, tl.trans(b2), acc_x, PREC)
                    tl.store(dx_ptrs, acc_x, mask=mask_x)
        x_ptrs += BT * stride_xt
        dh_ptrs += BT * stride_dht
        dx_ptrs += BT * stride_dxt
        dxt_ptrs += BT * stride_dxt
    out = offs_i[:, None] * K + lk_offsets(cols, I * K, 1, K)[None, :]  # [l, i, j] of a contiguous (L, I, K)
    if NEED_DS1:
        store_grad(ds1, ws, off_ds1, stride_ws, pid_s, out, acc_s1, mask_a, SPLIT_T)
    if NEED_DU2:
        store_grad(du2, ws, off_du2, stride_ws, pid_s, out, acc_u2, mask_a, SPLIT_T)


_SUM = Candidates(gpu=[({"BLOCK": 1024}, 4, 1)], shared=lambda m, blk, stages: 0, interpreter={"BLOCK": 256})


@triton.autotune(configs=_SUM.configs, key=["N_OUT"], do_bench=tuning_bench)
@triton.jit
def _sum_partials_kernel(
    ws,  # [split_t, n_total] fp32: the partial gradients, segments back to back
    out0, out1, out2, out3, out4,  # the gradients (contiguous), in segment order; the first N_OUT are real
    n0, n1, n2, n3,  # sizes of the first four segments
    split_t, n_total,
    N_OUT: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    acc = sum_splits(ws + offs, n_total, split_t, offs < n_total)
    # absent outputs get no store at all (constexpr), so torch.compile sees them as untouched
    e0 = n0
    tl.store(out0 + offs, acc, mask=offs < tl.minimum(e0, n_total))
    if N_OUT > 1:
        e1 = e0 + n1
        tl.store(out1 + (offs - e0), acc, mask=(offs >= e0) & (offs < tl.minimum(e1, n_total)))
        if N_OUT > 2:
            e2 = e1 + n2
            tl.store(out2 + (offs - e1), acc, mask=(offs >= e1) & (offs < tl.minimum(e2, n_total)))
            if N_OUT > 3:
                e3 = e2 + n3
                tl.store(out3 + (offs - e2), acc, mask=(offs >= e2) & (offs < tl.minimum(e3, n_total)))
                if N_OUT > 4:
                    tl.store(out4 + (offs - e3), acc, mask=(offs >= e3) & (offs < n_total))


Grads = Tuple[Optional[torch.Tensor], ...]


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
    plan: Optional[BackwardPlan] = None,
    out: Optional[Sequence[torch.Tensor]] = None,
    in_op: bool = False,
) -> Grads:
    """Launch the backward kernels for dL/dy = g (..., O).

    ``needs`` says which of (x, S1s, S2s, U1s, U2s, bias) want a gradient (pass False for the bias when
    there is none); the result is (dx, dS1, dS2, dU1, dU2, db) with None for those not wanted. ``h`` is
    the H returned by the forward. ``out`` gives the gradients to write (contiguous tensors of their
    inputs' shapes where wanted; allocated here when None); ``plan`` and ``in_op`` as in
    :func:`~panther_triton.ops.sketched_linear.forward.sketched_linear_forward`.
    """
    L, I, K = S1s.shape
    O = S2s.shape[-1]
    Lk = L * K
    g2 = g.reshape(-1, O)
    x2 = x.reshape(-1, I)
    T = g2.shape[0]
    needs = tuple(bool(n) for n in needs)
    need_x, need_s1, need_s2, need_u1, need_u2, need_b = needs
    shapes = (x.shape, (L, I, K), (L, K, O), (L, K, O), (L, I, K), (O,))
    if out is None:
        out = [torch.empty(s, device=g.device, dtype=x.dtype) if n else None for s, n in zip(shapes, needs)]
    grads = tuple(t if n else None for t, n in zip(out, needs))
    # the weight grads in workspace order: (index in the result, shape)
    order = tuple((i, shapes[i]) for i in (1, 4, 2, 3, 5) if needs[i])
    need_dh = need_x or need_s1 or need_u2
    need_gb = need_s2 or need_u1 or need_b
    if T == 0:
        for i, _ in order:
            grads[i].zero_()
        return grads
    if not (need_dh or need_gb):
        return grads
    if plan is None:
        plan = plan_backward(T, I, O, Lk, g.device)
    split_o = plan.split_o if need_dh else 1
    split_t = plan.split_t if order else 1
    split = split_t > 1
    layout = None if in_op else layout_key(g2, x2, h, S1s, S2s, U1s, U2s, needs, allow_tf32, split_o, split_t)
    sizes = [math.prod(shape) for _, shape in order]
    offsets = dict(zip((i for i, _ in order), itertools.accumulate([0] + sizes))) if split else {}
    n_total = sum(sizes)
    stride_ws = n_total if split else 0
    BLK = column_chunk(Lk)
    n_chunks = cdiv(Lk, BLK)
    one_chunk = n_chunks == 1
    prec = dot_precision(x.dtype, allow_tf32)
    bucket = tune_bucket(T)
    dev, dt = g.device, x.dtype
    dx, dS1, dS2, dU1, dU2, db = grads
    ws = torch.empty((split_t, n_total), device=dev, dtype=torch.float32) if split else None
    # dH: (T, 2 Lk) in the input dtype, or fp32 partials (split_o, T, 2 Lk); without role A, a (1, 2 Lk)
    # placeholder that is no input of ours (an op must not seem to write its inputs)
    dhp_fp32 = need_dh and split_o > 1
    dhp_shape = (split_o, T, 2 * Lk) if dhp_fp32 else (T, 2 * Lk) if need_dh else (1, 2 * Lk)
    dhp = torch.empty(dhp_shape, device=dev, dtype=torch.float32 if dhp_fp32 else dt)
    stride_dhs = T * 2 * Lk if dhp_fp32 else 0

    # placeholders for what a kernel does not write (constexpr flags: no store is even emitted, so
    # torch.compile sees them untouched): read-only inputs of the kernel
    def written(t, fallback):
        return fallback if (t is None or split) else t

    launch(
        _grad_from_g_kernel,
        lambda META: ((cdiv(T, META["BT"]) * n_chunks * split_o if need_dh else 0)
                      + (cdiv(O, META["BO"]) * n_chunks * split_t if need_gb else 0),),
        (
            g2, h, U1s, S2s, dhp, written(dS2, h), written(dU1, h), written(db, h), ws if split else h,
            T, O, Lk, bucket, n_chunks, split_o, split_t, 1.0 / (2 * L),
            offsets.get(2, 0), offsets.get(3, 0), offsets.get(5, 0), stride_ws,
            *g2.stride(), h.stride(0), *U1s.stride(), *S2s.stride(), stride_dhs, 2 * Lk,
        ),
        dict(K=K, BLK=BLK, PREC=prec, NEED_DH=need_dh, NEED_DS2=need_s2, NEED_DU1=need_u1, NEED_DB=need_b,
             SPLIT_T=split),
        layout,
    )
    if need_dh:
        launch(
            _grad_from_x_kernel, lambda META: (cdiv(I, META["BI"]) * n_chunks * split_t,),
            (
                x2, dhp, S1s, U2s, dx if dx is not None else x2, written(dS1, x2), written(dU2, x2),
                ws if split else x2,
                T, I, Lk, bucket, n_chunks, split_o, split_t,
                offsets.get(1, 0), offsets.get(4, 0), stride_ws,
                *x2.stride(), stride_dhs, 2 * Lk, *S1s.stride(), *U2s.stride(),
                *((I, 1) if need_x else (0, 0)),  # dx: contiguous (T, I)
            ),
            dict(K=K, BLK=BLK, PREC=prec, ONE_CHUNK=one_chunk, NEED_DX=need_x, NEED_DS1=need_s1, NEED_DU2=need_u2,
                 LOAD_DH1=need_s1 or (need_x and one_chunk), LOAD_DH2=need_u2 or (need_x and one_chunk),
                 SPLIT_T=split),
            layout,
        )
    if split:
        outs = [grads[i] for i, _ in order]
        launch(
            _sum_partials_kernel, lambda META: (cdiv(n_total, META["BLOCK"]),),
            (ws, *outs, *[ws] * (5 - len(outs)), *(sizes + [0] * 5)[:4], split_t, n_total),  # ws: never stored to
            dict(N_OUT=len(order)),
            layout,
        )
    return grads
