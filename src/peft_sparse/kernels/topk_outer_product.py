"""SpIEL-MA growth: the ``k`` best inactive positions of an outer-product score ``r[o] * c[i]``.

SM3 keeps a row accumulator ``r`` (``[out]``) and a column accumulator ``c`` (``[in]``) per delta; the growth score of
position ``(o, i)`` ranks like ``r[o] * c[i]`` (thesis ch. 7). Neither implementation materialises the ``[out, in]``
score matrix: the reference scores a bounded chunk of rows at a time and keeps the running best ``k``; the Triton
version finds the k-th largest score by a 4-pass radix select over the float32 bit patterns (a histogram of one
byte per pass, computed in-kernel from ``r`` and ``c``), then collects the positions at or above it. Excluded
positions are handled by subtracting their (K, computed directly) contributions from each histogram and filtering
them out of the collected candidates, so the kernels never search the exclusion set.

Both compute every score as one float32 product ``float32(r[o]) * float32(c[i])``, so they select identical
positions: the ``k`` largest scores among positions not in ``exclude_sorted``, ties broken by the lower flat index.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch.nn.utils.rnn import pad_sequence

from .. import _device
from ._triton import INTERPRETED, cdiv, tl, triton

# Scores computed at once by the reference; bounds its working memory (64 MiB of float32).
_REFERENCE_CHUNK_ELEMENTS = 1 << 24

# Explicit, unmeasured launch configuration: rows per program and columns per inner step.
BLOCK_R = 16
BLOCK_C = 128
NUM_WARPS = 4
_SIGN_OFFSET = 1 << 31


def check_topk_outer_product_args(
    row_scores: torch.Tensor, col_scores: torch.Tensor, exclude_sorted: torch.Tensor, k: int
) -> int:
    """Validate the arguments of ``topk_outer_product``; return how many positions are not excluded.

    Raises ``ValueError`` naming the argument: scores must be 1-D, floating point and finite, ``exclude_sorted``
    strictly increasing integer positions inside ``[0, out * in)``, and ``0 <= k <=`` the positions left.
    """
    if row_scores.dim() != 1 or not row_scores.is_floating_point():
        raise ValueError(f"row_scores must be a 1-D float tensor, got {row_scores.dtype} {tuple(row_scores.shape)}")
    if col_scores.dim() != 1 or not col_scores.is_floating_point():
        raise ValueError(f"col_scores must be a 1-D float tensor, got {col_scores.dtype} {tuple(col_scores.shape)}")
    if exclude_sorted.dim() != 1 or exclude_sorted.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"exclude_sorted must be a 1-D int64 tensor, got {exclude_sorted.dtype} {tuple(exclude_sorted.shape)}"
        )
    if not (row_scores.device == col_scores.device == exclude_sorted.device):
        raise ValueError(
            "row_scores, col_scores and exclude_sorted must be on one device, got "
            f"{row_scores.device}, {col_scores.device}, {exclude_sorted.device}"
        )
    for name, scores in (("row_scores", row_scores), ("col_scores", col_scores)):
        if scores.numel() and not bool(torch.isfinite(scores).all()):
            raise ValueError(f"{name} must be finite, got {int((~torch.isfinite(scores)).sum())} non-finite entries")
    numel = row_scores.numel() * col_scores.numel()
    n_excluded = exclude_sorted.numel()
    if n_excluded:
        if n_excluded > 1 and not bool((exclude_sorted[1:] > exclude_sorted[:-1]).all()):
            raise ValueError("exclude_sorted must be strictly increasing (sorted, unique)")
        first, last = int(exclude_sorted[0]), int(exclude_sorted[-1])
        if first < 0 or last >= numel:
            raise ValueError(f"exclude_sorted must lie in [0, {numel}), got values from {first} to {last}")
    available = numel - n_excluded
    if not 0 <= k <= available:
        raise ValueError(f"k must be in [0, {available}] (positions not excluded), got {k}")
    return available


def _select_chunk(scores: torch.Tensor, excluded_local: torch.Tensor, k: int) -> torch.Tensor:
    """Local positions (ascending) of the ``k`` best scores of one chunk, excluded ones left out, ties to the lower."""
    valid = torch.ones_like(scores, dtype=torch.bool)
    valid[excluded_local] = False
    k = min(k, scores.numel() - excluded_local.numel())
    if k <= 0:
        return torch.empty(0, dtype=torch.int64, device=scores.device)
    masked = scores.masked_fill(~valid, float("-inf"))
    kth = torch.topk(masked, k, sorted=False).values.min()
    above = torch.nonzero(masked > kth).flatten()
    # Equal scores at the threshold: nonzero lists them in ascending position, so the lower ones come first.
    ties = torch.nonzero((masked == kth) & valid).flatten()[: k - above.numel()]
    return torch.cat([above, ties]).sort().values


def topk_outer_product_reference(
    row_scores: torch.Tensor, col_scores: torch.Tensor, exclude_sorted: torch.Tensor, k: int
) -> torch.Tensor:
    """Return the int64 flat row-major positions (ascending) of the ``k`` largest ``row_scores[o] * col_scores[i]``.

    ``row_scores`` is ``[out]``, ``col_scores`` ``[in]``, ``exclude_sorted`` the strictly increasing flat positions
    that may not be chosen (the active indices). Scores are float32 products; among equal scores the lower flat
    position wins. Works on chunks of rows, so memory stays bounded whatever ``out * in`` is.
    """
    return _topk_outer_product_chunked(row_scores, col_scores, exclude_sorted, k, chunk_rows=None)


def _topk_outer_product_chunked(
    row_scores: torch.Tensor, col_scores: torch.Tensor, exclude_sorted: torch.Tensor, k: int, chunk_rows: int | None
) -> torch.Tensor:
    check_topk_outer_product_args(row_scores, col_scores, exclude_sorted, k)
    device = row_scores.device
    n_rows, n_cols = row_scores.numel(), col_scores.numel()
    best_pos = torch.empty(0, dtype=torch.int64, device=device)
    if k == 0:
        return best_pos
    best_score = torch.empty(0, dtype=torch.float32, device=device)
    rows, cols = row_scores.float(), col_scores.float()
    exclude = exclude_sorted.long()
    if chunk_rows is None:
        chunk_rows = max(1, _REFERENCE_CHUNK_ELEMENTS // n_cols)
    for r0 in range(0, n_rows, chunk_rows):
        r1 = min(r0 + chunk_rows, n_rows)
        base = r0 * n_cols
        lo, hi = torch.searchsorted(exclude, torch.tensor([base, r1 * n_cols], device=device)).tolist()
        scores = (rows[r0:r1, None] * cols[None, :]).flatten()
        local = _select_chunk(scores, exclude[lo:hi] - base, k)
        # Running best first: its positions are all lower, so the stable sort breaks ties toward them.
        cand_pos = torch.cat([best_pos, local + base])
        cand_score = torch.cat([best_score, scores[local]])
        order = torch.sort(cand_score, descending=True, stable=True).indices[:k]
        best_pos, by_pos = cand_pos[order].sort()
        best_score = cand_score[order][by_pos]
    return best_pos


def _keys_torch(scores: torch.Tensor) -> torch.Tensor:
    """int64 keys in ``[0, 2**32)`` ordered like the float32 ``scores`` (-0.0 and 0.0 share one key)."""
    scores = torch.where(scores == 0, torch.zeros_like(scores), scores)
    bits = scores.view(torch.int32).long()
    return torch.where(bits < 0, -bits - 1, bits + _SIGN_OFFSET)


if triton is not None:

    @triton.jit
    def _outer_keys(row_ptr, col_ptr, offs_r, offs_c, mask_r, mask_c):
        r = tl.load(row_ptr + offs_r, mask=mask_r, other=0.0)
        c = tl.load(col_ptr + offs_c, mask=mask_c, other=0.0)
        s = r[:, None] * c[None, :]
        # -0.0 == 0.0 as floats, so they must share one key for ties to match the reference.
        s = tl.where(s == 0.0, 0.0, s)
        bits = s.to(tl.int32, bitcast=True).to(tl.int64)
        return tl.where(bits < 0, -bits - 1, bits + 2147483648)

    @triton.jit
    def _topk_histogram_kernel(
        row_ptr, col_ptr, params_ptr, hist_ptr, n_rows, n_cols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr
    ):
        prefix = tl.load(params_ptr)
        prefix_mask = tl.load(params_ptr + 1)
        shift = tl.load(params_ptr + 2)
        offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        mask_r = offs_r < n_rows
        counts = tl.zeros([256], dtype=tl.int32)
        for c0 in range(0, n_cols, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask_c = offs_c < n_cols
            keys = _outer_keys(row_ptr, col_ptr, offs_r, offs_c, mask_r, mask_c)
            match = mask_r[:, None] & mask_c[None, :] & ((keys & prefix_mask) == prefix)
            digits = ((keys >> shift) & 255).to(tl.int32)
            counts += tl.histogram(
                tl.reshape(digits, [BLOCK_R * BLOCK_C]), 256, mask=tl.reshape(match, [BLOCK_R * BLOCK_C])
            )
        tl.atomic_add(hist_ptr + tl.arange(0, 256), counts.to(tl.int64))

    @triton.jit
    def _topk_row_ties_kernel(
        row_ptr, col_ptr, params_ptr, counts_ptr, n_rows, n_cols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr
    ):
        threshold = tl.load(params_ptr + 3)
        offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        mask_r = offs_r < n_rows
        counts = tl.zeros([BLOCK_R], dtype=tl.int64)
        for c0 in range(0, n_cols, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask_c = offs_c < n_cols
            keys = _outer_keys(row_ptr, col_ptr, offs_r, offs_c, mask_r, mask_c)
            tie = mask_r[:, None] & mask_c[None, :] & (keys == threshold)
            counts += tl.sum(tie.to(tl.int64), axis=1)
        tl.store(counts_ptr + offs_r, counts, mask=mask_r)

    @triton.jit
    def _topk_collect_kernel(
        row_ptr,
        col_ptr,
        params_ptr,
        out_ptr,
        counter_ptr,
        capacity,
        n_rows,
        n_cols,
        BLOCK_R: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        threshold = tl.load(params_ptr + 3)
        row_limit = tl.load(params_ptr + 4)
        offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        mask_r = offs_r < n_rows
        for c0 in range(0, n_cols, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask_c = offs_c < n_cols
            keys = _outer_keys(row_ptr, col_ptr, offs_r, offs_c, mask_r, mask_c)
            take = (keys > threshold) | ((keys == threshold) & (offs_r < row_limit)[:, None])
            take = tl.reshape(mask_r[:, None] & mask_c[None, :] & take, [BLOCK_R * BLOCK_C])
            positions = offs_r.to(tl.int64)[:, None] * n_cols + offs_c[None, :]
            positions = tl.reshape(positions, [BLOCK_R * BLOCK_C])
            flags = take.to(tl.int32)
            # One atomic per tile reserves a contiguous slice; the prefix sum places each taken position in it.
            start = tl.atomic_add(counter_ptr, tl.sum(flags, axis=0)).to(tl.int64)
            slot = start + (tl.cumsum(flags, axis=0) - 1).to(tl.int64)
            tl.store(out_ptr + slot, positions, mask=take & (slot < capacity))


def _radix_threshold(
    rows: torch.Tensor, cols: torch.Tensor, excluded_keys: torch.Tensor, k: int
) -> tuple[int, int, int]:
    """Radix-select the key of the k-th best valid score: returns (key, valid scores above it, valid ties at it)."""
    device = rows.device
    grid = (cdiv(rows.numel(), BLOCK_R),)
    prefix, prefix_mask, remaining = 0, 0, k
    ties = 0
    for shift in (24, 16, 8, 0):
        params = torch.tensor([prefix, prefix_mask, shift, 0, 0], dtype=torch.int64, device=device)
        hist = torch.zeros(256, dtype=torch.int64, device=device)
        _topk_histogram_kernel[grid](
            rows, cols, params, hist, rows.numel(), cols.numel(), BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, num_warps=NUM_WARPS
        )
        matching = excluded_keys[(excluded_keys & prefix_mask) == prefix]
        hist -= torch.bincount((matching >> shift) & 255, minlength=256)
        # at_least[j]: valid scores in the prefix bucket whose digit is >= 255 - j.
        at_least = hist.flip(0).cumsum(0).cpu()
        j = int(torch.searchsorted(at_least, torch.tensor([remaining])))
        above = int(at_least[j - 1]) if j > 0 else 0
        ties = int(at_least[j]) - above
        remaining -= above
        prefix |= (255 - j) << shift
        prefix_mask |= 255 << shift
    return prefix, k - remaining, ties


def topk_outer_product_triton(
    row_scores: torch.Tensor, col_scores: torch.Tensor, exclude_sorted: torch.Tensor, k: int
) -> torch.Tensor:
    """Triton version of ``topk_outer_product_reference``: same arguments, identical positions (ascending int64)."""
    if triton is None:
        raise RuntimeError("topk_outer_product_triton needs triton, which is not installed")
    check_topk_outer_product_args(row_scores, col_scores, exclude_sorted, k)
    device = row_scores.device
    if device.type != "cuda" and not INTERPRETED:
        raise RuntimeError(f"Triton kernels run on CUDA or under TRITON_INTERPRET=1, got tensors on {device.type}")
    if k == 0:
        return torch.empty(0, dtype=torch.int64, device=device)
    rows, cols = row_scores.float().contiguous(), col_scores.float().contiguous()
    n_rows, n_cols = rows.numel(), cols.numel()
    exclude = exclude_sorted.long()
    ex_rows = exclude // n_cols
    ex_keys = _keys_torch(rows[ex_rows] * cols[exclude - ex_rows * n_cols])

    threshold, n_above, n_ties = _radix_threshold(rows, cols, ex_keys, k)
    needed_ties = k - n_above
    grid = (cdiv(n_rows, BLOCK_R),)
    ex_tie = ex_keys == threshold
    if n_ties == needed_ties:
        row_limit, boundary = n_rows, torch.empty(0, dtype=torch.int64, device=device)
    else:
        # Too many ties: take whole rows of ties in row order, then the first ones of the boundary row.
        params = torch.tensor([0, 0, 0, threshold, 0], dtype=torch.int64, device=device)
        per_row = torch.empty(n_rows, dtype=torch.int64, device=device)
        _topk_row_ties_kernel[grid](
            rows, cols, params, per_row, n_rows, n_cols, BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, num_warps=NUM_WARPS
        )
        per_row -= torch.bincount(ex_rows[ex_tie], minlength=n_rows)
        cumulative = per_row.cumsum(0)
        row_limit = int(torch.searchsorted(cumulative, torch.tensor([needed_ties], device=device)))
        before = int(cumulative[row_limit - 1]) if row_limit > 0 else 0
        row_keys = _keys_torch(rows[row_limit] * cols)
        row_excluded = exclude[ex_rows == row_limit] - row_limit * n_cols
        is_tie = row_keys == threshold
        is_tie[row_excluded] = False
        boundary = torch.nonzero(is_tie).flatten()[: needed_ties - before] + row_limit * n_cols

    capacity = n_above + int((ex_keys > threshold).sum()) + needed_ties - boundary.numel()
    capacity += int((ex_tie & (ex_rows < row_limit)).sum())
    params = torch.tensor([0, 0, 0, threshold, row_limit], dtype=torch.int64, device=device)
    collected = torch.empty(capacity, dtype=torch.int64, device=device)
    counter = torch.zeros(1, dtype=torch.int32, device=device)
    _topk_collect_kernel[grid](
        rows,
        cols,
        params,
        collected,
        counter,
        capacity,
        n_rows,
        n_cols,
        BLOCK_R=BLOCK_R,
        BLOCK_C=BLOCK_C,
        num_warps=NUM_WARPS,
    )
    if int(counter) != capacity:
        raise RuntimeError(f"topk_outer_product_triton collected {int(counter)} positions, expected {capacity}")
    if exclude.numel():
        slot = torch.searchsorted(exclude, collected).clamp_max(exclude.numel() - 1)
        collected = collected[exclude[slot] != collected]
    result = torch.cat([collected, boundary]).sort().values
    if result.numel() != k:
        raise RuntimeError(f"topk_outer_product_triton selected {result.numel()} positions, expected k = {k}")
    return result


def topk_outer_product_threshold(
    row_scores: torch.Tensor, col_scores: torch.Tensor, exclude_sorted: torch.Tensor, k: int
) -> torch.Tensor:
    """``topk_outer_product_reference`` (same result, bit for bit) for non-negative scores, in ``O((out + K) log)``
    work instead of scoring all ``out * in`` positions; signed scores go to the reference.

    One matrix of ``topk_outer_product_batched``, which describes the search.
    """
    check_topk_outer_product_args(row_scores, col_scores, exclude_sorted, k)
    signed = bool((row_scores < 0).any()) or bool((col_scores < 0).any())
    return _search_or_reference([row_scores], [col_scores], [exclude_sorted], [int(k)], [signed])[0]


# Bisection steps between two host reads of whether every matrix of a batch has converged, and at most this many
# reads (a search that has not converged by then uses the t it has: a matrix whose t is still 0 goes to the reference).
_BISECTION_STEPS_PER_CHECK = 8
_BISECTION_CHECKS = 32
# An enumerated set larger than this many times k (plus a constant) means massive ties at the cut: that matrix goes to
# the chunked reference instead, whose memory is bounded.
_ENUMERATION_LIMIT = 8
_ENUMERATION_SLACK = 1 << 20
# Matrices of more positions than this go to the reference: a candidate's rank key holds its position in 31 bits.
_POSITION_LIMIT = 1 << 31


def topk_outer_product_batched(
    row_scores: Sequence[torch.Tensor],
    col_scores: Sequence[torch.Tensor],
    exclude_sorted: Sequence[torch.Tensor],
    ks: Sequence[int],
) -> list[torch.Tensor]:
    """``topk_outer_product_reference`` of several matrices at once: element ``m`` of the result is
    ``topk_outer_product_reference(row_scores[m], col_scores[m], exclude_sorted[m], ks[m])``, bit for bit.

    All tensors must be on one device. Matrices of one shape with non-negative scores are searched together, so the
    host reads a result once to check the arguments and three or four times per distinct shape (none per matrix),
    where one search per matrix reads about ten times per matrix (a GPU waits for each read). Matrices with a
    negative score, a ``k``-th best score outside float32's normal range, more than ``2**31`` positions or massive
    ties at the cut are answered by the reference, one by one.

    The search: with each matrix's columns sorted by score, the positions of row ``o`` scoring at least ``t`` are a
    prefix of that order, found by one ``searchsorted``, so how many positions score ``>= t`` is known for any
    ``t`` without enumerating them. For every matrix at once, ``t`` is halved from above every product until
    enough positions count, then bisected, until (by float64 products, excluded positions subtracted) at least
    ``k`` and at most about 1 % more free positions score ``>= t``. The positions whose float64 product is at least
    ``t (1 - 2**-20)`` are then enumerated, scored exactly as the reference scores them (one float32 product), and
    the best ``k`` of each matrix taken, ties to the lower position. That is the reference's answer when at least
    ``k`` free enumerated scores are ``>= float32(t)``: every position left out scores below that (float32 rounding
    is monotone and ``t (1 - 2**-20)`` lies several float32 steps below ``t``); it is checked, and a matrix failing
    it goes to the reference.
    """
    n = len(row_scores)
    if not len(col_scores) == len(exclude_sorted) == len(ks) == n:
        raise ValueError(
            "row_scores, col_scores, exclude_sorted and ks must have one entry per matrix, got lengths "
            f"{n}, {len(col_scores)}, {len(exclude_sorted)}, {len(ks)}"
        )
    if n == 0:
        return []
    signed = _check_batch_args(row_scores, col_scores, exclude_sorted, ks)
    return _search_or_reference(row_scores, col_scores, exclude_sorted, ks, signed)


def _search_or_reference(
    row_scores: Sequence[torch.Tensor],
    col_scores: Sequence[torch.Tensor],
    exclude_sorted: Sequence[torch.Tensor],
    ks: Sequence[int],
    signed: Sequence[bool],
) -> list[torch.Tensor]:
    """Checked arguments of ``topk_outer_product_batched``: the threshold search where it applies, else the
    reference."""
    n = len(row_scores)
    results: list[Optional[torch.Tensor]] = [None] * n
    device = row_scores[0].device
    searched = []
    for m in range(n):
        if ks[m] == 0:
            results[m] = torch.empty(0, dtype=torch.int64, device=device)
        elif signed[m]:
            results[m] = _topk_outer_product_chunked(row_scores[m], col_scores[m], exclude_sorted[m], ks[m], None)
        else:
            searched.append(m)
    groups: dict[tuple[int, int], list[int]] = {}  # one search per shape: no padding
    for m in searched:
        groups.setdefault((row_scores[m].numel(), col_scores[m].numel()), []).append(m)
    for group in groups.values():
        found = _threshold_search(
            [row_scores[m] for m in group],
            [col_scores[m] for m in group],
            [exclude_sorted[m].long() for m in group],
            [int(ks[m]) for m in group],
        )
        for m, positions in zip(group, found):
            if positions is None:
                positions = _topk_outer_product_chunked(row_scores[m], col_scores[m], exclude_sorted[m], ks[m], None)
            results[m] = positions
    return results


def _check_batch_args(
    row_scores: Sequence[torch.Tensor],
    col_scores: Sequence[torch.Tensor],
    exclude_sorted: Sequence[torch.Tensor],
    ks: Sequence[int],
) -> list[bool]:
    """``check_topk_outer_product_args`` for every matrix with one host read in all; returns which matrices have a
    negative score. Errors name the matrix."""
    device = row_scores[0].device
    flags = []
    for m, (rows, cols, exclude, k) in enumerate(zip(row_scores, col_scores, exclude_sorted, ks)):
        for name, scores in (("row_scores", rows), ("col_scores", cols)):
            if scores.dim() != 1 or not scores.is_floating_point():
                raise ValueError(f"{name}[{m}] must be a 1-D float tensor, got {scores.dtype} {tuple(scores.shape)}")
        if exclude.dim() != 1 or exclude.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"exclude_sorted[{m}] must be a 1-D int64 tensor, got {exclude.dtype} {tuple(exclude.shape)}"
            )
        if not rows.device == cols.device == exclude.device == device:
            raise ValueError(
                f"all scores and exclusions must be on one device, got {device} and, for matrix {m}, "
                f"{rows.device}, {cols.device}, {exclude.device}"
            )
        numel, n_excluded = rows.numel() * cols.numel(), exclude.numel()
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= numel - n_excluded:
            raise ValueError(f"ks[{m}] must be an int in [0, {numel - n_excluded}] (positions not excluded), got {k}")
        exclude = exclude.long()
        zero = torch.zeros((), dtype=torch.int64, device=device)
        flags.append(
            torch.stack(
                [
                    torch.isfinite(rows).all().long(),
                    torch.isfinite(cols).all().long(),
                    (exclude[1:] > exclude[:-1]).all().long() if n_excluded > 1 else zero + 1,
                    exclude[0] if n_excluded else zero,
                    exclude[-1] if n_excluded else zero,
                    ((rows < 0).any() | (cols < 0).any()).long(),
                ]
            )
        )
    checked = torch.stack(flags).tolist()
    for m, (finite_rows, finite_cols, ordered, first, last, _) in enumerate(checked):
        numel = row_scores[m].numel() * col_scores[m].numel()
        for name, scores, finite in (("row_scores", row_scores, finite_rows), ("col_scores", col_scores, finite_cols)):
            if not finite:
                bad = int((~torch.isfinite(scores[m])).sum())
                raise ValueError(f"{name}[{m}] must be finite, got {bad} non-finite entries")
        if not ordered:
            raise ValueError(f"exclude_sorted[{m}] must be strictly increasing (sorted, unique)")
        if exclude_sorted[m].numel() and (first < 0 or last >= numel):
            raise ValueError(f"exclude_sorted[{m}] must lie in [0, {numel}), got values from {first} to {last}")
    return [bool(row[5]) for row in checked]


def _threshold_search(
    row_scores: list[torch.Tensor], col_scores: list[torch.Tensor], excludes: list[torch.Tensor], ks: list[int]
) -> list[Optional[torch.Tensor]]:
    """The search of ``topk_outer_product_batched`` for matrices with non-negative scores and ``k >= 1``; None for a
    matrix the reference must answer."""
    device = row_scores[0].device
    count = len(row_scores)
    n_rows = [r.numel() for r in row_scores]
    n_cols = [c.numel() for c in col_scores]
    pad_rows = max(n_rows)
    rows32 = pad_sequence([r.float() for r in row_scores], batch_first=True)  # padded rows score 0: count nothing
    cols32 = pad_sequence([c.float() for c in col_scores], batch_first=True)
    # padded columns sort last, as +inf in the ascending negated order: no bound reaches them
    col_sorted, col_order = torch.sort(
        pad_sequence([c.float() for c in col_scores], batch_first=True, padding_value=float("-inf")),
        dim=1,
        descending=True,
        stable=True,
    )
    neg_cols64 = -col_sorted.double()
    rows64 = rows32.double()
    excluded_exact = []  # one tensor per matrix: counted matrix by matrix, each pass stays in cache
    for m, (exclude, width) in enumerate(zip(excludes, n_cols)):
        ex_rows = torch.div(exclude, width, rounding_mode="floor")
        excluded_exact.append(rows64[m, ex_rows] * cols32[m].double()[exclude - ex_rows * width])  # float32 scores'

    def per_row(t: torch.Tensor, rows64: torch.Tensor = rows64, neg_cols64: torch.Tensor = neg_cols64) -> torch.Tensor:
        # positions of each row whose float64 product is >= t: a prefix of the row's sorted columns
        bound = torch.where(rows64 > 0, t[:, None] / rows64, torch.full_like(rows64, math.inf))
        return torch.searchsorted(neg_cols64, -bound, right=True)

    target = torch.tensor(ks, dtype=torch.int64, device=device)
    enough_at = target + target // 100 + 64  # close enough: stop searching this matrix
    high = rows64.amax(1) * (-neg_cols64[:, 0]) * 2.0 + 1e-300  # above every product: no position counts
    low = torch.zeros_like(high)  # every free position counts
    low_count = torch.tensor(
        [r * c - e.numel() for r, c, e in zip(n_rows, n_cols, excludes)], dtype=torch.int64, device=device
    )
    active = list(range(count))  # the matrices still searching, read by the host after each block of steps
    for _ in range(_BISECTION_CHECKS):
        if len(active) == count:
            part = slice(None)
        else:
            part = torch.tensor(active, device=device)
        p_rows, p_cols = rows64[part], neg_cols64[part]
        p_excluded = [excluded_exact[m] for m in active]
        p_target, p_enough = target[part], enough_at[part]
        p_low, p_high, p_count = low[part], high[part], low_count[part]
        searching = torch.ones(len(active), dtype=torch.bool, device=device)
        for _ in range(_BISECTION_STEPS_PER_CHECK):
            # halve the upper end until a t with enough positions is found, then bisect between the two
            middle = torch.where(p_low > 0, 0.5 * (p_low + p_high), 0.5 * p_high)
            searching &= (middle != p_low) & (middle != p_high)  # else no float64 lies between them
            # (a comparison per excluded position costs less than sorting them for the few steps a search takes)
            excluded_above = torch.stack([torch.count_nonzero(e >= t) for e, t in zip(p_excluded, middle.unbind())])
            counted = per_row(middle, p_rows, p_cols).sum(1) - excluded_above
            raise_low = searching & (counted >= p_target)
            lower_high = searching & (counted < p_target)
            p_low = torch.where(raise_low, middle, p_low)
            p_count = torch.where(raise_low, counted, p_count)
            p_high = torch.where(lower_high, middle, p_high)
            searching &= p_count > p_enough
        low[part], high[part], low_count[part] = p_low, p_high, p_count
        active = [m for m, still in zip(active, searching.tolist()) if still]
        if not active:
            break
    t = low
    # float32 products are within 2**-24 of float64 ones in this range; positions must fit the key below
    usable = (t >= 2.0**-100) & (t <= 2.0**100)
    usable &= torch.tensor([r * c <= _POSITION_LIMIT for r, c in zip(n_rows, n_cols)], device=device)
    counts = per_row(t * (1.0 - 2.0**-20)) * usable[:, None]
    usable &= counts.sum(1) <= _ENUMERATION_LIMIT * target + _ENUMERATION_SLACK
    counts *= usable[:, None]
    totals = counts.sum(1).tolist()

    # matrix by matrix from here (sizes now known on the host): each pass over a matrix's candidates stays in cache
    found, checks = [], []
    for m, (total, k) in enumerate(zip(totals, ks)):
        if total < k:  # not usable (no candidates), or too few: the reference answers
            found.append(None)
            checks.append(usable.new_zeros(()))
            continue
        row = torch.repeat_interleave(torch.arange(pad_rows, device=device), counts[m], output_size=total)
        starts = torch.cumsum(counts[m], 0) - counts[m]
        col = col_order[m, torch.arange(total, device=device) - starts[row]]
        position = row * n_cols[m] + col
        scores = rows32[m, row] * cols32[m, col]  # float32, as the reference scores
        scores = torch.where(scores == 0, torch.zeros_like(scores), scores)  # -0.0 ties with 0.0
        if excludes[m].numel():
            slot = torch.searchsorted(excludes[m], position).clamp_max(excludes[m].numel() - 1)
            excluded = excludes[m][slot] == position
        else:
            excluded = torch.zeros_like(position, dtype=torch.bool)
        # one int64 per candidate, smaller is better: free first, then higher score (non-negative floats order like
        # their bit patterns), then lower position; unique, so the k-th smallest cuts exactly k
        rank = (excluded.long() << 62) | (((1 << 31) - 1 - scores.view(torch.int32).long()) << 31) | position
        take = torch.nonzero_static(rank <= _device.kth_smallest(rank, k), size=k).flatten()
        found.append(position[take].sort().values)
        checks.append(usable[m] & (torch.count_nonzero(~excluded & (scores >= t[m].float())) >= k))
    return [positions if ok else None for positions, ok in zip(found, torch.stack(checks).tolist())]
