"""Second-order gradients and torch.func transforms of the reference backend's sketched linear and conv2d.

gradgradcheck compares the analytic double backward with finite differences of the first backward in
float64; the penalty test compares a gradient penalty's parameter gradients with those of the same math
written in plain torch ops (which autograd differentiates twice on its own).
"""

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

import panther
from panther.backends.torch_backend import sketched_conv2d, sketched_linear
from panther.nn import SKConv2d, SKLinear

f64 = torch.float64


def _linear_args(lead, I, O, L, k, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=f64, requires_grad=True)
    return (r(*lead, I), r(L, I, k), r(L, k, O), r(L, k, O), r(L, I, k), r(O) if bias else None)


def _linear_dense(x, S1s, S2s, U1s, U2s, bias):
    """The op's math term by term, in plain torch ops."""
    L = S1s.shape[0]
    y = sum((x @ S1s[i]) @ U1s[i] + (x @ U2s[i]) @ S2s[i] for i in range(L)) / (2 * L)
    return y if bias is None else y + bias


def _conv_args(N, C, HW, O, terms, k, kernel, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=f64, requires_grad=True)
    return (r(N, C, *HW), r(terms, k, C, *kernel), r(terms, k, O), r(O) if bias else None)


def _conv_dense(x, S1s, U1s, bias, stride, padding, dilation):
    terms = S1s.shape[0]
    y = sum(
        torch.einsum("ko,nkhw->nohw", U1s[i], F.conv2d(x, S1s[i], None, stride, padding, dilation))
        for i in range(terms)
    ) / terms
    return y if bias is None else y + bias.view(1, -1, 1, 1)


LINEAR_CASES = [
    # (leading dims of x, I, O, L, k, bias)
    ((4,), 5, 3, 1, 2, True),
    ((4,), 5, 3, 3, 2, False),
    ((2, 3), 4, 6, 2, 3, True),
    ((), 3, 2, 2, 1, True),
]


@pytest.mark.parametrize("lead,I,O,L,k,bias", LINEAR_CASES)
def test_linear_gradgradcheck(lead, I, O, L, k, bias):
    args = _linear_args(lead, I, O, L, k, bias)
    assert gradcheck(sketched_linear, args)
    assert gradgradcheck(sketched_linear, args)


CONV_CASES = [
    # (N, C, (H, W), O, 2L, k, kernel, bias, stride, padding, dilation)
    (1, 2, (4, 5), 3, 2, 2, (3, 3), True, (1, 1), (0, 0), (1, 1)),
    (1, 3, (7, 6), 2, 4, 1, (3, 2), False, (2, 1), (1, 2), (1, 1)),
    (2, 1, (8, 7), 2, 2, 2, (2, 3), True, (1, 2), (1, 0), (2, 2)),
]


@pytest.mark.parametrize("N,C,HW,O,terms,k,kernel,bias,stride,padding,dilation", CONV_CASES)
def test_conv2d_gradgradcheck(N, C, HW, O, terms, k, kernel, bias, stride, padding, dilation):
    args = _conv_args(N, C, HW, O, terms, k, kernel, bias)

    def op(x, S1s, U1s, b):
        return sketched_conv2d(x, S1s, U1s, b, stride, padding, dilation)

    assert gradcheck(op, args)
    assert gradgradcheck(op, args)


