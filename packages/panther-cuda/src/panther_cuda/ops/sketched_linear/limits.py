"""What the sketched linear kernels cannot take beyond device and dtype (the backend's capability check).

Every size is covered otherwise: the two-launch forward takes any R = 2Lk, the fused forward (H on chip, a
forced plan) R up to :data:`FUSED_MAX_R`; ragged edges are masked. Refused, with the reason, are:

* an empty L, k or O (an empty product; backend ``torch`` returns the bias for it);
* launches of 2**31 blocks or more (the kernels number their blocks along one grid axis).
"""

from __future__ import annotations

import dataclasses
from typing import List

import torch


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """One tile shape of the kernels, tile.cuh's ``Tile<BM, BN, BK, WARPS_M, WARPS_N, STAGES>``: a block of
    warps_m x warps_n warps computes a bm x bn output tile, bk deep per step of a ring of ``stages``
    shared-memory steps."""

    bm: int
    bn: int
    bk: int
    warps_m: int
    warps_n: int
    stages: int

    PAD = 8  # elements added to each shared row (tile.cuh's PAD)

    @property
    def threads(self) -> int:
        return 32 * self.warps_m * self.warps_n

    @property
    def cpp(self) -> str:
        """The C++ type, as the kernels' name expressions spell it."""
        return (f"panther::sl::Tile<{self.bm}, {self.bn}, {self.bk}, {self.warps_m}, {self.warps_n}, "
                f"{self.stages}>")

    def shared_elements(self) -> int:
        """Dynamic shared memory of every kernel but the fused forward, in elements (tile.cuh's
        SHARED_ELEMENTS): the ring of ``stages`` A and B tiles, each sized for the larger of its layouts
        (stored transposed for an operand contiguous down its rows), or the staged output tile if larger."""
        p = self.PAD
        stage_a = max(self.bm * (self.bk + p), self.bk * (self.bm + p))
        stage_b = max(self.bk * (self.bn + p), self.bn * (self.bk + p))
        return max(self.stages * (stage_a + stage_b), self.bm * (self.bn + p))

    def shared_bytes(self, dtype: torch.dtype) -> int:
        return self.shared_elements() * dtype.itemsize

    def fused_bytes(self, R: int, dtype: torch.dtype) -> int:
        """Dynamic shared memory of the fused forward: an A and two B tiles and the bm x R tile of H (R
        rounded up to bn, rows padded)."""
        p = self.PAD
        tiles = self.bm * (self.bk + p) + 2 * self.bk * (self.bn + p)
        return (tiles + self.bm * (_cdiv(R, self.bn) * self.bn + p)) * dtype.itemsize


# The tile shapes the host launches (every one instantiated in forward.cu's and backward.cu's compile blocks).
# SMALL: 64 x 64, 4 warps: many blocks, for small T or narrow outputs. LARGE: 128 x 128, 8 warps of 64 x 32, a
# 4-step ring: fewer re-reads of the operands per output byte and more bytes in flight, where its tiles alone
# fill the SMs; a block covers R <= 128 columns of H and dH in one tile, so x and g are read once.
# DEEP64: LARGE's output tile with steps 64 deep, four in the ring (147 KiB for 16-bit operands: one block per SM),
# for H = x A where the forward takes LARGE tiles: each step reads 128 contiguous bytes of a row of x, and the
# block waits at half the barriers (faster than LARGE there, slower for y and the backward, which keep LARGE:
# tools/linear_parts.py and tools/linear_sweep.py, benchmarks/results/NOTES.md).
SMALL = TileConfig(64, 64, 32, 2, 2, 3)
LARGE = TileConfig(128, 128, 32, 2, 4, 4)
DEEP64 = TileConfig(128, 128, 64, 2, 4, 4)
CONFIGS = {"small": SMALL, "large": LARGE, "deep64": DEEP64}
SUM_THREADS = 128  # threads of a block of the share-summing kernels (tile.cuh's SUM_NT)
SUM_RUN = 4  # elements a thread of the share-summing kernels where their 16-byte loads apply (tile.cuh's add_run)

# Widest H (R = 2Lk columns) that the fused forward keeps in shared memory (R <= 256: 2 k L <= 256).
FUSED_MAX_R = 256
MAX_BLOCKS = 2**31 - 1


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def blocks_needed(T: int, I: int, O: int, R: int) -> int:
    """Blocks of the largest launch for these sizes on the smallest tiles (dx and y tiles: T/BM x I/BN or x O/BN)."""
    bm, bn = SMALL.bm, SMALL.bn
    return _cdiv(T, bm) * max(_cdiv(I, bn), _cdiv(O, bn), _cdiv(R, bn)) + _cdiv(max(I, R), bm) * _cdiv(max(O, R), bn)


def reasons(x=None, S1s=None, S2s=None, U1s=None, U2s=None, bias=None, *rest, **kwargs) -> List[str]:
    """Reasons the cuda kernels cannot run ``sketched_linear(x, S1s, S2s, U1s, U2s, bias)``; [] when they can."""
    out = []
    if not (isinstance(S1s, torch.Tensor) and isinstance(S2s, torch.Tensor) and S1s.dim() == 3 and S2s.dim() == 3):
        return out  # malformed arguments: panther.ops names what is wrong
    L, I, k = S1s.shape
    O = S2s.shape[-1]
    for name, size in (("num_terms L", L), ("low_rank k", k), ("out_features O", O)):
        if size == 0:
            out.append(
                f"{name} is 0 (S1s of shape {tuple(S1s.shape)}, S2s of shape {tuple(S2s.shape)}): the cuda kernels "
                "need L, k and O >= 1; use backend 'torch'"
            )
    if isinstance(x, torch.Tensor) and x.dim() >= 1 and not out:
        T = x.numel() // max(I, 1)
        blocks = blocks_needed(T, I, O, 2 * L * k)
        if blocks > MAX_BLOCKS:
            out.append(
                f"x of shape {tuple(x.shape)} with I={I}, O={O}, 2Lk={2 * L * k} needs {blocks} blocks in one launch; "
                f"the cuda kernels launch at most {MAX_BLOCKS}; use backend 'torch' or split the batch"
            )
    return out
