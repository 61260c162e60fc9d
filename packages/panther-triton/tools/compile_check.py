"""Compile every kernel variant (sketched linear, attention) with every GPU autotune config for a CUDA
target, without a GPU.

    python packages/panther-triton/tools/compile_check.py [--arch 90] [--quick | --trace]

The launchers run with a `launch` hook that compiles instead of launching (Triton's warmup), through
a stand-in driver that names the target, so the arguments are exactly those of real calls. For each
(kernel, variant, config) it prints the shared memory (and whether it fits the 227 KB an sm_90 block
may have), registers per thread, local memory (spills), and the matrix instructions in the SASS
(HGMMA: Hopper's wgmma; HMMA: mma.sync). Exit status 1 when a variant compiles in none of its configs,
when a config that fits in shared memory spills, or (sm_90) when a 16-bit sketched linear variant has no
HGMMA at all.
Needs TRITON_INTERPRET unset (the kernels must be JIT functions) and Triton's NVIDIA backend (ptxas).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

import torch

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("unset TRITON_INTERPRET: the check compiles the kernels for a GPU")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402

SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


class CompileOnlyDriver:
    """Just enough of a Triton driver for JITFunction.warmup: a device, a stream and the target."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")


_TOOLS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def _resources(cubin: bytes):
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        cuobjdump = os.path.join(_TOOLS, "cuobjdump")
        res = subprocess.run([cuobjdump, "-res-usage", path], capture_output=True, text=True).stdout
        sass = subprocess.run([cuobjdump, "-sass", path], capture_output=True, text=True).stdout
    finally:
        os.unlink(path)
    reg = re.search(r"REG:(\d+)", res)
    local = re.search(r"LOCAL:(\d+)", res)
    mma = collections.Counter(re.findall(r"\b(HGMMA|HMMA)\b", sass))
    return (int(reg.group(1)) if reg else -1), (int(local.group(1)) if local else -1), dict(mma)


Row = collections.namedtuple("Row", "kernel variant config shared fits regs local mma error")


class CompileOnlyLaunch:
    """`launch` hook of the launchers: compile each GPU config of the kernel instead of launching it."""

    def __init__(self, variant: str, arch: int, quick: bool, rows: list, verbose: bool = False):
        self.variant, self.arch, self.quick, self.rows, self.verbose = variant, arch, quick, rows, verbose

    def __call__(self, kernel):
        hook = self

        class _Grid:
            def __getitem__(self, grid):
                def run(*args, **kwargs):
                    # a plain JIT function (the attention kernels) compiles once, at Triton's launch defaults
                    for cfg in getattr(kernel, "configs", None) or [triton.Config({})]:
                        row = hook._compile(kernel, cfg, args, kwargs)
                        if hook.quick and row.error is None and row.fits:
                            break  # --quick: the first config that compiles and fits

                return run

        return _Grid()

    def _compile(self, kernel, cfg, args, kwargs):
        fn = kernel if isinstance(kernel, triton.runtime.jit.JITFunction) else kernel.fn
        name = fn.__name__
        if "num_stages" in kwargs:  # a plain JIT function launched with its own pipelining depth
            kwargs = dict(kwargs)
            cfg = triton.Config(cfg.kwargs, num_warps=cfg.num_warps, num_stages=kwargs.pop("num_stages"))
        label = ",".join(f"{k}={v}" for k, v in cfg.kwargs.items()) + f",w{cfg.num_warps},s{cfg.num_stages}"
        try:
            k = fn.warmup(
                *args, grid=(1,), num_warps=cfg.num_warps, num_stages=cfg.num_stages, **cfg.kwargs, **kwargs
            )
            shared = k.metadata.shared
            regs, local, mma = _resources(k.asm["cubin"])
            fits = shared <= SMEM_LIMIT.get(self.arch, 99 * 1024)
            row = Row(name, self.variant, label, shared, fits, regs, local, mma, None)
        except Exception as exc:  # report, keep going
            msg = f"{type(exc).__name__}: {exc}"
            row = Row(name, self.variant, label, 0, False, 0, 0, {}, msg if self.verbose else msg.splitlines()[-1][:300])
        self.rows.append(row)
        return row


