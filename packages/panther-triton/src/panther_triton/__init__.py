"""Panther's ``triton`` backend (distribution panther-randnla-triton): the sketched ops as Triton kernels.

Importing this package is cheap (no triton, no kernels, no CUDA): the names below load on first use.

* :func:`sketched_linear` — the op, differentiable and torch.compile-traceable.
* :func:`rfa_attention` — random-feature (FAVOR+) attention, causal or not, differentiable and traceable.
* :func:`sketched_linear_forward`, :func:`sketched_linear_backward` — the launchers alone (profiling).
* :func:`use_plans`, :class:`ForwardPlan`, :class:`BackwardPlan` — force a launch plan (benchmarks, tests).
* :class:`TritonBackend` — the backend object the ``panther.backends`` entry point names.
"""

import importlib as _importlib

__version__ = "0.1.0"

_LAZY = {
    "sketched_linear": "panther_triton.ops.sketched_linear.op",
    "sketched_linear_forward": "panther_triton.ops.sketched_linear.forward",
    "sketched_linear_backward": "panther_triton.ops.sketched_linear.backward",
    "use_plans": "panther_triton.ops.sketched_linear.plan",
    "ForwardPlan": "panther_triton.ops.sketched_linear.plan",
    "BackwardPlan": "panther_triton.ops.sketched_linear.plan",
    "rfa_attention": "panther_triton.ops.rfa_attention.op",
    "TritonBackend": "panther_triton.backend",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        value = getattr(_importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this hook
        return value
    raise AttributeError(f"module 'panther_triton' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
