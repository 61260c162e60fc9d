"""Pieces the forward and backward kernels share: column maps of the (L, ., K) operands, split sums, precision."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from panther_triton._runtime import interpreting

# Triton's CPU interpreter multiplies bfloat16 tiles as their raw uint16 bits: upcast there (exact).
_UPCAST_DOT_OPERANDS = tl.constexpr(interpreting())

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def dot_precision(dtype: torch.dtype, allow_tf32: bool) -> str:
    """tl.dot input precision: "ieee" for float32 when TF32 is off, else "tf32" (ignored by 16-bit dots)."""
    return "ieee" if dtype == torch.float32 and not allow_tf32 else "tf32"


@torch.compiler.assume_constant_result  # torch.compile reads it once at trace time (a plain call graph-breaks)
def allow_tf32() -> bool:
    """TF32 for float32 products follows torch: off only at matmul precision "highest"."""
    return torch.get_float32_matmul_precision() != "highest"


@triton.jit
def lk_offsets(cols, stride_l, stride_k, K: tl.constexpr):
    # column c = l K + j of a concatenated operand -> offset of [l, ., j] in an (L, ., K) tensor
    return (cols // K) * stride_l + (cols % K) * stride_k


@triton.jit
def lko_offsets(rows, stride_l, stride_k, K: tl.constexpr):
    # row r = l K + j of a stacked operand -> offset of [l, j, .] in an (L, K, .) tensor
    return (rows // K) * stride_l + (rows % K) * stride_k


@triton.jit
def sum_splits(ptrs, stride_s, n_splits, mask):
    """Σ_s *(ptrs + s * stride_s) in fp32: partial sums written by n_splits programs (n_splits >= 1)."""
    acc = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    for _ in range(1, n_splits):
        ptrs += stride_s  # pointer steps stay 64-bit however large n_splits * stride_s grows
        acc += tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    return acc


@triton.jit
def mma(a, b, acc, PREC: tl.constexpr):
    """acc + a @ b on the tensor cores (fp32 accumulator; PREC applies to float32 operands)."""
    if _UPCAST_DOT_OPERANDS:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def store_grad(grad, ws, offset, stride_ws, split, offs, value, mask, SPLIT: tl.constexpr):
    """Store a weight-gradient tile: into the gradient itself, or (SPLIT) as partial sum number `split`
    into the fp32 workspace ws[split, offset + offs]. One workspace pointer for every gradient keeps
    each tensor behind exactly one written argument (torch.compile clones written arguments one by one)."""
    if SPLIT:
        tl.store(ws + offset + split.to(tl.int64) * stride_ws + offs, value, mask=mask)
    else:
        tl.store(grad + offs, value, mask=mask)