def _variants(quick: bool):
    """(label, dtype, allow_tf32, (T, I, O, L, K), forward plan, backward plan, needs)."""
    from panther_triton.ops.sketched_linear.plan import BackwardPlan, ForwardPlan

    fused, split = ForwardPlan(True, 1, 2), ForwardPlan(False, 4, 2)
    train = (True, True, True, False, False, True)
    everything = (True,) * 6
    out = [
        ("bf16 L1k64 fused", torch.bfloat16, True, (256, 512, 512, 1, 64), fused, BackwardPlan(1, 1), train),
        ("bf16 L2k32 split", torch.bfloat16, True, (256, 512, 512, 2, 32), split, BackwardPlan(2, 2), everything),
        ("fp16 L1k64 fused", torch.float16, True, (256, 512, 512, 1, 64), fused, BackwardPlan(1, 2), train),
        ("fp32 tf32 L1k64", torch.float32, True, (256, 512, 512, 1, 64), split, BackwardPlan(1, 1), train),
        ("fp32 ieee L1k64", torch.float32, False, (256, 512, 512, 1, 64), fused, BackwardPlan(1, 1), train),
        ("bf16 R240 all grads", torch.bfloat16, True, (256, 512, 512, 3, 40), fused, BackwardPlan(2, 2), everything),
        ("bf16 R300 chunked", torch.bfloat16, True, (256, 512, 512, 3, 50), split, BackwardPlan(2, 2), everything),
        ("bf16 ragged k5", torch.bfloat16, True, (37, 130, 70, 2, 5), split, BackwardPlan(2, 3), train),
    ]
    return [out[i] for i in (0, 1, 3, 6)] if quick else out


def _attention_variants(quick: bool):
    """(label, dtype, allow_tf32, (T, D, Dv, m), causal) of the attention kernels: one block of each axis at
    64, and the limits (D = Dv = 128 with 32 rows per block, m = 256 in four feature chunks)."""
    out = [
        ("fp32 ieee D64 m64", torch.float32, False, (1000, 64, 64, 64)),
        ("fp32 tf32 D64 m64", torch.float32, True, (1000, 64, 64, 64)),
        ("bf16 D64 m64", torch.bfloat16, True, (5000, 64, 64, 64)),
        ("bf16 D128 m256", torch.bfloat16, True, (5000, 128, 128, 256)),
        ("fp32 tf32 D128 m256", torch.float32, True, (1000, 128, 128, 256)),
        ("fp16 D48 Dv80 m100", torch.float16, True, (1000, 48, 80, 100)),
    ]
    return [(label + (" causal" if causal else " full"), *rest, causal)
            for label, *rest in (out[:1] if quick else out) for causal in (False, True)]


def _compile_attention(args, rows) -> None:
    from panther_triton import _launch
    from panther_triton.ops.rfa_attention import common
    from panther_triton.ops.rfa_attention.backward import rfa_attention_backward
    from panther_triton.ops.rfa_attention.forward import rfa_attention_forward

    for label, dt, tf32, (T, D, Dv, m), causal in _attention_variants(args.quick):
        common.allow_tf32 = lambda tf32=tf32: tf32  # read by precision(): the PREC of the launch
        _launch.traced = CompileOnlyLaunch(label, args.arch, args.quick, rows, args.verbose)
        q, k = torch.zeros(1, 2, T, D, dtype=dt), torch.zeros(1, 2, T, D, dtype=dt)
        v, om = torch.zeros(1, 2, T, Dv, dtype=dt), torch.zeros(2, m, D, dtype=dt)
        kpm = torch.zeros(1, T, dtype=torch.bool)
        o, kv, kz, kmax = rfa_attention_forward(q, k, v, om, kpm, causal, False, in_op=True)
        grads = [torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(om)]
        rfa_attention_backward(grads, torch.zeros_like(o), q, k, v, om, kpm, kv, kz, kmax, causal, False, True)


_HGMMA_EXPECTED = {"_sketch_in_kernel", "_sketch_out_kernel", "_grad_from_g_kernel", "_grad_from_x_kernel"}
_OUTPUT_ARGS = {"hp", "h", "y", "dhp", "ws", "ds2", "du1", "db", "dx", "ds1", "du2", "out0", "out1", "out2", "out3", "out4"}


