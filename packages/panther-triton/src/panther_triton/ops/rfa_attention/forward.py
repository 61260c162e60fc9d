"""Forward of random-feature attention in Triton; φ(q) and φ̃(k) are computed on chip, never stored.

Non-causal, two launches:
* ``_kv_state_kernel``, one program per (batch·head, slice of SPLIT_ROWS keys, feature chunk): that
  chunk's rows of the state ``KV = Σ_s φ̃(k_s)ᵀ v_s`` (m, Dv), ``z = Σ_s φ̃(k_s)`` (m) and its stabiliser M
  (the largest logit of the unmasked keys), kept relative to the running maximum and rescaled by
  ``exp(M_old - M_new)`` as it grows (one pass over the keys instead of a max pre-pass); the parts are
  then rescaled to the overall maximum and summed. The state is the residual for the backward.
* ``_query_kernel``, one program per (query block, batch·head): ``out = φ(q) KV / φ(q)·z``, over the
  feature chunks after a first pass for each query's largest logit.
Causal, two launches: ``_kv_state_kernel`` on segments of the sequence (:func:`segments`) and a prefix
over them in torch (:func:`causal_starts`) give the state each segment starts from (the residuals for the
backward, O(T / segment) per batch·head); then ``_causal_kernel``, one program per (segment,
batch·head), walks its chunks of C positions (:func:`rows_per_block`): intra-chunk products
``φ(q_t)·φ̃(k_s) exp(M_s - M_t)`` for ``s <= t``, plus the state of the earlier chunks, kept relative to
the running maximum at the previous chunk's end (read by query t with ``exp(M_prev - M_t)``); the
stabilisers first, then the feature chunks one at a time.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from panther.backends.toolkit import cdiv
from panther_triton.ops.rfa_attention.common import (
    FMIN, SPLIT_ROWS, as_float32, block, causal_chunk, causal_features, feature_chunks, held, hold, key_features,
    keys_kept, load_tile, logit_tops, logits, normalise, precision, query_chunk, rows_per_block, run,
)


@triton.jit
def _kv_state_kernel(
    k, v, omega, kpm, kv, kz, kmax,  # [B, H, S, D], [B, H, S, Dv], [H|1, m, D], [B, S]; partial states out
    S, H, m, D, Dv, scale, inv_sqrt_m,
    sk_b, sk_h, sk_s, sk_d, sv_b, sv_h, sv_s, sv_d, so_h, so_m, so_d, sm_b, sm_s, split_rows,
    BS: tl.constexpr, FM: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
    HAS_MASK: tl.constexpr, SOFTMAX: tl.constexpr, PREC: tl.constexpr,
):
    # float32 whatever the caller passed: torch.compile hands symbolic sizes' floats over as float64
    scale, inv_sqrt_m = as_float32(scale), as_float32(inv_sqrt_m)
    bh = tl.program_id(0).to(tl.int64)
    b, h = bh // H, bh % H
    f0 = tl.program_id(2) * FM  # this program's feature chunk
    part = (bh * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(2) + tl.program_id(2)
    start = tl.program_id(1) * split_rows
    cm, cd, cv, rs = f0 + tl.arange(0, FM), tl.arange(0, BD), tl.arange(0, BDV), tl.arange(0, BS)
    om = load_tile(omega + h * so_h, cm, m, so_m, cd, D, so_d)
    k += b * sk_b + h * sk_h
    v += b * sv_b + h * sv_h
    kpm += b * sm_b
    M = tl.full((), FMIN, tl.float32)
    acc = tl.zeros((FM, BDV), dtype=tl.float32)
    z = tl.zeros((FM,), dtype=tl.float32)
    for s0 in range(start, tl.minimum(start + split_rows, S), BS):
        rows = s0 + rs
        keep = keys_kept(kpm, rows, S, sm_s, HAS_MASK)
        lk = logits(load_tile(k, rows, S, sk_s, cd, D, sk_d) * scale, om, cm < m, SOFTMAX, PREC)
        vt = load_tile(v, rows, S, sv_s, cv, Dv, sv_d)
        if SOFTMAX:
            grown = tl.maximum(M, tl.max(tl.where(keep, tl.max(lk, 1), float("-inf")), 0))
            alpha = tl.exp(M - grown)
            acc = acc * alpha
            z = z * alpha
            M = grown
        f = key_features(lk, M, keep, inv_sqrt_m, SOFTMAX)
        acc = tl.dot(tl.trans(f), vt, acc, input_precision=PREC)
        z += tl.sum(f, 0)
    cf = tl.arange(0, FM)
    tl.store(kv + part * FM * BDV + cf[:, None] * BDV + cv[None, :], acc)
    tl.store(kz + part * FM + cf, z)
    tl.store(kmax + part, M)


@triton.jit
def _query_kernel(
    q, omega, kv, kz, kmax, out,  # [B, H, T, D], [H|1, m, D], [BH, BM, BDV], [BH, BM], [BH]; [B, H, T, Dv] out
    T, H, m, D, Dv, scale, inv_sqrt_m,
    sq_b, sq_h, sq_t, sq_d, so_h, so_m, so_d,
    BT: tl.constexpr, FM: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, NF: tl.constexpr,
    SOFTMAX: tl.constexpr, PREC: tl.constexpr,
):
    # float32 whatever the caller passed: torch.compile hands symbolic sizes' floats over as float64
    scale, inv_sqrt_m = as_float32(scale), as_float32(inv_sqrt_m)
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    cf, cd, cv = tl.arange(0, FM), tl.arange(0, BD), tl.arange(0, BDV)
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    omega += h * so_h
    om0 = load_tile(omega, cf, m, so_m, cd, D, so_d)
    kv += bh * NF * FM * BDV
    kz += bh * NF * FM
    xq = load_tile(q + b * sq_b + h * sq_h, rows, T, sq_t, cd, D, sq_d) * scale
    cq, lq_one = logit_tops(xq, omega, om0, m, D, so_m, so_d, FM, BD, NF, SOFTMAX, PREC)
    num = tl.zeros((BT, BDV), dtype=tl.float32)
    den = tl.zeros((BT,), dtype=tl.float32)
    for f in range(NF):
        _, fq, _ = query_chunk(xq, lq_one, cq, omega, om0, f, m, D, so_m, so_d, inv_sqrt_m, FM, BD, NF, SOFTMAX, PREC)
        state = tl.load(kv + (f * FM + cf[:, None]) * BDV + cv[None, :])
        num = tl.dot(fq, state, num, input_precision=PREC)
        den += tl.sum(fq * tl.load(kz + f * FM + cf)[None, :], 1)
    sees = (tl.zeros((BT,), dtype=tl.float32) + tl.load(kmax + bh)) > FMIN  # one per row
    o, _ = normalise(num, den, sees, SOFTMAX)
    mask = (rows[:, None] < T) & (cv[None, :] < Dv)
    tl.store(out + bh * T * Dv + rows[:, None] * Dv + cv[None, :], o.to(out.dtype.element_ty), mask=mask)


@triton.jit
def _causal_kernel(
    q, k, v, omega, kpm, out, work, work_z, starts,  # [B, H, T, D|Dv], [H|1, m, D], [B, T]; out; segment starts
    T, H, m, D, Dv, scale, inv_sqrt_m,
    sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d, so_h, so_m, so_d, sm_b, sm_s, seg_rows,
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
    out += bh * T * Dv
    seg = bh * tl.num_programs(1) + tl.program_id(1)  # this segment of seg_rows positions
    work += seg * NF * FM * BDV  # its starting state [BM, BDV], z [BM] (several feature chunks: updated in place)
    work_z += seg * NF * FM
    M_prev = tl.load(starts + seg)  # the keys' maximum before the segment
    state = tl.load(work + cf[:, None] * BDV + cv[None, :])  # Σ exp(M_s - M_prev) φ̃(k_s)ᵀ v_s before the chunk
    z = tl.load(work_z + cf)
    start = tl.program_id(1) * seg_rows
    for c0 in range(start, tl.minimum(start + seg_rows, T), BC):
        xq, xk, vt, keep, cq, lq_one, lk_one, Ms, M_end, decay = causal_chunk(
            q, k, v, kpm, omega, om0, c0, T, m, D, Dv, scale, M_prev,
            sq_t, sq_d, sk_t, sk_d, sv_t, sv_d, so_m, so_d, sm_s, BC, FM, BD, BDV, NF, HAS_MASK, SOFTMAX, PREC)
        inter = tl.exp(M_prev - Ms) if SOFTMAX else tl.full((BC,), 1.0, tl.float32)
        alpha = tl.exp(M_prev - M_end) if SOFTMAX else 1.0  # the state moves from relative to M_prev to M_end
        shift = tl.exp(Ms - M_end) if SOFTMAX else tl.full((BC,), 1.0, tl.float32)
        scores = tl.zeros((BC, BC), dtype=tl.float32)
        num = tl.zeros((BC, BDV), dtype=tl.float32)
        den = tl.zeros((BC,), dtype=tl.float32)
        for f in range(NF):
            _, fq, _, fk, _ = causal_features(xq, xk, lq_one, lk_one, cq, Ms, keep, omega, om0, f, m, D, so_m, so_d,
                                              inv_sqrt_m, FM, BD, NF, SOFTMAX, PREC)
            at = (f * FM + cf[:, None]) * BDV + cv[None, :]
            state = held(state, work + at, NF)
            z = held(z, work_z + f * FM + cf, NF)
            scores = tl.dot(fq, tl.trans(fk), scores, input_precision=PREC)
            fq_in = fq * inter[:, None]
            num = tl.dot(fq_in, state, num, input_precision=PREC)
            den += tl.sum(fq_in * z[None, :], 1)
            fk = fk * shift[:, None]
            state = hold(tl.dot(tl.trans(fk), vt, state * alpha, input_precision=PREC), work + at, NF)
            z = hold(z * alpha + tl.sum(fk, 0), work_z + f * FM + cf, NF)
        scores = scores * decay
        num = tl.dot(scores, vt, num, input_precision=PREC)
        den += tl.sum(scores, 1)
        o, _ = normalise(num, den, Ms > FMIN, SOFTMAX)
        rows = c0 + rc
        tl.store(out + rows[:, None] * Dv + cv[None, :], o.to(out.dtype.element_ty),
                 mask=(rows[:, None] < T) & (cv[None, :] < Dv))
        M_prev = M_end


def sizes(q, v, omega) -> Tuple[int, int, int, int, int, int, int, int, int, int]:
    """(B, H, T, D, Dv, m, FM, NF, BD, BDV): NF feature chunks of FM (``BM = NF FM`` padded features)."""
    B, H, T, D = q.shape
    Dv, m = v.shape[-1], omega.shape[-2]
    return (B, H, T, D, Dv, m, *feature_chunks(m), block(D), block(Dv))


def segments(T: int, D: int, Dv: int, m: int) -> Tuple[int, int]:
    """(rows, count) of the causal segments, one program each, started from the state of the keys before
    it: SPLIT_ROWS / 4 rows, more for states past 64 x 64 floats, so that the segments' starting states
    (the causal residuals) take at most 16 floats per position and batch·head."""
    FM, NF = feature_chunks(m)
    R = rows_per_block(D, Dv)
    rows = R * cdiv(SPLIT_ROWS // 4 * max(1, NF * FM * block(Dv) // 4096), R)  # whole chunks
    return rows, max(1, cdiv(T, rows))


def forward_outputs(q, k, v, omega, key_padding_mask=None, causal=False, relu=False):
    """(out (B, H, T, Dv) in q's dtype, and the residuals in float32: non-causal, the key state KV
    (B·H, BM, BDV), z (B·H, BM) and the keys' stabiliser M (B·H,); causal, the state each of the n
    segments starts from, (B·H, n BM, BDV), (B·H, n BM), and the keys' maximum before it (B·H n,))."""
    B, H, T, D, Dv, m, FM, NF, BD, BDV = sizes(q, v, omega)
    out = q.new_empty((B, H, T, Dv))
    n = segments(T, D, Dv, m)[1] if causal else 1
    f32 = dict(device=q.device, dtype=torch.float32)
    return (out, torch.empty((B * H, n * NF * FM, BDV), **f32), torch.empty((B * H, n * NF * FM), **f32),
            torch.empty((B * H * n,), **f32))


def omega_strides(omega) -> Tuple[int, int, int]:
    """(head, feature, dim) strides of omega; head stride 0 for one omega shared by every head."""
    return (omega.stride(0), omega.stride(1), omega.stride(2)) if omega.dim() == 3 else (0, *omega.stride())


def mask_args(key_padding_mask, placeholder):
    """(pointer, stride_b, stride_s, HAS_MASK): a placeholder tensor, never read, where there is no mask."""
    if key_padding_mask is None:
        return placeholder, 0, 0, False
    return key_padding_mask, *key_padding_mask.stride(), True


def carried(shape, NF: int, like: torch.Tensor) -> torch.Tensor:
    """The float32 buffer (zeros) in which a program keeps its per-chunk tiles when NF > 1 (:func:`held`);
    with one chunk they stay in registers and a placeholder, never read, is passed."""
    return torch.zeros(shape, device=like.device, dtype=torch.float32) if NF > 1 else like


def causal_starts(k, v, omega, mask, out, seg_rows: int, n_seg: int, dims, common, in_op: bool) -> None:
    """Write into ``out = (KV, z, M)`` the state each causal segment starts from: the key states of the
    earlier segments (``_kv_state_kernel`` on slices of seg_rows keys), each moved from its own maximum M_j
    to the running maximum before segment i, ``M_i = max_{j<i} M_j``: ``KV_i = Σ_{j<i} exp(M_j - M_i) S_j``
    (weights <= 1), as the sequential walk over the chunks would have it."""
    kv0, kz0, m0 = out
    kpm, sm_b, sm_s, has_mask = mask
    m, D, Dv, FM, NF, BDV, R = dims
    BH, S = kv0.shape[0], k.shape[2]
    f32 = dict(device=kv0.device, dtype=torch.float32)
    kv_p = torch.empty((BH, n_seg, NF * FM, BDV), **f32)
    kz_p = torch.empty((BH, n_seg, NF * FM), **f32)
    km_p = torch.empty((BH, n_seg, NF), **f32)
    run(_kv_state_kernel, (BH, n_seg, NF),
        (k, v, omega, kpm, kv_p, kz_p, km_p, S, k.shape[1], m, D, Dv, D ** -0.25, m ** -0.5, *k.stride(),
         *v.stride(), *omega_strides(omega), sm_b, sm_s, seg_rows),
        dict(BS=R, HAS_MASK=has_mask, **common), in_op)
    M_seg = km_p.amax(2)  # (BH, n_seg): over the feature chunks, then each chunk's part moved to it
    w = torch.exp(km_p - M_seg[:, :, None])[..., None]
    S_seg = (kv_p.view(BH, n_seg, NF, FM * BDV) * w).view(BH, n_seg, -1)
    z_seg = (kz_p.view(BH, n_seg, NF, FM) * w).view(BH, n_seg, -1)
    first = torch.full((BH, 1), FMIN.value, **f32)
    M_start = torch.cat([first, torch.cummax(M_seg, dim=1).values[:, :-1]], dim=1)  # (BH, n_seg)
    earlier = torch.ones((n_seg, n_seg), device=kv0.device, dtype=torch.bool).tril(-1)  # [i, j]: j < i
    W = torch.exp(torch.where(earlier, M_seg[:, None, :] - M_start[:, :, None], float("-inf")))
    kv0.copy_(torch.bmm(W, S_seg).view(kv0.shape))
    kz0.copy_(torch.bmm(W, z_seg).view(kz0.shape))
    m0.copy_(M_start.reshape(-1))


def rfa_attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, omega: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor] = None, causal: bool = False, relu: bool = False,
    out=None, in_op: bool = False,
):
    """Launch the forward kernels; returns :func:`forward_outputs`' tuple, written. q, k, v may be strided."""
    o, kv, kz, kmax = forward_outputs(q, k, v, omega, key_padding_mask, causal, relu) if out is None else out
    B, H, T, D, Dv, m, FM, NF, BD, BDV = sizes(q, v, omega)
    S = k.shape[2]
    if B * H == 0:
        return o, kv, kz, kmax
    kpm, sm_b, sm_s, has_mask = mask_args(key_padding_mask, q)
    common = dict(FM=FM, BD=BD, BDV=BDV, SOFTMAX=not relu, PREC=precision(q.dtype))
    scale, inv = D ** -0.25, m ** -0.5
    R = rows_per_block(D, Dv)
    if causal:
        seg_rows, n_seg = segments(T, D, Dv, m)
        causal_starts(k, v, omega, (kpm, sm_b, sm_s, has_mask), (kv, kz, kmax), seg_rows, n_seg,
                      (m, D, Dv, FM, NF, BDV, R), common, in_op)
        if T:
            work, work_z = (kv.clone(), kz.clone()) if NF > 1 else (kv, kz)  # several chunks: updated in place
            run(_causal_kernel, (B * H, n_seg),
                (q, k, v, omega, kpm, o, work, work_z, kmax, T, H, m, D, Dv, scale, inv, *q.stride(), *k.stride(),
                 *v.stride(), *omega_strides(omega), sm_b, sm_s, seg_rows),
                dict(BC=R, NF=NF, HAS_MASK=has_mask, **common), in_op)
        return o, kv, kz, kmax
    n_split = max(1, cdiv(S, SPLIT_ROWS))
    if n_split == 1:  # one slice: the feature chunks' parts are the state's rows
        parts = kv, kz, torch.empty((B * H, NF), device=q.device, dtype=torch.float32) if NF > 1 else kmax
    else:
        f32 = dict(device=q.device, dtype=torch.float32)
        parts = (torch.empty((B * H, n_split, NF * FM, BDV), **f32), torch.empty((B * H, n_split, NF * FM), **f32),
                 torch.empty((B * H, n_split, NF), **f32))
    run(_kv_state_kernel, (B * H, n_split, NF),
        (k, v, omega, kpm, *parts, S, H, m, D, Dv, scale, inv, *k.stride(), *v.stride(),
         *omega_strides(omega), sm_b, sm_s, SPLIT_ROWS),
        dict(BS=R, HAS_MASK=has_mask, **common), in_op)
    if n_split * NF > 1:  # the parts' states, each relative to its own maximum, moved to the overall one
        kv_p, kz_p, kmax_p = (p.view(B * H, n_split, NF, -1) for p in parts)
        torch.amax(kmax_p.reshape(B * H, -1), dim=1, out=kmax)
        w = torch.exp(kmax_p - kmax[:, None, None, None])  # (BH, n_split, NF, 1)
        kz_w = (kz_p * w).sum(1)  # (BH, NF, FM)
        kv_w = (kv_p * w).sum(1)  # (BH, NF, FM BDV)
        kz.copy_(kz_w.view(B * H, NF * FM))
        kv.copy_(kv_w.view(B * H, NF * FM, BDV))
    if T:
        run(_query_kernel, (cdiv(T, R), B * H),
            (q, omega, kv, kz, kmax, o, T, H, m, D, Dv, scale, inv, *q.stride(), *omega_strides(omega)),
            dict(BT=R, NF=NF, **common), in_op)
    return o, kv, kz, kmax
