r"""Random-feature (FAVOR+) attention: the argument checks, the feature maps and the defined edge cases.

Per batch and head, with q ``(T, D)``, k ``(S, D)``, v ``(S, Dv)`` and ``m`` random directions omega ``(m, D)``,
:math:`\hat x = x / D^{1/4}`:

- softmax kernel: :math:`\phi(x) = \exp(\omega\hat x - |\hat x|^2/2) / \sqrt m`, so that
  :math:`\mathbb E[\phi(q)\cdot\phi(k)] = \exp(q\cdot k/\sqrt D)`; relu kernel: :math:`\phi(x) =
  \operatorname{relu}(\omega\hat x)/\sqrt m`.
- :math:`\operatorname{out}_t = \sum_{s\in V(t)} (\phi(q_t)\cdot\phi(k_s))\,v_s \,/\, \sum_{s\in V(t)}
  \phi(q_t)\cdot\phi(k_s)`, where :math:`V(t)` is the set of keys query ``t`` sees: the keys not masked by
  ``key_padding_mask``, and in causal mode only those with :math:`s \le t`.
- A query whose normaliser is 0 gets output 0 and zero gradients: a query that sees no key (a fully padded
  sample, a causal row before its first unmasked key, ``S = 0``), or, with the relu kernel, a query whose
  features or whose keys' features are all 0. The gradients of every other query stay exact. (A softmax
  row that sees a key but whose normaliser underflowed is NaN instead: see Limits.)

Stabilisers (softmax kernel). The exponentials are evaluated relative to maxima that cancel between the
numerator and the denominator; they are constants for autograd, which keeps every order of gradient exact:

- a query's features relative to its own largest logit, :math:`\phi(q_t) = \exp(l_t - \max_j l_{tj})/\sqrt m`;
- a key's features relative to :math:`M_s`, the largest logit of the unmasked keys it is summed with:
  non-causal, one maximum over all unmasked keys of a batch and head; causal, the running maximum
  :math:`M_s = \max_{s' \le s,\ \text{unmasked}} \max_j l_{s'j}`, and the weight of key ``s`` for query
  ``t >= s`` is :math:`\phi(q_t)\cdot\tilde\phi(k_s)\,e^{M_s - M_t}` with
  :math:`\tilde\phi(k_s) = \exp(l_s - M_s)/\sqrt m`. Every exponent is :math:`\le 0`, and nothing at
  position ``t`` depends on a key after ``t``. Chunked kernels keep their running state relative to the
  maximum at the chunk's end and rescale it by :math:`e^{M_\text{old} - M_\text{new}}` as they go.

Limits: features are exponentials of logits of size :math:`|x|^2/\sqrt D`; the relu kernel is invariant
to scaling q and k together; the softmax kernel's normaliser underflows when one query's logits and the
keys' spread beyond the exponent range of the compute dtype (about 700 in float64, 87 in float32, i.e.
inputs of norm around 10 to 30 and more), and such a row returns NaN rather than a wrong number.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from panther.ops._policy import autocast_cast, autocast_dtype, no_autocast, run
from panther.ops._checks import check_floating, check_same, check_tensor

KERNELS = ("softmax", "relu")

# --- the math shared by every implementation (no argument checks below this line)


def feature_maps(
    q: torch.Tensor,
    k: torch.Tensor,
    omega: torch.Tensor,
    kernel: str,
    causal: bool,
    key_padding_mask: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """``(φ(q) (B, H, T, m), φ̃(k) (B, H, S, m), M)`` in q's dtype, masked keys' features exactly 0.

    ``M`` is the keys' stabiliser of the softmax kernel (None for relu), ``finfo.min`` where no unmasked key
    is seen: causal, the running maximum ``(B, H, S)``, with which key ``s`` weighs ``exp(M_s - M_t)`` for
    query ``t``; non-causal, one maximum ``(B, H, 1)``.
    """
    D = q.shape[-1]
    m = omega.shape[-2]
    om = (omega if omega.dim() == 3 else omega.unsqueeze(0)).transpose(-1, -2)  # (1|H, D, m)
    qs, ks = q * D**-0.25, k * D**-0.25
    qp, kp = torch.matmul(qs, om), torch.matmul(ks, om)  # (B, H, T|S, m)
    keep = None if key_padding_mask is None else ~key_padding_mask[:, None, :, None]  # (B, 1, S, 1)
    if kernel == "relu":
        qf, kf = torch.relu(qp), torch.relu(kp)
        if keep is not None:
            kf = torch.where(keep, kf, 0.0)
        return qf * m**-0.5, kf * m**-0.5, None
    ql = qp - 0.5 * (qs * qs).sum(-1, keepdim=True)
    kl = kp - 0.5 * (ks * ks).sum(-1, keepdim=True)
    qf = torch.exp(ql - ql.detach().amax(-1, keepdim=True))
    top = kl.detach().amax(-1)  # (B, H, S): each key's largest logit
    if key_padding_mask is not None:
        top = top.masked_fill(key_padding_mask[:, None, :], float("-inf"))
    if causal:
        M = torch.cummax(top, dim=-1).values if top.shape[-1] else top
    elif top.shape[-1]:
        M = top.amax(-1, keepdim=True)  # (B, H, 1)
    else:
        M = top.new_full(top.shape[:-1] + (1,), float("-inf"))
    M = M.clamp_min(torch.finfo(M.dtype).min)  # no unmasked key (yet): any finite value, the features are 0
    z = kl - M.unsqueeze(-1)
    if keep is not None:
        z = torch.where(keep, z, float("-inf"))  # exp(-inf) = 0 with a zero gradient, never 0 * inf
    kf = torch.exp(z)
    return qf * m**-0.5, kf * m**-0.5, M


def causal_decay(M: torch.Tensor) -> torch.Tensor:
    """``exp(M_s - M_t)`` for ``s <= t`` and 0 above the diagonal: ``(..., T, T)`` from ``M (..., T)``.

    A constant for autograd (the stabiliser cancels), built in place.
    """
    M = M.detach()
    T = M.shape[-1]
    above = torch.ones(T, T, dtype=torch.bool, device=M.device).triu(1)
    return (M.unsqueeze(-2) - M.unsqueeze(-1)).masked_fill_(above, float("-inf")).exp_()


def normalise(num: torch.Tensor, den: torch.Tensor, M: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``num / den[..., None]``, and 0 with zero gradients where ``den == 0`` (a query that sees no key).

    With the softmax kernel's ``M`` (broadcastable to ``den``), a row that sees a key has a normal positive
    normaliser unless it underflowed (0 or subnormal: its digits, and its gradient, are lost): such a row
    is NaN rather than a silent wrong number, and passes no gradient.
    """
    seen = (den > 0).unsqueeze(-1)
    if M is not None:
        sees_key = (M > torch.finfo(M.dtype).min).unsqueeze(-1)
        lost = sees_key & (den < torch.finfo(den.dtype).tiny).unsqueeze(-1)
        seen = seen & ~lost
    safe = torch.where(seen, den.unsqueeze(-1), 1.0)  # the second where keeps 0/0 out of the gradients
    out = torch.where(seen, num / safe, 0.0)
    return out if M is None else torch.where(lost, float("nan"), out)