def _penalty_grads(fn, args, wrt):
    """Parameter gradients of an input-gradient penalty ||d(sum y²)/dx||² (as in R1 or Jacobian regularisation)."""
    x = args[0]
    y = fn(*args)
    (gx,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
    return torch.autograd.grad(gx.pow(2).sum() + y.sum(), wrt)


@pytest.mark.parametrize("bias", [True, False])
def test_linear_gradient_penalty_matches_plain_torch(bias):
    args = _linear_args((3, 4), 5, 6, 2, 3, bias, seed=1)
    wrt = [a for a in args if a is not None]
    got = _penalty_grads(sketched_linear, args, wrt)
    want = _penalty_grads(_linear_dense, args, wrt)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("bias", [True, False])
def test_conv2d_gradient_penalty_matches_plain_torch(bias):
    args = _conv_args(2, 3, (6, 5), 4, 2, 2, (3, 3), bias, seed=2)
    conf = ((2, 1), (1, 1), (1, 2))
    wrt = [a for a in args if a is not None]
    got = _penalty_grads(lambda *a: sketched_conv2d(*a, *conf), args, wrt)
    want = _penalty_grads(lambda *a: _conv_dense(*a, *conf), args, wrt)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_conv2d_gradient_penalty_in_16_bits_on_the_cpu(dtype):
    """16-bit inputs on the CPU take the op's float32 path in the double backward too, at a shape where torch's
    bfloat16 CPU convolution is wrong (the conv conformance row's second example): close to float64 within a few
    roundings of the 16-bit dtype."""
    args = _conv_args(1, 1, (5, 5), 1, 6, 3, (1, 3), True, seed=4)
    conf = ((1, 2), (0, 0), (2, 2))
    want = _penalty_grads(lambda *a: _conv_dense(*a, *conf), args, args)
    low = [a.detach().to(dtype).requires_grad_() for a in args]
    got = _penalty_grads(lambda *a: sketched_conv2d(*a, *conf), low, low)
    for g, w in zip(got, want):
        assert g.dtype == dtype
        assert (g.double() - w).abs().max() <= 0.02 * w.abs().max()  # bfloat16: 5 units of roundoff


def test_first_order_backward_unchanged_by_create_graph():
    """The fast path (no create_graph) and the differentiable one give the same first-order gradients."""
    args = _linear_args((7,), 5, 4, 2, 3, True, seed=3)
    y = sketched_linear(*args)
    fast = torch.autograd.grad(y.sum(), args)
    y = sketched_linear(*args)
    slow = torch.autograd.grad(y.sum(), args, create_graph=True)
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("make, shape", [
    (lambda: SKLinear(4, 3, 1, 2, dtype=f64, seed=0), (2, 4)),
    (lambda: SKConv2d(2, 2, 3, stride=2, padding=1, num_terms=1, low_rank=1, dtype=f64, seed=0), (1, 2, 5, 4)),
])
def test_layer_gradgradcheck_through_panther_ops(make, shape):
    """Layer -> panther.ops -> torch backend: second-order gradients in the input and every parameter."""
    with pytest.warns(UserWarning, match="not fewer than"):
        layer = make()
    names = [n for n, _ in layer.named_parameters()]
    x = torch.randn(*shape, dtype=f64, requires_grad=True)

    def f(x, *params):
        return torch.func.functional_call(layer, dict(zip(names, params)), (x,))

    with panther.use_backend("torch"):
        assert gradgradcheck(f, (x, *layer.parameters()))


# -- torch.func transforms (they need setup_context-style Functions) ------------------------------


def test_linear_under_torch_func():
    args = [a.detach() for a in _linear_args((3,), 5, 4, 2, 3, True, seed=4)]

    def loss(f):
        return lambda *a: f(*a).pow(2).sum()

    for got, want in zip(torch.func.grad(loss(sketched_linear), argnums=(0, 1, 2, 3, 4, 5))(*args),
                         torch.func.grad(loss(_linear_dense), argnums=(0, 1, 2, 3, 4, 5))(*args)):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.func.jacrev(sketched_linear, argnums=1)(*args),
                               torch.func.jacrev(_linear_dense, argnums=1)(*args))
    xs = torch.randn(6, 2, 5, dtype=f64)
    torch.testing.assert_close(torch.func.vmap(lambda x: sketched_linear(x, *args[1:]))(xs),
                               torch.func.vmap(lambda x: _linear_dense(x, *args[1:]))(xs))


def test_conv2d_under_torch_func():
    args = [a.detach() for a in _conv_args(2, 3, (6, 5), 4, 2, 2, (3, 3), True, seed=5)]
    conf = ((2, 1), (1, 1), (1, 1))

    def loss(f):
        return lambda *a: f(*a, *conf).pow(2).sum()

    for got, want in zip(torch.func.grad(loss(sketched_conv2d), argnums=(0, 1, 2, 3))(*args),
                         torch.func.grad(loss(_conv_dense), argnums=(0, 1, 2, 3))(*args)):
        torch.testing.assert_close(got, want)
    x, S1s, U1s, b = args
    torch.testing.assert_close(torch.func.jacrev(lambda u: sketched_conv2d(x, S1s, u, b, *conf))(U1s),
                               torch.func.jacrev(lambda u: _conv_dense(x, S1s, u, b, *conf))(U1s))
    xs = torch.randn(3, 2, 3, 6, 5, dtype=f64)
    torch.testing.assert_close(torch.func.vmap(lambda x: sketched_conv2d(x, *args[1:], *conf))(xs),
                               torch.func.vmap(lambda x: _conv_dense(x, *args[1:], *conf))(xs))
