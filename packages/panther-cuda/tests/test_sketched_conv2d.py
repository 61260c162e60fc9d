"""The sketched conv2d kernels of the cuda backend against the float64 reference: forward and every gradient.

GPU tests (marked `gpu`) compare each dtype with the torch backend's op run in float64 on the same
(rounded) inputs, as max-normalised errors. The shapes are ragged (channels, H, W and 2·L·k off every tile
size; several pixel blocks with a partial last one; O over one and over several epilogue tiles) and each
on-chip width of the fused forward (RP = 16, 32, 64, 128, 192, 256) and of the rank kernel (16, 32, 64)
runs at least once. CPU tests check the limits and the allocation rules (fake kernels, on meta tensors).
"""

from __future__ import annotations

import re
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

from panther.backends.torch_backend.sketched_conv2d import sketched_conv2d as reference_op
from panther_cuda.ops.sketched_conv2d import backward, forward, limits
from panther_cuda.ops.sketched_conv2d.forward import RANK_TILES, fwd_shared_bytes, rank_tile

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Max-normalised error bounds against float64 math on the same rounded inputs: a few roundings of Z, y
# (and dZ, the gradients) to the storage dtype; u/2 = 2^-9 (bf16), 2^-11 (fp16, tf32 operands). A wrong
# index or mask errs by O(1).
TOL = {torch.float32: 1e-4, torch.float16: 8e-3, torch.bfloat16: 3e-2}
TOL_TF32 = 8e-3
GRADS = ("x", "S1s", "U1s", "bias")


def cuda_sketched_conv2d(*args):
    from panther_cuda import sketched_conv2d

    return sketched_conv2d(*args)


# (N, C, H, W, O, terms = 2L, k, (kh, kw), stride, padding, dilation)
CASES = {
    "3x3_R6": (2, 3, 9, 11, 5, 2, 3, (3, 3), (1, 1), (1, 1), (1, 1)),
    "1x1_N1_R20": (1, 5, 8, 7, 10, 2, 10, (1, 1), (1, 1), (0, 0), (1, 1)),
    "5x5_pad2_R48": (2, 4, 13, 12, 7, 2, 24, (5, 5), (1, 1), (2, 2), (1, 1)),
    "stride2_R6": (3, 6, 11, 10, 9, 2, 3, (3, 3), (2, 2), (1, 1), (1, 1)),
    "dilation2_pad2": (2, 5, 12, 13, 6, 2, 5, (3, 3), (1, 1), (2, 2), (2, 2)),
    "mixed_pairs_R66_O70": (1, 17, 7, 9, 70, 6, 11, (3, 2), (2, 1), (0, 1), (1, 2)),
    "deep_R192_O130": (2, 64, 10, 9, 130, 8, 24, (3, 3), (1, 1), (1, 1), (1, 1)),
    "R256": (1, 3, 6, 6, 4, 4, 64, (3, 3), (1, 1), (1, 1), (1, 1)),
}


