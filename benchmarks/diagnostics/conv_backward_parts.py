"""Pieces of the cuda backend's sketched_conv2d backward, and its two forwards, timed alone (GPU only).

    python benchmarks/diagnostics/conv_backward_parts.py [pieces] [bias] [cudnn] [forward]   (default: all four)

``forward``: the fused forward against the composed one (forward.FORWARD forced: cuDNN's convolution to R
channels, then cuBLAS) over convs of several depths R·C·kh·kw, bf16, NCHW and channels_last: where the rule
forward.fused_forward should draw its line.

``bias``: the bias gradient Σ_{n,h,w} g of the two conv cases' g (bf16), NCHW and channels_last, by
torch's reduction over (0, 2, 3), by the ``bias_channels`` / ``bias_rows`` kernels as the op calls them
(``backward.bias_grad(g, kernels=True, out=db)``: bias_channels writes db itself where one block takes each
channel, bias_rows' partials are summed by torch; ``kernels``) and by the alternatives (NCHW: each
(n, o) plane, then the batch; a batched product with ones; channels_last: rows of channels, and a
product with a row of ones), each with its error against float64 and the HBM floor of reading g once.
``cudnn``: aten.convolution_backward for dx and dS given dZ, with dZ and x NCHW (as the op runs it),
both channels_last (x converted inside the timing, dx copied back to NCHW), or only dZ channels_last;
and NCHW for dx alone and for dS alone.
``pieces``: each step of the op's backward (``backward.sketched_conv2d_backward``) alone, NCHW, at both
conv cases: dZ = U g / (2L) by conv_rank and by cuBLAS (``channel_product``); cuDNN's dx and dS given dZ,
together, alone, and with the algorithms it picks by timing them (torch.backends.cudnn.benchmark); dx by
conv_rank instead (``dx_by_kernel``); Z recomputed by cuDNN and by conv_rank; dU by one product over pixel rows,
per image (``weight_products``' NCHW way) and as cuDNN's weight gradient of the 1x1 convolution Z -> y (dZ as its
input gradient, and both); the bias gradient; then the whole backward with every gradient for each DZ and Z
("kernels" or cuBLAS / cuDNN); the forward, fused and composed (forward.FORWARD), and by two cuDNN convolutions,
and the dense conv's forward and backward, for scale.
Each piece is captured in a CUDA graph and its replays timed by the harness's clock (L2 flushed).
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the harness

import torch  # noqa: E402

from harness.timing import Budget, Clock  # noqa: E402
from panther_cuda.ops.sketched_conv2d import backward as bwd  # noqa: E402
from panther_cuda.ops.sketched_conv2d import forward as fwd  # noqa: E402
from panther_cuda.ops.sketched_conv2d.backward import bias_grad  # noqa: E402
from panther_cuda.ops.sketched_conv2d.forward import conv_rank, sketched_conv2d_forward  # noqa: E402

DEV = torch.device("cuda")
BUDGET = Budget(warmup_calls=3, warmup_s=0.05, run_s=0.2, min_reps=20, max_reps=200)
HBM_BYTES_PER_S = 3.35e12  # H100 SXM


@contextlib.contextmanager
def forced(module, **values):
    """The module's switches (backward.DZ, forward.FORWARD, ...) set to ``values`` for the body."""
    previous = {name: getattr(module, name) for name in values}
    for name, value in values.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in previous.items():
            setattr(module, name, value)


def timed(clock: Clock, variants: dict) -> dict:
    calls = {name: (clock.capture(fn).replay, None) for name, fn in variants.items()}
    return {name: r["median_ms"] for name, r in clock.measure(calls, BUDGET).items()}


def bias(clock: Clock) -> None:
    for N, O, H, W in [(32, 128, 56, 56), (64, 256, 28, 28)]:
        for layout in ["nchw", "channels_last"]:
            g = torch.randn(N, O, H, W, device=DEV, dtype=torch.bfloat16)
            if layout == "channels_last":
                g = g.contiguous(memory_format=torch.channels_last)
            db = torch.empty(O, device=DEV, dtype=g.dtype)
            ref = g.double().sum((0, 2, 3))
            M = N * H * W
            variants = {"sum023": lambda: db.copy_(g.sum((0, 2, 3), dtype=torch.float32)),
                        "kernels": lambda: bias_grad(g, kernels=True, out=db)}
            if layout == "nchw":
                ones = torch.ones(H * W, 1, device=DEV, dtype=g.dtype)
                variants["planes_then_batch"] = lambda: db.copy_(g.view(N, O, -1).sum(-1, dtype=torch.float32).sum(0))
                variants["bmm_ones"] = lambda: db.copy_((g.view(N, O, -1) @ ones).float().sum((0, 2)))
            else:
                ones = torch.ones(1, M, device=DEV, dtype=g.dtype)
                variants["rows"] = lambda: db.copy_(g.permute(0, 2, 3, 1).reshape(M, O).sum(0, dtype=torch.float32))
                variants["mm_ones"] = lambda: db.copy_((ones @ g.permute(0, 2, 3, 1).reshape(M, O))[0])
            errors = {}
            for name, fn in variants.items():
                fn()
                errors[name] = ((db.double() - ref).abs().max() / ref.abs().max()).item()
            floor = g.numel() * g.element_size() / HBM_BYTES_PER_S * 1e3
            for name, ms in timed(clock, variants).items():
                print(f"bias  g={(N, O, H, W)} {layout:<13} {name:<18} {ms:.4f} ms  floor {floor:.4f}  "
                      f"relerr {errors[name]:.2e}")


