"""Conformance row of ``rfa_attention``: out = A v, A the row-normalised random-feature attention matrix.

Drawn: batch and heads up to 3, query length up to ``Limits.max_dim`` (keys: as many when causal, about
3/4 as many otherwise), head size up to 40 (values one wider), up to 48 random features shared or per
head, both kernels, with and without a key padding mask (the first key of a sample always kept), and, if
``padded``, with the last sample of the batch fully padded (its rows see no key: output and gradients 0).
relu draws whose output rounding the inputs to bfloat16 moves (a row at relu's kink) are rejected
(:func:`rounding_moves_output`).

Named cases (:data:`CASES`): fully padded samples next to normal ones, empty key and query sequences,
causal future-key adversaries (a key whose logit dwarfs the earlier ones must not move earlier rows), and
tiny and large scales of q, k (softmax: up to 10, the range where the op is exact; relu: 1e-3..1e3) and v.
"""

from __future__ import annotations

from typing import Tuple

import torch

from panther.testing import naive
from panther.testing.conformance import (
    TOLERANCES,
    Case,
    Limits,
    NamedCase,
    OpSpec,
    generator,
    randn,
    register_spec,
)


def params(limits: Limits):
    from hypothesis import strategies as st

    return dict(
        B=st.integers(1, 3), H=st.integers(1, 3), T=st.integers(1, limits.max_dim), D=st.integers(1, 40),
        m=st.integers(1, 48), causal=st.booleans(), kernel=st.sampled_from(["softmax", "relu"]),
        per_head=st.booleans(), masked=st.booleans(), padded=st.booleans(),
    )


def examples(limits: Limits):
    return [
        dict(seed=0, B=1, H=2, T=min(200, limits.max_dim), D=16, m=24, causal=True, kernel="softmax", per_head=True,
             masked=True, padded=False),
        dict(seed=7, B=3, H=2, T=min(70, limits.max_dim), D=8, m=16, causal=False, kernel="softmax", per_head=False,
             masked=True, padded=True),  # a fully padded sample next to normal ones
        # a query row that sees no key (normaliser 0) next to ordinary rows: the chunked prefix sums must not
        # cancel the large gradient of that row against the others
        dict(seed=18572, B=2, H=2, T=min(209, limits.max_dim), D=35, m=13, causal=True, kernel="relu",
             per_head=False, masked=False, padded=False),
    ]


