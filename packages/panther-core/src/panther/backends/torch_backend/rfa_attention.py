"""Reference random-feature attention (FAVOR+) in plain PyTorch.

Math (per batch and head; q, k: (T, D), v: (T, Dv), omega: (m, D) random feature directions):
    softmax kernel:  φ(x) = exp(ω x̂ − |x̂|²/2 − c) / √m,  x̂ = x / D^{1/4}    (E[φ(q)·φ(k)] ∝ exp(q·k/√D))
    relu kernel:     φ(x) = relu(ω x̂) / √m
    non-causal:      out_t = φ(q_t) (Σ_s φ(k_s)ᵀ v_s) / φ(q_t)·(Σ_s φ(k_s))
    causal:          the sums run over s ≤ t (prefix sums, computed chunk by chunk)
The stabiliser c is a per-query row max for queries and one max over all keys for keys; both cancel
between numerator and denominator, so they are constants for autograd. Keys where key_padding_mask is
True get φ(k) = 0. Half-precision inputs are computed in float32 and cast back.
"""

from __future__ import annotations

from typing import Optional

import torch

CHUNK = 128  # causal prefix sums: the chunk length of the blockwise scan


def random_features(
    x: torch.Tensor,
    omega: torch.Tensor,
    kernel: str,
    is_query: bool,
    key_padding_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """φ(x) for x (B, H, T, D) and omega (H, m, D) or (m, D); returns (B, H, T, m)."""
    D = x.shape[-1]
    m = omega.shape[-2]
    xs = x * D**-0.25
    om = omega if omega.dim() == 2 else omega.unsqueeze(0)  # (1|H, m, D) broadcasts over batch
    proj = torch.matmul(xs, om.transpose(-1, -2))  # (B, H, T, m)
    mask = None if key_padding_mask is None else key_padding_mask[:, None, :, None]  # (B, 1, T, 1)
    if kernel == "relu":
        phi = torch.relu(proj)
    else:
        logits = proj - 0.5 * (xs * xs).sum(-1, keepdim=True)
        if is_query:
            c = logits.detach().amax(-1, keepdim=True)
        else:
            masked = logits.detach() if mask is None else logits.detach().masked_fill(mask, float("-inf"))
            c = masked.amax((-2, -1), keepdim=True).clamp_min(-1e4)  # all keys masked: any finite c
        phi = torch.exp(logits - c)
    if mask is not None:
        phi = phi.masked_fill(mask, 0.0)
    return phi * m**-0.5


def _causal_numden(qf, kf, v):
    """Prefix-sum linear attention: Σ_{s≤t} (qf_t·kf_s) [v_s, 1], blockwise in chunks of CHUNK."""
    B, H, T, m = qf.shape
    Dv = v.shape[-1]
    v1 = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)  # (B, H, T, Dv+1): last column gives the denominator
    C = min(CHUNK, T)
    n = (T + C - 1) // C
    pad = n * C - T
    if pad:
        qf = torch.nn.functional.pad(qf, (0, 0, 0, pad))
        kf = torch.nn.functional.pad(kf, (0, 0, 0, pad))
        v1 = torch.nn.functional.pad(v1, (0, 0, 0, pad))
    qc = qf.view(B, H, n, C, m)
    kc = kf.view(B, H, n, C, m)
    vc = v1.view(B, H, n, C, Dv + 1)
    kv = torch.matmul(kc.transpose(-1, -2), vc)  # (B, H, n, m, Dv+1) per-chunk sums
    # exclusive prefix over chunks by shifting the inclusive one: `cumsum(kv) - kv` would cancel
    # catastrophically (forward and backward) when one chunk's sums dwarf the others
    state = torch.cat([torch.zeros_like(kv[:, :, :1]), torch.cumsum(kv[:, :, :-1], dim=2)], dim=2)
    inter = torch.matmul(qc, state)
    scores = torch.matmul(qc, kc.transpose(-1, -2))  # (B, H, n, C, C)
    tril = torch.ones(C, C, dtype=torch.bool, device=qf.device).tril()
    intra = torch.matmul(scores.masked_fill(~tril, 0.0), vc)
    out = (inter + intra).reshape(B, H, n * C, Dv + 1)[:, :, :T]
    return out[..., :Dv], out[..., Dv]


def _attention(q, k, v, omega, causal, kernel, key_padding_mask):
    work = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    q_, k_, v_, om = (t.to(work) for t in (q, k, v, omega))
    qf = random_features(q_, om, kernel, True)
    kf = random_features(k_, om, kernel, False, key_padding_mask)
    if causal:
        num, den = _causal_numden(qf, kf, v_)
    else:
        num = torch.matmul(qf, torch.matmul(kf.transpose(-1, -2), v_))
        den = torch.matmul(qf, kf.sum(-2).unsqueeze(-1)).squeeze(-1)
    eps = 1e-6 if kernel == "relu" else torch.finfo(work).tiny
    return (num / den.clamp_min(eps).unsqueeze(-1)).to(q.dtype)


class RFAttentionFunction(torch.autograd.Function):
    """Forward without keeping intermediates; backward recomputes them (memory of flash-style kernels)."""

    @staticmethod
    def forward(ctx, q, k, v, omega, causal, kernel, key_padding_mask):
        ctx.save_for_backward(q, k, v, omega, key_padding_mask)
        ctx.conf = (causal, kernel)
        with torch.no_grad():
            return _attention(q, k, v, omega, causal, kernel, key_padding_mask)

    @staticmethod
    def backward(ctx, g):
        q, k, v, omega, kpm = ctx.saved_tensors
        causal, kernel = ctx.conf
        inputs = [t.detach().requires_grad_(need) for t, need in zip((q, k, v, omega), ctx.needs_input_grad)]
        with torch.enable_grad():
            out = _attention(*inputs, causal, kernel, kpm)
        wanted = [t for t in inputs if t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, g, allow_unused=True))
        res = [next(grads) if t.requires_grad else None for t in inputs]
        res = [torch.zeros_like(t) if r is None and t.requires_grad else r for r, t in zip(res, inputs)]
        return (*res, None, None, None)


def rfa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    omega: torch.Tensor,
    causal: bool = False,
    kernel: str = "softmax",
    key_padding_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Random-feature attention of q, k (B, H, T|S, D) and v (B, H, S, Dv) -> (B, H, T, Dv)."""
    if torch.compiler.is_compiling():  # dynamo cannot trace the recomputing backward: let it differentiate
        return _attention(q, k, v, omega, causal, kernel, key_padding_mask)
    return RFAttentionFunction.apply(q, k, v, omega, causal, kernel, key_padding_mask)