def make_inputs(N, C, H, W, O, terms, k, ks, dtype, device="cuda", bias=True, seed=0):
    """x ~ N(0, 1); S1s ~ N(0, 1/(C kh kw)); U1s = ±1/sqrt(k) (as SKConv2d's); bias ~ N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    kh, kw = ks

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)

    x = rnd(N, C, H, W)
    S1s = rnd(terms, k, C, kh, kw, scale=(C * kh * kw) ** -0.5)
    U1s = ((torch.randint(0, 2, (terms, k, O), generator=g) * 2 - 1) * k**-0.5).to(dtype).to(device)
    b = rnd(O) if bias else None
    return x, S1s, U1s, b


def reference(inputs, conv, grad_out, wants):
    """float64 forward and the gradients of the inputs named by ``wants`` (the torch backend's op)."""
    ins = [None if t is None else t.detach().cpu().double().requires_grad_(n in wants)
           for n, t in zip(GRADS, inputs)]
    y = reference_op(*ins, *conv)
    if wants:
        y.backward(grad_out.detach().cpu().double())
    return y.detach(), {n: ins[GRADS.index(n)].grad for n in wants}


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    assert got.shape == ref.shape, (tuple(got.shape), tuple(ref.shape))
    got = got.detach().cpu().double()
    assert torch.isfinite(got).all(), "non-finite values"
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def run_and_compare(inputs, conv, wants, tol, grad_out=None, seed=1):
    """Run the cuda op forward and backward; assert y and the wanted gradients match the reference."""
    leaves = [None if t is None else t.detach().requires_grad_(n in wants) for n, t in zip(GRADS, inputs)]
    y = cuda_sketched_conv2d(*leaves, *conv)
    if grad_out is None:
        gen = torch.Generator().manual_seed(seed)
        grad_out = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y.dtype).to(y.device)
    if wants:
        y.backward(grad_out)
    y_ref, grads_ref = reference(inputs, conv, grad_out, wants)
    errs = {"y": rel_err(y, y_ref)}
    for n in wants:
        leaf = leaves[GRADS.index(n)]
        assert leaf.grad is not None, f"no gradient for {n}"
        errs["d" + n] = rel_err(leaf.grad, grads_ref[n])
    bad = {k: v for k, v in errs.items() if not v <= tol}
    assert not bad, f"errors above {tol:g}: {bad} (all: {errs})"
    for n, t in zip(GRADS, leaves):
        if t is not None and n not in wants:
            assert t.grad is None
    return y, leaves


def _matmul_precision(precision):
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    yield
    torch.set_float32_matmul_precision(prev)


@pytest.fixture
def ieee_float32():
    """float32 at full precision (exact FFMA kernels, cuDNN without TF32)."""
    yield from _matmul_precision("highest")


@pytest.fixture
def tf32():
    """float32 products on tensor cores as TF32."""
    yield from _matmul_precision("high")


def _case(name, dtype, **kw):
    N, C, H, W, O, terms, k, ks, stride, padding, dilation = CASES[name]
    return make_inputs(N, C, H, W, O, terms, k, ks, dtype, **kw), (stride, padding, dilation)


# --- GPU: values ----------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_matches_float64_reference(name, dtype, ieee_float32):
    inputs, conv = _case(name, dtype)
    run_and_compare(inputs, conv, GRADS, TOL[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["3x3_R6", "mixed_pairs_R66_O70", "deep_R192_O130"])
def test_float32_as_tf32(name, tf32):
    """At matmul precision "high" float32 runs on tensor cores as TF32 (within TF32's bound)."""
    inputs, conv = _case(name, torch.float32)
    run_and_compare(inputs, conv, GRADS, TOL_TF32)


@pytest.mark.gpu
def test_exact_float32_is_not_tf32(ieee_float32):
    """At "highest" the float32 forward is exact FFMA: far inside what TF32 rounding would give."""
    inputs, conv = _case("deep_R192_O130", torch.float32)
    y = cuda_sketched_conv2d(*inputs, *conv)
    y_ref, _ = reference(inputs, conv, None, ())
    assert rel_err(y, y_ref) < 2e-5


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["3x3_R6", "stride2_R6", "mixed_pairs_R66_O70"])
def test_channels_last_in_and_out(name, dtype, ieee_float32):
    inputs, conv = _case(name, dtype)
    x = inputs[0].contiguous(memory_format=torch.channels_last)
    y, leaves = run_and_compare((x, *inputs[1:]), conv, GRADS, TOL[dtype])
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    assert leaves[0].grad.shape == x.shape


@pytest.mark.gpu
@pytest.mark.parametrize("x_channels_last", [False, True], ids=["x_nchw", "x_channels_last"])
def test_grad_in_the_other_memory_format(x_channels_last, ieee_float32):
    """The backward reads the incoming gradient by its strides, whatever x's layout."""
    inputs, conv = _case("stride2_R6", torch.float32)
    x = inputs[0].contiguous(memory_format=torch.channels_last) if x_channels_last else inputs[0]
    y = cuda_sketched_conv2d(*inputs, *conv)
    gen = torch.Generator().manual_seed(3)
    grad_out = torch.randn(y.shape, generator=gen, dtype=torch.float64).float().cuda().contiguous(
        memory_format=torch.contiguous_format if x_channels_last else torch.channels_last)
    run_and_compare((x, *inputs[1:]), conv, GRADS, TOL[torch.float32], grad_out=grad_out)


