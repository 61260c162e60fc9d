"""Tabulate the launch plans the rule of ops/sketched_linear/plan.py picks (computed, not measured).

    python tools/plan_table.py [--sms 132] [--model OLD_PLAN_PY]

Shapes: the headline and gpu-preset ones (rows 128 and 4096; features 1024-8192; (L, k) in (1, 64),
(2, 32), (4, 32), (8, 64)). With --model, a plan.py of an earlier revision that chose plans by its
fitted cost model (for instance `git show 4965384:packages/panther-triton/src/panther_triton/ops/
sketched_linear/plan.py > plan_model.py`), the table puts that model's choice beside the rule's.
Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import re
import sys
import types

from panther_triton.ops.sketched_linear.plan import backward_rule, forward_rule

ROWS = (128, 4096)
FEATURES = (1024, 2048, 4096, 8192)
TERMS = ((1, 64), (2, 32), (4, 32), (8, 64))


def _fwd(p) -> str:
    return f"fused og={p.o_groups}" if p.fused else f"si={p.split_i} og={p.o_groups}"


def _bwd(p) -> str:
    return f"so={p.split_o} st={p.split_t}"


# what the model's plan.py imported from the package at the time, for loading it on its own
_MODEL_IMPORTS = """
from panther.backends.toolkit import multiprocessors, size_hint
WIDEST_CHUNK = 128
def interpreting():
    return False
def remember(cache, key, value):
    cache[key] = value
    return value
"""


def _load_model(path: str):
    source = open(path).read()
    source = re.sub(r"^from panther_triton\._runtime import .*$", _MODEL_IMPORTS, source, flags=re.M)
    module = types.ModuleType("plan_model")
    sys.modules["plan_model"] = module  # dataclasses look their module up
    exec(compile(source, path, "exec"), module.__dict__)
    return module


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sms", type=int, default=132, help="SMs of the GPU (H200: 132)")
    ap.add_argument("--model", help="a plan.py with the fitted cost model (_gpu_model, _best_forward, _best_backward)")
    args = ap.parse_args()
    model = None
    if args.model:
        module = _load_model(args.model)
        model = (module, module._gpu_model(args.sms))
    head = "| rows | features | L, k | forward (rule) | backward (rule) |"
    line = "|---:|---:|---|---|---|"
    if model:
        head += " forward (model) | backward (model) | same |"
        line += "---|---|---|"
    print(head)
    print(line)
    for T in ROWS:
        for L, k in TERMS:
            for n in FEATURES:
                f, b = forward_rule(T, n, n, L * k, args.sms), backward_rule(T, n, n, L * k, args.sms)
                row = f"| {T} | {n} | {L}, {k} | {_fwd(f)} | {_bwd(b)} |"
                if model:
                    module, m = model
                    mf = module._best_forward(T, n, n, L * k, 2, m)
                    mb = module._best_backward(T, n, n, L * k, 2, m, False)
                    same = "yes" if (_fwd(mf), _bwd(mb)) == (_fwd(f), _bwd(b)) else "no"
                    row += f" {_fwd(mf)} | {_bwd(mb)} | {same} |"
                print(row)


if __name__ == "__main__":
    main()
