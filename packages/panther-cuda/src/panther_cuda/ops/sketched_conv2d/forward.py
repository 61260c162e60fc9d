"""Launchers of the sketched conv2d kernels (``sketched_conv2d.cu``) and the forward pass.

* :func:`sketched_conv2d_forward` — y = U1ᵀ conv(x, S1) / (2L) + b in one fused kernel; the intermediate
  Z = conv(x, S1) (2·L·k channels) stays on chip. For a channels_last x, or where Z's depth is large
  (:func:`fused_forward`), composed instead: Z by cuDNN's convolution, then y by one cuBLAS product
  (:func:`composed_forward`).
* :func:`conv_rank` — Z = scale · conv(x, S) written to memory (the backward's dZ where cuBLAS cannot take g's
  layout; its dZ, recomputed Z and dx where backward.DZ, Z and DX ask for the package's kernels).
* :func:`forward_outputs` — the output, allocated in the input's memory format (also the fake kernel).

Two kernel families compute the same math. The halo kernels (``*_halo``, R <= 64) take a tile of TH x TW
output pixels of one image per block and load the input halo of those pixels, a chunk of CC channels at
a time, into shared memory with coalesced loads (through registers, or with the ``async`` variants by
cp.async copies of 4, 8 or 16 bytes; with the ``taps`` variants (16-bit) pixel-major, the depth tap by tap,
A and B fragments by ldmatrix); :func:`halo_plan` picks the tile and the chunk, or
returns None where the limits of those kernels are passed (R > 64, a kernel window of more than 144
taps, a halo row too wide), and the generic kernels (``sketched_conv2d_fwd``, ``conv_rank``: 64 output
pixels per block gathered element by element) take the rest. :data:`VARIANT` forces one of them.

Tensors in the kernels: x and the output by strides (NCHW, channels_last or any other); S1s, U1s and
bias made contiguous here (they are small).
"""

from __future__ import annotations

import contextlib
import functools
import re
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from panther.backends.toolkit import cdiv, device_guard
from panther_cuda._nvrtc import Kernel, f32, i32, i64

SOURCE = "ops/sketched_conv2d/sketched_conv2d.cu"
PLANES_SOURCE = "ops/sketched_conv2d/planes.cu"
TRANSPOSE_TILE, TRANSPOSE_ROWS = 32, 8  # planes.cu: planes::TILE, planes::ROWS (the block: TILE x ROWS threads)
FILL_THREADS = 256  # planes::FILL_THREADS
FILL_BLOCKS = 65536  # fill_planes' blocks at most (it strides over the rest)
MAX_GRID_Y = 65535  # CUDA's limit on a grid's y dimension (transpose_planes' planes; the bias kernels' rows, splits)
BM = 64  # output pixels per block (sketched_conv2d.cu: conv::BM)
BK = 32  # im2col depth per step (conv::BK)
BN = 64  # output channels per epilogue tile (conv::BN)
THREADS = 128
RANK_TILES = (16, 32, 64, 128, 192, 256)  # the fused forward's on-chip widths RP of Z (>= R)

HALO_TILES = (64, 128)  # output pixels per block of the halo kernels (template parameter BM)
HALO_RANKS = (16, 32, 64)  # their widths RP of Z (>= R)
HALO_PASSES = 16  # halo elements one thread loads per channel chunk, at most (conv::HALO_PASSES)
KC_MAX = 144  # im2col depth of one channel chunk, CC·kh·kw, at most (conv::KC_MAX)
# the halo kernels' flags (conv::HALO_CHANNELS_INNER, conv::S_VECTOR, conv::HALO_VECTOR, conv::HALO_ASYNC*)
HALO_CHANNELS_INNER, S_VECTOR, HALO_VECTOR = 1, 2, 4
HALO_ASYNC = {4: 8, 8: 16, 16: 32}  # bytes per cp.async copy -> flag
HALO_TAPS = 64  # flag: pixel-major halo, the depth tap by tap (conv::HALO_TAPS); S passed as (R, kh, kw, C)
HALO_VPASSES = HALO_PASSES // 2  # 8-byte halo loads one thread makes per channel chunk, at most
ASYNC_PASSES = 8  # cp.async copies of the halo one thread issues per channel chunk, at most (conv::ASYNC_PASSES)
HALO_STAGES_SHIFT = 7  # flags bits 7-8: the cp.async loaders' ring of 2 + that many buffers (conv::halo_stages)
MAX_STAGES = 4
U_ASYNC = 512  # flag (the fused forward): U tiles and bias by cp.async, one tile ahead (conv::U_ASYNC)
LOAD_ELEMENTS, LOAD_ROWS8, LOAD_ASYNC, LOAD_TAPS = 0, 1, 2, 4  # the kernels' template parameter LOAD (bits)
MAX_SHARED = 99 * 1024  # dynamic shared memory a plan may take (the opt-in limit of sm_86 / sm_89)
# None: the default (:func:`default_family`): the cp.async halo kernels, 64 pixels per block for R <= 32 and
# 128 above, where halo_plan allows, else the generic ones; "halo64" /
# "halo128": that many pixels per block where allowed (else generic), "halo64:4x16": with that tile of
# TH x TW output pixels (clipped to the output) where allowed; "async64", "async128", "async64:8x8": the
# same with the halo copied by cp.async where x is aligned for it; "taps64", "taps128", "taps64:8x8": pixel-major
# halos, the depth tap by tap (16-bit; copied where x is channels_last and aligned); "generic": the generic
# kernels. A copying family takes a ring of 2 to 4 buffers, "async64s3" (default: :data:`STAGES`; fewer where
# shared memory does not hold them). For timing.
VARIANT: Optional[str] = None
# buffers of the cp.async loaders' ring by default (halo_plan's ``stages``): 3 and 4 were no faster at the
# benchmark convs (tools/conv_sweep.py; benchmarks/results/NOTES.md)
STAGES = 2
# the fused halo forward's U tiles and bias: "async" copied one tile ahead where aligned (u_async), the faster
# in the recorded runs; "loads" through registers when their tile comes, for timing
U_TILES = "async"

