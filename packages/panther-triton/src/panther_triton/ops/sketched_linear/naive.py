"""The sketched linear op written as its definition, term by term (the readable reference for tests).

    y = 1/(2L) Σ_{i<L} [ (x S1_i) U1_i + (x U2_i) S2_i ] + b
x (..., I); S1s, U2s (L, I, k); S2s, U1s (L, k, O); b (O,) or None. Autograd gives the gradients.
"""

from __future__ import annotations

from typing import Optional

import torch


def sketched_linear_naive(
    x: torch.Tensor,
    S1s: torch.Tensor,
    S2s: torch.Tensor,
    U1s: torch.Tensor,
    U2s: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    L = S1s.shape[0]
    y = sum((x @ S1s[i]) @ U1s[i] + (x @ U2s[i]) @ S2s[i] for i in range(L)) / (2 * L)
    return y if bias is None else y + bias
