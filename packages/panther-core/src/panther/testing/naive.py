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
    """The (B, H, T, S) random-feature attention matrix φ(q)φ(k)ᵀ, masked and row-normalised, built explicitly.

    Evaluated in the inputs' dtype (the references are run in float64). Softmax kernel: every term
    exp(l(q_t)_j + l(k_s)_j) of row t is taken relative to the largest one among the keys that row sees (one
    joint maximum per query; no per-key stabiliser). A row that sees no key (all masked, or a zero
    normaliser with relu) is 0.
    """
    B, H, T, D = q.shape
    S = k.shape[2]
    m = omega.shape[-2]
    om = omega if omega.dim() == 3 else omega.unsqueeze(0).expand(H, -1, -1)  # (H, m, D)
    qs, ks = q * D**-0.25, k * D**-0.25
    proj_q = torch.einsum("bhtd,hmd->bhtm", qs, om)
    proj_k = torch.einsum("bhsd,hmd->bhsm", ks, om)
    visible = torch.ones(B, 1, T, S, dtype=torch.bool, device=q.device)
    if key_padding_mask is not None:
        visible = visible & ~key_padding_mask[:, None, None, :]
    if causal:
        visible = visible & torch.ones(T, S, dtype=torch.bool, device=q.device).tril()
    if kernel == "relu":
        scores = torch.einsum("bhtm,bhsm->bhts", torch.relu(proj_q), torch.relu(proj_k)) / m
        scores = torch.where(visible, scores, 0.0)
    else:
        # terms (B, H, T, S, m): l(q_t)_j + l(k_s)_j = ω_j·(q̂_t + k̂_s) - |q̂_t|²/2 - |k̂_s|²/2
        logits = (proj_q - 0.5 * (qs * qs).sum(-1, keepdim=True)).unsqueeze(3) + (
            proj_k - 0.5 * (ks * ks).sum(-1, keepdim=True)
        ).unsqueeze(2)
        seen = visible.unsqueeze(-1).expand_as(logits)
        masked = torch.where(seen, logits.detach(), float("-inf"))
        top = masked.amax((3, 4), keepdim=True) if S else logits.new_zeros(B, H, T, 1, 1)
        top = torch.where(torch.isfinite(top), top, 0.0)  # the row sees no key: its terms are all dropped
        scores = torch.where(seen, torch.exp(torch.where(seen, logits - top, 0.0)), 0.0).sum(-1) / m
    den = scores.sum(-1, keepdim=True)
    return torch.where(den > 0, scores / torch.where(den > 0, den, 1.0), 0.0)


def rfa_attention(q, k, v, omega, causal=False, kernel="softmax", key_padding_mask=None):
    """out = A v with A the explicit normalised random-feature attention matrix."""
    return attention_weights(q, k, omega, causal, kernel, key_padding_mask) @ v
