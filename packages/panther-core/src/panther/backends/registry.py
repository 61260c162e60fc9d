"""Backend discovery, selection and per-call dispatch.

Discovery: every entry point of the group ``panther.backends`` is loaded on first use, once, under a
lock. An entry point names a :class:`~panther.backends.base.Backend` subclass (or a factory returning an
instance). A plugin that fails to import or construct is recorded with its error and skipped; asking for
it by name later raises that error.

Selection, most specific first: :func:`use_backend` (context-local), :func:`set_backend` (process
default), the environment variable ``PANTHER_BACKEND``, then ``"auto"``: for each call, among the
available backends that accept the inputs, the one whose ``auto_priority`` for them is highest (by default
its ``priority``; a backend bids lower for inputs it runs slower than another would).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import threading
import traceback
from importlib import metadata
from typing import Dict, Iterator, List, Optional

import torch

from panther import _environ
from panther.backends import autotune
from panther.backends.base import Backend

ENTRY_POINT_GROUP = "panther.backends"
ENV_VAR = "PANTHER_BACKEND"
AUTO = "auto"


class BackendError(RuntimeError):
    """A backend was asked for that is unknown, failed to load, cannot run here or cannot take the inputs."""


@dataclasses.dataclass
class BackendInfo:
    """What discovery found under one entry-point name."""

    name: str
    entry_point: str
    distribution: Optional[str]
    version: Optional[str]
    backend: Optional[Backend] = None
    load_error: Optional[str] = None  # "ExcType: message" when the plugin failed to load
    load_traceback: Optional[str] = None

    @property
    def unavailable_reason(self) -> Optional[str]:
        if self.backend is None:
            return f"failed to load: {self.load_error}"
        return self.backend.unavailable_reason()

    @property
    def available(self) -> bool:
        return self.unavailable_reason is None


_lock = threading.Lock()
_registry: Optional[Dict[str, BackendInfo]] = None
_default: Optional[str] = None  # set_backend()
_context: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("panther_backend", default=None)


def _load(ep: metadata.EntryPoint) -> BackendInfo:
    dist = getattr(ep, "dist", None)
    info = BackendInfo(
        name=ep.name,
        entry_point=ep.value,
        distribution=dist.metadata["Name"] if dist is not None else None,
        version=dist.version if dist is not None else None,
    )
    try:
        obj = ep.load()
        backend = obj() if callable(obj) and not isinstance(obj, Backend) else obj
        if not isinstance(backend, Backend):
            raise TypeError(f"entry point {ep.value!r} gave {type(backend).__name__}, not a panther Backend")
        if backend.name != ep.name:
            raise ValueError(f"entry point is named {ep.name!r} but the backend calls itself {backend.name!r}")
        info.backend = backend
        info.version = info.version or backend.version
    except Exception as exc:  # a broken plugin must never break panther
        info.load_error = f"{type(exc).__name__}: {exc}"
        info.load_traceback = traceback.format_exc()
    return info


def _discover() -> Dict[str, BackendInfo]:
    global _registry
    if _registry is not None:
        return _registry
    with _lock:
        if _registry is None:
            found: Dict[str, BackendInfo] = {}
            for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
                if ep.name not in found:  # the first distribution to claim a name keeps it
                    found[ep.name] = _load(ep)
            _registry = found
            _make_selection_traceable()
    return _registry


def _make_selection_traceable() -> None:
    """Let torch.compile trace dispatch: compiled code bakes in the selection in force when traced.

    Done at discovery (first use) rather than at import, since it imports torch._dynamo (seconds).
    """
    global _selection
    if not getattr(_selection, "_panther_traceable", False):
        _selection = torch.compiler.assume_constant_result(_selection)
        _selection._panther_traceable = True


def refresh() -> None:
    """Forget discovered backends; the next use discovers them again (after installing a plugin)."""
    global _registry
    with _lock:
        _registry = None


# (the registry it was made from, its infos by descending priority then name, ((info, priority), ...))
_ranking: tuple = (None, (), ())


def _rank() -> tuple:
    global _ranking
    found = _discover()
    if _ranking[0] is not found:
        prio = {name: i.backend.priority if i.backend else -(10**9) for name, i in found.items()}
        ranked = tuple(sorted(found.values(), key=lambda i: (-prio[i.name], i.name)))
        _ranking = (found, ranked, tuple((i, prio[i.name]) for i in ranked))
    return _ranking


def _ranked() -> tuple:
    """backend_infos() as a tuple, sorted once per discovery (auto selection walks it on every call)."""
    return _rank()[1]


def backend_infos() -> List[BackendInfo]:
    """Every backend found, loaded or not, by descending priority then name."""
    return list(_ranked())


def available_backends() -> List[str]:
    """Names of the backends that can run on this machine, highest priority first."""
    return [i.name for i in backend_infos() if i.available]


def _summary() -> str:
    parts = []
    for i in backend_infos():
        reason = i.unavailable_reason
        parts.append(f"{i.name} (available)" if reason is None else f"{i.name} (unavailable: {reason})")
    return "; ".join(parts) if parts else "none"


def _install_hint(name: str) -> str:
    return (
        f"install it with `pip install -e packages/panther-{name}` from a checkout "
        f"(or the `[{name}]` extra of panther-randnla-nn)"
    )


def load_backend(name: str, *, source: str = "requested") -> Backend:
    """The backend object called ``name``; raises :class:`BackendError` if it is unknown or cannot run."""
    infos = _discover()
    if name not in infos:
        raise BackendError(
            f"Panther backend {name!r} ({source}) is not installed: {_install_hint(name)}. "
            f"Available backends: {', '.join(available_backends()) or 'none'}. Found: {_summary()}."
        )
    info = infos[name]
    reason = info.unavailable_reason
    if reason is not None:
        raise BackendError(
            f"Panther backend {name!r} ({source}) cannot run: {reason}. "
            f"Available backends: {', '.join(available_backends()) or 'none'}."
        )
    return info.backend


def check_backend_name(argument: str, name) -> str:
    """``name`` if it is a non-empty str (a backend name or ``"auto"``), else an error naming ``argument``."""
    if not isinstance(name, str):
        raise TypeError(
            f"{argument} must be a backend name (str) such as 'torch' or 'auto', got {name!r} ({type(name).__name__})"
        )
    if not name:
        raise ValueError(f"{argument} must be a backend name such as 'torch' or 'auto', got an empty string")
    return name


def _check_name(name: str) -> str:
    check_backend_name("name", name)
    if name != AUTO:
        load_backend(name)
    return name


def set_backend(name: Optional[str]) -> None:
    """Set the process-wide default backend.

    ``"auto"`` makes per-call selection the default (it overrides ``PANTHER_BACKEND``); ``None`` clears
    the default, so that ``PANTHER_BACKEND`` (or ``auto``) applies again. Raises :class:`BackendError` at
    once if ``name`` is unknown or cannot run here. Code compiled by ``torch.compile`` keeps the
    selection that was in force when it was traced.
    """
    global _default
    _default = None if name is None else _check_name(name)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager selecting a backend for the current thread / asyncio context only."""
    token = _context.set(_check_name(name))
    try:
        yield
    finally:
        _context.reset(token)