# how the op's cuDNN convolutions (the composed forward's, the backward's) choose their algorithm (cudnn_algorithms):
# "heuristic", as torch's settings say (by default cuDNN's heuristics); "timed": cuDNN times the candidates on a
# convolution's first call outside CUDA-graph capture and keeps the fastest. tools/conv_sweep.py times both (+timed;
# benchmarks/results/NOTES.md)
CUDNN_ALGORITHMS = "heuristic"
# the layout of those convolutions for an NCHW x: "input", x's own (cuDNN's engines for sm_90 take NHWC: it
# transposes x, dZ and S to NHWC inside each call, and dx and Z back); "channels_last": x copied to channels_last
# once per pass (cudnn_input), Z and dZ taken and made by cuBLAS in that layout, the backward's dx transposed back
# to x's (both by planes.cu's transpose_planes). tools/conv_sweep.py times both (+cl; benchmarks/results/NOTES.md)
CUDNN_LAYOUT = "input"
# how channel_product puts the bias into an NCHW out before its product adds to it: "torch", torch's copy of the
# expanded bias, element by element; "kernel", planes.cu's fill_planes, in 16-byte stores. tools/conv_sweep.py
# times both (+fill; benchmarks/results/NOTES.md)
NCHW_BIAS = "torch"

# None: the fused kernels where fused_forward's rule takes them, else composed; "fused" / "composed": always
FORWARD: Optional[str] = None
# the rule's bound on R·C·kh·kw (Z's products per output pixel) for an x that is not channels_last: the fused
# kernels up to it, cuDNN and cuBLAS above; a channels_last x always composed (benchmarks/results/NOTES.md)
FUSED_DEPTH_MAX = 32768

_CTYPES = {torch.float32: "float", torch.float16: "__half", torch.bfloat16: "__nv_bfloat16"}
_kernels: Dict[tuple, Kernel] = {}


def _kernel(name: str, dtype: torch.dtype, *params, source: str = SOURCE) -> Kernel:
    """The instance name<T, *params> of ``source`` (params: e.g. the width RP, exact, the halo kernels' BM
    and LOAD; bools as true / false), compiled on first use."""
    key = (source, name, _CTYPES[dtype], *params)
    kernel = _kernels.get(key)
    if kernel is None:
        args = [key[2]] + ["true" if a is True else "false" if a is False else str(a) for a in params]
        kernel = _kernels[key] = Kernel(source, f"panther::{name}<{', '.join(args)}>")
    return kernel


def _pad(dtype: torch.dtype) -> int:
    return 8 if dtype in (torch.float16, torch.bfloat16) else 4  # conv::Pad<T>


def rank_shared_bytes(dtype: torch.dtype, rc: int) -> int:
    """Dynamic shared memory of conv_rank<T, rc>, the stage-1 workspace: two column tables of BK entries
    (8 + 4 + 4 bytes each), the im2col tile and the S tile ((BM + rc) x BK, padded rows)."""
    return 2 * BK * 16 + dtype.itemsize * (BM + rc) * (BK + _pad(dtype))


def fwd_shared_bytes(dtype: torch.dtype, rp: int) -> int:
    """Dynamic shared memory of sketched_conv2d_fwd<T, rp>: Z (BM x rp, padded rows), then the larger of
    the stage-1 workspace and the U tile (RC x BN, padded rows)."""
    pad, size = _pad(dtype), dtype.itemsize
    rc = min(rp, 64)
    return size * BM * (rp + pad) + max(rank_shared_bytes(dtype, rc), size * rc * (BN + pad))


