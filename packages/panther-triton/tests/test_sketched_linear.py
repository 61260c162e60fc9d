"""The sketched linear kernels against the float64 definition: forward and every gradient, every launch plan.

Shapes are ragged on purpose (T, I, O, k not multiples of the tiles; T = 1); (64, 256, 200, 3, 40) has
R = 240, the widest one-chunk fused case, and (70, 64, 48, 3, 50) has R = 300, the chunked two-launch path,
over three row tiles of the interpreter's 32 (the chunks' programs take the row tiles of dx in turn).
"""

from unittest import mock

import pytest
import torch

import panther_triton
from panther_triton import BackwardPlan, ForwardPlan, use_plans
from panther_triton.ops.sketched_linear import sketched_linear_backward, sketched_linear_forward
from panther_triton.ops.sketched_linear.common import allow_tf32, dot_precision
from triton_test_utils import DEVICE, TOL, make_inputs, needs_kernels, reference, rel_err, run_and_compare

pytestmark = needs_kernels

SHAPES = [(1, 17, 9, 1, 3), (37, 130, 70, 2, 5), (64, 256, 200, 3, 40), (70, 64, 48, 3, 50)]
TRAINED = (0, 1, 2, 5)  # x, S1s, S2s, bias: what an SKLinear trains (U1s, U2s are buffers)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _ieee_float32():
    """float32 at full precision here (TF32 is tested on the GPU): the fp32 bound is then 2e-5."""
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(prev)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}_I{}_O{}_L{}_k{}".format(*s))
def test_matches_float64_reference(shape, dtype):
    run_and_compare(panther_triton.sketched_linear, make_inputs(*shape, dtype), TRAINED, TOL[dtype])


ONE_CHUNK, TWO_CHUNKS = (37, 130, 70, 2, 5), (70, 64, 48, 3, 50)
PLAN_CASES = [  # every forward plan and every backward plan at least once, paired to keep the run short
    (ONE_CHUNK, ForwardPlan(fused=True, o_groups=1), BackwardPlan(split_o=1, split_t=1)),
    (ONE_CHUNK, ForwardPlan(fused=True, o_groups=3), BackwardPlan(split_o=2, split_t=3)),  # recomputing siblings
    (ONE_CHUNK, ForwardPlan(fused=False, split_i=1, o_groups=1), BackwardPlan(split_o=3, split_t=2)),
    (ONE_CHUNK, ForwardPlan(fused=False, split_i=3, o_groups=2), BackwardPlan(split_o=2, split_t=1)),
    (TWO_CHUNKS, ForwardPlan(fused=False, split_i=1, o_groups=1), BackwardPlan(split_o=2, split_t=3)),
    (TWO_CHUNKS, ForwardPlan(fused=False, split_i=1, o_groups=3), BackwardPlan(split_o=1, split_t=2)),
]


@pytest.mark.parametrize("shape, fplan, bplan", PLAN_CASES, ids=lambda v: str(v) if not isinstance(v, tuple) else "")
def test_every_plan(shape, fplan, bplan):
    """Each launch plan computes the same thing; every grad asked for, U1s and U2s included."""
    with use_plans(forward=fplan, backward=bplan):
        run_and_compare(panther_triton.sketched_linear, make_inputs(*shape, torch.float32), range(6), TOL[torch.float32])


def test_forced_fused_plan_falls_back_when_r_is_wide():
    """A fused plan cannot hold R > 256 on chip: it runs as two launches and is still right."""
    with use_plans(forward=ForwardPlan(fused=True, o_groups=2)):
        run_and_compare(panther_triton.sketched_linear, make_inputs(*TWO_CHUNKS, torch.bfloat16), TRAINED,
                        TOL[torch.bfloat16])


def test_three_dim_input_and_unbatched():
    x, *w = make_inputs(7, 40, 24, 2, 8, torch.float32, lead=(2, 3))
    run_and_compare(panther_triton.sketched_linear, (x, *w), TRAINED, TOL[torch.float32])
    run_and_compare(panther_triton.sketched_linear, (x[0, 0, 0], *w), TRAINED, TOL[torch.float32])


def test_inputs_of_one_shape_in_other_layouts():
    """Eager launches are prepared once per layout of the inputs (forward.py's _layout_key): the same
    shapes with other strides or another 16-byte alignment are each right (and, under the interpreter,
    each launch checks that the layout key implies every argument the kernel is specialised on)."""
    x, *w = make_inputs(21, 40, 24, 2, 8, torch.float32)
    buf = torch.zeros(21 * 40 + 1, dtype=x.dtype, device=x.device)
    shifted = buf[1:].view(21, 40)  # 4 bytes past the allocation: not 16-byte aligned
    shifted.copy_(x)
    S1s = w[0]
    sbuf = torch.zeros(S1s.numel() + 2, dtype=S1s.dtype, device=S1s.device)
    s1_shifted = sbuf[2:].view(S1s.shape)
    s1_shifted.copy_(S1s)
    for xs, s1 in ((x, S1s), (shifted, S1s), (x.t().contiguous().t(), S1s), (x, s1_shifted), (x, S1s)):
        assert torch.equal(xs, x) and torch.equal(s1, S1s)
        run_and_compare(panther_triton.sketched_linear, (xs, s1, *w[1:]), TRAINED, TOL[torch.float32])


