"""Argument checks and random draws shared by the sketched layers.

Every draw comes from the layer's own ``torch.Generator``; the global RNG is never reseeded (with neither
``seed`` nor ``generator`` it is read once, to seed the layer's generator, so that ``torch.manual_seed``
makes layer construction reproducible as it does for ``torch.nn`` layers).
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from panther import backends
from panther._args import check_dtype, check_fits, check_int, check_int_pair, resolve_generator

_HALF = (torch.float16, torch.bfloat16)


def make_generator(seed, generator) -> Tuple[torch.Generator, Optional[int]]:
    """The generator a layer draws from, and its seed when the layer seeded it.

    As :func:`panther._args.resolve_generator`, except that with neither ``seed`` nor ``generator`` the
    seed is one draw of the global RNG, so that ``torch.manual_seed`` makes construction reproducible.
    """
    if seed is None and generator is None:  # on the CPU generator: also under a meta (or other) default device
        seed = int(torch.randint(0, 2**62, (), device="cpu").item())
    return resolve_generator(seed, generator)


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype to draw and multiply in: float64 stays, everything else is done in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def rademacher(shape: Sequence[int], k: int, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """Independent entries ``±1/sqrt(k)``, each sign fair, on the generator's device."""
    bits = torch.randint(0, 2, tuple(shape), generator=generator, device=generator.device)
    return (bits.to(dtype) * 2 - 1).mul_(1.0 / math.sqrt(k))


def uniform(shape: Sequence[int], bound: float, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """U(-bound, bound) on the generator's device."""
    out = torch.empty(tuple(shape), dtype=dtype, device=generator.device)
    return out.uniform_(-bound, bound, generator=generator)


def kaiming_weight(
    shape: Sequence[int], fan_in: int, generator: torch.Generator, dtype: torch.dtype
) -> torch.Tensor:
    """``nn.Linear``/``nn.Conv2d``'s weight init, kaiming_uniform(a=sqrt(5)): U(±1/sqrt(fan_in))."""
    return uniform(shape, 1.0 / math.sqrt(fan_in), generator, dtype)


def xavier_weight(shape: Sequence[int], generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """``nn.init.xavier_uniform_`` for a 2-D weight ``(fan_out, fan_in)``: U(±sqrt(6/(fan_in+fan_out)))."""
    fan_out, fan_in = shape
    return uniform(shape, math.sqrt(6.0 / (fan_in + fan_out)), generator, dtype)


def orthogonal_gaussian_features(
    num_heads: int, num_features: int, dim: int, generator: torch.Generator, dtype: torch.dtype
) -> torch.Tensor:
    """FAVOR+ directions ``(num_heads, num_features, dim)``: positive orthogonal random features.

    Rows come in blocks of ``dim`` mutually orthogonal unit rows (a Haar-random orthogonal matrix: QR of a
    Gaussian matrix with the signs of R's diagonal folded into Q), each row rescaled by the norm of an
    independent standard Gaussian vector (chi-distributed with ``dim`` degrees of freedom). Every row is
    then marginally N(0, I_dim), so the random-feature kernel stays unbiased, while orthogonality within a
    block lowers its variance (Choromanski et al., 2021, "Rethinking Attention with Performers").
    """
    blocks = -(-num_features // dim)
    draw = dict(generator=generator, dtype=torch.float64, device=generator.device)
    gauss = torch.randn(num_heads, blocks, dim, dim, **draw)
    q, r = torch.linalg.qr(gauss)  # columns of q are orthonormal
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
    rows = q.transpose(-1, -2).reshape(num_heads, blocks * dim, dim)[:, :num_features]
    norms = torch.randn(num_heads, num_features, dim, **draw).norm(dim=-1, keepdim=True)
    return (rows * norms).to(dtype)


def warn_if_no_savings(
    layer: str,
    num_terms: int,
    low_rank: int,
    fan_in: int,
    fan_out: int,
    in_name: str = "in",
    out_name: str = "out",
) -> None:
    """The parameter-count rule of the API page: ``2 L k (in + out) < in * out``, else a UserWarning."""
    sketched = 2 * num_terms * low_rank * (fan_in + fan_out)
    dense = fan_in * fan_out
    if sketched >= dense:
        warnings.warn(
            f"{layer} with num_terms={num_terms} and low_rank={low_rank} holds 2*num_terms*low_rank*(in+out) = "
            f"{sketched:,} values, not fewer than the {dense:,} of the dense weight it replaces "
            f"({in_name}={fan_in}, {out_name}={fan_out}); lower num_terms or low_rank to save memory",
            UserWarning,
            stacklevel=_user_stacklevel(),
        )


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _user_stacklevel() -> int:
    """The ``stacklevel`` that points a warning at the first caller outside panther.nn."""
    frame, level = sys._getframe(1), 1  # the frame that calls warnings.warn
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame, level = frame.f_back, level + 1
    return level


def check_input(name: str, x, ref: torch.Tensor, layer: str) -> None:
    """``x`` is a tensor with ``ref``'s dtype and device (the layer's parameters)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype != ref.dtype and not _autocasting(x):
        raise TypeError(
            f"{name} has dtype {x.dtype} but the {layer} parameters have dtype {ref.dtype}; convert one of "
            f"them (e.g. {name}.to({ref.dtype}) or layer.to({x.dtype}))"
        )
    if x.device != ref.device:
        raise RuntimeError(
            f"{name} is on {x.device} but the {layer} parameters are on {ref.device}; move one of them "
            f"(e.g. {name}.to({str(ref.device)!r}) or layer.to({str(x.device)!r}))"
        )


def _autocasting(x: torch.Tensor) -> bool:
    """Autocast is on for ``x``'s device: the ops cast the inputs and parameters to its dtype themselves."""
    dev = x.device.type
    return dev in ("cpu", "cuda", "xpu", "mps", "hpu", "xla") and torch.is_autocast_enabled(dev)


def check_weight(name: str, w, shape: Sequence[int]) -> None:
    """``w`` is a floating-point tensor of the given shape (a dense weight to initialise from)."""
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(w).__name__}")
    if tuple(w.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(w.shape)}")
    if not w.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {w.dtype}")


def check_not_lazy(name: str, module) -> None:
    """``module`` (a layer to convert) has materialised parameters: not a lazy module before its first call."""
    params = module.parameters(recurse=False) if isinstance(module, nn.Module) else ()
    if any(nn.parameter.is_lazy(p) for p in params):
        raise ValueError(
            f"{name} is a {type(module).__name__} whose parameters are not initialised yet (its sizes are only "
            f"known after a first forward pass); call it once on an input, or build it with explicit sizes"
        )


def factory_sizes(
    layer: str, device, dtype: Optional[torch.dtype], shapes: Sequence[Tuple[str, Sequence[int]]], **args
) -> None:
    """Refuse a layer whose tensors of ``shapes`` (in ``dtype``, default dtype if ``None``) cannot fit in memory.

    ``args`` are the constructor arguments that set the sizes, shown in the error.
    """
    itemsize = (dtype or torch.get_default_dtype()).itemsize
    needs = [(name, math.prod(shape) * itemsize) for name, shape in shapes]
    call = f"{layer}({', '.join(f'{k}={v}' for k, v in args.items())})"
    check_fits(call, needs, device)


def prepare_backends(layer: str, required: Optional[str] = None) -> None:
    """Discover the backends at construction, outside any traced region (torch.compile cannot run discovery).

    A layer pinned to a backend (``required``) refuses to be built where that backend cannot run.
    """
    backends.available_backends()
    if required is not None:
        backends.load_backend(required, source=f"required by {layer}")
