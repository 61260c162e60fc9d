"""panther.backends.toolkit: capability reasons, the bounded cache, size helpers, and kernel_op on a
pure-torch forward/backward pair (y = scale * x W + b, residual H = x W) on the CPU."""

from typing import Optional

import pytest
import torch
import torch._dynamo
from torch import Tensor
from torch._dynamo.utils import counters
from torch._subclasses.fake_tensor import FakeTensorMode

from panther.backends import toolkit
from panther.backends.toolkit import BoundedCache, Requirements, cdiv, kernel_op, next_power_of_2, size_hint

# ------------------------------------------------------------------------------------------- reasons


def _reqs(interpreting=False, **kw):
    return Requirements(
        backend="demo", dtypes=(torch.float32, torch.bfloat16), interpreter=lambda: interpreting,
        interpreter_hint="set DEMO_INTERPRET=1", mask_dtypes=(torch.bool,), dtype_advice={torch.float64: "use backend 'torch' for float64"},
        **kw,
    )


def test_reasons_device_without_and_with_the_interpreter():
    x = torch.ones(2, 3)
    assert any("CUDA tensors" in r and "DEMO_INTERPRET=1" in r for r in _reqs().reasons("op", x))
    assert _reqs(interpreting=True).reasons("op", x, x) == []
    meta = torch.ones(2, device="meta")
    assert any("CPU tensors only" in r and "meta" in r for r in _reqs(interpreting=True).reasons("op", meta))


def test_reasons_dtypes_one_dtype_one_device():
    r = _reqs(interpreting=True)
    x = torch.ones(2, 3)
    r64 = r.reasons("op", x.double())
    assert r64 == ["dtype float64 is not supported (supported: float32, bfloat16); use backend 'torch' for float64"]
    assert r.reasons("op", x.half()) == ["dtype float16 is not supported (supported: float32, bfloat16)"]
    assert "the tensors must share one dtype, got bfloat16, float32" in r.reasons("op", x, x.bfloat16())
    assert any("one device" in m for m in r.reasons("op", x, torch.ones(1, device="meta")))
    assert r.reasons("op", x, torch.ones(2, dtype=torch.bool), None, 3) == []  # masks, None, numbers: accepted
    assert r.reasons("op", x, index=torch.ones(2, dtype=torch.int64)) == [  # keyword tensors count too
        "dtype int64 is not supported (supported: float32, bfloat16)",
        "the tensors must share one dtype, got float32, int64",
    ]


def test_per_op_limits_are_data():
    r = _reqs(
        interpreting=True,
        op_dtypes={"narrow": (torch.bfloat16,)},
        op_reasons={"shaped": lambda x, *rest: [f"x of shape {tuple(x.shape)} is empty"] if x.numel() == 0 else []},
    )
    x = torch.ones(2, 3)
    assert r.reasons("narrow", x) == ["dtype float32 is not supported (supported: bfloat16)"]
    assert r.reasons("other", x) == [] and r.reasons("shaped", x) == []
    assert r.reasons("shaped", torch.ones(0, 3)) == ["x of shape (0, 3) is empty"]


def test_unavailable_reason(monkeypatch):
    assert _reqs(interpreting=True).unavailable_reason() is None
    monkeypatch.setattr(toolkit, "cuda_capabilities", lambda: ())
    reason = _reqs().unavailable_reason()
    assert "no CUDA GPU" in reason and ">= 8.0" in reason and "DEMO_INTERPRET=1" in reason
    monkeypatch.setattr(toolkit, "cuda_capabilities", lambda: ((7, 5),))
    assert "compute capability 7.5" in _reqs().unavailable_reason() and "needs >= 8.0" in _reqs().unavailable_reason()
    assert _reqs(min_capability=(7, 0)).unavailable_reason() is None


def test_capability_reason_per_device(monkeypatch):
    """A tensor on a device of too low a capability (meta stands in for the accelerator's device type)."""
    monkeypatch.setattr(toolkit, "cuda_capabilities", lambda: ((7, 0),))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    x = torch.ones(2, device="meta")
    assert _reqs(device_type="meta").reasons("op", x) == [
        "meta has compute capability 7.0; backend 'demo' needs >= 8.0"
    ]
    assert _reqs(device_type="meta", min_capability=(7, 0)).reasons("op", x) == []


