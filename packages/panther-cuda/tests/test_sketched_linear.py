"""The cuda backend's sketched linear op: kernels against the float64 torch reference, and its host code.

GPU tests (marker ``gpu``) run the kernels: every dtype (float32 exact and TF32, float16, bfloat16),
ragged shapes (T = 1, 3-D x, I and O off the 64- and 128-wide tiles, k = 1, L = 3, R beyond the fused
limit), every launch path and tile shape (limits.CONFIGS, forced), every gradient, and the integration points
(torch.compile, CUDA graphs, streams, devices). CPU tests check what can be checked without a GPU: the
kernels themselves, compiled for the host under an emulation of CUDA (emulation/cuda_emulation.h: threads,
barriers, shared memory, cp.async, ldmatrix, mma.sync) against float64 loops, every kernel, path and tile
shape; the refusals of limits.py; the launch arguments against the kernels' C++ signatures; the tile
configs, the plans, the fake (meta) path; the sweep tool's plans.

Run the GPU tests on a GPU machine with:
    PANTHER_REQUIRE_GPU=1 python -m pytest -q --import-mode=importlib -m gpu packages/panther-cuda/tests/test_sketched_linear.py
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import panther
import panther_cuda
from panther.backends.torch_backend.sketched_linear import sketched_linear as torch_sketched_linear
from panther_cuda.ops.sketched_linear import backward as bwd_module
from panther_cuda.ops.sketched_linear import common as common_module
from panther_cuda.ops.sketched_linear import forward as fwd_module
from panther_cuda.ops.sketched_linear import limits
from panther_cuda.ops.sketched_linear import sm90 as sm90_module
from panther_cuda.ops.sketched_linear.backward import half_range, sketched_linear_backward
from panther_cuda.ops.sketched_linear.forward import ForwardPlan, forward_rule, sketched_linear_forward
from emulation import build_harness  # tests/emulation (conftest.py puts tests/ on sys.path)

OP_DIR = Path(common_module.__file__).resolve().parent

# GPU tests skip without a GPU unless PANTHER_REQUIRE_GPU=1, which makes them fail instead (conftest.py)
on_gpu = pytest.mark.gpu


# Max-normalised error bounds, |got - ref|max / |ref|max, against float64 math on the same (rounded)
# inputs: the roundings to the storage dtype along the chain (H then y; dH then dx; the grads), a few
# half-ulps of the largest element; a wrong index or mask errs by O(1).
TOL = {"float32": 2e-5, "tf32": 8e-3, "float16": 8e-3, "bfloat16": 3e-2}
DTYPES = {"float32": torch.float32, "tf32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
NAMES = ("x", "S1s", "S2s", "U1s", "U2s", "bias")
TRAINED = (0, 1, 2, 5)  # what an SKLinear trains (U1s, U2s are buffers)
ALL = tuple(range(6))


def make_inputs(T, I, O, L, k, dtype, device="cuda", bias=True, seed=0, lead=()):
    """x (*lead, T, I) ~ N(0, 1); weights scaled like SKLinear's (H and y of order 1); bias or None."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)

    return (rnd(*lead, T, I), rnd(L, I, k, scale=I**-0.5), rnd(L, k, O, scale=k**-0.5), rnd(L, k, O, scale=k**-0.5),
            rnd(L, I, k, scale=I**-0.5), rnd(O) if bias else None)


def reference(inputs, grad_out, wants):
    """The torch backend in float64 on the CPU: y and the grads of the inputs named by ``wants``."""
    ins = [None if t is None else t.detach().cpu().double().requires_grad_(i in wants) for i, t in enumerate(inputs)]
    y = torch_sketched_linear(*ins)
    if wants:
        y.backward(grad_out.detach().cpu().double())
    return y.detach(), [ins[i].grad for i in wants]


def rel_err(got, ref) -> float:
    assert tuple(got.shape) == tuple(ref.shape), (tuple(got.shape), tuple(ref.shape))
    got = got.detach().cpu().double()
    assert torch.isfinite(got).all(), "non-finite values"
    if ref.numel() == 0:
        return 0.0
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


class precision:
    """torch's float32 matmul precision for the block: "highest" (exact FFMA) or "high" (TF32)."""

    def __init__(self, mode: str):
        self.value = "high" if mode == "tf32" else "highest"

    def __enter__(self):
        self.prev = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision(self.value)

    def __exit__(self, *exc):
        torch.set_float32_matmul_precision(self.prev)


def run_and_compare(fn, inputs, wants, mode, grad_out=None, seed=1):
    """fn(*inputs) forward and backward against the float64 reference: y and every wanted grad within
    TOL[mode]; grads not wanted stay None."""
    leaves = [None if t is None else t.detach().requires_grad_(i in wants) for i, t in enumerate(inputs)]
    with precision(mode):
        y = fn(*leaves)
        if grad_out is None:
            gen = torch.Generator().manual_seed(seed)
            grad_out = torch.randn(tuple(y.shape), generator=gen, dtype=torch.float64).to(y.dtype).to(y.device)
        if wants:
            y.backward(grad_out)
    y_ref, grads_ref = reference(inputs, grad_out, wants)
    errs = {"y": rel_err(y, y_ref)}
    for i, g_ref in zip(wants, grads_ref):
        assert leaves[i].grad is not None, f"no gradient for {NAMES[i]}"
        errs["d" + NAMES[i]] = rel_err(leaves[i].grad, g_ref)
    bad = {k: v for k, v in errs.items() if not v <= TOL[mode]}
    assert not bad, f"errors above {TOL[mode]:g}: {bad} (all: {errs})"
    for i, t in enumerate(leaves):
        if t is not None and i not in wants:
            assert t.grad is None, f"{NAMES[i]} got a gradient it did not ask for"
    return y, leaves


cuda_op = panther_cuda.sketched_linear  # the backend's op itself (panther.ops validates, then calls it)


# (T, I, O, L, k): ragged against the 64 x 64 tiles and the 32-deep steps; R = 2Lk from 2 to 300
SHAPES = [
    (1, 17, 9, 1, 1),  # one row, R = 2
    (37, 130, 70, 2, 5),  # I, O past a tile edge
    (64, 256, 200, 3, 40),  # R = 240: the widest fused H in one pass of chunks
    (130, 64, 48, 3, 50),  # R = 300: beyond the fused limit, two launches
    (200, 96, 129, 1, 64),  # O one past two tiles; the SKLinear default shape class (L = 1, k = 64)
]
SHAPE_IDS = ["T{}_I{}_O{}_L{}_k{}".format(*s) for s in SHAPES]


# ---------------------------------------------------------------------------------------------------
# GPU: the kernels against the reference


