"""Forward of random-feature attention in Triton; φ(q) and φ̃(k) are computed on chip, never stored.

Non-causal, two launches:
* ``_kv_state_kernel``, one program per (slice of SPLIT_ROWS keys, batch·head): the state
  ``KV = Σ_s φ̃(k_s)ᵀ v_s`` (m, Dv), ``z = Σ_s φ̃(k_s)`` (m) and the keys' stabiliser M (the largest logit of
  the unmasked keys), kept relative to the running maximum and rescaled by ``exp(M_old - M_new)`` as it
  grows (one pass over the keys instead of a max pre-pass); the slices' states are then rescaled to the
  overall maximum and summed. The state is the residual for the backward.
* ``_query_kernel``, one program per (query block, batch·head): ``out = φ(q) KV / φ(q)·z``.
Causal, one launch: ``_causal_kernel``, one program per batch·head walking chunks of C = CHUNK positions:
intra-chunk products ``φ(q_t)·φ̃(k_s) exp(M_s - M_t)`` for ``s <= t``, plus the state of the earlier chunks,
kept relative to the running maximum at the previous chunk's end (read by query t with ``exp(M_prev - M_t)``).
A faster alternative for few batch·heads on a large GPU: a first pass computing every chunk's own state in
parallel, a short scan over the chunk states, then the queries of every chunk in parallel (as
flash-linear-attention's chunk kernels).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from panther.backends.toolkit import cdiv
from panther_triton.ops.rfa_attention.common import (
    CHUNK, FMIN, SPLIT_ROWS, block, key_features, key_tops, keys_kept, load_tile, logits, max_combine, normalise,
    precision, query_features, run,
)


@triton.jit
def _kv_state_kernel(
    k, v, omega, kpm, kv, kz, kmax,
    S, H, m, D, Dv, scale, inv_sqrt_m,
    sk_b, sk_h, sk_s, sk_d, sv_b, sv_h, sv_s, sv_d, so_h, so_m, so_d, sm_b, sm_s, split_rows,
    BS: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
    HAS_MASK: tl.constexpr, SOFTMAX: tl.constexpr, PREC: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    b, h = bh // H, bh % H
    part = bh * tl.num_programs(1) + tl.program_id(1)  # this slice's partial state
    start = tl.program_id(1) * split_rows
    cm, cd, cv, rs = tl.arange(0, BM), tl.arange(0, BD), tl.arange(0, BDV), tl.arange(0, BS)
    om = load_tile(omega + h * so_h, cm, m, so_m, cd, D, so_d)
    k += b * sk_b + h * sk_h
    v += b * sv_b + h * sv_h
    kpm += b * sm_b
    M = tl.full((), FMIN, tl.float32)
    acc = tl.zeros((BM, BDV), dtype=tl.float32)
    z = tl.zeros((BM,), dtype=tl.float32)
    for s0 in range(start, tl.minimum(start + split_rows, S), BS):
        rows = s0 + rs
        keep = keys_kept(kpm, rows, S, sm_s, HAS_MASK)
        lk = logits(load_tile(k, rows, S, sk_s, cd, D, sk_d) * scale, om, cm < m, SOFTMAX, PREC)
        vt = load_tile(v, rows, S, sv_s, cv, Dv, sv_d)
        if SOFTMAX:
            grown = tl.maximum(M, tl.max(key_tops(lk, keep), 0))
            alpha = tl.exp(M - grown)
            acc = acc * alpha
            z = z * alpha
            M = grown
        f = key_features(lk, M, keep, inv_sqrt_m, SOFTMAX)
        acc = tl.dot(tl.trans(f), vt, acc, input_precision=PREC)
        z += tl.sum(f, 0)
    tl.store(kv + part * BM * BDV + cm[:, None] * BDV + cv[None, :], acc)
    tl.store(kz + part * BM + cm, z)
    tl.store(kmax + part, M)


@triton.jit
def _query_kernel(
    q, omega, kv, kz, kmax, out,
    T, H, m, D, Dv, scale, inv_sqrt_m,
    sq_b, sq_h, sq_t, sq_d, so_h, so_m, so_d,
    BT: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
    SOFTMAX: tl.constexpr, PREC: tl.constexpr,
):
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    cm, cd, cv = tl.arange(0, BM), tl.arange(0, BD), tl.arange(0, BDV)
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    om = load_tile(omega + h * so_h, cm, m, so_m, cd, D, so_d)
    lq = logits(load_tile(q + b * sq_b + h * sq_h, rows, T, sq_t, cd, D, sq_d) * scale, om, cm < m, SOFTMAX, PREC)
    fq = query_features(lq, inv_sqrt_m, SOFTMAX)
    state = tl.load(kv + bh * BM * BDV + cm[:, None] * BDV + cv[None, :])
    z = tl.load(kz + bh * BM + cm)
    num = tl.dot(fq, state, input_precision=PREC)
    den = tl.sum(fq * z[None, :], 1)
    sees = (tl.zeros((BT,), dtype=tl.float32) + tl.load(kmax + bh)) > FMIN  # one per row
    o, _ = normalise(num, den, sees, SOFTMAX)
    mask = (rows[:, None] < T) & (cv[None, :] < Dv)
    tl.store(out + bh * T * Dv + rows[:, None] * Dv + cv[None, :], o.to(out.dtype.element_ty), mask=mask)


@triton.jit
def causal_chunk(
    q, k, v, kpm, om, c0, T, m, D, Dv, scale, inv_sqrt_m, M_prev,
    sq_t, sq_d, sk_t, sk_d, sv_t, sv_d, sm_s,
    BC: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
    HAS_MASK: tl.constexpr, SOFTMAX: tl.constexpr, PREC: tl.constexpr,
):
    """What every causal kernel recomputes for the chunk at c0: (x̂q, lq, φ(q), x̂k, lk, φ̃(k), v, kept keys,
    the running max M_s per position, the max at the chunk's end, the intra-chunk decay [t, s])."""
    cm, cd, cv, rc = tl.arange(0, BM), tl.arange(0, BD), tl.arange(0, BDV), tl.arange(0, BC)
    rows = c0 + rc
    keep = keys_kept(kpm, rows, T, sm_s, HAS_MASK)
    xq = load_tile(q, rows, T, sq_t, cd, D, sq_d) * scale
    xk = load_tile(k, rows, T, sk_t, cd, D, sk_d) * scale
    vt = load_tile(v, rows, T, sv_t, cv, Dv, sv_d)
    lq = logits(xq, om, cm < m, SOFTMAX, PREC)
    lk = logits(xk, om, cm < m, SOFTMAX, PREC)
    fq = query_features(lq, inv_sqrt_m, SOFTMAX)
    causal = rc[None, :] <= rc[:, None]  # [t, s]
    if SOFTMAX:
        tops = key_tops(lk, keep)
        Ms = tl.maximum(tl.associative_scan(tops, 0, max_combine), M_prev)
        M_end = tl.maximum(M_prev, tl.max(tops, 0))
        decay = tl.exp(tl.where(causal, Ms[None, :] - Ms[:, None], float("-inf")))
        fk = key_features(lk, Ms[:, None], keep, inv_sqrt_m, SOFTMAX)
    else:
        Ms = tl.zeros((BC,), dtype=tl.float32)
        M_end = M_prev
        decay = tl.where(causal, 1.0, 0.0)
        fk = key_features(lk, 0.0, keep, inv_sqrt_m, SOFTMAX)
    return xq, lq, fq, xk, lk, fk, vt, keep, Ms, M_end, decay


@triton.jit
def _causal_kernel(
    q, k, v, omega, kpm, out,
    T, H, m, D, Dv, scale, inv_sqrt_m,
    sq_b, sq_h, sq_t, sq_d, sk_b, sk_h, sk_t, sk_d, sv_b, sv_h, sv_t, sv_d, so_h, so_m, so_d, sm_b, sm_s,
    BC: tl.constexpr, BM: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
    HAS_MASK: tl.constexpr, SOFTMAX: tl.constexpr, PREC: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    b, h = bh // H, bh % H
    cm, cd, cv, rc = tl.arange(0, BM), tl.arange(0, BD), tl.arange(0, BDV), tl.arange(0, BC)
    om = load_tile(omega + h * so_h, cm, m, so_m, cd, D, so_d)
    q += b * sq_b + h * sq_h
    k += b * sk_b + h * sk_h
    v += b * sv_b + h * sv_h
    kpm += b * sm_b
    out += bh * T * Dv
    M_prev = tl.full((), FMIN, tl.float32)
    state = tl.zeros((BM, BDV), dtype=tl.float32)  # Σ exp(M_s - M_prev) φ̃(k_s)ᵀ v_s over the earlier chunks
    z = tl.zeros((BM,), dtype=tl.float32)
    for c0 in range(0, T, BC):
        xq, lq, fq, xk, lk, fk, vt, keep, Ms, M_end, decay = causal_chunk(
            q, k, v, kpm, om, c0, T, m, D, Dv, scale, inv_sqrt_m, M_prev,
            sq_t, sq_d, sk_t, sk_d, sv_t, sv_d, sm_s, BC, BM, BD, BDV, HAS_MASK, SOFTMAX, PREC)
        scores = tl.dot(fq, tl.trans(fk), input_precision=PREC) * decay
        num = tl.dot(scores, vt, input_precision=PREC)
        den = tl.sum(scores, 1)
        fq_in = fq * tl.exp(M_prev - Ms)[:, None] if SOFTMAX else fq
        num = tl.dot(fq_in, state, num, input_precision=PREC)
        den += tl.sum(fq_in * z[None, :], 1)
        o, _ = normalise(num, den, Ms > FMIN, SOFTMAX)
        rows = c0 + rc
        tl.store(out + rows[:, None] * Dv + cv[None, :], o.to(out.dtype.element_ty),
                 mask=(rows[:, None] < T) & (cv[None, :] < Dv))
        if SOFTMAX:  # the state moves from relative to M_prev to relative to M_end
            alpha = tl.exp(M_prev - M_end)
            state = state * alpha
            z = z * alpha
            fk = fk * tl.exp(Ms - M_end)[:, None]
        state = tl.dot(tl.trans(fk), vt, state, input_precision=PREC)
        z += tl.sum(fk, 0)
        M_prev = M_end


def sizes(q, v, omega) -> Tuple[int, int, int, int, int, int, int, int, int]:
    """(B, H, T, D, Dv, m, BM, BD, BDV)."""
    B, H, T, D = q.shape
    Dv, m = v.shape[-1], omega.shape[-2]
    return B, H, T, D, Dv, m, block(m), block(D), block(Dv)


def forward_outputs(q, k, v, omega, key_padding_mask=None, causal=False, relu=False):
    """(out (B, H, T, Dv) in q's dtype, and the non-causal residuals in float32: the key state KV
    (B·H, BM, BDV), z (B·H, BM) and the keys' stabiliser M (B·H,); empty when causal)."""
    B, H, T, D, Dv, m, BM, BD, BDV = sizes(q, v, omega)
    out = q.new_empty((B, H, T, Dv))
    n = 0 if causal else B * H
    f32 = dict(device=q.device, dtype=torch.float32)
    return out, torch.empty((n, BM, BDV), **f32), torch.empty((n, BM), **f32), torch.empty((n,), **f32)


def omega_strides(omega) -> Tuple[int, int, int]:
    """(head, feature, dim) strides of omega; head stride 0 for one omega shared by every head."""
    return (omega.stride(0), omega.stride(1), omega.stride(2)) if omega.dim() == 3 else (0, *omega.stride())


def mask_args(key_padding_mask, placeholder):
    """(pointer, stride_b, stride_s, HAS_MASK): a placeholder tensor, never read, where there is no mask."""
    if key_padding_mask is None:
        return placeholder, 0, 0, False
    return key_padding_mask, *key_padding_mask.stride(), True


def rfa_attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, omega: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor] = None, causal: bool = False, relu: bool = False,
    out=None, in_op: bool = False,
):
    """Launch the forward kernels; returns :func:`forward_outputs`' tuple, written. q, k, v may be strided."""
    o, kv, kz, kmax = forward_outputs(q, k, v, omega, key_padding_mask, causal, relu) if out is None else out
    B, H, T, D, Dv, m, BM, BD, BDV = sizes(q, v, omega)
    S = k.shape[2]
    if B * H == 0:
        return o, kv, kz, kmax
    kpm, sm_b, sm_s, has_mask = mask_args(key_padding_mask, q)
    common = dict(BM=BM, BD=BD, BDV=BDV, SOFTMAX=not relu, PREC=precision(q.dtype))
    scale, inv = D ** -0.25, m ** -0.5
    if causal:
        if T:
            run(_causal_kernel, (B * H,),
                (q, k, v, omega, kpm, o, T, H, m, D, Dv, scale, inv, *q.stride(), *k.stride(), *v.stride(),
                 *omega_strides(omega), sm_b, sm_s),
                dict(BC=CHUNK, HAS_MASK=has_mask, **common), in_op)
        return o, kv, kz, kmax
    n_split = max(1, cdiv(S, SPLIT_ROWS))
    if n_split == 1:
        parts = kv, kz, kmax
    else:
        f32 = dict(device=q.device, dtype=torch.float32)
        parts = (torch.empty((B * H, n_split, BM, BDV), **f32), torch.empty((B * H, n_split, BM), **f32),
                 torch.empty((B * H, n_split), **f32))
    run(_kv_state_kernel, (B * H, n_split),
        (k, v, omega, kpm, *parts, S, H, m, D, Dv, scale, inv, *k.stride(), *v.stride(),
         *omega_strides(omega), sm_b, sm_s, SPLIT_ROWS),
        dict(BS=CHUNK, HAS_MASK=has_mask, **common), in_op)
    if n_split > 1:  # the slices' states, each relative to its own maximum, moved to the overall one
        kv_p, kz_p, kmax_p = parts
        torch.amax(kmax_p, dim=1, out=kmax)
        w = torch.exp(kmax_p - kmax[:, None])
        torch.sum(kv_p * w[:, :, None, None], dim=1, out=kv)
        torch.sum(kz_p * w[:, :, None], dim=1, out=kz)
    if T:
        run(_query_kernel, (cdiv(T, CHUNK), B * H),
            (q, omega, kv, kz, kmax, o, T, H, m, D, Dv, scale, inv, *q.stride(), *omega_strides(omega)),
            dict(BT=CHUNK, **common), in_op)
    return o, kv, kz, kmax