# --------------------------------------------------------------------------------------------- helpers


def test_bounded_cache_starts_over_when_full():
    cache = BoundedCache(max_entries=3)
    assert [cache.put(i, str(i)) for i in range(3)] == ["0", "1", "2"]
    cache.put(1, "one")  # an existing key does not count as new
    assert len(cache) == 3 and cache.get(1) == "one"
    cache.put(3, "3")
    assert dict(cache) == {3: "3"}
    with pytest.raises(ValueError, match="max_entries must be >= 1, got 0"):
        BoundedCache(0)


def test_sizes():
    assert [cdiv(a, 4) for a in (0, 1, 4, 5)] == [0, 1, 1, 2]
    assert [next_power_of_2(n) for n in (0, 1, 2, 3, 64, 65)] == [1, 1, 2, 4, 64, 128]
    assert size_hint(7) == 7 and type(size_hint(torch.tensor(5))) is int


def test_device_guard_on_the_cpu_is_a_no_op():
    with toolkit.device_guard(torch.ones(1)):
        pass


# ------------------------------------------------------------------------------------------- kernel_op


def _allocate(x: Tensor, w: Tensor, b: Optional[Tensor], scale: float):
    # y keeps x's leading dims over a (T, O) buffer; H is (T, O) contiguous
    T = x.numel() // x.shape[-1]
    y = x.new_empty((T, w.shape[1]))
    return y.view(*x.shape[:-1], w.shape[1]), x.new_empty((T, w.shape[1]))


calls = {"forward": 0, "backward": 0, "in_op": []}


def _forward(out, x: Tensor, w: Tensor, b: Optional[Tensor], scale: float, *, in_op: bool):
    """y = scale * x W + b."""
    calls["forward"] += 1
    calls["in_op"].append(in_op)
    y, h = out
    h.copy_(x.reshape(-1, x.shape[-1]) @ w)
    y.view(h.shape).copy_(scale * h + (b if b is not None else 0))


def _backward(grads, g, inputs, residuals, needs, *, in_op: bool):
    calls["backward"] += 1
    x, w, b, scale = inputs
    dx, dw, db = grads
    g2 = g.reshape(-1, w.shape[1])
    if needs[0]:
        dx.view(-1, w.shape[0]).copy_(scale * g2 @ w.T)
    if needs[1]:
        dw.copy_(scale * x.reshape(-1, w.shape[0]).T @ g2)
    if needs[2]:
        db.copy_(g2.sum(0))


OP = kernel_op("panther_toolkit_test::scaled_linear", forward=_forward, backward=_backward, allocate=_allocate,
               outputs=("y", "h"))


def _inputs(T=5, I=7, O=4, lead=(3,), dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, T, I, generator=g, dtype=dtype)
    w = torch.randn(I, O, generator=g, dtype=dtype)
    b = torch.randn(O, generator=g, dtype=dtype)
    return x, w, b


def _reference_and_grads(x, w, b, scale, g):
    leaves = [t.detach().double().requires_grad_() for t in (x, w, b)]
    y = scale * leaves[0] @ leaves[1] + leaves[2]
    y.backward(g.double())
    return y.detach(), [t.grad for t in leaves]


def _grads(fn, x, w, b, scale, g):
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    y = fn(*leaves, scale)
    y.backward(g)
    return y.detach(), [t.grad for t in leaves]


def test_schema_from_annotations():
    assert str(OP.fwd_op._opoverload._schema).endswith(
        "scaled_linear_fwd(Tensor x, Tensor w, Tensor? b, float scale) -> (Tensor, Tensor)"
    )
    assert "(Tensor grad_y, Tensor x, Tensor w, Tensor? b, Tensor h, bool need_x, bool need_w, bool need_b, " \
           "float scale) -> (Tensor, Tensor, Tensor)" in str(OP.bwd_op._opoverload._schema)
    with pytest.raises(TypeError, match="takes 4 arguments"):
        OP(torch.ones(2, 2), torch.ones(2, 2))


