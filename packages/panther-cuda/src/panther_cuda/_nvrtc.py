"""Compiling and launching the ``.cu`` kernels: CuPy's NVRTC, torch's streams and memory.

* :class:`Kernel` — one ``__global__`` function (a template instance, named by its C++ name expression)
  of a ``.cu`` file beside an op. It compiles on first launch on each device (CuPy keeps the binary in
  its on-disk cache, ``$CUPY_CACHE_DIR`` or ``~/.cupy/kernel_cache``, so a new process loads it without
  compiling) and launches on torch's current stream of the current device.
* Arguments are explicit: a tensor (or ``None``) passes its data pointer, so the kernel reads torch's
  memory in place (zero copy; nothing is allocated by CuPy, so CUDA-graph capture works); integers and
  floats must be NumPy scalars of the width the kernel declares (:func:`i32`, :func:`i64`, :func:`f32`),
  because a plain Python int would silently become a 64-bit ``long long``.
* :class:`KernelCompileError` — a kernel that does not compile names itself, the options and the
  compiler's log.

CuPy is imported by the first launch, never at module import.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from panther.backends.toolkit import BoundedCache

PACKAGE_DIR = Path(__file__).resolve().parent
INCLUDE_DIR = PACKAGE_DIR / "include"  # #include "panther_cuda/common.cuh"

# NVRTC options of every kernel; -std=c++17 for if constexpr in templates over dtypes.
BASE_OPTIONS: Tuple[str, ...] = ("-std=c++17", "--use_fast_math", "-DNDEBUG")


class KernelCompileError(RuntimeError):
    """A kernel failed to compile; the message names the kernel, its source, the options and NVRTC's log."""


def i32(v) -> np.int32:
    """A kernel argument declared ``int``."""
    return np.int32(v)


def i64(v) -> np.int64:
    """A kernel argument declared ``long long`` (offsets and strides that may pass 2**31)."""
    return np.int64(v)


def f32(v) -> np.float32:
    """A kernel argument declared ``float``."""
    return np.float32(v)


_NULL = np.uint64(0)


def _argument(a):
    if isinstance(a, torch.Tensor):
        return np.uint64(a.data_ptr())
    if a is None:
        return _NULL
    if isinstance(a, np.generic):
        return a
    raise TypeError(
        f"kernel argument {a!r} of type {type(a).__name__}: pass a tensor, None, or a NumPy scalar of the width "
        "the kernel declares (i32, i64, f32)"
    )