@pytest.mark.gpu
def test_strided_input(ieee_float32):
    """x as a view with gaps in every dimension (the kernels read it by its strides)."""
    (x, S1s, U1s, b), conv = _case("3x3_R6", torch.float32)
    big = torch.randn(x.shape[0] * 2, x.shape[1] + 2, x.shape[2] * 2, x.shape[3] + 3, device="cuda")
    view = big[::2, 1:-1, ::2, 2:-1]
    view.copy_(x)
    assert view.shape == x.shape and not view.is_contiguous()
    run_and_compare((view, S1s, U1s, b), conv, GRADS, TOL[torch.float32])


@pytest.mark.gpu
def test_noncontiguous_weights(ieee_float32):
    (x, S1s, U1s, b), conv = _case("5x5_pad2_R48", torch.float32)
    S1s_t = S1s.transpose(0, 1).contiguous().transpose(0, 1)
    U1s_t = U1s.transpose(1, 2).contiguous().transpose(1, 2)
    assert not S1s_t.is_contiguous() and not U1s_t.is_contiguous()
    run_and_compare((x, S1s_t, U1s_t, b), conv, GRADS, TOL[torch.float32])


@pytest.mark.gpu
@pytest.mark.parametrize("wants", [("x",), ("S1s",), ("U1s",), ("bias",), ("x", "S1s", "bias")], ids="-".join)
def test_partial_requires_grad(wants, ieee_float32):
    """Only the gradients asked for (SKConv2d trains x's producer, S1s and bias; U1s is a buffer)."""
    inputs, conv = _case("mixed_pairs_R66_O70", torch.float32)
    run_and_compare(inputs, conv, wants, TOL[torch.float32])


@pytest.mark.gpu
def test_no_bias(ieee_float32):
    inputs, conv = _case("stride2_R6", torch.float32, bias=False)
    run_and_compare(inputs, conv, ("x", "S1s", "U1s"), TOL[torch.float32])


@pytest.mark.gpu
def test_expanded_grad_output(ieee_float32):
    """y.sum().backward() hands the backward a grad of zero strides."""
    inputs, conv = _case("3x3_R6", torch.float32)
    y = cuda_sketched_conv2d(*inputs, *conv)
    grad_out = torch.ones((), device=y.device).expand(y.shape)
    assert grad_out.stride() == (0, 0, 0, 0)
    run_and_compare(inputs, conv, GRADS, TOL[torch.float32], grad_out=grad_out)
    leaves = [t.detach().requires_grad_(True) for t in inputs]
    cuda_sketched_conv2d(*leaves, *conv).sum().backward()
    _, grads = reference(inputs, conv, grad_out, GRADS)
    for n, leaf in zip(GRADS, leaves):
        assert rel_err(leaf.grad, grads[n]) < TOL[torch.float32], n


@pytest.mark.gpu
def test_empty_batch():
    (x, S1s, U1s, b), conv = _case("3x3_R6", torch.float32)
    x = x[:0].detach().requires_grad_(True)
    leaves = [t.detach().requires_grad_(True) for t in (S1s, U1s, b)]
    y = cuda_sketched_conv2d(x, *leaves, *conv)
    assert y.shape == (0, 5, 9, 11)
    y.sum().backward()
    assert x.grad.shape == x.shape
    for t in leaves:
        assert torch.equal(t.grad, torch.zeros_like(t))


@pytest.mark.gpu
def test_inference_without_autograd(ieee_float32):
    inputs, conv = _case("1x1_N1_R20", torch.float32)
    with torch.no_grad():
        y = cuda_sketched_conv2d(*inputs, *conv)
    y_ref, _ = reference(inputs, conv, None, ())
    assert rel_err(y, y_ref) < TOL[torch.float32]