def attention_weights(q, k, omega, causal, kernel, key_padding_mask) -> torch.Tensor:
    """The normalised ``(B, H, T, S)`` weights the output is computed with (O(T S) memory)."""
    qf, kf, M = feature_maps(q, k, omega, kernel, causal, key_padding_mask)
    scores = torch.matmul(qf, kf.transpose(-1, -2))  # (B, H, T, S)
    if causal:
        scores = scores * causal_decay(M if M is not None else scores.new_zeros(scores.shape[-1]))
    return normalise(scores, scores.sum(-1), M)


# --- the public ops


def _check_attention_args(q, k, v, omega, causal, kernel, key_padding_mask):
    names = (("q", q), ("k", k)) if v is None else (("q", q), ("k", k), ("v", v))
    for name, t in names:
        check_tensor(name, t, ndim=4)
        check_floating(name, t)
    B, H, T, D = q.shape
    S = k.shape[2]
    if D < 1:
        raise ValueError(f"q must have a head dimension D >= 1 (its last dimension), got shape {tuple(q.shape)}")
    if k.shape != (B, H, S, D):
        raise ValueError(f"k must have shape (B={B}, H={H}, S, D={D}) to match q {tuple(q.shape)}, got {tuple(k.shape)}")
    if v is not None and v.shape[:3] != (B, H, S):
        raise ValueError(f"v must have shape (B={B}, H={H}, S={S}, Dv) to match k {tuple(k.shape)}, got {tuple(v.shape)}")
    check_tensor("omega", omega)
    check_floating("omega", omega)
    if omega.dim() not in (2, 3) or omega.shape[-1] != D or (omega.dim() == 3 and omega.shape[0] != H):
        raise ValueError(f"omega must have shape (m, D={D}) or (H={H}, m, D={D}), got {tuple(omega.shape)}")
    if omega.shape[-2] < 1:
        raise ValueError(f"omega must hold at least one random feature (m >= 1), got shape {tuple(omega.shape)}")
    if not isinstance(kernel, str) or kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r} ({type(causal).__name__})")
    if causal and T != S:
        raise ValueError(f"causal attention needs as many queries as keys, got T={T} queries and S={S} keys")
    if key_padding_mask is not None:
        check_tensor("key_padding_mask", key_padding_mask)
        if key_padding_mask.dtype != torch.bool or key_padding_mask.shape != (B, S):
            raise ValueError(
                f"key_padding_mask must be a bool tensor of shape (B={B}, S={S}), got "
                f"{key_padding_mask.dtype} of shape {tuple(key_padding_mask.shape)}"
            )
        if key_padding_mask.device != q.device:
            raise RuntimeError(f"key_padding_mask is on {key_padding_mask.device} but q is on {q.device}")
    check_same("q", q, [("k", k), ("v", v), ("omega", omega)])


