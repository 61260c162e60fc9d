"""Panther's ``cuda`` backend (distribution panther-randnla-cuda): the sketched ops as hand-written CUDA kernels.

The kernels are ``.cu`` files shipped beside each op (``ops/<op>/*.cu``), compiled on first use by CuPy
through NVRTC and cached on disk by CuPy; they run on torch's current stream, on memory torch allocated.
Importing this package is cheap (no CuPy, no kernels, no CUDA): the names below load on first use.

* :func:`sketched_linear` — the op, differentiable and torch.compile-traceable.
* :func:`sketched_conv2d` — the op, differentiable and torch.compile-traceable.
* :class:`CudaBackend` — the backend object the ``panther.backends`` entry point names.
* :class:`KernelCompileError` — a kernel failed to compile (names the kernel, options and compiler log).
"""

import importlib as _importlib

__version__ = "0.1.0"

_LAZY = {
    "sketched_linear": "panther_cuda.ops.sketched_linear.op",
    "sketched_conv2d": "panther_cuda.ops.sketched_conv2d.op",
    "CudaBackend": "panther_cuda.backend",
    "KernelCompileError": "panther_cuda._nvrtc",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        value = getattr(_importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this hook
        return value
    raise AttributeError(f"module 'panther_cuda' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
