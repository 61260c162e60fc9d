"""The Hopper (sm_90a) kernels' host side: which launches they take, their grids, shared memory and instances.

forward_sm90.cu (H = x A, y = H B / (2L) + b) and backward_sm90.cu (the backward's two product launches) use
warpgroup MMA (wgmma) from shared memory, compiled for sm_90a, for 16-bit inputs. Each launch of a plan that
asks for them (``ForwardPlan.hopper_h`` / ``.hopper_y``, ``sketched_linear_backward(hopper=True)`` or its
hopper_rule) runs them where its ``*_fits`` allows (an sm_90 device, 16-bit inputs, the sizes their 16-byte copies
need, 16-byte aligned tensors, their shared memory), else forward.cu's or backward.cu's kernel. The ring kernels
(H and the backward's) take the ring of stages that ring_stages gives their grid; bwd_x_fused_sm90 (dx and d[S1 | U2]
in one pass over x, R <= 128) its own ring of FUSED_X_STAGES.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from panther.backends.toolkit import cdiv, multiprocessors, shared_memory_per_block
from panther_cuda._nvrtc import Kernel
from panther_cuda.ops.sketched_linear.common import CTYPES, device_index

BM = BN = 128  # every kernel's tile (tile_sm90.cuh); the backward's grids are LARGE's (limits.py)
THREADS = 256  # two warpgroups (SM90_NT)
DTYPES = (torch.float16, torch.bfloat16)  # the inputs the kernels take (wgmma of 16-bit operands)
DEPTHS = (32, 64, 128, 256)  # fwd_y_sm90's instances: R rounded up to one of them, zero past R
RING_BK = 64  # the ring of the other kernels (tile_sm90.cuh's ring_sm90): depth per step
# The ring's stage counts (the kernels' second template argument), shallow and deep (ring_stages): three stages
# (96 KiB in 16 bits) leave room for two blocks per SM; six (192 KiB) keep five steps of copies in flight for a
# block alone on its SM. tools/linear_sweep.py --ring-stages times others (benchmarks/results/NOTES.md).
RING_STAGES = (3, 6)
FUSED_X_STAGES = 4  # bwd_x_fused_sm90's ring (its instance): 176 KiB in 16 bits, one block per SM (NOTES.md: five no faster)
FUSED_X_MAX_R = 128  # bwd_x_fused_sm90 holds R = 2Lk in one 128-wide tile
TWO_BLOCKS_BYTES = 100 << 10  # up to this much shared memory, two blocks stay resident per SM (228 KiB)

_kernels: Dict[Tuple[str, str, torch.dtype, Optional[int]], Kernel] = {}


def kernel(source: str, name: str, dtype: torch.dtype, size: int) -> Kernel:
    """The instance ``panther::sl::<name><T, size>`` of ``<source>``, compiled for sm_90a: ``size`` is fwd_y_sm90's
    depth, the ring kernels' stage count (ring_stages)."""
    key = (source, name, dtype, size)
    k = _kernels.get(key)
    if k is None:
        args = f"{CTYPES[dtype]}, {size}"
        k = _kernels[key] = Kernel(f"ops/sketched_linear/{source}", f"panther::sl::{name}<{args}>", arch="sm_90a")
    return k


def depth(R: int) -> Optional[int]:
    """The depth of the fwd_y_sm90 instance that takes R = 2Lk, None past the deepest."""
    return next((d for d in DEPTHS if R <= d), None)


def y_shared_bytes(depth_: int, dtype: torch.dtype) -> int:
    """fwd_y_sm90: H's tile (128 x depth, at least 64: whole 128-byte rows of the swizzle) and two stages of B's
    (depth x 128)."""
    return (BM * max(depth_, 64) + 2 * depth_ * BN) * dtype.itemsize


def ring_shared_bytes(dtype: torch.dtype, stages: int = RING_STAGES[0]) -> int:
    """The ring kernels (fwd_h_sm90, bwd_g_sm90, bwd_x_sm90): ``stages`` stages of a 128 x 64 and a 64 x 128 tile
    (by default the shallow ring, the least a launch takes)."""
    return stages * (BM * RING_BK + RING_BK * BN) * dtype.itemsize


def fused_x_shared_bytes(dtype: torch.dtype) -> int:
    """bwd_x_fused_sm90 (backward_sm90.cu's FusedX): A's 128 x 128 tile, FUSED_X_STAGES stages of x's and dH's
    64 x 128 tiles, and dx's 64 x 128 tile on its way out."""
    return (BM * BN + FUSED_X_STAGES * 2 * RING_BK * BN + RING_BK * BN) * dtype.itemsize


