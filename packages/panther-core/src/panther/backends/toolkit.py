"""What every accelerator backend needs, written once: capability reasons, device facts, small caches,
and the registration of a forward/backward pair as torch.library ops.

* :class:`Requirements` — the device, dtypes and compute capability a backend needs, as data; it gives
  the backend's :meth:`~panther.backends.Backend.unavailable_reason` and per-call
  :meth:`~panther.backends.Backend.reasons_cannot_run` (xformers-style lists of reasons). Per-op limits
  are data too (``op_dtypes``, ``op_reasons``), consulted by the one generic check.
* :func:`cuda_capabilities`, :func:`multiprocessors`, :func:`shared_memory_per_block`,
  :func:`device_guard` — facts about the CUDA devices, read once.
* :class:`BoundedCache`, :func:`size_hint`, :func:`cdiv`, :func:`next_power_of_2` — host-side helpers.
* :func:`kernel_op` — turns a forward and a backward implementation into a differentiable op that is
  torch.compile-ready by construction (library ops with fake implementations and registered autograd)
  and cheap in eager mode (a ``torch.autograd.Function`` calling the same implementations).

Importing this module imports no accelerator library and initialises no device.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
import types
import typing
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = [
    "Requirements", "cuda_capabilities", "multiprocessors", "shared_memory_per_block", "device_guard",
    "BoundedCache", "size_hint", "cdiv", "next_power_of_2", "env_flag", "KernelOp", "kernel_op",
]


# ---------------------------------------------------------------------------------------------------
# Device facts


_capabilities: Optional[Tuple[Tuple[int, int], ...]] = None


def cuda_capabilities() -> Tuple[Tuple[int, int], ...]:
    """Compute capability of every visible CUDA device (empty without CUDA); the first call inits CUDA.

    Kept in a module global, not functools.lru_cache: torch.compile traces the checks that call this,
    and it warns on (and looks through) lru_cache wrappers."""
    global _capabilities
    if _capabilities is None:
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        _capabilities = tuple(torch.cuda.get_device_capability(i) for i in range(n))
    return _capabilities


# torch.compile calls it at trace time and keeps the result as a constant (tracing torch.cuda.device_count
# graph-breaks): what torch.compiler.assume_constant_result sets, without importing torch._dynamo here
cuda_capabilities._dynamo_marked_constant = True


_properties: Dict[int, object] = {}


def _props(device_index: Optional[int]):
    index = torch.cuda.current_device() if device_index is None else device_index
    p = _properties.get(index)
    if p is None:
        p = _properties[index] = torch.cuda.get_device_properties(index)
    return p


def multiprocessors(device_index: Optional[int] = None) -> int:
    """Streaming multiprocessors of a CUDA device (default: the current one)."""
    return _props(device_index).multi_processor_count


def shared_memory_per_block(device_index: Optional[int] = None) -> int:
    """Bytes of shared memory one block may use on a CUDA device, with the opt-in (default: current device)."""
    p = _props(device_index)
    return getattr(p, "shared_memory_per_block_optin", 0) or p.shared_memory_per_block


def device_guard(t: Tensor):
    """Make ``t``'s CUDA device the current one for the launches that follow (kernels launch on the
    current device): a no-op where it already is, or on the CPU."""
    if t.is_cuda and t.get_device() != torch.cuda.current_device():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def env_flag(name: str) -> bool:
    """True when environment variable ``name`` is set to 1, true, yes, on or y (any case)."""
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on", "y")


# ---------------------------------------------------------------------------------------------------
# Capability reasons


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@dataclasses.dataclass(frozen=True)
class Requirements:
    """What an accelerator backend needs, and the reasons it gives when that is missing.

    Args:
        backend: the backend's name, for messages.
        dtypes: floating dtypes every op accepts.
        mask_dtypes: other dtypes accepted (e.g. ``torch.bool`` for masks); they need not match ``dtypes``.
        min_capability: lowest CUDA compute capability, e.g. ``(8, 0)``; ``None`` for no bound.
        device_type: the device the kernels run on (``"cuda"``).
        interpreter: a function telling whether the kernels run in a CPU interpreter now (then they take
            CPU tensors only and need no GPU), or ``None`` where there is none.
        interpreter_hint: how to turn the interpreter on (appended to "no GPU" reasons), or ``""``.
        dtype_advice: extra words for a refused dtype, e.g. ``{torch.float64: "use backend 'torch'"}``.
        op_dtypes: per-op dtype sets that replace ``dtypes`` for that op.
        op_reasons: per-op functions ``f(*args, **kwargs) -> list of reasons`` for limits of one op's
            arguments (shapes, sizes); called after the generic checks, with the op's arguments.
    """

    backend: str
    dtypes: Tuple[torch.dtype, ...]
    mask_dtypes: Tuple[torch.dtype, ...] = ()
    min_capability: Optional[Tuple[int, int]] = (8, 0)
    device_type: str = "cuda"
    interpreter: Optional[Callable[[], bool]] = None
    interpreter_hint: str = ""
    dtype_advice: Mapping[torch.dtype, str] = dataclasses.field(default_factory=dict)
    op_dtypes: Mapping[str, Tuple[torch.dtype, ...]] = dataclasses.field(default_factory=dict)
    op_reasons: Mapping[str, Callable[..., List[str]]] = dataclasses.field(default_factory=dict)

    def _interpreting(self) -> bool:
        return self.interpreter is not None and self.interpreter()

    def _hint(self) -> str:
        return f", or {self.interpreter_hint}" if self.interpreter_hint else ""

    def _need(self) -> str:
        cap = self.min_capability
        return f"a CUDA GPU of compute capability >= {cap[0]}.{cap[1]}" if cap else "a CUDA GPU"

    def unavailable_reason(self) -> Optional[str]:
        """``None`` when the kernels can run on this machine, else why not and how to fix it."""
        if self._interpreting():
            return None
        caps = cuda_capabilities()
        if not caps:
            return (
                f"no CUDA GPU is visible (torch.cuda.is_available() is False); run on {self._need()} with a "
                f"CUDA build of torch{self._hint()}"
            )
        if self.min_capability is not None and max(caps) < self.min_capability:
            found = ", ".join(f"{a}.{b}" for a, b in caps)
            need = ".".join(map(str, self.min_capability))
            return (
                f"the visible CUDA GPUs have compute capability {found}; backend {self.backend!r} needs >= {need}; "
                "use a newer GPU or backend 'torch'"
            )
        return None

    def reasons(self, op: str, *args, **kwargs) -> List[str]:
        """Reasons the kernels cannot take these arguments of ``op`` (empty list: they can), sorted."""
        tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, Tensor)]
        devices = {t.device for t in tensors}
        dtypes = {t.dtype for t in tensors if t.dtype not in self.mask_dtypes}
        reasons = set()
        interp = self._interpreting()
        for dev in devices:
            if interp and dev.type != "cpu":
                reasons.add(
                    f"the interpreter runs the kernels on CPU tensors only, got a tensor on {dev} "
                    "(turn the interpreter off to run on the GPU)"
                )
            elif not interp and dev.type != self.device_type:
                reasons.add(
                    f"tensors on {dev} are not supported: backend {self.backend!r} runs on {self.device_type.upper()} "
                    f"tensors (move them with .{self.device_type}(), use backend 'torch'{self._hint()})"
                )
            elif not interp and self.min_capability is not None:
                caps = cuda_capabilities()
                index = dev.index if dev.index is not None else torch.cuda.current_device()
                if index < len(caps) and caps[index] < self.min_capability:
                    cap, need = caps[index], self.min_capability
                    reasons.add(
                        f"{dev} has compute capability {cap[0]}.{cap[1]}; backend {self.backend!r} needs "
                        f">= {need[0]}.{need[1]}"
                    )
        supported = self.op_dtypes.get(op, self.dtypes)
        for dt in dtypes:
            if dt not in supported:
                names = ", ".join(map(_dtype_name, supported))
                advice = self.dtype_advice.get(dt)
                reasons.add(f"dtype {_dtype_name(dt)} is not supported (supported: {names})"
                            + (f"; {advice}" if advice else ""))
        if len(dtypes) > 1:
            reasons.add("the tensors must share one dtype, got " + ", ".join(sorted(map(_dtype_name, dtypes))))
        if len(devices) > 1:
            reasons.add("the tensors must be on one device, got " + ", ".join(sorted(map(str, devices))))
        extra = self.op_reasons.get(op)
        if extra is not None:
            reasons.update(extra(*args, **kwargs))
        return sorted(reasons)


# ---------------------------------------------------------------------------------------------------
# Host-side helpers


class BoundedCache(dict):
    """A dict that starts over once it holds ``max_entries`` entries (many distinct batch sizes or
    layouts), rather than growing without bound. Look up with ``get``; store with :meth:`put`."""

    def __init__(self, max_entries: int = 4096):
        super().__init__()
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.max_entries = max_entries

    def put(self, key, value):
        """``self[key] = value`` (after clearing the cache if it is full); returns ``value``."""
        if len(self) >= self.max_entries and key not in self:
            self.clear()
        self[key] = value
        return value


def cdiv(a, b):
    """Ceiling division of sizes (plain ints or torch.compile's symbolic sizes)."""
    return -(-a // b)


def size_hint(n) -> int:
    """A plain int for a size. Under torch.compile with dynamic shapes a size may be symbolic: take its
    example value without adding a guard (for choices that are correct for every size, such as launch
    plans and autotune keys), so a new batch size does not recompile."""
    if type(n) is int:
        return n
    hint = getattr(getattr(n, "node", None), "hint", None)
    return int(hint) if hint is not None else int(n)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, int(n) - 1).bit_length()


# ---------------------------------------------------------------------------------------------------
# Ops from a forward and a backward implementation


def _with_signature(fn, params: Sequence[Tuple[object, str]], n_outputs: int):
    """``fn`` (taking ``*args``) with the signature torch.library infers the op's schema from."""
    fn.__signature__ = inspect.Signature(
        [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=t) for t, name in params],
        return_annotation=typing.Tuple[tuple([Tensor] * n_outputs)],
    )
    return fn


