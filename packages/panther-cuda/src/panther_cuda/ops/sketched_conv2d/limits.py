"""What the sketched conv2d kernels cannot take, as reasons for the backend's capability check.

The fused forward keeps a block's whole intermediate Z (its output pixels x R = 2·L·k channels) on chip,
so R is bounded by :data:`MAX_RANK` (up to R = 64 the halo kernels take it, above it the generic ones);
the im2col depth C·kh·kw is a 32-bit index in the kernels (:data:`MAX_DEPTH`).
"""

from __future__ import annotations

from typing import List

MAX_RANK = 256  # R = 2·L·k held on chip by one block of the fused forward (64 x 256 float32: 64 KiB)
MAX_DEPTH = 2**30  # C·kh·kw, an int in the kernels (with a tile of headroom)


def reasons(x, S1s, U1s, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1)) -> List[str]:
    """Reasons the cuda kernels cannot run sketched_conv2d on these (already validated) arguments."""
    out = []
    terms, k, C, kh, kw = S1s.shape
    R = terms * k
    if R > MAX_RANK:
        out.append(
            f"sketched_conv2d on backend 'cuda' takes 2·num_terms·low_rank <= {MAX_RANK} (the fused forward keeps "
            f"that many intermediate channels on chip), got S1s of shape {tuple(S1s.shape)}: 2·L·k = {R}; lower "
            "num_terms or low_rank, or use backend 'torch'"
        )
    if C * kh * kw > MAX_DEPTH:
        out.append(
            f"sketched_conv2d on backend 'cuda' takes in_channels·kh·kw <= 2**30, got {C}·{kh}·{kw} = {C * kh * kw} "
            "from S1s; use backend 'torch'"
        )
    return out
