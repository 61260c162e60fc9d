#!/usr/bin/env python
"""Time Panther's ops on every available backend against what a user would use instead.

    python benchmarks/run.py --preset {cpu,gpu,gpu-quick} [--out DIR] [--filter REGEX ...] [--modes fp32,bf16]

Prints a table as it goes, then writes <out>/<YYYY-MM-DD>_<device>_<commit>.json (every figure, the
device's ceilings, versions) and one speedup plot per op next to it. See benchmarks/README.md.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import panther  # noqa: E402
from panther.backends import BackendError  # noqa: E402

from harness import cli  # noqa: E402
from harness.cases import PASSES, layer_leaves  # noqa: E402
from harness.modes import MODES, set_tf32  # noqa: E402
from harness.plots import plot_speedups  # noqa: E402
from harness.report import (  # noqa: E402
    environment, memory_table, memory_table_text, result_stem, table_header, table_row, write_json,
)
from harness.roofline import measure_ceilings, roofline_floor_s  # noqa: E402
from harness.timing import Clock, cpu_snapshot, foreign_cpu  # noqa: E402

# Backends not timed on a device although available there, and why.
NOT_TIMED = {"cpu": {"triton": "runs on CPU only under TRITON_INTERPRET=1, far too slow to time"}}
QUIET = 0.10  # a round is quiet when other processes used less than this share of all CPUs
OURS = "panther-randnla-"  # by default only backends shipped by Panther's distributions are timed


def pick_backends(device, wanted):
    """(names to time, {name: why not timed}) among the backends the registry says can run here."""
    from panther.backends import backend_infos

    timed, skipped = [], {}
    for info in backend_infos():
        if not info.available:
            skipped[info.name] = f"unavailable: {info.unavailable_reason}"
        elif wanted and info.name not in wanted:
            skipped[info.name] = "not in --backends"
        elif info.name in NOT_TIMED.get(device.type, {}):
            skipped[info.name] = NOT_TIMED[device.type][info.name]
        elif not wanted and not (info.distribution or "").startswith(OURS):
            skipped[info.name] = f"from {info.distribution}, not Panther's (name it in --backends to time it)"
        else:
            timed.append(info.name)
    return timed, skipped


def describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:400] if text else ''}"


def make_call(fn, args, pass_, grad_out):
    """The timed call: forward under no_grad, or forward then backward from a fixed output gradient."""
    if pass_ == "fwd":
        def call():
            with torch.no_grad():
                return fn(*args)
    else:
        def call():
            fn(*args).backward(grad_out)
    return call


def run_case(case, mode, clock, preset, backends, ceilings):
    """Every implementation of one case in one dtype mode, both passes: a list of records."""
    dtype, tf32 = MODES[mode]
    if clock.cuda:
        set_tf32(tf32)
    inputs = case.build(clock.device, dtype)  # fresh random inputs for each case
    leaves = layer_leaves(inputs)

    def reset_grads():
        for t in leaves:
            t.grad = None

    impls = [i for n, i in case.impls(backends).items() if (case.op, n) not in preset.drop]
    elem = dtype.itemsize
    peak, bandwidth = ceilings["peak_flops"][mode], ceilings["bandwidth_Bps"]
    shared = {
        "op": case.op, "label": case.label, "params": case.params, "tag": case.tag, "mode": mode,
        "dtype": str(dtype).replace("torch.", ""), "tf32": tf32, "base": case.base, "x_key": case.x_key,
        "x": getattr(case, case.x_key), "series": case.series, "load": os.getloadavg(),
    }
    records, calls = {}, {}
    for impl in impls:
        for pass_ in PASSES:
            flops, elems = case.work(impl.family, pass_)
            floor = roofline_floor_s(flops, elems * elem, peak, bandwidth)
            rec = dict(shared, impl=impl.name, kind=impl.kind, family=impl.family, **{"pass": pass_},
                       flops=flops, bytes=elems * elem, floor_ms=floor * 1e3, eager=None, graph=None,
                       peak_bytes=None, roofline_frac=None, speedup={}, speedup_graph={})
            if floor > preset.max_call_s:
                rec["skipped"] = (f"roofline floor {floor * 1e3:.0f} ms per call is over this preset's limit "
                                  f"of {preset.max_call_s * 1e3:.0f} ms (too long to time)")
            records[impl.name, pass_] = rec
            calls[impl.name, pass_] = make_call(impl.fn, [inputs[a] for a in impl.args], pass_, inputs["g"])
    live = lambda: [(k, r) for k, r in records.items() if not (r.get("skipped") or r.get("error"))]  # noqa: E731

    # Eager timings, interleaved across implementations (see Clock.measure). With rounds > 1 the whole
    # measurement is repeated; each figure is the median round among the quiet rounds (other processes
    # used under QUIET of the CPUs, read from /proc/stat), or among all rounds if none was quiet.
    runs, foreign = defaultdict(list), []
    for _ in range(case.rounds or preset.rounds):
        todo = {key: (calls[key], reset_grads if key[1] != "fwd" else None) for key, _ in live()}
        snap = cpu_snapshot() if not clock.cuda else None
        got_all = clock.measure(todo, preset.budget)
        foreign.append(foreign_cpu(snap, cpu_snapshot()) if snap else None)
        for key, got in got_all.items():
            if isinstance(got, BackendError):
                records[key]["skipped"] = describe(got)
            elif isinstance(got, Exception):  # OOM, a kernel that fails: recorded, the run goes on
                records[key]["error"] = describe(got)
            else:
                runs[key].append(got)
        release(clock)
    quiet = [i for i, f in enumerate(foreign) if f is not None and f < QUIET]
    chosen = quiet or list(range(len(foreign)))
    for key, rec in live():
        ordered = sorted(chosen, key=lambda i: runs[key][i]["median_ms"])
        rec["eager"] = dict(runs[key][ordered[(len(ordered) - 1) // 2]], rounds_ms=[t["median_ms"] for t in runs[key]],
                            rounds_foreign_cpu=foreign, rounds_used=chosen)

    if clock.cuda:  # peak memory and CUDA-graph replays, once each
        for key, rec in live():
            before = reset_grads if key[1] != "fwd" else None
            try:
                rec["peak_bytes"] = clock.peak_bytes(calls[key], before)
            except Exception as exc:
                rec["peak_error"] = describe(exc)
                release(clock)
            graph = None
            try:
                graph = clock.capture(calls[key], before)
                rec["graph"] = clock.measure_one(graph.replay, preset.budget)
            except Exception as exc:
                rec["graph"] = {"error": describe(exc)}
                release(clock)
            del graph
        release(clock)

    # Each sketch-family forward against the plain math in float64 on the same inputs.
    ref = None
    for (name, pass_), rec in live():
        if pass_ != "fwd" or rec["family"] != "sketch":
            continue
        try:
            ref = case.reference(inputs) if ref is None else ref
            y = calls[name, pass_]().double()
            rec["rel_err"] = float((y - ref).norm() / ref.norm())
        except Exception as exc:
            rec["err_error"] = describe(exc)

    for (name, pass_), rec in live():
        t = rec["eager"]["median_ms"]
        rec["roofline_frac"] = rec["floor_ms"] / t
        for col, other in (("base", case.base), ("plain", "plain"), ("compiled", "compiled")):
            o = records.get((other, pass_))
            if other != name and o and o["eager"]:
                rec["speedup"][col] = o["eager"]["median_ms"] / t
                if "median_ms" in (rec["graph"] or {}) and "median_ms" in (o["graph"] or {}):
                    rec["speedup_graph"][col] = o["graph"]["median_ms"] / rec["graph"]["median_ms"]
    del inputs, leaves, calls, ref
    release(clock)
    return list(records.values())


def release(clock):
    if clock.cuda:
        try:
            torch.cuda.synchronize(clock.device)
        except Exception:
            pass
        torch.cuda.empty_cache()


def headlines(records):
    """For each tagged case: its backends' fwd+bwd speedup over the baseline, with the per-round ratios."""
    out = []
    for r in records:
        if not r["tag"] or r["kind"] != "backend" or r["pass"] != "fwd+bwd" or not r["eager"]:
            continue
        base = next((b for b in records if b["label"] == r["label"] and b["mode"] == r["mode"]
                     and b["pass"] == "fwd+bwd" and b["impl"] == r["base"] and b["eager"]), None)
        plain = next((b for b in records if b["label"] == r["label"] and b["mode"] == r["mode"]
                      and b["pass"] == "fwd+bwd" and b["impl"] == "plain" and b["eager"]), None)
        if base is None:
            continue
        per_round = [b / t for b, t in zip(base["eager"]["rounds_ms"], r["eager"]["rounds_ms"])]
        used = r["eager"]["rounds_used"]
        out.append({
            "tag": r["tag"], "case": r["label"], "mode": r["mode"], "impl": r["impl"], "baseline": r["base"],
            "baseline_ms": base["eager"]["median_ms"], "impl_ms": r["eager"]["median_ms"],
            "speedup": r["speedup"]["base"], "speedup_per_round": per_round,
            "rounds_foreign_cpu": r["eager"]["rounds_foreign_cpu"], "rounds_used": used,
            "speedup_median_all_rounds": statistics.median(per_round),
            "plain_ms": plain and plain["eager"]["median_ms"],
            "plain_speedup_over_baseline": plain and base["eager"]["median_ms"] / plain["eager"]["median_ms"],
        })
    return out