def test_eager_forward_and_gradients_match_float64():
    x, w, b = _inputs()
    g = torch.randn(3, 5, 4)
    y_ref, grads_ref = _reference_and_grads(x, w, b, 0.5, g)
    calls["in_op"].clear()
    y, grads = _grads(OP, x, w, b, 0.5, g)
    assert calls["in_op"] == [False]  # the eager Function, not the library op
    assert torch.allclose(y.double(), y_ref, atol=1e-5)
    for got, want in zip(grads, grads_ref):
        assert torch.allclose(got.double(), want, atol=1e-4)
    # the library op called directly, and the no-grad path, agree with it
    y_op, _ = OP.fwd_op(x, w, b, 0.5)
    with torch.no_grad():
        assert torch.equal(OP(x, w, b, 0.5), y_op)
    assert torch.equal(y_op, y)


def test_partial_gradients_and_no_bias():
    x, w, _ = _inputs()
    g = torch.randn(3, 5, 4)
    w_leaf = w.clone().requires_grad_()
    OP(x, w_leaf, None, 2.0).backward(g)
    assert torch.allclose(w_leaf.grad, 2.0 * x.reshape(-1, 7).T @ g.reshape(-1, 4), atol=1e-4)
    # the library op's autograd: same gradients
    w_leaf2 = w.clone().requires_grad_()
    OP.fwd_op(x, w_leaf2, None, 2.0)[0].backward(g)
    assert torch.allclose(w_leaf2.grad, w_leaf.grad, atol=1e-6)


def test_opcheck():
    x, w, b = _inputs(lead=(2,))
    x, w, b = x.requires_grad_(), w.requires_grad_(), b.requires_grad_()
    torch.library.opcheck(OP.fwd_op, (x, w, b, 0.5))
    y, h = OP.fwd_op(x, w, b, 0.5)
    g = torch.randn_like(y)
    for needs in [(True, True, True), (False, True, False)]:
        torch.library.opcheck(OP.bwd_op, (g, x.detach(), w.detach(), b.detach(), h.detach(), *needs, 0.5))


def test_fake_outputs_match_real_shapes_and_strides():
    x, w, b = _inputs(lead=(2,))
    x = x.transpose(0, 1)  # non-contiguous (5, 2, 7)
    y, h = OP.fwd_op(x, w, b, 0.5)
    g = torch.randn_like(y)
    grads = OP.bwd_op(g, x, w, b, h, True, False, True, 0.5)
    with FakeTensorMode() as mode:
        fx, fw, fb, fg, fh = (mode.from_tensor(t) for t in (x, w, b, g, h))
        fy, fhh = OP.fwd_op(fx, fw, fb, 0.5)
        fgrads = OP.bwd_op(fg, fx, fw, fb, fh, True, False, True, 0.5)
    for real, fake in zip((y, h, *grads), (fy, fhh, *fgrads)):
        assert (real.shape, real.stride(), real.dtype) == (fake.shape, fake.stride(), fake.dtype)


def _channels_last_or_contiguous(t):
    cl = t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if cl else torch.contiguous_format


def _scale_forward(out, x: Tensor, w: Tensor, *, in_op: bool):
    out[0].copy_(x * w)


def _scale_backward(grads, g, inputs, residuals, needs, *, in_op: bool):
    x, w = inputs
    if needs[0]:
        grads[0].copy_(g * w)
    if needs[1]:
        grads[1].copy_(g * x)


SCALE = kernel_op("panther_toolkit_test::scale", forward=_scale_forward, backward=_scale_backward,
                  allocate=lambda x, w: (torch.empty_like(x),), grad_formats={"x": _channels_last_or_contiguous})


