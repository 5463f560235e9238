"""Exactly K largest changes over many tensors, without listing all their entries (LT-SFT selection, thesis §4.3.1).

The score of a position is ``|current - reference|`` in float32. ``largest_changes`` returns exactly ``k``
positions: larger scores first, ties decided by the lowest (source order, flat index). It never builds a tensor with
one entry per parameter:

1. A uniform random sample of scores (``sample_size`` positions) gives a threshold ``t`` that, with high probability,
   a little more than ``k`` scores exceed (a quantile of the sample, moved down by three standard deviations).
2. One pass over every source in chunks of ``chunk_size`` entries keeps the scores ``> t`` with their positions.
   If at least ``k`` were kept, the answer is their top ``k``: one k-th value (``_device.kth_smallest``), and since
   kept entries are in position order, ties go to the first ones. Otherwise all kept entries are selected and the
   rest come from the ties at ``t`` (a second pass takes the first ones in position order) and, if there are too
   few ties (an unlucky sample), from a further round restricted to scores ``< t`` with a wider margin.

Extra memory: one chunk of scores, the sample, and about ``k`` (value, position) pairs. Every round selects at least
one entry (``t`` is a sampled score), so the loop ends; NaN scores are an error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .. import _device

DEFAULT_CHUNK_SIZE = 1 << 23
DEFAULT_SAMPLE_SIZE = 1 << 18
_EXCLUDED = float("-inf")


@dataclass
class ChangeSource:
    """Scores ``|current - reference|`` of one tensor, flattened row-major.

    ``reference`` may live on another device (e.g. a CPU copy of the pre-trained weights); it is moved chunk by chunk.
    ``excluded`` (optional) lists flat positions that must not be selected (e.g. selected in an earlier iteration).
    """

    current: torch.Tensor
    reference: torch.Tensor
    excluded: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.current.shape != self.reference.shape:
            raise ValueError(
                f"current and reference differ in shape: {tuple(self.current.shape)} vs {tuple(self.reference.shape)}"
            )
        self._current = self.current.detach().reshape(-1)
        self._reference = self.reference.detach().reshape(-1)
        if self.excluded is not None and self.excluded.numel():
            self._excluded = torch.unique(self.excluded.detach().long().to(self._current.device))  # sorted
        else:
            self._excluded = None

    @property
    def numel(self) -> int:
        return self._current.numel()

    @property
    def num_excluded(self) -> int:
        return 0 if self._excluded is None else self._excluded.numel()

    def scores(self, start: int, end: int) -> torch.Tensor:
        """float32 scores of flat positions ``[start, end)``; excluded positions score ``-inf``."""
        current = self._current[start:end].float()
        reference = self._reference[start:end].to(current.device, non_blocking=True).float()
        out = torch.sub(current, reference).abs_()
        if self._excluded is not None:
            lo, hi = torch.searchsorted(self._excluded, torch.tensor([start, end], device=self._excluded.device))
            if hi > lo:
                out[self._excluded[lo:hi] - start] = _EXCLUDED
        return out

    def scores_at(self, positions: torch.Tensor) -> torch.Tensor:
        """float32 scores at flat ``positions`` (excluded positions score ``-inf``)."""
        positions = positions.to(self._current.device)
        current = self._current[positions].float()
        reference = self._reference[positions.to(self._reference.device)].to(current.device).float()
        out = (current - reference).abs_()
        if self._excluded is not None:
            out[torch.isin(positions, self._excluded)] = _EXCLUDED
        return out


@dataclass
class TopKSelection:
    """Result of ``largest_changes``: per source, the selected flat positions (int64, ascending).

    ``threshold`` is the smallest selected score, ``ties`` how many selected scores equal it, ``passes`` how many
    full passes over the sources were made.
    """

    indices: list[torch.Tensor]
    threshold: float
    ties: int
    passes: int

    @property
    def count(self) -> int:
        return sum(int(i.numel()) for i in self.indices)


def largest_changes(
    sources: Sequence[ChangeSource],
    k: int,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    sample_size: int = DEFAULT_SAMPLE_SIZE,
    seed: int = 0,
) -> TopKSelection:
    """Select exactly ``k`` positions with the largest scores over all ``sources`` together (see the module doc).

    Ties are decided by the lowest (source order, flat index). Raises ValueError if ``k`` is negative or larger than
    the number of positions that may be selected, or if a score is NaN.
    """
    sources = list(sources)
    if not isinstance(k, int) or k < 0:
        raise ValueError(f"k must be a non-negative integer, got {k!r}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    sizes = [s.numel for s in sources]
    offsets = [0]
    for n in sizes:
        offsets.append(offsets[-1] + n)
    available = offsets[-1] - sum(s.num_excluded for s in sources)
    if k > available:
        raise ValueError(f"cannot select k={k} positions: only {available} positions may be selected")
    empty = [torch.zeros(0, dtype=torch.long, device=s._current.device) for s in sources]
    if k == 0:
        return TopKSelection(empty, float("nan"), 0, 0)

    sample = _sample_scores(sources, offsets, sample_size, seed)
    if torch.isnan(sample).any():
        raise ValueError("the differences contain NaN: training diverged or a weight is not finite")
    sample = sample[sample > _EXCLUDED]

    chosen_pos: list[torch.Tensor] = []  # global positions (int64, CPU) and their scores
    chosen_val: list[torch.Tensor] = []
    need, upper, remaining, margin, passes = k, None, available, 3.0, 0
    while need > 0:
        domain = sample if upper is None else sample[sample < upper]
        threshold = _estimate_threshold(domain, need, remaining, margin)
        kept_pos, kept_val = _collect_above(sources, offsets, threshold, upper, chunk_size)
        passes += 1
        if kept_pos.numel() >= need:
            take = _first_largest(kept_val, need)  # kept entries are in position order
            chosen_pos.append(kept_pos[take])
            chosen_val.append(kept_val[take])
            break
        if threshold is None:  # every remaining score was kept and still too few: some are NaN
            raise ValueError("the differences contain NaN: training diverged or a weight is not finite")
        chosen_pos.append(kept_pos)
        chosen_val.append(kept_val)
        need -= kept_pos.numel()
        ties_pos = _collect_equal(sources, offsets, threshold, need, chunk_size)
        passes += 1
        if ties_pos.numel() == 0:  # the sampled score itself is gone
            raise RuntimeError("the tensors changed while positions were being selected")
        chosen_pos.append(ties_pos)
        chosen_val.append(torch.full((ties_pos.numel(),), threshold, dtype=torch.float32))
        need -= ties_pos.numel()
        # not done: every score >= threshold is selected; continue below it, with a wider margin
        remaining -= kept_pos.numel() + ties_pos.numel()
        upper, margin = threshold, margin * 2

    positions = torch.cat(chosen_pos)
    values = torch.cat(chosen_val)
    smallest = float(values.min())
    ties = int((values == smallest).sum())
    if len(chosen_pos) > 1:  # one part is already in position order
        positions = torch.sort(positions).values
    indices = []
    for i, source in enumerate(sources):
        lo, hi = torch.searchsorted(positions, torch.tensor([offsets[i], offsets[i + 1]]))
        indices.append((positions[lo:hi] - offsets[i]).to(source._current.device))
    return TopKSelection(indices, smallest, ties, passes)


def largest_changes_per_tensor(
    sources: Sequence[ChangeSource], budgets: Sequence[int], chunk_size: int = DEFAULT_CHUNK_SIZE
) -> TopKSelection:
    """``largest_changes`` run on each source alone with its own budget (same tie rule)."""
    if len(budgets) != len(sources):
        raise ValueError(f"got {len(sources)} sources but {len(budgets)} budgets")
    results = [largest_changes([s], int(b), chunk_size) for s, b in zip(sources, budgets)]
    nonempty = [r for r in results if r.count]
    threshold = min((r.threshold for r in nonempty), default=float("nan"))
    ties = sum(r.ties for r in nonempty if r.threshold == threshold)
    return TopKSelection([r.indices[0] for r in results], threshold, ties, sum(r.passes for r in results))


# ------------------------------------------------------------------------------------------------- internals
def _first_largest(values: torch.Tensor, count: int) -> torch.Tensor:
    """Mask of the ``count`` largest ``values``, ties to the lowest index (without sorting them all)."""
    kth = _device.kth_smallest(values, values.numel() - count + 1)
    larger = values > kth
    ties = (values == kth) & (torch.cumsum(values == kth, 0) <= count - int(larger.sum()))
    return larger | ties


def _sample_scores(sources: list[ChangeSource], offsets: list[int], sample_size: int, seed: int) -> torch.Tensor:
    total = offsets[-1]
    if total <= sample_size:
        parts = [s.scores(0, s.numel).cpu() for s in sources if s.numel]
        return torch.cat(parts) if parts else torch.zeros(0)
    # uniform positions, already sorted: cumulative exponential gaps (no sort of the sample)
    generator = torch.Generator().manual_seed(seed)
    gaps = torch.empty(sample_size + 1, dtype=torch.float64).exponential_(generator=generator)
    cumulative = torch.cumsum(gaps, 0)
    positions = (cumulative[:-1] / cumulative[-1] * total).long().clamp_(max=total - 1)
    bounds = torch.searchsorted(positions, torch.tensor(offsets))
    parts = []
    for i, source in enumerate(sources):
        lo, hi = int(bounds[i]), int(bounds[i + 1])
        if hi > lo:
            parts.append(source.scores_at(positions[lo:hi] - offsets[i]).cpu())
    return torch.cat(parts)


def _estimate_threshold(domain: torch.Tensor, need: int, remaining: int, margin: float) -> float | None:
    """A sampled score that a little more than ``need`` of the ``remaining`` scores exceed; None: take them all."""
    n = domain.numel()
    if n == 0 or remaining <= 0:
        return None
    expected = n * need / remaining
    rank = math.ceil(expected + margin * math.sqrt(expected) + 1)
    if rank >= n:
        return None
    return float(torch.topk(domain, rank).values[-1])


def _collect_above(
    sources: list[ChangeSource], offsets: list[int], threshold: float | None, upper: float | None, chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Global positions (ascending) and scores of every score in (``threshold``, ``upper``).

    ``threshold`` None: no lower bound (excluded positions are never kept); ``upper`` None: no upper bound."""
    positions, values = [], []
    low = _EXCLUDED if threshold is None else threshold
    for i, source in enumerate(sources):
        for start in range(0, source.numel, chunk):
            scores = source.scores(start, min(start + chunk, source.numel))
            mask = scores > low
            if upper is not None:
                mask &= scores < upper
            where = torch.nonzero(mask).squeeze(1)
            if where.numel():
                positions.append(where.cpu() + (offsets[i] + start))
                values.append(scores[where].cpu())
    if not positions:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0)
    return torch.cat(positions), torch.cat(values)


def _collect_equal(
    sources: list[ChangeSource], offsets: list[int], threshold: float, count: int, chunk: int
) -> torch.Tensor:
    """The first ``count`` global positions (in order) whose score equals ``threshold`` (fewer if there are fewer)."""
    found, left = [], count
    for i, source in enumerate(sources):
        for start in range(0, source.numel, chunk):
            if left == 0:
                break
            scores = source.scores(start, min(start + chunk, source.numel))
            where = torch.nonzero(scores == threshold).squeeze(1)[:left]
            if where.numel():
                found.append(where.cpu() + (offsets[i] + start))
                left -= where.numel()
    return torch.cat(found) if found else torch.zeros(0, dtype=torch.long)