@pytest.mark.gpu
def test_through_panther_ops_same_padding(ieee_float32):
    """panther.ops dispatches to the backend (padding='same' resolved there, uneven part padded)."""
    import panther.ops

    (x, S1s, U1s, b), _ = _case("3x3_R6", torch.float32)
    S1s = S1s[:, :, :, :2]  # a 2x3 kernel: 'same' pads unevenly along H
    y = panther.ops.sketched_conv2d(x, S1s, U1s, b, padding="same", backend="cuda")
    y_ref = panther.ops.sketched_conv2d(x.cpu().double(), S1s.cpu().double(), U1s.cpu().double(),
                                        b.cpu().double(), padding="same", backend="torch")
    assert y.shape == x.shape[:1] + (5,) + x.shape[2:]
    assert rel_err(y, y_ref) < TOL[torch.float32]


# --- GPU: torch.compile and CUDA graphs -------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_compile_fullgraph_equals_eager(channels_last):
    torch._dynamo.reset()
    (x, S1s, U1s, b), conv = _case("stride2_R6", torch.bfloat16)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def step(x, S1s, U1s, b):
        return cuda_sketched_conv2d(x, S1s, U1s, b, *conv)

    def run(fn):
        leaves = [t.detach().requires_grad_(True) for t in (x, S1s, U1s, b)]
        y = fn(*leaves)
        (y.float() ** 2).sum().backward()
        return y, [t.grad for t in leaves]

    y_e, g_e = run(step)
    y_c, g_c = run(torch.compile(step, fullgraph=True))
    assert torch.equal(y_c, y_e)
    assert y_c.stride() == y_e.stride()
    for a, e in zip(g_c, g_e):  # cuDNN's weight gradient may sum in another order from run to run
        torch.testing.assert_close(a, e)


@pytest.mark.gpu
def test_cuda_graph_capture_forward_backward(ieee_float32):
    (x, S1s, U1s, b), conv = _case("mixed_pairs_R66_O70", torch.float32)
    leaves = [t.detach().requires_grad_(True) for t in (x, S1s, U1s, b)]
    grad_out = torch.randn(cuda_sketched_conv2d(x, S1s, U1s, b, *conv).shape, device="cuda")

    def step():
        for t in leaves:
            t.grad = None
        cuda_sketched_conv2d(*leaves, *conv).backward(grad_out)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # compiles the kernels and warms cuDNN outside the capture
            step()
    torch.cuda.current_stream().wait_stream(stream)
    eager = [t.grad.clone() for t in leaves]
    for t in leaves:  # grads the graph accumulates into, allocated from its pool on first replay
        t.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = cuda_sketched_conv2d(*leaves, *conv)
        y.backward(grad_out)
    for t in leaves:
        t.grad.zero_()
    graph.replay()
    torch.cuda.synchronize()
    for t, e in zip(leaves, eager):  # cuDNN's weight gradient may sum in another order from run to run
        torch.testing.assert_close(t.grad, e)
    with torch.no_grad():
        torch.testing.assert_close(y, cuda_sketched_conv2d(x, S1s, U1s, b, *conv), rtol=0, atol=0)


# --- CPU: limits and allocation -----------------------------------------------------------------------------


def _meta(*shape):
    return torch.empty(shape, device="meta")


def test_limits_accept_rank_up_to_256():
    x = _meta(2, 3, 8, 8)
    assert limits.reasons(x, _meta(4, 64, 3, 3, 3), _meta(4, 64, 10), None, (1, 1), (1, 1), (1, 1)) == []
    assert limits.reasons(x, _meta(2, 1, 3, 1, 1), _meta(2, 1, 10), None) == []


def test_limits_refuse_rank_above_256_with_the_reason():
    x = _meta(2, 3, 8, 8)
    reasons = limits.reasons(x, _meta(6, 43, 3, 3, 3), _meta(6, 43, 10), None, (1, 1), (1, 1), (1, 1))
    assert len(reasons) == 1
    assert "2·L·k = 258" in reasons[0] and "<= 256" in reasons[0] and "(6, 43, 3, 3, 3)" in reasons[0]
    assert "backend 'torch'" in reasons[0]


