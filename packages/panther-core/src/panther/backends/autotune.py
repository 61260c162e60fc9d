"""``auto`` dispatch by measurement: which backend is fastest for a call, measured once and remembered.

When two or more available backends accept a call on a GPU, ``auto`` times each of them on the first call
with a given *key*, keeps the fastest, and remembers it in memory and on disk, so that later calls and
later processes start with the answer. Everywhere else ``auto`` keeps the fixed bids
(:meth:`~panther.backends.base.Backend.auto_priority`).

Key: the op, the device's name, the dtype, the shapes bucketed to powers of two where they vary from call
to call and exact where they define the kernel, and the state that changes which backend is fastest:

* ``sketched_linear``: rows (all leading dims of x) and in/out features as powers of two, L and k exact,
  whether there is a bias;
* ``sketched_conv2d``: batch, channels in/out, height and width as powers of two; kernel size, stride,
  padding, dilation, 2L and k exact; bias; whether x is channels_last;
* ``rfa_attention``: B·H, T and S as powers of two; head dims, feature count m, causal, kernel, whether a
  key padding mask is given;
* for every op: which inputs need gradients (grad mode on and ``requires_grad``), the autocast dtype
  when autocast is on, TF32 for float32 matrix products and convolutions, and the competing backends.

Measurement: on copies of the call's inputs (the caller's tensors and the random number generators are
untouched), each candidate runs a few times to warm up (compilation, autotuning of kernels), then is timed
with CUDA events, forward under ``no_grad``, or forward and backward when gradients are needed, twice:

* eager time: each timed call starts from an idle device, the candidates interleaved, so the host's work
  counts as an eager caller sees it;
* device time: each candidate captured into a CUDA graph (the graphs share one memory pool), then rounds
  of one replay per candidate in a shuffled order, each after a write that flushes the L2 cache, queued
  behind a device-side wait that outlasts the host's queuing, so that the events time the device's work
  alone, as a replayed graph costs it, from a cold cache (as the benchmarks time it). A candidate that
  cannot be captured cannot run in a captured call either: it gets no device time. One that synchronises
  (found before any capture: one round of the same timing, of its eager call alone, leaves it out with
  the device idle when the call returns) is never captured; one that the host cannot queue ahead for
  another reason (more launches than the device's queue holds: the device still busy with its work when
  it returns) is captured, and its graph, a single launch, timed as the others'; one whose capture fails
  is left out after it.

Medians decide: eager calls run the fastest by eager time; calls being captured into a CUDA graph
(``torch.cuda.graph``, ``make_graphed_callables``) run the fastest by device time, which is what each
replay costs, once it has run in the process (the first eager call with a key read from the disk cache
runs it once, untimed, so that its one-time setup happens before any capture). On a host-bound machine
the two differ (a backend of cheaper launches wins eager calls, one of faster kernels wins graphs). A
candidate that fails is left out (the failure is recorded); if all fail, the fixed bid decides. Results
never change: the call itself then runs on the chosen backend as any call would.

Never measured (the cached choice, else the fixed bid, is used): calls whose first tensor is not on a
CUDA device, calls that only one backend accepts, calls under ``torch.compile`` tracing (the eager winner
is baked into the compiled code, without a graph break; symbolic sizes add guards on their power-of-two
bucket), under other tracing (``torch.jit.trace``, ``make_fx``, fake tensors, any ``TorchDispatchMode``)
and during CUDA-graph capture (graphs are captured after eager warm-up calls, which measure). Measuring is
serialised by one lock: threads never time the same key twice, nor two keys at once (concurrent timings
on one device would distort each other).

Switch: the environment variable ``PANTHER_AUTOTUNE=0`` turns measuring off (fixed bids, as before
measurement existed); :func:`set_autotune` (process default) and :func:`use_autotune` (context-local)
override it, most specific first, as :func:`~panther.backends.registry.set_backend` does.

Disk cache: one JSON file per device and software fingerprint (device name, driver version, torch and
CUDA versions, the version of every backend and of each installed package its distribution requires), in
``$PANTHER_CACHE_DIR``, else ``$XDG_CACHE_HOME/panther``, else ``~/.cache/panther``; any version change
opens a new file. Writes are atomic (a temporary file, then ``os.replace``); an unreadable or corrupt file
is ignored (and rewritten by the next measurement); an unwritable directory keeps measurements in memory,
with one warning. ``python -m panther info --dispatch`` prints the cache; :func:`clear_dispatch_cache`
empties it.

Seam for tests: :data:`measurer` (a :class:`Measurer`) decides which calls count as GPU calls and times
the candidates; replace it to drive the mechanism with CPU tensors and a fake clock.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import datetime
import hashlib
import json
import os
import platform
import random
import re
import statistics
import tempfile
import threading
import time
import warnings
from importlib import metadata
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from panther import _environ
from panther.backends.base import Backend

ENV_VAR = "PANTHER_AUTOTUNE"
CACHE_ENV_VAR = "PANTHER_CACHE_DIR"
FORMAT = 4  # of the cache files; a change opens new files
_FILE_PREFIX = "dispatch-"
_MEMO_LIMIT = 4096  # exact call signatures remembered before the memo starts over

# Names of each op's positional arguments (base.OPS), to name the inputs that need gradients in keys.
ARG_NAMES = {
    "sketched_linear": ("x", "S1s", "S2s", "U1s", "U2s", "bias"),
    "sketched_conv2d": ("x", "S1s", "U1s", "bias", "stride", "padding", "dilation"),
    "rfa_attention": ("q", "k", "v", "omega", "causal", "kernel", "key_padding_mask"),
}


def _constant_under_compile(fn):
    """Mark ``fn`` as torch.compiler.assume_constant_result does, without importing torch._dynamo here.

    torch.compile then calls it while tracing, with constant arguments, and bakes its result into the
    compiled code; importing torch._dynamo costs seconds, and ``import panther`` must stay cheap.
    """
    fn._dynamo_marked_constant = True
    return fn


# --- the switch -------------------------------------------------------------------------------------

_default: Optional[bool] = None  # set_autotune()
_context: contextvars.ContextVar[Optional[bool]] = contextvars.ContextVar("panther_autotune", default=None)
_ENV_VALUES = {"1": True, "true": True, "on": True, "yes": True, "0": False, "false": False, "off": False, "no": False}


def _check_flag(enabled) -> bool:
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {enabled!r}")
    return enabled


def set_autotune(enabled: Optional[bool]) -> None:
    """Turn measuring in ``auto`` dispatch on or off for the process; ``None`` gives ``PANTHER_AUTOTUNE`` back.

    Off, ``auto`` takes the highest fixed bid (:meth:`~panther.backends.base.Backend.auto_priority`).
    Code compiled by ``torch.compile`` keeps the choice made when it was traced.
    """
    global _default
    _default = None if enabled is None else _check_flag(enabled)


@contextlib.contextmanager
def use_autotune(enabled: bool) -> Iterator[None]:
    """Context manager turning measuring on or off for the current thread / asyncio context only."""
    token = _context.set(_check_flag(enabled))
    try:
        yield
    finally:
        _context.reset(token)


def autotune_enabled() -> bool:
    """Whether ``auto`` dispatch measures: :func:`use_autotune`, else :func:`set_autotune`, else the
    environment variable ``PANTHER_AUTOTUNE`` (``0``/``false``/``off``/``no`` turn it off), else on."""
    flag = _context.get()
    if flag is not None:
        return flag
    if _default is not None:
        return _default
    env = _environ.get(ENV_VAR)
    if not env:
        return True
    value = _ENV_VALUES.get(env)
    if value is None:
        value = _ENV_VALUES.get(env.strip().lower())
        if value is None:
            raise ValueError(
                f"the environment variable {ENV_VAR} must be 1 or 0 (or true/false, on/off, yes/no), got {env!r}"
            )
    return value


# --- the seam: which calls are measured, and how ----------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Timing:
    """One candidate's measured milliseconds per call (medians)."""

    eager_ms: float  # from an idle device: the host's work and the device's, as an eager call sees them
    gpu_ms: Optional[float] = None  # the device's work alone, as a replayed CUDA graph sees it (None: unknown)


