"""Conformance row of ``sketched_conv2d``: y = 1/(2L) Σ_i U1_iᵀ conv(x, S1_i) + b.

Drawn: small ragged images (5..17 per side), up to 9 channels in and 13 out, kernels up to 4x4, every
kind of stride, padding (int, pair, 'valid', 'same') and dilation, with and without bias. Sizes are small
whatever the limits: they stay far below every ``Limits.max_dim``.
"""

from __future__ import annotations

from panther.testing import naive
from panther.testing.conformance import Case, Limits, OpSpec, Tolerance, generator, randn, register_spec


def params(limits: Limits):
    from hypothesis import strategies as st

    return dict(
        N=st.integers(1, 3), C=st.integers(1, 9), O=st.integers(1, 13),
        HW=st.tuples(st.integers(5, 17), st.integers(5, 17)), ks=st.tuples(st.integers(1, 4), st.integers(1, 4)),
        stride=st.sampled_from([1, 2, (1, 2)]), padding=st.sampled_from([0, 1, (2, 0), "valid", "same"]),
        dilation=st.sampled_from([1, 2, (2, 1)]), terms=st.integers(1, 3), k=st.integers(1, 6), bias=st.booleans(),
    )


def examples(limits: Limits):
    return [
        dict(seed=0, N=1, C=3, O=5, HW=(7, 9), ks=(2, 3), stride=1, padding="same", dilation=1, terms=1, k=2,
             bias=True),
        # a dilated, strided kernel whose output is one column wide, with 18 channels of Z: torch's CPU convolution
        # in bfloat16 (oneDNN, torch 2.13) returns wrong values here, so the torch backend convolves in float32
        dict(seed=0, N=1, C=1, O=1, HW=(5, 5), ks=(1, 3), stride=(1, 2), padding=0, dilation=2, terms=3, k=3,
             bias=True),
    ]


def make_case(seed, N, C, O, HW, ks, stride, padding, dilation, terms, k, bias):
    if padding == "same" and stride != 1:  # 'same' takes stride 1 only
        stride = 1
    d2 = (dilation, dilation) if isinstance(dilation, int) else dilation
    p2 = {"valid": (0, 0), "same": (ks[0], ks[1])}.get(padding, padding)
    p2 = (p2, p2) if isinstance(p2, int) else p2
    if not all(HW[a] + 2 * p2[a] >= d2[a] * (ks[a] - 1) + 1 for a in (0, 1)):
        return None  # the dilated kernel does not fit
    gen = generator(seed)
    fan_in = C * ks[0] * ks[1]
    inputs = dict(
        x=randn(gen, N, C, *HW),
        S1s=randn(gen, 2 * terms, k, C, *ks, scale=fan_in**-0.5),
        U1s=randn(gen, 2 * terms, k, O, scale=k**-0.5),
        bias=randn(gen, O) if bias else None,
    )
    return Case(inputs, dict(stride=stride, padding=padding, dilation=dilation))


def term_scales(inputs):
    return {"U1s": 1 / inputs["S1s"].shape[0]}  # y = Σ_i U1_iᵀ conv(x, S1_i) / (2 terms) + b


SPEC = register_spec(OpSpec(
    op="sketched_conv2d",
    params=params,
    examples=examples,
    make_case=make_case,
    reference=naive.sketched_conv2d,
    grads=("x", "S1s", "bias"),  # U1s is a fixed sketch
    tolerance=Tolerance(term_scales=term_scales),
))