def halo_stages(flags: int) -> int:
    """The buffers of a plan's ring (conv::halo_stages): 2, or up to MAX_STAGES for the cp.async loaders."""
    return min(MAX_STAGES, 2 + (flags >> HALO_STAGES_SHIFT & 3))


def halo_shared_bytes(dtype: torch.dtype, rp: int, bm: int, hb: int, stages: int = 2, u_async: bool = False) -> int:
    """Dynamic shared memory of the halo kernels <T, rp, ., bm> with ``stages`` halo buffers of ``hb``
    elements: the column and pixel tables (KC_MAX + bm ints), then the larger of the main loop's halo
    buffers and as many S buffers (rp x (KC_MAX + pad)) and the epilogue's Z (bm x (rp + pad)) and U tile
    (rp x (BN + pad)); with ``u_async`` (the forward's flag U_ASYNC), from the next 16 bytes two buffers of a
    U tile and its bias (rp x (BN + pad) + BN each; sketched_conv2d.cu: halo_u_offset)."""
    pad, size = _pad(dtype), dtype.itemsize
    loop = stages * (hb + rp * (KC_MAX + pad))
    epilogue = bm * (rp + pad) + rp * (BN + pad)
    bytes_ = 4 * (KC_MAX + bm) + size * max(loop, epilogue)
    if u_async:
        bytes_ = cdiv(bytes_, 16) * 16 + 2 * size * (rp * (BN + pad) + BN)
    return bytes_


def u_async(U: Tensor, bias: Optional[Tensor]) -> bool:
    """Whether the forward may copy U (R, O), contiguous, and the bias 16 bytes at a time: O a whole number of
    copies, both aligned to 16 bytes (the flag U_ASYNC)."""
    return (U.shape[-1] * U.element_size() % 16 == 0 and U.data_ptr() % 16 == 0
            and (bias is None or bias.data_ptr() % 16 == 0))


def halo_extent(tile: int, kernel: int, stride: int, dilation: int) -> int:
    """Input rows (columns) that ``tile`` output rows (columns) read."""
    return (tile - 1) * stride + (kernel - 1) * dilation + 1


def halo_buffer(cc: int, IH: int, IW: int, channels_inner: bool, copy: int, size: int,
                taps: bool = False) -> Tuple[int, int]:
    """(elements of one halo buffer, row width) of the halo kernels (sketched_conv2d.cu: halo_tile): channel
    planes of IH rows of IW elements, plus a zero plane; with cp.async copies of ``copy`` bytes, NCHW rows
    widened to hold every aligned copy; with copies of channels_last pixels or with ``taps``, pixels of CCP
    channels (whole 16-byte units, an odd count, at least one zero channel)."""
    V = copy // size
    if taps or (copy and channels_inner):
        units = cc * size // 16 + 1
        ccp = (units + 1 - units % 2) * 16 // size
        return cdiv(IH * IW * ccp, 8) * 8, ccp
    width = (IW + 2 * V - 2) // V * V if copy else IW
    return cdiv((cc + 1) * IH * width, 8) * 8, width