class Measurer:
    """Decides which calls are GPU calls and times the candidates of one; :data:`measurer` is the one used.

    ``time`` gets one callable per candidate (each runs the op on copies of the inputs, forward or forward
    and backward) and returns each candidate's :class:`Timing`, or the exception it raised.
    """

    warmup_calls = 2  # untimed calls first: compilation and the kernels' own autotuning stay out ...
    warmup_s = 0.02  # ... and then until about this long has run, so clocks and caches settle (at most 100 calls)
    min_reps = 7
    max_reps = 50
    budget_s = 0.03  # timed calls per candidate: about this long, within [min_reps, max_reps]
    spin_tries = 4  # device-time rounds: attempts, doubling the device-side wait, before a candidate is left out
    flush_l2_times = 2  # before each timed replay, a write of this many times the L2 cache's size
    spin_piece_s = 0.05  # the device-side wait is queued as waits of at most this long (no watchdog sees a long one)
    max_wait_s = 2.0  # and at most this long in all
    busy_s = 5e-4  # a call whose own work keeps the device busy this long after it returns did not synchronise

    def is_gpu_call(self, args: tuple, kwargs: dict) -> bool:
        """Whether the call's first tensor is on a CUDA device (backends refuse calls on mixed devices)."""
        for a in args:
            if isinstance(a, torch.Tensor):
                return a.is_cuda
        for a in kwargs.values():
            if isinstance(a, torch.Tensor):
                return a.is_cuda
        return False

    def is_capturing(self, device: torch.device) -> bool:
        """Whether work on ``device``'s current stream is being captured into a CUDA graph."""
        return device.type == "cuda" and torch.cuda.is_current_stream_capturing()

    def time(self, runs: Dict[str, Callable[[], object]], device: torch.device) -> Dict[str, Union[Timing, Exception]]:
        """Each candidate's eager time (CUDA events around a call from an idle device, candidates interleaved)
        and device time (:meth:`_device_times` of its CUDA graph, :meth:`_capture`)."""
        results: Dict[str, Union[Timing, Exception]] = {}
        failed: Dict[str, Exception] = {}
        reps: Dict[str, int] = {}
        host_s: Dict[str, float] = {}
        with torch.cuda.device(device):
            for name, run in runs.items():
                try:
                    fastest, queued, spent, calls = float("inf"), float("inf"), 0.0, 0
                    while calls < self.warmup_calls or (spent < self.warmup_s and calls < 100):
                        t0 = time.perf_counter()
                        run()
                        t1 = time.perf_counter()  # the host's part: the call queued
                        torch.cuda.synchronize()
                        took = time.perf_counter() - t0
                        fastest, spent, calls = min(fastest, took), spent + (took if calls else 0.0), calls + 1
                        queued = min(queued, t1 - t0)
                except Exception as exc:  # noqa: BLE001 - a failing candidate is left out, the others go on
                    failed[name] = exc
                    continue
                host_s[name] = queued
                reps[name] = max(self.min_reps, min(self.max_reps, int(self.budget_s / max(fastest, 1e-6))))
            events: Dict[str, list] = {name: [] for name in reps}
            for i in range(max(reps.values(), default=0)):
                for name in reps:
                    if i >= reps[name] or name in failed:
                        continue
                    torch.cuda.synchronize()  # each call from an idle device: its host-side time counts
                    stamps = self._call(runs[name], name, failed)
                    if stamps is not None:
                        events[name].append(stamps)
            torch.cuda.synchronize()
            ok = [name for name in reps if name not in failed]
            rounds = max(self.min_reps, min((reps[n] for n in ok), default=0))
            replays, pool = {}, None
            for n in ok:
                ahead: set = set()
                if not self._device_times({n: runs[n]}, host_s, 1, {}, ahead=ahead) and n not in ahead:
                    continue  # it synchronises: never captured (a failed capture leaves state behind)
                pool = pool if pool is not None else torch.cuda.graph_pool_handle()
                try:
                    replays[n] = self._capture(runs[n], device, pool)
                except Exception:  # noqa: BLE001 - not capturable: no device time (failures stay eager's)
                    pool = None  # the next capture gets a pool of its own (this one may hold the failed capture's)
            flush = self._flush_buffer(device) if replays else None
            device_ms = self._device_times(replays, host_s, rounds, {}, flush)
            del replays, flush, pool
        for name, ev in events.items():
            if name not in failed:
                eager = statistics.median(s.elapsed_time(e) for s, e in ev)
                results[name] = Timing(eager, device_ms.get(name))
        results.update(failed)
        return results

    @staticmethod
    def _capture(run: Callable[[], object], device: torch.device, pool) -> Callable[[], object]:
        """``run`` captured into a CUDA graph on a stream of ``device`` (after a call on it, as capture asks),
        its memory from ``pool`` (:func:`torch.cuda.graph_pool_handle`: the candidates' graphs share it,
        since nothing a run allocates outlives it and the replays run one at a time); returns the graph's
        ``replay``. Raises what the capture raises. Only this thread's calls are held to the capture's rules
        (other threads of the process go on as they were); unlike ``torch.cuda.graph``, it does not
        synchronise the device nor empty the allocator's cache first."""
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.stream(side):  # puts the caller's stream back, also when the capture fails
            run()
            graph.capture_begin(pool=pool, capture_error_mode="thread_local")
            try:
                run()
            finally:
                try:
                    graph.capture_end()
                except Exception:
                    _stop_recording(device, pool)
                    raise
        torch.cuda.current_stream(device).wait_stream(side)
        return graph.replay

    def _flush_buffer(self, device: torch.device) -> Optional[torch.Tensor]:
        """A buffer of :attr:`flush_l2_times` the device's L2 cache, written before each timed replay (None
        where the size is unknown, or the memory is not there: the replays then run from a warm cache)."""
        props = torch.cuda.get_device_properties(device)
        size = int(getattr(props, "L2_cache_size", 0) or 0) * self.flush_l2_times
        try:
            return torch.empty(size, dtype=torch.int8, device=device) if size else None
        except torch.cuda.OutOfMemoryError:
            return None

    def _device_times(self, runs: Dict[str, Callable[[], object]], host_s: Dict[str, float], rounds: int,
                      failed: Dict[str, Exception], flush: Optional[torch.Tensor] = None,
                      ahead: Optional[set] = None) -> Dict[str, float]:
        """Each candidate's median device time: rounds of one call of each candidate (in an order shuffled
        every round, with a fixed seed), each after a write of ``flush`` (outside its events), queued behind
        a device-side wait (``torch.cuda._sleep``) sized to outlast the host's queuing of the round, so that
        the events around each call time the device's work alone. The wait is checked after
        each call is queued: one that ran out before the round was queued makes the round start again with
        twice the wait (at most :attr:`max_wait_s`); a candidate still being queued when the wait runs out on
        the last of :attr:`spin_tries` attempts is left out (no device time). Such a candidate either
        synchronises (the device is idle when its call returns) or queues more work than the device's launch
        queue holds, which keeps the host waiting on the device without synchronising (its own work is still
        queued when it returns, for longer than :attr:`busy_s`): the latter go to ``ahead``, where given. A
        candidate that raises goes to ``failed``.
        """
        names = list(runs)
        if not names:
            return {}
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        hz = (getattr(props, "clock_rate", 0) or 0) * 1e3 or 2e9  # kHz, as CUDA reports it
        wait_s = 1e-3 + 2.0 * sum(host_s[n] for n in names)
        samples: Dict[str, List[float]] = {n: [] for n in names}
        left_out: set = set()
        shuffle = random.Random(0).shuffle
        for _ in range(rounds):
            queued: list = []
            shuffled = list(names)
            shuffle(shuffled)  # no candidate always follows the same one: what ran just before can move a time
            for attempt in range(self.spin_tries):
                order = [n for n in shuffled if n not in failed and n not in left_out]
                if not order:
                    break
                torch.cuda.synchronize()
                self._wait(min(wait_s, self.max_wait_s), hz)
                gate = torch.cuda.Event()
                gate.record()
                queued, late = [], None
                for name in order:
                    if flush is not None:
                        flush.zero_()
                    stamps = self._call(runs[name], name, failed)
                    if stamps is None:
                        continue
                    if gate.query():  # the wait ran out while this call was queued: its events may hold host time
                        late = name
                        if ahead is not None:  # ... was its work still queued when it returned?
                            returned = time.perf_counter()
                            torch.cuda.synchronize()
                            if time.perf_counter() - returned > self.busy_s:
                                ahead.add(name)
                        break
                    queued.append((name, *stamps))
                if late is None:
                    break
                queued = []
                if attempt == self.spin_tries - 1 or wait_s >= self.max_wait_s:
                    left_out.add(late)
                    break
                wait_s *= 2
            torch.cuda.synchronize()
            for name, start, end in queued:
                samples[name].append(start.elapsed_time(end))
        return {n: statistics.median(v) for n, v in samples.items() if v and n not in failed and n not in left_out}

    @staticmethod
    def _call(run: Callable[[], object], name: str, failed: Dict[str, Exception]):
        """(start, end) CUDA events around one call of ``run``; None, with the exception in ``failed``, if it raises."""
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        try:
            start.record()
            run()
            end.record()
        except Exception as exc:  # noqa: BLE001 - a failing candidate is left out, the others go on
            failed[name] = exc
            return None
        return start, end

    def _wait(self, seconds: float, hz: float) -> None:
        """A device-side wait of about ``seconds``, queued as waits of at most :attr:`spin_piece_s`."""
        while seconds > 0:
            piece = min(seconds, self.spin_piece_s)
            torch.cuda._sleep(max(1, int(piece * hz)))
            seconds -= piece


