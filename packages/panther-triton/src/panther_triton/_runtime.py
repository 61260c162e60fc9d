"""What is Triton-specific about running the kernels: the interpreter switch, autotune candidates pruned
to the device's shared memory, the autotuner's timing budget and key, and integer arguments the kernels
are not specialised on. Generic helpers (device facts, caches, sizes) are in :mod:`panther.backends.toolkit`.

Nothing here imports triton at module import: the backend module imports this file, and importing a
backend must stay cheap. Kernel modules make their :class:`Candidates` when they are first imported.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Tuple

import torch

from panther.backends.toolkit import env_flag, next_power_of_2, shared_memory_per_block, size_hint


def interpreting() -> bool:
    """True when ``TRITON_INTERPRET`` selects Triton's CPU interpreter (parsed as Triton parses it)."""
    return env_flag("TRITON_INTERPRET")


# Integer arguments Triton must not specialise the kernels on: the row count and its autotune bucket
# bound masks and never offset a pointer, so a new batch size compiles nothing new. Strides, feature
# sizes and Lk stay specialised (their divisibility lets loads and stores vectorise); the rank k of one
# term is a constexpr, so the column maps c // k, c % k become shifts and masks.
SIZES_NOT_SPECIALISED = ["T", "T_BUCKET"]


WIDEST_CHUNK = 128  # the widest column chunk BLK of the kernels (plan.BLK_MAX)

# Margin for float32 operands: the compiler's shared memory for float32 (TF32) candidates on sm_90 ran up to
# 2.7x the 16-bit figure of the same candidate, not 2x (tools/compile_check.py)
FLOAT32_MARGIN = 2

Candidate = Tuple[Dict[str, int], int, int]  # (meta-parameters, num_warps, num_stages)
SharedElements = Callable[[Dict[str, int], int, int], int]  # (meta, BLK, num_stages) -> elements in shared memory


class Candidates:
    """A kernel's autotune candidates, pruned for each launch to those that fit in shared memory.

    Args:
        gpu: the candidates, ``(meta, num_warps, num_stages)``.
        shared: ``shared(meta, BLK, num_stages)`` gives the operand elements the kernel holds in shared
            memory: the tiles one pipeline stage of its main loop loads, times the stages, plus what is
            staged once; times the operand's bytes it is the candidate's estimate (:meth:`shared_memory`).
        interpreter: the one config used under ``TRITON_INTERPRET=1`` (the autotuner would otherwise
            benchmark every config on the CPU).

    ``configs`` is the ``triton.Config`` list for ``triton.autotune`` and ``prune_configs_by`` its
    pruning hook (:meth:`prune`).
    """

    def __init__(self, gpu: Iterable[Candidate], shared: SharedElements, interpreter: Dict[str, int]):
        import triton

        self.shared = shared
        self.prune_configs_by = {"early_config_prune": self.prune}
        if interpreting():
            self.configs: List = [triton.Config(dict(interpreter), num_warps=4, num_stages=1)]
        else:
            self.configs = [triton.Config(dict(meta), num_warps=w, num_stages=s) for meta, w, s in gpu]

    def shared_memory(self, config, blk: int, element_size: int) -> int:
        """Estimated bytes of shared memory of ``config`` at column chunk ``blk`` for operands of this size."""
        return self.shared(config.kwargs, blk, config.num_stages) * element_size

    def prune(self, configs, named_args, **kwargs) -> list:
        """``early_config_prune``: the candidates whose estimated shared memory fits the device's
        ``shared_memory_per_block_optin`` at this launch's column chunk ``BLK`` and operand dtype (the
        first tensor argument's; float32 must fit in 1/FLOAT32_MARGIN of it), or the smallest where none
        fits. An estimate below the compiler's figure only costs the compile of a config that then does
        not fit (the autotuner skips it); one above it prunes a config that would have run. float32 without TF32 (``PREC ==
        "ieee"``: products on the CUDA cores) keeps only the smallest, so a first call at a new shape
        compiles and times one config."""
        if len(configs) <= 1:
            return list(configs)
        tensor = next((v for v in named_args.values() if isinstance(v, torch.Tensor)), None)
        blk = kwargs.get("BLK", named_args.get("BLK", WIDEST_CHUNK))
        es = tensor.element_size() if tensor is not None else 4
        size = {id(c): self.shared_memory(c, blk, es) for c in configs}
        smallest = min(configs, key=lambda c: (size[id(c)], c.num_warps))
        if kwargs.get("PREC", named_args.get("PREC")) == "ieee":
            return [smallest]
        limit = _device_limit(tensor)
        if es == 4:  # float32 on TF32 tensor cores: the compiler stages operands again for the conversion
            limit //= FLOAT32_MARGIN
        kept = [c for c in configs if size[id(c)] <= limit]
        return kept or [smallest]


def _device_limit(tensor) -> int:
    if tensor is None or not tensor.is_cuda:
        return 1 << 62
    return shared_memory_per_block(tensor.get_device())


def tuning_bench(fn, quantiles=None):
    """Timing of one autotune candidate: triton.testing.do_bench with a short budget (10 ms warm-up,
    40 ms of runs): a first call per shape tunes every candidate, and the candidates differ by far more
    than the noise of 40 ms of runs."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=40, quantiles=quantiles)


def tune_bucket(n: int) -> int:
    """Autotune key for a row count: its power-of-two bucket (>= 16), so that a new batch size reuses
    the config tuned for its bucket instead of benchmarking again."""
    return max(16, min(next_power_of_2(size_hint(n)), 1 << 20))
