"""What the sketched linear kernels cannot take beyond device and dtype (the backend's capability check).

Every size is covered otherwise: R = 2Lk up to :data:`FUSED_MAX_R` runs the fused forward (H on chip),
any larger R the two-launch forward; ragged edges are masked. Refused, with the reason, are:

* an empty L, k or O (an empty product; backend ``torch`` returns the bias for it);
* launches of 2**31 blocks or more (the kernels number their blocks along one grid axis).
"""

from __future__ import annotations

from typing import List

import torch

# Tile shape of every kernel, as tile.cuh declares it (BM x BN blocks, BK deep, rows padded by PAD).
BM, BN, BK, PAD = 64, 64, 32, 8
NT = 128  # threads of a block
STAGES = 2  # pairs of A and B tiles in shared memory of the non-fused kernels (one loads, one computes)
# Widest H (R = 2Lk columns) that the fused forward keeps in shared memory (R <= 256: 2 k L <= 256).
FUSED_MAX_R = 256
MAX_BLOCKS = 2**31 - 1


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def blocks_needed(T: int, I: int, O: int, R: int) -> int:
    """Blocks of the largest launch for these sizes (dx and y tiles: T/BM x I/BN or x O/BN)."""
    return _cdiv(T, BM) * max(_cdiv(I, BN), _cdiv(O, BN), _cdiv(R, BN)) + _cdiv(max(I, R), BM) * _cdiv(max(O, R), BN)


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