def _stop_recording(device: torch.device, pool) -> None:
    """Undo what a failed capture may leave in the caching allocator: where torch's ``capture_end`` raised
    before it stopped routing the capture's allocations to ``pool`` (the capture was invalidated), no
    capture could use that pool again and what the capture allocated there would stay; stopping and
    releasing it, as ``torch.cuda.use_mem_pool`` does on exit, frees that (the pool lives on while a
    captured graph holds it). Where the recording had stopped (the capture ended, then failed), the
    graph releases the pool itself: nothing to do."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        torch._C._cuda_endAllocateToPool(index, pool)
    except Exception:  # noqa: BLE001 - not recording (or no such call): the pool is not this function's
        return
    with contextlib.suppress(Exception):
        torch._C._cuda_releasePool(index, pool)


measurer = Measurer()


# --- keys -------------------------------------------------------------------------------------------


def _pow2(n) -> int:
    """The smallest power of two >= n (0 for 0). A loop of comparisons, so that under torch.compile a
    symbolic size gets guards on its bucket instead of a graph break."""
    if n <= 0:
        return 0
    b = 1
    while b < n:
        b *= 2
    return b


def _exact(n) -> int:
    """n as a plain int, by comparisons: under torch.compile a symbolic size is specialised (guarded)."""
    v, bit = 0, 1 << 48
    while bit:
        if n >= v + bit:
            v += bit
        bit >>= 1
    return v


def _dims(t: torch.Tensor) -> tuple:
    return tuple(t.shape)


def _linear_fields(x, S1s, S2s, U1s, U2s, bias=None):
    rows = 1
    for d in _dims(x)[:-1]:
        rows = rows * d
    L, I, k = _dims(S1s)
    return (("rows", _pow2(rows)), ("in", _pow2(I)), ("out", _pow2(S2s.shape[-1])), ("L", _exact(L)),
            ("k", _exact(k)), ("bias", bias is not None))


def _conv_fields(x, S1s, U1s, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1)):
    N, C, H, W = _dims(x)
    terms, k, _, kh, kw = _dims(S1s)
    layout = "channels_last" if _channels_last(x) else None  # NCHW (the default) is left out of the key
    return (("N", _pow2(N)), ("in", _pow2(C)), ("out", _pow2(U1s.shape[-1])), ("H", _pow2(H)), ("W", _pow2(W)),
            ("kernel", (_exact(kh), _exact(kw))), ("stride", tuple(stride)), ("padding", tuple(padding)),
            ("dilation", tuple(dilation)), ("terms", _exact(terms)), ("k", _exact(k)), ("bias", bias is not None),
            ("layout", layout))


def _channels_last(x: torch.Tensor) -> bool:
    """Whether x is laid out channels_last rather than NCHW (a tensor that is both, with C == 1 or H == W
    == 1, counts as NCHW)."""
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _attention_fields(q, k, v, omega, causal=False, kernel="softmax", key_padding_mask=None):
    B, H, T, D = _dims(q)
    return (("BH", _pow2(B * H)), ("T", _pow2(T)), ("S", _pow2(k.shape[2])), ("D", _exact(D)),
            ("Dv", _exact(v.shape[-1])), ("m", _exact(omega.shape[-2])), ("omega_per_head", omega.dim() == 3),
            ("causal", bool(causal)), ("kernel", kernel), ("masked", key_padding_mask is not None))


def _generic_fields(*args):
    fields = []
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            fields.append((f"arg{i}", tuple(_pow2(d) for d in _dims(a))))
        elif a is None or isinstance(a, (bool, int, float, str)):
            fields.append((f"arg{i}", a))
        elif isinstance(a, tuple) and all(isinstance(e, (bool, int, float, str)) for e in a):
            fields.append((f"arg{i}", a))
        else:
            fields.append((f"arg{i}", type(a).__name__))
    return tuple(fields)


_FIELDS = {"sketched_linear": _linear_fields, "sketched_conv2d": _conv_fields, "rfa_attention": _attention_fields}


def _first_tensor(args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a
    return None


def call_fields(op: str, args: tuple, kwargs: dict) -> tuple:
    """The part of a call's key read from its inputs, as ((name, value), ...); traceable by torch.compile."""
    build = _FIELDS.get(op)
    fields = build(*args, **kwargs) if build is not None else _generic_fields(*args, *kwargs.values())
    first = _first_tensor(args, kwargs)
    dtype = str(first.dtype).replace("torch.", "") if first is not None else "none"
    grads = "none"
    if torch.is_grad_enabled():
        names = ARG_NAMES.get(op, ())
        for i, a in enumerate((*args, *kwargs.values())):
            if isinstance(a, torch.Tensor) and a.requires_grad:
                name = names[i] if i < len(names) else f"arg{i}"
                grads = name if grads == "none" else grads + "," + name
    autocast = None
    if first is not None and torch.is_autocast_enabled(first.device.type):
        autocast = str(torch.get_autocast_dtype(first.device.type)).replace("torch.", "")
    return (("dtype", dtype),) + fields + (("grad", grads), ("autocast", autocast))


