"""Drop and grow: pure functions on index/value/statistic tensors (thesis §7.3.1, §7.3.2).

Positions are flat row-major int64 indices into a weight. "Excluded" positions are the active entries that are
kept (or all active entries), passed sorted; growth never returns them, so indices stay unique.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from .. import _device
from ..kernels import topk_outer_product_many
from ..kernels.sddmm import mm_float32

# is_member answers queries of non-negative positions through a bool table of this many entries at most, when the
# query has at least _MEMBER_TABLE_MIN_QUERY entries and the table is at most _MEMBER_TABLE_SPAN times the set and
# query together (one write per set entry and one read per query beat sorting and binary searches there); large
# queries otherwise are sorted before their binary searches.
_MEMBER_TABLE_LIMIT = 1 << 28
_MEMBER_TABLE_MIN_QUERY = 1 << 10
_MEMBER_TABLE_SPAN = 64
_MEMBER_LARGE_QUERY = 1 << 16


def is_member(sorted_set: torch.Tensor, query: torch.Tensor, assume_sorted: bool = True) -> torch.Tensor:
    """Boolean mask: which entries of ``query`` occur in the sorted 1-D tensor ``sorted_set``.

    Queries of non-negative integers (positions) of at least ``_MEMBER_TABLE_MIN_QUERY`` entries are looked up in a
    bool table indexed by value when the largest value is below ``_MEMBER_TABLE_LIMIT`` and at most
    ``_MEMBER_TABLE_SPAN`` times the set and query sizes together (one write per set entry, one read per query, no
    binary searches); other queries by binary search, sorted first when large (the searches then walk the set
    forwards).
    With ``assume_sorted=False`` the set may be in any order: it is sorted only if the binary search needs it. The
    table's size comes from the values' range, read on the host, so off the CPU (where that read would wait for the
    device) the binary search is used.
    """
    if sorted_set.numel() == 0 or query.numel() == 0:
        return torch.zeros(query.shape, dtype=torch.bool, device=query.device)
    table_sized = query.numel() >= _MEMBER_TABLE_MIN_QUERY and not query.is_floating_point()
    if table_sized and _device.host_reads_are_free(query.device):
        if assume_sorted:
            set_low, set_high = int(sorted_set[0]), int(sorted_set[-1])
        else:
            set_low, set_high = (int(v) for v in sorted_set.aminmax())
        query_low, query_high = (int(v) for v in query.aminmax())
        low, high = min(query_low, set_low), max(query_high, set_high)
        span = _MEMBER_TABLE_SPAN * (sorted_set.numel() + query.numel())
        if low >= 0 and high < min(_MEMBER_TABLE_LIMIT, span):
            table = torch.zeros(high + 1, dtype=torch.bool, device=query.device)
            table.index_fill_(0, sorted_set.long(), True)
            return table.index_select(0, query.reshape(-1).long()).view(query.shape)
    large = query.numel() >= _MEMBER_LARGE_QUERY and not query.is_floating_point()
    if not assume_sorted:
        sorted_set = torch.sort(sorted_set).values
    if large:
        flat = query.reshape(-1)
        ordered, perm = torch.sort(flat)
        pos = torch.searchsorted(sorted_set, ordered).clamp(max=sorted_set.numel() - 1)
        hit = torch.empty_like(flat, dtype=torch.bool)
        hit[perm] = sorted_set[pos] == ordered
        return hit.view(query.shape)
    pos = torch.searchsorted(sorted_set, query).clamp(max=sorted_set.numel() - 1)
    return sorted_set[pos] == query


def drop_smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """Slots of the ``k`` entries with the smallest ``|value|`` (changed least), smallest first; ties by slot, NaN
    last: what a stable sort of the magnitudes gives.

    Each entry gets one unique int64 key, its float32 magnitude's bit pattern (which orders non-negative floats; every
    NaN alike, above infinity) above its slot, and the ``k`` smallest keys are taken: nothing is read back on the
    host.
    """
    n = values.numel()
    k = min(k, n)
    if k <= 0:
        return torch.zeros(0, dtype=torch.long, device=values.device)
    if n > _SLOT_LIMIT:  # slots would not fit under the magnitude in one key
        return torch.sort(values.detach().abs().float(), stable=True).indices[:k]
    magnitude = values.detach().float().abs().reshape(-1)
    key = magnitude.view(torch.int32).long().masked_fill_(torch.isnan(magnitude), _NAN_BITS)
    key.bitwise_left_shift_(32).bitwise_or_(torch.arange(n, device=values.device))
    return torch.topk(key, k, largest=False, sorted=True).values.bitwise_and_(_SLOT_LIMIT - 1)


# drop_smallest's keys: slots below 2**32, and one bit pattern for every NaN (above +inf's 0x7F800000).
_SLOT_LIMIT = 1 << 32
_NAN_BITS = 0x7FC00000


# AG candidates: the dense weight gradient is formed this many numbers (or 4 k, if more) at a time.
CANDIDATE_BLOCK_ELEMENTS = 1 << 20
# ... and the first block is cut at a quantile of about this many of its magnitudes.
CUT_SAMPLE_ELEMENTS = 1 << 16


def _cut_for_largest(magnitude: torch.Tensor, need: int) -> torch.Tensor:
    """Indices of the magnitudes at or above a cut below which none of the ``need`` largest lies (about ``2 need`` of
    them): the cut is a quantile of a strided sample, made exact (the ``need``-th largest) when too few pass it."""
    n = magnitude.numel()
    sample = magnitude[:: max(1, n // CUT_SAMPLE_ELEMENTS)]
    passing = min(sample.numel(), -(-2 * need * sample.numel() // n))  # ceil(2 need / n of the sample)
    cut = _device.kth_smallest(sample, sample.numel() - passing + 1)
    kept = torch.nonzero(magnitude >= cut).flatten()
    if kept.numel() < need:
        cut = _device.kth_smallest(magnitude, n - need + 1)
        kept = torch.nonzero(magnitude >= cut).flatten()
    return kept


def top_gradient_candidates(
    a: torch.Tensor,
    b: torch.Tensor,
    k: int,
    reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    block_elements: int = CANDIDATE_BLOCK_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SpIEL-AG candidates: the ``k`` flat row-major positions of the largest ``|a.T @ b|`` and the float32 gradient
    there (thesis §7.3.1: the top-k of the first micro-batch's dense weight gradient).

    ``a`` is ``[tokens, rows]``, ``b`` ``[tokens, cols]``. The product is formed a block of rows at a time (at most
    ``max(block_elements, 4 k)`` numbers), so the whole ``rows x cols`` gradient never exists at once; ``reduce``
    (e.g. the mean over data-parallel ranks) is applied to every block first. A pool keeps every entry above a
    threshold that only rises (the k-th largest magnitude kept so far, once k are kept), so each block costs a
    comparison instead of a top-k; the first block's entries are cut at a sampled quantile, checked to keep at
    least k. NaN counts as the largest magnitude, as in ``torch.topk``. Positions come unordered; among equal
    magnitudes which ones are kept is unspecified.
    """
    rows, cols = a.shape[1], b.shape[1]
    k = min(k, rows * cols)
    device = a.device
    if k <= 0:
        return torch.zeros(0, dtype=torch.long, device=device), torch.zeros(0, dtype=torch.float32, device=device)
    step = max(1, max(block_elements, 4 * k) // cols)
    if a.dtype != b.dtype:
        a, b = a.float(), b.float()
    positions, grads, magnitudes = [], [], []
    pooled = 0
    threshold = None  # every entry left out is at most this; None until k entries are pooled
    for start in range(0, rows, step):
        # in the compute dtype with float32 output where the device can (CUDA), else widened first
        block = mm_float32(a[:, start : start + step].t(), b)
        if reduce is not None:
            block = reduce(block)
        flat = block.reshape(-1)
        magnitude = flat.abs().nan_to_num_(nan=float("inf"))
        if threshold is not None:
            kept = torch.nonzero(magnitude > threshold).flatten()
        elif magnitude.numel() <= 2 * k:
            kept = torch.arange(magnitude.numel(), device=device)
        else:
            # the block's own k largest all pass, so its k-th largest, and the pool's, is at or above the cut
            kept = _cut_for_largest(magnitude, k)
        positions.append(kept + start * cols)
        grads.append(flat.index_select(0, kept))  # float32 already (mm_float32)
        magnitudes.append(magnitude.index_select(0, kept))
        pooled += kept.numel()
        del block, flat, magnitude
        if pooled >= k and (threshold is None or pooled > 2 * k):
            positions, grads, magnitudes = [torch.cat(parts) for parts in (positions, grads, magnitudes)]
            threshold = _device.kth_smallest(magnitudes, pooled - k + 1)
            kept = torch.nonzero(magnitudes >= threshold).flatten()
            positions, grads, magnitudes = [[part.index_select(0, kept)] for part in (positions, grads, magnitudes)]
            pooled = kept.numel()
    positions, grads, magnitudes = [torch.cat(parts) for parts in (positions, grads, magnitudes)]
    if pooled > k:
        top = torch.topk(magnitudes, k, sorted=False).indices
        positions, grads = positions.index_select(0, top), grads.index_select(0, top)
    return positions, grads


def grow_by_accumulated_gradient(
    candidates: torch.Tensor, mean_grad: torch.Tensor, excluded_sorted: torch.Tensor, k: int
) -> torch.Tensor:
    """SpIEL-AG growth: indices into ``candidates`` of the (at most) ``k`` non-excluded candidates with the largest
    ``|mean_grad|``, best first."""
    allowed = ~is_member(excluded_sorted, candidates.long())
    scores = mean_grad.abs().float().masked_fill(~allowed, -1.0)
    # the candidates are distinct positions, so at most len(excluded) of them are excluded: when that leaves k, the
    # count of allowed ones need not be read
    if candidates.numel() - excluded_sorted.numel() < k:
        k = min(k, int(allowed.sum()))
    if k == 0:
        return torch.zeros(0, dtype=torch.long, device=candidates.device)
    return torch.topk(scores, k, sorted=True).indices


def grow_by_momentum_approximation(
    row_stats: torch.Tensor, col_stats: torch.Tensor, excluded_sorted: torch.Tensor, k: int, backend: str = "auto"
) -> torch.Tensor:
    """SpIEL-MA growth: the ``k`` non-excluded positions with the largest ``row_stats[o] * col_stats[i]`` (the rank
    of ``(r[o] c[i]) ** 0.25``), without forming the ``rows x cols`` score matrix."""
    return grow_by_momentum_approximation_many([row_stats], [col_stats], [excluded_sorted], [k], backend)[0]


def grow_by_momentum_approximation_many(
    row_stats: Sequence[torch.Tensor],
    col_stats: Sequence[torch.Tensor],
    excluded_sorted: Sequence[torch.Tensor],
    ks: Sequence[int],
    backend: str = "auto",
) -> list[torch.Tensor]:
    """``grow_by_momentum_approximation`` of several deltas on one device (element ``m`` of each sequence is one
    delta's arguments) in one ``topk_outer_product_many`` call: the same positions, with a few host reads per
    distinct weight shape instead of tens per delta on the PyTorch backend."""
    rows = [r.float() for r in row_stats]
    cols = [c.float() for c in col_stats]
    ks = [min(k, r.numel() * c.numel() - e.numel()) for r, c, e, k in zip(rows, cols, excluded_sorted, ks)]
    return topk_outer_product_many(rows, cols, list(excluded_sorted), ks, backend)


def grow_random(numel: int, excluded_sorted: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """``k`` distinct positions in ``[0, numel)`` outside ``excluded_sorted``, uniformly at random; int64, ascending,
    on ``excluded_sorted``'s device.

    Exactly uniform over the ``k``-subsets of the free positions and a function of ``generator``'s state alone (the
    same positions on every device). No permutation of all positions: ``sample_ranks`` draws ``k`` distinct ranks
    among the ``numel - len(excluded)`` free positions (the random numbers on ``generator``'s device, the bookkeeping
    on ``excluded_sorted``'s), and ``free_positions_of_ranks`` maps them to positions with one ``searchsorted`` over
    the excluded set, on its device.
    """
    device = excluded_sorted.device
    excluded_sorted = excluded_sorted.long()
    available = numel - excluded_sorted.numel()
    k = min(k, available)
    if k <= 0:
        return torch.zeros(0, dtype=torch.long, device=device)
    ranks = sample_ranks(available, k, generator, device)
    return free_positions_of_ranks(excluded_sorted, ranks)


def free_positions_of_ranks(excluded_sorted: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """The free positions (those not in the sorted ``excluded_sorted``) with the given 0-based ``ranks`` among the
    free positions in ascending order; ascending ``ranks`` give ascending positions.

    Free position of rank ``j`` is ``j + #{i : excluded[i] - i <= j}``: ``excluded[i] - i`` counts the free positions
    below ``excluded[i]`` and is non-decreasing.
    """
    if excluded_sorted.numel() == 0:
        return ranks.clone()
    gaps = excluded_sorted - torch.arange(excluded_sorted.numel(), device=excluded_sorted.device)
    return ranks + torch.searchsorted(gaps, ranks, right=True)


def sample_ranks(
    n: int, k: int, generator: torch.Generator, device: Optional[torch.device] = None
) -> torch.Tensor:
    """``k`` distinct integers in ``[0, n)``, ascending, every ``k``-subset equally likely; on ``device`` (default:
    ``generator``'s device).

    Draws independent uniform integers (each from ``[0, 2**b)``, ``2**b >= n``, rejecting those ``>= n``, so no modulo
    bias) until at least ``k`` distinct ones are seen, then leaves out a uniformly random ``seen - k`` of them (drawn
    the same way among the seen ones). Conditioned on how many distinct values were seen, the seen set is a uniform
    subset (the draws are exchangeable), hence so is the kept one. When ``k > n / 2`` the ``n - k`` values left out
    are drawn instead; ranges up to ``_PERMUTE_LIMIT`` are permuted. Distinct values are tracked by sorting the draws,
    or in an ``n``-entry bool mask when ``k`` is more than ``n / _MASK_SHARE`` (and ``n`` at most ``_MASK_LIMIT``).

    The random numbers are drawn on ``generator``'s device and only the bookkeeping runs on ``device``, which does
    not change the result: a CPU generator gives the same ranks on every device, at the cost of moving the draws.
    """
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, {n}], got {k}")
    device = generator.device if device is None else torch.device(device)
    if n <= _PERMUTE_LIMIT:
        return torch.randperm(n, generator=generator, device=generator.device)[:k].sort().values.to(device)
    if 2 * k > n:
        keep = torch.ones(n, dtype=torch.bool, device=device)
        keep[sample_ranks(n, n - k, generator, device)] = False
        return keep.nonzero_static(size=k).squeeze(1)
    if k == 0:
        return torch.zeros(0, dtype=torch.long, device=device)
    span = 1 << max(1, (n - 1).bit_length())
    use_mask = n <= _MASK_LIMIT and k * _MASK_SHARE > n
    seen_mask = torch.zeros(n, dtype=torch.bool, device=device) if use_mask else None
    seen = torch.zeros(0, dtype=torch.long, device=device)
    count = 0
    while count < k:
        # a draw is new with probability about 1 - count / n; ask for 10 % more than expected, and / acceptance
        want = int(1.1 * (k - count) / (1.0 - count / n)) + 64
        draws = torch.randint(span, (int(want * span / n) + 16,), generator=generator, device=generator.device)
        draws = draws[draws < n].to(device)  # rejected where drawn: the move and the bookkeeping read nothing
        if use_mask:
            seen_mask[draws] = True
            count = int(seen_mask.count_nonzero())
        else:
            seen = torch.unique(torch.cat([seen, draws]))
            count = seen.numel()
    if use_mask:
        seen = seen_mask.nonzero_static(size=count).squeeze(1)
    if count > k:
        keep = torch.ones(count, dtype=torch.bool, device=device)
        keep[sample_ranks(count, count - k, generator, device)] = False
        seen = seen[keep.nonzero_static(size=k).squeeze(1)]
    return seen


# Largest range whose distinct draws sample_ranks tracks in a bool mask (256 MiB); sorting beyond.
_MASK_LIMIT = 1 << 28
# ... and only for k above range / _MASK_SHARE: below, sorting the k draws beats scanning the range (one CPU thread,
# range 44 million: 2.6 ms against 138 for k = 20,000; 105 against 191 for k = 900,000).
_MASK_SHARE = 32
# Ranges up to this size are simply permuted.
_PERMUTE_LIMIT = 1 << 16


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
    drop, excluded = plan_drop(indices, values, k, exclude_dropped)
    return place_growth(indices, drop, grow(excluded, k) if drop.numel() else drop, positions_of)


def plan_drop(
    indices: torch.Tensor, values: torch.Tensor, k: int, exclude_dropped: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first half of ``replace_entries``: ``(drop, excluded_sorted)``, the slots of the ``k`` entries to drop
    and the sorted positions growth may not choose (the kept ones, or all active ones with ``exclude_dropped``).
    Both are empty when nothing is to be replaced (``k <= 0`` or no entries)."""
    empty = torch.zeros(0, dtype=torch.long, device=indices.device)
    if k <= 0 or indices.numel() == 0:
        return empty, empty
    drop = drop_smallest(values, k)
    if exclude_dropped:
        return drop, torch.sort(indices.long()).values
    keep = torch.ones(indices.numel(), dtype=torch.bool, device=indices.device).index_fill_(0, drop, False)
    # the drop slots are distinct, so the count of kept ones is known without reading the mask
    kept = torch.nonzero_static(keep, size=indices.numel() - drop.numel()).squeeze(1)
    return drop, torch.sort(indices.index_select(0, kept).long()).values


def place_growth(
    indices: torch.Tensor,
    drop: torch.Tensor,
    choices: torch.Tensor,
    positions_of: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The second half of ``replace_entries``: given the ``drop`` slots of ``plan_drop`` and the growth ``choices``
    (positions, or handles ``positions_of`` maps to positions), return ``(slots, new_positions, chosen)``."""
    device = indices.device
    if drop.numel() == 0:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return empty, empty, empty
    grown = (positions_of(choices) if positions_of is not None else choices).to(device=device, dtype=torch.long)
    if grown.numel() > drop.numel():
        raise ValueError(f"growth chose {grown.numel()} positions for {drop.numel()} dropped slots")
    dropped_positions = indices[drop].long()
    is_new = ~is_member(dropped_positions, grown, assume_sorted=False)
    is_freed = ~is_member(grown, dropped_positions, assume_sorted=False)
    # the one host read: how many grown positions are new. As len(grown) <= len(drop) and the positions are
    # distinct, at least that many slots are freed: the first new_count of them take the new positions.
    new_count = int(is_new.sum())
    new = torch.nonzero_static(is_new, size=new_count).squeeze(1)
    slots = drop.index_select(0, torch.nonzero_static(is_freed, size=new_count).squeeze(1))
    return slots, grown.index_select(0, new), choices.to(device).index_select(0, new.to(choices.device))
