"""panther.ops refuses bad arguments before any backend runs, with errors that name the argument.

The checks run in panther.ops, before dispatch, so they are the same on every backend: they run once,
on the reference backend ``torch``.
"""

import pytest
import torch

import panther.ops


def _linear_inputs(I=12, O=10, L=2, k=3, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    rnd = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype)  # noqa: E731
    return dict(x=rnd(4, I), S1s=rnd(L, I, k), S2s=rnd(L, k, O), U1s=rnd(L, k, O), U2s=rnd(L, I, k), bias=rnd(O))


def test_sketched_linear_errors():
    inputs = _linear_inputs()
    with pytest.raises(ValueError, match="in_features=12"):
        panther.ops.sketched_linear(**{**inputs, "x": torch.zeros(4, 13, dtype=torch.float64)}, backend="torch")
    with pytest.raises(TypeError, match="S1s has dtype"):
        panther.ops.sketched_linear(**{**inputs, "S1s": inputs["S1s"].float()}, backend="torch")
    with pytest.raises(ValueError, match="bias must have shape"):
        panther.ops.sketched_linear(**{**inputs, "bias": inputs["bias"][:-1]}, backend="torch")
    with pytest.raises(ValueError, match="U2s must have shape"):
        panther.ops.sketched_linear(**{**inputs, "U2s": inputs["U2s"][:, :-1]}, backend="torch")


def test_sketched_conv2d_errors():
    x = torch.zeros(1, 3, 8, 8, dtype=torch.float64)
    S = torch.zeros(2, 2, 3, 3, 3, dtype=torch.float64)
    U = torch.zeros(2, 2, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="padding"):
        panther.ops.sketched_conv2d(x, S, U, padding="full", backend="torch")
    with pytest.raises(ValueError, match="stride"):
        panther.ops.sketched_conv2d(x, S, U, stride=0, backend="torch")
    with pytest.raises(ValueError, match="in_channels=3"):
        panther.ops.sketched_conv2d(x[:, :2], S, U, backend="torch")
    with pytest.raises(ValueError, match="padding='same'"):
        panther.ops.sketched_conv2d(x, S, U, stride=2, padding="same", backend="torch")


def test_rfa_attention_errors():
    q = torch.zeros(2, 2, 5, 4, dtype=torch.float64)
    om = torch.zeros(8, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="key_padding_mask"):
        panther.ops.rfa_attention(q, q, q, om, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool), backend="torch")
    with pytest.raises(ValueError, match="omega"):
        panther.ops.rfa_attention(q, q, q, om[:, :3], backend="torch")
    with pytest.raises(ValueError, match="kernel"):
        panther.ops.rfa_attention(q, q, q, om, kernel="cosine", backend="torch")
    with pytest.raises(ValueError, match="causal"):
        panther.ops.rfa_attention(q, q[:, :, :3], q[:, :, :3], om, causal=True, backend="torch")
