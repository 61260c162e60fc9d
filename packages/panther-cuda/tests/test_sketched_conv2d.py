"""The sketched conv2d kernels of the cuda backend against the float64 reference: forward and every gradient.

GPU tests (marked `gpu`) compare each dtype with the torch backend's op run in float64 on the same
(rounded) inputs, as max-normalised errors. The shapes are ragged (channels, H, W and 2·L·k off every tile
size; several pixel blocks with a partial last one; O over one and over several epilogue tiles) and each
on-chip width of the fused forward (RP = 16, 32, 64, 128, 192, 256) and of the rank kernel (16, 32, 64)
runs at least once; each kernel family (halo tiles of 64 and 128 pixels, their halo loaded through registers
or copied by cp.async, generic) is forced in turn.
CPU tests check the limits and the allocation rules (fake kernels, on meta tensors), and run the halo
kernels themselves on the CPU under the CUDA emulation of emulation/cuda_emulation.h
(harness: sketched_conv2d_emulation/harness.cpp) against float64 loops.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Optional
from unittest import mock

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from panther.backends.torch_backend.sketched_conv2d import sketched_conv2d as reference_op
from panther_cuda.ops.sketched_conv2d import backward, forward, limits
from panther_cuda.ops.sketched_conv2d import op as sketched_conv2d_op
from panther_cuda.ops.sketched_conv2d.forward import RANK_TILES, fwd_shared_bytes, rank_tile
from emulation import build_harness  # tests/emulation (conftest.py puts tests/ on sys.path)

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
    "1x1_pad1_R8": (2, 3, 6, 5, 7, 2, 4, (1, 1), (1, 1), (1, 1), (1, 1)),  # padding > d (k - 1): no dx by conv_rank
    "5x5_pad2_R48": (2, 4, 13, 12, 7, 2, 24, (5, 5), (1, 1), (2, 2), (1, 1)),
    "stride2_R6": (3, 6, 11, 10, 9, 2, 3, (3, 3), (2, 2), (1, 1), (1, 1)),
    "dilation2_pad2": (2, 5, 12, 13, 6, 2, 5, (3, 3), (1, 1), (2, 2), (2, 2)),
    "3x2_pad01_R8": (2, 4, 9, 10, 5, 2, 4, (3, 2), (1, 1), (0, 1), (1, 1)),  # dx's mirrored padding: (2, 0)
    "mixed_pairs_R66_O70": (1, 17, 7, 9, 70, 6, 11, (3, 2), (2, 1), (0, 1), (1, 2)),
    "deep_R192_O130": (2, 64, 10, 9, 130, 8, 24, (3, 3), (1, 1), (1, 1), (1, 1)),
    "R256": (1, 3, 6, 6, 4, 4, 64, (3, 3), (1, 1), (1, 1), (1, 1)),
    # 40 channels: chunks of 8 (16-byte S copies in 16-bit types) or 16, the last one partial
    "chunks_C40_R30_O70": (2, 40, 9, 11, 70, 2, 15, (3, 3), (1, 1), (1, 1), (1, 1)),
    # W = 16: NCHW rows in 8-byte loads (the 1x1 forward; the backward's dZ of both)
    "1x1_rows8_R32": (2, 24, 6, 16, 20, 2, 16, (1, 1), (1, 1), (0, 0), (1, 1)),
    "3x3_W16_R24": (2, 12, 10, 16, 33, 2, 12, (3, 3), (1, 1), (1, 1), (1, 1)),
    # O = 72: U tiles and bias copied ahead (U_ASYNC) in every dtype, a second tile of 8 columns
    "3x3_O72_R32": (2, 20, 9, 12, 72, 2, 16, (3, 3), (1, 1), (1, 1), (1, 1)),
}
# Cases every kernel family takes (R <= 64): run with each forced (forward.VARIANT).
HALO_CASES = ["3x3_R6", "1x1_N1_R20", "5x5_pad2_R48", "stride2_R6", "dilation2_pad2", "chunks_C40_R30_O70",
              "1x1_rows8_R32", "3x3_W16_R24", "3x3_O72_R32"]
VARIANTS = ["halo64", "halo128", "halo64:1x64", "async64", "async128", "async64s4", "async128s3", "taps64", "taps128",
            "generic"]


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


@pytest.fixture(params=["fused", "composed"])
def forward_by(request):
    """forward.FORWARD forced for the test: the fused kernels, or cuDNN's convolution and a cuBLAS product."""
    with mock.patch.object(forward, "FORWARD", request.param):
        yield request.param


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(CASES))
def test_matches_float64_reference(name, dtype, forward_by, ieee_float32):
    inputs, conv = _case(name, dtype)
    run_and_compare(inputs, conv, GRADS, TOL[dtype])
    run_and_compare(inputs[:3] + (None,), conv, ("x",), TOL[dtype])  # no bias


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["channels_last", "strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["3x3_R6", "stride2_R6", "mixed_pairs_R66_O70", "deep_R192_O130"])
def test_forward_layouts(name, dtype, layout, forward_by, ieee_float32):
    """Each forward (forward.FORWARD) with x channels_last (y too) or strided (y NCHW), against float64."""
    inputs, conv = _case(name, dtype)
    x = inputs[0]
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    else:
        x = torch.zeros(x.shape[0], x.shape[1] * 2, x.shape[2], x.shape[3], dtype=x.dtype, device=x.device)[:, ::2]
        x.copy_(inputs[0])
    y, _ = run_and_compare((x, *inputs[1:]), conv, GRADS, TOL[dtype])
    assert y.is_contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)


@pytest.fixture
def variant(request):
    """forward.VARIANT forced for the test (the kernel family: halo64, halo128, async64, async128, taps64,
    taps128, generic)."""
    previous = forward.VARIANT
    forward.VARIANT = request.param
    yield request.param
    forward.VARIANT = previous


@pytest.mark.gpu
@pytest.mark.parametrize("variant", VARIANTS, indirect=True)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", HALO_CASES)
def test_each_kernel_family(name, dtype, layout, variant, ieee_float32):
    """Forward and every gradient with each kernel family forced (the backward's dZ and Z use it too)."""
    inputs, conv = _case(name, dtype)
    x = inputs[0].contiguous(memory_format=torch.channels_last) if layout == "channels_last" else inputs[0]
    if variant != "generic":  # the family forced is the one that runs
        R = inputs[1].shape[0] * inputs[1].shape[1]
        S = inputs[1].reshape(R, -1)
        Ho, Wo = torch.nn.functional.conv2d(x[:1].float(), S.float().view(R, x.shape[1], *inputs[1].shape[3:]),
                                            None, *conv).shape[2:]
        _, plan = forward._halo(x, S, R, inputs[1].shape[3:], *conv, (Ho, Wo))
        kh, kw = inputs[1].shape[3:]
        if variant.startswith("taps"):  # 16-bit and at most 9 taps, else the plan through registers
            assert bool(plan[3] & forward.HALO_TAPS) == (x.element_size() == 2 and kh * kw <= 9), plan
        else:
            copy = forward.async_copy_bytes(x, x.stride(1) < x.stride(3)) if variant.startswith("async") else 0
            assert forward.halo_loader(plan[3]) == (forward.LOAD_ASYNC if copy else forward.LOAD_ELEMENTS), plan
    run_and_compare((x, *inputs[1:]), conv, GRADS, TOL[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["halo64", "halo128"], indirect=True)
@pytest.mark.parametrize("name", ["3x3_R6", "chunks_C40_R30_O70"])
def test_halo_kernels_as_tf32(name, variant, tf32):
    inputs, conv = _case(name, torch.float32)
    run_and_compare(inputs, conv, GRADS, TOL_TF32)


@pytest.fixture
def own_kernels():
    """The package's kernels wherever they can run, for the test: forward.FORWARD = "fused", backward.DZ =
    backward.Z = "kernels" (dZ, a 1x1 convolution of g, and the recomputed Z by conv_rank, not by cuBLAS and
    cuDNN)."""
    with mock.patch.object(forward, "FORWARD", "fused"), mock.patch.object(backward, "DZ", "kernels"), \
            mock.patch.object(backward, "Z", "kernels"):
        yield


@pytest.fixture
def dz_by_gemm():
    """backward.DZ = "gemm" for the test: dZ by cuBLAS where g's layout allows."""
    with mock.patch.object(backward, "DZ", "gemm"):
        yield


@pytest.fixture
def dx_by_kernels():
    """backward.DX = "kernels" for the test: dx by conv_rank where it is a plain convolution of dZ."""
    with mock.patch.object(backward, "DX", "kernels"):
        yield


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["halo64", "async64", "taps64", "generic"], indirect=True)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["3x3_R6", "5x5_pad2_R48", "3x2_pad01_R8", "chunks_C40_R30_O70", "deep_R192_O130"])
def test_dx_by_kernels(name, dtype, layout, variant, dx_by_kernels, ieee_float32):
    """dx by the conv_rank kernels (backward.DX = "kernels"): every gradient against float64."""
    inputs, conv = _case(name, dtype)
    x = inputs[0].contiguous(memory_format=torch.channels_last) if layout == "channels_last" else inputs[0]
    run_and_compare((x, *inputs[1:]), conv, GRADS, TOL[dtype])


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["3x3_R6", "5x5_pad2_R48", "stride2_R6", "mixed_pairs_R66_O70", "deep_R192_O130"])
def test_dz_by_gemm(name, dtype, layout, dz_by_gemm, ieee_float32):
    """dZ by cuBLAS (backward.DZ = "gemm", g in x's layout, so that the products take it): every gradient against
    float64, float32 exact at "highest"."""
    inputs, conv = _case(name, dtype)
    x = inputs[0].contiguous(memory_format=torch.channels_last) if layout == "channels_last" else inputs[0]
    shape = cuda_sketched_conv2d(x, *inputs[1:], *conv).shape
    g = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype).to(x.device)
    g = g.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else g
    taken, real = [], backward.channel_product
    with mock.patch.object(backward, "channel_product", lambda *a: taken.append(real(*a)) or taken[-1]):
        run_and_compare((x, *inputs[1:]), conv, GRADS, TOL[dtype], grad_out=g)
    assert taken == [True]


@pytest.fixture(params=["kernels", "cudnn"])
def z_by(request):
    """backward.Z forced for the test: the Z that dU needs recomputed by conv_rank or by cuDNN."""
    with mock.patch.object(backward, "Z", request.param):
        yield request.param


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "x_channels_last_g_nchw"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["3x3_R6", "5x5_pad2_R48", "stride2_R6", "1x1_N1_R20", "mixed_pairs_R66_O70",
                                  "deep_R192_O130"])
def test_weight_gradient_by_z_layouts(name, dtype, layout, z_by, ieee_float32):
    """dU from Z recomputed by each way (backward.Z) in g's layout, then cuBLAS per image (NCHW g) or over every
    pixel (channels_last g): every gradient against float64, float32 exact at "highest"."""
    inputs, conv = _case(name, dtype)
    x = inputs[0] if layout == "nchw" else inputs[0].contiguous(memory_format=torch.channels_last)
    shape = cuda_sketched_conv2d(x, *inputs[1:], *conv).shape
    g = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype).to(x.device)
    g = g.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else g
    run_and_compare((x, *inputs[1:]), conv, GRADS, TOL[dtype], grad_out=g)
    run_and_compare((x, *inputs[1:]), conv, ("U1s",), TOL[dtype], grad_out=g)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 7, 5), (3, 70, 9, 11), (4, 64, 56, 56), (65537, 2, 1, 3)])
