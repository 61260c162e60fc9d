"""apply / apply_sketch / @ against the dense matrix, gradients, and the fast Walsh–Hadamard transform."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from panther.sketch import SKETCH_KINDS, apply_sketch, fwht, hadamard_matrix, make_sketch


def dense_apply(matrix, x, dim):
    """Reference: contract a dense (k, n) matrix with axis `dim` of x."""
    return torch.movedim(torch.tensordot(matrix, torch.movedim(x, dim, 0), dims=1), 0, dim)


def sylvester_hadamard(n):
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def build(kind, k, n, seed, nnz=None, dtype=torch.float64):
    if kind == "srht":
        k = min(k, 1 << (n - 1).bit_length())  # SRHT needs k <= n'
    kw = {}
    if kind == "sjlt" and nnz is not None:
        kw["nnz_per_column"] = min(nnz, k)
    return make_sketch(kind, k, n, seed=seed, dtype=dtype, **kw)


@settings(max_examples=150, deadline=None)
@given(
    kind=st.sampled_from(SKETCH_KINDS),
    k=st.integers(1, 40),
    n=st.integers(1, 70),
    other=st.tuples(st.integers(0, 4), st.integers(1, 5)),
    dim=st.sampled_from([0, 1, 2, -1, -2, -3]),
    nnz=st.integers(1, 9),
    seed=st.integers(0, 2**32),
)
def test_apply_matches_dense_3d(kind, k, n, other, dim, nnz, seed):
    op = build(kind, k, n, seed, nnz)
    shape = list(other)
    shape.insert(dim % 3, n)
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    y = op.apply(x, dim=dim)
    expected_shape = list(shape)
    expected_shape[dim % 3] = op.sketch_dim
    assert list(y.shape) == expected_shape
    torch.testing.assert_close(y, dense_apply(op.to_dense(), x, dim), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(apply_sketch(op, x, dim), y, rtol=0, atol=0)


@pytest.mark.parametrize("kind", SKETCH_KINDS)
@pytest.mark.parametrize(("k", "n"), [(8, 16), (7, 12), (13, 17), (1, 1), (64, 100), (30, 1000)])
@pytest.mark.parametrize("dim", [0, 1, -1])
def test_apply_ragged_sizes(kind, k, n, dim):
    op = build(kind, k, n, seed=k * 1000 + n)
    shape = [3, 5, 2]
    shape[dim] = n
    x = torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(op.apply(x, dim=dim), dense_apply(op.to_dense(), x, dim), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", SKETCH_KINDS)
def test_apply_1d_and_matmul(kind):
    op = build(kind, 6, 13, seed=1)
    dense = op.to_dense()
    v = torch.randn(13, dtype=torch.float64)
    m = torch.randn(2, 13, 4, dtype=torch.float64)
    torch.testing.assert_close(op.apply(v), dense @ v, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(op @ v, dense @ v, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(op @ m, dense @ m, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", SKETCH_KINDS)
def test_apply_empty_batch(kind):
    op = build(kind, 4, 10, seed=0)
    assert op.apply(torch.zeros(0, 10, dtype=torch.float64)).shape == (0, 4)
    assert op.apply(torch.zeros(10, 0, 3, dtype=torch.float64), dim=0).shape == (4, 0, 3)


@pytest.mark.parametrize("kind", SKETCH_KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_apply_low_precision(kind, dtype):
    op64 = build(kind, 8, 20, seed=3)
    op = op64.to(dtype=dtype)
    x = torch.randn(4, 20, dtype=torch.float64)
    y = op.apply(x.to(dtype))
    assert y.dtype == dtype
    tol = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 5e-2}[dtype]
    torch.testing.assert_close(y.double(), op64.apply(x), rtol=tol, atol=tol * 4)


@pytest.mark.parametrize("kind", SKETCH_KINDS)
@pytest.mark.parametrize("dim", [0, 1, -1])
def test_gradient_matches_dense(kind, dim):
    op = build(kind, 7, 12, seed=5)
    shape = [4, 3, 5]
    shape[dim] = 12
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    y = op.apply(x, dim=dim)
    upstream = torch.randn_like(y)
    (grad,) = torch.autograd.grad(y, x, upstream)
    (grad_ref,) = torch.autograd.grad(dense_apply(op.to_dense(), x, dim), x, upstream)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-12, atol=1e-12)
    # and both equal the analytic gradient S^T g along dim
    torch.testing.assert_close(grad, dense_apply(op.to_dense().T, upstream, dim), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", SKETCH_KINDS)
def test_gradcheck(kind):
    op = build(kind, 5, 9, seed=8)
    x = torch.randn(2, 9, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: op.apply(t, dim=1), (x,))
    assert torch.autograd.gradgradcheck(lambda t: op.apply(t, dim=1), (x,))


# -- fast Walsh–Hadamard transform ----------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 4, 16, 128])
def test_hadamard_matrix_is_sylvester(n):
    torch.testing.assert_close(hadamard_matrix(n, dtype=torch.float64), sylvester_hadamard(n), rtol=0, atol=0)


@pytest.mark.parametrize("n", [1, 2, 8, 64, 1024])
@pytest.mark.parametrize("dim", [0, 1, -1])
def test_fwht_matches_matrix(n, dim):
    shape = [3, 2, 4]
    shape[dim] = n
    x = torch.randn(shape, dtype=torch.float64)
    h = sylvester_hadamard(n)
    torch.testing.assert_close(fwht(x, dim=dim), dense_apply(h, x, dim), rtol=1e-12, atol=1e-10)
    y = fwht(x, dim=dim, normalized=True)
    torch.testing.assert_close(y, dense_apply(h / math.sqrt(n), x, dim), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fwht(y, dim=dim, normalized=True), x, rtol=1e-12, atol=1e-12)  # involution


def test_fwht_non_contiguous_input():
    x = torch.randn(8, 5, dtype=torch.float64).T  # (5, 8), non-contiguous
    torch.testing.assert_close(fwht(x), x @ sylvester_hadamard(8), rtol=1e-12, atol=1e-12)
