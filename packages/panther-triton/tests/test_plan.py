"""The launch-plan rule of ops/sketched_linear/plan.py: the properties its docstrings state, on a grid of
shapes and SM counts, and the plans at the headline benchmark shapes (those the earlier fitted model
picked: benchmarks/results/2026-12-04_plan-rule-vs-model.md), whose recorded timings the rule must keep."""

import itertools
import math

import pytest

from panther_triton.ops.sketched_linear.plan import (
    BLK_MAX, FUSED_MAX_A, MAX_SPLIT_I, SPLIT_UNIT, backward_rule, column_chunk, forward_rule,
)

SHAPES = list(itertools.product((1, 37, 128, 1000, 4096, 65536), (16, 200, 1024, 8192), (8, 300, 4096),
                                (1, 40, 64, 128, 150, 512), (4, 132)))


def _cdiv(a, b):
    return -(-a // b)


def _is_fill(split, per_split, sms, cap):
    """split is the largest power of two <= cap with per_split * split <= sms (at least 1)."""
    pow2 = split & (split - 1) == 0
    fits = split == 1 or (split <= cap and per_split * split <= sms)
    maximal = 2 * split > cap or per_split * 2 * split > sms
    return pow2 and fits and maximal


@pytest.mark.parametrize("T, I, O, Lk, sms", SHAPES)
def test_forward_rule(T, I, O, Lk, sms):
    p = forward_rule(T, I, O, Lk, sms)
    one_chunk = Lk <= BLK_MAX
    assert p.fused == (one_chunk and I * 2 * Lk <= FUSED_MAX_A)
    row_tiles = _cdiv(T, 64 if p.fused else 128)
    assert _is_fill(p.o_groups, row_tiles, sms, _cdiv(O, 128))
    if one_chunk and not p.fused:
        assert _is_fill(p.split_i, row_tiles, sms, min(MAX_SPLIT_I, _cdiv(I, SPLIT_UNIT)))
    else:
        assert p.split_i == 1


@pytest.mark.parametrize("T, I, O, Lk, sms", SHAPES)
def test_backward_rule(T, I, O, Lk, sms):
    p = backward_rule(T, I, O, Lk, sms)
    chunks = _cdiv(Lk, column_chunk(Lk))
    assert _is_fill(p.split_t, _cdiv(I, 64) * chunks, sms, _cdiv(T, SPLIT_UNIT))
    if _cdiv(T, 64) >= sms or T * 2 > 4096:
        assert p.split_o == 1
    else:
        so = p.split_o
        assert so & (so - 1) == 0 and so <= 16 and T * so <= 4096
        balanced = math.sqrt(O / (SPLIT_UNIT * chunks))
        assert so >= min(balanced, 16, 4096 // T) - 1e-9 and (so == 1 or so / 2 < balanced)


# bf16, L = 1, k = 64 on the H200 (132 SMs): (rows, features) -> (fused, split_i, o_groups), (split_o, split_t)
HEADLINE = {
    (128, 1024): ((True, 1, 8), (2, 1)),
    (128, 2048): ((True, 1, 16), (4, 1)),
    (128, 4096): ((False, 8, 32), (4, 1)),
    (128, 8192): ((False, 8, 64), (8, 1)),
    (4096, 1024): ((True, 1, 2), (1, 8)),
    (4096, 2048): ((True, 1, 2), (1, 4)),
    (4096, 4096): ((False, 4, 4), (1, 2)),
    (4096, 8192): ((False, 4, 4), (1, 1)),
}


@pytest.mark.parametrize("T, n", HEADLINE)
def test_headline_plans(T, n):
    f, b = forward_rule(T, n, n, 64, 132), backward_rule(T, n, n, 64, 132)
    assert ((f.fused, f.split_i, f.o_groups), (b.split_o, b.split_t)) == HEADLINE[(T, n)]
