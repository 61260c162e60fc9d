r"""Backward of random-feature attention in Triton: the features are recomputed from q, k, omega (and the
non-causal key state saved by the forward); nothing of size T·m is stored.

Per row t with ``out_t = num_t / den_t`` and upstream gradient ``g_t``: ``a_t = g_t / den_t`` and
``b_t = -(g_t·out_t) / den_t`` (0 for rows that see no key or whose normaliser underflowed), so that with
weights ``w_ts = φ(q_t)·φ̃(k_s) d_ts`` (``d_ts`` the causal decay, 1 non-causal):
``dφ(q_t) = Σ_s d_ts (a_t·v_s + b_t) φ̃(k_s)``, ``dφ̃(k_s) = Σ_t d_ts (a_t·v_s + b_t) φ(q_t)``,
``dv_s = Σ_t w_ts a_t``; then through the feature maps to q, k and omega (the stabilisers cancel: constants).

Non-causal: ``_query_grad_kernel`` (per slice of queries and batch·head) gives dq and the slice's part of
the query-side state ``G = Σ_t φ(q_t)ᵀ [a_t, b_t]``; the parts are summed, and ``_key_grad_kernel`` (per
slice of keys and batch·head) gives dk, dv from G.
Causal: ``_causal_query_grad_kernel``, one program per segment from the forward's segment starts, walks
its chunks forward (recomputing the forward's state) for dq, and writes a, b and each chunk's end maximum; ``_causal_key_grad_kernel`` walks them backward with the state
``P = Σ_{t later} exp(M_end - M_t) φ(q_t)ᵀ [a_t, b_t]`` for dk and dv. Each program writes (causal:
accumulates) its share of dω in a float32 workspace, summed over slices, batches (and heads, for a shared
omega) afterwards. The query-side kernels need every feature chunk for a row's output before its a, b:
a pass over the chunks for the outputs, then one for the gradients (:mod:`.forward` for the rest).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from panther.backends.toolkit import cdiv
from panther_triton.ops.rfa_attention.common import (
    FMIN, SPLIT_ROWS, as_float32, causal_chunk, causal_features, feature_grad, held, hold, key_features, keys_kept,
    load_tile, logit_tops, logits, normalise, omega_chunk, output_grads, precision, query_chunk, rows_per_block,
    run,
)
from panther_triton.ops.rfa_attention.forward import carried, mask_args, omega_strides, segments, sizes


@triton.jit
def _query_grad_kernel(
    q, omega, kv, kz, kmax, g, dq, ga, gb, dom,  # ga, gb, dom: this slice's parts [BH, n, BM, BDV | 1 | BD]
    T, H, m, D, Dv, scale, inv_sqrt_m,
    sq_b, sq_h, sq_t, sq_d, so_h, so_m, so_d, sg_b, sg_h, sg_t, sg_d, split_rows,
    BT: tl.constexpr, FM: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, NF: tl.constexpr,
    SOFTMAX: tl.constexpr, PREC: tl.constexpr,
):
    # float32 whatever the caller passed: torch.compile hands symbolic sizes' floats over as float64
    scale, inv_sqrt_m = as_float32(scale), as_float32(inv_sqrt_m)
    bh = tl.program_id(0).to(tl.int64)
    b, h = bh // H, bh % H
    part = bh * tl.num_programs(1) + tl.program_id(1)  # this slice's partial sums
    start = tl.program_id(1) * split_rows
    cf, cd, cv, rt = tl.arange(0, FM), tl.arange(0, BD), tl.arange(0, BDV), tl.arange(0, BT)
    omega += h * so_h
    om0 = load_tile(omega, cf, m, so_m, cd, D, so_d)
    kv += bh * NF * FM * BDV
    kz += bh * NF * FM
    state0 = tl.load(kv + cf[:, None] * BDV + cv[None, :])
    z0 = tl.load(kz + cf)
    sees = (tl.zeros((BT,), dtype=tl.float32) + tl.load(kmax + bh)) > FMIN
    q += b * sq_b + h * sq_h
    g += b * sg_b + h * sg_h
    ga += part * NF * FM * BDV
    gb += part * NF * FM
    dom += part * NF * FM * BD
    acc_a = tl.zeros((FM, BDV), dtype=tl.float32)
    acc_b = tl.zeros((FM,), dtype=tl.float32)
    acc_om = tl.zeros((FM, BD), dtype=tl.float32)
    for t0 in range(start, tl.minimum(start + split_rows, T), BT):
        rows = t0 + rt
        xq = load_tile(q, rows, T, sq_t, cd, D, sq_d) * scale
        cq, lq_one = logit_tops(xq, omega, om0, m, D, so_m, so_d, FM, BD, NF, SOFTMAX, PREC)
        num = tl.zeros((BT, BDV), dtype=tl.float32)
        den = tl.zeros((BT,), dtype=tl.float32)
        for f in range(NF):  # the rows' outputs, which every feature's gradient needs
            _, fq, _ = query_chunk(xq, lq_one, cq, omega, om0, f, m, D, so_m, so_d, inv_sqrt_m, FM, BD, NF, SOFTMAX,
                                   PREC)
            st = held(state0, kv + (f * FM + cf[:, None]) * BDV + cv[None, :], NF)
            num = tl.dot(fq, st, num, input_precision=PREC)
            den += tl.sum(fq * held(z0, kz + f * FM + cf, NF)[None, :], 1)
        o, seen = normalise(num, den, sees, SOFTMAX)
        a, bb = output_grads(load_tile(g, rows, T, sg_t, cv, Dv, sg_d), o, den, seen)
        dx = tl.zeros((BT, BD), dtype=tl.float32)
        for f in range(NF):
            lq, fq, om = query_chunk(xq, lq_one, cq, omega, om0, f, m, D, so_m, so_d, inv_sqrt_m, FM, BD, NF,
                                     SOFTMAX, PREC)
            at_v, at_1, at_d = (f * FM + cf[:, None]) * BDV + cv[None, :], f * FM + cf, (f * FM + cf[:, None]) * BD + cd[None, :]
            st = held(state0, kv + at_v, NF)
            dfq = tl.dot(a, tl.trans(st), input_precision=PREC) + bb[:, None] * held(z0, kz + at_1, NF)[None, :]
            acc_a = hold(tl.dot(tl.trans(fq), a, held(acc_a, ga + at_v, NF), input_precision=PREC), ga + at_v, NF)
            acc_b = hold(held(acc_b, gb + at_1, NF) + tl.sum(fq * bb[:, None], 0), gb + at_1, NF)
            dxf, d_om = feature_grad(dfq, fq, lq, xq, om, inv_sqrt_m, SOFTMAX, PREC)
            dx += dxf
            acc_om = hold(held(acc_om, dom + at_d, NF) + d_om, dom + at_d, NF)
        tl.store(dq + bh * T * D + rows[:, None] * D + cd[None, :], (dx * scale).to(dq.dtype.element_ty),
                 mask=(rows[:, None] < T) & (cd[None, :] < D))
    if NF == 1:  # else they are in place already
        tl.store(ga + cf[:, None] * BDV + cv[None, :], acc_a)
        tl.store(gb + cf, acc_b)
        tl.store(dom + cf[:, None] * BD + cd[None, :], acc_om)


@triton.jit
def _key_grad_kernel(
    k, v, omega, kpm, kmax, ga, gb, dk, dv, dom,  # ga, gb: the query-side state [BH, 1, BM, BDV | 1]
    S, H, m, D, Dv, scale, inv_sqrt_m,
    sk_b, sk_h, sk_s, sk_d, sv_b, sv_h, sv_s, sv_d, so_h, so_m, so_d, sm_b, sm_s, split_rows,
    BS: tl.constexpr, FM: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, NF: tl.constexpr,
    HAS_MASK: tl.constexpr, SOFTMAX: tl.constexpr, PREC: tl.constexpr,
):
    # float32 whatever the caller passed: torch.compile hands symbolic sizes' floats over as float64
    scale, inv_sqrt_m = as_float32(scale), as_float32(inv_sqrt_m)
    bh = tl.program_id(0).to(tl.int64)
    b, h = bh // H, bh % H
    part = bh * tl.num_programs(1) + tl.program_id(1)
    start = tl.program_id(1) * split_rows
    cf, cd, cv, rs = tl.arange(0, FM), tl.arange(0, BD), tl.arange(0, BDV), tl.arange(0, BS)
    omega += h * so_h
    om0 = load_tile(omega, cf, m, so_m, cd, D, so_d)
    ga += bh * NF * FM * BDV
    gb += bh * NF * FM
    G0 = tl.load(ga + cf[:, None] * BDV + cv[None, :])
    Gb0 = tl.load(gb + cf)
    M = tl.load(kmax + bh)
    k += b * sk_b + h * sk_h
    v += b * sv_b + h * sv_h
    kpm += b * sm_b
    dom += part * NF * FM * BD
    acc_om = tl.zeros((FM, BD), dtype=tl.float32)
    for s0 in range(start, tl.minimum(start + split_rows, S), BS):
        rows = s0 + rs
        keep = keys_kept(kpm, rows, S, sm_s, HAS_MASK)
        xk = load_tile(k, rows, S, sk_s, cd, D, sk_d) * scale
        vt = load_tile(v, rows, S, sv_s, cv, Dv, sv_d)
        dx = tl.zeros((BS, BD), dtype=tl.float32)
        dvt = tl.zeros((BS, BDV), dtype=tl.float32)
        for f in range(NF):
            om = omega_chunk(omega, om0, f, m, D, so_m, so_d, FM, BD, NF)
            lk = logits(xk, om, f * FM + cf < m, SOFTMAX, PREC)
            fk = key_features(lk, M, keep, inv_sqrt_m, SOFTMAX)
            G = held(G0, ga + (f * FM + cf[:, None]) * BDV + cv[None, :], NF)
            dfk = tl.where(keep[:, None], tl.dot(vt, tl.trans(G), input_precision=PREC)
                           + held(Gb0, gb + f * FM + cf, NF)[None, :], 0.0)
            dvt = tl.dot(fk, G, dvt, input_precision=PREC)
            dxf, d_om = feature_grad(dfk, fk, lk, xk, om, inv_sqrt_m, SOFTMAX, PREC)
            dx += dxf
            at_d = (f * FM + cf[:, None]) * BD + cd[None, :]
            acc_om = hold(held(acc_om, dom + at_d, NF) + d_om, dom + at_d, NF)
        tl.store(dk + bh * S * D + rows[:, None] * D + cd[None, :], (dx * scale).to(dk.dtype.element_ty),
                 mask=(rows[:, None] < S) & (cd[None, :] < D))
        tl.store(dv + bh * S * Dv + rows[:, None] * Dv + cv[None, :], dvt.to(dv.dtype.element_ty),
                 mask=(rows[:, None] < S) & (cv[None, :] < Dv))
    if NF == 1:
        tl.store(dom + cf[:, None] * BD + cd[None, :], acc_om)


@triton.jit
def _causal_query_grad_kernel(
    q, k, v, omega, kpm, g, dq, ab, m_end, dom, work, work_z, starts,  # dom: per segment [BH, n_seg, BM, BD]
    T, H, m, D, Dv, scale, inv_sqrt_m,
    sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d, so_h, so_m, so_d, sm_b, sm_s,
    sg_b, sg_h, sg_t, sg_d, n_chunks, seg_rows,
    BC: tl.constexpr, FM: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, NF: tl.constexpr,
    HAS_MASK: tl.constexpr, SOFTMAX: tl.constexpr, PREC: tl.constexpr,
):
    # float32 whatever the caller passed: torch.compile hands symbolic sizes' floats over as float64
    scale, inv_sqrt_m = as_float32(scale), as_float32(inv_sqrt_m)
    bh = tl.program_id(0).to(tl.int64)
    b, h = bh // H, bh % H
    cf, cd, cv, rc = tl.arange(0, FM), tl.arange(0, BD), tl.arange(0, BDV), tl.arange(0, BC)
    omega += h * so_h
    om0 = load_tile(omega, cf, m, so_m, cd, D, so_d)
    q += b * sq_b + h * sq_h
    k += b * sk_b + h * sk_h
    v += b * sv_b + h * sv_h
    g += b * sg_b + h * sg_h
    kpm += b * sm_b
    ab += bh * T * (BDV + 1)  # row t: [a_t (BDV), b_t]
    seg = bh * tl.num_programs(1) + tl.program_id(1)  # as in the forward's _causal_kernel
    dom += seg * NF * FM * BD
    work += seg * NF * FM * BDV
    work_z += seg * NF * FM
    M_prev = tl.load(starts + seg)
    state = tl.load(work + cf[:, None] * BDV + cv[None, :])
    z = tl.load(work_z + cf)
    acc_om = tl.zeros((FM, BD), dtype=tl.float32)
    start = tl.program_id(1) * seg_rows
    for c0 in range(start, tl.minimum(start + seg_rows, T), BC):
        xq, xk, vt, keep, cq, lq_one, lk_one, Ms, M_end, decay = causal_chunk(
            q, k, v, kpm, omega, om0, c0, T, m, D, Dv, scale, M_prev,
            sq_t, sq_d, sk_t, sk_d, sv_t, sv_d, so_m, so_d, sm_s, BC, FM, BD, BDV, NF, HAS_MASK, SOFTMAX, PREC)
        rows = c0 + rc
        inter = tl.exp(M_prev - Ms) if SOFTMAX else tl.full((BC,), 1.0, tl.float32)
        alpha = tl.exp(M_prev - M_end) if SOFTMAX else 1.0
        shift = tl.exp(Ms - M_end) if SOFTMAX else tl.full((BC,), 1.0, tl.float32)
        scores = tl.zeros((BC, BC), dtype=tl.float32)
        num = tl.zeros((BC, BDV), dtype=tl.float32)
        den = tl.zeros((BC,), dtype=tl.float32)
        for f in range(NF):  # the rows' outputs first: every feature's gradient needs them
            _, fq, _, fk, _ = causal_features(xq, xk, lq_one, lk_one, cq, Ms, keep, omega, om0, f, m, D, so_m, so_d,
                                              inv_sqrt_m, FM, BD, NF, SOFTMAX, PREC)
            st = held(state, work + (f * FM + cf[:, None]) * BDV + cv[None, :], NF)
            scores = tl.dot(fq, tl.trans(fk), scores, input_precision=PREC)
            fq_in = fq * inter[:, None]
            num = tl.dot(fq_in, st, num, input_precision=PREC)
            den += tl.sum(fq_in * held(z, work_z + f * FM + cf, NF)[None, :], 1)
        scores = scores * decay
        num = tl.dot(scores, vt, num, input_precision=PREC)
        den += tl.sum(scores, 1)
        o, seen = normalise(num, den, Ms > FMIN, SOFTMAX)
        a, bb = output_grads(load_tile(g, rows, T, sg_t, cv, Dv, sg_d), o, den, seen)
        tl.store(ab + rows[:, None] * (BDV + 1) + cv[None, :], a, mask=rows[:, None] < T)
        tl.store(ab + rows * (BDV + 1) + BDV, bb, mask=rows < T)
        W = (tl.dot(a, tl.trans(vt), input_precision=PREC) + bb[:, None]) * decay  # [t, s]
        dx = tl.zeros((BC, BD), dtype=tl.float32)
        for f in range(NF):
            lq, fq, _, fk, om = causal_features(xq, xk, lq_one, lk_one, cq, Ms, keep, omega, om0, f, m, D, so_m,
                                                so_d, inv_sqrt_m, FM, BD, NF, SOFTMAX, PREC)
            at_v, at_1, at_d = (f * FM + cf[:, None]) * BDV + cv[None, :], f * FM + cf, (f * FM + cf[:, None]) * BD + cd[None, :]
            state = held(state, work + at_v, NF)
            z = held(z, work_z + at_1, NF)
            dfq = tl.dot(W, fk, input_precision=PREC)
            dfq += inter[:, None] * (tl.dot(a, tl.trans(state), input_precision=PREC) + bb[:, None] * z[None, :])
            dxf, d_om = feature_grad(dfq, fq, lq, xq, om, inv_sqrt_m, SOFTMAX, PREC)
            dx += dxf
            acc_om = hold(held(acc_om, dom + at_d, NF) + d_om, dom + at_d, NF)
            fk = fk * shift[:, None]  # the state moves from relative to M_prev to relative to M_end
            state = hold(tl.dot(tl.trans(fk), vt, state * alpha, input_precision=PREC), work + at_v, NF)
            z = hold(z * alpha + tl.sum(fk, 0), work_z + at_1, NF)
        tl.store(dq + bh * T * D + rows[:, None] * D + cd[None, :], (dx * scale).to(dq.dtype.element_ty),
                 mask=(rows[:, None] < T) & (cd[None, :] < D))
        tl.store(m_end + bh * n_chunks + c0 // BC, M_end)
        M_prev = M_end
    if NF == 1:
        tl.store(dom + cf[:, None] * BD + cd[None, :], acc_om)


@triton.jit
def _causal_key_grad_kernel(
    q, k, v, omega, kpm, ab, m_end, dk, dv, dom, work, work_z,
    T, H, m, D, Dv, scale, inv_sqrt_m,
    sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d, so_h, so_m, so_d, sm_b, sm_s,
    n_chunks,
    BC: tl.constexpr, FM: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, NF: tl.constexpr,
    HAS_MASK: tl.constexpr, SOFTMAX: tl.constexpr, PREC: tl.constexpr,
):
    # float32 whatever the caller passed: torch.compile hands symbolic sizes' floats over as float64
    scale, inv_sqrt_m = as_float32(scale), as_float32(inv_sqrt_m)
    bh = tl.program_id(0).to(tl.int64)
    b, h = bh // H, bh % H
    cf, cd, cv, rc = tl.arange(0, FM), tl.arange(0, BD), tl.arange(0, BDV), tl.arange(0, BC)
    omega += h * so_h
    om0 = load_tile(omega, cf, m, so_m, cd, D, so_d)
    q += b * sq_b + h * sq_h
    k += b * sk_b + h * sk_h
    v += b * sv_b + h * sv_h
    kpm += b * sm_b
    ab += bh * T * (BDV + 1)
    m_end += bh * n_chunks
    dom += bh * NF * FM * BD  # holds the query kernel's share of dω
    work += bh * NF * FM * BDV
    work_z += bh * NF * FM
    acc_om = tl.load(dom + cf[:, None] * BD + cd[None, :])
    P = tl.zeros((FM, BDV), dtype=tl.float32)  # Σ_{t after this chunk} exp(M_end - M_t) φ(q_t)ᵀ a_t
    p = tl.zeros((FM,), dtype=tl.float32)  # ... φ(q_t) b_t
    for jj in range(0, n_chunks):
        j = n_chunks - 1 - jj
        c0 = j * BC
        M_prev = tl.load(m_end + j - 1, mask=j > 0, other=FMIN)
        M_here = tl.load(m_end + j)
        xq, xk, vt, keep, cq, lq_one, lk_one, Ms, M_end, decay = causal_chunk(
            q, k, v, kpm, omega, om0, c0, T, m, D, Dv, scale, M_prev,
            sq_t, sq_d, sk_t, sk_d, sv_t, sv_d, so_m, so_d, sm_s, BC, FM, BD, BDV, NF, HAS_MASK, SOFTMAX, PREC)
        rows = c0 + rc
        a = tl.load(ab + rows[:, None] * (BDV + 1) + cv[None, :], mask=rows[:, None] < T, other=0.0)
        bb = tl.load(ab + rows * (BDV + 1) + BDV, mask=rows < T, other=0.0)
        W = (tl.dot(a, tl.trans(vt), input_precision=PREC) + bb[:, None]) * decay  # [t, s]
        later = tl.exp(Ms - M_here) if SOFTMAX else tl.full((BC,), 1.0, tl.float32)
        beta = tl.exp(M_prev - M_here) if SOFTMAX else 1.0  # P moves from relative to M_here to M_prev
        back = tl.exp(M_prev - Ms) if SOFTMAX else tl.full((BC,), 1.0, tl.float32)
        scores = tl.zeros((BC, BC), dtype=tl.float32)
        dx = tl.zeros((BC, BD), dtype=tl.float32)
        dvt = tl.zeros((BC, BDV), dtype=tl.float32)
        for f in range(NF):
            _, fq, lk, fk, om = causal_features(xq, xk, lq_one, lk_one, cq, Ms, keep, omega, om0, f, m, D, so_m,
                                                so_d, inv_sqrt_m, FM, BD, NF, SOFTMAX, PREC)
            at_v, at_1, at_d = (f * FM + cf[:, None]) * BDV + cv[None, :], f * FM + cf, (f * FM + cf[:, None]) * BD + cd[None, :]
            P = held(P, work + at_v, NF)
            p = held(p, work_z + at_1, NF)
            scores = tl.dot(fq, tl.trans(fk), scores, input_precision=PREC)
            dfk = tl.dot(tl.trans(W), fq, input_precision=PREC)
            dfk += later[:, None] * (tl.dot(vt, tl.trans(P), input_precision=PREC) + p[None, :])
            dvt += later[:, None] * tl.dot(fk, P, input_precision=PREC)
            dfk = tl.where(keep[:, None], dfk, 0.0)
            dxf, d_om = feature_grad(dfk, fk, lk, xk, om, inv_sqrt_m, SOFTMAX, PREC)
            dx += dxf
            acc_om = hold(held(acc_om, dom + at_d, NF) + d_om, dom + at_d, NF)
            fq = fq * back[:, None]
            P = hold(tl.dot(tl.trans(fq), a, P * beta, input_precision=PREC), work + at_v, NF)
            p = hold(p * beta + tl.sum(fq * bb[:, None], 0), work_z + at_1, NF)
        dvt = tl.dot(tl.trans(scores * decay), a, dvt, input_precision=PREC)
        tl.store(dk + bh * T * D + rows[:, None] * D + cd[None, :], (dx * scale).to(dk.dtype.element_ty),
                 mask=(rows[:, None] < T) & (cd[None, :] < D))
        tl.store(dv + bh * T * Dv + rows[:, None] * Dv + cv[None, :], dvt.to(dv.dtype.element_ty),
                 mask=(rows[:, None] < T) & (cv[None, :] < Dv))
    if NF == 1:
        tl.store(dom + cf[:, None] * BD + cd[None, :], acc_om)


def rfa_attention_backward(grads, g, q, k, v, omega, key_padding_mask, kv, kz, kmax, causal, relu, in_op):
    """Write the gradients of q, k, v, omega into ``grads`` (contiguous, or empty where not wanted)."""
    dq, dk, dv, domega = grads[:4]
    B, H, T, D, Dv, m, FM, NF, BD, BDV = sizes(q, v, omega)
    BM = NF * FM
    S = k.shape[2]
    f32 = dict(device=q.device, dtype=torch.float32)
    # every gradient is computed (the kernels share the recomputation); unwanted ones go to scratch
    dq = dq if dq.numel() == q.numel() else torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = dk if dk.numel() == k.numel() else torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = dv if dv.numel() == v.numel() else torch.empty(v.shape, dtype=v.dtype, device=v.device)
    dom = torch.zeros((B * H, BM, BD), **f32)
    if B * H:
        kpm, sm_b, sm_s, has_mask = mask_args(key_padding_mask, q)
        common = dict(FM=FM, BD=BD, BDV=BDV, NF=NF, SOFTMAX=not relu, PREC=precision(q.dtype))
        scale, inv = D ** -0.25, m ** -0.5
        R = rows_per_block(D, Dv)
        if causal:
            if T:
                n = cdiv(T, R)
                seg_rows, n_seg = segments(T, D, Dv, m)
                ab = torch.empty((B * H, T, BDV + 1), **f32)
                m_end = torch.empty((B * H, n), **f32)
                strides = (*q.stride(), *k.stride(), *v.stride(), *omega_strides(omega), sm_b, sm_s)
                work = (kv.clone(), kz.clone()) if NF > 1 else (kv, kz)  # the forward's segment starts
                dom_q = (torch.zeros if NF > 1 else torch.empty)((B * H, n_seg, BM, BD), **f32)
                run(_causal_query_grad_kernel, (B * H, n_seg),
                    (q, k, v, omega, kpm, g, dq, ab, m_end, dom_q, *work, kmax, T, H, m, D, Dv, scale, inv,
                     *strides, *g.stride(), n, seg_rows),
                    dict(BC=R, HAS_MASK=has_mask, **common), in_op)
                dom = dom_q.sum(1)
                work = [carried((B * H, BM, BDV), NF, q), carried((B * H, BM), NF, q)]
                run(_causal_key_grad_kernel, (B * H,),
                    (q, k, v, omega, kpm, ab, m_end, dk, dv, dom, *work, T, H, m, D, Dv, scale, inv, *strides, n),
                    dict(BC=R, HAS_MASK=has_mask, **common), in_op)
        else:  # slices of SPLIT_ROWS queries, then keys, per batch·head; partial sums added here
            nq, nk = max(1, cdiv(T, SPLIT_ROWS)), max(1, cdiv(S, SPLIT_ROWS))
            new = torch.zeros if NF > 1 else torch.empty  # with several chunks the kernels accumulate in place
            ga = new((B * H, nq, BM, BDV), **f32)
            gb = new((B * H, nq, BM), **f32)
            dom_q = new((B * H, nq, BM, BD), **f32)
            dom_k = new((B * H, nk, BM, BD), **f32)
            run(_query_grad_kernel, (B * H, nq),
                (q, omega, kv, kz, kmax, g, dq, ga, gb, dom_q, T, H, m, D, Dv, scale, inv, *q.stride(),
                 *omega_strides(omega), *g.stride(), SPLIT_ROWS),
                dict(BT=R, **common), in_op)
            if nq > 1:
                ga, gb = ga.sum(1, keepdim=True), gb.sum(1, keepdim=True)
            run(_key_grad_kernel, (B * H, nk),
                (k, v, omega, kpm, kmax, ga, gb, dk, dv, dom_k, S, H, m, D, Dv, scale, inv, *k.stride(),
                 *v.stride(), *omega_strides(omega), sm_b, sm_s, SPLIT_ROWS),
                dict(BS=R, HAS_MASK=has_mask, **common), in_op)
            if domega.numel():
                dom = dom_q.sum(1) + dom_k.sum(1)
    if domega.numel():
        d = dom.view(B, H, BM, BD)[:, :, :m, :D].sum(0)
        domega.copy_(d if omega.dim() == 3 else d.sum(0))
