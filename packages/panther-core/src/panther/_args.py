"""Argument checks and generator handling shared by panther.sketch and panther.nn.

Each error names the argument, its value and what was expected.
"""

from __future__ import annotations

import operator
import os
from typing import Optional, Sequence, Tuple

import torch


def check_int(name: str, value, minimum: int = 1) -> int:
    """``value`` as an int, refusing bools, non-integers and values below ``minimum``."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r} (bool)")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def resolve_generator(seed, generator) -> Tuple[torch.Generator, Optional[int]]:
    """Return ``(generator, seed)`` to draw from; the global RNG is never reseeded.

    - ``seed`` given: a fresh CPU generator seeded with it; returns the seed.
    - ``generator`` given: that generator, used (and advanced) in place; returns ``None`` as the seed.
    - neither: a fresh CPU generator seeded from the OS entropy source; returns that seed, so that the
      draws can be reproduced.
    """
    if seed is not None and generator is not None:
        raise ValueError(f"give at most one of seed and generator, got seed={seed!r} and generator={generator!r}")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        return generator, None
    gen = torch.Generator(device="cpu")
    if seed is None:
        return gen, gen.seed()  # nondeterministic, from std::random_device
    seed = check_int("seed", seed, minimum=-(2**63))
    if seed >= 2**64:
        raise ValueError(f"seed must fit in 64 bits (-2**63 <= seed < 2**64), got {seed}")
    gen.manual_seed(seed)
    return gen, seed


def check_int_pair(name: str, value, minimum: int) -> Tuple[int, int]:
    """An int or a pair of ints (any ``operator.index``-able, not bool), each at least ``minimum``, as a pair."""
    items = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(items) == 2:
        try:
            if not any(isinstance(e, bool) for e in items):
                pair = (operator.index(items[0]), operator.index(items[1]))
                if min(pair) >= minimum:
                    return pair
        except TypeError:
            pass
    raise ValueError(f"{name} must be an int or a pair of ints >= {minimum}, got {value!r}")


FLOATING_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_dtype(name: str, dtype) -> Optional[torch.dtype]:
    """``dtype`` if it is ``None`` or one of :data:`FLOATING_DTYPES` (what every op computes in), else raise."""
    if dtype is None:
        return None
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"{name} must be a torch.dtype or None, got {dtype!r} ({type(dtype).__name__})")
    if dtype not in FLOATING_DTYPES:
        names = ", ".join(str(d) for d in FLOATING_DTYPES)
        raise TypeError(f"{name} must be a real floating-point dtype ({names}) or None, got {dtype}")
    return dtype


def format_bytes(n: int) -> str:
    """``n`` bytes in decimal units, e.g. ``3.7 TB``."""
    for unit, size in (("EB", 10**18), ("PB", 10**15), ("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def device_memory(device: torch.device) -> Optional[int]:
    """Total memory in bytes of ``device`` (physical RAM for the CPU), or ``None`` where unknown (meta, ...)."""
    if device.type == "cpu":
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):  # not a POSIX system
            return None
    if device.type == "cuda" and torch.cuda.is_available():
        index = torch.cuda.current_device() if device.index is None else device.index
        return torch.cuda.get_device_properties(index).total_memory
    return None


def check_fits(call: str, needs: Sequence[Tuple[str, int]], device) -> None:
    """Refuse, before allocating anything, tensors that together exceed the total memory of ``device``.

    ``call`` shows the constructor call with the arguments that set the sizes (e.g.
    ``"SKLinear(in_features=8, out_features=8, num_terms=1000000000, low_rank=1)"``); ``needs`` lists
    ``(tensor name, bytes)``. This replaces a raw allocator error after seconds of work (or an int64
    overflow of the element count) by one that says what the arguments ask for.
    """
    device = torch.get_default_device() if device is None else torch.device(device)
    total = sum(b for _, b in needs)
    limit = device_memory(device)
    if total >= 2**63 or (limit is not None and total > limit):
        name, most = max(needs, key=lambda nb: nb[1])
        room = f"the {format_bytes(limit)} of memory of {device}" if limit is not None else "a tensor can hold"
        raise ValueError(
            f"{call} would need {format_bytes(total)} for its tensors ({format_bytes(most)} for {name} "
            f"alone), more than {room}"
        )
