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

import torch

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

    With the columns sorted by score, the positions of row ``o`` scoring at least ``t`` are a prefix of that order,
    found by one ``searchsorted``, so how many positions score ``>= t`` is known for any ``t`` without enumerating
    them. A bisection finds the largest ``t`` at which (by float64 products, excluded positions subtracted) at least
    ``k`` free positions remain; those positions (a hair more, to cover the rounding of float32 products) are then
    enumerated, scored exactly as the reference scores them, and the best ``k`` taken with ties to the lower position.
    If the float32 scores of the enumerated set fall short of ``k`` at ``t`` (rounding), ``t`` is lowered and the
    search repeated; if it leaves float32's normal range (e.g. the ``k``-th best score is 0) the reference runs
    instead.
    """
    check_topk_outer_product_args(row_scores, col_scores, exclude_sorted, k)
    device = row_scores.device
    if k == 0:
        return torch.empty(0, dtype=torch.int64, device=device)
    rows, cols = row_scores.float(), col_scores.float()
    if bool((rows < 0).any()) or bool((cols < 0).any()):
        return topk_outer_product_reference(row_scores, col_scores, exclude_sorted, k)
    n_rows, n_cols = rows.numel(), cols.numel()
    exclude = exclude_sorted.long()
    ex_rows = torch.div(exclude, n_cols, rounding_mode="floor")
    ex_exact = (rows.double()[ex_rows] * cols.double()[exclude - ex_rows * n_cols]).sort().values
    col_sorted, col_order = torch.sort(cols, descending=True, stable=True)
    neg_cols64 = -col_sorted.double()
    rows64 = rows.double()

    def per_row(t: float) -> torch.Tensor:
        # positions of each row whose exact (float64) product is >= t: a prefix of the sorted columns
        bound = torch.where(rows64 > 0, t / rows64, torch.full_like(rows64, float("inf")))
        return torch.searchsorted(neg_cols64, -bound, right=True)

    def free_count(t: float) -> int:
        excluded_above = ex_exact.numel() - int(torch.searchsorted(ex_exact, torch.tensor(t, dtype=torch.float64,
                                                                                           device=device)))
        return int(per_row(t).sum()) - excluded_above

    hi = float(rows64.max()) * float(col_sorted[0].double()) * 2.0 + 1e-300
    target = k
    for _ in range(4):
        # bisection for the largest t with at least target free positions (stop once within 1 % + 64 of it)
        lo_t, hi_t = 0.0, hi
        for _ in range(200):
            mid = 0.5 * (lo_t + hi_t) if lo_t > 0 else hi_t / 2.0 if hi_t > 1e-30 * hi else 0.0
            if mid in (lo_t, hi_t):
                break
            count = free_count(mid)
            if count >= target:
                lo_t = mid
                if count <= target + target // 100 + 64:
                    break
            else:
                hi_t = mid
        t = lo_t
        if not 2.0**-100 <= t <= 2.0**100:
            # near float32's subnormal or overflow range the float32 product is not within 2**-24 of the exact one
            break
        counts = per_row(t * (1.0 - 2.0**-20))
        total = int(counts.sum())
        starts = torch.cumsum(counts, 0) - counts
        cand_rows = torch.repeat_interleave(torch.arange(n_rows, device=device), counts)
        cand_cols = col_order[torch.arange(total, device=device) - starts[cand_rows]]
        positions = cand_rows * n_cols + cand_cols
        if exclude.numel():
            slot = torch.searchsorted(exclude, positions).clamp_max(exclude.numel() - 1)
            free = exclude[slot] != positions
            positions, cand_rows, cand_cols = positions[free], cand_rows[free], cand_cols[free]
        scores = rows[cand_rows] * cols[cand_cols]  # float32, as the reference scores
        if int((scores.double() >= t).sum()) < k:
            target = 2 * target + 64  # rounding left fewer than k at t: search again further down
            continue
        kth = torch.kthvalue(scores, scores.numel() - k + 1).values
        above = scores > kth
        ties = positions[scores == kth].sort().values[: k - int(above.sum())]
        return torch.cat([positions[above], ties]).sort().values
    return topk_outer_product_reference(row_scores, col_scores, exclude_sorted, k)