def test_transpose_planes_both_ways(shape, dtype):
    """transpose_planes: NCHW to channels_last and back, equal values, at ragged tiles and more planes than a
    grid's y dimension takes."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(dtype).cuda()
    cl = torch.full_like(x, float("nan"), memory_format=torch.channels_last)
    forward.transpose_planes(cl, x)
    assert cl.is_contiguous(memory_format=torch.channels_last) and torch.equal(cl, x)
    back = torch.full_like(x, float("nan"))
    forward.transpose_planes(back, cl)
    assert back.is_contiguous() and torch.equal(back, x)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (3, 5, 4, 8), (700, 2, 1, 8)])
@pytest.mark.parametrize("aligned", [True, False])
def test_fill_planes(shape, aligned, dtype, monkeypatch):
    """fill_planes: out[n, c] = value[c] in 16-byte stores (H·W a multiple of their values, out aligned) or one
    value at a time (a ragged plane, or out one element past an aligned start), with more vectors than its
    blocks' threads (its grid capped at two blocks here)."""
    monkeypatch.setattr(forward, "FILL_BLOCKS", 2)
    N, C, H, W = shape
    buf = torch.full((N * C * H * W + 1,), float("nan"), dtype=dtype, device="cuda")
    out = (buf[:-1] if aligned else buf[1:]).view(shape)
    value = torch.randn(C, generator=torch.Generator().manual_seed(5)).to(dtype).cuda()
    forward.fill_planes(out, value)
    assert torch.equal(out, value.view(1, C, 1, 1).expand(shape))



@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["3x3_R6", "mixed_pairs_R66_O70", "deep_R192_O130"])
def test_composed_nchw_bias_by_kernel(name, dtype, ieee_float32, monkeypatch):
    """forward.NCHW_BIAS = "kernel": the composed forward's NCHW y gets its bias from fill_planes, then the product
    adds to it; forward and every gradient against float64."""
    monkeypatch.setattr(forward, "NCHW_BIAS", "kernel")
    monkeypatch.setattr(forward, "FORWARD", "composed")
    inputs, conv = _case(name, dtype)
    run_and_compare(inputs, conv, GRADS, TOL[dtype])


@pytest.fixture(params=["input", "channels_last"])
def cudnn_layout(request):
    """forward.CUDNN_LAYOUT forced for the test: cuDNN's convolutions on x as it is, or an NCHW x channels_last."""
    with mock.patch.object(forward, "CUDNN_LAYOUT", request.param):
        yield request.param


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["nchw", "strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["3x3_R6", "stride2_R6", "mixed_pairs_R66_O70", "deep_R192_O130"])
def test_cudnn_layouts(name, dtype, layout, cudnn_layout, forward_by, ieee_float32):
    """Each layout of the op's cuDNN convolutions (forward.CUDNN_LAYOUT) with each forward, x NCHW or strided:
    forward and every gradient against float64, float32 exact at "highest"; y and dx in x's memory format."""
    inputs, conv = _case(name, dtype)
    x = inputs[0]
    if layout == "strided":
        x = torch.zeros(x.shape[0], x.shape[1] * 2, x.shape[2], x.shape[3], dtype=x.dtype, device=x.device)[:, ::2]
        x.copy_(inputs[0])
    y, leaves = run_and_compare((x, *inputs[1:]), conv, GRADS, TOL[dtype])
    assert y.is_contiguous() and leaves[0].grad.is_contiguous()


@pytest.mark.gpu
def test_backward_makes_the_context_current_first():
    """The backward's first call may be cuBLAS's, on autograd's device thread: it makes the device's context
    current there first (else torch warns that there is none), here in a fresh thread."""
    (x, S1s, U1s, b), conv = _case("3x3_R6", torch.bfloat16)
    (y,) = forward.forward_outputs(x, S1s, U1s, b, *(v for pair in conv for v in pair), True)
    grads = [torch.empty_like(t) for t in (x, S1s, U1s, b)]
    seen = []

    def run():
        with mock.patch.object(backward, "make_context_current", side_effect=seen.append), \
                mock.patch.object(backward, "channel_product", side_effect=lambda *a: seen.append("gemm") or False):
            backward.sketched_conv2d_backward(grads, torch.randn_like(y), x, S1s, U1s, *conv, (True,) * 4, True)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert seen[:2] == [x.get_device(), "gemm"]


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["3x3_R6", "mixed_pairs_R66_O70", "deep_R192_O130"])
def test_float32_as_tf32(name, tf32):
    """At matmul precision "high" float32 runs on tensor cores as TF32 (within TF32's bound)."""
    inputs, conv = _case(name, torch.float32)
    run_and_compare(inputs, conv, GRADS, TOL_TF32)


@pytest.mark.gpu
def test_exact_float32_is_not_tf32(forward_by, ieee_float32):
    """At "highest" the float32 forward is exact (FFMA kernels fused; cuDNN and cuBLAS without TF32 composed): far
    inside what TF32 rounding would give."""
    inputs, conv = _case("deep_R192_O130", torch.float32)
    y = cuda_sketched_conv2d(*inputs, *conv)
    y_ref, _ = reference(inputs, conv, None, ())
    assert rel_err(y, y_ref) < 2e-5


