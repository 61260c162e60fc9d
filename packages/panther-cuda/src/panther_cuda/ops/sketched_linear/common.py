"""What the sketched linear launchers share: the kernels' C++ names, TF32, shared-memory sizes, and the
split of long reductions over several blocks (fp32 shares summed by one more launch)."""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from panther.backends.toolkit import cdiv
from panther_cuda._nvrtc import Kernel, f32, i32, i64
from panther_cuda.ops.sketched_linear.limits import BK, BM, BN, NT, PAD, STAGES

CTYPES = {torch.float32: "float", torch.float16: "__half", torch.bfloat16: "__nv_bfloat16"}


_kernels: Dict[Tuple[str, str, torch.dtype, Optional[bool]], Kernel] = {}


def kernel(source: str, name: str, dtype: torch.dtype, exact: Optional[bool] = None) -> Kernel:
    """The template instance ``panther::sl::<name><T, exact>`` of ``<source>`` (forward.cu, backward.cu);
    ``<name><T>`` for a kernel with no product (``exact`` None)."""
    key = (source, name, dtype, exact)
    k = _kernels.get(key)
    if k is None:
        args = CTYPES[dtype] if exact is None else f"{CTYPES[dtype]}, {'true' if exact else 'false'}"
        k = _kernels[key] = Kernel(f"ops/sketched_linear/{source}", f"panther::sl::{name}<{args}>")
    return k


def is_exact(dtype: torch.dtype, allow_tf32: bool) -> bool:
    """Exact float32 products (FFMA) rather than TF32 tensor cores: float32 at matmul precision "highest"."""
    return dtype == torch.float32 and not allow_tf32


@torch.compiler.assume_constant_result  # torch.compile reads it once at trace time (a plain call graph-breaks)
def allow_tf32() -> bool:
    """TF32 for float32 products follows torch: off only at matmul precision "highest"."""
    return torch.get_float32_matmul_precision() != "highest"


def tile_elements() -> int:
    """Shared-memory elements of one block's A and B tiles (tile.cuh's TILE_ELEMENTS)."""
    return BM * (BK + PAD) + BK * (BN + PAD)


def tile_bytes(dtype: torch.dtype) -> int:
    """Dynamic shared memory of every kernel but the fused forward: STAGES pairs of tiles (tile.cuh's
    GEMM_ELEMENTS), one loading while the other feeds the products; each tile sized for the larger of
    its layouts (stored transposed for an operand contiguous down its rows)."""
    stage_a = max(BM * (BK + PAD), BK * (BM + PAD))
    stage_b = max(BK * (BN + PAD), BN * (BK + PAD))
    return STAGES * (stage_a + stage_b) * dtype.itemsize


def fused_bytes(R: int, dtype: torch.dtype) -> int:
    """Dynamic shared memory of the fused forward: the tiles, a second B tile, and the BM x R tile of H
    (R rounded up to BN, rows padded)."""
    return (tile_elements() + BK * (BN + PAD) + BM * (cdiv(R, BN) * BN + PAD)) * dtype.itemsize


SPLIT_DEPTH = 256  # depth (rows of T, or columns of I or O) a share of a split reduction keeps at least (about)
MAX_SPLIT = 64
BLOCKS_PER_SM = 8  # blocks a split aims for per SM: several resident at once (small tiles), two waves or so
SUM_BLOCKS = 4096  # grid of the share-summing launches (grid-stride loops over the elements)


def split_rule(depth: int, tiles: int, sms: int) -> int:
    """Shares of a reduction ``depth`` deep on ``tiles`` output tiles: the largest power of two s <=
    MAX_SPLIT with depth / s >= SPLIT_DEPTH and tiles * s <= BLOCKS_PER_SM * sms (1 when the tiles alone
    fill the SMs, or the reduction is short). Each share's fp32 partial is summed by a later launch."""
    s = 1
    while 2 * s <= min(MAX_SPLIT, depth // SPLIT_DEPTH) and tiles * 2 * s <= BLOCKS_PER_SM * sms:
        s *= 2
    return s


def sum_shares(ws: torch.Tensor, out: torch.Tensor, scale: float = 1.0) -> None:
    """out = scale Σ_s ws[s] (ws: (n_splits, *out.shape) fp32), rounded once, on the current stream."""
    n, n_splits = out.numel(), ws.shape[0]
    if n == 0:
        return
    kernel("forward.cu", "sketched_linear_sum_shares", out.dtype)(
        (min(cdiv(n, NT), SUM_BLOCKS),), (NT,), ws, out, i64(n), i32(n_splits), f32(scale)
    )


def contiguous_2d(t: torch.Tensor, cols: int) -> torch.Tensor:
    """``t`` as a contiguous (rows, cols) matrix (a view where it already is one; else one copy)."""
    return t.reshape(-1, cols).contiguous()