def _float32_flags() -> Tuple[str, bool]:
    """How float32 matrix products and convolutions compute: torch's float32 matmul precision and whether
    cuDNN may use TF32, read directly from torch._C (what torch.get_float32_matmul_precision and
    torch.backends.cudnn.allow_tf32 return, without the property's overhead: on every float32 call's path)."""
    return torch._C._get_float32_matmul_precision(), torch._C._get_cudnn_allow_tf32()


def _float32_math() -> str:
    """:func:`_float32_flags` as float32 keys show it."""
    precision, cudnn_tf32 = _float32_flags()
    return f"{precision},cudnn-tf32={'on' if cudnn_tf32 else 'off'}"


def _show(value) -> str:
    if isinstance(value, tuple):
        return "x".join(map(str, value)) if value else "-"
    return str(value)


def key_string(op: str, candidates: Sequence[str], fields: tuple) -> str:
    """The key as stored and printed: op, competing backends, the fields, and for float32 the matmul
    precision and cuDNN's TF32 (the device is the file's)."""
    parts = [f"{name}={_show(value)}" for name, value in fields if value is not None]
    if dict(fields).get("dtype") == "float32":
        parts.append(f"fp32-matmul={_float32_math()}")
    return f"{op}[{','.join(candidates)}] " + " ".join(parts)


