"""The command line that run.py and autotune_check.py share: a preset, its cases and dtype modes, where to write."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import List, NamedTuple

import torch

from harness.cases import PRESETS, Preset
from harness.cases import select as select_cases

RESULTS = Path(__file__).resolve().parent.parent / "results"


def parser(description: str, backends_verb: str) -> argparse.ArgumentParser:
    """The shared options; ``backends_verb`` says what the script does with ``--backends`` ("time", "force")."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", required=True, choices=sorted(PRESETS))
    p.add_argument("--out", type=Path, default=RESULTS,
                   help="folder for the JSON (and plots) (default: benchmarks/results)")
    p.add_argument("--filter", action="append", default=[],
                   help="keep cases where this regular expression matches 'op label tag', e.g. "
                        "'sketched_linear T=128' (repeatable: any may match)")
    p.add_argument("--modes", default="", help="comma-separated dtype modes to keep (fp32, tf32, bf16)")
    p.add_argument("--backends", default="",
                   help=f"comma-separated backends to {backends_verb} (default: Panther's own)")
    p.add_argument("--max-minutes", type=float, default=None, help="start no case after this (default: the preset's deadline, if it has one)")
    p.add_argument("--seed", type=int, default=0)
    return p


class Run(NamedTuple):
    started: float  # time.time() at the start
    preset: Preset
    device: torch.device
    cases: list
    modes: List[str]


def start(p: argparse.ArgumentParser, args: argparse.Namespace) -> Run:
    """Check the device, seed torch, make the output folder, select the cases."""
    started = time.time()
    preset = PRESETS[args.preset]
    device = torch.device(preset.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"preset {args.preset!r} needs a CUDA device and torch sees none")
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    cases, modes = select_cases(preset, args.filter, args.modes)
    return Run(started, preset, device, cases, modes)
