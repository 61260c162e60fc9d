"""DDP and FSDP2 training of sketched layers equals one process training on the concatenated batch.

Each case spawns the ranks of ``dist_train.py`` (one per GPU over NCCL, or two CPU processes over gloo),
rendezvous through a FileStore in ``tmp_path``, and reads back every rank's worst relative errors of the
gradients (each step), parameter updates and fixed sketches against an unwrapped copy trained on the whole batch.
The gloo cases run in CI; ``multigpu`` cases need two GPUs, ``gpu`` ones (world size 1 over NCCL) one.
"""

import json
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # ranks import dist_train by name (the parent's sys.path travels along)
import dist_train  # noqa: E402

TIMEOUT_S = 240  # a rank that hangs in a collective fails the case instead of holding up the run
# CPU ranks are forked from one server process that imports torch and panther once for all the cases;
# GPU ranks start fresh (spawn), so that nothing of CUDA was initialised before them.
START_METHOD = {"gloo": "forkserver", "nccl": "spawn"}
mp.get_context("forkserver").set_forkserver_preload(["dist_train"])


def _modes():
    return list(dist_train.MODES)


def launch(mode: str, world_size: int, backend: str, tmp_path: Path) -> list:
    """Run ``mode`` on ``world_size`` spawned ranks; their reports, rank by rank."""
    out = tmp_path / "reports"
    out.mkdir()
    init = f"file://{tmp_path / 'store'}"
    ctx = mp.start_processes(dist_train.run, args=(world_size, mode, backend, init, str(out)), nprocs=world_size,
                             join=False, start_method=START_METHOD[backend])
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=1):  # raises with the rank's traceback when a rank fails
            if time.monotonic() > deadline:
                pytest.fail(f"{mode} on {world_size} ranks did not finish within {TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join()
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world_size)]


def check(reports: list, mode: str, world_size: int, backend: str) -> None:
    assert [r["rank"] for r in reports] == list(range(world_size))
    for r in reports:
        assert (r["mode"], r["world_size"], r["backend"]) == (mode, world_size, backend)
        names = set(r["worst"])
        # every parameter and buffer of the three layers was compared
        for expected in ("grad conv.S1s", "grad attn.in_proj_weight", "grad attn.out_proj.weight", "grad head.S2s",
                         "update head.S1s", "buffer conv.U1s", "buffer attn.omega", "buffer head.U2s"):
            assert expected in names, sorted(names)
        assert not dist_train.failures(r), (r["rank"], r["tolerance"], dist_train.failures(r))


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
@pytest.mark.parametrize("mode", _modes())
def test_gloo_two_processes_match_one(mode, tmp_path):
    check(launch(mode, 2, "gloo", tmp_path), mode, 2, "gloo")


@pytest.mark.multigpu
@pytest.mark.parametrize("mode", _modes())
def test_nccl_every_gpu_matches_one(mode, tmp_path):
    n = torch.cuda.device_count()
    check(launch(mode, n, "nccl", tmp_path), mode, n, "nccl")


@pytest.mark.gpu
@pytest.mark.parametrize("mode", _modes())
def test_nccl_one_gpu_matches_unwrapped(mode, tmp_path):
    check(launch(mode, 1, "nccl", tmp_path), mode, 1, "nccl")
