"""Conformance row of ``rfa_attention``: out = A v, A the row-normalised random-feature attention matrix.

Drawn: batch and heads up to 3, query length up to ``Limits.max_dim`` (keys: as many when causal, about
3/4 as many otherwise), head size up to 40 (values one wider), up to 48 random features shared or per
head, both kernels, with and without a key padding mask (every query keeps at least one key).
"""

from __future__ import annotations

from typing import Tuple

import torch

from panther.testing import naive
from panther.testing.conformance import Case, Limits, NamedCase, OpSpec, generator, randn, register_spec


def params(limits: Limits):
    from hypothesis import strategies as st

    return dict(
        B=st.integers(1, 3), H=st.integers(1, 3), T=st.integers(1, limits.max_dim), D=st.integers(1, 40),
        m=st.integers(1, 48), causal=st.booleans(), kernel=st.sampled_from(["softmax", "relu"]),
        per_head=st.booleans(), masked=st.booleans(),
    )


def examples(limits: Limits):
    return [
        dict(seed=0, B=1, H=2, T=min(200, limits.max_dim), D=16, m=24, causal=True, kernel="softmax", per_head=True,
             masked=True),
        # a query row that sees no key (normaliser 0) next to ordinary rows: the chunked prefix sums must not
        # cancel the large gradient of that row against the others
        dict(seed=18572, B=2, H=2, T=min(209, limits.max_dim), D=35, m=13, causal=True, kernel="relu",
             per_head=False, masked=False),
    ]


def make_case(seed, B, H, T, D, m, causal, kernel, per_head, masked):
    if kernel == "relu" and (m < 8 or D < 4):
        return None  # relu features with few directions leave rows with a near-zero normaliser: ill-conditioned
    gen = generator(seed)
    S = T if causal else max(1, (T * 3) // 4 + 1)
    omega = randn(gen, *((H, m, D) if per_head else (m, D)))
    kpm = None
    if masked:
        kpm = torch.rand(B, S, generator=gen) < 0.3
        kpm[:, 0] = False  # every query keeps at least one key
    inputs = dict(q=randn(gen, B, H, T, D), k=randn(gen, B, H, S, D), v=randn(gen, B, H, S, D + 1), omega=omega)
    return Case(inputs, dict(causal=causal, kernel=kernel, key_padding_mask=kpm))


def float64_only_grads(kwargs):
    # relu is not differentiable at 0: rounding q, k moves features across it
    return ("q", "k") if kwargs["kernel"] == "relu" else ()


# Named special cases: inputs the drawn ones do not reach, each tested as test_rfa_attention_case[id-dtype].
CASES: Tuple[NamedCase, ...] = ()

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
