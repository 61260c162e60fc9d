"""The one launch path of every kernel: :func:`launch`.

Inside a library op (``layout=None``: torch.compile traces it, or the op was called directly) a kernel
goes through ``torch.library.wrap_triton``, so that Inductor sees it; under Triton's CPU interpreter,
which wrap_triton cannot trace, it is launched as usual.

Eager calls pass ``layout``, a key of the caller's that determines every argument of the launch but the
tensors' addresses (:func:`layout_key` of the op's inputs and options). A launch through
``triton.autotune`` costs Python on every call (the autotuner's key, then ``JITFunction.run`` binding and
specialising every argument to find the compiled kernel), which is most of a step where the GPU work
takes microseconds. So the first eager launch of a kernel with a given layout goes through Triton
(tuning and compiling), and the compiled kernel, its constexpr arguments and its grid are kept under
(kernel, layout); later launches hand the arguments straight to the compiled kernel. Under the
interpreter, where nothing is kept, each launch checks instead that its layout implies every argument
Triton specialises on (an assertion error names the kernel otherwise), so the CPU tests check what the
callers' keys leave out. Kernels used this way take no config pre-hooks.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Dict

import torch

from panther.backends.toolkit import BoundedCache
from panther_triton._runtime import interpreting

INTERPRETED = interpreting()  # decided once, like the kernels themselves
_PLAIN = frozenset((int, float, bool, type(None)))


def _wrap_triton(kernel):
    from torch.library import wrap_triton

    return wrap_triton(kernel)


# how a kernel is launched inside a library op (tools/compile_check.py swaps in a compile-only hook)
traced: Callable = (lambda kernel: kernel) if INTERPRETED else _wrap_triton

_compiled = BoundedCache()  # (kernel, layout) -> (compiled kernel, constexpr arguments, grid)
_checked = BoundedCache()  # interpreter: (kernel, layout) -> the specialisation key it implied
_lock = threading.Lock()  # the autotuner's best_config is per kernel, read right after its launch
_enabled = True


def layout_key(*items) -> tuple:
    """A launch layout: every tensor's shape, strides, dtype, device and address modulo 16 (Triton
    specialises pointers on 16-byte alignment), and any other item (an option, a plan) itself."""
    return tuple(
        (t.shape, t.stride(), t.dtype, t.device, t.data_ptr() & 15) if isinstance(t, torch.Tensor) else t
        for t in items
    )


def _specialisation(args: tuple, constexprs: Dict[str, Any]) -> tuple:
    # what Triton's compiled kernel depends on: every plain argument's value, every tensor's dtype and
    # alignment, the device, the constexprs
    device = next((a.device for a in args if type(a) not in _PLAIN), None)
    return (
        device,
        tuple(a if type(a) in _PLAIN else (a.dtype, a.data_ptr() & 15) for a in args),
        tuple(constexprs.items()),
    )


def launch(kernel, grid: Callable[[dict], tuple], args: tuple, constexprs: Dict[str, Any], layout=None) -> None:
    """``kernel[grid](*args, **constexprs)`` (a triton.autotune'd JIT function; tensors and scalars
    positional, constexprs by name), inside a library op when ``layout`` is None, else eager."""
    if layout is None:
        traced(kernel)[grid](*args, **constexprs)
        return
    key = (kernel, layout)
    if INTERPRETED:
        seen = _checked.get(key)
        full = _specialisation(args, constexprs)
        if seen is None:
            _checked.put(key, full)
        elif seen != full:
            raise AssertionError(f"launch layout of {_name(kernel)} misses an argument: {layout!r} implied {seen!r}, "
                                 f"now {full!r}")
        kernel[grid](*args, **constexprs)
        return
    hit = _compiled.get(key) if _enabled else None
    if hit is not None:
        compiled, tail, g = hit
        compiled[g](*args, *tail)
        return
    with _lock:
        compiled = kernel[grid](*args, **constexprs)
        if _enabled:
            _remember(key, kernel, compiled, grid, args, constexprs)


def op_factory(kernels: Dict[str, list]) -> Callable:
    """The ``factory`` of :func:`panther.backends.toolkit.kernel_op` for an op whose implementations launch
    ``kernels`` ({library op name: [its kernels]}): ``torch.library.custom_op`` under the interpreter
    (wrap_triton cannot trace interpreted kernels), else ``torch.library.triton_op``, telling torch's
    compile caches which kernels each library op launches (torch finds them by reading the op's source,
    which names them only through :func:`launch`)."""
    if INTERPRETED:
        return torch.library.custom_op

    def triton_op(name, fn, **kwargs):
        from torch._library import triton as library_triton

        op = torch.library.triton_op(name, fn, **kwargs)
        known = getattr(library_triton, "triton_ops_to_kernels", None)
        if isinstance(known, dict):
            known[name] = kernels[name]
        return op

    return triton_op


def _name(kernel) -> str:
    fn = kernel
    while not hasattr(fn, "arg_names"):  # Autotuner and Heuristics wrap the JITFunction
        fn = fn.fn
    return getattr(fn, "__name__", repr(kernel))


def _remember(key, kernel, compiled, grid, args, constexprs) -> None:
    """Keep the compiled kernel of this launch, unless it is not what this Triton's launches return
    (then every launch takes Triton's own path: correct, with more host time)."""
    if compiled is None or not hasattr(compiled, "__getitem__"):
        return
    fn = kernel
    while not hasattr(fn, "arg_names"):
        fn = fn.fn
    meta = dict(constexprs)
    config = getattr(kernel, "best_config", None)
    if config is not None:
        meta.update(config.kwargs)
    names = list(fn.arg_names)[len(args):]
    if any(n not in meta for n in names):
        return
    g = tuple(grid(meta)) + (1, 1)
    _compiled.put(key, (compiled, tuple(meta[n] for n in names), g[:3]))


def use_cache(enabled: bool) -> None:
    """Turn the kept compiled launches on or off (off: every eager launch goes through Triton's own
    path), for measuring what they save (tools/host_overhead.py)."""
    global _enabled
    _enabled = bool(enabled)
    _compiled.clear()


def cached_launches() -> int:
    """How many compiled launches are kept (tests check that the cache is in use on a GPU)."""
    return len(_compiled)