def rfa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    omega: torch.Tensor,
    causal: bool = False,
    kernel: str = "softmax",
    key_padding_mask: Optional[torch.Tensor] = None,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Linear-time attention of q (B, H, T, D), k (B, H, S, D), v (B, H, S, Dv) -> (B, H, T, Dv).

    The math, its stabilisers and its limits are in :mod:`panther.ops.rfa_attention`.

    Args:
        omega: random feature directions, ``(m, D)`` or ``(H, m, D)``.
        causal: query t attends to keys s <= t (needs T == S).
        kernel: ``"softmax"`` (positive random features) or ``"relu"``.
        key_padding_mask: ``(B, S)`` bool, True where a key is ignored.
        backend: run on this backend instead of the selection in force.

    A query that sees no key (every key of its sample padded, a causal row before its first unmasked
    key, or ``S = 0``) gets output 0 and contributes zero gradients, as in
    :func:`torch.nn.functional.scaled_dot_product_attention` (whose math backend returns 0 for fully
    masked rows); the other queries are unaffected. ``T = 0`` gives an empty output. Gradients of every
    order are exact on the ``torch`` backend, which also runs it under torch.func transforms (grad, vmap,
    jvp). Inside :func:`torch.autocast` for q's device, q, k, v and omega are cast to the autocast dtype and
    the output has it, as for :func:`torch.nn.functional.scaled_dot_product_attention`.
    """
    amp = autocast_dtype(q)
    if amp is not None:  # torch's autocast policy for attention: compute in the autocast dtype
        q, k, v, omega = autocast_cast(amp, q, k, v, omega)
        with no_autocast(q):
            return rfa_attention(q, k, v, omega, causal, kernel, key_padding_mask, backend=backend)
    _check_attention_args(q, k, v, omega, causal, kernel, key_padding_mask)
    return run("rfa_attention", q, k, v, omega, causal, kernel, key_padding_mask, backend=backend)


def rfa_features(
    q: torch.Tensor,
    k: torch.Tensor,
    omega: torch.Tensor,
    causal: bool = False,
    kernel: str = "softmax",
    key_padding_mask: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """The stabilised random features ``(φ(q), φ̃(k), M)`` that :func:`rfa_attention` is computed from.

    ``φ(q)`` is ``(B, H, T, m)`` and ``φ̃(k)`` ``(B, H, S, m)`` (0 for masked keys). ``M`` is ``None`` for the relu
    kernel; for softmax, the keys' stabiliser: causal, their running maximum ``(B, H, S)``, with which key s
    weighs ``φ(q_t)·φ̃(k_s)·exp(M_s - M_t)`` for query ``t >= s``; non-causal, one maximum ``(B, H, 1)``.
    Plain PyTorch on any backend.
    """
    q, k, omega = autocast_cast(autocast_dtype(q), q, k, omega)
    _check_attention_args(q, k, None, omega, causal, kernel, key_padding_mask)
    with no_autocast(q):
        return feature_maps(q, k, omega, kernel, causal, key_padding_mask)


def rfa_attention_weights(
    q: torch.Tensor,
    k: torch.Tensor,
    omega: torch.Tensor,
    causal: bool = False,
    kernel: str = "softmax",
    key_padding_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The ``(B, H, T, S)`` matrix of normalised random-feature weights that :func:`rfa_attention` applies.

    Row ``t`` sums to 1, or is 0 for a query that sees no key. Takes ``O(T S)`` memory: for inspection.
    Half-precision inputs are computed in float32 and the result cast back. Plain PyTorch on any backend.
    """
    q, k, omega = autocast_cast(autocast_dtype(q), q, k, omega)
    _check_attention_args(q, k, None, omega, causal, kernel, key_padding_mask)
    work = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    with no_autocast(q):
        w = attention_weights(q.to(work), k.to(work), omega.to(work), causal, kernel, key_padding_mask)
    return w.to(q.dtype)