def _async_chunk(C: int, KK: int, IH: int, IW: int, channels_inner: bool, V: int) -> int:
    """The most channels per chunk of the cp.async loader (0: none fit): CC·kh·kw <= KC_MAX, at most
    ASYNC_PASSES copies of V elements per thread, a whole number of copies per pixel (channels_last)."""
    most = min(C, KC_MAX // KK)
    if channels_inner:
        return min(most, ASYNC_PASSES * THREADS // (IH * IW) * V) // V * V
    width = (IW + 2 * V - 2) // V * V
    if max(IH, IW, width // V) >= 2048:  # the copies' coordinates are packed in 11 bits
        return 0
    return max(0, min(most, ASYNC_PASSES * THREADS // (IH * width // V)))


def _halo_chunk(C: int, KK: int, IH: int, IW: int, channels_inner: bool) -> int:
    """The most channels per chunk (0: none fit): CC·kh·kw <= KC_MAX and each thread's share of the chunk's
    halo <= HALO_PASSES, with lanes along iw (a row of IW <= THREADS) or along c (CC <= THREADS)."""
    most = min(C, KC_MAX // KK)
    if channels_inner:  # passes cdiv(IH IW, THREADS // CC) <= HALO_PASSES
        return min(most, THREADS, THREADS // cdiv(IH * IW, HALO_PASSES))
    if IW > THREADS:
        return 0
    return max(0, min(most, HALO_PASSES * (THREADS // IW) // IH))


def async_copy_bytes(x: Tensor, channels_inner: bool) -> int:
    """The widest cp.async copy (16, 8 or 4 bytes) that every copy of x's halo can make aligned, or 0: x's
    pointer and strides (but the innermost, 1) aligned to it, and whole copies along the innermost axis
    (W for NCHW, C for channels_last), which then lie wholly inside or outside the image."""
    size = x.element_size()
    inner = 1 if channels_inner else 3
    if x.stride(inner) != 1:
        return 0
    for copy in (16, 8, 4):
        V = copy // size
        if V >= 1 and x.data_ptr() % copy == 0 and x.shape[inner] % V == 0 and all(
                s % V == 0 for d, s in enumerate(x.stride()) if d != inner):
            return copy
    return 0


def halo_plan(x: Tensor, S: Tensor, R: int, kernel_size, stride, padding, dilation, out_hw, bm: int, tile=None,
              vector_rows: bool = False, copies: bool = False, taps: bool = False, stages: int = 2):
    """``(TH, TW, CC, flags, hb)`` of the halo kernels with ``bm`` pixels per block for x (N, C, H, W) and
    S (R, C·kh·kw) contiguous, or None where they cannot run. The tile (``tile`` = (TH, TW) forces one):
    fewest blocks, then the widest (longer contiguous halo rows); for a 1x1 kernel on rows along W (no
    halo to share, the loads are the cost), rows of 128 bytes first. The chunk: the most channels,
    16-byte S copies where aligned; with ``copies`` the halo by cp.async where x is aligned for it
    (:func:`async_copy_bytes`; else None); else with ``vector_rows`` (conv_rank_halo has the 8-byte loader,
    the forward does not) 8-byte halo loads where every row's groups are aligned (x's strides and pointer,
    W, the left padding and the tile's width). With ``taps`` (16-bit x; kernels of at most 9 taps) the
    tap-major plan: chunks of a multiple of 16 channels, copied where x is channels_last and aligned, else
    loaded through registers; its flags carry HALO_TAPS and the launch passes S as (R, kh, kw, C). A plan
    that copies keeps a ring of ``stages`` buffers (at most MAX_STAGES; fewer where shared memory does
    not hold them), in its flags (:func:`halo_stages`); the others two."""
    N, C, H, W = x.shape
    channels_inner = x.stride(1) < x.stride(3)
    s_aligned = S.data_ptr() % 16 == 0
    if taps:
        copy = async_copy_bytes(x, channels_inner) if channels_inner else 0
        vector_rows = False
    else:
        copy = async_copy_bytes(x, channels_inner) if copies else 0
        if copies and not copy:
            return None
    xv = 8 // x.element_size()  # elements of an 8-byte load
    x_rows8 = (vector_rows and not channels_inner and x.stride(3) == 1 and W % xv == 0 and x.data_ptr() % 8 == 0
               and all(s % xv == 0 for s in x.stride()[:3]))
    return _plan(int(N), int(C), x.dtype, channels_inner, s_aligned, x_rows8, copy, bool(taps), int(padding[1]),
                 int(R), *(int(v) for v in kernel_size), *(int(v) for v in stride), *(int(v) for v in dilation),
                 *(int(v) for v in out_hw), int(bm), None if tile is None else tuple(tile), int(stages))


@functools.lru_cache(maxsize=1024)
def _plan(N, C, dtype, channels_inner, s_aligned, x_rows8, copy, taps, pw, R, kh, kw, sh, sw, dh, dw, Ho, Wo, bm,
          tile, stages):
    """halo_plan from plain values (cached: the search runs once per shape)."""
    KK = kh * kw
    if R > HALO_RANKS[-1] or KK > KC_MAX or Ho * Wo == 0:
        return None
    size = dtype.itemsize
    if taps and (size != 2 or 16 * KK > KC_MAX):
        return None
    V = copy // size
    C16 = cdiv(C, 16) * 16  # taps: chunks of whole 16-channel steps (the channels past C zero)
    best = None
    if tile is not None:
        tiles = [(min(tile[0], Ho), min(tile[1], Wo))] if tile[0] * tile[1] <= bm else []
    else:
        tiles = [(min(bm // tw, Ho), tw) for tw in range(1, min(Wo, bm) + 1)]
    for th, tw in tiles:
        IH, IW = halo_extent(th, kh, sh, dh), halo_extent(tw, kw, sw, dw)
        if taps:
            cc = _async_chunk(C16, KK, IH, IW, True, V) if copy else _halo_chunk(C16, KK, IH, IW, channels_inner)
            cc = cc // 16 * 16
        else:
            cc = _async_chunk(C, KK, IH, IW, channels_inner, V) if copy else _halo_chunk(C, KK, IH, IW, channels_inner)
        key = (cdiv(Ho, th) * cdiv(Wo, tw), -tw)
        if KK == 1 and not channels_inner:  # 32-byte sectors of a halo row, up to 128 bytes
            key = (-min(IW * size, 128) // 32,) + key
        if cc > 0 and (best is None or key < best[0]):
            best = (key, th, tw, cc)
    if best is None:
        return None
    _, th, tw, cc = best
    flags = HALO_CHANNELS_INNER if channels_inner else 0
    xv = 8 // size
    IH, IW = halo_extent(th, kh, sh, dh), halo_extent(tw, kw, sw, dw)
    if taps:
        flags |= HALO_TAPS
    if copy:
        flags |= HALO_ASYNC[copy]
    elif x_rows8 and pw % xv == 0 and (tw * sw) % xv == 0 and IW % xv == 0:  # every tile's groups aligned
        cv = min(C, KC_MAX // KK, HALO_VPASSES * (THREADS // (IW // xv)) // IH)
        if cv >= cc:
            cc, flags = cv, flags | HALO_VECTOR
    ve = 16 // size  # elements of one 16-byte copy
    whole = V if copy and channels_inner else 1  # the chunk a whole number of halo copies per pixel
    if taps:  # S (R, kh, kw, C): a chunk's channels of one tap in 16-byte copies where C is whole copies
        if C % ve == 0 and s_aligned:
            flags |= S_VECTOR
    elif (C * KK) % ve == 0 and s_aligned:
        aligned = next((c for c in range(cc, 0, -1) if (c * KK) % ve == 0 and c % whole == 0), 0)
        if 2 * aligned >= cc:  # at most half the chunk given up for the wide copies
            cc, flags = aligned, flags | S_VECTOR
    hb, _ = halo_buffer(cc, IH, IW, channels_inner, copy, size, taps)
    rp = next(w for w in HALO_RANKS if w >= R)
    if halo_shared_bytes(dtype, rp, bm, hb) > MAX_SHARED:
        return None
    if copy:  # the ring: as many buffers as asked for and shared memory holds
        ring = next(s for s in range(min(stages, MAX_STAGES), 1, -1)
                    if s == 2 or halo_shared_bytes(dtype, rp, bm, hb, s) <= MAX_SHARED)
        flags |= (ring - 2) << HALO_STAGES_SHIFT
    if N * cdiv(Ho, th) * cdiv(Wo, tw) >= 2**31:
        return None
    return th, tw, cc, flags, hb


def default_family(R: int) -> int:
    """Pixels per block of the default halo kernels (cp.async copies) for a width of R columns of Z.

    Each block reads all of S (R x C·kh·kw) once per channel chunk, against a halo of C·(TH+kh-1)·(TW+kw-1):
    above R = 32 S's share is the larger, and 128 pixels per block halve its traffic per pixel; up to 32 the
    twice as many blocks of 64 fill the device better. The cut rests on tools/conv_sweep.py's ranking of the
    forced families at the benchmark convs (R = 32 and 64; benchmarks/results/NOTES.md)."""
    return 128 if R > 32 else 64


def _halo(x: Tensor, S: Tensor, R: int, kernel_size, stride, padding, dilation, out_hw, vector_rows=False):
    """(bm, plan) of the halo kernels that VARIANT asks for, or None for the generic kernels."""
    if VARIANT == "generic":
        return None
    bm, tile, copies, taps, stages = default_family(R), None, True, False, STAGES
    if VARIANT is not None:
        m = re.fullmatch(r"(halo|async|taps)(64|128)(?:s([2-4]))?(?::([1-9][0-9]*)x([1-9][0-9]*))?", VARIANT)
        if m is None:
            raise ValueError(f"forward.VARIANT: {VARIANT!r} is not a kernel family: expected 'generic' or halo, async "
                             "or taps followed by the block's pixels, 64 or 128, optionally the buffers of the "
                             "copies' ring 's2' to 's4', and optionally a tile ':THxTW' (e.g. 'taps64:4x16', "
                             "'async128s3')")
        name, bm = m[1], int(m[2])
        if name == "halo" and m[3]:
            raise ValueError(f"forward.VARIANT: {VARIANT!r}: the halo family loads through registers into two "
                             "buffers; a ring of buffers ('s2' to 's4') is for the families that copy, async and "
                             "taps")
        copies, taps = name == "async", name == "taps"
        stages = int(m[3]) if m[3] else stages
        tile = (int(m[4]), int(m[5])) if m[4] else None
    plan = None
    if taps:
        plan = halo_plan(x, S, R, kernel_size, stride, padding, dilation, out_hw, bm, tile, taps=True, stages=stages)
    if plan is None:
        plan = halo_plan(x, S, R, kernel_size, stride, padding, dilation, out_hw, bm, tile, vector_rows, copies,
                         stages=stages)
    if plan is None and copies:  # x not aligned for the copies: the loads through registers
        plan = halo_plan(x, S, R, kernel_size, stride, padding, dilation, out_hw, bm, tile, vector_rows)
    return None if plan is None else (bm, plan)


def halo_loader(flags: int) -> int:
    """The kernels' template parameter LOAD for a plan's flags."""
    taps = LOAD_TAPS if flags & HALO_TAPS else 0
    if flags & sum(HALO_ASYNC.values()):
        return LOAD_ASYNC | taps
    return (LOAD_ROWS8 if flags & HALO_VECTOR else LOAD_ELEMENTS) | taps


def tap_major(S: Tensor, C: int, kh: int, kw: int) -> Tensor:
    """S (R, C·kh·kw) as the tap-major plans read it: (R, kh, kw, C), contiguous."""
    return S.reshape(S.shape[0], C, kh, kw).permute(0, 2, 3, 1).contiguous().view(S.shape[0], -1)


def rank_tile(R: int) -> int:
    """RP of the fused forward: the smallest on-chip width >= R."""
    return next(w for w in RANK_TILES if w >= R)


def exact_float32(dtype: torch.dtype, allow_tf32: bool) -> bool:
    """Exact FFMA products (float32 at matmul precision "highest"), else tensor cores."""
    return dtype == torch.float32 and not allow_tf32


def _tf32_settings():
    """(object, attribute, its value without TF32) of cuBLAS's and cuDNN's float32 settings: the legacy allow_tf32
    flags where torch still reads them; once a program has set torch's fp32_precision settings (torch 2.9 and
    later), reading those flags raises, and then the fp32_precision settings of cuBLAS, cuDNN's convolutions and
    its RNNs (kept alike: torch refuses a question about cuDNN as a whole where they differ)."""
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    try:
        matmul.allow_tf32, cudnn.allow_tf32
    except RuntimeError:  # "a mix of the legacy and new APIs"
        return tuple((p, "fp32_precision", "ieee") for p in (matmul, cudnn.conv, cudnn.rnn))
    return (matmul, "allow_tf32", False), (cudnn, "allow_tf32", False)


@contextlib.contextmanager
def exact_products(exact: bool):
    """cuDNN convolutions and cuBLAS products without TF32 while exact float32 products are asked for."""
    if not exact:
        yield
        return
    settings = _tf32_settings()
    previous = [getattr(obj, name) for obj, name, _ in settings]
    for obj, name, off in settings:
        setattr(obj, name, off)
    try:
        yield
    finally:
        for (obj, name, _), value in zip(settings, previous):
            setattr(obj, name, value)


@contextlib.contextmanager
def cudnn_algorithms():
    """The op's cuDNN convolutions in the body choose their algorithm as CUDNN_ALGORITHMS says.

    "timed": torch.backends.cudnn.benchmark on for the body where the current stream is not capturing a CUDA graph
    (timing runs and synchronizes): cuDNN then times its algorithms for a convolution it has not seen on this
    thread and keeps the fastest. Torch keeps one plan per convolution and thread, whichever way it was chosen, so
    a convolution first seen during capture keeps the heuristic's choice."""
    if (CUDNN_ALGORITHMS != "timed" or torch.backends.cudnn.benchmark
            or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())):
        yield
        return
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = False


def fused_forward(R: int, depth: int, channels_last: bool) -> bool:
    """Whether the forward runs the fused kernels (:data:`FORWARD`; a forced :data:`VARIANT` forces them too): by
    default for an x that is not channels_last where Z's products per output pixel, R·depth (depth = C·kh·kw),
    are at most FUSED_DEPTH_MAX."""
    if FORWARD is not None:
        return FORWARD == "fused"
    return VARIANT is not None or (not channels_last and R * depth <= FUSED_DEPTH_MAX)


def pixel_columns(t: Tensor) -> Optional[Tensor]:
    """t (N, C, H, W) as (N, C, H·W) without a copy where t is NCHW-contiguous (each image a row-major matrix) or
    channels_last (each image a column-major one, which cuBLAS takes as a transposed operand); else None."""
    N, C, H, W = t.shape
    if t.is_contiguous():
        return t.view(N, C, H * W)
    if t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(0, 2, 3, 1).view(N, H * W, C).transpose(1, 2)
    return None


def channel_product(out: Tensor, inp: Tensor, W: Tensor, scale: float, bias: Optional[Tensor] = None) -> bool:
    """Writes out[n, :, h, w] = scale · W inp[n, :, h, w] (+ bias), a 1x1 convolution by W (Cout, Cin), by cuBLAS,
    and returns True where out and inp are each NCHW-contiguous or channels_last: both channels_last, one product
    over every pixel ((N H W, Cin) by Wᵀ); else a product per image, in whichever of the two layouts each side is
    (W by (Cin, H W) for an NCHW out, (H W, Cin) by Wᵀ for a channels_last one). False (nothing written) for other
    layouts. The scale and bias are applied in float32 in the product's epilogue, before the one rounding."""
    N, Co, Ho, Wo = out.shape
    Ci = inp.shape[1]
    beta = 0 if bias is None else 1
    cl = torch.channels_last
    columns = pixel_columns(inp)
    if columns is None:
        return False
    if out.is_contiguous():
        o = out.view(N, Co, Ho * Wo)
        c = o
        if bias is not None and NCHW_BIAS == "kernel":
            fill_planes(out, bias)  # then added to in place
        elif bias is not None:
            c = bias.view(1, Co, 1).expand(N, Co, Ho * Wo)  # copied into out by torch first
        torch.baddbmm(c, W.expand(N, Co, Ci), columns, beta=beta, alpha=scale, out=o)
        return True
    if not out.is_contiguous(memory_format=cl):
        return False
    rows = out.permute(0, 2, 3, 1).view(N * Ho * Wo, Co)
    if inp.is_contiguous(memory_format=cl):
        torch.addmm(rows if bias is None else bias, inp.permute(0, 2, 3, 1).view(N * Ho * Wo, Ci), W.t(), beta=beta,
                    alpha=scale, out=rows)
        return True
    o = rows.view(N, Ho * Wo, Co)
    c = o if bias is None else bias.view(1, 1, Co).expand(N, Ho * Wo, Co)
    torch.baddbmm(c, columns.transpose(1, 2), W.t().expand(N, Ci, Co), beta=beta, alpha=scale, out=o)
    return True


def transpose_planes(out: Tensor, t: Tensor) -> None:
    """Writes t (N, C, H, W), NCHW-contiguous or channels_last and not both, into ``out`` (its shape and dtype) in
    the other of the two layouts, by the transpose_planes kernel (planes.cu): t's N planes of C x H·W values
    (NCHW) or H·W x C (channels_last), each transposed."""
    N, C, H, W = t.shape
    if t.numel() == 0 and out.shape == t.shape:
        return
    cl = torch.channels_last
    nchw = t.is_contiguous()
    if (out.shape != t.shape or out.dtype != t.dtype or out.device != t.device
            or nchw == t.is_contiguous(memory_format=cl)
            or not out.is_contiguous(memory_format=cl if nchw else torch.contiguous_format)):
        raise ValueError(f"transpose_planes: t of shape {tuple(t.shape)}, strides {t.stride()}, {t.dtype} and out of "
                         f"shape {tuple(out.shape)}, strides {out.stride()}, {out.dtype}; expected one NCHW-contiguous "
                         "and the other channels_last (not both), of one shape, dtype and device")
    rows, cols = (C, H * W) if nchw else (H * W, C)
    grid = (cdiv(rows, TRANSPOSE_TILE) * cdiv(cols, TRANSPOSE_TILE), min(N, MAX_GRID_Y))
    with device_guard(t):
        _kernel("transpose_planes", t.dtype, source=PLANES_SOURCE)(
            grid, (TRANSPOSE_TILE, TRANSPOSE_ROWS), t, out, i32(rows), i32(cols), i64(N),
        )


def vector_values(t: Tensor, run: int) -> int:
    """Values of t a kernel moves in one 16-byte access along runs of ``run`` contiguous values (a plane): that
    many where t's data is 16-byte aligned and they divide the run, else 1."""
    vector = 16 // t.element_size()
    return vector if run % vector == 0 and t.data_ptr() % 16 == 0 else 1


def fill_planes(out: Tensor, value: Tensor) -> None:
    """Writes out[n, c, :, :] = value[c] into an NCHW-contiguous ``out`` (N, C, H, W) by the fill_planes kernel
    (planes.cu), in 16-byte stores where out is aligned for them and H·W a multiple of their values."""
    N, C, H, W = out.shape
    if out.numel() == 0:
        return
    V = vector_values(out, H * W)
    vectors = out.numel() // V
    value = value.to(out.dtype).contiguous()
    with device_guard(out):
        _kernel("fill_planes", out.dtype, V, source=PLANES_SOURCE)(
            (min(cdiv(vectors, FILL_THREADS), FILL_BLOCKS),), (FILL_THREADS,), out, value, i64(vectors),
            i32(H * W // V), i32(C),
        )


def cudnn_input(x: Tensor) -> Tensor:
    """x as the op's cuDNN convolutions take it (:data:`CUDNN_LAYOUT`): with "channels_last", an NCHW-contiguous x
    copied to channels_last (:func:`transpose_planes`); else x itself."""
    cl = torch.channels_last
    if CUDNN_LAYOUT != "channels_last" or not x.is_contiguous() or x.is_contiguous(memory_format=cl):
        return x
    out = torch.empty_like(x, memory_format=cl)
    transpose_planes(out, x)
    return out


def composed_forward(y: Tensor, x: Tensor, S: Tensor, U: Tensor, b: Optional[Tensor], stride, padding, dilation,
                     scale: float) -> None:
    """Writes y (N, O, H', W'), NCHW- or channels_last-contiguous, = scale · Uᵀ conv(x, S) + b: Z = conv(x, S)
    (S: (R, C, kh, kw)) by cuDNN in the layout of :func:`cudnn_input`, then y by :func:`channel_product` (the scale
    and bias in its epilogue), which reads Z in that layout."""
    with cudnn_algorithms():
        z = torch.nn.functional.conv2d(cudnn_input(x), S, None, tuple(stride), tuple(padding), tuple(dilation))
    if not channel_product(y, z, U.t(), scale, b):
        channel_product(y, z.contiguous(memory_format=memory_format(y)), U.t(), scale, b)


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
    exact = exact_float32(x.dtype, allow_tf32)
    S = S1s.contiguous()
    U = U1s.contiguous()
    b = bias.contiguous() if bias is not None else None
    channels_last = memory_format(x) == torch.channels_last
    if not fused_forward(R, C * kh * kw, channels_last) and (y.is_contiguous() or y.is_contiguous(
            memory_format=torch.channels_last)):
        with exact_products(exact):
            composed_forward(y, x, S.view(R, C, kh, kw), U.view(R, O), b, stride, padding, dilation, 1.0 / terms)
        return
    halo = _halo(x, S.view(R, -1), R, (kh, kw), stride, padding, dilation, y.shape[2:])
    if halo is not None:
        bm, (th, tw, cc, flags, hb) = halo
        rp = next(w for w in HALO_RANKS if w >= R)
        shared = halo_shared_bytes(x.dtype, rp, bm, hb, halo_stages(flags))
        copied = halo_shared_bytes(x.dtype, rp, bm, hb, halo_stages(flags), u_async=True)
        if U_TILES == "async" and u_async(U, b) and copied <= MAX_SHARED:
            flags, shared = flags | U_ASYNC, copied
        kernel = _kernel("sketched_conv2d_fwd_halo", x.dtype, rp, exact, bm, halo_loader(flags))
        grid = y.shape[0] * cdiv(y.shape[2], th) * cdiv(y.shape[3], tw)
        Sk = tap_major(S.view(R, -1), C, kh, kw) if flags & HALO_TAPS else S
        with device_guard(x):
            kernel(
                (grid,), (THREADS,), x, Sk, U, b, y, *_geometry(x, kh, kw, y, stride, padding, dilation),
                i32(R), i32(O), *_strides(x), *_strides(y), f32(1.0 / terms), i32(th), i32(tw), i32(cc), i32(flags),
                shared_mem=shared,
            )
        return
    rp = rank_tile(R)
    kernel = _kernel("sketched_conv2d_fwd", x.dtype, rp, exact)
    with device_guard(x):
        kernel(
            (cdiv(M, BM),), (THREADS,), x, S, U, b, y, *_geometry(x, kh, kw, y, stride, padding, dilation),
            i32(R), i32(O), *_strides(x), *_strides(y), f32(1.0 / terms),
            shared_mem=fwd_shared_bytes(x.dtype, rp),
        )


def conv_rank(z: Tensor, x: Tensor, S: Tensor, kernel_size: Tuple[int, int], stride: Tuple[int, int],
              padding: Tuple[int, int], dilation: Tuple[int, int], scale: float, allow_tf32: bool) -> None:
    """Writes z (N, R, H', W'), any strides, = scale · conv2d(x, S) with S contiguous (R, C·kh·kw). The halo
    kernels take R in column blocks of up to 64 (one grid row each)."""
    N, R, Ho, Wo = z.shape
    M = N * Ho * Wo
    if M == 0:
        return
    exact = exact_float32(x.dtype, allow_tf32)
    width = min(R, HALO_RANKS[-1])  # the columns one block takes
    halo = _halo(x, S, width, kernel_size, stride, padding, dilation, (Ho, Wo), vector_rows=True)
    if halo is not None:
        bm, (th, tw, cc, flags, hb) = halo
        rp = next(w for w in HALO_RANKS if w >= width)
        kernel = _kernel("conv_rank_halo", x.dtype, rp, exact, bm, halo_loader(flags))
        Sk = tap_major(S, x.shape[1], *kernel_size) if flags & HALO_TAPS else S
        with device_guard(x):
            kernel(
                (N * cdiv(Ho, th) * cdiv(Wo, tw), cdiv(R, rp)), (THREADS,), x, Sk, z,
                *_geometry(x, kernel_size[0], kernel_size[1], z, stride, padding, dilation), i32(R),
                *_strides(x), *_strides(z), f32(scale), i32(th), i32(tw), i32(cc), i32(flags),
                shared_mem=halo_shared_bytes(x.dtype, rp, bm, hb, halo_stages(flags)),
            )
        return
    rc = 16 if R <= 16 else 32 if R <= 32 else 64
    kernel = _kernel("conv_rank", x.dtype, rc, exact)
    with device_guard(x):
        kernel(
            (cdiv(M, BM), cdiv(R, rc)), (THREADS,), x, S, z,
            *_geometry(x, kernel_size[0], kernel_size[1], z, stride, padding, dilation), i32(R),
            *_strides(x), *_strides(z), f32(scale),
            shared_mem=rank_shared_bytes(x.dtype, rc),
        )
