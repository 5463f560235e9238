"""A delta's positions in row-major order, cached per indices tensor and refreshed when the indices change.

A sparse delta keeps its entries in *slots* (the optimizer state is per slot), so its ``indices`` are not sorted in
general and must not be reordered. The CSR kernels need the positions row-major, so ``sorted_positions`` returns the
sorted permutation of an indices tensor together with the CSR row pointers, and remembers them until the tensor is
modified in place (tracked by its ``_version`` counter, which every in-place write such as a reselection bumps) or
freed. Sorting costs ``O(K log K)`` once per reselection instead of once per step.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SortedPositions:
    """Row-major view of a set of unique flat positions into a ``[nrows, ncols]`` matrix.

    ``perm`` maps sorted order to slots (``sorted = indices[perm]``), ``crow`` (``nrows + 1``) and ``col`` are the
    CSR row pointers and column indices (int64) of the sorted positions.
    """

    perm: torch.Tensor
    sorted: torch.Tensor
    crow: torch.Tensor
    col: torch.Tensor
    nrows: int
    ncols: int


# id(indices) -> (weak reference, version, data pointer, nrows, ncols, SortedPositions)
_CACHE: dict[int, tuple] = {}


def _forget(key: int) -> None:
    _CACHE.pop(key, None)


def _division_by_multiplication(divisor: int) -> tuple[int, int]:
    """``(m, s)`` with ``(n * m) >> s == n // divisor`` for every ``0 <= n < 2**31`` (Granlund and Montgomery 1994,
    Theorem 4.2 with ``N = 31``: ``m = ceil(2**(31 + l) / divisor)``, ``l = ceil(log2(divisor))``); ``n * m`` stays
    below ``2**63``."""
    shift = 31 + (divisor - 1).bit_length()
    return (1 << shift) // divisor + 1, shift


def rows_and_cols(indices: torch.Tensor, ncols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column (int64) of each flat row-major position (non-negative) in ``indices``; the column as
    ``p - row * ncols``, which is cheaper than ``p % ncols``. For int32 positions (below ``2**31``) the row is a
    multiplication and a shift instead of a division, which vector units do not have for integers (SM3 computes this
    every update: about half the time on the CPU)."""
    idx = indices.long()
    if indices.dtype == torch.int32:
        multiplier, shift = _division_by_multiplication(ncols)
        rows = idx.mul(multiplier).bitwise_right_shift_(shift)
    else:
        rows = torch.div(idx, ncols, rounding_mode="floor")
    return rows, torch.sub(idx, rows, alpha=ncols)  # not in place: for int64 positions idx is indices itself


def build_sorted_positions(indices: torch.Tensor, nrows: int, ncols: int) -> SortedPositions:
    """The row-major order and CSR structure of ``indices`` (no caching)."""
    idx = indices.detach().long()
    ordered, perm = torch.sort(idx)
    rows, col = rows_and_cols(ordered, ncols)
    # row r starts where the sorted rows reach r (a search, not a count: no host read of the largest row)
    crow = torch.searchsorted(rows, torch.arange(nrows + 1, dtype=torch.int64, device=idx.device))
    return SortedPositions(perm=perm, sorted=ordered, crow=crow, col=col, nrows=nrows, ncols=ncols)


def sorted_positions(indices: torch.Tensor, nrows: int, ncols: int) -> SortedPositions:
    """``build_sorted_positions`` for ``indices``, reused until ``indices`` is written in place or freed."""
    key = id(indices)
    entry = _CACHE.get(key)
    version, pointer = indices._version, indices.data_ptr()
    if entry is not None:
        ref, cached_version, cached_pointer, cached_rows, cached_cols, value = entry
        if (
            ref() is indices
            and cached_version == version
            and cached_pointer == pointer
            and (cached_rows, cached_cols) == (nrows, ncols)
        ):
            return value
    value = build_sorted_positions(indices, nrows, ncols)
    try:
        ref = weakref.ref(indices, lambda _ref, key=key: _forget(key))
    except TypeError:  # not weak-referenceable: do not cache
        return value
    _CACHE[key] = (ref, version, pointer, nrows, ncols, value)
    return value


def clear_sorted_positions_cache() -> None:
    """Forget every cached order (tests and benchmarks use it to time the first call)."""
    _CACHE.clear()