def _argument_type(annotation):
    """The annotation as torch.library reads it: Tensor, Optional[Tensor], bool, int or float."""
    if annotation in (Tensor, bool, int, float):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and set(typing.get_args(annotation)) == {
        Tensor, type(None)
    }:
        return Optional[Tensor]
    raise TypeError(f"kernel_op: unsupported argument annotation {annotation!r} (Tensor, Optional[Tensor], "
                    "bool, int, float)")


def _storages(tensors) -> Optional[set]:
    """The data pointers of the storages of ``tensors`` that hold memory, or None where one cannot be read (a
    tensor traced by torch.compile)."""
    out = set()
    for t in tensors:
        if isinstance(t, Tensor):
            try:
                storage = t.untyped_storage()
                if storage.nbytes():
                    out.add(storage.data_ptr())
            except (RuntimeError, NotImplementedError):
                return None
    return out


class KernelOp:
    """A differentiable op made by :func:`kernel_op`; calling it runs the op (see there)."""

    def __init__(self, name, forward, backward, allocate, outputs, factory, grad_formats=None):
        if name.count("::") != 1:
            raise ValueError(f"kernel_op: name must be 'namespace::op', got {name!r}")
        hints = typing.get_type_hints(forward)
        params = list(inspect.signature(forward).parameters.values())[1:]  # after `out`
        params = [p for p in params if p.kind is p.POSITIONAL_OR_KEYWORD]
        self.names = [p.name for p in params]
        types = [_argument_type(hints[n]) for n in self.names]
        self.is_tensor = [t in (Tensor, Optional[Tensor]) for t in types]
        self.tensor_index = [i for i, is_t in enumerate(self.is_tensor) if is_t]
        self.n_args = len(params)
        self.outputs = tuple(outputs)
        self.forward_impl, self.backward_impl, self.allocate = forward, backward, allocate
        grad_formats = dict(grad_formats or {})
        unknown = sorted(set(grad_formats) - {self.names[i] for i in self.tensor_index})
        if unknown:
            raise ValueError(f"kernel_op: grad_formats names {unknown}, which are not tensor arguments of "
                             f"{name} ({', '.join(self.names[i] for i in self.tensor_index)})")
        # per tensor argument: the function giving its gradient's memory format, or None (contiguous)
        self.grad_formats = [grad_formats.get(self.names[i]) for i in self.tensor_index]
        ns, base = name.split("::")
        self.name = name
        fwd_params = list(zip(types, self.names))
        bwd_params = [
            (Tensor, f"grad_{self.outputs[0]}"),
            *(fwd_params[i] for i in self.tensor_index),
            *((Tensor, r) for r in self.outputs[1:]),
            *((bool, f"need_{self.names[i]}") for i in self.tensor_index),
            *(p for p, is_t in zip(fwd_params, self.is_tensor) if not is_t),
        ]

        def fwd_body(*args):
            return self._fwd_body(*args)

        def bwd_body(*args):
            return self._bwd_body(*args)

        fwd_body = _with_signature(fwd_body, fwd_params, len(self.outputs))
        bwd_body = _with_signature(bwd_body, bwd_params, len(self.tensor_index))
        self.fwd_op = factory(f"{ns}::{base}_fwd", fwd_body, mutates_args=())
        self.bwd_op = factory(f"{ns}::{base}_bwd", bwd_body, mutates_args=())
        self.fwd_op.register_fake(allocate)
        self.bwd_op.register_fake(self._bwd_allocate)
        # the registered operators, as torch.compile and autograd see them (torch.ops.namespace.op_fwd.default)
        self._fwd = getattr(getattr(torch.ops, ns), f"{base}_fwd").default
        self._bwd = getattr(getattr(torch.ops, ns), f"{base}_bwd").default
        self.fwd_op.register_autograd(self._op_backward, setup_context=self._op_setup_context)
        self.bwd_op.register_autograd(self._refuse_second_order)
        self.function = self._make_function()
        self.__name__ = base
        self.__doc__ = forward.__doc__

    # -- the library ops' bodies (run eagerly when the op is called directly, or traced by torch.compile)

    def _fwd_body(self, *args):
        out = self.allocate(*args)
        self.forward_impl(out, *args, in_op=True)
        return out

    def _split_bwd(self, args):
        n_t, n_r = len(self.tensor_index), len(self.outputs) - 1
        grad, rest = args[0], args[1:]
        tensors, rest = rest[:n_t], rest[n_t:]
        residuals, rest = rest[:n_r], rest[n_r:]
        needs, options = rest[:n_t], rest[n_t:]
        inputs, it_t, it_o = [], iter(tensors), iter(options)
        for is_t in self.is_tensor:
            inputs.append(next(it_t) if is_t else next(it_o))
        return grad, tuple(inputs), tuple(residuals), tuple(needs)

    def _bwd_allocate(self, *args):
        _, inputs, _, needs = self._split_bwd(args)
        return self._grads_allocate(inputs, needs)

    def _grads_allocate(self, inputs, needs) -> Tuple[Tensor, ...]:
        # one rule for real and fake: a wanted gradient is a tensor of its input's shape, contiguous or in the
        # memory format grad_formats gives for that input; an unwanted one is an empty tensor (an op returns
        # tensors, not None)
        like = next(inputs[i] for i in self.tensor_index if inputs[i] is not None)
        return tuple(
            torch.empty(inputs[i].shape, dtype=inputs[i].dtype, device=inputs[i].device,
                        memory_format=torch.contiguous_format if fmt is None else fmt(inputs[i]))
            if need else like.new_empty((0,))
            for i, need, fmt in zip(self.tensor_index, needs, self.grad_formats)
        )

    def _bwd_body(self, *args):
        grad, inputs, residuals, needs = self._split_bwd(args)
        grads = self._grads_allocate(inputs, needs)
        given = self.backward_impl(grads, grad, inputs, residuals, needs, in_op=True)
        return self._adopt(grads, given, needs, (grad, *inputs, *residuals))

    def _adopt(self, grads, given, needs, sources) -> Tuple[Tensor, ...]:
        # the gradients a backward handed back instead of writing them: each takes its allocated tensor's place
        # where it has that tensor's shape, strides, dtype and device (what the fake implementation promised)
        # and shares no memory with the backward's arguments or another gradient (an op's outputs may not alias
        # its inputs or each other); any other is copied into the allocated tensor, as is every one while the
        # body is traced (triton_op under torch.compile), where storages cannot be compared
        if given is None:
            return grads
        names = [self.names[i] for i in self.tensor_index]
        if isinstance(given, Tensor) or len(given) != len(grads):
            got = "a tensor" if isinstance(given, Tensor) else f"{len(given)} gradients"
            raise ValueError(f"{self.name}: the backward returned {got}, expected None or a sequence of "
                             f"{len(grads)} ({', '.join(names)})")
        taken = _storages(sources)
        out = []
        for name, need, allocated, g in zip(names, needs, grads, given):
            if g is None:
                out.append(allocated)
                continue
            if not need:
                raise ValueError(f"{self.name}: the backward returned a gradient of {name}, which was not asked "
                                 "for (expected None)")
            if not isinstance(g, Tensor) or g.shape != allocated.shape:
                raise ValueError(f"{self.name}: the backward returned for {name} "
                                 f"{tuple(g.shape) if isinstance(g, Tensor) else type(g).__name__}, expected a "
                                 f"tensor of shape {tuple(allocated.shape)}")
            same = (g.stride(), g.dtype, g.device) == (allocated.stride(), allocated.dtype, allocated.device)
            own = _storages((g,))
            if same and taken is not None and own and not own & taken:
                taken |= own
                out.append(g)
            else:
                out.append(allocated.copy_(g))
        return tuple(out)

    # -- autograd of the library ops

    def _op_setup_context(self, ctx, inputs, output):
        ctx.inputs = tuple(None if is_t else a for a, is_t in zip(inputs, self.is_tensor))
        ctx.save_for_backward(*(inputs[i] for i in self.tensor_index), *output[1:])
        ctx.present = tuple(inputs[i] is not None for i in self.tensor_index)

    def _op_backward(self, ctx, grad, *_):
        saved = ctx.saved_tensors
        n_t = len(self.tensor_index)
        tensors, residuals = saved[:n_t], saved[n_t:]
        needs = tuple(bool(ctx.needs_input_grad[i]) and p for i, p in zip(self.tensor_index, ctx.present))
        options = [a for a, is_t in zip(ctx.inputs, self.is_tensor) if not is_t]
        grads = self._bwd(grad, *tensors, *residuals, *needs, *options)
        result = [None] * self.n_args
        for i, g, need in zip(self.tensor_index, grads, needs):
            result[i] = g if need else None
        return tuple(result)

    def _refuse_second_order(self, ctx, *grads):
        raise RuntimeError(
            f"{self.name}: second-order gradients (backward of the backward) are not supported; "
            "use backend 'torch' for double backward"
        )

    # -- the eager path: the same implementations in a torch.autograd.Function

    def _make_function(self):
        op = self

        class Function(torch.autograd.Function):
            @staticmethod
            def forward(ctx, *args):
                out = op.allocate(*args)
                op.forward_impl(out, *args, in_op=False)
                ctx.inputs = tuple(None if is_t else a for a, is_t in zip(args, op.is_tensor))
                ctx.present = tuple(args[i] is not None for i in op.tensor_index)
                ctx.save_for_backward(*(args[i] for i in op.tensor_index), *out[1:])
                return out[0]

            @staticmethod
            @once_differentiable
            def backward(ctx, grad):
                saved = ctx.saved_tensors
                n_t = len(op.tensor_index)
                tensors, residuals = saved[:n_t], saved[n_t:]
                it = iter(tensors)
                inputs = tuple(next(it) if is_t else a for a, is_t in zip(ctx.inputs, op.is_tensor))
                needs = tuple(bool(ctx.needs_input_grad[i]) and p for i, p in zip(op.tensor_index, ctx.present))
                grads = op._grads_allocate(inputs, needs)
                with device_guard(grad):
                    given = op.backward_impl(grads, grad, inputs, tuple(residuals), needs, in_op=False)
                    grads = op._adopt(grads, given, needs, (grad, *tensors, *residuals))
                result = [None] * op.n_args
                for i, g, need in zip(op.tensor_index, grads, needs):
                    result[i] = g if need else None
                return tuple(result)

        Function.__name__ = Function.__qualname__ = f"{self.name.split('::')[1]}_function"
        return Function

    # -- the public entry

    def __call__(self, *args):
        if len(args) != self.n_args:
            raise TypeError(f"{self.name} takes {self.n_args} arguments ({', '.join(self.names)}), got {len(args)}")
        if torch.compiler.is_compiling():
            return self._fwd(*args)[0]
        first = args[self.tensor_index[0]]
        if torch.is_grad_enabled() and any(
            args[i] is not None and args[i].requires_grad for i in self.tensor_index
        ):
            with device_guard(first):
                return self.function.apply(*args)
        out = self.allocate(*args)
        with device_guard(first):
            self.forward_impl(out, *args, in_op=False)
        return out[0]