def make_case(seed, B, H, T, D, m, causal, kernel, per_head, masked, padded=False):
    if kernel == "relu" and (m < 8 or D < 4):
        return None  # relu features with few directions leave rows with a near-zero normaliser: ill-conditioned
    gen = generator(seed)
    S = T if causal else max(1, (T * 3) // 4 + 1)
    omega = randn(gen, *((H, m, D) if per_head else (m, D)))
    kpm = None
    if masked:
        kpm = torch.rand(B, S, generator=gen) < 0.3
        kpm[:, 0] = False  # every query keeps at least one key
    if padded:  # ... except those of the last sample, which is fully padded
        kpm = torch.zeros(B, S, dtype=torch.bool) if kpm is None else kpm
        kpm[-1] = True
    inputs = dict(q=randn(gen, B, H, T, D), k=randn(gen, B, H, S, D), v=randn(gen, B, H, S, D + 1), omega=omega)
    kwargs = dict(causal=causal, kernel=kernel, key_padding_mask=kpm)
    if kernel == "relu" and rounding_moves_output(inputs, kwargs):
        return None  # a row at relu's kink: rounding the inputs moves its output past what any dtype is judged by
    return Case(inputs, kwargs)


def rounding_moves_output(inputs, kwargs) -> bool:
    """Whether rounding the float64 inputs to bfloat16 (the coarsest dtype tested) moves the exact output by more
    than half of bfloat16's tolerance floor. It does where a row's relu features sit at the kink: a projection
    that rounding moves across 0 switches a feature, or a whole row's normaliser, on or off, and the output jumps
    (a row that saw no key, output 0, sees some). No rounding model bounds that error, so such a draw cannot
    judge a backend."""
    ref = naive.rfa_attention(**inputs, **kwargs)
    if ref.numel() == 0:
        return False
    moved = naive.rfa_attention(**{n: t.to(torch.bfloat16).double() for n, t in inputs.items()}, **kwargs)
    scale = max(ref.abs().max().item(), 0.05)  # the tolerance's max|ref|, at least 0.05 · size (size 1)
    return (moved - ref).abs().max().item() > 0.5 * TOLERANCES[torch.bfloat16] * scale


def float64_only_grads(kwargs):
    # relu is not differentiable at 0: rounding q, k moves features across it
    return ("q", "k") if kwargs["kernel"] == "relu" else ()


# --- named special cases: inputs the drawn ones do not reach, each tested as test_rfa_attention_case[id-dtype]

F32_64 = (torch.float64, torch.float32)


def attention_case(seed, B=2, H=2, T=6, S=None, D=4, m=16, causal=False, kernel="softmax", per_head=True,
                   scale=1.0, v_scale=1.0, kpm=None) -> Case:
    """q, k of N(0, scale²), v of N(0, v_scale²), omega of N(0, 1); ``kpm``: (B, S) bools or None."""
    gen = generator(seed)
    S = T if S is None else S
    inputs = dict(q=randn(gen, B, H, T, D, scale=scale), k=randn(gen, B, H, S, D, scale=scale),
                  v=randn(gen, B, H, S, D + 1, scale=v_scale), omega=randn(gen, *((H, m, D) if per_head else (m, D))))
    return Case(inputs, dict(causal=causal, kernel=kernel, key_padding_mask=kpm), size=min(1.0, scale, v_scale))


def padded_sample(kernel, causal):
    """Sample 1 of 3 fully padded; sample 2 with its leading keys padded (causal: its first rows see none)."""
    kpm = torch.zeros(3, 9, dtype=torch.bool)
    kpm[1] = True
    kpm[2, :3] = True
    return lambda: attention_case(11, B=3, T=9, S=9, D=8, causal=causal, kernel=kernel, kpm=kpm)


def empty(T, S, causal, kernel):
    return lambda: attention_case(12, T=T, S=S, causal=causal, kernel=kernel,
                                  kpm=torch.zeros(2, S, dtype=torch.bool))


def future_key(kernel):
    """The causal adversary: T=6, D=4, omega[0] = (40, 0, 0, 0) and k[5] = omega[0]·D^(1/4), whose logit
    omega_0·k̂ - |k̂|²/2 = 800 dwarfs those of the earlier keys. A stabiliser taken over all keys (future
    ones included) underflows every earlier row to 0; the rows t < 5 must match the reference (and do not
    depend on k[5] at all)."""

    def build():
        case = attention_case(13, B=1, H=1, T=6, D=4, m=4, causal=True, kernel=kernel, per_head=False)
        omega, k = case.inputs["omega"].clone(), case.inputs["k"].clone()
        omega[0] = torch.tensor([40.0, 0.0, 0.0, 0.0], dtype=torch.float64)
        k[0, 0, 5] = omega[0] * 4**0.25
        return Case(dict(case.inputs, omega=omega, k=k), case.kwargs)

    return build


def future_keys_across_chunks():
    """Every key from t0 = 140 of T = 300 on is the adversary of its head (later chunks of a chunked scan)."""

    def build():
        kpm = torch.rand(2, 300, generator=generator(14)) < 0.2
        case = attention_case(14, T=300, D=8, m=16, causal=True, kpm=kpm)
        omega, k = case.inputs["omega"].clone(), case.inputs["k"].clone()
        omega[:, 0] = 40 * omega[:, 0] / omega[:, 0].norm(dim=-1, keepdim=True)
        k[..., 140:, :] = (omega[:, 0] * 8**0.25)[None, :, None, :]
        return Case(dict(case.inputs, omega=omega, k=k), case.kwargs)

    return build


def scaled(kernel, scale, v_scale, causal):
    """q, k, v at the given scales; causal: row 0 sees one key, so a relu normaliser ~ scale² is tested."""
    kpm = torch.rand(2, 40, generator=generator(15)) < 0.25
    kpm[:, 0] = False
    return lambda: attention_case(15, T=40, D=8, m=16, causal=causal, kernel=kernel, scale=scale, v_scale=v_scale,
                                  kpm=kpm)


CASES: Tuple[NamedCase, ...] = (
    *(NamedCase(f"padded-sample-{kernel}-{'causal' if causal else 'full'}", padded_sample(kernel, causal))
      for kernel in ("softmax", "relu") for causal in (False, True)),
    *(NamedCase(f"empty-{name}-{kernel}", empty(T, S, causal, kernel))
      for name, T, S, causal in (("keys", 5, 0, False), ("queries", 0, 5, False), ("causal", 0, 0, True))
      for kernel in ("softmax", "relu")),
    NamedCase("future-key-softmax", future_key("softmax"), F32_64),
    NamedCase("future-key-relu", future_key("relu"), F32_64),
    NamedCase("future-keys-across-chunks", future_keys_across_chunks(), (torch.float64,)),
    *(NamedCase(f"scale-{kernel}-qk{scale:g}-v{v_scale:g}-{'causal' if causal else 'full'}",
                scaled(kernel, scale, v_scale, causal), F32_64)
      for kernel, scale, v_scale in (("softmax", 1e-3, 1e-3), ("softmax", 1e-3, 1e3), ("softmax", 10.0, 1e3),
                                     ("softmax", 10.0, 1e-3), ("relu", 1e-3, 1e-3), ("relu", 1e-3, 1e3),
                                     ("relu", 1e3, 1e3), ("relu", 1e3, 1e-3))
      for causal in (False, True)),
)

SPEC = register_spec(OpSpec(
    op="rfa_attention",
    params=params,
    examples=examples,
    make_case=make_case,
    reference=naive.rfa_attention,
    grads=("q", "k", "v"),  # omega holds fixed random directions
    float64_only_grads=float64_only_grads,
    cases=CASES,
))
