"""torch.library registration: op checks, fake kernels, and torch.compile(fullgraph=True) without graph breaks.

On the CPU (interpreter) the ops are opaque custom ops and the compile backend is aot_eager (Dynamo,
fake tensors and AOTAutograd, everything but Inductor's code generation, which needs a GPU for Triton);
on a GPU they are triton_ops compiled by Inductor.
"""

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters
from torch._subclasses.fake_tensor import FakeTensorMode

import panther
import panther_triton
from panther_triton import _launch
from panther_triton._runtime import interpreting
from triton_test_utils import DEVICE, make_inputs, needs_kernels, rel_err

pytestmark = needs_kernels
COMPILE_BACKEND = "aot_eager" if interpreting() else "inductor"


def test_registered_as_the_right_kind_of_op():
    fwd = torch.ops.panther_triton.sketched_linear_fwd.default
    bwd = torch.ops.panther_triton.sketched_linear_bwd.default
    assert "Tensor? bias" in str(fwd._schema) and "bool allow_tf32" in str(fwd._schema)
    assert str(bwd._schema).count("bool need_") == 6
    assert _launch.INTERPRETED == interpreting()
    if not interpreting():
        from torch._library.triton import get_triton_kernels_for_op  # noqa: F401  (exists with triton_op)


def test_opcheck():
    """torch.library.opcheck: schema, fake kernel vs real (shapes, strides), autograd registration, AOT dispatch."""
    x, S1s, S2s, U1s, U2s, b = make_inputs(9, 20, 12, 2, 3, torch.float32, lead=(2,))
    args = [x.requires_grad_(), S1s.requires_grad_(), S2s.requires_grad_(), U1s, U2s, b.requires_grad_()]
    torch.library.opcheck(torch.ops.panther_triton.sketched_linear_fwd.default, (*args, False))
    y, h = torch.ops.panther_triton.sketched_linear_fwd(*args, False)
    g = torch.randn_like(y)
    for needs in [(True,) * 6, (True, False, True, False, True, False)]:
        torch.library.opcheck(
            torch.ops.panther_triton.sketched_linear_bwd.default,
            (g, x.detach(), *(t.detach() for t in (S1s, S2s, U1s, U2s, b)), h.detach(), *needs, False),
        )


def test_fake_outputs_match_real_strides():
    x, S1s, S2s, U1s, U2s, b = make_inputs(6, 20, 12, 2, 3, torch.bfloat16, lead=(2,))
    x = x.transpose(0, 1)  # non-contiguous (6, 2, 20)
    y, h = torch.ops.panther_triton.sketched_linear_fwd(x, S1s, S2s, U1s, U2s, b, True)
    g = torch.randn_like(y)
    grads = torch.ops.panther_triton.sketched_linear_bwd(g, x, S1s, S2s, U1s, U2s, b, h, *([True] * 6), True)
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        fx, fS1, fS2, fU1, fU2, fb, fg, fh = (mode.from_tensor(t) for t in (x, S1s, S2s, U1s, U2s, b, g, h))
        fy, fhh = torch.ops.panther_triton.sketched_linear_fwd(fx, fS1, fS2, fU1, fU2, fb, True)
        fgrads = torch.ops.panther_triton.sketched_linear_bwd(fg, fx, fS1, fS2, fU1, fU2, fb, fh, *([True] * 6), True)
    for real, fake in zip((y, h, *grads), (fy, fhh, *fgrads)):
        assert (real.shape, real.stride(), real.dtype) == (fake.shape, fake.stride(), fake.dtype)


class SketchedMLP(torch.nn.Module):
    """Two sketched layers with a nonlinearity between (what a user would compile)."""

    def __init__(self, dims, L, k, dtype, through_panther_ops=False):
        super().__init__()
        self.layers = torch.nn.ModuleList()
        self.through_panther_ops = through_panther_ops
        for i, (I, O) in enumerate(zip(dims[:-1], dims[1:])):
            x, S1s, S2s, U1s, U2s, b = make_inputs(1, I, O, L, k, dtype, seed=10 + i)
            layer = torch.nn.Module()
            layer.S1s, layer.S2s, layer.bias = (torch.nn.Parameter(t) for t in (S1s, S2s, b))
            layer.register_buffer("U1s", U1s)
            layer.register_buffer("U2s", U2s)
            self.layers.append(layer)

    def forward(self, x):
        for i, m in enumerate(self.layers):
            args = (x, m.S1s, m.S2s, m.U1s, m.U2s, m.bias)
            if self.through_panther_ops:
                x = panther.ops.sketched_linear(*args, backend="triton")
            else:
                x = panther_triton.sketched_linear(*args)
            if i + 1 < len(self.layers):
                x = torch.nn.functional.gelu(x)
        return x


def _grads(model, x, compiled):
    for p in model.parameters():
        p.grad = None
    x = x.detach().clone().requires_grad_()
    y = compiled(x)
    y.square().sum().backward()
    return y.detach(), [x.grad] + [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("through_panther_ops", [False, True], ids=["panther_triton", "panther.ops"])
def test_compile_fullgraph_matches_eager(through_panther_ops):
    torch._dynamo.reset()
    panther.backends.backend_infos()  # discovery happens in eager, once, under a lock
    model = SketchedMLP((40, 56, 24), L=2, k=6, dtype=torch.float32, through_panther_ops=through_panther_ops)
    x = make_inputs(3, 40, 1, 1, 1, torch.float32, lead=(2,))[0]
    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    counters.clear()
    compiled = torch.compile(model, fullgraph=True, backend=COMPILE_BACKEND)
    y_c, g_c = _grads(model, x, compiled)
    y_e, g_e = _grads(model, x, model)
    assert sum(counters["graph_break"].values()) == 0
    assert rel_err(y_c, y_e.double()) <= 1e-6
    for a, b in zip(g_c, g_e):
        assert rel_err(a, b.double()) <= 1e-6


def test_compile_with_a_new_batch_size_reuses_the_graph():
    """A symbolic batch size plans from its example value without a guard: no recompile per size."""
    torch._dynamo.reset()
    model = SketchedMLP((24, 16), L=1, k=8, dtype=torch.float32)
    compiled = torch.compile(model, fullgraph=True, backend=COMPILE_BACKEND, dynamic=True)
    counters.clear()
    for T in (5, 9, 17):
        x = make_inputs(T, 24, 1, 1, 1, torch.float32)[0]
        assert rel_err(compiled(x).detach(), model(x).detach().double()) <= 1e-6
    assert counters["stats"]["unique_graphs"] == 1
