"""Drop and grow: pure functions on index/value/statistic tensors (thesis §7.3.1, §7.3.2).

Positions are flat row-major int64 indices into a weight. "Excluded" positions are the active entries that are
kept (or all active entries), passed sorted; growth never returns them, so indices stay unique.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ..kernels import topk_outer_product


def is_member(sorted_set: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """Boolean mask: which entries of ``query`` occur in the sorted 1-D tensor ``sorted_set``."""
    if sorted_set.numel() == 0:
        return torch.zeros(query.shape, dtype=torch.bool, device=query.device)
    pos = torch.searchsorted(sorted_set, query).clamp(max=sorted_set.numel() - 1)
    return sorted_set[pos] == query


def drop_smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """Slots of the ``k`` entries with the smallest ``|value|`` (changed least), smallest first; ties by slot."""
    k = min(k, values.numel())
    order = torch.sort(values.detach().abs().float(), stable=True).indices
    return order[:k]


def grow_by_accumulated_gradient(
    candidates: torch.Tensor, mean_grad: torch.Tensor, excluded_sorted: torch.Tensor, k: int
) -> torch.Tensor:
    """SpIEL-AG growth: indices into ``candidates`` of the (at most) ``k`` non-excluded candidates with the largest
    ``|mean_grad|``, best first."""
    allowed = ~is_member(excluded_sorted, candidates.long())
    scores = mean_grad.abs().float().masked_fill(~allowed, -1.0)
    k = min(k, int(allowed.sum()))
    if k == 0:
        return torch.zeros(0, dtype=torch.long, device=candidates.device)
    return torch.topk(scores, k, sorted=True).indices


def grow_by_momentum_approximation(
    row_stats: torch.Tensor, col_stats: torch.Tensor, excluded_sorted: torch.Tensor, k: int, backend: str = "auto"
) -> torch.Tensor:
    """SpIEL-MA growth: the ``k`` non-excluded positions with the largest ``row_stats[o] * col_stats[i]`` (the rank
    of ``(r[o] c[i]) ** 0.25``), without forming the ``rows x cols`` score matrix."""
    available = row_stats.numel() * col_stats.numel() - excluded_sorted.numel()
    return topk_outer_product(row_stats.float(), col_stats.float(), excluded_sorted, min(k, available), backend)


def grow_random(numel: int, excluded_sorted: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """``k`` distinct positions in ``[0, numel)`` outside ``excluded_sorted``, uniformly at random (CPU, int64)."""
    excluded_sorted = excluded_sorted.cpu()
    available = numel - excluded_sorted.numel()
    k = min(k, available)
    if k <= 0:
        return torch.zeros(0, dtype=torch.long)
    if 4 * k >= available or numel <= (1 << 22):
        # dense enough that rejection sampling would loop: permute the free positions
        free = torch.ones(numel, dtype=torch.bool)
        free[excluded_sorted] = False
        pool = free.nonzero().squeeze(1)
        return pool[torch.randperm(pool.numel(), generator=generator)[:k]]
    chosen = torch.zeros(0, dtype=torch.long)
    while chosen.numel() < k:
        draw = torch.randint(numel, (2 * (k - chosen.numel()) + 16,), generator=generator)
        draw = draw[~is_member(excluded_sorted, draw)]
        merged = torch.cat([chosen, draw])
        uniq, first = _first_occurrence(merged)
        chosen = merged[first]
    return chosen[:k]


def _first_occurrence(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unique values of ``x`` and the positions of their first occurrences, in order of occurrence."""
    uniq, inverse = torch.unique(x, return_inverse=True)
    first = torch.full((uniq.numel(),), x.numel(), dtype=torch.long)
    first.scatter_reduce_(0, inverse, torch.arange(x.numel()), reduce="amin")
    return uniq, first.sort().values


def replace_entries(
    indices: torch.Tensor,
    values: torch.Tensor,
    k: int,
    grow: Callable[[torch.Tensor, int], torch.Tensor],
    positions_of: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    exclude_dropped: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plan one drop-and-grow of ``k`` entries; returns ``(slots, new_positions, chosen)``.

    Drops the ``k`` smallest ``|values|`` (``values`` may be any per-entry drop score, e.g. the change since the last
    reselection), then asks ``grow(excluded_sorted, k)`` for up to ``k`` growth choices (positions, or handles that
    ``positions_of`` maps to positions) among all positions but the kept ones, or, with ``exclude_dropped``, among
    all positions not currently active (the SpIEL reference's MA rule). A dropped position that is grown again keeps
    its slot, value and optimizer state (the reference's AG rule); each remaining new position takes a freed slot,
    smallest ``|value|`` first, so no more entries are dropped than grown. ``chosen`` are the growth choices that
    received a slot (aligned with ``new_positions``).
    """
    device = indices.device
    empty = torch.zeros(0, dtype=torch.long, device=device)
    if k <= 0 or indices.numel() == 0:
        return empty, empty, empty
    drop = drop_smallest(values, k)
    keep = torch.ones(indices.numel(), dtype=torch.bool, device=device)
    keep[drop] = False
    excluded = torch.sort((indices if exclude_dropped else indices[keep]).long()).values
    choices = grow(excluded, k)
    grown = (positions_of(choices) if positions_of is not None else choices).to(device=device, dtype=torch.long)
    dropped_positions = indices[drop].long()
    regrown = is_member(torch.sort(dropped_positions).values, grown)
    new_positions = grown[~regrown]
    freed = drop[~is_member(torch.sort(grown).values, dropped_positions)]
    slots = freed[: new_positions.numel()]
    return slots, new_positions, choices.to(device)[~regrown.to(choices.device)]
