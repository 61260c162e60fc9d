"""Pieces shared by the attention kernels: block sizes, masks, the random features and their gradient.

Every kernel works on one batch·head at a time (``bh = b H + h``) and computes in float32: inputs are
loaded in their dtype and converted, features never leave the chip. ``x̂ = x / D^{1/4}``; the logits of a
row are ``l = x̂ ωᵀ - |x̂|²/2`` (softmax kernel) or ``p = x̂ ωᵀ`` (relu kernel), -inf in the padded columns
of the feature axis. The stabilisers follow :mod:`panther.ops.rfa_attention`: a query's is its largest
logit over all m features, the keys' their running maximum, so they are found (:func:`logit_tops`) before
the features of any feature chunk are formed (:func:`query_chunk`, :func:`causal_features`).
"""

from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from panther.backends.toolkit import cdiv, next_power_of_2, shared_memory_per_block
from panther_triton._launch import INTERPRETED, launch, layout_key
from panther_triton.ops.sketched_linear.common import allow_tf32

FMIN = tl.constexpr(-3.4028234663852886e38)  # float32's lowest finite value: "no unmasked key seen yet"
TINY = tl.constexpr(1.1754943508222875e-38)  # float32's smallest normal: a smaller normaliser lost its digits

# Rows of q / k per block and the causal chunk length C. The interpreter takes small blocks (its cost
# grows with the block), which also puts the chunk boundaries within reach of small tests.
CHUNK = 16 if INTERPRETED else 64

# Non-causal passes over a sequence split it into slices of SPLIT_ROWS rows, one program per (slice,
# batch·head), so that a few batch·heads still fill the GPU; partial states are summed afterwards.
SPLIT_ROWS = 2 * CHUNK if INTERPRETED else 16 * CHUNK

# The feature axis is walked in chunks of FEATURES columns (FM): a program holds one chunk of omega, of
# the features and of the (FM, Dv) states at a time. With more than one chunk, what a program carries
# across row blocks per chunk (states, dω) lives in its own float32 buffer instead of registers. The
# interpreter's small chunk lets small tests cross chunk boundaries.
FEATURES = 16 if INTERPRETED else 64

MAX_HEAD_DIM = 128  # D and Dv: one block of the head axis on chip (rows per block halve past 64)
MAX_FEATURES = 256  # m: at most four feature chunks


def block(n: int) -> int:
    """The power-of-two block holding ``n`` columns (>= 16: tl.dot's smallest operand side)."""
    return max(16, next_power_of_2(n))


def feature_chunks(m: int) -> Tuple[int, int]:
    """(FM, NF): the feature chunk (a block, at most FEATURES) and the number of chunks covering m."""
    fm = min(FEATURES, block(m))
    return fm, max(1, cdiv(m, fm))


def rows_per_block(D: int, Dv: int) -> int:
    """Rows of q / k per block (and the causal chunk): CHUNK, halved on a GPU for head dims past 64 so
    that the (rows, head dim) tiles keep their size."""
    return CHUNK if INTERPRETED or max(block(D), block(Dv)) <= 64 else CHUNK // 2


def precision(dtype: torch.dtype) -> str:
    """tl.dot input precision of the float32 feature products: TF32 unless float32 inputs ask for "highest"."""
    return "ieee" if dtype == torch.float32 and not allow_tf32() else "tf32"


# Software-pipelining depth of the kernels' loops (Triton's num_stages): Triton's default of 3 for 16-bit
# inputs on a device whose block may take LARGE_SHARED bytes of shared memory (sm_90), one fewer for float32
# (its staged tiles are twice as large) and one fewer on smaller devices (sm_80). The causal key-gradient
# kernel at D = Dv = 64, m = 64 is the largest: at Triton's default it passes the block's shared memory in
# float32 on sm_90 and in 16-bit on sm_80 (tools/compile_check.py; figures in benchmarks/results/NOTES.md).
LARGE_SHARED = 200 * 1024


