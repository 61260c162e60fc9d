"""Panther: sketched neural-network layers for PyTorch (randomized numerical linear algebra).

``import panther as pr`` is cheap: backends are discovered on first use, and the submodules
``pr.nn``, ``pr.sketch``, ``pr.ops`` and ``pr.testing`` are imported when first accessed.
"""

from pkgutil import extend_path

# panther.nn ships in another distribution (panther-randnla-nn) that has no panther/__init__.py.
__path__ = extend_path(__path__, __name__)

import importlib as _importlib

from panther.backends import (
    Backend,
    BackendError,
    available_backends,
    get_backend,
    set_backend,
    use_backend,
)

__version__ = "0.1.0"

__all__ = [
    "Backend",
    "BackendError",
    "available_backends",
    "get_backend",
    "set_backend",
    "use_backend",
    "__version__",
]

_LAZY_SUBMODULES = ("nn", "sketch", "ops", "testing")


def __getattr__(name):
    if name in _LAZY_SUBMODULES:
        return _importlib.import_module(f"panther.{name}")
    raise AttributeError(f"module 'panther' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY_SUBMODULES))