def get_backend() -> str:
    """The backend selection in force here: a backend name or ``"auto"``."""
    return _selection()[0]


def _selection():
    name = _context.get()
    if name is not None:
        return name, "selected by panther.use_backend"
    if _default is not None:
        return _default, "selected by panther.set_backend"
    env = _environ.get(ENV_VAR)
    if env:
        return env, f"from the environment variable {ENV_VAR}"
    return AUTO, "auto"


def select(op: str, *args, backend: Optional[str] = None, **kwargs) -> Backend:
    """The backend that will run ``op`` on these inputs under the current selection.

    An explicit name (``backend=`` or the selection in force) is honoured or refused loudly; ``auto``
    takes, among the available backends that accept the inputs, the one of highest
    :meth:`~panther.backends.base.Backend.auto_priority` for them.
    """
    if backend is not None:
        name, source = check_backend_name("backend", backend), "requested by this layer"
    else:
        name, source = _selection()
    if name != AUTO:
        be = load_backend(name, source=source)
        reasons = be.reasons_cannot_run(op, *args, **kwargs)
        if reasons:
            raise BackendError(f"Panther backend {name!r} ({source}) cannot run {op} on these inputs: {'; '.join(reasons)}.")
        return be
    # Where measuring applies (autotune.wanted: a GPU call, measuring on), every backend that accepts the
    # inputs competes and autotune.choose picks the measured (or cached) fastest.
    # Elsewhere, backends in descending static priority; each one that accepts the inputs bids its
    # auto_priority for them (at most its static priority), so the walk stops at the first backend whose
    # static priority cannot beat the best bid so far. Ties go to the earlier (higher static priority,
    # then name). The static priorities are those read once per discovery (the ranking's).
    ranking = _rank()[2]
    tuning = autotune.wanted(op, args, kwargs)
    if tuning:
        known = autotune.remembered(op, args, kwargs)
        if known is not None:
            return known
    rejected, accepted, best, best_bid = [], [], None, None
    for info, priority in ranking:
        if not tuning and best is not None and priority <= best_bid:
            break
        unavailable = info.unavailable_reason
        if unavailable is not None:
            rejected.append(f"{info.name}: {unavailable}")
            continue
        be = info.backend
        reasons = be.reasons_cannot_run(op, *args, **kwargs)
        if reasons:
            rejected.append(f"{info.name}: {'; '.join(reasons)}")
            continue
        bid = be.auto_priority(op, *args, **kwargs)
        if bid is None:  # the backend keeps these inputs out of auto (explicit selection only)
            rejected.append(f"{info.name}: not offered to auto for these inputs (select it by name to run it)")
            continue
        if not tuning and bid >= priority:
            return be  # nothing ranked below can bid more
        accepted.append((be, bid))
        if best is None or bid > best_bid:
            best, best_bid = be, bid
    if tuning and accepted:
        return autotune.choose(op, accepted, args, kwargs)
    if best is not None:
        return best
    raise BackendError(f"No Panther backend can run {op} on these inputs. " + " | ".join(rejected))


def dispatch(op: str, *args, backend: Optional[str] = None, **kwargs):
    """Run ``op`` on the backend :func:`select` picks."""
    return getattr(select(op, *args, backend=backend, **kwargs), op)(*args, **kwargs)