def stages(x: torch.Tensor) -> int:
    """num_stages of the kernels for inputs like ``x``."""
    large = not x.is_cuda or shared_memory_per_block(x.get_device()) >= LARGE_SHARED
    return (3 if large else 2) - (x.element_size() > 2)


def run(kernel, grid, args, constexprs, in_op: bool) -> None:
    """One kernel launch through the package's launch path (layout: every argument, for eager calls), its
    pipelining depth from the first tensor argument (:func:`stages`)."""
    if not INTERPRETED:
        constexprs = dict(constexprs, num_stages=stages(next(a for a in args if isinstance(a, torch.Tensor))))
    layout = None if in_op else layout_key(*args, *sorted(constexprs.items()))
    launch(kernel, lambda META: grid, args, constexprs, layout)


@triton.jit
def as_float32(x):
    """A scalar argument as a float32 tensor (a Python float under the interpreter, float32 or float64 compiled)."""
    return (tl.zeros((), tl.float32) + x).to(tl.float32)


@triton.jit
def max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def load_tile(ptr, rows, n_rows, stride_r, cols, n_cols, stride_c):
    """ptr[rows, cols] as float32, 0 outside (n_rows, n_cols)."""
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return tl.load(ptr + rows[:, None] * stride_r + cols[None, :] * stride_c, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def keys_kept(kpm, rows, n, stride_ms, HAS_MASK: tl.constexpr):
    """Which of the key rows exist and are not padded (key_padding_mask True = ignored)."""
    keep = rows < n
    if HAS_MASK:
        pad = tl.load(kpm + rows * stride_ms, mask=keep, other=1).to(tl.int32)
        keep = keep & (pad == 0)
    return keep


@triton.jit
def logits(x, om, cols_ok, SOFTMAX: tl.constexpr, PREC: tl.constexpr):
    """(R, BM) logits of the scaled rows x (R, BD) against omega (BM, BD); -inf in padded feature columns."""
    p = tl.dot(x, tl.trans(om), input_precision=PREC)
    if SOFTMAX:
        p = p - 0.5 * tl.sum(x * x, 1)[:, None]
    return tl.where(cols_ok[None, :], p, float("-inf"))


@triton.jit
def omega_chunk(omega, om0, f, m, D, so_m, so_d, FM: tl.constexpr, BD: tl.constexpr, NF: tl.constexpr):
    """Rows f FM .. f FM + FM of omega (FM, BD): ``om0``, loaded once by the caller, when there is one chunk."""
    if NF == 1:
        om = om0
    else:
        om = load_tile(omega, f * FM + tl.arange(0, FM), m, so_m, tl.arange(0, BD), D, so_d)
    return om


@triton.jit
def chunk_logits(x, omega, om0, f, m, D, so_m, so_d,
                 FM: tl.constexpr, BD: tl.constexpr, NF: tl.constexpr, SOFTMAX: tl.constexpr, PREC: tl.constexpr):
    """(logits (R, FM) of the scaled rows x (R, BD) against feature chunk f, that chunk of omega)."""
    om = omega_chunk(omega, om0, f, m, D, so_m, so_d, FM, BD, NF)
    return logits(x, om, f * FM + tl.arange(0, FM) < m, SOFTMAX, PREC), om


@triton.jit
def logit_tops(x, omega, om0, m, D, so_m, so_d,
               FM: tl.constexpr, BD: tl.constexpr, NF: tl.constexpr, SOFTMAX: tl.constexpr, PREC: tl.constexpr):
    """(each row's largest logit over all m features, the logits of the last chunk): the softmax
    stabilisers need every chunk before any feature; with one chunk its logits are reused (:func:`reuse`)."""
    lx, _ = chunk_logits(x, omega, om0, 0, m, D, so_m, so_d, FM, BD, NF, SOFTMAX, PREC)
    top = tl.max(lx, 1)
    for f in range(1, NF):
        lx, _ = chunk_logits(x, omega, om0, f, m, D, so_m, so_d, FM, BD, NF, SOFTMAX, PREC)
        top = tl.maximum(top, tl.max(lx, 1))
    return top, lx


@triton.jit
def reuse(x, l_one, omega, om0, f, m, D, so_m, so_d,
          FM: tl.constexpr, BD: tl.constexpr, NF: tl.constexpr, SOFTMAX: tl.constexpr, PREC: tl.constexpr):
    """:func:`chunk_logits` of chunk f, taken from :func:`logit_tops` (``l_one``) when there is one chunk."""
    if NF == 1:
        lx, om = l_one, om0
    else:
        lx, om = chunk_logits(x, omega, om0, f, m, D, so_m, so_d, FM, BD, NF, SOFTMAX, PREC)
    return lx, om


@triton.jit
def query_features(lq, c, inv_sqrt_m, SOFTMAX: tl.constexpr):
    """φ(q): relative to each row's largest logit c over all features (softmax), or relu."""
    if SOFTMAX:
        f = tl.exp(lq - c[:, None])
    else:
        f = tl.maximum(lq, 0.0)
    return f * inv_sqrt_m


@triton.jit
def key_features(lk, M, keep, inv_sqrt_m, SOFTMAX: tl.constexpr):
    """φ̃(k): relative to the keys' stabiliser M (a scalar or one per row; softmax), or relu; 0 where not kept."""
    if SOFTMAX:
        f = tl.exp(tl.where(keep[:, None], lk - M, float("-inf")))  # a masked key's lk - M may overflow
    else:
        f = tl.maximum(lk, 0.0)
    return tl.where(keep[:, None], f * inv_sqrt_m, 0.0)


@triton.jit
def query_chunk(xq, l_one, c, omega, om0, f, m, D, so_m, so_d, inv_sqrt_m,
                FM: tl.constexpr, BD: tl.constexpr, NF: tl.constexpr, SOFTMAX: tl.constexpr, PREC: tl.constexpr):
    """(lq, φ(q), omega chunk) of feature chunk f for the scaled queries xq with largest logits c."""
    lq, om = reuse(xq, l_one, omega, om0, f, m, D, so_m, so_d, FM, BD, NF, SOFTMAX, PREC)
    return lq, query_features(lq, c, inv_sqrt_m, SOFTMAX), om


@triton.jit
def causal_chunk(
    q, k, v, kpm, omega, om0, c0, T, m, D, Dv, scale, M_prev,
    sq_t, sq_d, sk_t, sk_d, sv_t, sv_d, so_m, so_d, sm_s,
    BC: tl.constexpr, FM: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, NF: tl.constexpr,
    HAS_MASK: tl.constexpr, SOFTMAX: tl.constexpr, PREC: tl.constexpr,
):
    """What every causal kernel recomputes for the chunk of positions c0 .. c0 + BC, before its feature
    chunks: (x̂q, x̂k, v, kept keys, each query's largest logit, the logits lq, lk of the last feature
    chunk (see :func:`logit_tops`), the running key maximum M_s per position, the maximum at the
    chunk's end, the intra-chunk decay exp(M_s - M_t) [t, s], 0 for s > t)."""
    cd, cv, rc = tl.arange(0, BD), tl.arange(0, BDV), tl.arange(0, BC)
    rows = c0 + rc
    keep = keys_kept(kpm, rows, T, sm_s, HAS_MASK)
    xq = load_tile(q, rows, T, sq_t, cd, D, sq_d) * scale
    xk = load_tile(k, rows, T, sk_t, cd, D, sk_d) * scale
    vt = load_tile(v, rows, T, sv_t, cv, Dv, sv_d)
    cq, lq = logit_tops(xq, omega, om0, m, D, so_m, so_d, FM, BD, NF, SOFTMAX, PREC)
    top_k, lk = logit_tops(xk, omega, om0, m, D, so_m, so_d, FM, BD, NF, SOFTMAX, PREC)
    causal = rc[None, :] <= rc[:, None]  # [t, s]
    if SOFTMAX:
        tops = tl.where(keep, top_k, float("-inf"))
        Ms = tl.maximum(tl.associative_scan(tops, 0, max_combine), M_prev)
        M_end = tl.maximum(M_prev, tl.max(tops, 0))
        decay = tl.exp(tl.where(causal, Ms[None, :] - Ms[:, None], float("-inf")))
    else:
        Ms = tl.zeros((BC,), dtype=tl.float32)
        M_end = M_prev
        decay = tl.where(causal, 1.0, 0.0)
    return xq, xk, vt, keep, cq, lq, lk, Ms, M_end, decay


@triton.jit
def causal_features(xq, xk, lq_one, lk_one, cq, Ms, keep, omega, om0, f, m, D, so_m, so_d, inv_sqrt_m,
                    FM: tl.constexpr, BD: tl.constexpr, NF: tl.constexpr, SOFTMAX: tl.constexpr,
                    PREC: tl.constexpr):
    """(lq, φ(q), lk, φ̃(k), omega chunk) of a causal chunk's feature chunk f; keys relative to their M_s."""
    if NF == 1:
        lq, lk, om = lq_one, lk_one, om0
    else:
        om = omega_chunk(omega, om0, f, m, D, so_m, so_d, FM, BD, NF)
        ok = f * FM + tl.arange(0, FM) < m
        lq = logits(xq, om, ok, SOFTMAX, PREC)
        lk = logits(xk, om, ok, SOFTMAX, PREC)
    fq = query_features(lq, cq, inv_sqrt_m, SOFTMAX)
    fk = key_features(lk, Ms[:, None], keep, inv_sqrt_m, SOFTMAX)
    return lq, fq, lk, fk, om


@triton.jit
def held(value, ptr, NF: tl.constexpr):
    """A tile a program carries across row blocks for one feature chunk: ``value`` itself with one
    chunk, else read back from ``ptr`` (the program's own float32 buffer, see :func:`hold`)."""
    if NF == 1:
        out = value
    else:
        out = tl.load(ptr)
    return out


@triton.jit
def hold(value, ptr, NF: tl.constexpr):
    """Keep ``value`` for :func:`held`: with several chunks it is written to ``ptr``, between barriers
    (the threads that read a tile back need not be those that wrote it)."""
    if NF > 1:
        tl.debug_barrier()  # every thread has read the old value
        tl.store(ptr, value)
        tl.debug_barrier()
    return value


@triton.jit
def normalise(num, den, sees_key, SOFTMAX: tl.constexpr):
    """(out, seen): num / den where a row's normaliser is usable; 0 where it is 0 (no key seen, or relu's
    zero features); NaN where a softmax row that sees a key underflowed (``seen`` is False there too)."""
    seen = den > 0.0
    if SOFTMAX:
        lost = sees_key & (den < TINY)
        seen = seen & (lost == 0)
    out = tl.where(seen[:, None], num / tl.where(seen, den, 1.0)[:, None], 0.0)
    if SOFTMAX:
        out = tl.where(lost[:, None], float("nan"), out)
    return out, seen


@triton.jit
def output_grads(g, out, den, seen):
    """(a, b): the gradients of a row's numerator (g / den) and normaliser (-(g·out) / den); 0 where not seen."""
    safe = tl.where(seen, den, 1.0)
    a = tl.where(seen[:, None], g / safe[:, None], 0.0)
    b = tl.where(seen, -tl.sum(tl.where(seen[:, None], g * out, 0.0), 1) / safe, 0.0)
    return a, b


@triton.jit
def feature_grad(df, f, lx, x, om, inv_sqrt_m, SOFTMAX: tl.constexpr, PREC: tl.constexpr):
    """(dx̂ (R, BD), dω (BM, BD)) from df = dL/dφ of rows x̂ (R, BD) with features f and logits lx; the
    stabilisers are constants (they cancel in the output)."""
    if SOFTMAX:
        dl = df * f  # φ = exp(l - c) / sqrt(m): dφ/dl = φ
    else:
        dl = tl.where(lx > 0.0, df * inv_sqrt_m, 0.0)
    dx = tl.dot(dl, om, input_precision=PREC)
    if SOFTMAX:
        dx = dx - tl.sum(dl, 1)[:, None] * x
    dom = tl.dot(tl.trans(dl), x, input_precision=PREC)
    return dx, dom
