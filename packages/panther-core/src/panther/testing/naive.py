"""Naive float64 references: the math of each op written term by term, independent of every backend.

These are slow and obvious on purpose; the conformance suite compares every backend (the ``torch``
reference backend included) with them.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def sketched_linear(x, S1s, S2s, U1s, U2s, bias=None):
    """y = 1/(2L) Σ_i [(x S1_i) U1_i + (x U2_i) S2_i] + b."""
    L = S1s.shape[0]
    y = sum((x @ S1s[i]) @ U1s[i] + (x @ U2s[i]) @ S2s[i] for i in range(L)) / (2 * L)
    return y if bias is None else y + bias


def sketched_conv2d(x, S1s, U1s, bias=None, stride=1, padding=0, dilation=1):
    """y = 1/(2L) Σ_i U1_iᵀ conv(x, S1_i) + b, with S1_i (k, C, kh, kw) and U1_i (k, O)."""
    terms = S1s.shape[0]
    y = sum(
        torch.einsum("nkhw,ko->nohw", F.conv2d(x, S1s[i], None, stride, padding, dilation), U1s[i])
        for i in range(terms)
    ) / terms
    return y if bias is None else y + bias.view(1, -1, 1, 1)


def attention_weights(q, k, omega, causal=False, kernel="softmax", key_padding_mask: Optional[torch.Tensor] = None):
    """The (B, H, T, S) random-feature attention matrix φ(q)φ(k)ᵀ, row-normalised, built explicitly."""
    D = q.shape[-1]
    m = omega.shape[-2]
    om = omega if omega.dim() == 3 else omega.unsqueeze(0)

    def phi(x):
        xs = x * D**-0.25
        proj = torch.einsum("bhtd,hmd->bhtm", xs, om.expand(x.shape[1], -1, -1))
        if kernel == "relu":
            return torch.relu(proj) / m**0.5
        return torch.exp(proj - 0.5 * (xs * xs).sum(-1, keepdim=True)) / m**0.5

    scores = phi(q) @ phi(k).transpose(-1, -2)  # (B, H, T, S), positive kernel values
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask[:, None, None, :], 0.0)
    if causal:
        T, S = scores.shape[-2:]
        scores = scores.masked_fill(~torch.ones(T, S, dtype=torch.bool, device=q.device).tril(), 0.0)
    den = scores.sum(-1, keepdim=True)
    return scores / (den.clamp_min(1e-6) if kernel == "relu" else den)  # relu rows may see no key


def rfa_attention(q, k, v, omega, causal=False, kernel="softmax", key_padding_mask=None):
    """out = A v with A the explicit normalised random-feature attention matrix."""
    return attention_weights(q, k, omega, causal, kernel, key_padding_mask) @ v
