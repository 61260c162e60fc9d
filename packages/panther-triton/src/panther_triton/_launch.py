"""Eager kernel launches without Triton's per-call Python.

A launch through ``triton.autotune`` costs Python on every call: the autotuner builds a dict of the
arguments and a key from them, then ``JITFunction.run`` binds and specialises every argument, hashes
the specialisation and looks the compiled kernel up. At the sizes where a sketched layer's GPU work
takes microseconds that is most of a step (tools/host_overhead.py measures it). An eager launch
therefore goes through a :class:`Launcher`: the first call with a given key runs the autotuned kernel
the normal way (tuning and compiling it), and the launcher keeps the compiled kernel, the tuned config and
the constexpr arguments; later calls with that key hand the arguments straight to the compiled kernel.

The key holds everything the compiled kernel depends on: the value of every non-tensor argument (sizes,
strides, scales: Triton specialises integers on their value, and the autotune key is made of them),
every tensor's dtype and its address modulo 16 (Triton specialises pointers on 16-byte alignment), the
device, and the constexpr values. The grid is computed for every launch from the caller's grid function
and the tuned config. So a cached launch is the launch Triton would have made, given what the launcher
assumes of its callers and kernels: each argument position gets one Python type on every call (the key
compares values, and ``1 == 1.0 == True``), the launches run with the tensors' device current
(``_runtime.device_guard``), and the kernels use no config pre-hooks and no ``TRITON_DEBUG`` switches
(which a cached launch skips).

An op that launches the same kernels call after call can go one step further: :meth:`Launcher.launch_as`
takes a key of the caller's, made from the op's inputs (their shapes, strides, dtype, device, 16-byte
alignment, and the op's options), that determines every argument but the tensors' addresses. Its first
call launches as above and keeps the compiled kernel, the constexpr arguments and the grid under that
key; later calls skip the per-argument key and the grid function too. Under Triton's CPU interpreter,
where nothing is cached, each such call checks that its key still implies the full key above (an
assertion error names the kernel otherwise), so the CPU test suite checks what the callers' keys leave out.

Kernels traced by torch.compile go through ``torch.library.wrap_triton`` instead (Inductor launches
them); under Triton's CPU interpreter there is no compiled kernel, and the launcher calls the kernel
as usual.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Dict, Tuple

import torch

from panther_triton._runtime import interpreting, remember

_PLAIN = frozenset((int, float, bool, type(None)))  # arguments that are their own key; the others are tensors


def _key(args: Tuple[Any, ...], constexprs: Dict[str, Any]) -> tuple:
    # a tensor contributes its dtype and its address modulo 16 (Triton specialises pointers on 16-byte
    # alignment); the device of the launch is the first tensor's (the callers put all on one device)
    device = next((a for a in args if type(a) not in _PLAIN), None)
    return (
        -1 if device is None else device.get_device(),
        tuple([a if type(a) in _PLAIN else (a.dtype, a.data_ptr() & 15) for a in args]),
        tuple(constexprs.items()),
    )


class Launcher:
    """``launcher[grid](*args, **constexprs)`` launches ``kernel`` (a triton.autotune'd JIT function)
    like ``kernel[grid](*args, **constexprs)``, from a cache of compiled kernels after the first call.

    ``grid`` is a function of the meta-parameters (the autotuned config and the constexprs), as for
    Triton. Tensor arguments must be passed positionally; constexprs by name.
    """

    def __init__(self, kernel):
        self.kernel = kernel
        fn = kernel
        while not hasattr(fn, "arg_names"):  # Autotuner and Heuristics wrap the JITFunction
            fn = fn.fn
        self.arg_names = list(fn.arg_names)
        self.name = getattr(fn, "__name__", repr(kernel))
        self.cache: Dict[tuple, Tuple[Any, tuple, dict]] = {}  # key -> (compiled kernel, constexpr args, meta)
        self.by_caller: Dict[Any, Tuple[Any, tuple, tuple]] = {}  # caller's key -> (compiled, constexpr args, grid)
        self.checked: Dict[Any, tuple] = {}  # interpreter: caller's key -> the full key it implied
        self.fast = _enabled and not interpreting()  # decided once, like the kernels themselves
        self._lock = threading.Lock()  # the autotuner's best_config is per kernel, read right after its launch

    def __getitem__(self, grid: Callable[[dict], tuple]):
        return lambda *args, **constexprs: self.launch(grid, args, constexprs)

    def launch(self, grid, args: tuple, constexprs: Dict[str, Any]) -> None:
        if not self.fast:
            self.kernel[grid](*args, **constexprs)
            return
        key = _key(args, constexprs)
        hit = self.cache.get(key)
        if hit is not None:
            compiled, tail, meta = hit
            g = grid(meta)  # from the caller's grid function each time: it may depend on more than the key
            try:
                compiled[(g[0], g[1] if len(g) > 1 else 1, g[2] if len(g) > 2 else 1)](*args, *tail)
                return
            except TypeError as exc:  # a Triton whose compiled kernels take other arguments: its argument
                self._give_up(exc)  # parsing refuses them before anything is launched; use Triton's path
                self.kernel[grid](*args, **constexprs)
                return
        with self._lock:
            compiled = self.kernel[grid](*args, **constexprs)
            self._remember(key, compiled, grid, args, constexprs)

    def launch_as(self, caller_key, grid, args: tuple, constexprs: Dict[str, Any]) -> None:
        """:meth:`launch` for a caller whose ``caller_key`` determines every argument but the tensors'
        addresses (and their alignment modulo 16, which it must include): the grid and the compiled
        kernel are looked up by that key alone."""
        if not self.fast:
            if interpreting():
                full = _key(args, constexprs)
                seen = self.checked.setdefault(caller_key, full)
                if seen != full:
                    raise AssertionError(
                        f"launch key of {self.name} misses an argument: "
                        f"{caller_key!r} implied {seen!r}, now {full!r}"
                    )
            self.kernel[grid](*args, **constexprs)
            return
        hit = self.by_caller.get(caller_key)
        if hit is not None:
            compiled, tail, g = hit
            try:
                compiled[g](*args, *tail)
                return
            except TypeError as exc:  # as in launch()
                self._give_up(exc)
                self.kernel[grid](*args, **constexprs)
                return
        self.launch(grid, args, constexprs)
        entry = self.cache.get(_key(args, constexprs))
        if entry is not None:
            compiled, tail, meta = entry
            g = tuple(grid(meta))
            remember(self.by_caller, caller_key, (compiled, tail, (g + (1, 1))[:3]))

    def _give_up(self, exc: Exception) -> None:
        import warnings

        self.fast = False
        self.cache.clear()
        self.by_caller.clear()
        warnings.warn(
            f"panther_triton: cached launches of {self.name} failed ({exc}); "
            "launching through triton.autotune from now on (correct, with more host overhead per call)",
            RuntimeWarning,
            stacklevel=3,
        )

    def _remember(self, key, compiled, grid, args, constexprs) -> None:
        """Keep the compiled kernel of this launch, or nothing where its shape is not the expected one
        (a Triton whose launch returns something else keeps working, only without the cache)."""
        if compiled is None or not hasattr(compiled, "__getitem__") or not hasattr(compiled, "run"):
            return
        config = getattr(self.kernel, "best_config", None)
        meta = dict(constexprs)
        if config is not None:
            meta.update(config.kwargs)
        names = self.arg_names[len(args):]
        if any(n not in meta for n in names):
            return
        remember(self.cache, key, (compiled, tuple(meta[n] for n in names), meta))


_launchers: Dict[int, Launcher] = {}
_enabled = True


def use_cache(enabled: bool) -> None:
    """Turn the cached launches on or off (off: every launch goes through Triton's own path), for
    the launchers made so far and later ones. For measuring what the cache saves (tools/host_overhead.py)."""
    global _enabled
    _enabled = bool(enabled)
    for launcher in _launchers.values():
        launcher.fast = _enabled and not interpreting()
        launcher.cache.clear()
        launcher.by_caller.clear()


def eager(kernel) -> Launcher:
    """The launcher of ``kernel`` (one per kernel, made on first use)."""
    launcher = _launchers.get(id(kernel))
    if launcher is None:
        launcher = _launchers[id(kernel)] = Launcher(kernel)
    return launcher
