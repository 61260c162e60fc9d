"""Backend interface, discovery and selection (see :mod:`panther.backends.registry`)."""

from panther.backends.base import OPS, Backend, tensor_reasons
from panther.backends.registry import (
    AUTO,
    ENTRY_POINT_GROUP,
    ENV_VAR,
    BackendError,
    BackendInfo,
    available_backends,
    backend_infos,
    dispatch,
    get_backend,
    load_backend,
    refresh,
    select,
    set_backend,
    use_backend,
)

__all__ = [
    "OPS", "Backend", "tensor_reasons", "AUTO", "ENTRY_POINT_GROUP", "ENV_VAR", "BackendError",
    "BackendInfo", "available_backends", "backend_infos", "dispatch", "get_backend", "load_backend",
    "refresh", "select", "set_backend", "use_backend",
]

# Measured auto dispatch (see panther.backends.autotune).
from panther.backends.autotune import autotune_enabled, clear_dispatch_cache, set_autotune, use_autotune  # noqa: E402

__all__ += ["autotune_enabled", "clear_dispatch_cache", "set_autotune", "use_autotune"]