# --- device, fingerprint and files ------------------------------------------------------------------

_device_names: Dict[torch.device, str] = {}


def device_name(device: torch.device) -> str:
    name = _device_names.get(device)
    if name is None:
        if device.type == "cuda":
            name = torch.cuda.get_device_name(device)
        else:
            name = f"{device.type} {platform.machine()}"
        _device_names[device] = name
    return name


def nvidia_driver_version(text: str) -> Optional[str]:
    """The version in /proc/driver/nvidia/version (proprietary or open kernel module), else None."""
    found = re.search(r"Kernel Module\s+(?:for \S+\s+)?([0-9]+(?:\.[0-9]+)+)", text)
    return found.group(1) if found else None


def _driver_version(device_name_: str) -> Optional[str]:
    """The NVIDIA driver's version (Linux), else the CUDA driver API's version, else None."""
    if device_name_.startswith(("cpu", "meta")):
        return None
    try:
        found = nvidia_driver_version(Path("/proc/driver/nvidia/version").read_text())
        if found:
            return found
    except OSError:
        pass
    try:
        import ctypes

        version = ctypes.c_int()
        if ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(version)) == 0:
            return f"cuda-driver-api {version.value}"
    except (OSError, AttributeError):
        pass
    return None


def _requirement_names(dist: Optional[str]) -> List[str]:
    if not dist:
        return []
    try:
        reqs = metadata.requires(dist) or []
    except metadata.PackageNotFoundError:
        return []
    return [m.group(0) for m in (re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", r) for r in reqs) if m]


def fingerprint(device_name_: str) -> dict:
    """What a cache file is valid for: device, driver, torch, and every backend with what it requires."""
    from panther.backends import registry  # registry imports this module

    versions = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "torch_hip": torch.version.hip}
    backends = {}
    for info in registry.backend_infos():
        backends[info.name] = info.version
        for dep in _requirement_names(info.distribution):
            try:
                versions[dep.lower()] = metadata.version(dep)
            except metadata.PackageNotFoundError:
                pass  # an optional requirement that is not installed
    return {"format": FORMAT, "device": device_name_, "driver": _driver_version(device_name_),
            "versions": dict(sorted(versions.items())), "backends": dict(sorted(backends.items()))}


def cache_dir() -> Path:
    """``$PANTHER_CACHE_DIR``, else ``$XDG_CACHE_HOME/panther``, else ``~/.cache/panther``."""
    if os.environ.get(CACHE_ENV_VAR):
        return Path(os.environ[CACHE_ENV_VAR]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "panther"
    return Path.home() / ".cache" / "panther"


def _file_for(fp: dict) -> Path:
    digest = hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]
    slug = re.sub(r"[^a-z0-9]+", "-", fp["device"].lower()).strip("-")
    return cache_dir() / f"{_FILE_PREFIX}{slug}-{digest}.json"


@dataclasses.dataclass
class Entry:
    """The outcome of one measurement: the fastest eager call (``winner``) and the fastest device time
    (``gpu_winner``, which calls captured into a CUDA graph run; empty where device times are unknown)."""

    winner: str
    times_ms: Dict[str, float]  # eager median per candidate that ran
    fixed: str  # what the fixed bids would have chosen
    errors: Dict[str, str] = dataclasses.field(default_factory=dict)  # candidates that failed
    shapes: str = ""  # the call it was measured on
    utc: str = ""
    gpu_ms: Dict[str, float] = dataclasses.field(default_factory=dict)  # device-time median per candidate
    gpu_winner: str = ""

    def pick(self, captured: bool) -> str:
        """The winner for an eager call, or for one captured into a CUDA graph."""
        return self.gpu_winner if captured and self.gpu_winner else self.winner

    @classmethod
    def from_json(cls, d) -> Optional["Entry"]:
        try:
            times = {str(k): float(v) for k, v in d["times_ms"].items()}
            gpu = {str(k): float(v) for k, v in d.get("gpu_ms", {}).items()}
            errors = {str(k): str(v) for k, v in d.get("errors", {}).items()}
            entry = cls(str(d["winner"]), times, str(d["fixed"]), errors, str(d.get("shapes", "")), str(d.get("utc", "")),
                        gpu, str(d.get("gpu_winner", "")))
        except (KeyError, TypeError, ValueError, AttributeError):
            return None
        if entry.winner not in times or not set(gpu) <= set(times) or (entry.gpu_winner and entry.gpu_winner not in gpu):
            return None
        return entry


def read_file(path: Path) -> Tuple[Optional[dict], Dict[str, Entry]]:
    """(fingerprint, entries) of a cache file; (None, {}) when it is missing, unreadable or corrupt."""
    try:
        doc = json.loads(path.read_text())
        fp, raw = doc["fingerprint"], doc["entries"]
        if not isinstance(fp, dict) or not isinstance(raw, dict):
            return None, {}
    except (OSError, ValueError, KeyError, TypeError):
        return None, {}
    entries = {}
    for key, value in raw.items():
        entry = Entry.from_json(value)
        if entry is not None:
            entries[str(key)] = entry
    return fp, entries


_write_warned = False


def _write_file(path: Path, fp: dict, entries: Dict[str, Entry]) -> None:
    """Merge ``entries`` into the file (another process may have added its own) and replace it atomically."""
    global _write_warned
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        old_fp, merged = read_file(path)
        if old_fp != fp:
            merged = {}
        merged.update(entries)
        doc = {"format": FORMAT, "fingerprint": fp,
               "entries": {k: dataclasses.asdict(e) for k, e in sorted(merged.items())}}
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=1)
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        if not _write_warned:
            _write_warned = True
            warnings.warn(f"panther: cannot write the dispatch cache {path} ({exc}); measurements are kept in "
                          f"memory only (set {CACHE_ENV_VAR} to a writable directory)", RuntimeWarning, stacklevel=2)
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


