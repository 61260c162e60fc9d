"""Statistical properties of the sketches: E[S^T S] = I and Johnson–Lindenstrauss norm preservation.

Every test draws from fixed seeds, so results are reproducible; the tolerances are derived from the number
of draws (see the comments), not tuned to the seeds.
"""

import math

import pytest
import torch

from panther.sketch import SKETCH_KINDS, make_sketch


@pytest.mark.parametrize("kind", SKETCH_KINDS)
@pytest.mark.parametrize("n", [16, 12])  # 12: SRHT zero-pads to n' = 16
def test_monte_carlo_mean_of_gram_is_identity(kind, n):
    k, draws = 8, 2000
    gen = torch.Generator().manual_seed(2024 + n)
    total = torch.zeros(n, n, dtype=torch.float64)
    for _ in range(draws):
        s = make_sketch(kind, k, n, generator=gen, dtype=torch.float64).to_dense()
        total += s.T @ s
    mean = total / draws
    # Each entry of S^T S has variance <= 2/k for every kind:
    #   Gaussian: diagonal sum_i g_i^2 / k has variance 2/k, off-diagonal 1/k;
    #   Rademacher, SRHT, SJLT, CountSketch: diagonal exactly 1, off-diagonal <= 1/k
    #   (SRHT: (n'-k)/(k(n'-1)); SJLT: sum over shared rows of random signs / s, E[#shared] = s^2/k).
    # So each entry of the mean of `draws` i.i.d. copies has sd <= sqrt(2/(k draws)) = 0.011; with 5 sd and
    # at most 256 entries the family-wise false-alarm rate is < 256 * 6e-7 (normal approximation).
    tol = 5 * math.sqrt(2 / (k * draws))
    err = (mean - torch.eye(n, dtype=torch.float64)).abs().max().item()
    assert err < tol, (kind, n, err, tol)


def _jl_failure_bound(k, eps):
    # Dasgupta & Gupta (2003), Lemma 2.2: for Gaussian S (k x n, N(0, 1/k)) and any fixed x,
    # P(|Sx|^2 >= b|x|^2) and P(|Sx|^2 <= a|x|^2) are <= exp(k/2 (1 - t + ln t)) for t = b > 1, t = a < 1.
    return sum(math.exp(k / 2 * (1 - t + math.log(t))) for t in (1 + eps, 1 - eps))


@pytest.mark.parametrize("kind", SKETCH_KINDS)
def test_johnson_lindenstrauss(kind):
    k, n, eps = 256, 1024, 0.3
    num_ops, num_vecs = 10, 100
    bound = _jl_failure_bound(k, eps)
    assert bound < 0.01  # = 0.0088: a Gaussian sketch keeps > 99% of ratios within 1 +- eps
    # For x with |x| = 1, Var |Sx|^2 is (2/k)(1 - sum_j x_j^4) for Rademacher, SJLT and CountSketch and
    # ~2/k for SRHT (rows of HDx sampled without replacement): the Gaussian's 2/k. The published JL bounds
    # for these (Achlioptas 2003; Kane & Nelson 2014; Tropp 2011) carry looser constants, so we allow
    # 5% failures, more than 5x the Gaussian bound; with 1000 ratios a true rate near 1% exceeds 5% with
    # negligible probability.
    gen = torch.Generator().manual_seed(7)
    ratios = []
    for i in range(num_ops):
        op = make_sketch(kind, k, n, seed=1000 + i, dtype=torch.float64)
        x = torch.randn(num_vecs, n, generator=gen, dtype=torch.float64)
        ratios.append(op.apply(x).square().sum(-1) / x.square().sum(-1))
    ratios = torch.cat(ratios)
    fail = ((ratios - 1).abs() > eps).double().mean().item()
    assert fail <= 0.05, (kind, fail)
    # the ratios are centred on 1 (mean of 1000 values with sd ~ sqrt(2/k) each)
    assert abs(ratios.mean().item() - 1) < 5 * math.sqrt(2 / k / len(ratios)), ratios.mean().item()
    # and their variance is the one derived above: 2/k, times (n'-k)/(n'-1) for SRHT's sampling without
    # replacement (n' = n here); neglecting sum_j x_j^4 ~ 3/n. The sample variance of 1000 near-normal
    # values has relative sd sqrt(2/999) = 4.5%, so +-25% is > 5 sd.
    expected_var = 2 / k * ((n - k) / (n - 1) if kind == "srht" else 1.0)
    assert 0.75 < ratios.var().item() / expected_var < 1.25, (kind, ratios.var().item(), expected_var)