def main(argv=None) -> int:
    parser = cli.parser(__doc__, "time")
    args = parser.parse_args(argv)
    started, preset, device, cases, modes = cli.start(parser, args)
    deadline = args.max_minutes if args.max_minutes is not None else preset.deadline_min

    env = environment(device)
    backends, not_timed = pick_backends(device, [b for b in args.backends.split(",") if b])
    stem = args.out / result_stem(env, device)
    n = 1
    while stem.with_suffix(".json").exists():  # never overwrite an earlier run's file
        n += 1
        stem = args.out / f"{result_stem(env, device)}_{n}"
    json_path = stem.with_suffix(".json")

    print(f"panther {panther.__version__} | torch {env['torch']} | triton {env['triton']} | {env['device']} | "
          f"commit {env['commit']}{' (dirty)' if env['dirty'] else ''} | preset {args.preset} | load {os.getloadavg()}")
    print(f"backends timed: {', '.join(backends)}; not timed here: {not_timed or 'none'}")
    clock = Clock(device)
    ceilings = measure_ceilings(clock, modes, preset.ceiling_budget, preset.rounds)
    print(f"ceilings: copy {ceilings['bandwidth_Bps'] / 1e9:.1f} GB/s; matmul " +
          ", ".join(f"{m} {f / 1e12:.2f} TFLOP/s" for m, f in ceilings["peak_flops"].items()))
    mem = memory_table()
    print("\nMemory of one layer, float32 (MB = 1e6 bytes; buffers are the fixed sketches U, memory too):")
    print(memory_table_text(mem))

    doc = {
        "schema": 1, "preset": args.preset, "argv": sys.argv, "seed": args.seed,
        "started_utc": datetime.datetime.fromtimestamp(started, datetime.timezone.utc).isoformat(),
        "environment": env, "ceilings": ceilings, "backends_timed": backends, "backends_not_timed": not_timed,
        "settings": {"modes": {m: {"dtype": str(MODES[m][0]), "tf32": MODES[m][1]} for m in modes},
                     "budget": dataclasses.asdict(preset.budget),
                     "rounds": preset.rounds, "max_call_s": preset.max_call_s, "deadline_min": deadline,
                     "drop": preset.drop, "note": preset.note, "filter": args.filter,
                     "timing": ("CUDA events, L2 flushed before each call" if clock.cuda else "time.perf_counter")
                               + "; median over reps, implementations interleaved; with rounds > 1 the median "
                                 f"round among quiet rounds (other processes < {QUIET:.0%} of the CPUs), else all",
                     "peak_memory": ("torch.cuda.max_memory_allocated during one call, minus what was allocated "
                                     "before it (inputs and parameters), so activations, outputs, grads, workspaces"
                                     if clock.cuda else "not measured on CPU")},
        "load": {"start": os.getloadavg()}, "memory_table": mem, "results": [], "skipped_cases": [],
    }
    print("\n" + table_header())
    for case in cases:
        for mode in modes:
            if deadline is not None and time.time() - started > 60 * deadline:
                doc["skipped_cases"].append({"case": case.label, "op": case.op, "mode": mode,
                                             "reason": f"run deadline of {deadline} min reached"})
                continue
            recs = run_case(case, mode, clock, preset, backends, ceilings)
            for r in recs:
                print(table_row(r), flush=True)
            timed = next((r["eager"] for r in recs if r["eager"]), None)
            if timed and len(timed["rounds_foreign_cpu"]) > 1:
                shares = ", ".join("?" if f is None else f"{f:.0%}" for f in timed["rounds_foreign_cpu"])
                print(f"  rounds: other processes' share of the CPUs {shares}; "
                      f"figures from rounds {timed['rounds_used']}")
            doc["results"].extend(recs)
            write_json(json_path, doc)
    if doc["skipped_cases"]:
        print(f"\n{len(doc['skipped_cases'])} case x mode runs not started: deadline of {deadline} min reached")

    doc["headline"] = headlines(doc["results"])
    for h in doc["headline"]:
        rounds = ", ".join(f"{x:.1f}" + ("" if f is None else f" [{f:.0%}]")
                           for x, f in zip(h["speedup_per_round"], h["rounds_foreign_cpu"]))
        plain = h["plain_ms"] and f"; plain math {h['plain_ms']:.1f} ms ({h['plain_speedup_over_baseline']:.1f}x)"
        print(f"\n{h['tag']}: {h['case']} {h['mode']} fwd+bwd: {h['baseline']} {h['baseline_ms']:.1f} ms, "
              f"{h['impl']} {h['impl_ms']:.2f} ms -> {h['speedup']:.1f}x over rounds {h['rounds_used']}{plain or ''}\n"
              f"  per round, [other processes' share of the CPUs]: {rounds}; median of all rounds "
              f"{h['speedup_median_all_rounds']:.1f}x")
    doc["load"]["end"] = os.getloadavg()
    doc["plots"] = plot_speedups(doc["results"], stem)
    doc["duration_s"] = time.time() - started
    write_json(json_path, doc)
    print(f"\nwrote {json_path}" + "".join(f"\nwrote {p}" for p in doc["plots"]))
    print(f"took {doc['duration_s']:.0f} s; load average {doc['load']['start']} -> {doc['load']['end']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
