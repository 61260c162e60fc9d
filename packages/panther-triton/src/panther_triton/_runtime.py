"""Where the kernels run (a CUDA GPU or Triton's CPU interpreter) and the autotune configs for each.

Nothing here imports triton at module import: the backend module imports this file, and importing a
backend must stay cheap. Kernel modules make their :class:`Candidates` when they are first imported.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Dict, Iterable, List, Optional, Tuple

import torch

_TRUE = ("1", "true", "yes", "on", "y")


def interpreting() -> bool:
    """True when ``TRITON_INTERPRET`` selects Triton's CPU interpreter (parsed as Triton parses it)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE


_capabilities: Optional[Tuple[Tuple[int, int], ...]] = None


def cuda_capabilities() -> Tuple[Tuple[int, int], ...]:
    """Compute capability of every visible CUDA device (empty without CUDA); the first call inits CUDA.

    Cached in a module global, not functools.lru_cache: torch.compile traces the availability checks
    that call this, and it warns on (and looks through) lru_cache wrappers."""
    global _capabilities
    if _capabilities is None:
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        _capabilities = tuple(torch.cuda.get_device_capability(i) for i in range(n))
    return _capabilities


@functools.lru_cache(maxsize=None)
def multiprocessors(device_index: int) -> int:
    """Streaming multiprocessors of a CUDA device (what the launch planner fills)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# Integer arguments Triton must not specialise the kernels on. By default it compiles a variant per
# divisibility by 16 (and per value 1) of every integer argument; for these (the row count and the
# autotune bucket) that buys nothing: they bound masks and never offset a pointer, so a new batch size
# compiles nothing new. Strides, feature sizes and Lk (the offset of H's second half) stay specialised:
# their divisibility lets loads and stores vectorise. The rank k of one term is a constexpr: the column
# maps c // k, c % k of the (L, ., k) operands become shifts and masks, and the compiler sees that a
# term's k columns are contiguous (as a runtime value it made every weight load a scalar gather with an
# integer division: 3-6x slower kernels on the H200, benchmarks/results/2026-11-28_nvidia-h200_d73e30a.json).
SIZES_NOT_SPECIALISED = ["T", "T_BUCKET"]


WIDEST_CHUNK = 128  # the widest column chunk BLK of the kernels (plan.BLK_MAX)

Candidate = Tuple[Dict[str, int], int, int]  # (meta-parameters, num_warps, num_stages)


def _signature(config) -> tuple:
    return (tuple(sorted(config.kwargs.items())), config.num_warps, config.num_stages)


class Candidates:
    """A kernel's autotune candidates, and the rule that picks the ones tuned for a launch.

    ``configs`` (the ``triton.Config`` list for ``triton.autotune``) is made of three lists of
    ``(meta, num_warps, num_stages)``; a candidate in several is listed once:

    * ``gpu``: for 16-bit operands at column chunks BLK below the widest;
    * ``gpu_wide``: for 16-bit operands at the widest chunk (BLK = ``WIDEST_CHUNK``), where twice the
      columns of H, A and B are on chip, so fewer stages or narrower tiles fit in shared memory
      (``tools/compile_check.py`` reports each candidate's). Without it, ``gpu`` serves every chunk;
    * ``gpu_float32``: for float32 operands only: small tiles in one stage, whose shared memory fits at
      the widest chunk, where float32 tiles of the 16-bit candidates do not (the smallest of them needs
      240 KiB in the dH kernel, over the H200's 227 KiB).

    Under the interpreter ``configs`` is exactly one small config (``interpreter``): it would otherwise
    benchmark every config on the CPU. ``prune_configs_by`` is for ``triton.autotune``; its
    ``early_config_prune`` is :meth:`prune`. The lists are kept by value (meta, warps, stages), not as
    attributes of the Config objects, which would not survive the copies Triton and torch make of them
    (deepcopy, pickling, Triton's on-disk autotune cache rebuilds them from their fields).
    """

    def __init__(
        self,
        gpu: Iterable[Candidate],
        interpreter: Dict[str, int],
        gpu_wide: Iterable[Candidate] = (),
        gpu_float32: Iterable[Candidate] = (),
    ):
        import triton

        self.roles: Dict[tuple, set] = {}
        self.configs: List = []
        self.prune_configs_by = {"early_config_prune": self.prune}
        if interpreting():
            self.configs.append(triton.Config(dict(interpreter), num_warps=4, num_stages=1))
        else:
            self.extend(gpu=gpu, gpu_wide=gpu_wide, gpu_float32=gpu_float32)

    def extend(self, gpu: Iterable[Candidate] = (), gpu_wide: Iterable[Candidate] = (),
               gpu_float32: Iterable[Candidate] = ()) -> None:
        """Add candidates to the lists (tools/kernel_report.py --extra)."""
        import triton

        for role, entries in (("narrow", gpu), ("wide", gpu_wide), ("float32", gpu_float32)):
            for meta, warps, stages in entries:
                config = triton.Config(dict(meta), num_warps=warps, num_stages=stages)
                sig = _signature(config)
                if sig not in self.roles:
                    self.roles[sig] = set()
                    self.configs.append(config)
                self.roles[sig].add(role)

    def _in(self, configs, *roles) -> list:
        """The configs in any of these lists, or all of them where none is (the interpreter's one)."""
        kept = [c for c in configs if self.roles.get(_signature(c), set()).intersection(roles)]
        return kept or list(configs)

    def prune(self, configs, named_args, **kwargs) -> list:
        """``early_config_prune``: the candidates tuned for a launch, by the dot precision ``PREC``, the
        operands' dtype (the first tensor argument's) and the column chunk ``BLK``:

        * float32 without TF32 (``PREC == "ieee"``, products on the CUDA cores): only the smallest float32-only
          candidate. Tuning them all made the first float32 call at 8192 features outlast the GPU runner's test
          time limit (benchmarks/results/2026-11-28_nvidia-h200_f8bc639_runner.log), and with one candidate left
          Triton may run it without benchmarking (3.6 and 3.9 do), so it must fit; ``auto`` sends float32 to
          ``torch`` anyway (TritonBackend.auto_priority);
        * float32 with TF32 at the widest chunk: the float32-only candidates. The others' float32 tiles ask
          for more shared memory than an H200 block may have in all but two of them (tools/compile_check.py),
          and the autotuner learns that only after compiling each: minutes at a new shape (the GPU test of
          float32 at Lk = 150 ran past the runner's 240 s test limit,
          benchmarks/results/2026-11-29_nvidia-h200_807e467_runner.log);
        * float32 with TF32 at narrower chunks: the 16-bit narrow-chunk candidates and the float32-only ones
          (the autotuner skips those that run out of shared memory; the float32-only ones always fit);
        * 16-bit operands: ``gpu_wide`` at the widest chunk (where the kernel has that list), ``gpu`` below;
        * no tensor among the arguments (dtype unknown): every candidate."""
        prec = kwargs.get("PREC", named_args.get("PREC"))
        if prec == "ieee":
            if len(configs) <= 1:
                return list(configs)

            def size(c):
                area = 1
                for v in c.kwargs.values():
                    area *= v
                return ("float32" not in self.roles.get(_signature(c), ()), c.num_warps, area, c.num_stages)

            return [min(configs, key=size)]
        dtype = next((v.dtype for v in named_args.values() if isinstance(v, torch.Tensor)), None)
        if dtype is None:
            return list(configs)
        widest = kwargs.get("BLK", named_args.get("BLK", 0)) >= WIDEST_CHUNK
        if dtype == torch.float32:
            return self._in(configs, "float32") if widest else self._in(configs, "narrow", "float32")
        has_wide = any("wide" in r for r in self.roles.values())
        return self._in(configs, "wide" if widest and has_wide else "narrow")


def tuning_bench(fn, quantiles=None):
    """Timing of one autotune candidate: triton.testing.do_bench with a short budget (10 ms warm-up,
    40 ms of runs instead of 25 and 100): a first call per shape tunes every config, and the default
    budget made that a second per kernel and shape, while these kernels' configs differ by far more
    than the noise of 40 ms of runs."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=40, quantiles=quantiles)


def device_guard(t: torch.Tensor):
    """Make ``t``'s CUDA device the current one for the launches that follow (Triton launches on the
    current device): a no-op where it already is, or on the CPU."""
    if t.is_cuda and t.get_device() != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


CACHE_ENTRIES = 4096  # bound of the host-side caches (plans, launch recipes, compiled-kernel lookups)


def remember(cache: dict, key, value):
    """``cache[key] = value``, starting the cache over once it holds CACHE_ENTRIES entries (many distinct
    batch sizes or layouts), rather than growing without bound; returns value."""
    if len(cache) >= CACHE_ENTRIES:
        cache.clear()
    cache[key] = value
    return value


def cdiv(a, b):
    """Ceiling division of sizes (plain ints or torch.compile's symbolic sizes; triton.cdiv is a JIT
    function whose Python call costs ~15 us)."""
    return -(-a // b)


def size_hint(n) -> int:
    """A plain int for a size. Under torch.compile with dynamic shapes a size may be symbolic: take its
    example value without adding a guard (sizes only steer launch plans and autotune keys, and every
    plan is correct for every size), so a new batch size does not recompile."""
    if type(n) is int:
        return n
    hint = getattr(getattr(n, "node", None), "hint", None)
    return int(hint) if hint is not None else int(n)


def next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def tune_bucket(n: int) -> int:
    """Autotune key for a row count: its power-of-two bucket (>= 16), so that a new batch size reuses
    the config tuned for its bucket instead of benchmarking again."""
    return max(16, min(next_power_of_2(size_hint(n)), 1 << 20))