# --- the tables -------------------------------------------------------------------------------------

_lock = threading.RLock()  # loading files, measuring, clearing
_table: Dict[Tuple[str, str], Entry] = {}  # (device name, key string) -> entry
_files: Dict[str, Tuple[object, dict, Path]] = {}  # device name -> (registry it was made for, fingerprint, file)
_memo: Dict[tuple, Tuple[object, str]] = {}  # exact call signature -> (registry, winner name)
_ran: set = set()  # (device name, key) whose device-time winner has run in this process


_registry_module = None


def _registry_now():
    """The registry's table of backends as discovered now (a new object after each discovery)."""
    global _registry_module
    if _registry_module is None:
        from panther.backends import registry  # registry imports this module

        _registry_module = registry
    return _registry_module._registry


def _file_state(name: str) -> Tuple[dict, Path]:
    """The fingerprint and file of a device; loads the file's entries into memory the first time."""
    state = _files.get(name)
    if state is not None and state[0] is _registry_now():
        return state[1], state[2]
    with _lock:
        if state is not None:  # backends discovered again (a plugin installed): versions may differ
            for stale in [k for k in _table if k[0] == name]:
                del _table[stale]
            _ran.difference_update([k for k in _ran if k[0] == name])
        fp = fingerprint(name)
        path = _file_for(fp)
        disk_fp, entries = read_file(path)
        if disk_fp == fp:
            for key, entry in entries.items():
                _table.setdefault((name, key), entry)
        _files[name] = (_registry_now(), fp, path)
        return fp, path


def _lookup(name: str, key: str) -> Optional[Entry]:
    _file_state(name)
    return _table.get((name, key))


def clear_dispatch_cache(*, disk: bool = True) -> List[Path]:
    """Forget every measurement: in memory, and on disk unless ``disk=False``; returns the files removed."""
    removed = []
    with _lock:
        _table.clear()
        _files.clear()
        _memo.clear()
        _ran.clear()
        if disk:
            for path in sorted(cache_dir().glob(f"{_FILE_PREFIX}*.json")):
                with contextlib.suppress(OSError):
                    path.unlink()
                    removed.append(path)
    return removed


# --- choosing ---------------------------------------------------------------------------------------


def _exact_signature(op: str, args: tuple, kwargs: dict):
    """What decides one call's choice and every backend's acceptance of it: each tensor's shape, dtype,
    device and whether it needs gradients, the first tensor's strides (its layout), the other arguments
    (keyword ones with their names), grad mode, autocast, float32 math, and whether the call is being
    captured into a CUDA graph (:meth:`Entry.pick`). A hit runs the remembered backend without asking it
    again (:meth:`~panther.backends.base.Backend.reasons_cannot_run` answers from these alone); this is on
    the path of every call that a measurement decided, hence cheap reads only.
    """
    first = None
    sig = [op, torch.is_grad_enabled(), tuple(kwargs) if kwargs else ()]  # keyword names, in their order
    add, extend, tensor = sig.append, sig.extend, torch.Tensor
    for a in (*args, *kwargs.values()) if kwargs else args:
        if isinstance(a, tensor):
            extend((a.shape, a.dtype, a.device, a.requires_grad))
            if first is None:
                first = a
                add(a.stride())
        else:
            add(a)
    if first is not None:
        device, dtype = first.device, first.dtype
        sig.append(measurer.is_capturing(device))
        if torch._C._is_any_autocast_enabled() and torch.is_autocast_enabled(device.type):
            sig.append(torch.get_autocast_dtype(device.type))
        if dtype == torch.float32:
            sig.append(_float32_flags())
    return tuple(sig)


