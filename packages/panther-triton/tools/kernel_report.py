"""What each Triton kernel of the sketched linear op does on a CUDA GPU, per shape: the autotuner's
timing of every candidate config, the config it kept, and the compiled kernel's registers, spills,
shared memory and matrix instructions (Hopper's warpgroup MMA, ``warp_group_dot`` in the TTGIR, or
the older ``mma.sync`` path).

    python packages/panther-triton/tools/kernel_report.py [--rows 4096] [--sizes 1024 4096 8192]
        [--extra] [--json out.json]

--extra adds candidate configs beyond the shipped ones (larger tiles, other warp and stage counts) to
every kernel before it is first tuned, at every column chunk, to see whether the candidate lists leave
speed behind.
bfloat16, L = 1, k = 64 unless --L/--k say otherwise; each shape runs the planner's chosen plans once
(tuning them), then reports. The timings are the autotuner's (triton.testing.do_bench with the short
budget of _runtime.tuning_bench: median of the runs, L2 flushed between them).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

# candidates --extra adds: (meta, num_warps, num_stages), per kernel
EXTRA = {
    "_sketch_in_kernel": [({"BT": 128, "BI": 64}, 8, 5), ({"BT": 256, "BI": 64}, 8, 3)],
    "_sketch_out_kernel": [
        ({"BT": 256, "BI": 64, "BO": 128}, 8, 3), ({"BT": 256, "BI": 64, "BO": 64}, 8, 3),
        ({"BT": 128, "BI": 64, "BO": 128}, 4, 2), ({"BT": 128, "BI": 64, "BO": 64}, 4, 3),
    ],
    "_grad_from_g_kernel": [({"BT": 64, "BO": 64}, 4, 3), ({"BT": 128, "BO": 64}, 4, 3)],
    "_grad_from_x_kernel": [
        ({"BT": 64, "BI": 256}, 8, 3), ({"BT": 128, "BI": 128}, 4, 2), ({"BT": 32, "BI": 128}, 4, 4),
    ],
}


def _kernels():
    from panther_triton.ops.sketched_linear import backward, forward

    return {
        "_sketch_in_kernel": forward._sketch_in_kernel,
        "_sketch_out_kernel": forward._sketch_out_kernel,
        "_grad_from_g_kernel": backward._grad_from_g_kernel,
        "_grad_from_x_kernel": backward._grad_from_x_kernel,
    }


def _config_str(c) -> str:
    meta = ",".join(f"{k}={v}" for k, v in sorted(c.kwargs.items()))
    return f"{meta} w{c.num_warps} s{c.num_stages}"


def _compiled(tuner):
    """Every compiled variant of an autotuned kernel so far: CompiledKernel objects."""
    fn = tuner.fn
    out = []
    for cache in getattr(fn, "device_caches", {}).values():
        kernel_cache = cache[0] if isinstance(cache, tuple) else cache
        if isinstance(kernel_cache, dict):
            out += list(kernel_cache.values())
    return out


def _tiles(src, consts) -> dict:
    """The block-size constexprs of a compiled variant (keys are argument names or index paths)."""
    names = getattr(getattr(src, "fn", None), "arg_names", [])
    out = {}
    for key, v in consts.items():
        idx = key[0] if isinstance(key, tuple) and key else key
        name = names[idx] if isinstance(idx, int) and idx < len(names) else str(idx)
        if name in ("BT", "BI", "BO", "BLK"):
            out[name] = v
    return out


def _describe_compiled(ck) -> dict:
    try:
        ck._init_handles()
    except Exception:  # noqa: BLE001 - a variant that failed to load (out of resources) is still listed
        pass
    md = ck.metadata
    src = getattr(ck, "src", None)
    consts = getattr(src, "constants", None) or {}
    ttgir = ck.asm.get("ttgir", "") if hasattr(ck, "asm") else ""
    ptx = ck.asm.get("ptx", "") if hasattr(ck, "asm") else ""
    return {
        "tiles": _tiles(src, consts),
        "warps": getattr(md, "num_warps", None), "stages": getattr(md, "num_stages", None),
        "shared": getattr(md, "shared", None),
        "regs": getattr(ck, "n_regs", None), "spills": getattr(ck, "n_spills", None),
        "warp_group_dot": ttgir.count("warp_group_dot"), "mma_v2": ttgir.count("versionMajor = 2"),
        "mma_v3": ttgir.count("versionMajor = 3"), "wgmma_ptx": ptx.count("wgmma.mma_async"),
        "mma_sync_ptx": ptx.count("mma.sync"), "cp_async": ttgir.count("async_copy_global_to_local"),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[4096])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 8192])
    ap.add_argument("--L", type=int, default=1)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--extra", action="store_true", help="add the EXTRA candidate configs before tuning")
    ap.add_argument("--json")
    ap.add_argument("--dump", help="folder for each compiled variant's TTGIR")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to report")
        return 1
    import triton

    import panther_triton
    from panther_triton.ops.sketched_linear.plan import describe

    kernels = _kernels()
    if args.extra:
        for name, tuner in kernels.items():
            extra = [triton.Config(dict(m), num_warps=w, num_stages=st) for m, w, st in EXTRA[name]]
            tuner.configs = list(tuner.configs) + extra  # pruned to shared memory like the others
    dtype = torch.bfloat16
    print({"device": torch.cuda.get_device_name(), "triton": triton.__version__, "torch": torch.__version__,
           "commit": os.environ.get("PANTHER_COMMIT", ""), "extra": args.extra})
    report = []
    L, k = args.L, args.k
    for T in args.rows:
        for n in args.sizes:
            gen = torch.Generator(device="cuda").manual_seed(0)

            def rnd(*shape, scale=1.0):
                return (torch.randn(*shape, generator=gen, device="cuda") * scale).to(dtype)

            x = rnd(T, n)
            S1s, U2s = rnd(L, n, k, scale=n**-0.5), rnd(L, n, k, scale=n**-0.5)
            S2s, U1s = rnd(L, k, n, scale=k**-0.5), rnd(L, k, n, scale=k**-0.5)
            b, g = rnd(n), rnd(T, n)
            print(f"\n== T={T} I=O={n} L={L} k={k}: {describe(T, n, n, L * k, x.device)}")
            row = {"T": T, "I": n, "O": n, "L": L, "k": k, "kernels": {}}
            tuned = {}  # kernel -> (timings, kept config) of its tuning at this shape; a kernel the plan does
            # not launch, or whose autotune key was tuned before, is not tuned here and not reported

            def run(fn, names):
                for name in names:
                    kernels[name].configs_timings = None
                out = fn()
                torch.cuda.synchronize()
                for name in names:
                    t = kernels[name]
                    if getattr(t, "configs_timings", None):
                        tuned[name] = (dict(t.configs_timings), t.best_config)
                return out

            _, h = run(lambda: panther_triton.sketched_linear_forward(x, S1s, S2s, U1s, U2s, b),
                       ("_sketch_in_kernel", "_sketch_out_kernel"))
            run(lambda: panther_triton.sketched_linear_backward(g, x, h, S1s, S2s, U1s, U2s,
                                                                (True, True, True, False, False, True)),
                ("_grad_from_g_kernel", "_grad_from_x_kernel"))
            for name in kernels:
                if name not in tuned:
                    print(f"  {name}: not tuned at this shape (not launched, or its key was tuned before)")
                    continue
                timings, best = tuned[name]
                ranked = sorted(timings.items(), key=lambda kv: (kv[1][0] if isinstance(kv[1], list) else kv[1]))
                print(f"  {name}: kept {_config_str(best)}")
                ts = []
                for c, t in ranked:
                    us = (t[0] if isinstance(t, list) else t) * 1e3
                    ts.append((_config_str(c), us))
                    print(f"      {us:9.1f} us  {_config_str(c)}")
                row["kernels"][name] = {"kept": _config_str(best), "timings_us": ts}
            report.append(row)
    print("\n== compiled variants (all shapes)")
    compiled = {}
    for name, tuner in kernels.items():
        compiled[name] = [_describe_compiled(ck) for ck in _compiled(tuner)]
        if args.dump:
            os.makedirs(args.dump, exist_ok=True)
            for i, ck in enumerate(_compiled(tuner)):
                with open(os.path.join(args.dump, f"{name}_{i}.ttgir"), "w") as f:
                    f.write(ck.asm.get("ttgir", ""))
        for d in compiled[name]:
            print(f"  {name}: {d}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"shapes": report, "compiled": compiled}, f, indent=1)
        print("wrote", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