@contextlib.contextmanager
def program_set_fp32_precision(conv: Optional[str]):
    """cuDNN's convolutions set to ``conv`` (None: whichever differs from now) through torch's fp32_precision
    settings, as a program may; every fp32_precision setting put back after. Yields whether the legacy allow_tf32
    flags can still be read: torch 2.13 refuses to (a mix of the two APIs), torch 2.11 still reads them. Skips
    where torch has no such settings."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    if not hasattr(getattr(cudnn, "conv", None), "fp32_precision"):
        pytest.skip(f"torch {torch.__version__} has no fp32_precision settings")
    parts = (matmul, cudnn.conv, cudnn.rnn)
    saved = [p.fp32_precision for p in parts]
    try:
        cudnn.conv.fp32_precision = conv or ("tf32" if saved[1] == "ieee" else "ieee")
        try:
            matmul.allow_tf32, cudnn.allow_tf32
            legacy_readable = True
        except RuntimeError:
            legacy_readable = False
        yield legacy_readable
    finally:
        for p, value in zip(parts, saved):
            p.fp32_precision = value


@pytest.mark.gpu
def test_exact_float32_after_the_program_set_fp32_precision(forward_by, ieee_float32):
    """A program that set cuDNN's convolutions to TF32 through torch's fp32_precision settings (after which torch
    2.13 refuses to read the legacy flags; 2.11 still reads them) still gets exact float32 at matmul precision
    "highest": the op's cuDNN and cuBLAS calls run with TF32 off (exact_products, by whichever settings torch
    reads), forward and every gradient far inside TF32's error."""
    with program_set_fp32_precision("tf32"):
        inputs, conv = _case("deep_R192_O130", torch.float32)
        y, _ = run_and_compare(inputs, conv, GRADS, TOL[torch.float32])  # TF32's: TOL_TF32
        assert rel_err(y, reference(inputs, conv, None, ())[0]) < 2e-5  # as test_exact_float32_is_not_tf32
        assert torch.backends.cudnn.conv.fp32_precision == "tf32"  # the program's setting, put back


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
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bias_kernels_match_float64(layout, dtype):
    """bias_grad.cu on the GPU (backward.bias_grad(g, kernels=True)): planes and rows of ragged sizes, columns
    past a block of 32, several blocks of rows (the spec conv's g), channels over several blocks of images
    (O = 7) or one block each (O = 128), against float64 of the same rounded g; into ``out`` of g's dtype (the
    kernel writes it where one block takes each channel) and float32, each the float32 sum rounded once."""
    gen = torch.Generator().manual_seed(5)
    for shape in [(3, 7, 5, 9), (2, 70, 33, 17), (32, 128, 56, 56), (5, 130, 4, 4)]:
        g = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).cuda()
        if layout == "channels_last":
            g = g.contiguous(memory_format=torch.channels_last)
        got = backward.bias_grad(g, kernels=True)
        want = g.double().sum((0, 2, 3))
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6 * g[0, 0].numel() * g.shape[0])
        for out_dtype in (dtype, torch.float32):
            out = torch.full((shape[1],), float("nan"), dtype=out_dtype, device="cuda")
            assert backward.bias_grad(g, kernels=True, out=out) is out
            assert torch.equal(out, got.to(out_dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("name", ["3x3_R6", "mixed_pairs_R66_O70"])
def test_op_with_torch_bias_reductions(name, layout, ieee_float32, monkeypatch):
    """The op's every gradient with backward.BIAS = "torch" (the default, "kernels", runs in every other GPU
    test), g in x's layout."""
    monkeypatch.setattr(backward, "BIAS", "torch")
    inputs, conv = _case(name, torch.bfloat16)
    x = inputs[0].contiguous(memory_format=torch.channels_last) if layout == "channels_last" else inputs[0]
    run_and_compare((x, *inputs[1:]), conv, GRADS, TOL[torch.bfloat16])


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


def _declared_parameters(kernel: str, source: str = "sketched_conv2d.cu"):
    """Parameter types of a __global__ function of ``source``: 'ptr' or the scalar's NumPy type."""
    source = (Path(forward.__file__).parent / source).read_text()
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


def _check_arguments(call, kernel, source="sketched_conv2d.cu", block=(forward.THREADS,), dynamic_shared=True):
    """The launch's arguments as ``source`` declares ``kernel``'s parameters; its ``block``, with dynamic shared
    memory where ``dynamic_shared``."""
    name, _, launched, args, shared = call
    declared = _declared_parameters(kernel, source)
    assert len(args) == len(declared), (name, len(args), len(declared))
    for i, (a, want) in enumerate(zip(args, declared)):
        if want == "ptr":
            assert a is None or isinstance(a, torch.Tensor), (name, i, a)
        else:
            assert type(a) is want, (name, i, type(a), want)
    assert launched == block and (shared > 0) == dynamic_shared


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_transpose_planes_passes_the_declared_arguments(layout):
    """transpose_planes: the arguments planes.cu declares, a TILE x ROWS block, a tile of each plane per block
    along x and the planes along y; and a clear refusal of what it does not take."""
    t = _in_layout(torch.randn(3, 5, 4, 6), layout)
    out = torch.empty_like(t, memory_format=torch.contiguous_format if layout == "channels_last" else
                           torch.channels_last)
    rec = _Recorder()
    with mock.patch.object(forward.Kernel, "__call__", lambda self, *a, **k: rec(self, *a, **k)):
        forward.transpose_planes(out, t)
        for bad in (torch.empty_like(t), torch.empty_like(out, dtype=torch.float64), out[:2]):
            with pytest.raises(ValueError, match="transpose_planes: t of shape .* expected one NCHW-contiguous"):
                forward.transpose_planes(bad, t)
    (call,) = rec.calls
    rows, cols = (5, 24) if layout == "nchw" else (24, 5)
    assert call[0] == "panther::transpose_planes<float>" and call[1] == (1, 3)
    assert call[3][0] is t and call[3][1] is out and [int(a) for a in call[3][2:]] == [rows, cols, 3]
    _check_arguments(call, "transpose_planes", "planes.cu", (forward.TRANSPOSE_TILE, forward.TRANSPOSE_ROWS), False)


@pytest.mark.parametrize("variant", [None, "generic"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_launchers_pass_the_declared_arguments(channels_last, variant, own_kernels):
    """On the CPU with the launch recorded: argument count and widths as sketched_conv2d.cu declares them,
    the grids, output strides in the kernels' arguments; the backward's every path runs. 2Lk = 66: the
    forward on the generic kernel, the backward's dZ and Z by the halo kernel in two column blocks (or with
    VARIANT generic by conv_rank in two)."""
    (x, S1s, U1s, b), conv = _case("mixed_pairs_R66_O70", torch.float32, device="cpu")
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    rec = _Recorder()
    with mock.patch.object(forward.Kernel, "__call__", lambda self, *a, **k: rec(self, *a, **k)), \
            mock.patch.object(forward, "VARIANT", variant):
        (y,) = forward.forward_outputs(x, S1s, U1s, b, 2, 1, 0, 1, 1, 2, True)
        forward.sketched_conv2d_forward(y, x, S1s, U1s, b, *conv, True)
        grads = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in (x, S1s, U1s, b)]
        g = torch.randn(y.shape)
        backward.sketched_conv2d_backward(grads, g, x, S1s, U1s, *conv, (True,) * 4, True)
        backward.bias_grad(g.contiguous(memory_format=torch.channels_last), kernels=True)
    (fwd_call, dz_call, z_call, channels_call, rows_call) = rec.calls
    N, O, Ho, Wo = g.shape
    # planes of 27 values; one block a channel on the CPU (one multiprocessor), writing dbias (float32) itself
    assert channels_call[0] == "panther::bias_channels<float, 1, float>" and channels_call[1] == (O, 1)
    assert channels_call[3][1] is grads[3]
    assert [int(a) for a in channels_call[3][2:]] == [N, O, Ho * Wo, N]
    assert rows_call[0] == "panther::bias_rows<float>" and rows_call[1] == (-(-O // 32), 1)
    assert [int(a) for a in rows_call[3][2:]] == [N * Ho * Wo, O, backward.BIAS_ROWS_PER_BLOCK]
    _check_arguments(channels_call, "bias_channels", "bias_grad.cu", (backward.BIAS_CHANNEL_THREADS,))
    _check_arguments(rows_call, "bias_rows", "bias_grad.cu", (backward.BIAS_THREADS,))
    M = y.shape[0] * y.shape[2] * y.shape[3]
    Ho, Wo = y.shape[2:]
    assert fwd_call[0] == "panther::sketched_conv2d_fwd<float, 128, false>" and fwd_call[1] == (-(-M // 64),)
    _check_arguments(fwd_call, "sketched_conv2d_fwd")
    assert tuple(int(s) for s in fwd_call[3][-9:-1]) == (*x.stride(), *y.stride())
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    scale_at = -1
    for call in (dz_call, z_call):
        if variant == "generic":
            assert call[0] == "panther::conv_rank<float, 64, false>" and call[1] == (-(-M // 64), 2)
            _check_arguments(call, "conv_rank")
        else:
            th, tw, flags = int(call[3][-4]), int(call[3][-3]), int(call[3][-1])
            # 64 columns per block: the default family's 128 pixels, its loader as the plan's flags say
            assert call[0] == f"panther::conv_rank_halo<float, 64, false, 128, {forward.halo_loader(flags)}>"
            assert call[1] == (y.shape[0] * -(-Ho // th) * -(-Wo // tw), 2)  # columns 0..63, 64..65
            _check_arguments(call, "conv_rank_halo")
            scale_at = -5
    assert (Ho, Wo) == torch.nn.functional.conv2d(x, S1s[0], None, *conv).shape[2:]
    assert [int(a) for a in dz_call[3][3:16]] == [70, Ho, Wo, Ho, Wo, 1, 1, 1, 1, 0, 0, 1, 1]  # g: a 1x1 conv
    assert [int(a) for a in z_call[3][3:16]] == [17, 7, 9, Ho, Wo, 3, 2, 2, 1, 0, 1, 1, 2]
    assert float(dz_call[3][scale_at]) == pytest.approx(1 / 6) and float(z_call[3][scale_at]) == 1.0


def test_exact_float32_selects_the_ffma_kernels():
    (x, S1s, U1s, b), conv = _case("3x3_R6", torch.float32, device="cpu")
    rec = _Recorder()
    with mock.patch.object(forward.Kernel, "__call__", lambda self, *a, **k: rec(self, *a, **k)):
        for allow_tf32 in (False, True):
            (y,) = forward.forward_outputs(x, S1s, U1s, b, 1, 1, 1, 1, 1, 1, allow_tf32)
            forward.sketched_conv2d_forward(y, x, S1s, U1s, b, *conv, allow_tf32)
        (y,) = forward.forward_outputs(x.half(), S1s.half(), U1s.half(), None, 1, 1, 1, 1, 1, 1, False)
        forward.sketched_conv2d_forward(y, x.half(), S1s.half(), U1s.half(), None, *conv, False)
    loaders = [forward.halo_loader(int(c[3][-1])) for c in rec.calls]  # as each launch's plan flags say
    assert [c[0] for c in rec.calls] == [
        f"panther::sketched_conv2d_fwd_halo<float, 16, true, 64, {loaders[0]}>",
        f"panther::sketched_conv2d_fwd_halo<float, 16, false, 64, {loaders[1]}>",
        f"panther::sketched_conv2d_fwd_halo<__half, 16, false, 64, {loaders[2]}>",
    ]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_halo_launch_arguments(channels_last, own_kernels):
    """The halo kernels' launches (forward, dZ, Z): declared argument types, one block per tile of the plan,
    the plan's tile, chunk and flags appended, the shared memory the plan needs; VARIANT picks the family."""
    (x, S1s, U1s, b), conv = _case("chunks_C40_R30_O70", torch.bfloat16, device="cpu")
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    R = 30
    for variant, bm in ((None, 64), ("halo64", 64), ("halo128", 128), ("halo64:4x16", 64), ("async64", 64),
                        ("async64s3", 64), ("taps64", 64), ("generic", None)):
        rec = _Recorder()
        with mock.patch.object(forward.Kernel, "__call__", lambda self, *a, **k: rec(self, *a, **k)), \
                mock.patch.object(forward, "VARIANT", variant):
            (y,) = forward.forward_outputs(x, S1s, U1s, b, 1, 1, 1, 1, 1, 1, True)
            forward.sketched_conv2d_forward(y, x, S1s, U1s, b, *conv, True)
            grads = [torch.empty_like(t) for t in (x, S1s, U1s, b)]
            backward.sketched_conv2d_backward(grads, torch.randn(y.shape, dtype=y.dtype), x, S1s, U1s, *conv,
                                              (True,) * 4, True)
        *conv_calls, bias_call = rec.calls
        assert bias_call[0] == "panther::bias_channels<__nv_bfloat16, 1, __nv_bfloat16>"  # NCHW planes of 99
        fwd_call, dz_call, z_call = conv_calls
        if bm is None:
            assert [c[0] for c in conv_calls] == ["panther::sketched_conv2d_fwd<__nv_bfloat16, 32, false>",
                                                  "panther::conv_rank<__nv_bfloat16, 32, false>",
                                                  "panther::conv_rank<__nv_bfloat16, 32, false>"]
            continue
        # the default (None) is async64 at R = 30; x (2, 40, 9, 11): NCHW rows of 11 take no copies,
        # channels_last 8 channels
        copies = variant in (None, "async64", "async64s3")
        stages = 3 if variant == "async64s3" else forward.STAGES
        taps = variant == "taps64"  # tap-major, copied where channels_last (S passed as (R, kh, kw, C))
        load = forward.LOAD_ASYNC if (copies or taps) and channels_last else forward.LOAD_ELEMENTS
        load |= forward.LOAD_TAPS if taps else 0
        assert fwd_call[0] == f"panther::sketched_conv2d_fwd_halo<__nv_bfloat16, 32, false, {bm}, {load}>"
        assert z_call[0] == f"panther::conv_rank_halo<__nv_bfloat16, 32, false, {bm}, {load}>"
        # g: NCHW rows of 11, no copies
        g_load = forward.LOAD_TAPS if taps else forward.LOAD_ELEMENTS
        assert dz_call[0] == f"panther::conv_rank_halo<__nv_bfloat16, 32, false, {bm}, {g_load}>"
        _check_arguments(fwd_call, "sketched_conv2d_fwd_halo")
        _check_arguments(dz_call, "conv_rank_halo")
        _check_arguments(z_call, "conv_rank_halo")
        S = S1s.reshape(R, -1)
        want_S = S.view(R, 40, 3, 3).permute(0, 2, 3, 1).reshape(R, -1) if taps else S
        assert torch.equal(fwd_call[3][1].reshape(R, -1), want_S) and torch.equal(z_call[3][1].reshape(R, -1), want_S)
        tile = (4, 16) if variant == "halo64:4x16" else None
        th, tw, cc, flags, hb = forward.halo_plan(x, S, R, (3, 3), *conv, (9, 11), bm, tile,
                                                  copies=copies and channels_last, taps=taps, stages=stages)
        # the ring of buffers where the plan copies (channels_last), else the two buffers of the register loads
        assert forward.halo_stages(flags) == (stages if load & forward.LOAD_ASYNC else 2)
        assert tile is None or (th, tw) == (4, 11)  # the forced tile, clipped to the output's 11 columns
        assert [int(a) for a in fwd_call[3][-4:]] == [th, tw, cc, flags]
        assert fwd_call[1] == (2 * -(-9 // th) * -(-11 // tw),)
        assert fwd_call[4] == forward.halo_shared_bytes(torch.bfloat16, 32, bm, hb, forward.halo_stages(flags))
        assert tuple(int(s) for s in fwd_call[3][21:29]) == (*x.stride(), *y.stride())
        assert bool(flags & forward.HALO_CHANNELS_INNER) == channels_last
        assert [int(a) for a in dz_call[3][3:16]] == [70, 9, 11, 9, 11, 1, 1, 1, 1, 0, 0, 1, 1]  # g: a 1x1 conv


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_forward_copies_u_tiles_where_aligned(dtype):
    """The fused halo forward takes flag U_ASYNC, with the shared memory of its two U buffers, where O is a
    whole number of 16-byte copies and U and the bias are aligned (forward.u_async); not otherwise, nor with
    forward.U_TILES = "loads"."""
    x = torch.randn(2, 16, 9, 11, dtype=dtype)
    S1s = torch.randn(2, 8, 16, 3, 3, dtype=dtype)
    per_copy = 16 // x.element_size()

    def launch(O, bias_offset=0, u_tiles="async"):
        U1s = torch.randn(2, 8, O, dtype=dtype)
        b = torch.randn(O + bias_offset, dtype=dtype)[bias_offset:]
        rec = _Recorder()
        with mock.patch.object(forward.Kernel, "__call__", lambda self, *a, **k: rec(self, *a, **k)), \
                mock.patch.object(forward, "U_TILES", u_tiles):
            (y,) = forward.forward_outputs(x, S1s, U1s, b, 1, 1, 1, 1, 1, 1, True)
            forward.sketched_conv2d_forward(y, x, S1s, U1s, b, (1, 1), (1, 1), (1, 1), True)
        (call,) = rec.calls
        flags = int(call[3][-1])
        _, (th, tw, cc, plan_flags, hb) = forward._halo(x, S1s.reshape(16, -1), 16, (3, 3), (1, 1), (1, 1), (1, 1),
                                                       (9, 11))
        assert flags & ~forward.U_ASYNC == plan_flags
        copied = bool(flags & forward.U_ASYNC)
        assert call[4] == forward.halo_shared_bytes(dtype, 16, 64, hb, forward.halo_stages(flags), copied)
        return copied

    assert launch(8 * per_copy)
    assert not launch(8 * per_copy + 1)  # O past a whole number of copies
    assert not launch(8 * per_copy, bias_offset=1)  # the bias not aligned
    assert not launch(8 * per_copy, u_tiles="loads")


@pytest.mark.parametrize("name, bm", [("3x3_W16_R24", 64), ("1x1_rows8_R32", 64), ("5x5_pad2_R48", 128)])
def test_default_family_block_pixels_follow_R(name, bm, own_kernels):
    """With no family forced, the fused forward launch takes the cp.async halo kernels, 64 output pixels per
    block up to R = 32 and 128 above (forward.default_family)."""
    (x, S1s, U1s, b), conv = _case(name, torch.bfloat16, device="cpu")
    x = x.contiguous(memory_format=torch.channels_last)  # aligned for 16-byte copies (C a multiple of 8)
    R = S1s.shape[0] * S1s.shape[1]
    assert forward.default_family(R) == bm
    rec = _Recorder()
    with mock.patch.object(forward.Kernel, "__call__", lambda self, *a, **k: rec(self, *a, **k)), \
            mock.patch.object(forward, "VARIANT", None):
        (y,) = forward.forward_outputs(x, S1s, U1s, b, *[v for p in conv for v in p], True)
        forward.sketched_conv2d_forward(y, x, S1s, U1s, b, *conv, True)
    (fwd_call,) = rec.calls
    rp = next(w for w in forward.HALO_RANKS if w >= R)
    assert fwd_call[0] == f"panther::sketched_conv2d_fwd_halo<__nv_bfloat16, {rp}, false, {bm}, {forward.LOAD_ASYNC}>"


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_backward_reads_nchw_rows_of_g_in_8_byte_loads(channels_last, own_kernels):
    """The halo family (loads through registers; the default copies by cp.async): the dZ launch (a 1x1 conv
    of g, W' = 16) takes conv_rank_halo's 8-byte loader for an NCHW g; the forward (padding 1: its halo rows
    start off the 8-byte grid) and a channels_last g do not."""
    (x, S1s, U1s, b), conv = _case("3x3_W16_R24", torch.bfloat16, device="cpu")
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    rec = _Recorder()
    with mock.patch.object(forward.Kernel, "__call__", lambda self, *a, **k: rec(self, *a, **k)), \
            mock.patch.object(forward, "VARIANT", "halo64"):
        (y,) = forward.forward_outputs(x, S1s, U1s, b, 1, 1, 1, 1, 1, 1, True)
        forward.sketched_conv2d_forward(y, x, S1s, U1s, b, *conv, True)
        grads = [torch.empty_like(t) for t in (x, S1s, U1s, b)]
        g = torch.randn(y.shape, dtype=y.dtype).contiguous(memory_format=forward.memory_format(x))
        backward.sketched_conv2d_backward(grads, g, x, S1s, U1s, *conv, (True,) * 4, True)
    fwd_call, dz_call, z_call, bias_call = rec.calls
    # planes of 160 values: 16-byte loads
    assert bias_call[0] == ("panther::bias_rows<__nv_bfloat16>" if channels_last
                            else "panther::bias_channels<__nv_bfloat16, 8, __nv_bfloat16>")
    assert fwd_call[0] == "panther::sketched_conv2d_fwd_halo<__nv_bfloat16, 32, false, 64, 0>"
    assert not int(fwd_call[3][-1]) & forward.HALO_VECTOR
    vector = not channels_last
    assert dz_call[0] == f"panther::conv_rank_halo<__nv_bfloat16, 32, false, 64, {1 if vector else 0}>"
    assert bool(int(dz_call[3][-1]) & forward.HALO_VECTOR) == vector
    assert z_call[0] == "panther::conv_rank_halo<__nv_bfloat16, 32, false, 64, 0>"  # x padded by 1


@pytest.mark.parametrize("kernels", [False, True], ids=["torch", "kernels"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "expanded", "sliced"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bias_grad_sums_over_batch_and_pixels(layout, dtype, kernels, emulated_kernels):
    """backward.bias_grad in every layout of g against float64: by torch's reductions, or with ``kernels``
    around its kernels emulated for NCHW (plane sums) and channels_last (sums of blocks of rows; the kernels
    themselves: test_bias_kernels_under_emulation), torch's reduction for the others; in float32."""
    torch.manual_seed(0)
    g = torch.randn(3, 7, 5, 9, dtype=torch.float64)
    if layout == "channels_last":
        g = g.contiguous(memory_format=torch.channels_last)
    elif layout == "expanded":
        g = torch.randn(1, 7, 1, 1, dtype=torch.float64).expand(3, 7, 5, 9)
    elif layout == "sliced":
        g = torch.randn(3, 9, 5, 9, dtype=torch.float64)[:, 1:8]
    got = backward.bias_grad(g.to(dtype), kernels)
    assert got.dtype == torch.float32 and got.shape == (7,)
    assert backward.bias_grad(g, kernels).dtype == torch.float64  # float64 (the emulated kernels' tests) stays so
    want = g.to(dtype).double().sum((0, 2, 3))
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-5)
    assert backward.bias_grad(g[:, :0].to(dtype), kernels).shape == (0,)  # no channels
    out = torch.full((7,), float("nan"), dtype=dtype)  # written in its dtype, the float32 sum rounded once
    assert backward.bias_grad(g.to(dtype), kernels, out=out) is out and torch.equal(out, got.to(dtype))
    for wrong in (torch.empty(6, dtype=dtype), torch.empty(7, 1, dtype=dtype)):
        with pytest.raises(ValueError, match=r"bias_grad: out is \(.*\) on cpu, expected \(7,\) on cpu"):
            backward.bias_grad(g.to(dtype), kernels, out=wrong)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_bias_channels_load_16_bytes_where_aligned(dtype):
    """bias_channels<T, V, float>: V = 16 / sizeof(T) values a load where g is 16-byte aligned and its planes hold
    a whole number of loads, else V = 1 (a plane of 6 x 5 values; g one element off alignment)."""
    names = []

    def record(kernel, grid, block, *a, shared_mem=0):
        names.append(kernel.name)
        _emulate(kernel, grid, block, *a, shared_mem=shared_mem)

    V = 16 // torch.tensor([], dtype=dtype).element_size()
    aligned = torch.randn(2, 3, 4, 2 * V).to(dtype)
    odd_plane = torch.randn(2, 3, 6, 5).to(dtype)
    offset = torch.empty(2 * 3 * 4 * 2 * V + 1, dtype=dtype)[1:].view(aligned.shape).copy_(aligned)
    with mock.patch.object(forward.Kernel, "__call__", record):
        for g in (aligned, odd_plane, offset):
            assert rel_err(backward.bias_grad(g, kernels=True), g.double().sum((0, 2, 3))) <= 1e-3
    ctype = forward._CTYPES[dtype]
    assert names == [f"panther::bias_channels<{ctype}, {V}, float>", f"panther::bias_channels<{ctype}, 1, float>",
                     f"panther::bias_channels<{ctype}, 1, float>"]


def test_bias_grad_in_blocks_of_rows(emulated_kernels):
    """channels_last g over several blocks of rows, and past the grid's y limit (more rows a block)."""
    g = torch.randn(3, 7, 5, 9, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    want = g.sum((0, 2, 3))
    for per_block, limit, plan in ((16, 65535, (16, 9)), (16, 4, (34, 4))):
        with mock.patch.object(backward, "BIAS_ROWS_PER_BLOCK", per_block), \
                mock.patch.object(backward, "MAX_GRID_Y", limit):
            assert backward.bias_rows_plan(135, backward.BIAS_ROWS_PER_BLOCK) == plan
            torch.testing.assert_close(backward.bias_grad(g, kernels=True), want, rtol=1e-12, atol=1e-12)
    assert backward.bias_rows_plan(32 * 56 * 56) == (512, 196)  # the spec's conv
    assert backward.bias_rows_plan(65535 * 512 + 1)[1] <= 65535


def test_halo_plans_of_the_benchmark_cases():
    """The tiles the halo kernels take at the two benchmark shapes (bf16): whole blocks of 8 x 8 pixels at
    56 x 56, 2 x 28 at 28 x 28; 16 channels a chunk (each S row's 144 = C·kh·kw columns of a chunk copied 16 bytes at a time)."""
    for layout in (torch.contiguous_format, torch.channels_last):
        x1 = torch.empty(32, 64, 56, 56, dtype=torch.bfloat16).contiguous(memory_format=layout)
        plan1 = forward.halo_plan(x1, torch.empty(32, 576, dtype=torch.bfloat16), 32, (3, 3), (1, 1), (1, 1),
                                  (1, 1), (56, 56), 64)
        x2 = torch.empty(64, 256, 28, 28, dtype=torch.bfloat16).contiguous(memory_format=layout)
        plan2 = forward.halo_plan(x2, torch.empty(64, 2304, dtype=torch.bfloat16), 64, (3, 3), (1, 1), (1, 1),
                                  (1, 1), (28, 28), 64)
        inner = forward.HALO_CHANNELS_INNER if layout == torch.channels_last else 0
        assert plan1[:4] == (8, 8, 16, forward.S_VECTOR | inner)
        assert plan2[:4] == (2, 28, 16, forward.S_VECTOR | inner)
        # the backward's dZ: g (N, O, H', W') by U (R, O) as a 1x1 conv; NCHW rows of 112 and 56 bytes
        g1 = torch.empty(32, 128, 56, 56, dtype=torch.bfloat16).contiguous(memory_format=layout)
        dz1 = forward.halo_plan(g1, torch.empty(32, 128, dtype=torch.bfloat16), 32, (1, 1), (1, 1), (0, 0), (1, 1),
                                (56, 56), 64, vector_rows=True)
        g2 = torch.empty(64, 256, 28, 28, dtype=torch.bfloat16).contiguous(memory_format=layout)
        dz2 = forward.halo_plan(g2, torch.empty(64, 256, dtype=torch.bfloat16), 64, (1, 1), (1, 1), (0, 0), (1, 1),
                                (28, 28), 64, vector_rows=True)
        # NCHW: 8-byte loads of g, 72 channels a chunk
        vec = forward.S_VECTOR | forward.HALO_VECTOR
        assert dz1[:4] == ((8, 8, 32, forward.S_VECTOR | inner) if inner else (1, 56, 72, vec))
        assert dz2[:4] == ((2, 28, 32, forward.S_VECTOR | inner) if inner else (2, 28, 72, vec))


def test_halo_plan_refuses_what_the_halo_kernels_cannot_take():
    x = torch.empty(2, 8, 30, 300)
    S = torch.empty(16, 72)
    assert forward.halo_plan(x, torch.empty(80, 72), 80, (3, 3), (1, 1), (0, 0), (1, 1), (28, 298), 64) is None  # R > 64
    assert forward.halo_plan(x, torch.empty(16, 8 * 169), 16, (13, 13), (1, 1), (0, 0), (1, 1), (18, 288),
                             64) is None
    # a 1 x 64 tile whose halo row is 64 * 3 + 2 > 128 wide at stride 3 still finds a narrower tile
    plan = forward.halo_plan(x, S, 16, (3, 3), (3, 3), (0, 0), (1, 1), (10, 100), 64)
    assert plan is not None and forward.halo_extent(plan[1], 3, 3, 1) <= forward.THREADS


@pytest.mark.parametrize("variant", ["taps", "async32", "halo64:4", "halo64:0x16", "conv64", "halo64x", "async64s5",
                                     "async64s1", "async64:4x16s3", "halo64s3"])
def test_variant_names_a_family_or_is_refused(variant):
    x, S = torch.empty(1, 8, 10, 10), torch.empty(16, 72)
    with mock.patch.object(forward, "VARIANT", variant), pytest.raises(ValueError, match=rf"forward\.VARIANT: '{variant}'"):
        forward._halo(x, S, 16, (3, 3), (1, 1), (1, 1), (1, 1), (10, 10))
    with mock.patch.object(forward, "VARIANT", "taps64:4x16"):  # a 16-bit family on float32: the plain halo plan
        assert forward._halo(x, S, 16, (3, 3), (1, 1), (1, 1), (1, 1), (10, 10))[1][:2] == (4, 10)


@pytest.mark.parametrize("user_benchmark", [False, True])
@pytest.mark.parametrize("algorithms", ["heuristic", "timed"])
def test_cudnn_algorithms_times_only_when_asked(algorithms, user_benchmark):
    """The op's cuDNN calls run with torch.backends.cudnn.benchmark on where CUDNN_ALGORITHMS is "timed", and leave
    the program's own setting as it was after."""
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = user_benchmark
    try:
        with mock.patch.object(forward, "CUDNN_ALGORITHMS", algorithms):
            with forward.cudnn_algorithms():
                assert torch.backends.cudnn.benchmark == (user_benchmark or algorithms == "timed")
            assert torch.backends.cudnn.benchmark == user_benchmark
            with pytest.raises(KeyError), forward.cudnn_algorithms():
                raise KeyError("the body failed")
            assert torch.backends.cudnn.benchmark == user_benchmark
    finally:
        torch.backends.cudnn.benchmark = previous


def test_cudnn_algorithms_are_not_timed_during_capture():
    """Timing synchronizes, which a stream capturing a CUDA graph forbids: the heuristic's choice there."""
    with mock.patch.object(forward, "CUDNN_ALGORITHMS", "timed"), \
            mock.patch.object(torch.cuda, "is_available", return_value=True), \
            mock.patch.object(torch.cuda, "is_current_stream_capturing", return_value=True):
        with forward.cudnn_algorithms():
            assert torch.backends.cudnn.benchmark is False


# --- CPU: the op's host side around kernels emulated in torch ---------------------------------------------------


def _emulate(kernel, grid, block, *a, shared_mem=0):
    """What each kernel computes, from its arguments alone (pointers as the tensors passed, read by the
    strides passed): the host side's wiring runs on the CPU against the reference."""
    if "bias_channels" in kernel.name:
        g, out, N, O, plane, per = (a[0], a[1], *(int(v) for v in a[2:]))
        assert grid == (O, -(-N // per)) and block == (backward.BIAS_CHANNEL_THREADS,)
        planes = g.reshape(N, O, plane).double()
        for s in range(grid[1]):
            out.view(-1)[s * O:(s + 1) * O] = planes[s * per:(s + 1) * per].sum((0, 2))
        return
    if "fill_planes" in kernel.name:
        out, value, vectors, plane_vectors, C = a[0], a[1], int(a[2]), int(a[3]), int(a[4])
        V = out.numel() // vectors
        assert grid == (min(-(-vectors // forward.FILL_THREADS), forward.FILL_BLOCKS),)
        assert block == (forward.FILL_THREADS,) and out.is_contiguous() and value.dtype == out.dtype
        assert kernel.name.endswith(f", {V}>") and (V == 1 or out.data_ptr() % 16 == 0)
        out.view(-1, C, plane_vectors * V).copy_(value.view(1, C, 1).expand(out.numel() // (C * plane_vectors * V),
                                                                             C, plane_vectors * V))
        return
    if "transpose_planes" in kernel.name:
        t, out, rows, cols, planes = a[0], a[1], int(a[2]), int(a[3]), int(a[4])
        tiles = -(-rows // forward.TRANSPOSE_TILE) * -(-cols // forward.TRANSPOSE_TILE)
        assert grid == (tiles, min(planes, forward.MAX_GRID_Y)) and block == (forward.TRANSPOSE_TILE,
                                                                              forward.TRANSPOSE_ROWS)
        src = torch.as_strided(t, (planes, rows, cols), (rows * cols, cols, 1))
        torch.as_strided(out, (planes, cols, rows), (rows * cols, rows, 1)).copy_(src.transpose(1, 2))
        return
    if "bias_rows" in kernel.name:
        g, partial, rows, O, per = a
        assert grid == (-(-int(O) // 32), -(-int(rows) // int(per))) and block == (backward.BIAS_THREADS,)
        gr = g.permute(0, 2, 3, 1).reshape(int(rows), int(O))  # channels_last: a view
        for c in range(grid[1]):
            partial[c] = gr[c * int(per):(c + 1) * int(per)].sum(0, dtype=partial.dtype)
        return
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


def _in_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """t (N, C, H, W) NCHW-contiguous ("nchw"), channels_last, or "strided": every other channel of a wider
    tensor, from its second column (neither layout)."""
    if layout == "strided":
        N, C, H, W = t.shape
        return torch.zeros(N, C * 2, H, W + 1, dtype=t.dtype, device=t.device)[:, ::2, :, 1:].copy_(t)
    return t.contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("name", ["stride2_R6", "mixed_pairs_R66_O70"])
def test_op_around_emulated_kernels_matches_reference(name, layout, emulated_kernels, forward_by):
    inputs, conv = _case(name, torch.float64, device="cpu")
    x = _in_layout(inputs[0], layout)
    y, _ = run_and_compare((x, *inputs[1:]), conv, GRADS, EMULATED_TOL)
    assert y.is_contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)
    for wants in (("x",), ("U1s",), ("S1s", "bias")):
        run_and_compare((x, *inputs[1:]), conv, wants, EMULATED_TOL)


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
def test_dx_comes_in_the_memory_format_of_x(layout, emulated_kernels):
    """dx is channels_last for a channels_last x (as nn.Conv2d's; autograd would otherwise copy it into that
    layout for x.grad), contiguous otherwise, on the eager path and the library op's, real and fake alike."""
    inputs, conv = _case("3x3_R6", torch.float64, device="cpu")
    x = inputs[0]
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = torch.zeros(x.shape[0], x.shape[1] * 2, x.shape[2], x.shape[3], dtype=x.dtype)[:, ::2]
        x.copy_(inputs[0])
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    y = cuda_sketched_conv2d(*inputs, *conv)
    g = torch.randn(y.shape, dtype=torch.float64)
    _, grads_ref = reference(inputs, conv, g, ("x",))
    xl = x.detach().requires_grad_(True)
    (dx,) = torch.autograd.grad(cuda_sketched_conv2d(xl, *inputs[1:], *conv), xl, g)
    assert dx.is_contiguous(memory_format=fmt) and rel_err(dx, grads_ref["x"]) <= EMULATED_TOL
    op = sketched_conv2d_op.SKETCHED_CONV2D
    args = (x, *inputs[1:], True, False, False, False, *(v for pair in conv for v in pair), True)
    dx_op = op.bwd_op(g, *args)[0]
    assert dx_op.stride() == dx.stride() and rel_err(dx_op, grads_ref["x"]) <= EMULATED_TOL
    with FakeTensorMode() as mode:
        fake = op.bwd_op(mode.from_tensor(g), *(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a
                                                 for a in args))[0]
    assert fake.stride() == dx.stride()


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("name", ["stride2_R6", "mixed_pairs_R66_O70"])
def test_cudnn_layout_around_emulated_kernels(name, layout, emulated_kernels, forward_by, cudnn_layout, monkeypatch):
    """forward.CUDNN_LAYOUT: with "channels_last" the op's cuDNN convolutions (the composed forward's, the
    backward's dx and dS, the Z it recomputes) take an NCHW x copied to channels_last, one copy per pass, and dZ
    made channels_last; other layouts of x, and every x with "input", as they are. Every gradient against the
    reference; y and dx in x's memory format."""
    inputs, conv = _case(name, torch.float64, device="cpu")
    x = _in_layout(inputs[0], layout)
    seen = []  # (the call, whether its x is channels_last, whether its dZ is)
    conv2d, convolution_backward = torch.nn.functional.conv2d, torch.ops.aten.convolution_backward

    def recorded_conv2d(inp, *a):
        if sys._getframe(1).f_globals["__name__"].startswith("panther_cuda"):  # the op's, not the emulation's
            seen.append(("conv2d", forward.memory_format(inp) == torch.channels_last, None))
        return conv2d(inp, *a)

    def recorded_backward(dz, inp, *a):
        cl = (forward.memory_format(inp) == torch.channels_last, forward.memory_format(dz) == torch.channels_last)
        seen.append(("backward", *cl))
        return convolution_backward(dz, inp, *a)

    leaves = [t.detach().requires_grad_(True) for t in (x, *inputs[1:])]
    g = torch.randn(cuda_sketched_conv2d(*inputs, *conv).shape, dtype=torch.float64)
    launched = []

    def counted(kernel, grid, block, *a, shared_mem=0):
        launched.append(kernel.name.split("<")[0])
        return _emulate(kernel, grid, block, *a, shared_mem=shared_mem)

    with monkeypatch.context() as patched:
        patched.setattr(torch.nn.functional, "conv2d", recorded_conv2d)
        patched.setattr(torch.ops.aten, "convolution_backward", recorded_backward)
        patched.setattr(forward.Kernel, "__call__", counted)
        y = cuda_sketched_conv2d(*leaves, *conv)
        grads = torch.autograd.grad(y, leaves, g)
    y_ref, grads_ref = reference(inputs, conv, g, GRADS)
    assert rel_err(y, y_ref) <= EMULATED_TOL
    for got, want in zip(grads, GRADS):
        assert rel_err(got, grads_ref[want]) <= EMULATED_TOL, want
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt) and grads[0].is_contiguous(memory_format=fmt)
    cl = layout == "channels_last" or layout == "nchw" and cudnn_layout == "channels_last"
    calls = ["conv2d"] * (forward_by == "composed") + ["backward", "conv2d"]  # the forward, dx and dS, dU's Z
    assert seen == [(c, cl, cl if c == "backward" else None) for c in calls]
    # x's copies: the composed forward's, the backward's (for dx, dS and Z alike); dx's back
    transposed = layout == "nchw" and cudnn_layout == "channels_last"
    assert launched.count("panther::transpose_planes") == transposed * ((forward_by == "composed") + 2)


def _grad_in_layout(shape, layout: str) -> torch.Tensor:
    """A float64 N(0, 1) gradient of ``shape``: NCHW, channels_last, strided (every other column of a wider
    tensor: neither layout) or expanded (one value per (n, o) plane)."""
    g = torch.randn(shape, dtype=torch.float64)
    if layout == "channels_last":
        return g.contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        return torch.zeros(*shape[:3], shape[3] * 2, dtype=g.dtype)[..., ::2].copy_(g)
    if layout == "expanded":
        return g[:, :, :1, :1].expand(shape)
    return g


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("name", ["3x3_R6", "mixed_pairs_R66_O70"])
def test_dz_by_gemm_around_emulated_kernels(name, layout, emulated_kernels, dz_by_gemm):
    """backward.DZ = "gemm": dZ = U g / (2L) by cuBLAS products where g is NCHW or channels_last (dZ in x's layout,
    either), by conv_rank for other layouts of g; every gradient against the reference."""
    inputs, conv = _case(name, torch.float64, device="cpu")
    x = inputs[0].contiguous(memory_format=torch.channels_last) if layout == "channels_last" else inputs[0]
    g = _grad_in_layout(cuda_sketched_conv2d(x, *inputs[1:], *conv).shape, layout)  # strided: conv_rank's dZ
    _, grads_ref = reference(inputs, conv, g, GRADS)
    taken, real = [], backward.channel_product
    leaves = [t.detach().requires_grad_(True) if t is not None else None for t in (x, *inputs[1:])]
    with mock.patch.object(backward, "channel_product", lambda *a: taken.append(real(*a)) or taken[-1]):
        out = cuda_sketched_conv2d(*leaves, *conv)
        grads = torch.autograd.grad(out, [t for t in leaves if t is not None], g)
    assert taken == [layout != "strided"] and len(grads) == len(GRADS)
    for got, want in zip(grads, GRADS):
        assert rel_err(got, grads_ref[want]) <= EMULATED_TOL, want


def test_forward_rule_takes_the_fused_kernels_up_to_its_depth(monkeypatch):
    """fused_forward: for an x not channels_last, the fused kernels where R·C·kh·kw <= FUSED_DEPTH_MAX (the spec's
    conv: 32 · 576), cuDNN and cuBLAS above (the deeper benchmark conv: 64 · 2304); for a channels_last x composed;
    a forced FORWARD or kernel family overrides the rule. The composed forward is what runs where the rule says."""
    assert forward.fused_forward(32, 64 * 9, False) and not forward.fused_forward(64, 256 * 9, False)
    assert not forward.fused_forward(32, 64 * 9, True)
    depth = forward.FUSED_DEPTH_MAX
    assert forward.fused_forward(1, depth, False) and not forward.fused_forward(1, depth + 1, False)
    monkeypatch.setattr(forward, "VARIANT", "halo64")
    assert forward.fused_forward(64, 256 * 9, False) and forward.fused_forward(64, 256 * 9, True)
    monkeypatch.setattr(forward, "FORWARD", "composed")
    assert not forward.fused_forward(32, 64 * 9, False)
    monkeypatch.setattr(forward, "FORWARD", "fused")
    assert forward.fused_forward(64, 256 * 9, True)
    monkeypatch.setattr(forward, "FORWARD", None)
    monkeypatch.setattr(forward, "VARIANT", None)
    for name, channels_last in (("deep_R192_O130", False), ("3x3_R6", True)):
        inputs, conv = _case(name, torch.float64, device="cpu")
        x = inputs[0].contiguous(memory_format=torch.channels_last) if channels_last else inputs[0]
        (y,) = forward.forward_outputs(x, *inputs[1:], *(v for pair in conv for v in pair), True)
        with mock.patch.object(forward, "composed_forward", wraps=forward.composed_forward) as composed:
            forward.sketched_conv2d_forward(y, x, *inputs[1:], *conv, True)
        assert composed.call_count == 1
        assert rel_err(y, reference_op(*inputs, *conv)) <= EMULATED_TOL


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided", "expanded"])
@pytest.mark.parametrize("name", ["3x3_R6", "stride2_R6", "1x1_N1_R20", "mixed_pairs_R66_O70"])
def test_weight_gradient_around_emulated_kernels(name, layout, emulated_kernels, z_by):
    """dU with Z recomputed by each way (backward.Z: conv_rank emulated, or torch's convolution) for g NCHW (a
    product per image), channels_last (one product), strided or expanded (copied to rows of pixels first): every
    gradient against the reference, and Z in g's layout where conv_rank makes it (and g has one), in x's where
    cuDNN does (weight_products reads either)."""
    inputs, conv = _case(name, torch.float64, device="cpu")
    # x in the other layout than g's, so that the layout Z follows is seen
    x = inputs[0].contiguous(memory_format=torch.channels_last) if layout == "nchw" else inputs[0]
    g = _grad_in_layout(cuda_sketched_conv2d(x, *inputs[1:], *conv).shape, layout)
    _, grads_ref = reference(inputs, conv, g, GRADS)
    made, real = [], backward.recompute_z
    leaves = [t.detach().requires_grad_(True) if t is not None else None for t in (x, *inputs[1:])]
    with mock.patch.object(backward, "recompute_z", lambda *a: made.append(real(*a)) or made[-1]):
        grads = torch.autograd.grad(cuda_sketched_conv2d(*leaves, *conv), [t for t in leaves if t is not None], g)
    assert len(made) == 1 and len(grads) == len(GRADS)
    if z_by == "kernels":  # conv_rank makes Z in g's layout, cuDNN in x's
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    else:
        fmt = forward.memory_format(x)
    assert made[0].is_contiguous(memory_format=fmt) and made[0].shape[1] == inputs[1].shape[0] * inputs[1].shape[1]
    for got, want in zip(grads, GRADS):
        assert rel_err(got, grads_ref[want]) <= EMULATED_TOL, want


@pytest.mark.parametrize("z_layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("g_layout", ["nchw", "channels_last", "expanded"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_weight_products_match_float64(z_layout, g_layout, dtype):
    """weight_products: dU = scale Σ_pixels z gᵀ for each pairing of layouts, against float64 on fresh inputs."""
    gen = torch.Generator().manual_seed(7)
    N, R, O, H, W = 3, 5, 7, 4, 6
    z = torch.randn(N, R, H, W, generator=gen, dtype=torch.float64)
    g = torch.randn(N, O, H, W, generator=gen, dtype=torch.float64) * 1e3
    g = g.to(dtype)
    if g_layout == "expanded":
        g = g[:1].expand(N, O, H, W)
    elif g_layout == "channels_last":
        g = g.contiguous(memory_format=torch.channels_last)
    want = torch.einsum("nrhw,nohw->ro", z, g.double()) * 0.25
    z = z.to(dtype).contiguous(memory_format=torch.channels_last if z_layout == "channels_last" else
                               torch.contiguous_format)
    dU = torch.full((R, O), float("nan"), dtype=dtype)
    backward.weight_products(dU, z, g, 0.25)
    assert rel_err(dU, want) <= (1e-12 if dtype == torch.float64 else 1e-5)


def _exact_products_round_trip(settings):
    now = lambda: [getattr(obj, name) for obj, name, _ in settings]  # noqa: E731
    before = now()
    with forward.exact_products(False):
        assert now() == before
    with forward.exact_products(True):
        assert now() == [off for *_, off in settings]
    assert now() == before


@pytest.mark.parametrize("nchw_bias", ["torch", "kernel"])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("out_layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("inp_layout", ["nchw", "channels_last", "strided"])
def test_channel_product_matches_float64(out_layout, inp_layout, bias, nchw_bias, emulated_kernels, monkeypatch):
    """channel_product: out = scale · W inp per pixel (+ bias) by cuBLAS for each pairing of NCHW and channels_last
    (one product where both are channels_last, else one per image), against float64 on fresh inputs; where either
    is in neither layout, False and out untouched. An NCHW out's bias is copied in first by torch or, with NCHW_BIAS
    "kernel", by fill_planes (emulated)."""
    monkeypatch.setattr(forward, "NCHW_BIAS", nchw_bias)
    monkeypatch.setattr(forward, "fill_planes", mock.Mock(wraps=forward.fill_planes))
    gen = torch.Generator().manual_seed(11)
    N, Ci, Co, H, W = 3, 5, 7, 4, 6
    inp = _in_layout(torch.randn(N, Ci, H, W, generator=gen, dtype=torch.float64), inp_layout)
    Wt = torch.randn(Co, Ci, generator=gen, dtype=torch.float64)
    b = torch.randn(Co, generator=gen, dtype=torch.float64) if bias else None
    out = _in_layout(torch.full((N, Co, H, W), float("nan"), dtype=torch.float64), out_layout)
    took = forward.channel_product(out, inp, Wt, 0.25, b)
    assert took == ("strided" not in (out_layout, inp_layout))
    assert forward.fill_planes.call_count == (took and bias and out_layout == "nchw" and nchw_bias == "kernel")
    if not took:
        assert out.isnan().all()
        return
    want = torch.einsum("oc,nchw->nohw", Wt, inp) * 0.25 + (b.view(1, Co, 1, 1) if bias else 0)
    assert rel_err(out, want) <= 1e-12


def test_exact_products_turn_tf32_off_and_back():
    """exact_products(True) turns cuBLAS's and cuDNN's TF32 off for its body and puts back what was set;
    exact_products(False) changes nothing. With the legacy flags readable (torch's default), those flags."""
    settings = forward._tf32_settings()
    assert [(obj, name, off) for obj, name, off in settings] == [
        (torch.backends.cuda.matmul, "allow_tf32", False), (torch.backends.cudnn, "allow_tf32", False)]
    _exact_products_round_trip(settings)


def test_exact_products_after_the_program_set_fp32_precision():
    """Once a program has set torch's fp32_precision settings, reading the legacy flags raises (torch 2.13):
    exact_products then sets cuBLAS's, cuDNN convolutions' and RNNs' fp32_precision to "ieee" and puts them back.
    Where torch still reads the legacy flags then (2.11), it takes those."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    with program_set_fp32_precision(None) as legacy_readable:
        settings = forward._tf32_settings()
        if legacy_readable:
            assert settings == ((matmul, "allow_tf32", False), (cudnn, "allow_tf32", False))
        else:
            assert settings == tuple((p, "fp32_precision", "ieee") for p in (matmul, cudnn.conv, cudnn.rnn))
        _exact_products_round_trip(settings)
    assert isinstance(cudnn.allow_tf32, bool)  # readable again


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("name", ["3x3_R6", "5x5_pad2_R48", "dilation2_pad2", "3x2_pad01_R8", "1x1_N1_R20",
                                  "stride2_R6", "1x1_pad1_R8"])
def test_dx_by_kernels_around_emulated_kernels(name, layout, emulated_kernels, dx_by_kernels):
    """backward.DX = "kernels": dx by conv_rank (S flipped and transposed, the padding mirrored) where the
    stride is 1 and the padding at most d (k - 1), cuDNN's input gradient elsewhere; every gradient against
    the reference."""
    inputs, conv = _case(name, torch.float64, device="cpu")
    x = inputs[0].contiguous(memory_format=torch.channels_last) if layout == "channels_last" else inputs[0]
    taken = []
    real = backward.dx_by_kernel
    with mock.patch.object(backward, "dx_by_kernel", lambda *a: taken.append(real(*a)) or taken[-1]):
        run_and_compare((x, *inputs[1:]), conv, GRADS, EMULATED_TOL)
        run_and_compare((x, *inputs[1:]), conv, ("x",), EMULATED_TOL)
    stride, padding, dilation = conv
    ks = CASES[name][7]
    plain = stride == (1, 1) and all(p <= d * (k - 1) for p, d, k in zip(padding, dilation, ks))
    assert plain == (name not in ("stride2_R6", "1x1_pad1_R8"))
    assert taken == [plain] * 2


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_op_around_emulated_kernels_with_bias_kernels(layout, emulated_kernels, monkeypatch):
    """By default (backward.BIAS = "kernels") the bias gradient comes from the (emulated) bias_channels /
    bias_rows launches."""
    assert backward.BIAS == "kernels"
    launched = []
    monkeypatch.setattr(forward.Kernel, "__call__", lambda k, *a, **kw: launched.append(k.name) or _emulate(k, *a, **kw))
    inputs, conv = _case("stride2_R6", torch.float64, device="cpu")
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = inputs[0].contiguous(memory_format=fmt)
    grad_out = torch.randn(cuda_sketched_conv2d(*inputs, *conv).shape, dtype=torch.float64).contiguous(memory_format=fmt)
    run_and_compare((x, *inputs[1:]), conv, GRADS, EMULATED_TOL, grad_out=grad_out)
    bias = [n for n in launched if "bias_" in n]
    # g in x's layout; NCHW planes of 6 x 5 float64 values, aligned: 16-byte loads of 2
    assert bias == ["panther::bias_rows<double>" if layout == "channels_last"
                    else "panther::bias_channels<double, 2, double>"]


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_cudnn_gradients_are_handed_over_not_copied(layout, emulated_kernels, monkeypatch):
    """dx and dS1s are aten.convolution_backward's own tensors, handed to the toolkit (kernel_op's backward
    returns them) rather than copied into buffers of their own, where their strides are the ones promised
    (dx in x's memory format, dS1s contiguous); the values: test_op_around_emulated_kernels_matches_reference."""
    results = []  # (data pointer, strides) of each result: a reference held here would make autograd copy it
    convolution_backward = torch.ops.aten.convolution_backward

    def recorded(*args):
        out = convolution_backward(*args)
        results.append([(t.data_ptr(), t.stride()) for t in out[:2]])
        return out

    monkeypatch.setattr(torch.ops.aten, "convolution_backward", recorded)
    (x, S1s, U1s, b), conv = _case("3x3_R6", torch.float64, device="cpu")
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = x.contiguous(memory_format=fmt).requires_grad_()
    S1s.requires_grad_()
    y = cuda_sketched_conv2d(x, S1s, U1s, b, *conv)
    y.backward(torch.randn(y.shape, dtype=y.dtype).contiguous(memory_format=fmt))
    ((gx, gS),) = results
    assert x.grad.is_contiguous(memory_format=fmt)
    assert gx[1] == x.grad.stride() and x.grad.data_ptr() == gx[0]  # dx comes in x's format: used as it is
    assert S1s.grad.shape == S1s.shape and S1s.grad.is_contiguous()
    contiguous_gS = gS[1] == torch.empty(S1s.shape[0] * S1s.shape[1], *S1s.shape[2:]).stride()
    assert (S1s.grad.data_ptr() == gS[0]) == contiguous_gS  # a channels_last filter gradient is reshaped (copied)
    assert contiguous_gS or layout == "channels_last"


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


# --- CPU: the halo kernels under the CUDA emulation ------------------------------------------------------------

EMU_DIR = Path(__file__).resolve().parent / "sketched_conv2d_emulation"
OP_DIR = Path(forward.__file__).resolve().parent
EMU_DTYPES = {"float32": torch.float32, "tf32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
EMU_TOL = {"float32": 2e-5, "tf32": 8e-3, "float16": 8e-3, "bfloat16": 3e-2}


@pytest.fixture(scope="module")
def conv_emulator(tmp_path_factory):
    """The conv harness binary: sketched_conv2d.cu compiled for the host (skips without a C++20 compiler
    with _Float16 and <barrier>)."""
    return build_harness(tmp_path_factory.mktemp("sketched_conv2d_emulation"), EMU_DIR / "harness.cpp", OP_DIR)


# (mode, layout, N, C, H, W, O, terms, R, (kh, kw), stride, padding, dilation, BM, bias)
EMU_CASES = [
    ("float32", "nchw", 2, 5, 9, 11, 7, 2, 6, (3, 3), (1, 1), (1, 1), (1, 1), 64, 1),  # one chunk, KC = 45 of 48
    ("float32", "channels_last", 1, 19, 13, 12, 9, 2, 17, (3, 3), (2, 2), (0, 0), (1, 1), 64, 0),  # chunks 16 + 3
    ("float32", "nchw", 1, 40, 9, 11, 70, 2, 30, (3, 3), (1, 1), (1, 1), (1, 1), 128, 1),  # S in 16-byte copies
    ("tf32", "nchw", 2, 3, 7, 9, 5, 2, 10, (5, 3), (1, 2), (2, 1), (1, 2), 64, 1),  # mixed pairs, zero taps
    ("tf32", "channels_last", 1, 19, 13, 12, 9, 2, 17, (3, 3), (2, 2), (0, 0), (1, 1), 128, 1),
    ("tf32", "channels_last", 2, 20, 8, 8, 66, 4, 64, (3, 3), (1, 1), (1, 1), (1, 1), 64, 1),  # RP = 64, O = 66
    ("float16", "nchw", 2, 40, 9, 11, 70, 2, 30, (3, 3), (1, 1), (1, 1), (1, 1), 64, 1),  # 8-channel copies
    ("float16", "channels_last", 2, 40, 9, 11, 70, 2, 30, (3, 3), (1, 1), (1, 1), (1, 1), 64, 1),
    ("float16", "nchw", 1, 37, 10, 13, 20, 2, 16, (1, 1), (1, 1), (0, 0), (1, 1), 64, 1),  # 1x1, the dZ shape
    ("float16", "channels_last", 1, 7, 15, 14, 9, 2, 12, (3, 3), (1, 1), (2, 2), (2, 2), 128, 1),  # dilation 2
    ("bfloat16", "nchw", 2, 5, 9, 11, 7, 2, 6, (3, 3), (1, 1), (1, 1), (1, 1), 64, 1),
    ("bfloat16", "channels_last", 1, 21, 12, 13, 67, 4, 64, (3, 3), (1, 1), (2, 2), (2, 2), 128, 1),
    ("bfloat16", "nchw", 1, 16, 11, 10, 33, 2, 24, (3, 3), (2, 2), (1, 1), (1, 1), 64, 0),  # stride 2, one chunk
    ("bfloat16", "nchw", 1, 24, 17, 5, 10, 2, 8, (3, 3), (1, 1), (1, 1), (1, 1), 128, 1),  # narrow: 5 columns
    ("bfloat16", "channels_last", 1, 130, 6, 7, 12, 2, 32, (1, 1), (1, 1), (0, 0), (1, 1), 64, 1),  # 1x1, C > 128
    ("bfloat16", "nchw", 3, 9, 4, 4, 5, 2, 2, (2, 2), (1, 1), (0, 0), (1, 1), 64, 1),  # R = 2, even kernel
    # 8-byte halo loads (rows of aligned groups): 1x1 as the backward's dZ, and a 3x3 in float32
    ("bfloat16", "nchw", 2, 37, 6, 16, 20, 2, 16, (1, 1), (1, 1), (0, 0), (1, 1), 64, 1),
    ("float16", "nchw", 1, 150, 4, 8, 11, 2, 40, (1, 1), (1, 1), (0, 0), (1, 1), 64, 1),  # chunks 128 + 22
    ("tf32", "nchw", 1, 70, 5, 6, 9, 2, 30, (1, 1), (1, 1), (0, 0), (1, 1), 128, 0),
    ("float32", "nchw", 1, 9, 10, 12, 7, 2, 10, (3, 3), (1, 1), (0, 0), (1, 1), 64, 1),
]
# z past 64 columns, in column blocks (the backward's Z at large 2Lk, dx of C > 64 channels): z alone
EMU_COLUMN_CASES = [
    ("bfloat16", "nchw", 1, 12, 7, 9, 5, 2, 150, (3, 3), (1, 1), (1, 1), (1, 1), 64, 1),  # blocks of 64, 64, 22
    ("tf32", "channels_last", 1, 9, 6, 5, 5, 2, 80, (3, 3), (1, 1), (1, 1), (1, 1), 128, 1),
]


def _emu_id(c):
    return "{}_{}_N{}_C{}_{}x{}_O{}_T{}_R{}_k{}x{}_s{}{}_p{}{}_d{}{}_bm{}".format(*c[:9], *c[9], *c[10], *c[11], *c[12], c[13])


# The halo copied by cp.async (the `async` variants), with the copy size x's alignment allows (last item):
# NCHW rows in 16-, 8- and 4-byte copies from an aligned column left of the tile, channels_last pixels in
# whole copies of channels (chunks past C zero-filled), zero padding, strides, dilation, 1x1.
EMU_ASYNC_CASES = [
    ("bfloat16", "nchw", 2, 40, 9, 16, 70, 2, 30, (3, 3), (1, 1), (1, 1), (1, 1), 64, 1, 16),  # chunks 16+16+8
    ("bfloat16", "nchw", 1, 20, 11, 12, 9, 2, 17, (3, 3), (2, 2), (1, 1), (1, 1), 128, 0, 8),  # stride 2
    ("float16", "nchw", 2, 7, 8, 6, 9, 2, 12, (3, 3), (1, 1), (2, 2), (2, 2), 64, 1, 4),  # dilation 2, 2 elements
    ("float16", "nchw", 1, 150, 4, 16, 11, 2, 40, (1, 1), (1, 1), (0, 0), (1, 1), 64, 1, 16),  # 1x1, the dZ shape
    ("float32", "nchw", 1, 9, 10, 10, 7, 2, 10, (3, 3), (1, 1), (0, 0), (1, 1), 64, 1, 8),
    ("float32", "nchw", 2, 5, 9, 11, 7, 2, 6, (5, 5), (1, 1), (2, 2), (1, 1), 64, 1, 4),  # 4-byte copies, odd W
    ("tf32", "nchw", 1, 24, 7, 12, 66, 4, 64, (3, 3), (1, 1), (1, 1), (1, 1), 128, 1, 16),  # RP = 64, O = 66
    ("bfloat16", "channels_last", 1, 40, 9, 11, 70, 2, 30, (3, 3), (1, 1), (1, 1), (1, 1), 64, 1, 16),
    ("float16", "channels_last", 2, 12, 7, 9, 9, 2, 16, (3, 3), (2, 1), (1, 0), (1, 1), 128, 1, 8),
    ("float32", "channels_last", 1, 19, 13, 12, 9, 2, 17, (3, 3), (2, 2), (0, 0), (1, 1), 64, 0, 4),
    ("tf32", "channels_last", 2, 20, 8, 8, 33, 2, 24, (3, 3), (1, 1), (1, 1), (1, 1), 64, 1, 16),
    ("bfloat16", "channels_last", 1, 136, 6, 7, 12, 2, 32, (1, 1), (1, 1), (0, 0), (1, 1), 64, 1, 16),
]


# The tap-major plans (16-bit): pixel-major halos through registers (NCHW, or channels_last not aligned for
# copies) or copies (channels_last), C past a multiple of 16 (zero channels), chunks, taps of 1 to 9, strides
EMU_TAPS_CASES = [
    ("bfloat16", "nchw", 2, 40, 9, 16, 70, 2, 30, (3, 3), (1, 1), (1, 1), (1, 1), 64, 1),  # chunks 16+16+16
    ("bfloat16", "channels_last", 1, 40, 9, 11, 70, 2, 30, (3, 3), (1, 1), (1, 1), (1, 1), 64, 1),  # copies
    ("float16", "channels_last", 2, 3, 8, 7, 9, 2, 12, (3, 3), (2, 1), (1, 0), (1, 1), 128, 1),  # C = 3, elements
    ("float16", "nchw", 1, 150, 4, 16, 11, 2, 40, (1, 1), (1, 1), (0, 0), (1, 1), 64, 1),  # 1x1, the dZ shape
    ("bfloat16", "nchw", 1, 20, 9, 10, 9, 2, 64, (3, 2), (1, 1), (0, 1), (2, 1), 128, 0),  # RP = 64, dilation
    ("float16", "channels_last", 1, 24, 7, 6, 9, 2, 150, (3, 3), (1, 1), (1, 1), (1, 1), 64, 1),  # column blocks
]


def _run_harness(conv_emulator, case, vector=False, copy=0, taps=False, stages=2, u_tiles=False):
    """Runs the harness on the plan the host code picks for ``case`` (a ring of ``stages`` buffers where it
    copies; with ``u_tiles`` the forward's U tiles and bias copied, flag U_ASYNC); checks y and z against
    float64."""
    mode, layout, N, C, H, W, O, terms, R, ks, st, pd, dl, bm, bias = case[:15]
    dtype = EMU_DTYPES[mode]
    x = torch.empty(N, C, H, W, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    S = torch.empty(R, C * ks[0] * ks[1], dtype=dtype)
    Ho, Wo = (forward.output_size(n, k, s, p, d) for n, k, s, p, d in zip((H, W), ks, st, pd, dl))
    width = min(R, forward.HALO_RANKS[-1])  # past 64, z alone in column blocks (forward.conv_rank)
    plan = forward.halo_plan(x, S, width, ks, st, pd, dl, (Ho, Wo), bm, vector_rows=vector, copies=copy > 0,
                             taps=taps, stages=stages)
    assert plan is not None
    th, tw, cc, flags, hb = plan
    assert bool(flags & forward.HALO_VECTOR) == vector and bool(flags & forward.HALO_TAPS) == taps
    if not taps:
        assert flags & sum(forward.HALO_ASYNC.values()) == forward.HALO_ASYNC.get(copy, 0), plan
    rp = next(w for w in forward.HALO_RANKS if w >= width)
    assert forward.halo_stages(flags) == stages, plan
    shared = forward.halo_shared_bytes(dtype, rp, bm, hb, stages, u_tiles)
    if u_tiles:  # the launcher's condition (forward.u_async): O a whole number of 16-byte copies
        assert O * x.element_size() % 16 == 0 and shared <= forward.MAX_SHARED
        flags |= forward.U_ASYNC
    args = [mode, layout, N, C, H, W, O, terms, R, *ks, *st, *pd, *dl, bm, th, tw, cc, flags, shared, bias]
    r = subprocess.run([str(conv_emulator), *map(str, args)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    errs = {name: float(v) for name, v in (line.split() for line in r.stdout.split("\n") if line.strip())}
    assert set(errs) == ({"z"} if vector or R > rp else {"y", "z"})
    bad = {k: v for k, v in errs.items() if not v <= EMU_TOL[mode]}
    assert not bad, f"errors above {EMU_TOL[mode]:g}: {bad} (all: {errs}; plan {plan})"


@pytest.fixture(scope="module")
def bias_emulator(tmp_path_factory):
    """bias_grad.cu compiled for the host (skips as conv_emulator does)."""
    return build_harness(tmp_path_factory.mktemp("bias_grad_emulation"), EMU_DIR / "bias_grad.cpp", OP_DIR)


# (mode, layout, N, O, H, W, plan): channels_last: rows a block of bias_rows (None: the host's 512); nchw
# (bias_channels): the multiprocessors its host plan counts (bias_channels_plan), nchw16 its 16-byte loads
BIAS_EMU_CASES = [
    ("float32", "nchw16", 2, 5, 8, 9, 1),  # 36 loads of 4 a channel: one block each, writing db (and in T)
    ("bfloat16", "nchw16", 9, 3, 64, 72, 1),  # 5184 loads of 8 a block: a second pass, cursors crossing images
    ("float16", "nchw16", 5, 2, 64, 128, 4),  # two blocks a channel (3 and 2 images), partials summed
    ("float32", "nchw", 2, 5, 7, 9, 4),  # fewer multiprocessors than channels: one block each
    ("bfloat16", "nchw", 7, 3, 17, 19, 9),  # three blocks a channel of 3, 3 and 1 images
    ("float16", "nchw", 3, 2, 40, 45, 1),  # 5400 values a block: a second pass (cursors two images and 496 values on)
    ("float32", "nchw", 2, 2, 65, 64, 1),  # planes of 4160 values: a step of 4096 stays in the image or wraps once
    ("float32", "channels_last", 2, 40, 7, 9, 16),  # O = 40: a second column block, 8 lanes of it idle
    ("bfloat16", "channels_last", 3, 70, 5, 11, 72),  # 165 rows: blocks of 72, the last one short
    ("float16", "channels_last", 1, 32, 40, 30, None),  # 1200 rows: the host's plan (512 a block)
]


@pytest.mark.parametrize("case", BIAS_EMU_CASES, ids=lambda c: "-".join(map(str, c[:6])))
def test_bias_kernels_under_emulation(bias_emulator, case):
    """bias_channels (NCHW g) and bias_rows (channels_last g) with the plan the host code picks, their partials
    summed as backward.bias_grad sums them, against float64; where bias_channels writes db itself (one block a
    channel), in T too: each value the float32 sum rounded once."""
    mode, layout, N, O, H, W, plan = case
    if layout == "channels_last":
        per_block, chunks = backward.bias_rows_plan(N * H * W, *([plan] if plan else []))
    else:
        V = 16 // {"float32": 4}.get(mode, 2) if layout == "nchw16" else 1
        per_block, chunks = backward.bias_channels_plan(N, O, H * W // V, plan)
    args = [mode, layout, N, O, H, W, per_block, chunks]
    r = subprocess.run([str(bias_emulator), *map(str, args)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = dict(line.split() for line in r.stdout.strip().split("\n"))
    assert float(lines.pop("db")) <= (1e-6 if mode == "float32" else 1e-5), r.stdout
    assert lines == ({"rounded": "0"} if layout != "channels_last" and chunks == 1 else {}), r.stdout


def test_bias_channels_plan():
    """One block a channel where the channels nearly fill the multiprocessors (the benchmark convs), else up to
    sms // O blocks a channel over its images; fewer images a block where the flattened index would pass 2^31."""
    assert backward.bias_channels_plan(32, 128, 392, 132) == (32, 1)  # the spec conv: db written by the kernel
    assert backward.bias_channels_plan(64, 256, 98, 132) == (64, 1)
    assert backward.bias_channels_plan(32, 16, 392, 132) == (4, 8)
    assert backward.bias_channels_plan(5, 16, 392, 132) == (1, 5)
    assert backward.bias_channels_plan(7, 3, 323, 9) == (3, 3)
    assert backward.bias_channels_plan(4, 128, 2**29, 132) == (3, 2)
    assert backward.bias_channels_plan(1, 8, 2**31 - 1, 132) == (1, 1)


@pytest.mark.parametrize("case", EMU_CASES, ids=_emu_id)
def test_halo_kernels_under_emulation(conv_emulator, case):
    """sketched_conv2d_fwd_halo (y) and conv_rank_halo (z) with the plan the host code picks, against float64."""
    _run_harness(conv_emulator, case, vector=case in EMU_CASES[-4:])  # 8-byte loads: z only (no such forward)


@pytest.mark.parametrize("case", EMU_COLUMN_CASES, ids=_emu_id)
def test_halo_column_blocks_under_emulation(conv_emulator, case):
    """conv_rank_halo past 64 columns of z: one grid row per block of 64 (S's rows and z's columns offset)."""
    _run_harness(conv_emulator, case)


@pytest.mark.parametrize("case", EMU_TAPS_CASES, ids=_emu_id)
def test_tap_major_halo_kernels_under_emulation(conv_emulator, case):
    """The tap-major plans: A and B fragments by ldmatrix from a pixel-major halo, S as (R, kh, kw, C)."""
    _run_harness(conv_emulator, case, taps=True)


@pytest.mark.parametrize("case", EMU_ASYNC_CASES, ids=_emu_id)
def test_async_halo_kernels_under_emulation(conv_emulator, case):
    """The same with the halo copied by cp.async, in the copies the case's alignment allows."""
    _run_harness(conv_emulator, case, copy=case[-1])


# The copies' ring of 3 and 4 buffers: fewer chunks than buffers, as many, and more (the ring wrapping, in
# the middle and at a short last chunk); NCHW rows and channels_last pixels; the tap-major copies
EMU_RING_CASES = [  # (case as EMU_ASYNC_CASES, stages, taps)
    (("bfloat16", "nchw", 1, 16, 9, 16, 33, 2, 30, (3, 3), (1, 1), (1, 1), (1, 1), 64, 1, 16), 3, False),  # 1 chunk
    (("bfloat16", "nchw", 2, 70, 9, 16, 70, 2, 30, (3, 3), (1, 1), (1, 1), (1, 1), 64, 1, 16), 3, False),  # 16 x 4 + 6
    (("float16", "nchw", 1, 56, 8, 8, 20, 2, 24, (3, 3), (1, 1), (1, 1), (1, 1), 128, 1, 16), 4, False),  # 16 x 3 + 8
    (("float32", "nchw", 1, 40, 6, 8, 9, 2, 17, (3, 3), (1, 1), (1, 1), (1, 1), 64, 0, 16), 3, False),  # 5 chunks
    (("tf32", "channels_last", 1, 50, 7, 6, 9, 2, 24, (3, 3), (1, 1), (1, 1), (1, 1), 64, 1, 8), 3, False),
    (("bfloat16", "channels_last", 2, 72, 6, 7, 40, 2, 64, (3, 3), (1, 1), (1, 1), (1, 1), 128, 1, 16), 3, False),
    (("float16", "nchw", 1, 300, 4, 16, 11, 2, 16, (1, 1), (1, 1), (0, 0), (1, 1), 64, 1, 16), 4, False),  # 1x1
    (("bfloat16", "channels_last", 1, 72, 9, 11, 70, 2, 30, (3, 3), (1, 1), (1, 1), (1, 1), 64, 1, 16), 4, True),
]


# The fused forward's U tiles and bias copied one tile ahead (U_ASYNC): one tile, a short last tile, several
# tiles (both buffers reused), no bias, every loader (registers, copies, taps), RP 16 / 32 / 64
EMU_U_TILE_CASES = [  # (case as EMU_ASYNC_CASES, copies, taps)
    (("bfloat16", "nchw", 2, 12, 9, 16, 64, 2, 30, (3, 3), (1, 1), (1, 1), (1, 1), 64, 1, 16), True, False),
    (("bfloat16", "channels_last", 1, 40, 9, 11, 72, 2, 12, (3, 3), (1, 1), (1, 1), (1, 1), 64, 1, 16), True, False),
    (("float16", "nchw", 1, 20, 7, 9, 200, 2, 64, (3, 3), (1, 1), (1, 1), (1, 1), 128, 0, 0), False, False),
    (("float32", "nchw", 2, 9, 10, 10, 36, 2, 10, (3, 3), (1, 1), (0, 0), (1, 1), 64, 1, 8), True, False),
    (("tf32", "channels_last", 1, 20, 8, 8, 132, 2, 24, (3, 3), (2, 2), (1, 1), (1, 1), 64, 1, 16), True, False),
    (("bfloat16", "channels_last", 1, 40, 9, 11, 136, 2, 30, (3, 3), (1, 1), (1, 1), (1, 1), 64, 1, 0), False, True),
]


@pytest.mark.parametrize("case, copies, taps", EMU_U_TILE_CASES,
                         ids=lambda v: _emu_id(v) if isinstance(v, tuple) else str(v))
def test_forward_u_tiles_copied_ahead_under_emulation(conv_emulator, case, copies, taps):
    """With U_ASYNC the forward's U tile and bias arrive by cp.async a tile ahead (the first during the main
    loop); the emulation lands them only when waited for, so a tile read early shows."""
    _run_harness(conv_emulator, case, copy=case[-1] if copies else 0, taps=taps, u_tiles=True)


@pytest.mark.parametrize("case, stages, taps", EMU_RING_CASES, ids=lambda v: _emu_id(v) if isinstance(v, tuple) else str(v))
def test_async_ring_of_buffers_under_emulation(conv_emulator, case, stages, taps):
    """The cp.async loaders with a ring of 3 or 4 buffers: each chunk's copies land before its products read
    them (the emulation lands a copy only when its group is waited for) and no buffer is overwritten while read."""
    _run_harness(conv_emulator, case, copy=0 if taps else case[-1], taps=taps, stages=stages)


# --- tools/conv_bounds.py: its edits of the source (its timings need a GPU) ---------------------------------------


def _bounds_tool():
    import importlib.util

    path = OP_DIR.parents[2].parent / "tools" / "conv_bounds.py"
    spec = importlib.util.spec_from_file_location("conv_bounds", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bounds_tool_edits_apply_to_the_source():
    """Every edit the tool makes finds its text once in today's sketched_conv2d.cu, and each variant's source differs
    from the op's by exactly its edits."""
    tool = _bounds_tool()
    assert {e for v in tool.VARIANTS for e in v} == set(tool.EDITS)
    base = (OP_DIR / tool.SOURCE).read_text()
    assert tool.patched_source((), OP_DIR) == base
    for v in tool.VARIANTS:
        text = tool.patched_source(v, OP_DIR)
        undone = text
        for name in v:
            for old, new in tool.EDITS[name]:
                assert new in text
                undone = undone.replace(new, old)
        assert undone == base


def test_bounds_tool_refuses_an_edit_whose_text_is_gone(monkeypatch):
    tool = _bounds_tool()
    monkeypatch.setitem(tool.EDITS, "gone", [("no such line\n", "x")])
    with pytest.raises(ValueError, match="'no such line' occurs 0 times in sketched_conv2d.cu"):
        tool.patched_source(("gone",), OP_DIR)
