"""Time the cuda sketched linear op under each launch plan it can take, next to the triton backend and F.linear.

    python packages/panther-cuda/tools/linear_sweep.py --out sweep.json [--quick | --shape TxIxO ...] [--replays 30]
        [--tiles large,deep64] [--no-hopper] [--ring-stages 3,6] [--y-groups 4,16] [--bwd-splits 4:1,2:2]

Shapes (bfloat16, L = 1, k = 64, so R = 128): T = 4096 rows with I = O in (4096, 8192), and T = 128 rows with
I = O in (1024, 8192); --quick keeps one of each (4096 x 4096, 128 x 1024) and fewer replays; --shape picks
others (repeatable, T x I x O with I = O not required).

For each shape, on one GPU, in CUDA-graph replay (each call captured once after a warm-up, then the median of
--replays replays timed by CUDA events):
* cuda forward under each plan: the rule's (default), the fused kernel, and the two launches on each tile
  shape of limits.CONFIGS with the split of H that common.split_rule gives that shape; on an sm_90 device, each
  plan of two launches also with H and y by forward_sm90.cu's wgmma kernels ("... hopper"; with the backward by
  backward_sm90.cu's in forward + backward, and that backward alone);
* cuda backward on each tile shape (the rule's splits), given the H of the default forward, with the gradients
  an SKLinear trains (x, S1s, S2s, bias);
* cuda forward + backward: the default plans, and each tile shape in both directions;
* with --ring-stages, the sm_90a kernels (forward, backward, both) with their ring of each stage count given, and
  that backward with two shares of T and of O; with --y-groups, the sm_90a forward with y on each number of
  blocks per row tile given; with --bwd-splits, the sm_90a backward with the weight gradients in S shares of T and dH
  in D shares of O, for each S:D given;
* the kernels of the default forward and backward, of both on each tile shape (and with hopper), and of the
  triton backend's and the compiled peer's forward and forward + backward, each one's mean time (torch.profiler
  over eager calls);
* for reference, forward and forward + backward of: the triton backend; the compiled peer (the same math in
  plain PyTorch under torch.compile: x [S1 | U2], then that times [U1; S2] / (2L) + b); F.linear (dense weight
  O x I).
Prints one table per shape (ms; the share of the HBM floor: forward reads x and writes y, backward reads g and
x and writes dx, at --hbm TB/s) and writes every number to --out as JSON. Each kernel instance compiles once
(NVRTC, CuPy's disk cache). The JSON is rewritten after each shape, so a run cut short keeps what it timed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import List, Optional, Tuple
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # graph_timing, beside this file
sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))  # harness: benchmarks/run.py's peers
from graph_timing import kernel_times, median_ms  # noqa: E402
from harness.cases import concat_linear  # noqa: E402

SHAPES = [(4096, 4096, 4096), (4096, 8192, 8192), (128, 1024, 1024), (128, 8192, 8192)]
QUICK_SHAPES = [(4096, 4096, 4096), (128, 1024, 1024)]
L, K = 1, 64
NEEDS = (True, True, True, False, False, True)  # x, S1s, S2s, U1s, U2s, bias: what an SKLinear trains


def floor_ms(T: int, I: int, O: int, itemsize: int, tbps: float, what: str) -> float:
    """HBM floor of a pass ("fwd", "bwd", "fwd+bwd"): forward reads x and writes y; backward reads g and x and
    writes dx (weights and H are small)."""
    fwd = (T * I + T * O) * itemsize
    bwd = (T * O + 2 * T * I) * itemsize
    total = {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[what]
    return total / (tbps * 1e12) * 1e3


def make(T: int, I: int, O: int, dtype: torch.dtype, device: torch.device):
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    x = rnd(T, I)
    S1s, U2s = rnd(L, I, K, scale=I**-0.5), rnd(L, I, K, scale=I**-0.5)
    S2s, U1s = rnd(L, K, O, scale=K**-0.5), rnd(L, K, O, scale=K**-0.5)
    bias, grad = rnd(O), rnd(T, O)
    return x, S1s, S2s, U1s, U2s, bias, grad


def forward_plans(T: int, I: int, O: int, R: int, dtype: torch.dtype, sms: int, shared: int,
                  hopper: bool = False, tiles: Optional[List[str]] = None) -> dict:
    """The forward plans the sweep times: the rule's ("default"), the fused kernel (where H fits), and the two
    launches on each tile shape that fits, with the split of H that split_rule gives that shape; with
    ``hopper`` (an sm_90 device, 16-bit inputs), the rule's plan for sm_90 (H and y by forward_sm90.cu where the rule
    says, and that plan with forward.cu's kernels: "default mma.sync"), and each plan of two launches also with H and y by
    forward_sm90.cu ("<name> hopper", with the backward by backward_sm90.cu in forward + backward); ``tiles``: the
    tile shapes to time (default: all of limits.CONFIGS)."""
    from panther_cuda.ops.sketched_linear import limits, sm90
    from panther_cuda.ops.sketched_linear.common import split_rule
    from panther_cuda.ops.sketched_linear.forward import ForwardPlan, forward_rule, fused_groups

    default = forward_rule(T, I, O, R, dtype, sms, shared, hopper=hopper)
    plans = {"default": default}
    if default.hopper_h or default.hopper_y:  # the rule's plan by forward.cu's kernels: what the sm_90a ones save
        plans["default mma.sync"] = dataclasses.replace(default, hopper_h=False, hopper_y=False)
    if R <= limits.FUSED_MAX_R and limits.SMALL.fused_bytes(R, dtype) <= shared:
        plans["fused"] = ForwardPlan(fused=True, o_groups=fused_groups(T, O, sms))
    for name, c in limits.CONFIGS.items():
        if c.shared_bytes(dtype) <= shared and (tiles is None or name in tiles):
            rule = split_rule(I, -(-T // c.bm) * -(-R // c.bn), sms, c)
            plans[name] = ForwardPlan(fused=False, h_splits=rule, tiles=name)
            for s in _around(rule):  # the rule's split halved and doubled: is it the best one?
                plans[f"{name} h_splits={s}"] = ForwardPlan(fused=False, h_splits=s, tiles=name)
    if hopper and dtype in sm90.DTYPES:
        for name, plan in list(plans.items()):
            if not plan.fused and name != "default mma.sync":
                plans[f"{name} hopper"] = dataclasses.replace(plan, hopper_h=True, hopper_y=True)
    return plans


def _around(rule: int) -> List[int]:
    return [s for s in (rule // 2, rule * 2) if 1 <= s <= 64 and s != rule]


def backward_plans(T: int, I: int, O: int, R: int, dtype: torch.dtype, sms: int, shared: int,
                   tiles: Optional[List[str]] = None) -> dict:
    """The backward variants the sweep times: name -> (tiles, split, dh_split): each tile shape that fits with
    the splits of its rule (backward.backward_splits), then halved and doubled; ("default": all by the rule)."""
    from panther_cuda.ops.sketched_linear import limits
    from panther_cuda.ops.sketched_linear.backward import backward_splits

    plans = {"default": (None, None, None)}
    for name, c in limits.CONFIGS.items():
        if c.shared_bytes(dtype) <= shared and (tiles is None or name in tiles):
            split, dh_split = backward_splits(T, I, O, R, NEEDS, c, sms)
            plans[name] = (name, split, dh_split)
            for f in (0.5, 2):
                s, d = max(1, int(split * f)), max(1, int(dh_split * f))
                if (s, d) != (split, dh_split) and max(s, d) <= 64:
                    plans[f"{name} split={s} dh_split={d}"] = (name, s, d)
    return plans


def cuda_rows(T, I, O, inputs, replays, tiles: Optional[List[str]] = None, hopper: bool = True
              ) -> Tuple[List[dict], dict]:
    from panther.backends.toolkit import multiprocessors, shared_memory_per_block
    from panther_cuda.ops.sketched_linear import limits, sm90
    from panther_cuda.ops.sketched_linear.backward import backward_tiles, sketched_linear_backward
    from panther_cuda.ops.sketched_linear.forward import sketched_linear_forward

    x, S1s, S2s, U1s, U2s, bias, grad = inputs
    R = 2 * L * K
    sms, shared = multiprocessors(), shared_memory_per_block()
    hopper = hopper and sm90.on_sm90(torch.cuda.current_device()) and x.dtype in sm90.DTYPES
    plans = forward_plans(T, I, O, R, x.dtype, sms, shared, hopper=hopper, tiles=tiles)
    default = plans["default"]
    rule_tiles = backward_tiles(T, I, O, x.dtype, x.device)
    rows = []

    def forward(plan):
        return lambda: sketched_linear_forward(x, S1s, S2s, U1s, U2s, bias, plan=plan)

    for name, plan in plans.items():
        rows.append({"impl": "cuda", "what": "fwd", "plan": name, "detail": repr(plan),
                     "ms": median_ms(forward(plan), replays)})
    _, h = sketched_linear_forward(x, S1s, S2s, U1s, U2s, bias, plan=default)
    for label, (bt, split, dh_split) in backward_plans(T, I, O, R, x.dtype, sms, shared, tiles).items():
        def bwd(bt=bt, split=split, dh_split=dh_split):
            sketched_linear_backward(grad, x, h, S1s, S2s, U1s, U2s, NEEDS, split=split, dh_split=dh_split,
                                     tiles=bt)

        detail = f"tiles={bt or rule_tiles} split={split or 'rule'} dh_split={dh_split or 'rule'}"
        rows.append({"impl": "cuda", "what": "bwd", "plan": label, "detail": detail, "ms": median_ms(bwd, replays)})
    if hopper:  # backward_sm90.cu's kernels, the rule's splits for the large tiles
        def bwd_hopper():
            sketched_linear_backward(grad, x, h, S1s, S2s, U1s, U2s, NEEDS, hopper=True)

        rows.append({"impl": "cuda", "what": "bwd", "plan": "large hopper", "detail": "hopper=True split=rule",
                     "ms": median_ms(bwd_hopper, replays)})
    pairs = {"default": (default, None)}
    for name in limits.CONFIGS:
        if name in plans:
            pairs[name] = (plans[name], name)
        if f"{name} hopper" in plans:
            pairs[f"{name} hopper"] = (plans[f"{name} hopper"], name)
    for label, (plan, bt) in pairs.items():
        def step(plan=plan, bt=bt):
            _, hh = sketched_linear_forward(x, S1s, S2s, U1s, U2s, bias, plan=plan)
            sketched_linear_backward(grad, x, hh, S1s, S2s, U1s, U2s, NEEDS, tiles=bt, hopper=plan.hopper_h)

        rows.append({"impl": "cuda", "what": "fwd+bwd", "plan": label,
                     "detail": f"{plan!r}, backward tiles={bt or rule_tiles}", "ms": median_ms(step, replays)})
    kernels = {"fwd": kernel_times(forward(default)),
               "bwd": kernel_times(lambda: sketched_linear_backward(grad, x, h, S1s, S2s, U1s, U2s, NEEDS))}
    for name in limits.CONFIGS:  # each tile shape's kernels: which launch a shape speeds up
        if name in plans:
            kernels[f"fwd {name}"] = kernel_times(forward(plans[name]))
            kernels[f"bwd {name}"] = kernel_times(
                lambda name=name: sketched_linear_backward(grad, x, h, S1s, S2s, U1s, U2s, NEEDS, tiles=name))
    if "default hopper" in plans:
        kernels["fwd hopper"] = kernel_times(forward(plans["default hopper"]))
        kernels["bwd hopper"] = kernel_times(
            lambda: sketched_linear_backward(grad, x, h, S1s, S2s, U1s, U2s, NEEDS, hopper=True))
    return rows, kernels


def hopper_plan(T, I, O, x):
    """The rule's forward plan with H and y by forward_sm90.cu (forward_plans' "default hopper")."""
    from panther.backends.toolkit import multiprocessors, shared_memory_per_block

    return forward_plans(T, I, O, 2 * L * K, x.dtype, multiprocessors(), shared_memory_per_block(), hopper=True,
                         tiles=[])["default hopper"]


def ring_rows(T, I, O, inputs, replays, stages: int) -> Tuple[List[dict], dict]:
    """The sm_90a kernels with their ring of ``stages`` stages (in place of sm90.ring_stages' choice): the forward of
    :func:`hopper_plan`, the backward by backward_sm90.cu, both together, that backward in two shares of T and of O,
    and their kernels; plans and kernel tables named with " s<stages>"."""
    from panther_cuda.ops.sketched_linear import sm90
    from panther_cuda.ops.sketched_linear.backward import sketched_linear_backward
    from panther_cuda.ops.sketched_linear.forward import sketched_linear_forward

    x, S1s, S2s, U1s, U2s, bias, grad = inputs
    plan = hopper_plan(T, I, O, x)
    with mock.patch.object(sm90, "ring_stages", lambda *_: stages):
        _, h = sketched_linear_forward(x, S1s, S2s, U1s, U2s, bias, plan=plan)

        def fwd():
            sketched_linear_forward(x, S1s, S2s, U1s, U2s, bias, plan=plan)

        def bwd():
            sketched_linear_backward(grad, x, h, S1s, S2s, U1s, U2s, NEEDS, hopper=True)

        def step():
            _, hh = sketched_linear_forward(x, S1s, S2s, U1s, U2s, bias, plan=plan)
            sketched_linear_backward(grad, x, hh, S1s, S2s, U1s, U2s, NEEDS, hopper=True)

        def bwd2():  # fewer blocks than the rule's shares give at large T: room for a deeper ring's one block a SM
            sketched_linear_backward(grad, x, h, S1s, S2s, U1s, U2s, NEEDS, hopper=True, split=2, dh_split=2)

        label = f"hopper s{stages}"
        rows = [{"impl": "cuda", "what": what, "plan": name, "detail": f"{plan!r}, ring of {stages} stages",
                 "ms": median_ms(fn, replays)}
                for what, name, fn in (("fwd", label, fwd), ("bwd", label, bwd), ("fwd+bwd", label, step),
                                       ("bwd", f"{label} split=2 dh_split=2", bwd2))]
        return rows, {f"fwd {label}": kernel_times(fwd), f"bwd {label}": kernel_times(bwd),
                      f"bwd {label} split=2": kernel_times(bwd2)}


def y_groups_rows(T, I, O, inputs, replays, groups: int) -> Tuple[List[dict], dict]:
    """The forward of :func:`hopper_plan` with fwd_y_sm90 on ``groups`` blocks per row tile (each walking every
    ``groups``-th column tile; sm90.groups gives the rule's) and its kernels; named "hopper y groups=<G>"."""
    from panther.backends.toolkit import cdiv
    from panther_cuda.ops.sketched_linear import sm90
    from panther_cuda.ops.sketched_linear.forward import sketched_linear_forward

    x, S1s, S2s, U1s, U2s, bias, _ = inputs
    plan = hopper_plan(T, I, O, x)
    with mock.patch.object(sm90, "groups", lambda T_, O_, *_: max(1, min(groups, cdiv(O_, sm90.BN)))):
        def fwd():
            sketched_linear_forward(x, S1s, S2s, U1s, U2s, bias, plan=plan)

        label = f"hopper y groups={groups}"
        rows = [{"impl": "cuda", "what": "fwd", "plan": label, "detail": repr(plan), "ms": median_ms(fwd, replays)}]
        return rows, {f"fwd {label}": kernel_times(fwd)}


def bwd_split_rows(T, I, O, inputs, replays, split: int, dh_split: int) -> Tuple[List[dict], dict]:
    """The backward by backward_sm90.cu with the weight gradients in ``split`` shares of T and dH in ``dh_split``
    shares of O (in place of the rule's) and its kernels; named "hopper split=S dh_split=D"."""
    from panther_cuda.ops.sketched_linear.backward import sketched_linear_backward
    from panther_cuda.ops.sketched_linear.forward import sketched_linear_forward

    x, S1s, S2s, U1s, U2s, bias, grad = inputs
    _, h = sketched_linear_forward(x, S1s, S2s, U1s, U2s, bias, plan=hopper_plan(T, I, O, x))

    def bwd():
        sketched_linear_backward(grad, x, h, S1s, S2s, U1s, U2s, NEEDS, hopper=True, split=split, dh_split=dh_split)

    label = f"hopper split={split} dh_split={dh_split}"
    rows = [{"impl": "cuda", "what": "bwd", "plan": label, "detail": "backward_sm90.cu", "ms": median_ms(bwd, replays)}]
    return rows, {f"bwd {label}": kernel_times(bwd)}


def autograd_rows(impl: str, fn, leaves: list, grad, replays, kernels: Optional[dict] = None) -> List[dict]:
    """Forward and forward + backward of ``fn`` in CUDA-graph time; with ``kernels``, each pass's kernels too
    (``kernels[f"{impl} fwd"]``, ``kernels[f"{impl} fwd+bwd"]``)."""
    def reset():
        for t in leaves:
            t.grad = None

    with torch.no_grad():
        fwd = median_ms(lambda: fn(), replays)

    def step():
        fn().backward(grad)

    if kernels is not None:
        with torch.no_grad():
            kernels[f"{impl} fwd"] = kernel_times(lambda: fn())
        kernels[f"{impl} fwd+bwd"] = kernel_times(lambda: (reset(), step()))
    return [{"impl": impl, "what": "fwd", "plan": "-", "detail": "", "ms": fwd},
            {"impl": impl, "what": "fwd+bwd", "plan": "-", "detail": "", "ms": median_ms(step, replays, reset)}]


def reference_rows(inputs, replays, kernels: dict) -> List[dict]:
    """The triton backend, the compiled peer and F.linear; the kernels of the first two into ``kernels``."""
    x, S1s, S2s, U1s, U2s, bias, grad = inputs
    rows = []
    xs, s1, s2, b = (t.detach().clone().requires_grad_() for t in (x, S1s, S2s, bias))
    try:
        import panther_triton

        rows += autograd_rows("triton", lambda: panther_triton.sketched_linear(xs, s1, s2, U1s, U2s, b),
                              [xs, s1, s2, b], grad, replays, kernels)
    except Exception as e:  # reported, not fatal: the cuda rows are what the sweep is for
        print(f"triton skipped: {type(e).__name__}: {e}", file=sys.stderr)
    peer = torch.compile(concat_linear, fullgraph=True)  # the harness's `compiled` peer
    xp, s1p, s2p, bp = (t.detach().clone().requires_grad_() for t in (x, S1s, S2s, bias))
    rows += autograd_rows("compiled peer", lambda: peer(xp, s1p, s2p, U1s, U2s, bp), [xp, s1p, s2p, bp], grad,
                          replays, kernels)
    O, I = grad.shape[1], x.shape[1]
    w = (torch.randn(O, I, device=x.device) * I**-0.5).to(x.dtype).requires_grad_()
    xd, bd = x.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
    rows += autograd_rows("F.linear", lambda: torch.nn.functional.linear(xd, w, bd), [xd, w, bd], grad, replays)
    return rows


def _shape(text: str) -> Tuple[int, int, int]:
    """--shape's value, "TxIxO" (three positive integers)."""
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"--shape {text!r}: expected TxIxO, three positive integers (e.g. 4096x4096x4096)")
    return tuple(int(p) for p in parts)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--quick", action="store_true", help="two shapes, 20 replays")
    ap.add_argument("--shape", action="append", default=None, metavar="TxIxO", type=_shape,
                    help="a shape to time in place of the default ones (repeatable)")
    ap.add_argument("--replays", type=int, default=None, help="timed replays per call, at least 20 (default 50, --quick 20)")
    ap.add_argument("--tiles", default=None, metavar="NAME,...",
                    help="tile shapes to time (keys of limits.CONFIGS, comma-separated; default: all)")
    ap.add_argument("--no-hopper", action="store_true", help="skip the sm_90 wgmma plans")
    ap.add_argument("--ring-stages", default="", metavar="S,...",
                    help="also time the sm_90a kernels with their ring of each of these stage counts (at least 3)")
    ap.add_argument("--y-groups", default="", metavar="G,...",
                    help="also time the sm_90a forward with y on each of these numbers of blocks per row tile")
    ap.add_argument("--bwd-splits", default="", metavar="S:D,...",
                    help="also time the sm_90a backward with the weight gradients in S shares of T and dH in D of O")
    ap.add_argument("--hbm", type=float, default=4.8, help="HBM bandwidth for the floor, TB/s (default: the H200's specified 4.8)")
    args = ap.parse_args(argv)
    from panther_cuda.ops.sketched_linear import sm90
    from panther_cuda.ops.sketched_linear.limits import CONFIGS

    ring_stages = [int(v) for v in args.ring_stages.split(",") if v.strip()]
    if any(v < 3 for v in ring_stages):
        ap.error(f"--ring-stages {args.ring_stages!r}: expected stage counts of at least 3")
    try:
        bwd_splits = [tuple(int(n) for n in v.split(":")) for v in args.bwd_splits.split(",") if v.strip()]
    except ValueError:
        bwd_splits = [()]
    if any(len(p) != 2 or min(p) < 1 for p in bwd_splits):
        ap.error(f"--bwd-splits {args.bwd_splits!r}: expected pairs S:D of share counts, e.g. 4:1,2:2")
    tiles = None if args.tiles is None else [t.strip() for t in args.tiles.split(",") if t.strip()]
    unknown = [t for t in tiles or [] if t not in CONFIGS]
    if unknown or tiles == []:
        ap.error(f"--tiles {args.tiles!r}: expected names among {sorted(CONFIGS)}")
    if not torch.cuda.is_available():
        print("linear_sweep needs a CUDA GPU", file=sys.stderr)
        return 2
    replays = max(20, args.replays or (20 if args.quick else 50))
    dtype, device = torch.bfloat16, torch.device("cuda")
    started = time.time()
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "dtype": "bfloat16", "L": L,
              "k": K, "replays": replays, "hbm_tbps": args.hbm, "shapes": []}
    shapes = args.shape or (QUICK_SHAPES if args.quick else SHAPES)
    for T, I, O in shapes:
        inputs = make(T, I, O, dtype, device)
        rows, kernels = cuda_rows(T, I, O, inputs, replays, tiles, not args.no_hopper)
        if not args.no_hopper and sm90.on_sm90(torch.cuda.current_device()):
            for stages in ring_stages:
                try:
                    more_rows, more_kernels = ring_rows(T, I, O, inputs, replays, stages)
                except Exception as e:  # reported, not fatal: the shape's other rows are kept
                    print(f"ring of {stages} stages skipped: {type(e).__name__}: {e}", file=sys.stderr)
                    continue
                rows += more_rows
                kernels.update(more_kernels)
            for split, dh_split in bwd_splits:
                more_rows, more_kernels = bwd_split_rows(T, I, O, inputs, replays, split, dh_split)
                rows += more_rows
                kernels.update(more_kernels)
            for groups in [int(v) for v in args.y_groups.split(",") if v.strip()]:
                more_rows, more_kernels = y_groups_rows(T, I, O, inputs, replays, groups)
                rows += more_rows
                kernels.update(more_kernels)
        rows += reference_rows(inputs, replays, kernels)
        for r in rows:
            r["floor_ms"] = floor_ms(T, I, O, 2, args.hbm, r["what"])
            r["of_floor"] = r["floor_ms"] / r["ms"]
        result["shapes"].append({"T": T, "I": I, "O": O, "rows": rows, "kernels": kernels})
        print(f"\nT={T} I={I} O={O} (L={L}, k={K}, bf16; CUDA graph, median of {replays} replays)")
        print("| impl | pass | plan | ms | of HBM floor | detail |\n|---|---|---|---:|---:|---|")
        for r in rows:
            print(f"| {r['impl']} | {r['what']} | {r['plan']} | {r['ms']:.4f} | {100 * r['of_floor']:.0f} % | "
                  f"{r['detail']} |")
        print("\nkernels of the cuda plans and of the references (torch.profiler, eager calls)\n| pass | kernel | per call | us |\n"
              "|---|---|---:|---:|")
        for what, ks in kernels.items():
            for r in ks:
                print(f"| {what} | {r['kernel'][:110]} | {r['per_call']:g} | {r['us']:.1f} |")
        del inputs
        torch.cuda.empty_cache()
        result["seconds"] = time.time() - started
        with open(args.out, "w") as f:  # after each shape: a run cut short keeps what it timed
            json.dump(result, f, indent=1)
    print(f"\n{args.out}: {len(result['shapes'])} shapes in {result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
