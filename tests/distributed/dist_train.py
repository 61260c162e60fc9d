"""Data-parallel training of sketched layers, checked against one process on the whole batch.

Every rank builds the same small model of :class:`~panther.nn.SKConv2d`,
:class:`~panther.nn.RandMultiHeadAttention` and :class:`~panther.nn.SKLinear` (same global seed), wraps it
in DistributedDataParallel or FSDP2 (``fully_shard``), and trains it for a few SGD steps on its slice of
each global batch. Next to it, each rank trains an unwrapped copy on the whole batch. After every backward
the gradients (FSDP2: the full tensors gathered from the shards) are compared with the copy's, and after the
last step the parameters' updates (final minus initial values) and the fixed sketches (buffers), as
norm-wise relative errors.

Used by ``test_multi_gpu.py`` through :func:`spawn`; on a GPU host it also runs by itself::

    torchrun --nproc-per-node 2 tests/distributed/dist_train.py --mode fsdp2-bf16

Modes: ``ddp``, ``fsdp2``, ``fsdp2-bf16`` (``MixedPrecisionPolicy(param_dtype=torch.bfloat16)``, gradients
reduced in float32), ``ddp-compile`` and ``fsdp2-compile`` (``torch.compile`` of the wrapped model: Inductor
on CUDA, ``aot_eager`` on the CPU, where Inductor's C++ compilation would take minutes of CI time).
The backend is NCCL on CUDA (one GPU per rank) and gloo on the CPU.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

import panther as pr

MODES = ("ddp", "fsdp2", "fsdp2-bf16", "ddp-compile", "fsdp2-compile")
STEPS = 3
PER_RANK_BATCH = 2
LR = 0.05
# Norm-wise relative error allowed against the unwrapped float32 model. float32: the same sums in another
# order. bf16 computes with 8 significant bits: a few percent in the first layer's gradient, where the
# rounding of every later layer adds up. A wrong reduction (a sum for a mean, one rank's gradient) is off
# by 50% or more under either.
TOLERANCE = {"fp32": 1e-5, "bf16": 1e-1}


class SketchedNet(nn.Module):
    """Conv -> attention over the pixels -> mean -> linear: every sketched layer, tiny."""

    def __init__(self, device=None) -> None:
        super().__init__()
        self.conv = pr.nn.SKConv2d(3, 16, 3, padding=1, num_terms=1, low_rank=4, device=device)
        self.attn = pr.nn.RandMultiHeadAttention(16, 2, sketch_dim=8, batch_first=True, device=device)
        self.head = pr.nn.SKLinear(16, 8, num_terms=1, low_rank=2, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv(x)).flatten(2).transpose(1, 2)  # (N, H*W, 16): one token per pixel
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.head(h.mean(1))


def tolerance(mode: str) -> float:
    return TOLERANCE["bf16" if mode.endswith("bf16") else "fp32"]


def wrap(model: nn.Module, mode: str, device: torch.device) -> nn.Module:
    """The model as a user parallelises it for ``mode``."""
    if mode.startswith("ddp"):
        wrapped = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        policy = MixedPrecisionPolicy()
        if mode.endswith("bf16"):
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for layer in (model.conv, model.attn, model.head):
            fully_shard(layer, mesh=mesh, mp_policy=policy)
        wrapped = fully_shard(model, mesh=mesh, mp_policy=policy)
    if mode.endswith("compile"):
        wrapped = torch.compile(wrapped, backend="inductor" if device.type == "cuda" else "aot_eager")
    return wrapped


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: FSDP2 holds parameters and gradients as sharded DTensors."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if got.shape != want.shape:
        return float("inf")
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def train_and_compare(mode: str, rank: int, world_size: int, device: torch.device) -> Dict:
    """Train the wrapped model and the unwrapped copy side by side; the worst errors, per quantity."""
    torch.manual_seed(0)  # the same model on every rank
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tiny layers: no memory savings, which is not what this checks
        model = SketchedNet(device=device)
    reference = copy.deepcopy(model)
    params_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers_before = {n: b.clone() for n, b in model.named_buffers()}
    net = wrap(model, mode, device)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=LR, momentum=0.9)

    gen = torch.Generator().manual_seed(1)
    batch = PER_RANK_BATCH * world_size
    xs = torch.randn(STEPS, batch, 3, 4, 4, generator=gen).to(device)
    ys = torch.randn(STEPS, batch, 8, generator=gen).to(device)
    mine = slice(rank * PER_RANK_BATCH, (rank + 1) * PER_RANK_BATCH)

    worst: Dict[str, float] = {}

    def note(kind: str, name: str, err: float) -> None:
        key = f"{kind} {name}"
        worst[key] = max(worst.get(key, 0.0), err)

    ref_params = dict(reference.named_parameters())
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        ref_opt.zero_grad(set_to_none=True)
        F.mse_loss(net(xs[step, mine]).float(), ys[step, mine]).backward()
        F.mse_loss(reference(xs[step]), ys[step]).backward()
        for name, p in model.named_parameters():
            if p.grad is None:
                note("grad", name, float("inf"))
            else:
                note("grad", name, rel_err(full(p.grad), ref_params[name].grad))
        opt.step()
        ref_opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    for name, p in model.named_parameters():
        # the change made by training, which the initial values would otherwise drown
        start = params_before[name]
        note("update", name, rel_err(full(p) - start, ref_params[name] - start))
    for name, b in model.named_buffers():
        # The fixed sketches are buffers: never sharded (plain tensors under FSDP2), never changed by training.
        note("buffer", name, float("inf") if hasattr(b, "full_tensor") else rel_err(b, buffers_before[name]))
    return worst


def run(rank: int, world_size: int, mode: str, backend: str, init_method: str, out_dir: Optional[str]) -> Dict:
    """One rank: join the process group, train, compare; writes ``rank<r>.json`` to ``out_dir`` if given.

    ``backend`` is ``"nccl"`` (rank ``r`` on GPU ``r``) or ``"gloo"`` (the CPU).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend must be 'nccl' or 'gloo', got {backend!r}")
    cuda = backend == "nccl"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # float32 is float32
    torch.set_num_threads(1)  # ranks share the host's cores; one thread each keeps them from thrashing
    dist.init_process_group(
        backend, init_method=init_method, rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=120), **({"device_id": device} if cuda else {}),
    )
    try:
        t0 = time.perf_counter()
        worst = train_and_compare(mode, rank, world_size, device)
        report = {"rank": rank, "world_size": world_size, "mode": mode, "backend": dist.get_backend(),
                  "device": str(device), "tolerance": tolerance(mode), "seconds": time.perf_counter() - t0,
                  "worst": worst}
        if out_dir is not None:
            Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report, indent=1))
        return report
    finally:
        dist.destroy_process_group()


def failures(report: Dict) -> Dict[str, float]:
    """The compared quantities whose error is over the mode's tolerance."""
    return {k: v for k, v in report["worst"].items() if not v <= report["tolerance"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=MODES, default="ddp")
    parser.add_argument("--backend", choices=("nccl", "gloo"), default="nccl" if torch.cuda.is_available() else "gloo")
    args = parser.parse_args(argv)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    report = run(rank, world_size, args.mode, args.backend, "env://", None)
    bad = failures(report)
    print(f"rank {rank}/{world_size} {args.mode} on {report['device']}: "
          + ("OK" if not bad else f"over tolerance {report['tolerance']}: {bad}"), flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
