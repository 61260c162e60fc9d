#!/usr/bin/env python
"""One data-parallel training step of a sketched MLP and a dense MLP of the same shapes, on 1 and N ranks.

    python benchmarks/distributed_step.py --preset gpu [--nproc N] [--fsdp] [--out DIR]
    python benchmarks/distributed_step.py --preset cpu-quick --out /tmp/dist   # gloo, 2 processes: a smoke check

Each rank holds ``batch`` rows (weak scaling: the global batch grows with the ranks). A step is forward,
backward (with DDP's gradient all-reduce, or FSDP2's all-gathers and reduce-scatter) and an SGD update. For
each model, wrapper and world size the JSON records the step time (median over ranks' medians and the
slowest rank's), the scaling efficiency ``t(1 rank) / t(N ranks)`` (1.0 is perfect under weak scaling),
and the bytes handed to the collectives per step: the parameters' bytes, which the sketched model cuts.
The fixed sketches are buffers: never all-reduced (DDP is built with ``broadcast_buffers=False``, as they
never change) and never sharded by FSDP2. Ranks run NCCL, one GPU each, or gloo on the CPU.

Writes ``<out>/<YYYY-MM-DD>_<device>_<commit>_distributed_step.json`` with the environment block of
``benchmarks/run.py``. CPU figures only check that the script works; quote GPU runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import torch.nn as nn  # noqa: E402

from harness.report import environment, result_stem, write_json  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Preset:
    features: int  # every layer is features -> features
    depth: int  # number of linear layers
    batch: int  # rows per rank
    num_terms: int
    low_rank: int
    warmup: int  # untimed steps (compilation, autotuning, NCCL setup)
    reps: int  # timed steps, the same number on every rank
    timeout_s: float  # one world size's run, spawn to exit


PRESETS = {
    "gpu": Preset(features=8192, depth=4, batch=4096, num_terms=1, low_rank=64, warmup=5, reps=30, timeout_s=400),
    "cpu-quick": Preset(features=256, depth=2, batch=64, num_terms=1, low_rank=16, warmup=2, reps=5, timeout_s=120),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build(kind: str, p: Preset, device, dtype) -> nn.Module:
    """An MLP of ``depth`` square layers with ReLUs between; ``kind`` is "dense" or "sketched"."""
    import panther as pr

    layers = []
    for i in range(p.depth):
        if kind == "dense":
            layers.append(nn.Linear(p.features, p.features, device=device, dtype=dtype))
        else:
            layers.append(pr.nn.SKLinear(p.features, p.features, p.num_terms, p.low_rank, device=device, dtype=dtype))
        if i + 1 < p.depth:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def collective_bytes(wrapper: str, param_bytes: int, world_size: int) -> dict:
    """Tensor bytes handed to the collectives in one step (payload, not what the wire carries).

    DDP all-reduces every gradient once. FSDP2 (parameters resharded after forward) all-gathers the
    parameters for the forward and again for the backward, and reduce-scatters the gradients. On one rank
    neither communicates.
    """
    if world_size == 1:
        return {"all_reduce": 0, "all_gather": 0, "reduce_scatter": 0, "total": 0}
    if wrapper == "ddp":
        parts = {"all_reduce": param_bytes, "all_gather": 0, "reduce_scatter": 0}
    else:
        parts = {"all_reduce": 0, "all_gather": 2 * param_bytes, "reduce_scatter": param_bytes}
    return dict(parts, total=sum(parts.values()))


def wrap(model: nn.Module, wrapper: str, device: torch.device) -> nn.Module:
    if wrapper == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in model:
        if any(True for _ in layer.parameters()):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def time_steps(step, p: Preset, device: torch.device) -> list:
    """Milliseconds of each timed step; every rank runs the same steps, starting them together."""
    cuda = device.type == "cuda"
    for _ in range(p.warmup):
        step()
    times = []
    for _ in range(p.reps):
        if cuda:
            torch.cuda.synchronize(device)
        dist.barrier()
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def rank_main(rank: int, world_size: int, backend: str, init_method: str, preset: str, dtype: str,
              wrappers: list, out: str) -> None:
    p = PRESETS[preset]
    cuda = backend == "nccl"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means IEEE float32, as in benchmarks/run.py
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=p.timeout_s),
                            **({"device_id": device} if cuda else {}))
    try:
        records = []
        gen = torch.Generator().manual_seed(rank)
        x = torch.randn(p.batch, p.features, generator=gen).to(device, DTYPES[dtype])
        for kind in ("dense", "sketched"):
            for wrapper in wrappers:
                torch.manual_seed(0)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # small cpu-quick shapes save no memory; not what is timed
                    model = build(kind, p, device, DTYPES[dtype])
                params = sum(t.numel() for t in model.parameters())
                param_bytes = sum(t.numel() * t.element_size() for t in model.parameters())
                buffer_bytes = sum(t.numel() * t.element_size() for t in model.buffers())
                net = wrap(model, wrapper, device)
                opt = torch.optim.SGD(model.parameters(), lr=1e-6)

                def step():
                    opt.zero_grad(set_to_none=True)
                    net(x).square().mean().backward()
                    opt.step()

                times = time_steps(step, p, device)
                mine = statistics.median(times)
                every = [None] * world_size
                dist.all_gather_object(every, mine)
                records.append({
                    "model": kind, "wrapper": wrapper, "world_size": world_size,
                    "step_ms": statistics.median(every), "slowest_rank_ms": max(every), "rank_median_ms": every,
                    "rank0_q20_ms": statistics.quantiles(times, n=5)[0] if len(times) > 1 else mine,
                    "rank0_q80_ms": statistics.quantiles(times, n=5)[3] if len(times) > 1 else mine,
                    "params": params, "param_bytes": param_bytes, "buffer_bytes": buffer_bytes,
                    "collective_bytes": collective_bytes(wrapper, param_bytes, world_size),
                })
                del net, model, opt
                if cuda:
                    torch.cuda.empty_cache()
        if rank == 0:
            Path(out).write_text(json.dumps(records))
    finally:
        dist.destroy_process_group()


def launch(world_size: int, backend: str, preset: str, dtype: str, wrappers: list, timeout_s: float) -> list:
    """Spawn ``world_size`` ranks; rank 0's records."""
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp, "records.json"))
        ctx = mp.start_processes(rank_main, nprocs=world_size, join=False, start_method="spawn",
                                 args=(world_size, backend, f"file://{tmp}/store", preset, dtype, wrappers, out))
        deadline = time.monotonic() + timeout_s
        try:
            while not ctx.join(timeout=1):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{world_size} ranks did not finish within {timeout_s:.0f} s")
        finally:
            for proc in ctx.processes:
                if proc.is_alive():
                    proc.kill()
                    proc.join()
        return json.loads(Path(out).read_text())


