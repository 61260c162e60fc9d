"""Conformance row of ``sketched_linear``: y = 1/(2L) Σ_i [(x S1_i) U1_i + (x U2_i) S2_i] + b.

Drawn: ragged in/out features up to ``Limits.max_dim``, L <= 4 terms, rank k <= 40, leading shapes of one
row, many rows and 3-D inputs, with and without bias. Sketches are scaled as SKLinear scales them, so that
the output is O(1).
"""

from __future__ import annotations

from panther.testing import naive
from panther.testing.conformance import Case, Limits, OpSpec, Tolerance, generator, randn, register_spec


def params(limits: Limits):
    from hypothesis import strategies as st

    dims = st.integers(1, limits.max_dim)
    lead = st.sampled_from([(1,), (7,), (33,), (2, 5), (3, 1, 4), ()])
    return dict(lead=lead, I=dims, O=dims, L=st.integers(1, 4), k=st.integers(1, 40), bias=st.booleans())


def examples(limits: Limits):
    return [
        dict(seed=0, lead=(1,), I=17, O=9, L=1, k=3, bias=True),  # one row, ragged
        dict(seed=1, lead=(2, 3), I=min(130, limits.max_dim), O=min(70, limits.max_dim), L=2, k=5, bias=False),  # 3-D
        dict(seed=51, lead=(1,), I=1, O=51, L=3, k=1, bias=False),  # dx of terms that cancel (|dx| << Σ|terms|)
    ]


def make_case(seed, lead, I, O, L, k, bias) -> Case:
    gen = generator(seed)
    return Case(dict(
        x=randn(gen, *lead, I),
        S1s=randn(gen, L, I, k, scale=I**-0.5),
        S2s=randn(gen, L, k, O, scale=k**-0.5),
        U1s=randn(gen, L, k, O, scale=k**-0.5),
        U2s=randn(gen, L, I, k, scale=I**-0.5),
        bias=randn(gen, O) if bias else None,
    ))


def term_scales(inputs):
    L = inputs["S1s"].shape[0]
    return {"U1s": 1 / (2 * L), "U2s": 1 / (2 * L)}  # every term has one of them: y = Σ .../(2L) + b


SPEC = register_spec(OpSpec(
    op="sketched_linear",
    params=params,
    examples=examples,
    make_case=make_case,
    reference=naive.sketched_linear,
    grads=("x", "S1s", "S2s", "bias"),  # U1s, U2s are fixed sketches
    tolerance=Tolerance(term_scales=term_scales),
))
