"""Argument checks and generator handling shared by panther.sketch and panther.nn.

Each error names the argument, its value and what was expected.
"""

from __future__ import annotations

import operator
from typing import Optional, Tuple

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
