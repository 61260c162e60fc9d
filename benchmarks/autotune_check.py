#!/usr/bin/env python
"""How close ``auto`` dispatch comes to the fastest backend, case by case.

    python benchmarks/autotune_check.py --preset {cpu,gpu,gpu-quick} [--out DIR] [--filter REGEX ...] [--modes bf16]

For every case and dtype mode of a preset (benchmarks/harness/cases.py), forward and forward+backward:
auto's first call (it measures the competing backends on GPU: wall time of that one call, after clearing
what auto had measured, with the cache in a fresh folder), then auto's steady state against each Panther
backend forced, timed interleaved by the harness's clock (harness/timing.py, as run.py does), and auto's
time relative to the fastest backend's. Also the quality of auto's pick alone: the forced time of the backend
auto chose over the fastest forced time (``pick``), which the noise between two timings of one backend does
not enter; and what dispatch adds to it: auto over its pick forced, timed in pairs back to back
(``paired``, harness Clock.ratio), whose product with ``pick`` is auto's eager time over the fastest's
with the noise of separate medians taken out. On GPU each of them is also timed as CUDA-graph replays
(``graph``): the device's time without the host's, where auto runs the pick it makes for captured calls
(the fastest by device time). Auto competes among the timed backends only (test plugins
installed beside them stay out). On CPU auto never measures (a single candidate there); the
script runs anyway. Writes <out>/<YYYY-MM-DD>_<device>_<commit>_autotune.json with the environment.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import panther  # noqa: E402
from panther.backends import BackendError, autotune, registry  # noqa: E402

from harness import cli  # noqa: E402
from harness.cases import PASSES, layer_leaves  # noqa: E402
from harness.modes import MODES, set_tf32  # noqa: E402
from harness.report import environment, result_stem, write_json  # noqa: E402
from harness.timing import Clock  # noqa: E402
from run import describe, make_call, pick_backends, release  # noqa: E402

LIMIT = 1.03  # the target: auto within 3 % of the fastest backend


@contextlib.contextmanager
def record_selection(names):
    """Append the name of every backend registry.select returns (dispatch looks select up at each call)."""
    real = registry.select

    def spy(*args, **kwargs):
        be = real(*args, **kwargs)
        names.append(be.name)
        return be

    registry.select = spy
    try:
        yield
    finally:
        registry.select = real


@contextlib.contextmanager
def only_backends(names):
    """Discovery limited to ``names``: auto competes among the backends this check times, not every plugin."""
    found = registry._discover()
    registry._registry = {n: i for n, i in found.items() if n in names}
    try:
        yield
    finally:
        registry._registry = found


def graph_ms(clock, calls, budget):
    """{name: median ms of CUDA-graph replays, or the error's description} (GPU only; {} on CPU). Every
    call is captured first, then the replays are timed interleaved (Clock.measure), so that the clock's
    drift falls on all of them alike."""
    out, graphs = {}, {}
    if not clock.cuda:
        return out
    for name, (fn, before) in calls.items():
        try:
            graphs[name] = clock.capture(fn, before)
        except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
            out[name] = describe(exc)
    for name, res in clock.measure({n: (g.replay, None) for n, g in graphs.items()}, budget).items():
        out[name] = describe(res) if isinstance(res, Exception) else res["median_ms"]
    del graphs
    release(clock)
    return out


def first_call(clock, call, before):
    """Wall milliseconds of one call from an idle device, and the backend auto ran it on."""
    names = []
    if before:
        before()
    clock.sync()
    with record_selection(names):
        t0 = time.perf_counter()
        call()
        clock.sync()
        ms = (time.perf_counter() - t0) * 1e3
    return ms, names[-1] if names else None


def check_case(case, mode, clock, preset, backends):
    dtype, tf32 = MODES[mode]
    if clock.cuda:
        set_tf32(tf32)
    inputs = case.build(clock.device, dtype)
    leaves = layer_leaves(inputs)  # the inputs that require grad, and the parameters of layers among them

    def reset_grads():
        for t in leaves:
            t.grad = None

    impls = {n: i for n, i in case.impls(backends).items() if i.kind == "backend"}
    args = [inputs[a] for a in case.sketch_args]
    auto_fn = case.backend_fn(None)  # backend=None: the selection in force, set to auto in main()
    records = []
    for pass_ in PASSES:
        before = reset_grads if pass_ != "fwd" else None
        rec = {"op": case.op, "label": case.label, "params": case.params, "mode": mode,
               "dtype": str(dtype).replace("torch.", ""), "tf32": tf32, "pass": pass_, "backends_ms": {}}
        records.append(rec)
        calls = {name: make_call(impl.fn, args, pass_, inputs["g"]) for name, impl in impls.items()}
        auto_call = make_call(auto_fn, args, pass_, inputs["g"])
        known = set(autotune._table)
        try:
            rec["auto_first_call_ms"], rec["auto_backend"] = first_call(clock, auto_call, before)
        except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
            rec["error"] = describe(exc)
            release(clock)
            continue
        rec["measurements"] = [
            {"key": key, "winner": e.winner, "fixed": e.fixed, "times_ms": e.times_ms, "errors": e.errors,
             "gpu_winner": e.gpu_winner, "gpu_ms": e.gpu_ms}
            for (dev, key), e in autotune._table.items() if (dev, key) not in known
        ]
        todo = {name: (fn, before) for name, fn in calls.items()}
        todo["auto"] = (auto_call, before)
        got = clock.measure(todo, preset.budget)
        for name, res in got.items():
            if isinstance(res, BackendError):
                rec.setdefault("skipped", {})[name] = describe(res)
            elif isinstance(res, Exception):
                rec.setdefault("errors", {})[name] = describe(res)
            elif name == "auto":
                rec["auto_ms"] = res["median_ms"]
                rec["auto"] = res
            else:
                rec["backends_ms"][name] = res["median_ms"]
                rec.setdefault("backends", {})[name] = res
        if rec.get("auto_ms") and rec["backends_ms"]:
            fastest = min(rec["backends_ms"], key=rec["backends_ms"].get)
            rec["fastest"] = fastest
            rec["auto_over_fastest"] = rec["auto_ms"] / rec["backends_ms"][fastest]
            rec["first_call_over_fastest"] = rec["auto_first_call_ms"] / rec["backends_ms"][fastest]
            picked = rec["backends_ms"].get(rec["auto_backend"])
            if picked is not None:  # the pick judged by the forced timings alone, and what dispatch adds
                rec["pick_over_fastest"] = picked / rec["backends_ms"][fastest]
                rec["auto_over_pick"] = rec["auto_ms"] / picked
                try:
                    paired = clock.ratio((auto_call, before), todo[rec["auto_backend"]], preset.budget)
                except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
                    rec.setdefault("errors", {})["paired"] = describe(exc)
                else:
                    rec["auto_over_pick_paired"] = paired
                    rec["auto_paired_over_fastest"] = rec["pick_over_fastest"] * paired["median"]
        # captured: only the calls that ran eagerly (an error raised inside a capture can leave the device's
        # capture state, and the random number generator's, broken for the rest of the process)
        ran = set(rec["backends_ms"]) | ({"auto"} if "auto_ms" in rec else set())
        graphs = graph_ms(clock, {n: c for n, c in todo.items() if n in ran}, preset.budget)
        if graphs:
            rec["graph_ms"] = graphs
            timed = {n: t for n, t in graphs.items() if n != "auto" and isinstance(t, float)}
            if timed and isinstance(graphs.get("auto"), float):
                rec["graph_fastest"] = min(timed, key=timed.get)
                rec["auto_over_fastest_graph"] = graphs["auto"] / timed[rec["graph_fastest"]]
        release(clock)
    del inputs, leaves
    release(clock)
    return records


def row(r) -> str:
    if "error" in r:
        return f"{r['op']:<16} {r['label']:<44} {r['mode']:<5} {r['pass']:<7} error: {r['error']}"
    backends = " ".join(f"{n} {t:.4f}" for n, t in sorted(r["backends_ms"].items()))
    ratio = r.get("auto_over_fastest")
    flag = "" if ratio is None or ratio <= LIMIT else "  OVER"
    pick = f"  pick {r['pick_over_fastest']:.3f}" if "pick_over_fastest" in r else ""
    if "auto_paired_over_fastest" in r:
        p = r["auto_paired_over_fastest"]
        pick += (f"  paired {r['auto_over_pick_paired']['median']:.3f} -> {p:.3f}"
                 f"{'  OVER' if p > LIMIT else ''}")
    graph = ""
    if "auto_over_fastest_graph" in r:
        g = r["auto_over_fastest_graph"]
        graph = f"  graph: auto {r['graph_ms']['auto']:.4f} ms, ratio {g:.3f}{'  OVER' if g > LIMIT else ''}"
    return (f"{r['op']:<16} {r['label']:<44} {r['mode']:<5} {r['pass']:<7} auto->{r['auto_backend'] or '?':<7} "
            f"first {r['auto_first_call_ms']:9.2f} ms  auto {r.get('auto_ms', float('nan')):.4f} ms  "
            f"{backends}  ratio {'-' if ratio is None else f'{ratio:.3f}'}{flag}{pick}{graph}")


def main(argv=None) -> int:
    parser = cli.parser(__doc__, "force")
    args = parser.parse_args(argv)
    started, preset, device, cases, modes = cli.start(parser, args)

    # auto must be what runs, measuring on, starting from nothing: a fresh cache folder, memory cleared
    cache = tempfile.mkdtemp(prefix="panther-autotune-check-")
    os.environ[autotune.CACHE_ENV_VAR] = cache
    panther.set_backend("auto")
    autotune.set_autotune(True)
    autotune.clear_dispatch_cache(disk=False)

    env = environment(device)
    backends, not_timed = pick_backends(device, [b for b in args.backends.split(",") if b])
    stem = args.out / f"{result_stem(env, device)}_autotune"
    n = 1
    while stem.with_suffix(".json").exists():
        n += 1
        stem = args.out / f"{result_stem(env, device)}_autotune_{n}"
    json_path = stem.with_suffix(".json")
    print(f"panther {panther.__version__} | torch {env['torch']} | triton {env['triton']} | {env['device']} | "
          f"commit {env['commit']}{' (dirty)' if env['dirty'] else ''} | preset {args.preset}")
    print(f"backends forced: {', '.join(backends)}; not timed here: {not_timed or 'none'}; cache {cache}")
    clock = Clock(device)
    doc = {
        "schema": 1, "kind": "autotune_check", "preset": args.preset, "argv": sys.argv, "seed": args.seed,
        "started_utc": datetime.datetime.fromtimestamp(started, datetime.timezone.utc).isoformat(),
        "environment": env, "backends_forced": backends, "backends_not_timed": not_timed,
        "settings": {"modes": modes, "filter": args.filter, "limit": LIMIT,
                     "measurer": {k: getattr(autotune.measurer, k)
                                  for k in ("warmup_calls", "warmup_s", "min_reps", "max_reps", "budget_s",
                                            "spin_tries")},
                     "timing": "first call: wall time of one call from an idle device (auto measures there); "
                               "steady state: the harness's Clock.measure, auto and each backend interleaved; "
                               "paired: Clock.ratio of auto over its pick forced"},
        "results": [], "skipped_cases": [],
    }
    deadline = args.max_minutes if args.max_minutes is not None else preset.deadline_min
    for case in cases:
        for mode in modes:
            if deadline is not None and time.time() - started > 60 * deadline:
                doc["skipped_cases"].append({"case": case.label, "op": case.op, "mode": mode, "reason": "deadline"})
                continue
            with only_backends(backends):
                records = check_case(case, mode, clock, preset, backends)
            for r in records:
                print(row(r), flush=True)
                doc["results"].append(r)
            write_json(json_path, doc)
    ratios = [r["auto_over_fastest"] for r in doc["results"] if "auto_over_fastest" in r]
    graph_ratios = [r["auto_over_fastest_graph"] for r in doc["results"] if "auto_over_fastest_graph" in r]
    paired_ratios = [r["auto_paired_over_fastest"] for r in doc["results"] if "auto_paired_over_fastest" in r]
    doc["summary"] = {
        "cases": len(doc["results"]), "compared": len(ratios), "worst_ratio": max(ratios, default=None),
        "over_limit": [f"{r['op']} {r['label']} {r['mode']} {r['pass']}" for r in doc["results"]
                       if r.get("auto_over_fastest", 0) > LIMIT],
        # a pick outside the timed backends cannot be judged: it counts against auto
        "pick_over_limit": [f"{r['op']} {r['label']} {r['mode']} {r['pass']}" for r in doc["results"]
                            if "auto_over_fastest" in r and r.get("pick_over_fastest", float("inf")) > LIMIT],
        "paired_compared": len(paired_ratios), "paired_worst_ratio": max(paired_ratios, default=None),
        # auto's eager time judged by its pick and the paired dispatch overhead; an unjudged pick counts against
        "paired_over_limit": [f"{r['op']} {r['label']} {r['mode']} {r['pass']}" for r in doc["results"]
                              if "auto_over_fastest" in r and r.get("auto_paired_over_fastest", float("inf")) > LIMIT],
        "graph_compared": len(graph_ratios), "graph_worst_ratio": max(graph_ratios, default=None),
        "graph_over_limit": [f"{r['op']} {r['label']} {r['mode']} {r['pass']}" for r in doc["results"]
                             if r.get("auto_over_fastest_graph", 0) > LIMIT],
        "errors": [f"{r['op']} {r['label']} {r['mode']} {r['pass']}" for r in doc["results"] if "error" in r],
        "dispatch_cache": autotune.cache_report(),
    }
    doc["duration_s"] = time.time() - started
    write_json(json_path, doc)
    shutil.rmtree(cache, ignore_errors=True)
    s = doc["summary"]
    print(f"\nauto within {LIMIT - 1:.0%} of the fastest backend at {s['compared'] - len(s['over_limit'])} of "
          f"{s['compared']} comparisons (worst ratio {s['worst_ratio']}); over: {s['over_limit'] or 'none'}")
    print(f"auto's pick, judged by the forced backends' times alone, within {LIMIT - 1:.0%} of the fastest at "
          f"{s['compared'] - len(s['pick_over_limit'])} of {s['compared']}; over: {s['pick_over_limit'] or 'none'}")
    print(f"auto's eager time by its pick and the paired dispatch overhead, within {LIMIT - 1:.0%} of the fastest "
          f"at {s['compared'] - len(s['paired_over_limit'])} of {s['compared']} (worst ratio {s['paired_worst_ratio']}); "
          f"over: {s['paired_over_limit'] or 'none'}")
    if s["graph_compared"]:
        print(f"in CUDA-graph time, auto within {LIMIT - 1:.0%} of the fastest backend at "
              f"{s['graph_compared'] - len(s['graph_over_limit'])} of {s['graph_compared']} (worst ratio "
              f"{s['graph_worst_ratio']}); over: {s['graph_over_limit'] or 'none'}")
    print(f"wrote {json_path}; took {doc['duration_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
