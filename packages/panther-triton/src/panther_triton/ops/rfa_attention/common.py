"""Pieces shared by the attention kernels: block sizes, masks, the random features and their gradient.

Every kernel works on one batch·head at a time (``bh = b H + h``) and computes in float32: inputs are
loaded in their dtype and converted, features never leave the chip. ``x̂ = x / D^{1/4}``; the logits of a
row are ``l = x̂ ωᵀ - |x̂|²/2`` (softmax kernel) or ``p = x̂ ωᵀ`` (relu kernel), -inf in the padded columns
of the feature axis. The stabilisers follow :mod:`panther.ops.rfa_attention`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from panther.backends.toolkit import next_power_of_2
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

# One block of the head axis and one of the feature axis are held on chip: compiled for sm_90, the
# kernels fit an H200 block's 227 KiB of shared memory up to D, Dv, m = 64 (bf16 causal at m = 128 asks
# 240 KiB); larger sizes need the loops over feature and head chunks the kernels do not have yet.
MAX_HEAD_DIM = 64  # D and Dv
MAX_FEATURES = 64  # m


def block(n: int) -> int:
    """The power-of-two block holding ``n`` columns (>= 16: tl.dot's smallest operand side)."""
    return max(16, next_power_of_2(n))


def precision(dtype: torch.dtype) -> str:
    """tl.dot input precision of the float32 feature products: TF32 unless float32 inputs ask for "highest"."""
    return "ieee" if dtype == torch.float32 and not allow_tf32() else "tf32"


def run(kernel, grid, args, constexprs, in_op: bool) -> None:
    """One kernel launch through the package's launch path (layout: every argument, for eager calls)."""
    layout = None if in_op else layout_key(*args, *sorted(constexprs.items()))
    launch(kernel, lambda META: grid, args, constexprs, layout)


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
def query_features(lq, inv_sqrt_m, SOFTMAX: tl.constexpr):
    """φ(q): relative to each row's largest logit (softmax), or relu."""
    if SOFTMAX:
        f = tl.exp(lq - tl.max(lq, 1)[:, None])
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
def key_tops(lk, keep):
    """Each kept key's largest logit, -inf for the others."""
    return tl.where(keep, tl.max(lk, 1), float("-inf"))


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
