"""Random draws for sketch operators, always from an explicit ``torch.Generator`` (never the global RNG)."""

from __future__ import annotations

import operator
from typing import Optional, Tuple

import torch


def resolve_generator(seed, generator) -> Tuple[torch.Generator, Optional[int]]:
    """Return ``(generator, seed)`` to draw an operator from.

    - ``seed`` given: a fresh CPU generator seeded with it; returns the seed.
    - ``generator`` given: that generator, used (and advanced) in place; returns ``None`` as the seed.
    - neither: a fresh CPU generator seeded from the OS entropy source; returns that seed, so that the
      operator can be reproduced. The global RNG is neither read nor reseeded in any case.
    """
    if seed is not None and generator is not None:
        raise ValueError(
            f"give at most one of seed and generator, got seed={seed!r} and generator={generator!r}"
        )
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        return generator, None
    gen = torch.Generator(device="cpu")
    if seed is None:
        return gen, gen.seed()  # nondeterministic, from std::random_device
    if isinstance(seed, bool):
        raise TypeError(f"seed must be an integer, got {seed!r} (bool)")
    try:
        seed = operator.index(seed)
    except TypeError:
        raise TypeError(f"seed must be an integer, got {seed!r} ({type(seed).__name__})") from None
    if not -(2**63) <= seed < 2**64:
        raise ValueError(f"seed must fit in 64 bits (-2**63 <= seed < 2**64), got {seed}")
    gen.manual_seed(seed)
    return gen, seed


def random_signs(n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` independent uniform signs ``±1`` (int64, on the generator's device)."""
    bits = torch.randint(0, 2, (n,), generator=generator, device=generator.device)
    return bits * 2 - 1


def sample_distinct_rows(num_cols: int, num_rows: int, nnz: int, generator: torch.Generator) -> torch.Tensor:
    """For each of ``num_cols`` columns, a uniform random subset of ``nnz`` distinct rows of ``range(num_rows)``.

    Returns an int64 tensor of shape ``(num_cols, nnz)``. Vectorised Floyd sampling: O(num_cols * nnz**2)
    work and no O(num_cols * num_rows) buffer, so it stays cheap for large sketches.
    """
    device = generator.device
    rows = torch.empty(num_cols, nnz, dtype=torch.long, device=device)
    for i, j in enumerate(range(num_rows - nnz, num_rows)):
        t = torch.randint(0, j + 1, (num_cols,), generator=generator, device=device)
        if i:
            # Floyd: if t was already picked for this column, pick j (never picked before) instead.
            taken = (rows[:, :i] == t.unsqueeze(1)).any(dim=1)
            t = torch.where(taken, torch.full_like(t, j), t)
        rows[:, i] = t
    return rows