def test_limits_refuse_im2col_depth_beyond_int32():
    S1s = torch.empty(2, 1, 2**27, 3, 3, device="meta")
    reasons = limits.reasons(_meta(1, 2**27, 3, 3), S1s, _meta(2, 1, 4))
    assert len(reasons) == 1 and "in_channels·kh·kw <= 2**30" in reasons[0] and str(2**27 * 9) in reasons[0]
    assert limits.reasons(_meta(1, 2**28, 3, 3), torch.empty(2, 1, 2**28, 2, 2, device="meta"), _meta(2, 1, 4)) == []


def test_backend_reports_the_limit():
    from panther_cuda.backend import REQUIREMENTS

    x = _meta(2, 3, 8, 8)
    reasons = REQUIREMENTS.op_reasons["sketched_conv2d"](x, _meta(2, 200, 3, 3, 3), _meta(2, 200, 7), None)
    assert any("2·L·k = 400" in r for r in reasons)


def test_rank_tiles_cover_the_limit_and_fit_shared_memory():
    """Every R the limits accept has an on-chip width; every width fits 99 KiB (sm_86/89 opt-in)."""
    assert RANK_TILES[-1] == limits.MAX_RANK
    assert [rank_tile(r) for r in (1, 16, 17, 32, 33, 64, 65, 128, 129, 192, 193, 256)] == [
        16, 16, 32, 32, 64, 64, 128, 128, 192, 192, 256, 256]
    for dtype in DTYPES:
        for rp in RANK_TILES:
            assert fwd_shared_bytes(dtype, rp) <= 99 * 1024, (dtype, rp)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_fake_kernels_give_shapes_and_layouts(channels_last):
    """The library ops on meta tensors (their fake kernels): torch.compile sees these shapes and strides."""
    from panther_cuda.ops.sketched_conv2d.op import SKETCHED_CONV2D  # noqa: F401 (registers the ops)

    x = _meta(2, 5, 12, 13)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    S1s, U1s, b = _meta(2, 3, 5, 3, 2), _meta(2, 3, 7), _meta(7)
    (y,) = torch.ops.panther_cuda.sketched_conv2d_fwd(x, S1s, U1s, b, 2, 1, 1, 0, 1, 2, True)
    assert y.shape == (2, 7, 6, 11)  # (12 + 2 - 2 - 1) // 2 + 1, (13 - 2 - 1) // 1 + 1
    expected = torch.empty(2, 7, 6, 11).contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert y.stride() == expected.stride()
    grads = torch.ops.panther_cuda.sketched_conv2d_bwd(y, x, S1s, U1s, b, True, True, False, True,
                                                       2, 1, 1, 0, 1, 2, True)
    assert [tuple(t.shape) for t in grads] == [tuple(x.shape), tuple(S1s.shape), (0,), (7,)]


# --- CPU: the launchers pass what the kernels declare ----------------------------------------------------------

_KERNEL_TYPES = {"int": np.int32, "long long": np.int64, "float": np.float32}


def _declared_parameters(kernel: str):
    """Parameter types of a __global__ function of sketched_conv2d.cu: 'ptr' or the scalar's NumPy type."""
    source = (Path(forward.__file__).parent / "sketched_conv2d.cu").read_text()
    params = re.search(rf"\n{kernel}\((.*?)\)\s*{{", source, re.S).group(1)
    out = []
    for p in params.split(","):
        p = " ".join(p.split()).replace("__restrict__", "").strip()
        if "*" in p:
            out.append("ptr")
        else:
            out.append(_KERNEL_TYPES[p.rsplit(" ", 1)[0].strip()])
    return out


class _Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, kernel, grid, block, *args, shared_mem=0):
        self.calls.append((kernel.name, tuple(grid), tuple(block), args, shared_mem))