def cuda_include_dirs() -> Tuple[str, ...]:
    """Where NVRTC finds the CUDA headers (cuda_fp16.h, cuda_bf16.h): CuPy's CUDA path, then CUDA_PATH,
    CUDA_HOME, /usr/local/cuda; only folders that exist."""
    roots = []
    try:
        import cupy

        roots.append(cupy.cuda.get_cuda_path())
    except Exception:  # no CuPy, or it found no toolkit: the environment's folders below
        pass
    roots += [os.environ.get("CUDA_PATH"), os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    found = []
    for root in roots:
        if root and os.path.isdir(os.path.join(root, "include")) and os.path.join(root, "include") not in found:
            found.append(os.path.join(root, "include"))
    return tuple(found)


def headers_digest() -> str:
    """A digest of every header shipped with the package (``*.cuh``, under include/ and beside the ops).

    CuPy's disk cache keys a binary by the source text and the options, not by the files the source
    includes; the digest, passed as a macro, makes a kernel whose header changed compile afresh.
    """
    h = hashlib.sha256()
    for path in sorted(PACKAGE_DIR.rglob("*.cuh")):
        h.update(path.relative_to(PACKAGE_DIR).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


_include_options: Optional[Tuple[str, ...]] = None


def compile_options(
    arch: Optional[str] = None, extra: Sequence[str] = (), source_dir: Optional[Path] = None
) -> Tuple[str, ...]:
    """NVRTC options of a kernel: the base options; the folder of its ``.cu`` file where given (NVRTC
    compiles a string, so quoted includes of files beside the source resolve only through it, as nvcc
    resolves them by itself); the package's include folder and the CUDA headers; the headers' digest
    (:func:`headers_digest`); ``-arch=<arch>`` where one is asked for (e.g. ``sm_90a`` for wgmma/TMA;
    else CuPy targets the device's own architecture), with ``-DPANTHER_REQUIRE_SM90A`` for ``sm_90a`` (the
    sources fail to compile without its features, as when CuPy's own ``-arch`` wins); and ``extra``."""
    global _include_options
    if _include_options is None:
        _include_options = (
            *(f"-I{d}" for d in (str(INCLUDE_DIR), *cuda_include_dirs())),
            f"-DPANTHER_HEADERS_DIGEST=0x{headers_digest()}ULL",
        )
    source_options = (f"-I{source_dir}",) if source_dir is not None else ()
    arch_options = (f"-arch={arch}",) if arch else ()
    if arch and arch.endswith("a"):  # architecture-specific features (sm_90a: wgmma): the sources check they got them
        arch_options += (f"-DPANTHER_REQUIRE_SM{arch.rsplit('_', 1)[1].upper()}",)
    return (*BASE_OPTIONS, *source_options, *_include_options, *arch_options, *extra)


_lock = threading.Lock()
_streams: BoundedCache = BoundedCache(64)
_thread = threading.local()  # .devices: those whose primary context this thread has made current


def make_context_current(device_index: int) -> None:
    """Make the device's primary CUDA context current in the calling thread (cudaSetDevice), once per thread and
    device. A kernel launch through CuPy does this itself; a backward whose first call is cuBLAS or cuDNN, on
    autograd's device thread, would otherwise find no context, and torch warns ("Attempting to run cuBLAS, but
    there was no current CUDA context!") before it sets one."""
    devices = getattr(_thread, "devices", None)
    if devices is None:
        devices = _thread.devices = set()
    if device_index not in devices:
        import cupy

        cupy.cuda.runtime.setDevice(device_index)
        devices.add(device_index)


class _StreamHandle:
    """A CUDA stream's address in the CUDA stream protocol (``__cuda_stream__``: version 0, the address)."""

    __slots__ = ("ptr",)

    def __init__(self, ptr: int):
        self.ptr = ptr

    def __cuda_stream__(self):
        return 0, self.ptr


def _external_stream(device_index: int):
    """Torch's current stream on the device as a CuPy stream (wrapped once per stream): ``Stream.from_external``
    where CuPy has it (14 and later), else ``ExternalStream``, which CuPy 14 deprecates."""
    import cupy

    ptr = torch.cuda.current_stream(device_index).cuda_stream
    s = _streams.get((device_index, ptr))
    if s is None:
        from_external = getattr(getattr(cupy.cuda, "Stream", None), "from_external", None)
        wrapped = from_external(_StreamHandle(ptr)) if from_external is not None else cupy.cuda.ExternalStream(
            ptr, device_index)
        s = _streams.put((device_index, ptr), wrapped)
    return s


class Kernel:
    """One kernel of a ``.cu`` file: ``Kernel("ops/sketched_linear/forward.cu", "fwd<__nv_bfloat16, 128>")``.

    Args:
        source: the ``.cu`` file, relative to the package folder.
        name: the C++ name expression of the ``__global__`` function (a template instance with its
            arguments, or a plain ``extern "C"`` name).
        arch: ``-arch`` to compile for (``"sm_90a"`` for Hopper-only instructions); ``None``: the device's.
        options: extra NVRTC options (``-D`` macros).

    Calling it, ``kernel(grid, block, *args, shared_mem=0)``, launches on torch's current stream of the
    current CUDA device; dynamic shared memory above 48 KiB is opted into on first use per device.
    """

    def __init__(self, source: str, name: str, *, arch: Optional[str] = None, options: Sequence[str] = ()):
        self.source, self.name, self.arch, self.extra = source, name, arch, tuple(options)
        self._functions: Dict[int, Tuple[object, object]] = {}  # device -> (RawKernel, cupy Function)
        self._shared: Dict[int, int] = {}  # device -> dynamic shared memory opted into

    def __repr__(self) -> str:
        return f"Kernel({self.source!r}, {self.name!r}" + (f", arch={self.arch!r})" if self.arch else ")")

    def _compile(self, device_index: int):
        import cupy

        path = PACKAGE_DIR / self.source
        options = compile_options(self.arch, self.extra, path.parent)
        code = path.read_text()
        try:
            with cupy.cuda.Device(device_index):
                module = cupy.RawModule(code=code, options=options, name_expressions=(self.name,))
                raw = module.get_function(self.name)
                function = raw.kernel  # compiles (or loads from CuPy's disk cache) for this device
        except Exception as exc:
            log = getattr(exc, "get_message", None)
            message = log() if callable(log) else str(exc)
            raise KernelCompileError(
                f"CUDA kernel {self.name} ({self.source}) failed to compile with NVRTC options {' '.join(options)}:\n"
                f"{message}"
            ) from exc
        return raw, function

    def function(self, device_index: int):
        """The compiled function on this device (compiled on first use)."""
        entry = self._functions.get(device_index)
        if entry is None:
            with _lock:
                entry = self._functions.get(device_index)
                if entry is None:
                    entry = self._functions[device_index] = self._compile(device_index)
        return entry

    def __call__(self, grid, block, *args, shared_mem: int = 0) -> None:
        device_index = torch.cuda.current_device()
        raw, function = self.function(device_index)
        if shared_mem > 48 * 1024 and self._shared.get(device_index, 0) < shared_mem:
            import cupy

            with cupy.cuda.Device(device_index):
                raw.max_dynamic_shared_size_bytes = shared_mem
            self._shared[device_index] = shared_mem
        function(tuple(grid), tuple(block), tuple(_argument(a) for a in args), shared_mem=shared_mem,
                 stream=_external_stream(device_index))


__all__ = [
    "Kernel", "KernelCompileError", "i32", "i64", "f32", "compile_options", "cuda_include_dirs", "headers_digest",
    "make_context_current",
]