def wanted(op: str, args: tuple, kwargs: dict) -> bool:
    """Whether every backend that accepts this call competes (measured or cached) instead of the fixed bids."""
    if torch.compiler.is_compiling():
        return measurer.is_gpu_call(args, kwargs)  # whether measuring is on is read in _compiled_choice
    return autotune_enabled() and measurer.is_gpu_call(args, kwargs)


def remembered(op: str, args: tuple, kwargs: dict) -> Optional[Backend]:
    """The backend chosen before for a call of exactly this signature (:func:`_exact_signature`), with the
    same backends discovered; it accepted a call of this signature, so it is not asked again."""
    if torch.compiler.is_compiling():
        return None
    try:
        hit = _memo.get(_exact_signature(op, args, kwargs))  # eager calls only (see choose)
    except TypeError:  # an unhashable argument
        return None
    if hit is None or hit[0] is not _registry_now():
        return None
    info = hit[0].get(hit[1])
    return info.backend if info is not None else None


def _fixed(accepted: Sequence[Tuple[Backend, int]]) -> Backend:
    """The highest bid; ties go to the earlier (higher static priority, then name)."""
    best, best_bid = None, None
    for be, bid in accepted:
        if best is None or bid > best_bid:
            best, best_bid = be, bid
    return best


def _no_measuring_here(args: tuple, kwargs: dict) -> bool:
    """Tracing of any kind, or tensor subclasses (fake, functional, ...)."""
    from torch.utils._python_dispatch import is_in_torch_dispatch_mode

    if torch.jit.is_tracing() or is_in_torch_dispatch_mode():
        return True
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor) and type(a) not in (torch.Tensor, torch.nn.Parameter):
            return True
    return False


@_constant_under_compile
def _compiled_choice(op: str, candidates: tuple, fields: tuple, device: torch.device) -> Optional[str]:
    """Under torch.compile: the cached winner for this key (no measuring), else None for the fixed bid.

    The eager winner: compiled code still launches each op from the host (a graph captured later, as
    mode="reduce-overhead" does, keeps the choice made here).
    """
    if not autotune_enabled():
        return None
    entry = _lookup(device_name(device), key_string(op, candidates, fields))
    return entry.winner if entry is not None else None


@_constant_under_compile
def _compiled_has_entries(op: str, candidates: tuple, device: torch.device) -> bool:
    """Whether anything is cached for these competitors, so that tracing computes a key only then."""
    if not autotune_enabled():
        return False
    name = device_name(device)
    _file_state(name)
    prefix = f"{op}[{','.join(candidates)}] "
    return any(dev == name and key.startswith(prefix) for dev, key in list(_table))


def choose(op: str, accepted: Sequence[Tuple[Backend, int]], args: tuple, kwargs: dict) -> Backend:
    """The backend ``auto`` runs among ``accepted`` ((backend, bid), in the registry's order), every one of
    which accepts the call: the measured fastest where measuring applies, else the highest bid."""
    fixed = _fixed(accepted)
    candidates = tuple(be.name for be, _ in accepted)
    first = _first_tensor(args, kwargs)
    if len(accepted) < 2 or first is None:
        chosen, settled = fixed, True
    elif torch.compiler.is_compiling():
        if not _compiled_has_entries(op, candidates, first.device):
            return fixed
        name = _compiled_choice(op, candidates, call_fields(op, args, kwargs), first.device)
        for be, _ in accepted:
            if be.name == name:
                return be
        return fixed
    else:
        chosen, settled = _measured_choice(op, accepted, fixed, candidates, first.device, args, kwargs)
    if settled:  # not a fallback for a call that could not be measured (tracing), nor a captured call
        with contextlib.suppress(TypeError):  # an unhashable argument: nothing remembered
            if len(_memo) >= _MEMO_LIMIT:
                _memo.clear()
            _memo[_exact_signature(op, args, kwargs)] = (_registry_now(), chosen.name)
    return chosen


def _measured_choice(op, accepted, fixed, candidates, device, args, kwargs) -> Tuple[Backend, bool]:
    """(backend, whether to remember it for this exact signature: False for the fixed bid of a call not
    measured here, and for calls being captured).

    A call being captured into a CUDA graph is never measured (the device cannot be synchronised) and runs
    the cached winner by device time, provided that backend has run in this process (first runs set up
    what they need: compiling, autotuning, which cannot happen during a capture), else the winner by eager
    time; the others run the winner by eager time (:meth:`Entry.pick`), and the first eager call with a
    cached key whose device-time winner has not run here runs it once, untimed, on copies of its inputs
    (graphs are captured after eager warm-up calls, as torch.cuda.graph asks).
    """
    name = device_name(device)
    key = key_string(op, candidates, call_fields(op, args, kwargs))
    entry = _lookup(name, key)
    captured = measurer.is_capturing(device)
    if not captured and not _no_measuring_here(args, kwargs):
        if entry is None:
            with _lock:
                entry = _table.get((name, key))
                if entry is None:  # not measured by another thread meanwhile
                    entry = _measure(op, accepted, fixed, device, args, kwargs)
                    _table[(name, key)] = entry
                    _ran.add((name, key))  # every candidate ran
                    if not entry.errors:  # a failure (out of memory, ...) may pass: measure again next process
                        fp, path = _file_state(name)
                        _write_file(path, fp, {key: entry})
        elif entry.gpu_winner and entry.gpu_winner != entry.winner and (name, key) not in _ran:
            with _lock:
                if (name, key) not in _ran:
                    _warm(op, [be for be, _ in accepted if be.name == entry.gpu_winner], device, args, kwargs)
                    _ran.add((name, key))
    if entry is not None:
        winner = entry.pick(captured and (name, key) in _ran)
        for be, _ in accepted:
            if be.name == winner:
                return be, not captured
    return fixed, entry is not None and not captured