def cudnn(clock: Clock) -> None:
    cl = torch.channels_last
    backward = torch.ops.aten.convolution_backward
    for N, C, H, R in [(32, 64, 56, 32), (64, 256, 28, 64)]:
        x = torch.randn(N, C, H, H, device=DEV, dtype=torch.bfloat16)
        S = torch.randn(R, C, 3, 3, device=DEV, dtype=torch.bfloat16)
        dZ = torch.randn(N, R, H, H, device=DEV, dtype=torch.bfloat16)
        dZc = dZ.contiguous(memory_format=cl)
        dx, dS = torch.empty_like(x), torch.empty_like(S)

        def run(dz, xx, s, mask=(True, True)):
            gx, gS, _ = backward(dz, xx, s, None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1, [*mask, False])
            if mask[0]:
                dx.copy_(gx)
            if mask[1]:
                dS.copy_(gS)

        variants = {"nchw": lambda: run(dZ, x, S),
                    "channels_last": lambda: run(dZc, x.contiguous(memory_format=cl), S.contiguous(memory_format=cl)),
                    "dZ_channels_last": lambda: run(dZc, x, S),
                    "nchw_dx_only": lambda: run(dZ, x, S, (True, False)),
                    "nchw_dS_only": lambda: run(dZ, x, S, (False, True))}
        for name, ms in timed(clock, variants).items():
            print(f"cudnn x={(N, C, H, H)} R={R:<3} {name:<18} {ms:.4f} ms")


def pieces(clock: Clock) -> None:
    """Each step of the op's backward alone (NCHW, bf16, L = 1), then the whole backward and the forward."""
    dt, one, none = torch.bfloat16, (1, 1), (0, 0)
    for N, C, H, O, k in [(32, 64, 56, 128, 16), (64, 256, 28, 256, 32)]:
        R = 2 * k
        x = torch.randn(N, C, H, H, device=DEV, dtype=dt)
        S1s = torch.randn(1, R, C, 3, 3, device=DEV, dtype=dt) * 0.05
        U1s = torch.randn(1, R, O, device=DEV, dtype=dt) * 0.05
        b = torch.randn(O, device=DEV, dtype=dt)
        g = torch.randn(N, O, H, H, device=DEV, dtype=dt)
        S, U = S1s.view(R, C, 3, 3), U1s.view(R, O)
        dZ = torch.empty(N, R, H, H, device=DEV, dtype=dt)
        Z = torch.empty(N, H, H, R, device=DEV, dtype=dt)
        Zc = torch.randn(N, R, H, H, device=DEV, dtype=dt)
        dx, dS1s, dU1s, db = torch.empty_like(x), torch.empty_like(S1s), torch.empty_like(U1s), torch.empty_like(b)
        y = torch.empty(N, O, H, H, device=DEV, dtype=dt)

        def cudnn_part(mask):
            gx, gS, _ = torch.ops.aten.convolution_backward(dZ, x, S, None, [1, 1], [1, 1], [1, 1], False, [0, 0],
                                                            1, [*mask, False])
            if mask[0]:
                dx.copy_(gx)
            if mask[1]:
                dS1s.view(R, C, 3, 3).copy_(gS)

        def bench_part(mask):  # cuDNN's algorithms chosen by timing them (the warm-up calls), not its heuristics
            with torch.backends.cudnn.flags(enabled=True, benchmark=True, deterministic=False, allow_tf32=True):
                cudnn_part(mask)

        G = g.permute(0, 2, 3, 1).reshape(-1, O)
        Uw = U.t().reshape(O, R, 1, 1)  # y = conv1x1(Z, Uw)
        dense_w = torch.randn(O, C, 3, 3, device=DEV, dtype=dt) * 0.05

        def one_by_one(mask):  # the 1x1 convolution Z -> y differentiated by cuDNN: dZ, dU (as Uw's gradient)
            gZ, gW, _ = torch.ops.aten.convolution_backward(g, Zc, Uw, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
                                                            [*mask, False])
            if mask[0]:
                dZ.copy_(gZ)
            if mask[1]:
                dU1s.view(R, O).copy_(gW.view(O, R).t())

        def dense_backward():
            gx, gw, gb = torch.ops.aten.convolution_backward(g, x, dense_w, [O], [1, 1], [1, 1], [1, 1], False, [0, 0],
                                                             1, [True, True, True])
            dx.copy_(gx)
            return gw, gb

        def whole(dz, z):  # the backward with backward.DZ = dz and backward.Z = z
            with forced(bwd, DZ=dz, Z=z):
                bwd.sketched_conv2d_backward((dx, dS1s, dU1s, db), g, x, S1s, U1s, one, one, one,
                                             (True, True, True, True), False)

        def forward(way):  # the forward with forward.FORWARD = way
            with forced(fwd, FORWARD=way):
                sketched_conv2d_forward(y, x, S1s, U1s, b, one, one, one, False)

        variants = {
            "dZ_conv_rank": lambda: conv_rank(dZ, g, U, one, one, none, one, 1.0, False),
            "dZ_gemm": lambda: fwd.channel_product(dZ, g, U, 1.0),
            "cudnn_dx_dS": lambda: cudnn_part((True, True)),
            "cudnn_dx": lambda: cudnn_part((True, False)),
            "cudnn_dS": lambda: cudnn_part((False, True)),
            "cudnn_dx_dS_benchmark": lambda: bench_part((True, True)),
            "dx_conv_rank": lambda: bwd.dx_by_kernel(dx, dZ, S, one, one, one, False),
            "Z_cudnn": lambda: Zc.copy_(torch.nn.functional.conv2d(x, S, None, 1, 1, 1)),
            "Z_conv_rank": lambda: conv_rank(Z.permute(0, 3, 1, 2), x, S.view(R, -1), (3, 3), one, one, one, 1.0,
                                             False),
            "dU_matmul": lambda: torch.addmm(dU1s.view(R, O), Z.view(-1, R).t(), G, beta=0, out=dU1s.view(R, O)),
            "dU_per_image": lambda: bwd.weight_products(dU1s.view(R, O), Zc, g, 1.0),
            "dU_cudnn_1x1": lambda: one_by_one((False, True)),
            "dZ_cudnn_1x1": lambda: one_by_one((True, False)),
            "dZ_dU_cudnn_1x1": lambda: one_by_one((True, True)),
            "bias_grad": lambda: bias_grad(g, out=db),
            "forward_fused": lambda: forward("fused"),
            "forward_composed": lambda: forward("composed"),
            "forward_cudnn_1x1": lambda: y.copy_(torch.nn.functional.conv2d(
                torch.nn.functional.conv2d(x, S, None, 1, 1, 1), Uw, b)),
            "dense_forward": lambda: y.copy_(torch.nn.functional.conv2d(x, dense_w, b, 1, 1, 1)),
            "dense_backward": dense_backward,
        }
        for dz in ("kernels", "gemm"):
            for z in ("kernels", "cudnn"):
                variants[f"backward_dZ_{dz}_Z_{z}"] = lambda dz=dz, z=z: whole(dz, z)
        for name, ms in timed(clock, variants).items():
            print(f"piece x={(N, C, H, H)} O={O} R={R:<3} {name:<22} {ms:.4f} ms")