def ring_stages(blocks: int, dtype: torch.dtype, device: torch.device) -> int:
    """The stages of a ring kernel's launch of ``blocks`` blocks: the deep ring where every block has an SM of its own
    (H = x A in a few shares of I on few row tiles: timed faster) and its shared memory fits, else the shallow one
    (two blocks per SM, each hiding the other's waits: timed faster where the blocks outnumber the SMs; both timings in
    benchmarks/results/NOTES.md)."""
    index = device_index(device)
    shallow, deep = RING_STAGES
    fits = ring_shared_bytes(dtype, deep) <= shared_memory_per_block(index)
    return deep if blocks <= multiprocessors(index) and fits else shallow


def ring_launch(source: str, name: str, dtype: torch.dtype, device: torch.device, blocks: int, args: tuple) -> None:
    """Launch the ring kernel ``name`` of ``source`` on ``blocks`` blocks, with the ring ring_stages gives them."""
    stages = ring_stages(blocks, dtype, device)
    kernel(source, name, dtype, stages)((blocks,), (THREADS,), *args, shared_mem=ring_shared_bytes(dtype, stages))


def on_sm90(index: int) -> bool:
    """Whether CUDA device ``index`` runs these kernels (compute capability 9.0: sm_90a)."""
    return torch.cuda.get_device_capability(index) == (9, 0)


def _takes(dtype: torch.dtype, device: torch.device, shared: int, sizes_ok: bool, tensors) -> bool:
    if dtype not in DTYPES or not sizes_ok:
        return False
    if any(t is not None and t.data_ptr() % 16 for t in tensors):
        return False
    index = device_index(device)
    return on_sm90(index) and shared <= shared_memory_per_block(index)


def y_fits(R: int, O: int, dtype: torch.dtype, device: torch.device, *tensors: torch.Tensor) -> bool:
    """fwd_y_sm90: R a multiple of 8 up to the deepest instance, O a multiple of 8 (16-byte rows of B)."""
    d = depth(R)
    return d is not None and _takes(dtype, device, y_shared_bytes(d, dtype), R % 8 == 0 and O % 8 == 0, tensors)


def h_fits(I: int, k: int, dtype: torch.dtype, device: torch.device, *tensors: torch.Tensor) -> bool:
    """fwd_h_sm90: I and k multiples of 8 (16-byte rows of x; runs of A's columns within one term)."""
    return _takes(dtype, device, ring_shared_bytes(dtype), I % 8 == 0 and k % 8 == 0, tensors)


def bwd_g_fits(O: int, k: int, dtype: torch.dtype, device: torch.device, *tensors: torch.Tensor) -> bool:
    """bwd_g_sm90: O and k multiples of 8 (16-byte rows of g and B; runs of H's columns from either half)."""
    return _takes(dtype, device, ring_shared_bytes(dtype), O % 8 == 0 and k % 8 == 0, tensors)


def bwd_x_fits(I: int, k: int, dtype: torch.dtype, device: torch.device, *tensors: torch.Tensor) -> bool:
    """bwd_x_sm90: I and k multiples of 8 (16-byte rows of x; runs of A's columns and dH's within one term)."""
    return _takes(dtype, device, ring_shared_bytes(dtype), I % 8 == 0 and k % 8 == 0, tensors)


def bwd_x_fused_fits(I: int, k: int, R: int, dtype: torch.dtype, device: torch.device, *tensors: torch.Tensor) -> bool:
    """bwd_x_fused_sm90: bwd_x_fits' sizes, and R = 2Lk within one 128-wide tile (FUSED_X_MAX_R)."""
    return R <= FUSED_X_MAX_R and _takes(dtype, device, fused_x_shared_bytes(dtype), I % 8 == 0 and k % 8 == 0, tensors)


def groups(T: int, O: int, depth_: int, dtype: torch.dtype, sms: int) -> int:
    """fwd_y_sm90's blocks per row tile of 128 (each walking every ``groups``-th column tile): as many as fill the
    SMs once (two blocks each where the shared memory allows), at most one per column tile."""
    resident = 2 if y_shared_bytes(depth_, dtype) <= TWO_BLOCKS_BYTES else 1
    return max(1, min(cdiv(O, BN), resident * sms // cdiv(T, BM)))