def test_noncontiguous_input():
    x, *w = make_inputs(45, 33, 20, 2, 6, torch.float32)
    wide = torch.zeros(45, 3 * 33, dtype=x.dtype, device=x.device)
    wide[:, ::3] = x  # column stride 3
    xs = wide[:, ::3]
    assert not xs.is_contiguous()
    run_and_compare(panther_triton.sketched_linear, (xs, *w), TRAINED, TOL[torch.float32])
    xt = x.t().contiguous().t()  # column-major: row stride 1
    run_and_compare(panther_triton.sketched_linear, (xt, *w), TRAINED, TOL[torch.float32])


def test_noncontiguous_weights():
    """Weights are read through their strides: permuted views give the same result, with no copies."""
    x, S1s, S2s, U1s, U2s, b = make_inputs(20, 50, 30, 2, 7, torch.float32)
    S1v = S1s.permute(1, 0, 2).contiguous().permute(1, 0, 2)  # (L, I, k) with strides of an (I, L, k) array
    S2v = S2s.transpose(1, 2).contiguous().transpose(1, 2)
    assert not S1v.is_contiguous() and not S2v.is_contiguous()
    run_and_compare(panther_triton.sketched_linear, (x, S1v, S2v, U1s, U2s, b), range(6), TOL[torch.float32])


def test_no_bias():
    x, S1s, S2s, U1s, U2s, _ = make_inputs(19, 70, 50, 2, 5, torch.bfloat16, bias=False)
    run_and_compare(panther_triton.sketched_linear, (x, S1s, S2s, U1s, U2s, None), (0, 1, 2), TOL[torch.bfloat16])


@pytest.mark.parametrize("wants", [(0,), (1, 2), (5,), (3, 4), (2, 5)], ids=["x", "S", "bias", "U", "S2_bias"])
def test_partial_requires_grad(wants):
    """Only the grads asked for are computed (the kernels skip the others), and they stay right."""
    run_and_compare(panther_triton.sketched_linear, make_inputs(33, 48, 40, 2, 6, torch.float32), wants, TOL[torch.float32])


def test_expanded_grad_output():
    """y.sum().backward() hands the backward an expanded (stride 0) gradient."""
    inputs = make_inputs(21, 30, 18, 1, 8, torch.float32)
    leaves = [t.clone().requires_grad_() for t in inputs]
    panther_triton.sketched_linear(*leaves).sum().backward()
    _, grads = reference(inputs, torch.ones(21, 18, dtype=torch.float64, device=DEVICE), range(6))
    for leaf, ref in zip(leaves, grads):
        assert rel_err(leaf.grad, ref) <= TOL[torch.float32]


def test_empty_batch():
    x, *w = make_inputs(0, 20, 10, 1, 4, torch.float32)
    leaves = [t.clone().requires_grad_() for t in (x, *w)]
    y = panther_triton.sketched_linear(*leaves)
    assert y.shape == (0, 10)
    y.sum().backward()
    assert leaves[0].grad.shape == (0, 20)
    for t in leaves[1:]:
        assert torch.count_nonzero(t.grad) == 0


def test_inference_skips_autograd():
    inputs = make_inputs(9, 30, 20, 2, 4, torch.float32)
    with torch.no_grad():
        y = panther_triton.sketched_linear(*inputs)
    assert y.grad_fn is None
    assert rel_err(y, reference(inputs, torch.zeros_like(y), ())[0]) <= TOL[torch.float32]


def test_launchers_alone():
    """The forward and backward launchers are callable on their own (profiling), with plans."""
    x, S1s, S2s, U1s, U2s, b = make_inputs(30, 40, 36, 2, 4, torch.float32)
    g = torch.randn(30, 36, dtype=torch.float64).float().to(DEVICE)
    y_ref, grads_ref = reference((x, S1s, S2s, U1s, U2s, b), g, range(6))
    y, h = sketched_linear_forward(x, S1s, S2s, U1s, U2s, b, allow_tf32=False, plan=ForwardPlan(False, 2, 2))
    assert h.shape == (30, 16) and h.dtype == x.dtype
    h_ref = torch.cat([x.double() @ S1s.double().permute(1, 0, 2).reshape(40, 8),
                       x.double() @ U2s.double().permute(1, 0, 2).reshape(40, 8)], 1)
    assert rel_err(h, h_ref) <= TOL[torch.float32]
    assert rel_err(y, y_ref) <= TOL[torch.float32]
    grads = sketched_linear_backward(g, x, h, S1s, S2s, U1s, U2s, (True,) * 6, False, plan=BackwardPlan(2, 2))
    for got, ref in zip(grads, grads_ref):
        assert rel_err(got, ref) <= TOL[torch.float32]
    none = sketched_linear_backward(g, x, h, S1s, S2s, U1s, U2s, (False,) * 6)
    assert none == (None,) * 6


def test_no_weight_concatenation_per_call():
    """The weights are read in place through strides: no torch.cat on the forward or backward path."""
    inputs = [t.clone().requires_grad_() for t in make_inputs(10, 24, 20, 2, 4, torch.float32)]
    with mock.patch("torch.cat", side_effect=AssertionError("torch.cat on the hot path")):
        panther_triton.sketched_linear(*inputs).sum().backward()


def test_precision_follows_torch():
    assert dot_precision(torch.float32, allow_tf32=False) == "ieee"
    assert dot_precision(torch.float32, allow_tf32=True) == "tf32"
    assert dot_precision(torch.bfloat16, allow_tf32=False) == "tf32"  # 16-bit dots ignore it
    prev = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        assert allow_tf32()
        torch.set_float32_matmul_precision("highest")
        assert not allow_tf32()
    finally:
        torch.set_float32_matmul_precision(prev)