@on_gpu
@pytest.mark.parametrize("mode", list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_matches_float64_reference(shape, mode):
    run_and_compare(cuda_op, make_inputs(*shape, DTYPES[mode]), TRAINED, mode)


@on_gpu
@pytest.mark.parametrize("mode", list(DTYPES))
def test_every_gradient(mode):
    """U1s and U2s too (both halves of each weight gradient launch), with and without the bias."""
    run_and_compare(cuda_op, make_inputs(45, 70, 90, 3, 7, DTYPES[mode]), ALL, mode)
    run_and_compare(cuda_op, make_inputs(45, 70, 90, 3, 7, DTYPES[mode], bias=False), ALL[:5], mode)


@on_gpu
@pytest.mark.parametrize("wants", [(0,), (1,), (2,), (3,), (4,), (5,), (3, 4), (1, 2), ()], ids=str)
def test_each_gradient_alone(wants):
    """Every subset the backward distinguishes: each half of each weight gradient alone, dx alone, none."""
    run_and_compare(cuda_op, make_inputs(33, 50, 70, 2, 6, torch.float32), wants, "float32")


PLANS = [ForwardPlan(fused=True, o_groups=1), ForwardPlan(fused=True, o_groups=3), ForwardPlan(fused=False),
         ForwardPlan(fused=False, h_splits=3), ForwardPlan(fused=False, tiles="large"),
         ForwardPlan(fused=False, h_splits=3, tiles="large"), ForwardPlan(fused=False, h_splits=3, tiles="deep64"),
         ForwardPlan(fused=False, h_splits=2, tiles="large", h_tiles="deep64")]


@on_gpu
@pytest.mark.parametrize("mode", list(DTYPES))
@pytest.mark.parametrize("plan", PLANS, ids=str)
def test_every_forward_plan(plan, mode):
    """The fused kernel (one and several blocks per row tile, the last group short), the two launches, and
    H in shares of I (32, 32 and 26 columns; on the deeper steps 64 and 26, or 90 in one share and an empty
    one) summed by a launch of their own; 64 x 64 and 128 x 128 tiles (T = 170: two row tiles of 128, the
    second short)."""
    inputs = make_inputs(170, 90, 200, 2, 9, DTYPES[mode])
    with precision(mode):
        y, h = sketched_linear_forward(*inputs, allow_tf32=mode == "tf32", plan=plan)
    y_ref, _ = reference(inputs, None, ())
    assert rel_err(y, y_ref) <= TOL[mode]
    x, S1s, S2s, U1s, U2s, _ = (t.detach().cpu().double() if t is not None else None for t in inputs)
    from panther.backends.torch_backend.sketched_linear import concat_left

    assert rel_err(h, x @ concat_left(S1s, U2s)) <= TOL[mode]


@on_gpu
def test_forced_fused_plan_falls_back_when_r_is_wide():
    inputs = make_inputs(70, 64, 48, 3, 50, torch.bfloat16)  # R = 300
    y, _ = sketched_linear_forward(*inputs, plan=ForwardPlan(fused=True, o_groups=2))
    assert rel_err(y, reference(inputs, None, ())[0]) <= TOL["bfloat16"]


@on_gpu
@pytest.mark.parametrize("tiles", list(limits.CONFIGS))
@pytest.mark.parametrize("mode", list(DTYPES))
@pytest.mark.parametrize("split", [1, 3, 8])
def test_weight_gradients_split_over_rows(split, mode, tiles):
    """The weight gradients as shares of T summed by a third launch (3: shares of 96, 96 and 8 rows of
    200; 8: shares past T add zeros), and dH as shares of O (3: 32, 32 and 26 of 90; 8: empty ones),
    every gradient."""
    inputs = make_inputs(200, 70, 90, 2, 7, DTYPES[mode])
    g = torch.randn(200, 90, device="cuda").to(DTYPES[mode])
    allow = mode == "tf32"
    with precision(mode):
        _, h = sketched_linear_forward(*inputs, allow_tf32=allow)
        grads = sketched_linear_backward(g, inputs[0], h, *inputs[1:5], (True,) * 6, allow_tf32=allow,
                                         split=split, dh_split=split, tiles=tiles)
    _, grads_ref = reference(inputs, g, ALL)
    errs = {NAMES[i]: rel_err(got, ref) for i, (got, ref) in enumerate(zip(grads, grads_ref))}
    assert all(e <= TOL[mode] for e in errs.values()), errs


@on_gpu
@pytest.mark.parametrize("mode", list(DTYPES))
@pytest.mark.parametrize("shape", [(1030, 1000, 1030, 1, 64), (700, 136, 1032, 2, 40), (600, 520, 264, 1, 64)],
                         ids=lambda s: "T{}_I{}_O{}_L{}_k{}".format(*s))
def test_large_tiles_on_ragged_shapes(shape, mode):
    """The 128 x 128 tiles forced in both directions on ragged shapes (T, I, O off the tiles; O and I off
    8 for the scalar stores; R = 160 past one tile), against the rule's own choice."""
    inputs = make_inputs(*shape, DTYPES[mode])
    g = torch.randn(shape[0], shape[2], device="cuda").to(DTYPES[mode])
    allow = mode == "tf32"
    with precision(mode):
        y, h = sketched_linear_forward(*inputs, allow_tf32=allow, plan=ForwardPlan(fused=False, tiles="large"))
        grads = sketched_linear_backward(g, inputs[0], h, *inputs[1:5], (True,) * 6, allow_tf32=allow, tiles="large")
    y_ref, grads_ref = reference(inputs, g, ALL)
    errs = {"y": rel_err(y, y_ref)}
    errs.update({NAMES[i]: rel_err(got, ref) for i, (got, ref) in enumerate(zip(grads, grads_ref))})
    assert all(e <= TOL[mode] for e in errs.values()), errs


def spy_sm90(monkeypatch):
    """The names of the sm_90a kernels launched from now on (a list that fills)."""
    launched = []
    real = sm90_module.kernel
    monkeypatch.setattr(sm90_module, "kernel", lambda source, name, *a: launched.append(name) or real(source, name, *a))
    return launched


HOPPER_SHAPES = [  # (T, I, O, L, k, h_splits)
    (170, 90, 200, 2, 8, 1),  # R = 32, the shallowest y; I off 8: H by forward.cu; O = 200: the second tile short
    (1030, 1000, 1032, 1, 64, 1),  # R = 128, the SKLinear default; ragged T and O: every block walks several tiles
    (700, 136, 264, 2, 40, 3),  # R = 160: the 256-deep y, K zero past R; H in two column tiles, three shares of I
    (64, 64, 8, 1, 4, 1),  # R = 8, O = 8: one short row tile, one narrow column tile; k off 8: H by forward.cu
    (300, 200, 64, 1, 16, 4),  # H in four shares of I (64, 64, 64, 8 deep)
]


@on_gpu
@pytest.mark.parametrize("mode", ["bfloat16", "float16"])
@pytest.mark.parametrize("shape", HOPPER_SHAPES, ids=lambda s: "T{}_I{}_O{}_L{}_k{}_split{}".format(*s))
def test_hopper_forward(shape, mode, monkeypatch):
    """A forced hopper plan: H and y by forward_sm90.cu's wgmma kernels where the device is sm_90 and the shapes
    allow (they must have run there), else forward.cu's; H against x A, y against the float64 reference from
    the kernels' own (rounded) H."""
    T, I, O, L, k, splits = shape
    launched = spy_sm90(monkeypatch)
    inputs = make_inputs(T, I, O, L, k, DTYPES[mode])
    y, h = sketched_linear_forward(*inputs, plan=ForwardPlan(fused=False, tiles="large", h_splits=splits, hopper_h=True,
                                                                      hopper_y=True))
    expected = []
    if torch.cuda.get_device_capability() == (9, 0):
        expected = (["sketched_linear_fwd_h_sm90"] if I % 8 == 0 and k % 8 == 0 else []) + ["sketched_linear_fwd_y_sm90"]
    assert launched == expected
    x, S1s, S2s, U1s, U2s, b = (t.detach().cpu().double() for t in inputs)
    from panther.backends.torch_backend.sketched_linear import concat_left, concat_right

    assert rel_err(h, x @ concat_left(S1s, U2s)) <= TOL[mode]
    y_ref = h.double().cpu() @ concat_right(U1s, S2s) / (2 * L) + b
    assert rel_err(y, y_ref) <= TOL[mode]


@on_gpu
@pytest.mark.parametrize("mode", ["bfloat16", "float16"])
@pytest.mark.parametrize("shape", [(200, 136, 264, 1, 64, 1), (300, 96, 40, 2, 40, 3), (130, 64, 136, 3, 8, 2),
                                   (130, 90, 136, 1, 16, 1)], ids=lambda s: "T{}_I{}_O{}_L{}_k{}_split{}".format(*s))
def test_hopper_backward(shape, mode, monkeypatch):
    """The backward with hopper=True: both product launches by backward_sm90.cu's kernels where the device is sm_90
    and the shapes allow (I = 90, off 8: the second by backward.cu's; R <= 128: the second by bwd_x_fused_sm90), every
    gradient, the weight gradients and dH in shares where split; against the float64 reference."""
    T, I, O, L, k, split = shape
    launched = spy_sm90(monkeypatch)
    inputs = make_inputs(T, I, O, L, k, DTYPES[mode])
    g = torch.randn(T, O, device="cuda").to(DTYPES[mode])
    _, h = sketched_linear_forward(*inputs)
    grads = sketched_linear_backward(g, inputs[0], h, *inputs[1:5], (True,) * 6, split=split, dh_split=split,
                                     hopper=True)
    expected = []
    if torch.cuda.get_device_capability() == (9, 0):
        x_kernel = "sketched_linear_bwd_x_fused_sm90" if 2 * L * k <= 128 else "sketched_linear_bwd_x_sm90"
        expected = ["sketched_linear_bwd_g_sm90"] + ([x_kernel] if I % 8 == 0 else [])
    assert launched == expected
    _, grads_ref = reference(inputs, g, ALL)
    errs = {NAMES[i]: rel_err(got, ref) for i, (got, ref) in enumerate(zip(grads, grads_ref))}
    assert all(e <= TOL[mode] for e in errs.values()), errs


@on_gpu
def test_rule_picks_large_tiles_at_4096_rows():
    """T = 4096, I = O = 1024 (bfloat16): the forward on 128 x 128 tiles by the rule, end to end."""
    from panther_cuda.ops.sketched_linear.forward import plan_forward

    inputs = make_inputs(4096, 1024, 1024, 1, 64, torch.bfloat16)
    assert plan_forward(4096, 1024, 1024, 128, torch.bfloat16, inputs[0].device).tiles == "large"
    run_and_compare(cuda_op, inputs, ALL, "bfloat16")


@on_gpu
def test_tall_narrow_shape_takes_the_split_rule():
    run_and_compare(cuda_op, make_inputs(4096, 64, 48, 1, 8, torch.bfloat16), ALL, "bfloat16")


@on_gpu
@pytest.mark.parametrize("mode", ["bfloat16", "float32"])
def test_long_reductions_take_the_split_rule(mode):
    """Long I and O on few tiles of H: H in shares of I, dH in shares of O (the rule's own splits)."""
    from panther_cuda.ops.sketched_linear.forward import plan_forward

    inputs = make_inputs(200, 2100, 1500, 1, 16, DTYPES[mode])
    assert plan_forward(200, 2100, 1500, 32, DTYPES[mode], inputs[0].device).h_splits > 1
    run_and_compare(cuda_op, inputs, ALL, mode)


@on_gpu
@pytest.mark.parametrize("mode", ["float32", "bfloat16"])
def test_three_dim_one_dim_and_non_contiguous_x(mode):
    x, *w = make_inputs(7, 40, 24, 2, 8, DTYPES[mode], lead=(2, 3))
    run_and_compare(cuda_op, (x, *w), TRAINED, mode)  # (2, 3, 7, 40)
    run_and_compare(cuda_op, (x[0, 0, 0], *w), TRAINED, mode)  # (40,): one row
    xt = make_inputs(40, 37, 24, 2, 8, DTYPES[mode])[0].t()  # (37, 40) transposed: strides (1, 37)
    assert not xt.is_contiguous()
    run_and_compare(cuda_op, (xt, *w), TRAINED, mode)
    run_and_compare(cuda_op, (x[:, 1], *w), TRAINED, mode)  # a strided slice of the 3-D batch


@on_gpu
@pytest.mark.parametrize("mode", ["float32", "bfloat16"])
def test_sixteen_byte_loads_and_misaligned_inputs(mode):
    """Sizes that are whole 16-byte runs take the vector loads; the same inputs 2 or 4 bytes past an
    alignment take the scalar ones; both right."""
    x, *w = make_inputs(150, 64, 96, 2, 16, DTYPES[mode])
    run_and_compare(cuda_op, (x, *w), ALL, mode)
    shifted = []
    for t in (x, *w):
        buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
        view = buf[1:].view(t.shape)
        view.copy_(t)
        assert view.data_ptr() % 16 != 0
        shifted.append(view)
    run_and_compare(cuda_op, shifted, ALL, mode)


@on_gpu
def test_non_contiguous_weights():
    x, S1s, S2s, U1s, U2s, b = make_inputs(20, 30, 40, 2, 5, torch.float32)
    S1t = S1s.transpose(1, 2).contiguous().transpose(1, 2)  # same values, (L, I, k) with strides of (L, k, I)
    S2t = S2s.transpose(1, 2).contiguous().transpose(1, 2)
    b2 = torch.stack([b, b], 1)[:, 0]  # stride 2
    assert not (S1t.is_contiguous() or S2t.is_contiguous() or b2.is_contiguous())
    run_and_compare(cuda_op, (x, S1t, S2t, U1s, U2s, b2), ALL, "float32")


@on_gpu
@pytest.mark.parametrize("lead", [(0,), (2, 0)], ids=str)
def test_zero_rows(lead):
    """T = 0: an empty y, weight gradients of zero (sums over no rows), the bias gradient zero."""
    x, *w = make_inputs(1, 30, 20, 2, 4, torch.float32)
    x0 = torch.empty((*lead, 30), device="cuda").requires_grad_()
    ws = [t.detach().requires_grad_() for t in w]
    y = panther.ops.sketched_linear(x0, *ws, backend="cuda")
    assert y.shape == (*lead, 20)
    y.sum().backward()
    assert x0.grad.shape == x0.shape
    for t in ws:
        assert t.grad is not None and (t.grad == 0).all()


@on_gpu
def test_through_panther_ops_and_output_is_not_a_view():
    inputs = make_inputs(21, 40, 24, 2, 8, torch.bfloat16)
    y, leaves = run_and_compare(
        lambda *a: panther.ops.sketched_linear(*a, backend="cuda"), inputs, TRAINED, "bfloat16")
    assert y._base is None
    out = panther.ops.sketched_linear(*leaves, backend="cuda")
    torch.nn.functional.relu(out, inplace=True)  # autograd allows in-place ops on y: not a view
    out.sum().backward()


@on_gpu
def test_large_scale_values_stay_finite_and_right():
    x, *w = make_inputs(50, 64, 80, 1, 16, torch.float32)
    run_and_compare(cuda_op, (x * 1e3, *w), TRAINED, "float32")
    run_and_compare(cuda_op, (x * 1e-3, *w), TRAINED, "float32")


@on_gpu
@pytest.mark.parametrize("mode", ["float32", "bfloat16"])
def test_compile_fullgraph_equals_eager(mode):
    inputs = make_inputs(33, 48, 40, 2, 8, DTYPES[mode], lead=(2,))
    with precision(mode):
        torch._dynamo.reset()
        compiled = torch.compile(cuda_op, fullgraph=True)
        eager_leaves = [t.detach().requires_grad_() if t is not None else None for t in inputs]
        comp_leaves = [t.detach().requires_grad_() if t is not None else None for t in inputs]
        y_eager = cuda_op(*eager_leaves)
        y_comp = compiled(*comp_leaves)
        g = torch.randn_like(y_eager)
        y_eager.backward(g)
        y_comp.backward(g)
    assert torch.equal(y_eager, y_comp)
    for a, b in zip(eager_leaves, comp_leaves):
        assert torch.equal(a.grad, b.grad)


@on_gpu
def test_cuda_graph_capture_forward_and_backward():
    inputs = make_inputs(40, 48, 56, 2, 8, torch.bfloat16)
    leaves = [t.detach().requires_grad_() for t in inputs]
    static_g = torch.randn(40, 56, device="cuda", dtype=torch.bfloat16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (compiles the kernels) outside the capture
        for _ in range(2):
            for t in leaves:
                t.grad = None
            cuda_op(*leaves).backward(static_g)
    torch.cuda.current_stream().wait_stream(side)
    for t in leaves:
        t.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = cuda_op(*leaves)
        y.backward(static_g)
    with torch.no_grad():  # new inputs, replayed
        fresh = make_inputs(40, 48, 56, 2, 8, torch.bfloat16, seed=5)
        for t, f in zip(leaves, fresh):
            t.copy_(f)
    graph.replay()
    torch.cuda.synchronize()
    y_ref, grads_ref = reference(fresh, static_g, ALL)
    assert rel_err(y, y_ref) <= TOL["bfloat16"]
    for t, g_ref in zip(leaves, grads_ref):
        assert rel_err(t.grad, g_ref) <= TOL["bfloat16"]


@on_gpu
def test_runs_on_the_current_stream():
    """Launched on a side stream, the op's result is ordered after the side stream's earlier work."""
    x, *w = make_inputs(300, 256, 256, 1, 32, torch.float16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        x2 = x * 2  # ordered on `side` only
        y = cuda_op(x2, *w)
    torch.cuda.current_stream().wait_stream(side)
    y_ref, _ = reference((x * 2, *w), None, ())
    assert rel_err(y, y_ref) <= TOL["float16"]


@on_gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_device():
    """Inputs on cuda:1 while cuda:0 is current: the kernels run on cuda:1, forward and backward."""
    inputs = make_inputs(30, 40, 50, 2, 6, torch.bfloat16, device="cuda:1")
    with torch.cuda.device(0):
        y, leaves = run_and_compare(cuda_op, inputs, ALL, "bfloat16")
    assert y.device == torch.device("cuda:1")
    assert all(t.grad.device == torch.device("cuda:1") for t in leaves)


@on_gpu
def test_backend_reports_no_reasons_for_ordinary_inputs():
    from panther_cuda.backend import CudaBackend

    inputs = make_inputs(30, 40, 50, 2, 6, torch.bfloat16)
    assert CudaBackend().reasons_cannot_run("sketched_linear", *inputs) == []


# ---------------------------------------------------------------------------------------------------
# CPU: limits, launch arguments, constants, plans, fake tensors


def _meta_weights(L, I, k, O):
    return (torch.empty(L, I, k, device="meta"), torch.empty(L, k, O, device="meta"),
            torch.empty(L, k, O, device="meta"), torch.empty(L, I, k, device="meta"))


def test_limits_accept_ordinary_and_wide_inputs():
    x = torch.empty(4096, 1024, device="meta")
    assert limits.reasons(x, *_meta_weights(1, 1024, 64, 1024)) == []
    assert limits.reasons(x, *_meta_weights(4, 1024, 100, 1024)) == []  # R = 800: two launches, not refused


@pytest.mark.parametrize("L, k, O, word", [(0, 4, 8, "num_terms L"), (2, 0, 8, "low_rank k"), (2, 4, 0, "out_features O")])
def test_limits_refuse_empty_dimensions(L, k, O, word):
    x = torch.empty(5, 16, device="meta")
    (reason,) = limits.reasons(x, *_meta_weights(L, 16, k, O))
    assert word in reason and "is 0" in reason and "backend 'torch'" in reason


def test_limits_refuse_grids_past_one_axis():
    x = torch.empty(2**36, 4096, device="meta")
    (reason,) = limits.reasons(x, *_meta_weights(1, 4096, 64, 4096))
    assert "blocks in one launch" in reason and str(limits.MAX_BLOCKS) in reason


def test_backend_forwards_the_limits():
    from panther_cuda.backend import REQUIREMENTS

    op_reasons = REQUIREMENTS.op_reasons["sketched_linear"]
    assert op_reasons(torch.empty(5, 16, device="meta"), *_meta_weights(2, 16, 0, 8))


def test_host_tile_configs_match_the_kernels():
    """limits.py's TileConfig table and shared-memory sizes say what tile.cuh's Tile computes, and the
    configs the host launches are the ones forward.cu, backward.cu and the emulation instantiate."""
    text = (OP_DIR / "tile.cuh").read_text()
    for line in ("static constexpr int NT = 32 * WARPS_M * WARPS_N;", "static constexpr int PAD = 8;",
                 "static constexpr int LDA = BK + PAD;", "static constexpr int LDB = BN + PAD;",
                 "static constexpr int LDA_T = BM + PAD;", "static constexpr int LDB_T = BK + PAD;",
                 "static constexpr int STAGE_A = BM * LDA > BK * LDA_T ? BM * LDA : BK * LDA_T;",
                 "static constexpr int STAGE_B = BK * LDB > BN * LDB_T ? BK * LDB : BN * LDB_T;",
                 "static constexpr int GEMM_ELEMENTS = STAGES * (STAGE_A + STAGE_B);",
                 "static constexpr int LDC = BN + PAD;",
                 "static constexpr int SHARED_ELEMENTS = GEMM_ELEMENTS > BM * LDC ? GEMM_ELEMENTS : BM * LDC;",
                 "static constexpr int FUSED_TILE_ELEMENTS = BM * LDA + 2 * BK * LDB;",
                 "constexpr int SUM_NT = 128;", "if constexpr (W == 4) {"):
        assert line in text, line
    assert limits.SUM_THREADS == 128 and limits.SUM_RUN == 4 and limits.TileConfig.PAD == 8
    # 3 stages of A (64 x 40) and B (64 x 40 transposed, larger than 32 x 72); 4 of A and B (128 x 40 each)
    assert limits.SMALL.shared_elements() == 3 * (64 * 40 + 64 * 40)
    assert limits.LARGE.shared_elements() == 4 * (128 * 40 + 128 * 40)
    assert limits.SMALL.threads == 128 and limits.LARGE.threads == 256
    assert limits.SMALL.shared_bytes(torch.float32) == 4 * limits.SMALL.shared_elements()
    assert limits.SMALL.fused_bytes(100, torch.bfloat16) == (64 * 40 + 2 * 32 * 72 + 64 * (128 + 8)) * 2
    assert limits.SMALL.fused_bytes(256, torch.float32) == (64 * 40 + 2 * 32 * 72 + 64 * (256 + 8)) * 4
    emu = (EMU_DIR / "harness.cpp").read_text()
    for name, config in limits.CONFIGS.items():
        cpp = config.cpp
        for source in ("forward.cu", "backward.cu"):
            assert f"#define {name.upper()} {cpp}\n" in (OP_DIR / source).read_text(), (source, name)
        assert f"using {name.capitalize()} = {cpp.replace('panther::sl::', '')};" in emu, name


def test_forward_rule():
    big = 1 << 20
    # T = 4096: y's 128 x 128 tiles fill the SMs (LARGE); H on the 64-deep steps (DEEP64), its 32 tiles of 128 rows
    # in 4 shares of I (1 block per SM)
    large = ForwardPlan(fused=False, h_splits=4, tiles="large", h_tiles="deep64")
    assert forward_rule(4096, 4096, 4096, 128, torch.bfloat16, 132, big) == large
    assert forward_rule(4096, 8192, 8192, 128, torch.float16, 132, big) == large
    assert forward_rule(4096, 4096, 4096, 128, torch.float32, 132, big) == large
    # float32's DEEP64 ring (295 KiB) does not fit the 227 KiB of an H100 or H200: H on LARGE
    assert forward_rule(4096, 4096, 4096, 128, torch.float32, 132, 227 << 10) == ForwardPlan(
        fused=False, h_splits=4, tiles="large")
    # DEEP64's ring (147 KiB in 16-bit) does not fit 100 KiB: H on LARGE too, 4 shares of I
    assert forward_rule(4096, 4096, 4096, 128, torch.bfloat16, 132, 100 << 10) == ForwardPlan(
        fused=False, h_splits=4, tiles="large")
    # LARGE's float32 ring (160 KiB) does not fit 100 KiB: SMALL, 128 tiles of H in 4 shares (4 blocks per SM)
    assert forward_rule(4096, 4096, 4096, 128, torch.float32, 132, 100 << 10) == ForwardPlan(fused=False, h_splits=4)
    # small T keeps the 64 x 64 tiles: y has 64 tiles of 128 x 128, fewer than the SMs
    assert forward_rule(128, 8192, 8192, 128, torch.bfloat16, 132, big) == ForwardPlan(fused=False, h_splits=32)
    assert forward_rule(128, 1024, 1024, 128, torch.bfloat16, 132, big) == ForwardPlan(fused=False, h_splits=4)
    assert forward_rule(64, 4096, 100, 128, torch.bfloat16, 132, big) == ForwardPlan(fused=False, h_splits=16)
    # a short I: two launches, unsplit (the fused kernel is never the rule's: it is slower everywhere timed)
    assert forward_rule(4096, 256, 4096, 128, torch.bfloat16, 132, big) == ForwardPlan(fused=False, tiles="large",
                                                                                    h_tiles="deep64")
    assert forward_rule(64, 300, 4096, 128, torch.bfloat16, 132, big) == ForwardPlan(fused=False)
    assert forward_rule(64, 100, 100, 258, torch.bfloat16, 132, big) == ForwardPlan(fused=False)
    assert not any(forward_rule(T, I, 4096, R, torch.bfloat16, 132, big).fused
                   for T in (1, 64, 4096) for I in (16, 256, 4096) for R in (2, 128, 256))
    # on sm_90, H and y by the wgmma kernels where y runs on large tiles, in 16-bit; the splits and tiles as elsewhere
    assert forward_rule(4096, 4096, 4096, 128, torch.bfloat16, 132, big, hopper=True) == dataclasses.replace(
        large, hopper_h=True, hopper_y=True)
    plan = forward_rule(4096, 8192, 8192, 256, torch.float16, 132, big, hopper=True)
    assert plan.hopper_h and plan.hopper_y
    plan = forward_rule(4096, 4096, 4096, 128, torch.float32, 132, big, hopper=True)
    assert not plan.hopper_h and not plan.hopper_y
    assert forward_rule(128, 1024, 1024, 128, torch.bfloat16, 132, big, hopper=True) == ForwardPlan(fused=False,
                                                                                                 h_splits=4)
    assert not forward_rule(64, 4096, 4096, 128, torch.bfloat16, 132, big, hopper=True).hopper_h  # small tiles


def test_forward_plan_names_its_tiles():
    with pytest.raises(ValueError, match=r"tiles='huge'.*\['deep64', 'large', 'small'\]"):
        ForwardPlan(fused=False, tiles="huge")
    with pytest.raises(ValueError, match=r"h_tiles='deep'.*\['deep64', 'large', 'small'\]"):
        ForwardPlan(fused=False, tiles="large", h_tiles="deep")


def test_backward_tiles_follow_the_forward_rule(monkeypatch):
    from panther_cuda.ops.sketched_linear import backward

    monkeypatch.setattr(backward, "multiprocessors", lambda index: 132)
    monkeypatch.setattr(backward, "shared_limit", lambda device: 227 * 1024)
    cpu = torch.device("cpu", 0)
    assert backward.backward_tiles(4096, 4096, 4096, torch.bfloat16, cpu) == "large"  # 32 x 32 tiles of 128
    assert backward.backward_tiles(128, 1024, 1024, torch.bfloat16, cpu) == "small"  # 1 x 8
    assert backward.backward_tiles(512, 4096, 64, torch.bfloat16, cpu) == "small"  # 4 x 32 < 132 SMs
    assert backward.backward_tiles(512, 64, 4224, torch.bfloat16, cpu) == "large"  # 4 x 33 = 132: O counts
    monkeypatch.setattr(backward, "shared_limit", lambda device: 100 * 1024)  # LARGE's fp32 ring does not fit
    assert backward.backward_tiles(4096, 4096, 4096, torch.float32, cpu) == "small"
    assert backward.backward_tiles(4096, 4096, 4096, torch.bfloat16, cpu) == "large"


def test_backward_refuses_unknown_tiles():
    x, S1s, S2s, U1s, U2s, _ = make_inputs(4, 9, 7, 1, 3, torch.float32, device="cpu")
    with pytest.raises(ValueError, match=r"tiles='medium'"):
        sketched_linear_backward(torch.randn(4, 7), x, torch.randn(4, 6), S1s, S2s, U1s, U2s, tiles="medium", split=1,
                                 dh_split=1)


def test_half_range():
    assert half_range(True, True, 6) == (0, 12)
    assert half_range(True, False, 6) == (0, 6)
    assert half_range(False, True, 6) == (6, 6)
    assert half_range(False, False, 6) == (0, 0)


# C++ parameter types of the kernels, read from the .cu files
_SIGNATURE = re.compile(r"__global__ void __launch_bounds__\((?:C::NT[^\n]*?|SUM_NT)\) (\w+)\((.*?)\)\s*\{", re.S)


def _signatures():
    sigs = {}
    for source in ("forward.cu", "backward.cu"):
        for name, params in _SIGNATURE.findall((OP_DIR / source).read_text()):
            types = []
            for p in params.split(","):
                p = " ".join(p.split())
                types.append("ptr" if "*" in p else " ".join(p.split()[:-1]))
            sigs[name] = (source, types)
    return sigs


_NUMPY = {"long long": np.int64, "int": np.int32, "float": np.float32}


class _Recorder:
    """Stands in for the compiled kernels: records each launch and checks it against the C++ signature."""

    def __init__(self):
        self.calls = []
        self.sigs = _signatures()

    def kernel(self, source, name, dtype, exact=None, config=None):
        assert name in self.sigs and self.sigs[name][0] == source, (source, name)
        assert not exact or dtype == torch.float32
        # the kernels without products (no tiles)
        no_tiles = name in ("sketched_linear_bwd_sum", "sketched_linear_sum_shares")
        assert (exact is None) == no_tiles and (config is None) == no_tiles
        assert config is None or config in limits.CONFIGS.values()
        threads = limits.SUM_THREADS if no_tiles else config.threads

        def launch(grid, block, *args, shared_mem=0):
            types = self.sigs[name][1]
            assert len(args) == len(types), (name, len(args), len(types))
            for i, (a, t) in enumerate(zip(args, types)):
                if t == "ptr":
                    assert a is None or isinstance(a, torch.Tensor), (name, i, a)
                    assert a is None or a.is_contiguous(), (name, i)
                else:
                    assert type(a) is _NUMPY[t], (name, i, t, type(a))
            assert block == (threads,) and len(grid) == 1 and grid[0] >= 1
            self.calls.append((name, grid[0], args, shared_mem))

        return launch


@pytest.fixture
def recorder(monkeypatch):
    rec = _Recorder()
    monkeypatch.setattr(bwd_module, "kernel", rec.kernel)
    monkeypatch.setattr(common_module, "kernel", rec.kernel)  # common.launch's too
    monkeypatch.setattr(common_module, "shared_limit", lambda device: 227 << 10)  # an H100's, for forced plans
    return rec


def test_forced_plans_that_do_not_fit_the_device_fall_back(recorder, monkeypatch):
    """A forced LARGE float32 ring (160 KiB) runs on the small tiles where 100 KiB per block is all there is, a
    forced fused forward whose H does not fit on two launches; the launches' shared memory fits."""
    monkeypatch.setattr(common_module, "shared_limit", lambda device: 100 << 10)
    inputs = make_inputs(70, 90, 200, 2, 9, torch.float32, device="cpu")
    sketched_linear_forward(*inputs, plan=ForwardPlan(fused=False, tiles="large"))
    assert {s for *_, s in recorder.calls} == {limits.SMALL.shared_bytes(torch.float32)}
    recorder.calls.clear()
    monkeypatch.setattr(common_module, "shared_limit", lambda device: 64 << 10)  # the small ring's 60 KiB fit
    x, S1s, S2s, U1s, U2s, b = make_inputs(70, 90, 200, 8, 16, torch.float32, device="cpu")  # R = 256
    assert limits.SMALL.fused_bytes(256, torch.float32) > 64 << 10 >= limits.SMALL.shared_bytes(torch.float32)
    sketched_linear_forward(x, S1s, S2s, U1s, U2s, b, plan=ForwardPlan(fused=True, o_groups=2))
    assert "sketched_linear_fwd_fused" not in [n for n, *_ in recorder.calls]
    recorder.calls.clear()
    g = torch.randn(70, 200)
    h = torch.randn(70, 2 * 2 * 9)
    monkeypatch.setattr(common_module, "shared_limit", lambda device: 100 << 10)
    sketched_linear_backward(g, inputs[0], h, *inputs[1:5], tiles="large", split=2, dh_split=2)
    assert recorder.calls and all(s <= 100 << 10 for *_, s in recorder.calls)


@pytest.mark.parametrize("plan", [ForwardPlan(fused=True, o_groups=3), ForwardPlan(fused=False),
                                  ForwardPlan(fused=False, h_splits=4), ForwardPlan(fused=False, tiles="large"),
                                  ForwardPlan(fused=False, h_splits=2, tiles="large"),
                                  ForwardPlan(fused=False, h_splits=2, tiles="large", h_tiles="deep64")], ids=str)
def test_forward_launch_arguments(recorder, plan):
    x, S1s, S2s, U1s, U2s, b = make_inputs(70, 90, 200, 2, 9, torch.bfloat16, device="cpu", lead=(2,))
    xt = x.transpose(0, 1)  # (70, 2, 90) strided: passed as a contiguous copy
    y, h = sketched_linear_forward(xt, S1s, S2s, U1s, U2s, b, plan=plan)
    assert y.shape == (70, 2, 200) and y.is_contiguous() and h.shape == (140, 36)
    T, R = 140, 36
    if plan.fused:
        ((name, blocks, args, shared),) = recorder.calls
        assert name == "sketched_linear_fwd_fused" and blocks == 3 * 3  # 3 row tiles x 3 groups
        assert torch.equal(args[0].view(70, 2, 90), xt) and args[6] is y and args[7] is h
        assert [int(a) for a in args[8:14]] == [T, 90, 200, 2, 9, 3] and float(args[14]) == 0.25
        # an A and two B tiles of 64 x 32 and 32 x 64, and H's 64 rows of R rounded up to 64, all rows padded by 8
        assert shared == ((64 * 40 + 2 * 32 * 72) + 64 * (64 + 8)) * 2 == limits.SMALL.fused_bytes(R, torch.bfloat16)
    else:
        splits = plan.h_splits
        (n1, b1, a1, s1), *summed, (n2, b2, a2, s2) = recorder.calls
        # row tiles of T = 140 x column tiles of R = 36 (H) and of O = 200 (y): 3 x 1 and 3 x 4 (64 x 64 tiles),
        # 2 x 1 and 2 x 2 (128 x 128)
        tiles_h, tiles_y = (3, 12) if plan.tiles == "small" else (2, 4)
        assert (n1, b1, n2, b2) == ("sketched_linear_fwd_h", tiles_h * splits, "sketched_linear_fwd_y", tiles_y)
        assert a1[3] is h and a2[0] is h and a2[4] is y and a2[3] is b
        assert [int(a) for a in a1[5:]] == [T, 90, 2, 9, splits] and [int(a) for a in a2[5:9]] == [T, 200, 2, 9]
        assert s1 == limits.CONFIGS[plan.h_tiles or plan.tiles].shared_bytes(torch.bfloat16)
        assert s2 == limits.CONFIGS[plan.tiles].shared_bytes(torch.bfloat16)
        if splits == 1:
            assert a1[4] is None and summed == []
        else:  # H from its fp32 shares of I
            assert a1[4].shape == (splits, T, R) and a1[4].dtype == torch.float32
            ((n3, b3, a3, s3),) = summed
            assert n3 == "sketched_linear_sum_shares" and b3 == -(-T * R // (4 * limits.SUM_THREADS)) and s3 == 0
            assert a3[0] is a1[4] and a3[1] is h and [int(a3[2]), int(a3[3]), float(a3[4])] == [T * R, splits, 1.0]


@pytest.fixture
def sm90_device(recorder, monkeypatch):
    """An sm_90 device of 132 SMs and 227 KiB per block for the forward's Hopper plan; its launches recorded."""
    launches = []

    def kernel(source, name, dtype, size):  # size: fwd_y_sm90's depth, the ring kernels' stages
        def launch(grid, block, *args, shared_mem=0):
            launches.append((name, dtype, size, grid, block, args, shared_mem))

        return launch

    monkeypatch.setattr(sm90_module, "kernel", kernel)
    monkeypatch.setattr(sm90_module, "device_index", lambda device: 0)
    monkeypatch.setattr(fwd_module, "device_index", lambda device: 0)
    monkeypatch.setattr(fwd_module, "multiprocessors", lambda index: 132)
    monkeypatch.setattr(bwd_module, "multiprocessors", lambda index: 132)
    monkeypatch.setattr(sm90_module, "shared_memory_per_block", lambda index: 227 << 10)
    monkeypatch.setattr(sm90_module, "multiprocessors", lambda index: 132)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 0))
    return launches


HOPPER = ForwardPlan(fused=False, tiles="large", hopper_h=True, hopper_y=True)


def test_hopper_plan_launches_the_sm90_kernel(recorder, sm90_device):
    x, S1s, S2s, U1s, U2s, b = make_inputs(300, 90, 200, 2, 8, torch.bfloat16, device="cpu")  # R = 32
    y, h = sketched_linear_forward(x, S1s, S2s, U1s, U2s, b, plan=HOPPER)
    assert [n for n, *_ in recorder.calls] == ["sketched_linear_fwd_h"]  # H as before, y by the sm_90a kernel
    ((name, dtype, depth, grid, block, args, shared),) = sm90_device
    assert name == "sketched_linear_fwd_y_sm90" and dtype == torch.bfloat16 and depth == 32 and block == (256,)
    assert grid == (3 * 2,)  # 3 row tiles of 128 x groups = min(2 column tiles, 2 x 132 // 3)
    assert args[0] is h and args[3] is b and args[4] is y
    assert all(a.is_contiguous() for a in args[:5]) and torch.equal(args[1], U1s) and torch.equal(args[2], S2s)
    assert [type(a) for a in args[5:]] == [np.int64, np.int64, np.int32, np.int32, np.float32]
    assert [int(a) for a in args[5:9]] == [300, 200, 16, 2] and float(args[9]) == 0.25
    assert shared == (128 * 64 + 2 * 32 * 128) * 2 == sm90_module.y_shared_bytes(32, torch.bfloat16)  # H: 64 wide
    # R = 128: the 128-deep instance (96 KiB: two blocks per SM); T = 4096 in 32 row tiles, 8 groups of 4 tiles
    assert sm90_module.depth(128) == 128 and sm90_module.groups(4096, 4096, 128, torch.bfloat16, 132) == 8
    assert sm90_module.groups(4096, 4096, 256, torch.bfloat16, 132) == 4  # 192 KiB: one block per SM
    assert sm90_module.groups(64, 300, 128, torch.bfloat16, 132) == 3  # at most one per column tile


@pytest.mark.parametrize("capability", [(9, 0), (8, 0)])
def test_the_rules_run_the_sm90_kernels_on_sm90(recorder, sm90_device, monkeypatch, capability):
    """No plan given, 4096 rows in bfloat16 (large tiles): H, y and the backward's two product launches by the
    sm_90a kernels on an sm_90 device, by forward.cu's and backward.cu's elsewhere; forced tiles keep backward.cu's."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
    monkeypatch.setattr(fwd_module, "shared_memory_per_block", lambda index: 227 << 10)
    monkeypatch.setattr(bwd_module, "shared_limit", lambda device: 227 << 10)
    monkeypatch.setattr(bwd_module, "device_index", lambda device: 0)
    monkeypatch.setattr(fwd_module, "_plans", fwd_module.BoundedCache())  # plans are cached per shape and device
    x, S1s, S2s, U1s, U2s, b = make_inputs(4096, 64, 1024, 1, 64, torch.bfloat16, device="cpu")
    y, h = sketched_linear_forward(x, S1s, S2s, U1s, U2s, b)
    sketched_linear_backward(torch.randn_like(y), x, h, S1s, S2s, U1s, U2s)
    on_sm90 = capability == (9, 0)
    sm90_names = ["sketched_linear_fwd_h_sm90", "sketched_linear_fwd_y_sm90", "sketched_linear_bwd_g_sm90",
                  "sketched_linear_bwd_x_fused_sm90"]  # R = 128
    assert [n for n, *_ in sm90_device] == (sm90_names if on_sm90 else [])
    assert [n for n, *_ in recorder.calls if n != "sketched_linear_sum_shares"] == (
        ["sketched_linear_bwd_sum"] if on_sm90 else
        ["sketched_linear_fwd_h", "sketched_linear_fwd_y", "sketched_linear_bwd_g", "sketched_linear_bwd_x",
         "sketched_linear_bwd_sum"])
    recorder.calls.clear()
    sm90_device.clear()
    sketched_linear_backward(torch.randn_like(y), x, h, S1s, S2s, U1s, U2s, tiles="large")
    assert sm90_device == [] and "sketched_linear_bwd_g" in [n for n, *_ in recorder.calls]


def test_hopper_plan_launches_the_sm90_h_kernel(recorder, sm90_device):
    x, S1s, S2s, U1s, U2s, b = make_inputs(300, 96, 200, 2, 8, torch.bfloat16, device="cpu")  # I, k multiples of 8
    y, h = sketched_linear_forward(x, S1s, S2s, U1s, U2s, b, plan=dataclasses.replace(HOPPER, h_splits=3))
    (name, dtype, depth, grid, block, args, shared), (name_y, _, depth_y, *_) = sm90_device
    assert (name, name_y) == ("sketched_linear_fwd_h_sm90", "sketched_linear_fwd_y_sm90")
    assert (dtype, depth, depth_y, block) == (torch.bfloat16, 6, 32, (256,))  # nine blocks: the deep ring
    assert grid == (3 * 1 * 3,)  # row tiles of 128 x column tiles of 128 (R = 32) x shares of I
    ws = args[4]
    assert args[0].data_ptr() == x.data_ptr() and args[3] is h and ws.shape == (3, 300, 32) and ws.dtype == torch.float32
    assert [type(a) for a in args[5:]] == [np.int64, np.int64, np.int32, np.int32, np.int32]
    assert [int(a) for a in args[5:]] == [300, 96, 2, 8, 3]
    assert shared == 6 * (128 * 64 + 64 * 128) * 2 == sm90_module.ring_shared_bytes(torch.bfloat16, 6)
    ((name, _, sum_args, _),) = recorder.calls  # the shares summed into H by forward.cu's launch
    assert name == "sketched_linear_sum_shares" and sum_args[0] is ws and sum_args[1] is h


def test_ring_stages_follow_the_grid(sm90_device, monkeypatch):
    """The deep ring where every block has an SM of its own and its shared memory fits, else the shallow one; each
    launch's shared memory is its ring's."""
    assert sm90_module.RING_STAGES == (3, 6)
    assert [sm90_module.ring_stages(n, torch.bfloat16, None) for n in (1, 132, 133, 1000)] == [6, 6, 3, 3]
    assert sm90_module.ring_shared_bytes(torch.float16, 6) == 2 * sm90_module.ring_shared_bytes(torch.float16) == 196608
    monkeypatch.setattr(sm90_module, "shared_memory_per_block", lambda index: 196607)  # one byte short of six stages
    assert sm90_module.ring_stages(1, torch.bfloat16, None) == 3
    x, S1s, S2s, U1s, U2s, b = make_inputs(2000, 512, 64, 1, 64, torch.bfloat16, device="cpu")
    monkeypatch.setattr(sm90_module, "shared_memory_per_block", lambda index: 227 << 10)
    for splits, stages in ((8, 6), (16, 3)):  # 16 row tiles of H in 8 shares (128 blocks), then in 16 (256)
        sm90_device.clear()
        sketched_linear_forward(x, S1s, S2s, U1s, U2s, b, plan=dataclasses.replace(HOPPER, h_splits=splits))
        (_, _, size, grid, _, _, shared), _ = sm90_device
        assert grid == (16 * splits,) and size == stages
        assert shared == sm90_module.ring_shared_bytes(torch.bfloat16, stages)


# Why a Hopper launch falls back: the change it makes to (T, I, O, L, k) and the dtype, or to the device
UNFIT = {"sm_80": {}, "float32": {"dtype": torch.float32}, "O off 8": {2: 202}, "I off 8": {1: 90}, "k off 8": {4: 9},
         "R past 256": {3: 3, 4: 48}, "misaligned U1s": {}}


def unfit_inputs(why, shape, monkeypatch):
    """make_inputs (on the CPU) of ``shape`` changed as UNFIT[why] says."""
    change, shape = UNFIT[why], list(shape)
    if why == "sm_80":
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (8, 0))
    for i, v in change.items():
        if i != "dtype":
            shape[i] = v
    return shape, make_inputs(*shape, change.get("dtype", torch.bfloat16), device="cpu")


@pytest.mark.parametrize("why", ["sm_80", "float32", "O off 8", "k off 8", "R past 256", "misaligned U1s"])
def test_hopper_plan_falls_back_to_the_forward_y_kernel(recorder, sm90_device, monkeypatch, why):
    _, (x, S1s, S2s, U1s, U2s, b) = unfit_inputs(why, (70, 90, 200, 2, 8), monkeypatch)
    dtype = x.dtype
    if why == "misaligned U1s":
        U1s = torch.empty(U1s.numel() + 1, dtype=dtype)[1:].view_as(U1s).copy_(U1s)
    sketched_linear_forward(x, S1s, S2s, U1s, U2s, b, plan=HOPPER)
    assert sm90_device == [] and [n for n, *_ in recorder.calls] == ["sketched_linear_fwd_h", "sketched_linear_fwd_y"]


@pytest.mark.parametrize("split", [1, 3])
def test_hopper_backward_launches_the_sm90_kernels(recorder, sm90_device, split):
    """hopper=True, R = 160 (past bwd_x_fused_sm90's): the two product launches by backward_sm90.cu's kernels with the
    arguments and grids of backward.cu's on the large tiles (forced whatever tiles says), the third launch (shares) by
    backward.cu."""
    x, S1s, S2s, U1s, U2s, _ = make_inputs(300, 96, 200, 2, 40, torch.bfloat16, device="cpu")
    g, h = torch.randn(300, 200).bfloat16(), torch.randn(300, 160).bfloat16()
    grads = sketched_linear_backward(g, x, h, S1s, S2s, U1s, U2s, (True,) * 6, split=split, dh_split=1,
                                     tiles="small", hopper=True)
    hopper = [(name, grid, block, args, shared) for name, _, _, grid, block, args, shared in sm90_device]
    assert [size for _, _, size, *_ in sm90_device] == [6, 6]  # a few blocks each: the deep ring
    recorder.calls.clear()
    sketched_linear_backward(g, x, h, S1s, S2s, U1s, U2s, (True,) * 6, split=split, dh_split=1, tiles="large")
    large = [c for c in recorder.calls if c[0] in ("sketched_linear_bwd_g", "sketched_linear_bwd_x")]
    assert [n for n, *_ in hopper] == ["sketched_linear_bwd_g_sm90", "sketched_linear_bwd_x_sm90"]
    for (name, grid, block, args, shared), (name_l, blocks_l, args_l, _) in zip(hopper, large):
        assert name == name_l + "_sm90" and grid == (blocks_l,) and block == (256,)
        assert shared == sm90_module.ring_shared_bytes(torch.bfloat16, 6)
        assert len(args) == len(args_l) and all(
            type(a) is type(b) and (a == b if isinstance(a, np.generic) else (a is None) == (b is None))
            for a, b in zip(args, args_l))
    assert grads[0] is hopper[1][3][4] and grads[5] is hopper[0][3][7]  # dx, db written by the sm_90a kernels


@pytest.mark.parametrize("needs", ["111111", "100000", "010010", "100011"])
@pytest.mark.parametrize("split", [None, 2])
def test_hopper_backward_fuses_x_where_R_fits(recorder, sm90_device, monkeypatch, needs, split):
    """R <= 128: launch 2 by bwd_x_fused_sm90, one block per 128 columns of I and share of T (the rule's for its
    grid, or the forced split), its weight gradient in shares of its own; launch 3 sums each gradient's shares with
    its own count, and leaves out what its launch wrote."""
    T, I, O, L, k = 4096, 1000, 64, 1, 64  # 8 column tiles of I; launch 1: 1 tile of d[U1; S2], 32 of dH
    x, S1s, S2s, U1s, U2s, _ = make_inputs(T, I, O, L, k, torch.bfloat16, device="cpu")
    g, h = torch.randn(T, O).bfloat16(), torch.randn(T, 2 * L * k).bfloat16()
    wanted = tuple(c == "1" for c in needs)
    monkeypatch.setattr(bwd_module, "device_index", lambda device: 0)
    grads = sketched_linear_backward(g, x, h, S1s, S2s, U1s, U2s, wanted, split=split, dh_split=1, tiles="small",
                                     hopper=True)
    launches = {name: (size, grid, args, shared) for name, _, size, grid, _, args, shared in sm90_device}
    size, grid, args, shared = launches["sketched_linear_bwd_x_fused_sm90"]
    x_split = 16 if split is None else split  # 8 column tiles x 16 shares fill 132 SMs at most
    assert bwd_module.fused_x_split(T, I, 132) == 16  # each share 256 rows at least
    assert bwd_module.fused_x_split(4096, 4096, 132) == 4  # 32 column tiles: 128 blocks
    assert grid == (8 * x_split,) and size == sm90_module.FUSED_X_STAGES
    assert shared == sm90_module.fused_x_shared_bytes(torch.bfloat16) == (128 * 128 + 4 * 2 * 64 * 128 + 64 * 128) * 2
    c_lo, c_n = {"111111": (0, 128), "100000": (0, 0), "010010": (0, 128), "100011": (64, 64)}[needs]
    assert args[4] is grads[0] and args[5] is grads[1] and args[6] is grads[4]  # dx, dS1, dU2 (None where not wanted)
    ws1 = args[7]
    assert (ws1 is None) == (c_n == 0) and (ws1 is None or ws1.shape == (x_split, I, c_n))
    assert [int(a) for a in args[8:]] == [T, I, L, k, c_lo, c_n, x_split]
    sums = [c for c in recorder.calls if c[0] == "sketched_linear_bwd_sum"]
    g_split = launches["sketched_linear_bwd_g_sm90"][2][17]
    g_shares = int(g_split) > 1 and (wanted[2] or wanted[3] or wanted[5])
    if ws1 is None and not g_shares:
        assert sums == []
        return
    ((_, _, sum_args, _),) = sums
    assert sum_args[0] is ws1 and [int(a) for a in sum_args[-2:]] == [x_split, int(g_split)]
    assert int(sum_args[12]) == (c_n if ws1 is not None else 0)  # d[S1 | U2]'s columns summed here
    assert (sum_args[6] is None) == (not (g_shares and wanted[5]))  # db summed here only from shares


@pytest.mark.parametrize("why", ["sm_80", "float32", "O off 8", "I off 8", "k off 8"])
def test_hopper_backward_falls_back(recorder, sm90_device, monkeypatch, why):
    (T, I, O, L, k), (x, S1s, S2s, U1s, U2s, _) = unfit_inputs(why, (70, 96, 200, 2, 8), monkeypatch)
    g, h = torch.randn(T, O).to(x.dtype), torch.randn(T, 2 * L * k).to(x.dtype)
    sketched_linear_backward(g, x, h, S1s, S2s, U1s, U2s, (True,) * 6, split=1, dh_split=1, tiles="large", hopper=True)
    names = {n for n, *_ in sm90_device} | {n for n, *_ in recorder.calls}
    expected = {"I off 8": {"sketched_linear_bwd_g_sm90", "sketched_linear_bwd_x"},  # each launch on its own
                "O off 8": {"sketched_linear_bwd_g", "sketched_linear_bwd_x_fused_sm90"}}  # R = 32
    assert names == expected.get(why, {"sketched_linear_bwd_g", "sketched_linear_bwd_x"})


@pytest.mark.parametrize("flag", ["hopper_h", "hopper_y"])
def test_hopper_plan_is_a_plan_of_two_launches(flag):
    with pytest.raises(ValueError, match=f"{flag}=True.*plans of two launches, expected fused=False"):
        ForwardPlan(fused=True, **{flag: True})


@pytest.mark.parametrize("tiles", ["small", "large"])
@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("needs", [
    (True, True, True, False, False, True),
    (True, True, True, True, True, True),
    (False, False, True, False, False, False),
    (False, True, False, False, False, False),
    (True, False, False, False, False, False),
    (False, False, False, False, False, True),
], ids=str)
def test_backward_launch_arguments(recorder, needs, split, tiles):
    x, S1s, S2s, U1s, U2s, _ = make_inputs(70, 90, 200, 2, 9, torch.float32, device="cpu")
    g = torch.randn(70, 200)
    h = torch.randn(70, 36)
    grads = sketched_linear_backward(g, x, h, S1s, S2s, U1s, U2s, needs, allow_tf32=False, split=split,
                                     dh_split=split, tiles=tiles)
    large = tiles == "large"
    for t, need, like in zip(grads, needs, (x, S1s, S2s, U1s, U2s, g[0])):
        assert (t is None) != need and (t is None or t.shape == like.shape)
    names = [c[0] for c in recorder.calls]
    need_x, need_s1, need_s2, need_u1, need_u2, need_b = needs
    need_dh = need_x or need_s1 or need_u2
    w_lo, w_n = half_range(need_u1, need_s2, 18)
    c_lo, c_n = half_range(need_s1, need_u2, 18)
    summed = split > 1 and (w_n or c_n or need_b)
    dh_summed = split > 1 and need_dh
    assert names == (["sketched_linear_bwd_g"] + (["sketched_linear_sum_shares"] if dh_summed else [])
                     + (["sketched_linear_bwd_x"] if need_dh else [])
                     + (["sketched_linear_bwd_sum"] if summed else []))
    if dh_summed:  # dH from its fp32 shares of O, scaled by 1/(2L), before launch 2 reads it
        _, _, a, _ = recorder.calls[1]
        ws_dh = recorder.calls[0][2][18]
        assert ws_dh.shape == (split, 70, 36) and a[0] is ws_dh and a[1] is recorder.calls[0][2][4]
        assert [int(a[2]), int(a[3]), float(a[4])] == [70 * 36, split, 0.25]
        del recorder.calls[1]

    _, blocks, args, _ = recorder.calls[0]
    n_dh, lo, n, n_splits = (int(a) for a in args[14:18])
    assert int(args[19]) == split and (args[18] is None) == (not dh_summed)
    # 2 row tiles of T = 70 (1 of 128) x 1 column tile of R = 36, x shares of O
    assert n_dh == ((1 if large else 2) * split if need_dh else 0)
    assert (lo, n) == (w_lo, w_n) and n_splits == split
    # one row tile (R = 36, or db alone) x 4 column tiles of O = 200 (2 of 128)
    tiles_g = (2 if large else 4) if (w_n or need_b) else 0
    assert blocks == n_dh + tiles_g * split
    assert (args[4] is None) == (not need_dh)
    ws2 = args[8]
    rows = w_n + need_b  # db's shares as one more row
    assert (ws2 is None) == (not (split > 1 and rows)) and (ws2 is None or ws2.shape == (split, rows, 200))
    for i, j in ((5, 3), (6, 2), (7, 5)):  # dU1, dS2, db: the gradients themselves, or None
        assert args[i] is grads[j] if grads[j] is not None else args[i] is None
    if need_dh:
        _, blocks, args, _ = recorder.calls[1]
        n_dx, lo, n, n_splits = (int(a) for a in args[12:16])
        assert n_dx == ((1 if large else 2 * 2) if need_x else 0) and (lo, n) == (c_lo, c_n) and n_splits == split
        assert blocks == n_dx + (1 if large else 2) * (c_n > 0) * split  # dW: 2 row tiles of I = 90 x 1 column tile
        assert args[1] is recorder.calls[0][2][4]  # launch 2 reads the dH launch 1 wrote
        ws1 = args[7]
        assert (ws1 is None) == (not (split > 1 and c_n)) and (ws1 is None or ws1.shape == (split, 90, c_n))
        for i, j in ((4, 0), (5, 1), (6, 4)):  # dx, dS1, dU2
            assert args[i] is grads[j] if grads[j] is not None else args[i] is None
    if summed:
        _, blocks, args, _ = recorder.calls[-1]
        assert args[0] is (recorder.calls[1][2][7] if need_dh else None) and args[1] is recorder.calls[0][2][8]
        for i, j in ((2, 1), (3, 4), (4, 3), (5, 2), (6, 5)):  # dS1, dU2, dU1, dS2, db
            assert args[i] is grads[j] if grads[j] is not None else args[i] is None
        assert [int(a) for a in args[7:]] == [90, 200, 2, 9, c_lo, c_n, w_lo, w_n, split, split]
        assert blocks == -(-(90 * c_n + rows * 200) // (4 * limits.SUM_THREADS))


def test_split_rule():
    from panther_cuda.ops.sketched_linear.common import split_rule

    assert split_rule(4096, 128, 132) == 4  # 128 tiles: 512 blocks, about 4 per SM, 1024 deep each
    assert split_rule(4096, 32, 132) == 16  # at most depth / 256
    assert split_rule(65536, 12, 132) == 32  # few tiles, a long reduction: 384 blocks
    assert split_rule(2**20, 2, 132) == 64  # at most MAX_SPLIT
    assert split_rule(300, 1, 132) == 1  # too short to share
    assert split_rule(65536, 600, 132) == 1  # the tiles alone fill the SMs
    # LARGE blocks aim for 1 per SM: 32 tiles (4096 rows of 128) x 4 = 128 <= 132 blocks
    assert split_rule(4096, 32, 132, limits.LARGE) == 4
    assert split_rule(65536, 300, 132, limits.LARGE) == 1


def test_backward_of_zero_rows_zeroes_the_weight_grads(recorder):
    x, S1s, S2s, U1s, U2s, _ = make_inputs(1, 9, 7, 2, 3, torch.float32, device="cpu")
    out = [torch.full(s, 7.0) for s in ((0, 9), (2, 9, 3), (2, 3, 7), (2, 3, 7), (2, 9, 3), (7,))]
    grads = sketched_linear_backward(torch.empty(0, 7), x[:0], torch.empty(0, 12), S1s, S2s, U1s, U2s, (True,) * 6,
                                     out=out, split=1, tiles="small")
    assert recorder.calls == [] and all((t == 0).all() for t in grads)


def test_fake_tensors_give_the_real_shapes():
    """The library ops on meta tensors (torch.compile's fake path): y of x's leading shape, H (T, 2Lk),
    gradients of their inputs' shapes, empty where not wanted."""
    import panther_cuda.ops.sketched_linear.op  # noqa: F401  (registers the ops)

    x = torch.empty(3, 5, 16, device="meta")
    S1s, S2s, U1s, U2s = _meta_weights(2, 16, 4, 12)
    b = torch.empty(12, device="meta")
    y, h = torch.ops.panther_cuda.sketched_linear_fwd(x, S1s, S2s, U1s, U2s, b, True)
    assert y.shape == (3, 5, 12) and h.shape == (15, 16)
    grads = torch.ops.panther_cuda.sketched_linear_bwd(
        torch.empty(3, 5, 12, device="meta"), x, S1s, S2s, U1s, U2s, b, h, True, True, False, False, True, True, True)
    assert [tuple(t.shape) for t in grads] == [(3, 5, 16), (2, 16, 4), (0,), (0,), (2, 16, 4), (12,)]


def test_kernel_names():
    k = common_module.kernel("forward.cu", "sketched_linear_fwd_fused", torch.bfloat16, False, limits.SMALL)
    assert k.name == "panther::sl::sketched_linear_fwd_fused<__nv_bfloat16, false, panther::sl::Tile<64, 64, 32, 2, 2, 3>>"
    assert k.source == "ops/sketched_linear/forward.cu"
    assert common_module.kernel("backward.cu", "sketched_linear_bwd_x", torch.float32, True, limits.LARGE).name.endswith(
        "<float, true, panther::sl::Tile<128, 128, 32, 2, 4, 4>>")
    assert common_module.kernel("forward.cu", "sketched_linear_sum_shares", torch.float16).name.endswith("<__half>")
    k = sm90_module.kernel("forward_sm90.cu", "sketched_linear_fwd_y_sm90", torch.bfloat16, 128)
    assert (k.source, k.name, k.arch) == ("ops/sketched_linear/forward_sm90.cu",
                                          "panther::sl::sketched_linear_fwd_y_sm90<__nv_bfloat16, 128>", "sm_90a")
    k = sm90_module.kernel("backward_sm90.cu", "sketched_linear_bwd_x_sm90", torch.float16, 4)  # a ring of four stages
    assert (k.source, k.name) == ("ops/sketched_linear/backward_sm90.cu", "panther::sl::sketched_linear_bwd_x_sm90<__half, 4>")


# ---------------------------------------------------------------------------------------------------
# CPU: the kernels themselves, compiled for the host under emulation/cuda_emulation.h (sketched_linear_emulation/harness.cpp)

EMU_DIR = Path(__file__).resolve().parent / "sketched_linear_emulation"


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    """The harness binary: forward.cu and backward.cu compiled for the host (skips without a C++20
    compiler with _Float16 and <barrier>)."""
    return build_harness(tmp_path_factory.mktemp("sketched_linear_emulation"), EMU_DIR / "harness.cpp", OP_DIR)


# (mode, tiles, plan, split, T, I, O, L, k, bias, needs): tiles = limits.CONFIGS key of every kernel but the fused
# one; plan 0 = two launches, -n = H in n shares of I, n > 0 = fused with n groups per row tile; split: shares of T
# of the weight gradients (and of O of dH); needs = x S1s S2s U1s U2s bias
EMU_CASES = [
    ("float32", "small", 3, 1, 70, 90, 200, 2, 9, 1, "111111"),  # groups of 64 columns, the last one short
    ("float32", "small", 0, 1, 70, 90, 200, 2, 9, 0, "111001"),
    ("float32", "small", 1, 1, 1, 17, 9, 1, 1, 1, "111111"),  # one row, R = 2
    ("float32", "small", 1, 3, 200, 40, 30, 1, 4, 1, "111111"),  # T in three shares of 96, 96 and 8 rows
    ("tf32", "small", 3, 1, 70, 90, 200, 2, 9, 1, "111111"),
    ("tf32", "small", 0, 1, 37, 130, 70, 2, 5, 1, "001000"),  # the second half of d[U1; S2] alone
    ("tf32", "small", 0, 1, 65, 64, 48, 3, 50, 1, "100010"),  # R = 300; dx and the second half of d[S1 | U2]
    ("tf32", "small", 1, 4, 70, 20, 30, 1, 3, 1, "011000"),  # shares past T (empty): they add zeros
    ("bfloat16", "small", 2, 1, 70, 90, 200, 2, 9, 1, "111111"),
    ("bfloat16", "small", 1, 1, 64, 100, 70, 3, 40, 1, "111001"),  # R = 240, the widest fused H here
    ("bfloat16", "small", 1, 2, 130, 70, 90, 2, 5, 0, "100110"),  # shared T with only the halves U1, U2
    ("float16", "small", 4, 1, 70, 90, 200, 2, 9, 1, "111111"),
    ("float16", "small", 0, 1, 33, 50, 129, 1, 64, 0, "111111"),
    ("float16", "small", 1, 1, 65, 33, 64, 1, 3, 1, "010100"),  # first halves alone: dS1 and dU1
    ("float16", "small", 1, 1, 100, 20, 70, 1, 3, 1, "000001"),  # db alone: blocks with no rows of H
    ("bfloat16", "small", 2, 3, 150, 20, 130, 2, 3, 1, "000001"),  # db alone, in shares
    ("float32", "small", 0, 2, 190, 70, 90, 2, 40, 1, "001001"),  # dS2 (two row tiles of R) and db, in shares
    ("float16", "small", 2, 1, 40, 70, 100, 1, 64, 1, "111111"),  # R = 128: H in one pass of two column chunks
    ("tf32", "small", 1, 1, 30, 40, 50, 3, 32, 1, "110001"),  # R = 192: a pass of two chunks, then one of one
    # I, O and k multiples of 16 bytes: the 16-byte loads, their runs cut by the ragged T and tile edges
    ("bfloat16", "small", 2, 1, 130, 96, 72, 1, 16, 1, "111111"),
    ("bfloat16", "small", 0, 3, 150, 200, 40, 2, 8, 0, "111111"),
    ("float16", "small", 1, 2, 100, 56, 136, 3, 8, 1, "111111"),
    ("float32", "small", 2, 1, 70, 36, 44, 2, 4, 1, "111111"),
    ("tf32", "small", 0, 2, 90, 100, 60, 1, 12, 1, "111111"),
    # H in shares of I (plan -n), dH in shares of O (with the split of T): ragged, empty and 16-byte shares
    ("float32", "small", -3, 3, 70, 90, 100, 2, 9, 1, "111111"),  # I = 90 in 32, 32, 26; O = 100 in 64, 36, 0
    ("tf32", "small", -2, 2, 65, 130, 70, 3, 50, 1, "110011"),  # R = 300
    ("bfloat16", "small", -4, 3, 130, 96, 200, 1, 16, 1, "111111"),  # 16-byte loads, I = 96 in 32, 32, 32, 0
    ("float16", "small", -5, 2, 33, 50, 129, 1, 64, 0, "100000"),  # dx alone; shares of I past its end
    ("bfloat16", "small", -2, 3, 71, 90, 70, 1, 3, 1, "111111"),  # T R = 426, k = 3: the sums one element a thread
    # the 128 x 128 tiles of 8 warps (every kernel but the fused one, which keeps 64 x 64): R = 128 in one column
    # tile; R past one tile; 16-byte and scalar stores of the staged output; exact float32 (FFMA 8 x 8 per thread)
    ("bfloat16", "large", 0, 1, 200, 136, 264, 1, 64, 1, "111111"),  # 16-byte loads and stores, O past 256
    ("float16", "large", 0, 1, 150, 130, 129, 2, 40, 1, "111111"),  # R = 160: two column tiles; scalar stores
    ("float32", "large", 0, 3, 140, 90, 100, 2, 9, 1, "111111"),  # exact, T in shares
    ("float32", "large", -2, 1, 129, 36, 44, 2, 4, 1, "111111"),  # float32 16-byte runs of 4, H in shares of I
    ("tf32", "large", -3, 2, 140, 96, 136, 1, 64, 1, "111111"),  # H in shares of I, dH in shares of O
    ("tf32", "large", 0, 1, 65, 64, 48, 3, 50, 1, "100010"),  # R = 300: three column tiles of H
    ("bfloat16", "large", -2, 1, 130, 200, 72, 1, 16, 0, "100110"),  # the U halves alone
    # the 64-deep steps: I and T in shares cut mid-step, R past one tile, exact float32
    ("bfloat16", "deep64", -2, 2, 150, 200, 136, 1, 64, 1, "111111"),  # I = 200 in 128 and 72
    ("float32", "deep64", 0, 1, 70, 90, 100, 2, 9, 1, "111111"),  # exact, scalar loads
    ("float16", "deep64", -3, 1, 140, 300, 130, 1, 64, 1, "111111"),  # I = 300 in 128, 128 and 44
    ("tf32", "deep64", 0, 2, 65, 64, 48, 3, 50, 1, "110011"),  # R = 300: three column tiles
    ("float16", "large", 1, 2, 100, 56, 136, 3, 8, 1, "111111"),  # fused forward, then the large backward
    ("bfloat16", "large", 0, 2, 70, 20, 30, 1, 3, 1, "000001"),  # db alone, 256 threads summing g tiles
    # y by forward_sm90.cu's wgmma kernel ("sm90:G": G blocks per row tile; R and O multiples of 8): the depths
    # 32, 64, 128 and 256 (zero past R), ragged T and O, blocks walking several column tiles (two stages)
    ("bfloat16", "sm90:2", 0, 1, 200, 40, 264, 1, 16, 1, "100000"),  # R = 32; O = 264: three tiles, the last short
    ("float16", "sm90:1", 0, 1, 130, 50, 136, 3, 8, 1, "100000"),  # R = 48 in the 64-deep instance
    ("bfloat16", "sm90:3", 0, 1, 129, 64, 400, 1, 64, 1, "100000"),  # R = 128; four tiles over three groups
    ("float16", "sm90:1", -2, 1, 65, 96, 24, 2, 40, 1, "100000"),  # R = 160 in the 256-deep instance
    ("bfloat16", "sm90:1", 0, 1, 70, 32, 1024, 3, 32, 0, "000000"),  # R = 192, no bias; one block, eight tiles
    # H and the backward by the sm_90a kernels too ("sm90h:G"; I, O and k multiples of 8): the rings over I, O and
    # T, shares of I, of O (dH) and of T (weight gradients) with empty ones, R past one column tile, I shorter than
    # a step, each half of a weight gradient alone, db alone
    ("bfloat16", "sm90h:1", 0, 1, 130, 64, 136, 1, 64, 1, "111111"),
    ("float16", "sm90h:2", -3, 3, 200, 200, 264, 1, 16, 1, "111111"),  # I = 200 in shares of 128, 72 and 0
    ("bfloat16", "sm90h:1", -2, 2, 65, 24, 24, 2, 40, 1, "110011"),  # R = 160: two column tiles of H; I = 24
    ("float16", "sm90h:1", 0, 1, 300, 136, 40, 3, 8, 0, "001100"),  # three row tiles; the U1 / S2 halves alone
    ("bfloat16", "sm90h:1", 0, 2, 150, 40, 136, 1, 8, 1, "000001"),  # db alone, in shares of T
    # the deep rings ("sm90h6:G", six stages; five steps of copies in flight, four in H's with a group of products
    # running on across each barrier; more than some shares have)
    ("bfloat16", "sm90h6:1", 0, 1, 130, 64, 136, 1, 64, 1, "111111"),
    ("float16", "sm90h6:2", -3, 3, 200, 200, 264, 1, 16, 1, "111111"),  # I = 200 in shares of 128, 72 and 0
    ("bfloat16", "sm90h6:1", -2, 2, 65, 456, 24, 2, 40, 1, "110011"),  # R = 160; I = 456: eight steps, the last short
    ("float16", "sm90h6:1", 0, 2, 300, 136, 40, 3, 8, 1, "111111"),  # three row tiles, T in shares
    ("bfloat16", "sm90h6:1", 0, 1, 65, 520, 24, 1, 16, 1, "111111"),  # H's ring: nine steps, the last short, round it
    # bwd_x_fused_sm90 (R <= 128, the cases above with R = 128 and 32 too): dx alone, in shares of T, I = 136 in two
    # column tiles; both halves of d[S1 | U2] without dx, R = 16, T in three shares (launch 2 in four); the U2 half
    # alone with dx, R = 96; T = 450, eight steps round the ring of four, the last short
    ("bfloat16", "sm90h:1", 0, 2, 200, 136, 40, 1, 64, 1, "100000"),
    ("float16", "sm90h:1", 0, 3, 150, 264, 24, 1, 8, 1, "010010"),
    ("bfloat16", "sm90h:1", 0, 2, 70, 40, 24, 3, 16, 0, "100010"),
    ("float16", "sm90h:1", 0, 1, 450, 72, 16, 1, 32, 1, "110011"),
]


@pytest.mark.parametrize("landing", ["cp_at_wait", "cp_at_issue"])
@pytest.mark.parametrize("case", EMU_CASES, ids=lambda c: "{}_{}_plan{}_split{}_T{}_I{}_O{}_L{}_k{}_b{}_{}".format(*c))
def test_kernels_under_emulation(emulator, case, landing):
    """Each case with the copies landing at the wait that retires them (a stage read too early shows), then at
    their issue (a stage rewritten while still read shows): the two ends of what cp.async allows."""
    mode, *_, needs = case
    env = dict(os.environ, **({"PANTHER_EMU_CP_AT_ISSUE": "1"} if landing == "cp_at_issue" else {}))
    r = subprocess.run([str(emulator), *map(str, case)], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr
    errs = {name: float(v) for name, v in (line.split() for line in r.stdout.split("\n") if line.strip())}
    wanted = [n == "1" for n in needs]
    expected = {"H", "y"} | ({"dH"} if wanted[0] or wanted[1] or wanted[4] else set())
    expected |= {g for g, w in zip(("dx", "dS1", "dS2", "dU1", "dU2", "db"), wanted) if w}
    assert set(errs) == expected
    bad = {k: v for k, v in errs.items() if not v <= TOL[mode]}
    assert not bad, f"errors above {TOL[mode]:g}: {bad} (all: {errs})"


# ---------------------------------------------------------------------------------------------------
# tools/linear_sweep.py: what it would time (its timings need a GPU)


def _tool(name: str):
    import importlib.util

    path = OP_DIR.parents[2].parent / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sweep_tool_plans_and_floor():
    sweep = _tool("linear_sweep")
    plans = sweep.forward_plans(4096, 4096, 4096, 128, torch.bfloat16, 132, 227 << 10)
    assert plans["default"] == forward_rule(4096, 4096, 4096, 128, torch.bfloat16, 132, 227 << 10)
    assert plans["large"] == ForwardPlan(fused=False, h_splits=4, tiles="large")
    assert plans["large h_splits=2"].h_splits == 2 and plans["large h_splits=8"].h_splits == 8
    assert plans["fused"] == ForwardPlan(fused=True, o_groups=2)  # 64 row tiles x 2 groups fill 132 SMs
    # a device whose shared memory takes only the small tiles: no large plans
    assert not any("large" in n for n in sweep.forward_plans(4096, 4096, 4096, 128, torch.float32, 132, 64 << 10))
    hopper = sweep.forward_plans(4096, 4096, 4096, 128, torch.bfloat16, 132, 227 << 10, hopper=True)
    assert hopper["large hopper"] == ForwardPlan(fused=False, h_splits=4, tiles="large", hopper_h=True, hopper_y=True)
    assert hopper["default"].hopper_y and hopper["default"].hopper_h  # the rule's plan on sm_90
    assert hopper["default mma.sync"] == dataclasses.replace(hopper["default"], hopper_h=False, hopper_y=False)
    assert hopper["default hopper"].hopper_h and hopper["large h_splits=8 hopper"].h_splits == 8
    assert "fused hopper" not in hopper and "default mma.sync hopper" not in hopper
    assert not any(p.hopper_h or p.hopper_y for p in sweep.forward_plans(
        4096, 4096, 4096, 128, torch.float32, 132, 227 << 10, hopper=True).values())
    assert "default mma.sync" not in plans  # no sm_90 device
    bwd = sweep.backward_plans(4096, 4096, 4096, 128, torch.bfloat16, 132, 227 << 10)
    assert bwd["default"] == (None, None, None) and bwd["small"] == ("small", 8, 4)
    assert bwd["large"] == ("large", 4, 4) and bwd["large split=2 dh_split=2"] == ("large", 2, 2)
    # HBM floor at 4.8 TB/s: forward reads x and writes y (2 x 32 MiB), backward reads g, x and writes dx
    assert sweep.floor_ms(4096, 4096, 4096, 2, 4.8, "fwd") == pytest.approx(2 * 4096 * 4096 * 2 / 4.8e9)
    assert sweep.floor_ms(4096, 4096, 4096, 2, 4.8, "fwd+bwd") == pytest.approx(5 * 4096 * 4096 * 2 / 4.8e9)
    if not torch.cuda.is_available():
        assert sweep.main(["--out", "unused.json", "--quick"]) == 2


# ---------------------------------------------------------------------------------------------------
# tools/sm90_bounds.py: its edits of the sources (its timings need an sm_90 GPU)


def test_bounds_tool_edits_apply_to_the_sources():
    """Every edit the tool makes finds its text once in today's sources, and each variant's sources differ from the
    op's exactly where its edits say."""
    tool = _tool("sm90_bounds")
    variants = (*tool.VARIANTS, *tool.Y_VARIANTS, *tool.G_VARIANTS, *tool.X_VARIANTS)
    assert {e for v in variants for e in v} == set(tool.EDITS)
    base = tool.patched_sources((), OP_DIR)
    assert base["forward_sm90.cu"] == (OP_DIR / "forward_sm90.cu").read_text()
    for v in variants:
        files = tool.patched_sources(v, OP_DIR)
        for name in v:
            for file, old, new in tool.EDITS[name]:
                assert old not in files[file] and new in files[file]
        changed = {f for f in files if files[f] != base[f]}
        assert changed == {file for name in v for file, *_ in tool.EDITS[name]}


def test_bounds_tool_refuses_an_edit_whose_text_is_gone(monkeypatch):
    tool = _tool("sm90_bounds")
    monkeypatch.setitem(tool.EDITS, "gone", [("forward_sm90.cu", "no such line\n", "x")])
    with pytest.raises(ValueError, match="'no such line' occurs 0 times in forward_sm90.cu"):
        tool.patched_sources(("gone",), OP_DIR)


def test_bounds_tool_variant_compiles(tmp_path):
    """The forward and the backward with every edit compile with nvcc for sm_90a (the timings compile each variant by
    NVRTC)."""
    from test_sources import INCLUDE, _missing, find_nvcc

    nvcc = find_nvcc() or _missing("nvcc is not on PATH nor under CUDA_HOME, CUDA_PATH or /usr/local/cuda")
    tool = _tool("sm90_bounds")
    for source in ("forward_sm90.cu", "backward_sm90.cu"):
        path = tool.variant_source(tuple(tool.EDITS), tmp_path, source)
        cmd = [nvcc, "-std=c++17", f"-I{INCLUDE}", "-gencode", "arch=compute_90a,code=sm_90a", "-DPANTHER_NVCC_CHECK",
               "-c", str(path), "-o", str(tmp_path / f"{path.stem}.o")]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, (source, r.stderr[-4000:])