def trace_check(arch: int) -> int:
    """Trace the triton_ops as torch.compile's AOTAutograd does, on fake CUDA tensors (no GPU needed).

    Checks that each op decomposes into its Triton kernels (what lets Inductor see them), that the
    kernels' stores were analysed precisely (torch clones only the buffers the op itself allocates,
    never an input), and that torch finds the kernels of each op (its compile caches hash them).
    """
    import re as _re

    import panther_triton.ops.sketched_linear.plan as plan_module
    from panther_triton import _launch, _runtime

    plan_module.device_sms = lambda device: 132  # no device to ask
    _runtime._device_limit = lambda tensor: SMEM_LIMIT.get(arch, 99 * 1024)  # Inductor prunes configs while tracing
    from torch._functorch.aot_autograd import aot_function
    from torch._library.triton import get_triton_kernels_for_op
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    import panther_triton.ops.sketched_linear.op as op
    from panther_triton.ops.sketched_linear.plan import BackwardPlan, ForwardPlan, use_plans

    problems = []
    assert not _launch.INTERPRETED
    for name, expected in (("fwd", {"_sketch_in_kernel", "_sketch_out_kernel"}),
                           ("bwd", {"_grad_from_g_kernel", "_grad_from_x_kernel", "_sum_partials_kernel"})):
        found = {getattr(k, "fn", k).__name__ for k in get_triton_kernels_for_op(f"panther_triton::sketched_linear_{name}")}
        if found != expected:
            problems.append(f"torch finds kernels {sorted(found)} for the {name} op, expected {sorted(expected)}")

    # Inductor re-emits each user kernel with the transitive closure of its helpers and constexpr globals
    import importlib.util as _ilu

    from torch._inductor.codegen.wrapper import user_defined_triton_kernel_transitive_closure_source_code

    from panther_triton.ops.sketched_linear import backward as bwd_module
    from panther_triton.ops.sketched_linear import forward as fwd_module

    kernels = [fwd_module._sketch_in_kernel, fwd_module._sketch_out_kernel, bwd_module._grad_from_g_kernel,
               bwd_module._grad_from_x_kernel, bwd_module._sum_partials_kernel]
    for kernel in kernels:
        src = "import triton\nimport triton.language as tl\n"
        src += user_defined_triton_kernel_transitive_closure_source_code(kernel.fn)
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "inductor_copy.py")
            with open(path, "w") as f:
                f.write(src)
            spec = _ilu.spec_from_file_location("inductor_copy", path)
            try:
                spec.loader.exec_module(_ilu.module_from_spec(spec))
            except Exception as exc:
                problems.append(f"Inductor's copy of {kernel.fn.__name__} does not load: {type(exc).__name__}: {exc}")

    graphs = []

    def keep(gm, example_inputs):
        graphs.append(gm.code)
        return gm

    def step(x, S1s, S2s, U1s, U2s, b):
        y, h = op.SKETCHED_LINEAR.fwd_op(x, S1s, S2s, U1s, U2s, b, True)
        grads = op.SKETCHED_LINEAR.bwd_op(y, x, S1s, S2s, U1s, U2s, b, h, True, True, True, True, True, True, True)
        return y, grads

    cases = [
        ((128, 1024, 1024, 1, 64), ForwardPlan(True, 1, 4), BackwardPlan(2, 1)),
        ((4096, 1024, 768, 2, 32), ForwardPlan(False, 4, 2), BackwardPlan(1, 4)),
        ((300, 640, 320, 3, 50), ForwardPlan(False, 1, 2), BackwardPlan(2, 2)),
    ]
    for (T, I, O, L, K), fplan, bplan in cases:
        with FakeTensorMode(shape_env=ShapeEnv()), use_plans(forward=fplan, backward=bplan):
            def t(*shape):
                return torch.empty(*shape, device="cuda", dtype=torch.bfloat16)

            aot_function(step, fw_compiler=keep)(t(T, I), t(L, I, K), t(L, K, O), t(L, K, O), t(L, I, K), t(O))
        code = graphs[-1]
        launched = _re.findall(r"triton_kernel_wrapper_functional\(kernel_idx", code)
        if not launched:
            problems.append(f"{(T, I, O, L, K)}: the ops did not decompose into Triton kernels")
        for kwargs, clone in _re.findall(r"kwargs = \{(.*?)\}, tensors_to_clone = \[([^\]]*)\]", code):
            bound = dict(_re.findall(r"'(\w+)': (\w+)", kwargs))
            names = {c.strip().strip("'") for c in clone.split(",") if c.strip()}
            if not names <= _OUTPUT_ARGS:
                problems.append(f"{(T, I, O, L, K)}: torch would clone {sorted(names - _OUTPUT_ARGS)} (inputs)")
            written = [bound.get(n) for n in names]
            if len(set(written)) != len(written):  # one tensor behind two written arguments: clones diverge
                problems.append(f"{(T, I, O, L, K)}: one tensor is passed as several written arguments {sorted(names)}")
        print(f"traced {(T, I, O, L, K)} {fplan} {bplan}: {len(launched)} kernel launches")
    for p in problems:
        print("PROBLEM:", p)
    print(f"trace check: {len(problems)} problems")
    return 1 if problems else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (90: H100/H200, 80: A100)")
    ap.add_argument("--quick", action="store_true", help="fewer variants, the first config that fits of each kernel")
    ap.add_argument("--verbose", action="store_true", help="whole compiler messages")
    ap.add_argument("--trace", action="store_true", help="instead: trace the triton_ops as torch.compile does")
    args = ap.parse_args(argv)
    driver.set_active(CompileOnlyDriver(args.arch))
    if args.trace:
        return trace_check(args.arch)
    from panther_triton import _launch
    from panther_triton.ops.sketched_linear.backward import sketched_linear_backward
    from panther_triton.ops.sketched_linear.forward import sketched_linear_forward

    rows: list = []
    for label, dt, tf32, (T, I, O, L, K), fplan, bplan, needs in _variants(args.quick):
        hook = CompileOnlyLaunch(label, args.arch, args.quick, rows, args.verbose)
        x = torch.zeros(T, I, dtype=dt)
        S1s, U2s = torch.zeros(L, I, K, dtype=dt), torch.zeros(L, I, K, dtype=dt)
        S2s, U1s = torch.zeros(L, K, O, dtype=dt), torch.zeros(L, K, O, dtype=dt)
        bias = torch.zeros(O, dtype=dt)
        _launch.traced = hook  # the launches inside a library op: compile instead
        y, h = sketched_linear_forward(x, S1s, S2s, U1s, U2s, bias, tf32, plan=fplan, in_op=True)
        sketched_linear_backward(torch.zeros_like(y), x, h, S1s, S2s, U1s, U2s, needs, tf32, plan=bplan, in_op=True)
    _compile_attention(args, rows)

    print(f"{'kernel':22} {'variant':20} {'config':28} {'smem':>7} fit {'regs':>4} {'local':>5}  mma / error")
    for r in rows:
        tail = r.error or " ".join(f"{k}x{v}" for k, v in sorted(r.mma.items())) or "-"
        print(f"{r.kernel:22} {r.variant:20} {r.config:28} {r.shared:7d} {'yes' if r.fits else 'NO ':3} "
              f"{r.regs:4d} {r.local:5d}  {tail}")

    problems = []
    by_variant = collections.defaultdict(list)
    for r in rows:
        by_variant[(r.kernel, r.variant)].append(r)
    for (kernel, variant), rs in by_variant.items():
        usable = [r for r in rs if r.error is None and r.fits]
        if not usable:
            problems.append(f"{kernel} [{variant}]: no config compiles and fits in shared memory")
        for r in usable:
            if r.local > 0:
                problems.append(f"{kernel} [{variant}] {r.config}: {r.local} bytes of local memory (spills)")
        sixteen_bit = not variant.startswith("fp32")
        # the attention kernels multiply float32 features (TF32): wgmma or mma.sync is the compiler's choice
        if args.arch == 90 and sixteen_bit and kernel in _HGMMA_EXPECTED and not args.quick:
            if usable and not any(r.mma.get("HGMMA") for r in usable):
                problems.append(f"{kernel} [{variant}]: no HGMMA (wgmma) in any config")
    for p in problems:
        print("PROBLEM:", p)
    print(f"{len(rows)} compilations, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
