"""The backward pass of the sketched conv2d op.

With R = 2·L·k, S = S1s as (R, C, kh, kw), U = U1s as (R, O) and g = dL/dy (N, O, H', W'):
    dZ = U g / (2L)                       (N, R, H', W'), in the layout of x as cuDNN takes it: cuBLAS products
                                          where g is NCHW or channels_last (one product where g and dZ are both
                                          channels_last, else one per image), else the conv_rank kernel, a 1x1
                                          convolution of g (always with DZ = "kernels")
    dx, dS = the convolution's input and weight gradients given dZ: aten.convolution_backward (cuDNN), in the
                                          layout forward.CUDNN_LAYOUT says (dZ made in it, dx transposed back to
                                          x's by transpose_planes);
                                          with DX = "kernels", dx by the conv_rank kernel where it is a plain
                                          convolution of dZ (stride 1): by S flipped and transposed
    dU = Zᵀ g / (2L)                      Z = conv(x, S) recomputed by cuDNN (or the conv_rank kernel with
                                          Z = "kernels", in g's layout), then cuBLAS (weight_products): both
                                          channels_last one product, else a product per image summed in float32
    db = Σ_{n, h, w} g                    the bias_channels / bias_rows kernels (bias_grad.cu; BIAS = "kernels"):
                                          sums in float32, written into db by one block a channel where the
                                          channels fill the GPU, else partials summed after; torch's with "torch"
Z is recomputed only when U1s needs a gradient (the forward does not keep it).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from panther.backends.toolkit import cdiv, device_guard, multiprocessors
from panther_cuda._nvrtc import i32, i64, make_context_current
from panther_cuda.ops.sketched_conv2d.forward import (
    _CTYPES, MAX_GRID_Y, _kernel, channel_product, conv_rank, cudnn_algorithms, cudnn_input, exact_float32,
    exact_products, memory_format, pixel_columns, transpose_planes, vector_values,
)

# "gemm": dZ by cuBLAS where g's layout allows (channel_product), else by conv_rank (a 1x1 convolution of g);
# "kernels": always conv_rank. cuBLAS was the faster in the recorded runs (benchmarks/results/NOTES.md)
DZ = "gemm"
# "cudnn": dx from aten.convolution_backward with dS, the faster in the recorded runs; "kernels": dx by conv_rank
# where dx_by_kernel takes it
DX = "cudnn"
# "cudnn": the Z that dU needs recomputed by cuDNN's convolution, the faster in the recorded runs
# (benchmarks/results/NOTES.md); "kernels": by conv_rank
Z = "cudnn"


def recompute_z(x: Tensor, S: Tensor, stride, padding, dilation, g: Tensor, allow_tf32: bool) -> Tensor:
    """Z = conv(x, S) (N, R, H', W'): with Z = "cudnn" by cuDNN, NCHW-contiguous or channels_last as it made it
    (x as the op's cuDNN convolutions take it, :func:`cudnn_input`); else by conv_rank, in g's memory format
    (contiguous where g is neither NCHW nor channels_last)."""
    if Z == "cudnn":
        with exact_products(exact_float32(x.dtype, allow_tf32)), cudnn_algorithms():
            return torch.nn.functional.conv2d(cudnn_input(x), S, None, tuple(stride), tuple(padding), tuple(dilation))
    fmt = memory_format(g)
    R, _, kh, kw = S.shape
    N, _, Ho, Wo = g.shape
    z = torch.empty((N, R, Ho, Wo), dtype=g.dtype, device=g.device, memory_format=fmt)
    conv_rank(z, x, S.view(R, -1), (kh, kw), stride, padding, dilation, 1.0, allow_tf32)
    return z


def weight_products(dU: Tensor, z: Tensor, g: Tensor, scale: float) -> None:
    """Writes dU = scale Σ_{n, h, w} z[n, :, h, w] g[n, :, h, w]ᵀ (R x O) by cuBLAS: one product over every pixel
    where z and g are both channels_last; else per image, each of z and g read NCHW or channels_last as it is
    (made NCHW-contiguous where it is neither; 16-bit images' products kept in float32 on CUDA), then their sum in
    float32. One rounding to dU's dtype (16-bit types, CUDA), the scale applied in float32."""
    N, O, Ho, Wo = g.shape
    R = z.shape[1]
    cl = torch.channels_last
    both_nchw = z.is_contiguous() and g.is_contiguous()
    if not both_nchw and z.is_contiguous(memory_format=cl) and g.is_contiguous(memory_format=cl):
        M = N * Ho * Wo
        torch.addmm(dU, z.permute(0, 2, 3, 1).reshape(M, R).t(), g.permute(0, 2, 3, 1).reshape(M, O), beta=0,
                    alpha=scale, out=dU)
        return
    zc, gc = pixel_columns(z), pixel_columns(g)
    zc = pixel_columns(z.contiguous()) if zc is None else zc
    gc = pixel_columns(g.contiguous()) if gc is None else gc
    wide = g.is_cuda and g.element_size() == 2
    per_image = torch.bmm(zc, gc.transpose(1, 2), **({"out_dtype": torch.float32} if wide else {}))
    torch.mul(per_image.sum(0), scale, out=dU)  # rounded once, to dU's dtype


def dx_by_kernel(dx: Tensor, dZ: Tensor, S: Tensor, stride, padding, dilation, allow_tf32: bool) -> bool:
    """Writes dx = conv_transpose(dZ, S) by conv_rank and returns True where that is a plain convolution:
    stride 1 and padding p <= d (k - 1) per axis; then dx = conv(dZ, S', padding d (k - 1) - p, dilation d)
    with S'[c, r, i, j] = S[r, c, k - 1 - i, k - 1 - j]. False (nothing written) elsewhere."""
    R, C, kh, kw = S.shape
    if tuple(stride) != (1, 1) or any(p > d * (k - 1) for p, d, k in zip(padding, dilation, (kh, kw))):
        return False
    St = S.flip(2, 3).transpose(0, 1).reshape(C, R * kh * kw)  # contiguous (C, R kh kw)
    pad = tuple(d * (k - 1) - p for p, d, k in zip(padding, dilation, (kh, kw)))
    conv_rank(dx, dZ, St, (kh, kw), (1, 1), pad, tuple(dilation), 1.0, allow_tf32)
    return True


def sketched_conv2d_backward(grads, g: Tensor, x: Tensor, S1s: Tensor, U1s: Tensor, stride, padding, dilation,
                             needs, allow_tf32: bool) -> list:
    """The gradients that ``needs`` asks for, as :func:`panther.backends.toolkit.kernel_op` takes them: written
    into ``grads`` = (dx, dS1s, dU1s, dbias), or, for those cuDNN computes (dx, dS1s), returned in a list of
    four (None for the others) to be used in place of the allocated ones."""
    dx, dS1s, dU1s, dbias = grads
    given = [None] * 4
    need_x, need_S, need_U, need_b = needs
    terms, k, C, kh, kw = S1s.shape
    R, O = terms * k, U1s.shape[-1]
    N, _, Ho, Wo = g.shape
    if N * Ho * Wo == 0:  # no output pixels: every gradient is zero
        for grad, need in zip(grads, needs):
            if need:
                grad.zero_()
        return given
    if g.is_cuda:  # its first call may be cuBLAS's, on a thread with no context yet
        make_context_current(g.get_device())
    S = S1s.reshape(R, C, kh, kw).contiguous()
    exact = exact_float32(x.dtype, allow_tf32)
    xc = cudnn_input(x) if need_x or need_S else x  # x as the op's cuDNN calls take it, made once
    if need_x or need_S:
        dZ = torch.empty((N, R, Ho, Wo), dtype=g.dtype, device=g.device, memory_format=memory_format(xc))
        U = U1s.reshape(R, O).contiguous()
        by_gemm = False
        if DZ == "gemm":
            with exact_products(exact):
                by_gemm = channel_product(dZ, g, U, 1.0 / terms)
        if not by_gemm:
            conv_rank(dZ, g, U, (1, 1), (1, 1), (0, 0), (1, 1), 1.0 / terms, allow_tf32)
        if need_x and DX == "kernels" and dx_by_kernel(dx, dZ, S, stride, padding, dilation, allow_tf32):
            need_x = False  # written
        if need_x or need_S:
            with exact_products(exact), cudnn_algorithms():
                gx, gS, _ = torch.ops.aten.convolution_backward(
                    dZ, xc, S, None, list(stride), list(padding), list(dilation), False, [0, 0], 1,
                    [bool(need_x), bool(need_S), False],
                )
            cl = torch.channels_last
            if need_x and xc is not x and not gx.is_contiguous() and gx.is_contiguous(memory_format=cl) \
                    and dx.is_contiguous():
                transpose_planes(dx, gx)  # cuDNN's channels_last dx, back in x's layout
            elif need_x:
                given[0] = gx  # cuDNN's, in place of dx (the toolkit copies it where its strides differ)
            if need_S:
                given[1] = gS.unflatten(0, (terms, k))  # a view, in whatever layout cuDNN wrote it
    if need_U:
        z = recompute_z(xc, S, stride, padding, dilation, g, allow_tf32)
        with exact_products(exact):
            weight_products(dU1s.view(R, O), z, g, 1.0 / terms)
    if need_b:
        bias_grad(g, out=dbias)
    return given


# "kernels": bias_grad.cu's for NCHW and channels_last g, the faster in the recorded runs
# (benchmarks/results/NOTES.md); "torch": torch's reductions
BIAS = "kernels"
BIAS_SOURCE = "ops/sketched_conv2d/bias_grad.cu"
BIAS_THREADS = 256  # bias_grad.cu: bias::THREADS (bias_rows)
BIAS_CHANNEL_THREADS = 512  # bias::CHANNEL_THREADS (bias_channels)
BIAS_ROWS_PER_BLOCK = 512  # rows of a channels_last g one block of bias_rows sums (64 per warp), at least
INDEX_LIMIT = 2**31  # bias_channels' flattened index over a block's images (32-bit)


def bias_rows_plan(rows: int, per_block: int = BIAS_ROWS_PER_BLOCK) -> tuple:
    """(rows per block, blocks) of bias_rows over ``rows`` rows: ``per_block`` rows a block, more where the
    grid's y dimension would pass CUDA's limit."""
    per_block = max(per_block, cdiv(rows, MAX_GRID_Y))
    return per_block, cdiv(rows, per_block)


def bias_channels_plan(N: int, O: int, loads: int, sms: int) -> tuple:
    """(images per block, blocks per channel) of bias_channels: one block per channel where the O channels
    give every multiprocessor a block or nearly (then the blocks write db itself), else each channel's N
    images split over up to ``sms // O`` blocks; fewer images a block where its ``loads`` a plane would pass
    the kernel's 32-bit index. The sums' order follows the plan, so db is the same from run to run on one GPU
    (or on GPUs of the same multiprocessor count), not necessarily across GPUs."""
    per = min(cdiv(N, max(1, min(N, sms // max(O, 1), MAX_GRID_Y))), (INDEX_LIMIT - 1) // loads)
    return per, cdiv(N, per)


def _multiprocessors(g: Tensor) -> int:
    return multiprocessors(g.device.index) if g.is_cuda else 1  # the CPU emulation's: one


def bias_grad(g: Tensor, kernels: Optional[bool] = None, out: Optional[Tensor] = None) -> Tensor:
    """Σ_{n, h, w} g in float32 (float64 for float64 g, the CPU emulation's), deterministic; written into
    ``out`` (any dtype, rounded once) and returned where it is given.

    With ``kernels`` (default: :data:`BIAS` is ``"kernels"``), an NCHW g is summed per channel by
    ``bias_channels`` (straight into a contiguous ``out`` of g's dtype or float32 where one block takes each
    channel: :func:`bias_channels_plan`) and a channels_last g per block of rows by ``bias_rows``, and their
    float32 partial sums over their first axis; each kernel reads g once. Otherwise, and for other layouts
    (expanded, sliced), torch: an NCHW g summed per (n, o) plane (H·W contiguous values), then over n, faster
    than torch's one reduction over (0, 2, 3), which takes the other layouts (benchmarks/results/NOTES.md)."""
    N, O, H, W = g.shape
    if out is not None and (out.shape != (O,) or out.device != g.device):
        raise ValueError(f"bias_grad: out is {tuple(out.shape)} on {out.device}, expected ({O},) on {g.device} "
                         "(one value per channel of g)")
    acc = torch.promote_types(g.dtype, torch.float32)
    kernels = BIAS == "kernels" if kernels is None else kernels
    channels_last = memory_format(g) == torch.channels_last
    plane = H * W
    if not kernels or g.numel() == 0 or not (g.is_contiguous() or channels_last) or max(N, O, plane) >= INDEX_LIMIT:
        if g.is_contiguous():
            total = g.view(N, O, plane).sum(-1, dtype=acc).sum(0)
        else:
            total = g.sum((0, 2, 3), dtype=acc)
        return total if out is None else out.copy_(total)
    with device_guard(g):
        if not channels_last:  # N planes of H·W values per channel, in 16-byte loads where aligned
            V = vector_values(g, plane)
            per, splits = bias_channels_plan(N, O, plane // V, _multiprocessors(g))
            direct = splits == 1 and out is not None and out.is_contiguous() and out.dtype in (g.dtype, acc)
            partial = out if direct else torch.empty((splits, O), dtype=acc, device=g.device)
            _kernel("bias_channels", g.dtype, V, _CTYPES[partial.dtype], source=BIAS_SOURCE)(
                (O, splits), (BIAS_CHANNEL_THREADS,), g, partial, i32(N), i32(O), i32(plane), i32(per),
                shared_mem=4 * BIAS_CHANNEL_THREADS,
            )
            if direct:
                return out
        else:  # N·H·W rows of O values
            rows = N * H * W
            per_block, chunks = bias_rows_plan(rows)
            partial = torch.empty((chunks, O), dtype=acc, device=g.device)
            _kernel("bias_rows", g.dtype, source=BIAS_SOURCE)(
                (cdiv(O, 32), chunks), (BIAS_THREADS,), g, partial, i64(rows), i32(O), i64(per_block),
                shared_mem=4 * BIAS_THREADS,
            )
    total = partial.sum(0)
    return total if out is None else out.copy_(total)
