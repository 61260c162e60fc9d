r"""Reference random-feature attention (FAVOR+) in plain PyTorch.

The feature maps, stabilisers and edge cases are the op's math, in :mod:`panther.ops.rfa_attention`
(:func:`~panther.ops.rfa_attention.feature_maps`, :func:`~panther.ops.rfa_attention.normalise`). Per batch
and head, with φ(q) ``(T, m)``, φ̃(k) ``(S, m)``, v ``(S, Dv)`` and ``v1 = [v, 1]`` (its last column gives
the normaliser):

- non-causal: ``[num, den]_t = φ(q_t) (Σ_s φ̃(k_s)ᵀ v1_s)``;
- causal, in chunks of ``CHUNK`` queries and keys, with the keys' running maximum ``M`` (zero for relu):

  * within a chunk: ``Σ_{s<=t} (φ(q_t)·φ̃(k_s)) exp(M_s - M_t) v1_s``;
  * across chunks: a state ``Z_j = Σ_{s <= e_j} exp(M_s - M_{e_j}) φ̃(k_s)ᵀ v1_s`` (``e_j`` the last
    position of chunk ``j``), updated as ``Z_j = exp(M_{e_{j-1}} - M_{e_j}) Z_{j-1} + (chunk j's sum)``
    and read by query ``t`` of chunk ``j+1`` as ``(φ(q_t) exp(M_{e_j} - M_t)) Z_j``.

  Every exponent is ``<= 0`` and nothing at position t reads a key after t.

``out = num / den``, 0 where ``den == 0`` (NaN where a softmax row that sees a key underflowed).
Half-precision inputs are computed in float32 and cast back.
The autograd Function keeps no intermediates: its backward recomputes them, and differentiates that
recomputation with a graph when a higher-order gradient is asked for (``create_graph=True``).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from panther.ops.rfa_attention import causal_decay, feature_maps, normalise

CHUNK = 128  # causal mode: the chunk length of the blockwise scan


def _causal_numden(qf, kf, v, M):
    """Causal ``(num (B, H, T, Dv), den (B, H, T))`` from stabilised features and the running max M (B, H, T)."""
    B, H, T, m = qf.shape
    Dv = v.shape[-1]
    v1 = torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)  # (B, H, T, Dv+1)
    # a symbolic length (torch.compile dynamic / torch.export Dim) runs as one chunk, O(T^2) memory per
    # head: the chunk loop's trip count would be a guard on the length
    C = T if isinstance(T, torch.SymInt) else max(1, min(CHUNK, T))
    n = -(-T // C)
    pad = n * C - T
    if pad:  # padded keys have zero features; M repeats its last value so that it stays nondecreasing
        qf, kf, v1 = (F.pad(t, (0, 0, 0, pad)) for t in (qf, kf, v1))
        M = torch.cat([M, M[..., -1:].expand(B, H, pad)], dim=-1)
    qc = qf.view(B, H, n, C, m)
    kc = kf.view(B, H, n, C, m)
    vc = v1.view(B, H, n, C, Dv + 1)
    Mc = M.view(B, H, n, C)
    intra = torch.matmul(torch.matmul(qc, kc.transpose(-1, -2)) * causal_decay(Mc), vc)  # (B, H, n, C, Dv+1)
    end = Mc[..., -1]  # (B, H, n): the running max at each chunk's end
    # each chunk's sum relative to the max at its end: (B, H, n, m, Dv+1)
    sums = torch.matmul((kc * torch.exp(Mc - end.unsqueeze(-1)).unsqueeze(-1)).transpose(-1, -2), vc)
    state = torch.zeros_like(sums[:, :, 0])  # what chunk 0's queries read
    states = [state]
    for j in range(n - 1):  # add chunk j: the state moves from relative to end[j-1] to relative to end[j]
        if j:
            state = state * torch.exp(end[:, :, j - 1] - end[:, :, j])[..., None, None]
        state = state + sums[:, :, j]
        states.append(state)
    state = torch.stack(states, dim=2)  # (B, H, n, m, Dv+1)
    before = torch.cat([Mc[:, :, :1, :1], end[:, :, :-1].unsqueeze(-1)], dim=2)  # (B, H, n, 1): max at the previous end
    inter = torch.matmul(qc * torch.exp(before - Mc).unsqueeze(-1), state)
    out = (inter + intra).reshape(B, H, n * C, Dv + 1)[:, :, :T]
    return out[..., :Dv], out[..., Dv]


def _attention(q, k, v, omega, causal, kernel, key_padding_mask):
    """The forward in plain differentiable PyTorch (half precision computed in float32)."""
    work = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    q_, k_, v_, om = (t.to(work) for t in (q, k, v, omega))
    qf, kf, M = feature_maps(q_, k_, om, kernel, causal, key_padding_mask)
    if causal and q.shape[2]:  # (T = S = 0 is the empty non-causal case)
        num, den = _causal_numden(qf, kf, v_, M if M is not None else qf.new_zeros(qf.shape[:-1]))
    else:
        num = torch.matmul(qf, torch.matmul(kf.transpose(-1, -2), v_))
        den = torch.matmul(qf, kf.sum(-2).unsqueeze(-1)).squeeze(-1)
    return normalise(num, den, M).to(q.dtype)


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
        need = ctx.needs_input_grad[:4]
        if torch.is_grad_enabled():
            # create_graph=True: differentiate a recomputation attached to the inputs' graphs, with a graph,
            # so that the gradient is itself differentiable (gradient penalties, double backward)
            inputs = [q, k, v, omega]
            out = _attention(q, k, v, omega, causal, kernel, kpm)
            create_graph = True
        else:
            inputs = [t.detach().requires_grad_(n) for t, n in zip((q, k, v, omega), need)]
            with torch.enable_grad():
                out = _attention(*inputs, causal, kernel, kpm)
            create_graph = False
        wanted = [t for t, n in zip(inputs, need) if n]
        grads = iter(torch.autograd.grad(out, wanted, g, allow_unused=True, create_graph=create_graph))
        res = [next(grads) if n else None for n in need]
        res = [torch.zeros_like(t) if r is None and n else r for r, t, n in zip(res, inputs, need)]
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
    # dynamo cannot trace the recomputing backward, and torch.func transforms (grad, vmap, jvp) need
    # differentiable ops: let them differentiate the plain math
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return _attention(q, k, v, omega, causal, kernel, key_padding_mask)
    return RFAttentionFunction.apply(q, k, v, omega, causal, kernel, key_padding_mask)