def _check_arguments(call, kernel):
    name, grid, block, args, shared = call
    declared = _declared_parameters(kernel)
    assert len(args) == len(declared), (name, len(args), len(declared))
    for i, (a, want) in enumerate(zip(args, declared)):
        if want == "ptr":
            assert a is None or isinstance(a, torch.Tensor), (name, i, a)
        else:
            assert type(a) is want, (name, i, type(a), want)
    assert block == (forward.THREADS,) and shared > 0


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_launchers_pass_the_declared_arguments(channels_last):
    """On the CPU with the launch recorded: argument count and widths as sketched_conv2d.cu declares them,
    the grids, output strides in the kernels' arguments; the backward's every path runs."""
    (x, S1s, U1s, b), conv = _case("mixed_pairs_R66_O70", torch.float32, device="cpu")
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    rec = _Recorder()
    with mock.patch.object(forward.Kernel, "__call__", lambda self, *a, **k: rec(self, *a, **k)):
        (y,) = forward.forward_outputs(x, S1s, U1s, b, 2, 1, 0, 1, 1, 2, True)
        forward.sketched_conv2d_forward(y, x, S1s, U1s, b, *conv, True)
        grads = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in (x, S1s, U1s, b)]
        backward.sketched_conv2d_backward(grads, torch.randn(y.shape), x, S1s, U1s, *conv, (True,) * 4, True)
    (fwd_call, dz_call, z_call) = rec.calls
    M = y.shape[0] * y.shape[2] * y.shape[3]
    assert fwd_call[0] == "panther::sketched_conv2d_fwd<float, 128, false>" and fwd_call[1] == (-(-M // 64),)
    _check_arguments(fwd_call, "sketched_conv2d_fwd")
    assert tuple(int(s) for s in fwd_call[3][-9:-1]) == (*x.stride(), *y.stride())
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    for call in (dz_call, z_call):
        assert call[0] == "panther::conv_rank<float, 64, false>" and call[1] == (-(-M // 64), 2)
        _check_arguments(call, "conv_rank")
    Ho, Wo = y.shape[2:]
    assert (Ho, Wo) == torch.nn.functional.conv2d(x, S1s[0], None, *conv).shape[2:]
    assert [int(a) for a in dz_call[3][3:16]] == [70, Ho, Wo, Ho, Wo, 1, 1, 1, 1, 0, 0, 1, 1]  # g: a 1x1 conv
    assert [int(a) for a in z_call[3][3:16]] == [17, 7, 9, Ho, Wo, 3, 2, 2, 1, 0, 1, 1, 2]
    assert float(dz_call[3][-1]) == pytest.approx(1 / 6) and float(z_call[3][-1]) == 1.0


def test_exact_float32_selects_the_ffma_kernels():
    (x, S1s, U1s, b), conv = _case("3x3_R6", torch.float32, device="cpu")
    rec = _Recorder()
    with mock.patch.object(forward.Kernel, "__call__", lambda self, *a, **k: rec(self, *a, **k)):
        for allow_tf32 in (False, True):
            (y,) = forward.forward_outputs(x, S1s, U1s, b, 1, 1, 1, 1, 1, 1, allow_tf32)
            forward.sketched_conv2d_forward(y, x, S1s, U1s, b, *conv, allow_tf32)
        (y,) = forward.forward_outputs(x.half(), S1s.half(), U1s.half(), None, 1, 1, 1, 1, 1, 1, False)
        forward.sketched_conv2d_forward(y, x.half(), S1s.half(), U1s.half(), None, *conv, False)
    assert [c[0] for c in rec.calls] == [
        "panther::sketched_conv2d_fwd<float, 16, true>",
        "panther::sketched_conv2d_fwd<float, 16, false>",
        "panther::sketched_conv2d_fwd<__half, 16, false>",
    ]


# --- CPU: the op's host side around kernels emulated in torch ---------------------------------------------------


def _emulate(kernel, grid, block, *a, shared_mem=0):
    """What each kernel computes, from its arguments alone (pointers as the tensors passed, read by the
    strides passed): the host side's wiring runs on the CPU against the reference."""
    C, H, W, Ho, Wo, kh, kw, sh, sw, ph, pw, dh, dw = (int(v) for v in a[3 + 2 * ("fwd" in kernel.name):][:13])
    if "sketched_conv2d_fwd" in kernel.name:
        x, S, U, b, y = a[:5]
        M, R, O = (int(v) for v in a[18:21])
        sx, sy, scale = a[21:25], a[25:29], float(a[29])
    else:
        x, S, z = a[:3]
        M, R = int(a[16]), int(a[17])
        sx, sz, scale = a[18:22], a[22:26], float(a[26])
    N = M // (Ho * Wo)
    xs = torch.as_strided(x, (N, C, H, W), [int(s) for s in sx])
    Z = torch.nn.functional.conv2d(xs, S.reshape(R, C, kh, kw), None, (sh, sw), (ph, pw), (dh, dw))
    if "sketched_conv2d_fwd" in kernel.name:
        out = torch.einsum("nrhw,ro->nohw", Z, U.reshape(R, O)) * scale
        out = out + b.view(1, O, 1, 1) if b is not None else out
        torch.as_strided(y, (N, O, Ho, Wo), [int(s) for s in sy]).copy_(out)
    else:
        torch.as_strided(z, (N, R, Ho, Wo), [int(s) for s in sz]).copy_(Z * scale)


EMULATED_TOL = 1e-7  # float64 math; the scale 1/(2L) is a float32 kernel argument


@pytest.fixture
def emulated_kernels():
    # float64 (exact comparisons) names a kernel instance that is never compiled here
    with mock.patch.object(forward.Kernel, "__call__", _emulate), mock.patch.dict(forward._CTYPES,
                                                                                  {torch.float64: "double"}):
        yield


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("name", ["stride2_R6", "mixed_pairs_R66_O70"])
def test_op_around_emulated_kernels_matches_reference(name, layout, emulated_kernels):
    inputs, conv = _case(name, torch.float64, device="cpu")
    x = inputs[0]
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = torch.zeros(x.shape[0], x.shape[1] * 2, x.shape[2], x.shape[3] + 1, dtype=x.dtype)[:, ::2, :, 1:]
        x.copy_(inputs[0])
    y, _ = run_and_compare((x, *inputs[1:]), conv, GRADS, EMULATED_TOL)
    assert y.is_contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
    for wants in (("x",), ("U1s",), ("S1s", "bias")):
        run_and_compare((x, *inputs[1:]), conv, wants, EMULATED_TOL)


def test_op_around_emulated_kernels_expanded_grad_and_empty_batch(emulated_kernels):
    inputs, conv = _case("3x3_R6", torch.float64, device="cpu")
    y = cuda_sketched_conv2d(*inputs, *conv)
    run_and_compare(inputs, conv, GRADS, EMULATED_TOL, grad_out=torch.ones(()).expand(y.shape))
    x0 = inputs[0][:0].detach().requires_grad_(True)
    rest = [t.detach().requires_grad_(True) for t in inputs[1:]]
    y0 = cuda_sketched_conv2d(x0, *rest, *conv)
    assert y0.shape == (0,) + y.shape[1:]
    y0.sum().backward()
    assert x0.grad.shape == x0.shape and all(torch.equal(t.grad, torch.zeros_like(t)) for t in rest)


def test_op_around_emulated_kernels_compiles_fullgraph(emulated_kernels):
    """torch.compile(fullgraph=True) traces the op (library ops with fake kernels) and equals eager."""
    torch._dynamo.reset()
    inputs, conv = _case("stride2_R6", torch.float64, device="cpu")

    def step(x, S1s, U1s, b):
        return cuda_sketched_conv2d(x, S1s, U1s, b, *conv)

    def run(fn):
        leaves = [t.detach().requires_grad_(True) for t in inputs]
        y = fn(*leaves)
        (y**2).sum().backward()
        return y, [t.grad for t in leaves]

    y_e, g_e = run(step)
    y_c, g_c = run(torch.compile(step, fullgraph=True, backend="aot_eager"))
    torch.testing.assert_close(y_c, y_e, rtol=1e-12, atol=1e-12)
    for a, e in zip(g_c, g_e):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
