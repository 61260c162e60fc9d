"""What the sketched linear launchers share: the kernels' C++ names, TF32, shared-memory sizes."""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from panther.backends.toolkit import cdiv
from panther_cuda._nvrtc import Kernel
from panther_cuda.ops.sketched_linear.limits import BK, BM, BN, PAD

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
    """Dynamic shared memory of every kernel but the fused forward."""
    return tile_elements() * dtype.itemsize


def fused_bytes(R: int, dtype: torch.dtype) -> int:
    """Dynamic shared memory of the fused forward: the tiles, a second B tile, and the BM x R tile of H
    (R rounded up to BN, rows padded)."""
    return (tile_elements() + BK * (BN + PAD) + BM * (cdiv(R, BN) * BN + PAD)) * dtype.itemsize


def contiguous_2d(t: torch.Tensor, cols: int) -> torch.Tensor:
    """``t`` as a contiguous (rows, cols) matrix (a view where it already is one; else one copy)."""
    return t.reshape(-1, cols).contiguous()
