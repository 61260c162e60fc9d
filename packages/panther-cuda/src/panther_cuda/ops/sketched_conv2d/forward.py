"""Launchers of the sketched conv2d kernels (``sketched_conv2d.cu``) and the forward pass.

* :func:`sketched_conv2d_forward` — y = U1ᵀ conv(x, S1) / (2L) + b in one fused kernel; the intermediate
  Z = conv(x, S1) (2·L·k channels) stays in shared memory.
* :func:`conv_rank` — Z = scale · conv(x, S) written to memory (the backward's dZ and recomputed Z).
* :func:`forward_outputs` — the output, allocated in the input's memory format (also the fake kernel).

Tensors in the kernels: x and the output by strides (NCHW, channels_last or any other); S1s, U1s and
bias made contiguous here (they are small).
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from panther.backends.toolkit import cdiv, device_guard
from panther_cuda._nvrtc import Kernel, f32, i32, i64

SOURCE = "ops/sketched_conv2d/sketched_conv2d.cu"
BM = 64  # output pixels per block (sketched_conv2d.cu: conv::BM)
BK = 32  # im2col depth per step (conv::BK)
BN = 64  # output channels per epilogue tile (conv::BN)
THREADS = 128
RANK_TILES = (16, 32, 64, 128, 192, 256)  # the fused forward's on-chip widths RP of Z (>= R)

_CTYPES = {torch.float32: "float", torch.float16: "__half", torch.bfloat16: "__nv_bfloat16"}
_kernels: Dict[Tuple[str, str, int, bool], Kernel] = {}


def _kernel(name: str, dtype: torch.dtype, width: int, exact: bool) -> Kernel:
    key = (name, _CTYPES[dtype], width, exact)
    kernel = _kernels.get(key)
    if kernel is None:
        expression = f"panther::{name}<{key[1]}, {width}, {'true' if exact else 'false'}>"
        kernel = _kernels[key] = Kernel(SOURCE, expression)
    return kernel


def _pad(dtype: torch.dtype) -> int:
    return 8 if dtype in (torch.float16, torch.bfloat16) else 4  # conv::Pad<T>


def rank_shared_bytes(dtype: torch.dtype, rc: int) -> int:
    """Dynamic shared memory of conv_rank<T, rc>, the stage-1 workspace: two column tables of BK entries
    (8 + 4 + 4 bytes each), the im2col tile and the S tile ((BM + rc) x BK, padded rows)."""
    return 2 * BK * 16 + torch.empty((), dtype=dtype).element_size() * (BM + rc) * (BK + _pad(dtype))


def fwd_shared_bytes(dtype: torch.dtype, rp: int) -> int:
    """Dynamic shared memory of sketched_conv2d_fwd<T, rp>: Z (BM x rp, padded rows), then the larger of
    the stage-1 workspace and the U tile (RC x BN, padded rows)."""
    pad, size = _pad(dtype), torch.empty((), dtype=dtype).element_size()
    rc = min(rp, 64)
    return size * BM * (rp + pad) + max(rank_shared_bytes(dtype, rc), size * rc * (BN + pad))


def rank_tile(R: int) -> int:
    """RP of the fused forward: the smallest on-chip width >= R."""
    return next(w for w in RANK_TILES if w >= R)


def exact_float32(dtype: torch.dtype, allow_tf32: bool) -> bool:
    """Exact FFMA products (float32 at matmul precision "highest"), else tensor cores."""
    return dtype == torch.float32 and not allow_tf32


def output_size(size: int, kernel: int, stride: int, padding: int, dilation: int):
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def memory_format(x: Tensor) -> torch.memory_format:
    """channels_last for a channels_last (and not also contiguous) input, as nn.Conv2d; else contiguous."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def forward_outputs(x: Tensor, S1s: Tensor, U1s: Tensor, bias: Optional[Tensor], stride_h: int, stride_w: int,
                    padding_h: int, padding_w: int, dilation_h: int, dilation_w: int, allow_tf32: bool):
    """``(y,)``: y of shape (N, O, H', W') in x's memory format, not written."""
    _, _, C, kh, kw = S1s.shape
    N, _, H, W = x.shape
    Ho = output_size(H, kh, stride_h, padding_h, dilation_h)
    Wo = output_size(W, kw, stride_w, padding_w, dilation_w)
    y = torch.empty((N, U1s.shape[-1], Ho, Wo), dtype=x.dtype, device=x.device, memory_format=memory_format(x))
    return (y,)


def _geometry(x: Tensor, kh: int, kw: int, out: Tensor, stride, padding, dilation):
    """The kernels' geometry arguments from C through dw, and M (as NumPy scalars)."""
    N, C, H, W = x.shape
    Ho, Wo = out.shape[-2:]
    return (
        i32(C), i32(H), i32(W), i32(Ho), i32(Wo), i32(kh), i32(kw), i32(stride[0]), i32(stride[1]),
        i32(padding[0]), i32(padding[1]), i32(dilation[0]), i32(dilation[1]), i64(N * Ho * Wo),
    )


def _strides(t: Tensor):
    return tuple(i64(s) for s in t.stride())


def sketched_conv2d_forward(y: Tensor, x: Tensor, S1s: Tensor, U1s: Tensor, bias: Optional[Tensor],
                            stride: Tuple[int, int], padding: Tuple[int, int], dilation: Tuple[int, int],
                            allow_tf32: bool) -> None:
    """Writes y = 1/(2L) Σ_i U1_iᵀ conv(x, S1_i) + b into ``y`` (N, O, H', W'), any strides."""
    terms, k, C, kh, kw = S1s.shape
    R, O = terms * k, U1s.shape[-1]
    M = y.shape[0] * y.shape[2] * y.shape[3]
    if M == 0:
        return
    rp = rank_tile(R)
    kernel = _kernel("sketched_conv2d_fwd", x.dtype, rp, exact_float32(x.dtype, allow_tf32))
    S = S1s.contiguous()
    U = U1s.contiguous()
    b = bias.contiguous() if bias is not None else None
    with device_guard(x):
        kernel(
            (cdiv(M, BM),), (THREADS,), x, S, U, b, y, *_geometry(x, kh, kw, y, stride, padding, dilation),
            i32(R), i32(O), *_strides(x), *_strides(y), f32(1.0 / terms),
            shared_mem=fwd_shared_bytes(x.dtype, rp),
        )


def conv_rank(z: Tensor, x: Tensor, S: Tensor, kernel_size: Tuple[int, int], stride: Tuple[int, int],
              padding: Tuple[int, int], dilation: Tuple[int, int], scale: float, allow_tf32: bool) -> None:
    """Writes z (N, R, H', W'), any strides, = scale · conv2d(x, S) with S contiguous (R, C·kh·kw)."""
    N, R, Ho, Wo = z.shape
    M = N * Ho * Wo
    if M == 0:
        return
    rc = 16 if R <= 16 else 32 if R <= 32 else 64
    kernel = _kernel("conv_rank", x.dtype, rc, exact_float32(x.dtype, allow_tf32))
    with device_guard(x):
        kernel(
            (cdiv(M, BM), cdiv(R, rc)), (THREADS,), x, S, z,
            *_geometry(x, kernel_size[0], kernel_size[1], z, stride, padding, dilation), i32(R),
            *_strides(x), *_strides(z), f32(scale),
            shared_mem=rank_shared_bytes(x.dtype, rc),
        )