def summarise(records: list) -> list:
    """Per model and wrapper: scaling efficiency, and the sketched model's collective bytes against dense."""
    out = []
    key = lambda r: (r["model"], r["wrapper"])  # noqa: E731
    one = {key(r): r for r in records if r["world_size"] == 1}
    for r in records:
        if r["world_size"] == 1 or key(r) not in one:
            continue
        dense = next((d for d in records if d["model"] == "dense" and d["wrapper"] == r["wrapper"]
                      and d["world_size"] == r["world_size"]), None)
        out.append({
            "model": r["model"], "wrapper": r["wrapper"], "world_size": r["world_size"],
            "step_ms_1": one[key(r)]["step_ms"], "step_ms_n": r["step_ms"],
            "scaling_efficiency": one[key(r)]["step_ms"] / r["step_ms"],
            "collective_bytes": r["collective_bytes"]["total"],
            "collective_bytes_vs_dense": dense and r["collective_bytes"]["total"] / dense["collective_bytes"]["total"],
            "step_speedup_vs_dense": dense and dense["step_ms"] / r["step_ms"],
        })
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS))
    parser.add_argument("--nproc", type=int, default=None,
                        help="ranks of the multi-rank run (default: every GPU; 2 on the CPU)")
    parser.add_argument("--backend", choices=("nccl", "gloo"), default=None,
                        help="default: nccl where CUDA is visible, else gloo")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="parameters and activations")
    parser.add_argument("--fsdp", action="store_true", help="also time FSDP2 (fully_shard per layer)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results",
                        help="folder for the JSON (default: benchmarks/results)")
    args = parser.parse_args(argv)

    backend = args.backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl" and not torch.cuda.is_available():
        parser.error("--backend nccl needs CUDA devices and torch sees none")
    gpus = torch.cuda.device_count() if backend == "nccl" else 0
    nproc = args.nproc or (gpus if backend == "nccl" else 2)
    if nproc < 1 or (backend == "nccl" and nproc > gpus):
        parser.error(f"--nproc must be between 1 and the number of GPUs ({gpus}) with nccl, got {nproc}")
    p = PRESETS[args.preset]
    wrappers = ["ddp"] + (["fsdp2"] if args.fsdp else [])
    device = torch.device("cuda", 0) if backend == "nccl" else torch.device("cpu")
    started = time.time()
    env = environment(device)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"{result_stem(env, device)}_distributed_step"
    path, n = args.out / f"{stem}.json", 1
    while path.exists():  # never overwrite an earlier run's file
        n += 1
        path = args.out / f"{stem}_{n}.json"
    doc = {
        "schema": 1, "benchmark": "distributed_step", "argv": sys.argv,
        "started_utc": datetime.datetime.fromtimestamp(started, datetime.timezone.utc).isoformat(),
        "environment": env, "backend": backend, "world_sizes": sorted({1, nproc}), "dtype": args.dtype,
        "wrappers": wrappers, "settings": dataclasses.asdict(p),
        "note": ("step = forward, backward (with the gradient collectives) and SGD update on `batch` rows per rank "
                 "(weak scaling); step_ms is the median over ranks of each rank's median step, after a barrier "
                 "and with the device synchronised; scaling_efficiency = step_ms(1 rank) / step_ms(N ranks); "
                 "collective_bytes are the tensor bytes passed to all-reduce / all-gather / reduce-scatter per "
                 "step, not wire traffic; buffers (fixed sketches) are not communicated"),
        "results": [], "summary": [],
    }
    print(f"{env['device']} x{nproc} | {backend} | torch {env['torch']} | commit {env['commit']} | "
          f"preset {args.preset}: {p.depth} x {p.features}^2, batch {p.batch}/rank, L={p.num_terms} k={p.low_rank}")
    for world_size in sorted({1, nproc}):
        doc["results"].extend(launch(world_size, backend, args.preset, args.dtype, wrappers, p.timeout_s))
        write_json(path, doc)
    doc["summary"] = summarise(doc["results"])
    doc["duration_s"] = time.time() - started
    write_json(path, doc)

    print(f"\n{'model':<9} {'wrapper':<6} {'ranks':>5} {'step ms':>9} {'params':>11} {'collective MB':>14}")
    for r in doc["results"]:
        print(f"{r['model']:<9} {r['wrapper']:<6} {r['world_size']:>5} {r['step_ms']:>9.2f} {r['params']:>11,} "
              f"{r['collective_bytes']['total'] / 1e6:>14.2f}")
    for s in doc["summary"]:
        ratio = s["collective_bytes_vs_dense"]
        print(f"{s['model']} {s['wrapper']} on {s['world_size']} ranks: scaling efficiency "
              f"{s['scaling_efficiency']:.2f}; collective bytes {'' if ratio is None else f'{ratio:.3f}x dense'}")
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