def test_grad_formats_give_the_memory_format_of_a_gradient():
    """grad_formats: x's gradient in the format its function gives (channels_last here), w's contiguous, on the
    eager path, the library op and its fake alike; a name that is not a tensor argument is refused."""
    x = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    w = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    g = torch.randn(2, 3, 4, 5)
    xl, wl = x.clone().requires_grad_(), w.clone().requires_grad_()
    dx, dw = torch.autograd.grad(SCALE(xl, wl), (xl, wl), g)
    assert torch.equal(dx, g * w) and torch.equal(dw, g * x)
    assert dx.is_contiguous(memory_format=torch.channels_last) and not dx.is_contiguous() and dw.is_contiguous()
    op_grads = SCALE.bwd_op(g, x, w, True, True)
    with FakeTensorMode() as mode:
        fake = SCALE.bwd_op(*(mode.from_tensor(t) for t in (g, x, w)), True, True)
    for real, f in zip(op_grads, fake):
        assert real.stride() == f.stride()
    assert op_grads[0].stride() == dx.stride() and op_grads[1].stride() == dw.stride()
    with pytest.raises(ValueError, match=r"grad_formats names \['y'\], which are not tensor arguments"):
        kernel_op("panther_toolkit_test::scale_bad", forward=_scale_forward, backward=_scale_backward,
                  allocate=lambda x, w: (torch.empty_like(x),), grad_formats={"y": _channels_last_or_contiguous})


handed = {}  # what _handing_backward returns: {"x": tensor for dx, "w": ...}, set per test


def _handing_backward(grads, g, inputs, residuals, needs, *, in_op: bool):
    """Writes neither gradient: returns handed's tensors, made from g * w and g * x by the functions there."""
    x, w = inputs
    if "raw" in handed:
        return handed["raw"]
    return tuple(handed[n](g, x, w) if need and n in handed else None for n, need in zip("xw", needs))


HANDING = kernel_op("panther_toolkit_test::handing", forward=_scale_forward, backward=_handing_backward,
                    allocate=lambda x, w: (torch.empty_like(x),))


def _both_paths(x, w, g):
    """dx, dw by the eager Function and by the library op's backward (bwd_op)."""
    xl, wl = x.clone().requires_grad_(), w.clone().requires_grad_()
    eager = torch.autograd.grad(HANDING(xl, wl), (xl, wl), g)
    return eager, HANDING.bwd_op(g, x, w, True, True)


def test_a_backward_may_hand_back_gradients_it_computed():
    """A returned gradient of the allocated tensor's strides takes its place, uncopied; one of other strides is
    copied into the allocated (contiguous) tensor; one that shares memory with an argument is copied (an op's
    outputs may not alias its inputs); None leaves the allocated tensor, which the backward wrote."""
    x, w, g = torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4)
    kept = []

    def fresh(g, x, w):
        kept.append(g * w)
        return kept[-1]

    handed.clear()
    handed.update(x=fresh, w=lambda g, x, w: (g * x).t().contiguous().t())  # column-major: copied
    for (dx, dw), mine in zip(_both_paths(x, w, g), kept):
        assert torch.equal(dx, g * w) and torch.equal(dw, g * x)
        assert dx.data_ptr() == mine.data_ptr()  # used as it is
        assert dw.is_contiguous()
    assert len(kept) == 2
    handed.clear()
    handed.update(x=lambda g, x, w: g, w=lambda g, x, w: x)  # the arguments themselves: copied
    for dx, dw in _both_paths(x, w, g):
        assert torch.equal(dx, g) and torch.equal(dw, x)
        assert dx.data_ptr() != g.data_ptr() and dw.data_ptr() != x.data_ptr()
    torch.library.opcheck(HANDING.bwd_op, (g, x, w, True, True))


def test_a_backward_handing_back_wrong_gradients_is_refused():
    x, w, g = torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4)
    for raw, match in (((g,), r"returned 1 gradients, expected None or a sequence of 2 \(x, w\)"),
                       (g, r"returned a tensor, expected None or a sequence of 2 \(x, w\)"),
                       ((g[:2], None), r"returned for x \(2, 4\), expected a tensor of shape \(3, 4\)"),
                       ((3.0, None), r"returned for x float, expected a tensor")):
        handed.clear()
        handed["raw"] = raw
        for call in (lambda: _both_paths(x, w, g)[0], lambda: HANDING.bwd_op(g, x, w, True, True)):
            with pytest.raises(ValueError, match=r"panther_toolkit_test::handing: the backward " + match):
                call()
    handed["raw"] = (None, g)
    with pytest.raises(ValueError, match="returned a gradient of w, which was not asked for"):
        HANDING.bwd_op(g, x, w, True, False)
    with pytest.raises(ValueError, match="returned a gradient of w, which was not asked for"):
        xl = x.clone().requires_grad_()
        torch.autograd.grad(HANDING(xl, w), xl, g)  # the eager path
    handed.clear()