def _copy(a, grad: bool):
    if isinstance(a, torch.Tensor):
        return a.detach().clone().requires_grad_(grad and a.requires_grad)
    return a


def _tensors(out) -> List[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    return []


def _make_run(be: Backend, op: str, args: tuple, kwargs: dict, grad: bool) -> Callable[[], None]:
    """One call of ``op`` on ``be``: forward under no_grad, or forward and backward from a gradient of ones."""
    fn = getattr(be, op)
    inputs = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.requires_grad]

    def run():
        if not grad:
            with torch.no_grad():
                fn(*args, **kwargs)
            return
        outs = [o for o in _tensors(fn(*args, **kwargs)) if o.requires_grad]
        if outs:
            torch.autograd.grad(outs, inputs, [torch.ones_like(o) for o in outs], allow_unused=True)

    return run


@contextlib.contextmanager
def _runs_on_copies(op, backends, device, args, kwargs) -> Iterator[Dict[str, Callable[[], None]]]:
    """One run per backend (:func:`_make_run`) on copies of the call's inputs, forward and backward when the
    call needs gradients, with the random number generators restored afterwards."""
    grad = torch.is_grad_enabled() and any(
        isinstance(a, torch.Tensor) and a.requires_grad for a in (*args, *kwargs.values()))
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
        c_args = tuple(_copy(a, grad) for a in args)
        c_kwargs = {k: _copy(v, grad) for k, v in kwargs.items()}
        yield {be.name: _make_run(be, op, c_args, c_kwargs, grad) for be in backends}


def _warm(op, backends, device, args, kwargs) -> None:
    """Run each backend once on copies of the call's inputs (a failure is left to the call that meets it)."""
    with _runs_on_copies(op, backends, device, args, kwargs) as runs:
        for run in runs.values():
            with contextlib.suppress(Exception):
                run()


def _measure(op, accepted, fixed, device, args, kwargs) -> Entry:
    shapes = " ".join(f"{tuple(a.shape)}" for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))
    with _runs_on_copies(op, [be for be, _ in accepted], device, args, kwargs) as runs:
        got = measurer.time(runs, device)
    timings = {n: t for n, t in got.items() if not isinstance(t, BaseException)}
    times = {n: float(t.eager_ms) for n, t in timings.items()}
    # device times of the candidates that could be timed so (one that synchronises cannot be captured either)
    gpu = {n: float(t.gpu_ms) for n, t in timings.items() if t.gpu_ms is not None}
    errors = {n: f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
              for n, e in got.items() if isinstance(e, BaseException)}
    errors.update({be.name: "not timed" for be, _ in accepted if be.name not in got})
    order = {be.name: i for i, (be, _) in enumerate(accepted)}
    # fastest; on a tie the higher bid (the fixed choice first, then registry order)
    winner = min(times, key=lambda n: (times[n], n != fixed.name, order[n])) if times else fixed.name
    gpu_winner = min(gpu, key=lambda n: (gpu[n], n != fixed.name, order[n])) if gpu else ""
    return Entry(winner, times, fixed.name, errors, shapes,
                 datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), gpu, gpu_winner)


# --- reading the cache back -------------------------------------------------------------------------


def cache_report() -> str:
    """The cache files for ``python -m panther info --dispatch``: each with its fingerprint, then key ->
    winner and the measured times."""
    folder = cache_dir()
    files = sorted(folder.glob(f"{_FILE_PREFIX}*.json")) if folder.is_dir() else []
    try:
        state = "on" if autotune_enabled() else "off"
    except ValueError as exc:
        state = f"error: {exc}"
    lines = [f"dispatch cache: {folder} (measuring {state})"]
    if not files:
        lines.append("  no measurements cached")
    for path in files:
        fp, entries = read_file(path)
        if fp is None:
            lines.append(f"{path.name}: unreadable or corrupt (ignored; rewritten by the next measurement)")
            continue
        current = fingerprint(str(fp.get("device")))
        stale = [k for k in ("format", "driver", "versions", "backends") if fp.get(k) != current.get(k)]
        state = "current" if not stale else "stale (" + ", ".join(stale) + " changed): ignored"
        versions = ", ".join(f"{k} {v}" for k, v in {**fp.get("versions", {}), **fp.get("backends", {})}.items() if v)
        lines.append(f"{fp.get('device')} (driver {fp.get('driver')}; {versions}): {state}")
        for key, e in entries.items():
            times = ", ".join(f"{n} {t:.4g} ms" for n, t in sorted(e.times_ms.items(), key=lambda kv: kv[1]))
            note = "" if e.winner == e.fixed else f" (fixed bid: {e.fixed})"
            lines.append(f"  {key} -> {e.winner}{note}: {times}")
            if e.gpu_ms:
                gpu = ", ".join(f"{n} {t:.4g} ms" for n, t in sorted(e.gpu_ms.items(), key=lambda kv: kv[1]))
                lines.append(f"    in CUDA graphs -> {e.gpu_winner}: device time {gpu}")
    return "\n".join(lines)
