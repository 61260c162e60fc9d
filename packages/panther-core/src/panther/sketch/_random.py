"""Random draws for sketch operators, always from an explicit ``torch.Generator`` (never the global RNG)."""

from __future__ import annotations

import torch


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