def kernel_op(
    name: str,
    *,
    forward: Callable,
    backward: Callable,
    allocate: Callable[..., Sequence[Tensor]],
    outputs: Sequence[str] = ("out",),
    factory: Optional[Callable] = None,
    grad_formats: Optional[Mapping[str, Callable[[Tensor], torch.memory_format]]] = None,
) -> KernelOp:
    """A differentiable op from a forward and a backward implementation, torch.compile-ready by construction.

    Args:
        name: ``"namespace::op"``; the library ops ``namespace::op_fwd`` and ``namespace::op_bwd`` are made.
        forward: ``forward(out, *args, in_op)`` writes the op's outputs into ``out``, the tuple that
            ``allocate(*args)`` returned. Its annotations after ``out`` give the op's arguments and their
            schema: ``Tensor``, ``Optional[Tensor]`` (differentiable), ``bool``, ``int``, ``float``
            (options, not differentiated). ``in_op`` is True inside the library op (where a Triton
            kernel must go through ``torch.library.wrap_triton``), False on the eager path.
        backward: ``backward(grads, grad, inputs, residuals, needs, in_op)`` writes into ``grads`` (one
            tensor per tensor argument: a tensor of its shape where ``needs`` is True, contiguous unless
            ``grad_formats`` says otherwise, an empty tensor elsewhere) the gradients given ``grad`` (of the
            first output), the op's arguments ``inputs``, the forward's other outputs ``residuals``, and
            ``needs``, and returns None. Or it returns a sequence of one entry per tensor argument: a
            gradient it computed in a tensor of its own (a library call's result), to be used in place of
            the allocated one, which it then need not write; None where it wrote the allocated one or no
            gradient was asked for. A returned gradient must have its argument's shape; it is used as it is
            where its strides, dtype and device are the allocated tensor's and it shares no memory with the
            backward's arguments or another returned gradient, and copied into the allocated tensor
            otherwise (always while torch.compile traces the body of a ``triton_op``).
        allocate: ``allocate(*args)`` returns the forward's outputs, allocated but not written. It is the
            forward ops' fake implementation too, so the shapes and strides seen by torch.compile are the
            real ones.
        outputs: names of the forward's outputs; the first is the op's result, the others are residuals
            saved for the backward.
        factory: ``torch.library.custom_op`` (default) or ``torch.library.triton_op`` (then Inductor sees
            the Triton kernels that the implementations launch through ``wrap_triton``).
        grad_formats: ``{argument name: fn}``: that tensor argument's gradient is allocated in the memory
            format ``fn(argument)`` returns (e.g. torch.channels_last for a channels_last input, the layout
            autograd keeps for such a leaf's ``.grad``, which it would otherwise copy into); the others
            are contiguous.

    Returns:
        A :class:`KernelOp`: calling it with the op's arguments runs the library op under
        ``torch.compiler.is_compiling()``, else the same implementations eagerly in a
        ``torch.autograd.Function`` (cheaper per call than the library op's dispatch), or, where no
        argument requires a gradient, the forward alone. Gradients of the backward (double backward)
        raise an error on either path. The library ops are ``.fwd_op`` and ``.bwd_op``.
    """
    return KernelOp(name, forward, backward, allocate, outputs, factory or torch.library.custom_op, grad_formats)