def test_handed_back_gradients_that_alias_or_differ_are_copied():
    """One tensor returned for both gradients: the second is a copy (outputs may not alias each other); one of
    another dtype is copied (cast) into the allocated tensor."""
    x, w, g = torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4)
    shared = g * 2
    handed.clear()
    handed.update(x=lambda *_: shared, w=lambda *_: shared)
    for dx, dw in _both_paths(x, w, g):
        assert torch.equal(dx, shared) and torch.equal(dw, shared)
        assert dx.data_ptr() != dw.data_ptr()
    handed.clear()
    handed.update(x=lambda g, x, w: (g * w).double())
    for dx, dw in _both_paths(x, w, g):
        assert dx.dtype == torch.float32 and torch.equal(dx, (g * w).double().float())
    handed.clear()


def test_handed_back_gradients_under_compile_with_triton_op():
    """torch.compile traces the body of a triton_op, where storages cannot be compared: the handed-back
    gradients are copied there, with the eager results."""
    op = kernel_op("panther_toolkit_test::handing_traced", forward=_scale_forward, backward=_handing_backward,
                   allocate=lambda x, w: (torch.empty_like(x),), factory=torch.library.triton_op)
    x, w, g = torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4)
    handed.clear()
    handed.update(x=lambda g, x, w: g * w, w=lambda g, x, w: g * x)
    torch._dynamo.reset()
    fn = torch.compile(lambda x, w: op(x, w), fullgraph=True, backend="aot_eager")
    xl, wl = x.clone().requires_grad_(), w.clone().requires_grad_()
    dx, dw = torch.autograd.grad(fn(xl, wl), (xl, wl), g)
    assert torch.equal(dx, g * w) and torch.equal(dw, g * x)
    handed.clear()


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        x, w, b = _inputs(I=6, O=6)
        self.w, self.b = torch.nn.Parameter(w), torch.nn.Parameter(b)

    def forward(self, x):
        return OP(torch.relu(OP(x, self.w, self.b, 0.5)), self.w, None, 2.0)


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    model = _Model()
    x = torch.randn(4, 3, 6)
    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    counters.clear()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (compiled, model):
        for p in model.parameters():
            p.grad = None
        xl = x.clone().requires_grad_()
        calls["in_op"].clear()
        y = fn(xl)
        y.square().sum().backward()
        results.append((y.detach(), xl.grad, [p.grad.clone() for p in model.parameters()], list(calls["in_op"])))
    (y_c, dx_c, dp_c, in_op_c), (y_e, dx_e, dp_e, in_op_e) = results
    assert sum(counters["graph_break"].values()) == 0
    assert in_op_c and all(in_op_c) and in_op_e == [False, False]  # compiled: the library ops; eager: not
    assert torch.allclose(y_c, y_e, atol=1e-6) and torch.allclose(dx_c, dx_e, atol=1e-6)
    for a, b in zip(dp_c, dp_e):
        assert torch.allclose(a, b, atol=1e-5)


def test_double_backward_is_refused_on_both_paths():
    x, w, b = _inputs()
    for call, match in ((OP, "once_differentiable"), (lambda *a: OP.fwd_op(*a)[0], "second-order gradients")):
        xl = x.clone().requires_grad_()
        y = call(xl, w, b, 0.5)
        (gx,) = torch.autograd.grad(y.square().sum(), xl, create_graph=True)
        with pytest.raises(RuntimeError, match=match):
            gx.sum().backward()


def test_unsupported_annotation_is_named():
    def fwd(out, x: Tensor, n: str, *, in_op):
        pass

    with pytest.raises(TypeError, match="unsupported argument annotation"):
        kernel_op("panther_toolkit_test::bad", forward=fwd, backward=_backward, allocate=_allocate)
    with pytest.raises(ValueError, match="name must be 'namespace::op', got 'bad'"):
        kernel_op("bad", forward=_forward, backward=_backward, allocate=_allocate)
