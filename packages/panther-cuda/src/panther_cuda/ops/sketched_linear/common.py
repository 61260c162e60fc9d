"""What the sketched linear launchers share: the kernels' C++ names, their launch (grid, threads and shared
memory from the tile shape), the choice of tile shape, TF32, and the split of long reductions over several
blocks (fp32 shares summed by one more launch)."""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from panther.backends.toolkit import cdiv, shared_memory_per_block
from panther_cuda._nvrtc import Kernel, f32, i32, i64
from panther_cuda.ops.sketched_linear.limits import DEEP64, LARGE, SMALL, SUM_RUN, SUM_THREADS, TileConfig

CTYPES = {torch.float32: "float", torch.float16: "__half", torch.bfloat16: "__nv_bfloat16"}


_kernels: Dict[Tuple[str, str, torch.dtype, Optional[bool], Optional[TileConfig]], Kernel] = {}


def kernel(source: str, name: str, dtype: torch.dtype, exact: Optional[bool] = None,
           config: Optional[TileConfig] = None) -> Kernel:
    """The template instance ``panther::sl::<name><T, exact, Tile<...>>`` of ``<source>`` (forward.cu,
    backward.cu); ``<name><T>`` for a kernel with no product (``exact`` and ``config`` None)."""
    key = (source, name, dtype, exact, config)
    k = _kernels.get(key)
    if k is None:
        args = CTYPES[dtype] if exact is None else f"{CTYPES[dtype]}, {'true' if exact else 'false'}, {config.cpp}"
        k = _kernels[key] = Kernel(f"ops/sketched_linear/{source}", f"panther::sl::{name}<{args}>")
    return k


def launch(source: str, name: str, dtype: torch.dtype, exact: bool, config: TileConfig, blocks: int, *args,
           shared_mem: Optional[int] = None) -> None:
    """Launch a tiled kernel instance: ``blocks`` blocks of ``config.threads`` threads, with the dynamic shared
    memory of its tiles (``config.shared_bytes``) unless ``shared_mem`` says otherwise (the fused forward)."""
    shared = config.shared_bytes(dtype) if shared_mem is None else shared_mem
    kernel(source, name, dtype, exact, config)((blocks,), (config.threads,), *args, shared_mem=shared)


def device_index(device: torch.device) -> int:
    """The index of a CUDA ``device`` (None index: the current device's)."""
    return device.index if device.index is not None else torch.cuda.current_device()


def shared_limit(device: torch.device) -> int:
    """Bytes of shared memory a block may use on ``device`` (a CUDA device; None index: the current one)."""
    return shared_memory_per_block(device_index(device))


def fitting(config: TileConfig, dtype: torch.dtype, device: torch.device) -> TileConfig:
    """``config`` where its shared memory fits a block on ``device``, else SMALL (a forced LARGE float32 ring
    does not fit GPUs of 100 KiB per block)."""
    return config if config.shared_bytes(dtype) <= shared_limit(device) else SMALL


def fused_fits(R: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the fused forward's shared memory (its tiles and H, R wide) fits a block on ``device``."""
    return SMALL.fused_bytes(R, dtype) <= shared_limit(device)


def choose_config(row_tiles_large: int, col_tiles_large: int, dtype: torch.dtype, sms: int, shared_limit: int
                  ) -> TileConfig:
    """The tile shape of a launch whose widest output has these many LARGE tiles (rows x columns): LARGE
    when they alone fill the SMs (at least one per SM) and its shared memory fits, else SMALL (four
    times the blocks: small T keeps its occupancy)."""
    if row_tiles_large * col_tiles_large >= sms and LARGE.shared_bytes(dtype) <= shared_limit:
        return LARGE
    return SMALL


def is_exact(dtype: torch.dtype, allow_tf32: bool) -> bool:
    """Exact float32 products (FFMA) rather than TF32 tensor cores: float32 at matmul precision "highest"."""
    return dtype == torch.float32 and not allow_tf32


@torch.compiler.assume_constant_result  # torch.compile reads it once at trace time (a plain call graph-breaks)
def allow_tf32() -> bool:
    """TF32 for float32 products follows torch: off only at matmul precision "highest"."""
    return torch.get_float32_matmul_precision() != "highest"


SPLIT_DEPTH = 256  # depth (rows of T, or columns of I or O) a share of a split reduction keeps at least (about)
MAX_SPLIT = 64
# Blocks a split aims for per SM: about four SMALL blocks (several resident at once), one of the 128 x 128 tiles:
# past that, more shares add fp32 traffic and summing faster than they add parallelism (tools/linear_sweep.py
# times the rule's split against half and twice of it).
BLOCKS_PER_SM = {SMALL: 4, LARGE: 1, DEEP64: 1}
SUM_BLOCKS = 4096  # most blocks of a share-summing launch (grid-stride loops over the elements)


def sum_grid(n: int) -> Tuple[int]:
    """Grid of a share-summing launch over n elements: a run of SUM_RUN a thread, at most SUM_BLOCKS blocks."""
    return (max(1, min(cdiv(n, SUM_RUN * SUM_THREADS), SUM_BLOCKS)),)


def split_rule(depth: int, tiles: int, sms: int, config: TileConfig = SMALL) -> int:
    """Shares of a reduction ``depth`` deep on ``tiles`` output tiles of ``config``: the largest power of
    two s <= MAX_SPLIT with depth / s >= SPLIT_DEPTH and tiles * s <= BLOCKS_PER_SM[config] * sms (1 when
    the tiles alone fill the SMs, or the reduction is short). Each share's fp32 partial is summed by a
    later launch."""
    s = 1
    while 2 * s <= min(MAX_SPLIT, depth // SPLIT_DEPTH) and tiles * 2 * s <= BLOCKS_PER_SM[config] * sms:
        s *= 2
    return s


def sum_shares(ws: torch.Tensor, out: torch.Tensor, scale: float = 1.0) -> None:
    """out = scale Σ_s ws[s] (ws: (n_splits, *out.shape) fp32), rounded once, on the current stream."""
    n, n_splits = out.numel(), ws.shape[0]
    if n == 0:
        return
    kernel("forward.cu", "sketched_linear_sum_shares", out.dtype)(
        sum_grid(n), (SUM_THREADS,), ws, out, i64(n), i32(n_splits), f32(scale)
    )


def contiguous_2d(t: torch.Tensor, cols: int) -> torch.Tensor:
    """``t`` as a contiguous (rows, cols) matrix (a view where it already is one; else one copy)."""
    return t.reshape(-1, cols).contiguous()
