"""Over the draw of the sketches, a layer built from a dense one computes the dense layer in expectation.

E[y] = x W0ᵀ + b for SKLinear (E[U1ᵀU1] = I and E[U2U2ᵀ] = I) and E[y] = conv(x, W0) + b for SKConv2d.
We build the layer with many seeds and compare the mean output with the dense output, element by element,
in units of the standard error of the mean (a z-score; the seeds are independent, so by the central limit
theorem each z is close to N(0, 1) when the layer is unbiased). The bound |z| < 5 has a per-element
false-alarm probability below 1e-6, so with a few hundred elements the test does not fail by chance (the
seeds are fixed anyway, so it is deterministic). To show the test has power, the same statistic must
reject a 10% bias, and the spread of a single draw must be large (the mean is not trivially exact).
"""

import pytest
import torch

from panther.nn import SKConv2d, SKLinear

pytestmark = pytest.mark.filterwarnings("ignore:.*not fewer than the:UserWarning")

DRAWS = 400
Z_BOUND = 5.0


def z_scores(samples, expected):
    """(mean - expected) / (std / sqrt(n)) over the first dimension of samples."""
    n = samples.shape[0]
    return (samples.mean(0) - expected) / (samples.std(0) / n**0.5)


def check_unbiased(samples, expected):
    z = z_scores(samples, expected)
    assert z.abs().max() < Z_BOUND, f"max |z| = {z.abs().max():.2f}"
    # power: a 10% bias is rejected by the same statistic
    assert z_scores(samples, 1.1 * expected).abs().max() > Z_BOUND
    # a single draw is far from the dense output: the average is doing the work
    single = (samples[0] - expected).norm() / expected.norm()
    assert single > 0.3, single


def test_sklinear_expected_output_is_the_dense_layer():
    torch.manual_seed(0)
    lin = torch.nn.Linear(21, 13, dtype=torch.float64)
    with torch.no_grad():
        lin.bias.mul_(0.1)  # keep the bias from dominating the comparison
    x = torch.randn(6, 21, dtype=torch.float64)
    expected = lin(x).detach()
    with torch.no_grad():
        draws = [SKLinear.from_linear(lin, num_terms=2, low_rank=3, init="unbiased", seed=s) for s in range(DRAWS)]
        samples = torch.stack([layer(x) for layer in draws])
    check_unbiased(samples, expected)


def test_sklinear_default_init_is_centred():
    """Without W_init, W0 is drawn symmetric around 0, so over seeds the output minus the bias has mean 0."""
    x = torch.randn(4, 9, dtype=torch.float64)
    samples = []
    with torch.no_grad():
        for s in range(DRAWS):
            layer = SKLinear(9, 5, 1, 2, dtype=torch.float64, seed=s)
            samples.append(layer(x) - layer.bias)
    samples = torch.stack(samples)
    z = samples.mean(0) / (samples.std(0) / DRAWS**0.5)
    assert z.abs().max() < Z_BOUND


def test_skconv2d_expected_output_is_the_dense_layer():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 5, 3, padding=1, dtype=torch.float64)
    with torch.no_grad():
        conv.bias.mul_(0.1)
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    expected = conv(x).detach()
    with torch.no_grad():
        draws = [SKConv2d.from_conv2d(conv, num_terms=1, low_rank=2, init="unbiased", seed=s) for s in range(DRAWS)]
        samples = torch.stack([layer(x) for layer in draws])
    check_unbiased(samples, expected)


def test_error_shrinks_with_more_terms():
    """Var of the estimator falls like 1/(L k): more terms and rank, closer to the dense layer on average."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(40, 30, dtype=torch.float64)
    x = torch.randn(8, 40, dtype=torch.float64)
    expected = lin(x).detach()

    def mean_error(L, k):
        with torch.no_grad():
            draws = [SKLinear.from_linear(lin, L, k, init="unbiased", seed=s) for s in range(40)]
            errs = [(layer(x) - expected).norm() / expected.norm() for layer in draws]
        return torch.stack(errs).mean().item()

    small, large = mean_error(1, 2), mean_error(4, 8)
    assert large < small / 3, (small, large)  # sqrt(16) = 4 in theory