def forwards(clock: Clock) -> None:
    dt, one = torch.bfloat16, (1, 1)
    # (N, C, H, O, k): the benchmark convs (64 -> 128 at 56², k = 16; 256 -> 256 at 28², k = 32) and neighbours
    for N, C, H, O, k in [(32, 32, 112, 64, 8), (32, 64, 56, 128, 8), (32, 64, 56, 128, 16), (32, 64, 56, 128, 32),
                          (32, 128, 56, 128, 16), (64, 128, 28, 256, 16), (64, 128, 28, 256, 32),
                          (64, 256, 28, 256, 16), (64, 256, 28, 256, 32), (16, 512, 14, 512, 32)]:
        R = 2 * k
        for layout in ("nchw", "channels_last"):
            x = torch.randn(N, C, H, H, device=DEV, dtype=dt)
            if layout == "channels_last":
                x = x.contiguous(memory_format=torch.channels_last)
            S1s = torch.randn(1, R, C, 3, 3, device=DEV, dtype=dt) * 0.05
            U1s = torch.randn(1, R, O, device=DEV, dtype=dt) * 0.05
            b = torch.randn(O, device=DEV, dtype=dt)
            (y,) = fwd.forward_outputs(x, S1s, U1s, b, 1, 1, 1, 1, 1, 1, False)

            def run(way):
                with forced(fwd, FORWARD=way):
                    sketched_conv2d_forward(y, x, S1s, U1s, b, one, one, one, False)

            t = timed(clock, {way: (lambda way=way: run(way)) for way in ("fused", "composed")})
            print(f"forward x={(N, C, H, H)} O={O} R={R:<3} {layout:<13} depth R·C·9={R * C * 9:<7} fused "
                  f"{t['fused']:.4f} ms  composed {t['composed']:.4f} ms  composed/fused {t['composed'] / t['fused']:.2f}"
                  f"  rule: {'fused' if fwd.fused_forward(R, C * 9, layout == 'channels_last') else 'composed'}")


if __name__ == "__main__":
    clock = Clock(DEV)
    parts = sys.argv[1:] or ["pieces", "bias", "cudnn", "forward"]  # which sections, in this order
    for part in parts:
        {"pieces": pieces, "bias": bias, "cudnn": cudnn, "forward": forwards}[part](clock)
