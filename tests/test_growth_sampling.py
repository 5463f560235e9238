"""Random growth without permuting every position: distribution-free properties and a fixed-seed uniformity check.

The chi-square checks use fixed seeds, so they are deterministic; their thresholds sit far in the tail of the
chi-square distribution (p < 1e-6), which a biased sampler (e.g. modulo bias or a skipped region) exceeds.
"""

from __future__ import annotations

import pytest
import torch

from peft_sparse.selection import policies
from peft_sparse.selection.policies import free_positions_of_ranks, grow_random, sample_ranks

# numel on either side of the plain-permutation limit, and (monkeypatched) the sorting path
PATHS = ["permute", "mask", "sort"]


def _setup(path, monkeypatch):
    if path == "permute":
        return 5_000
    if path == "sort":
        monkeypatch.setattr(policies, "_MASK_LIMIT", 1_000)
    else:  # the mask also for the few draws of these tests
        monkeypatch.setattr(policies, "_MASK_SHARE", 10**9)
    return 300_000


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("k", [1, 700, 4_000])
def test_grow_random_properties(path, k, monkeypatch):
    numel = _setup(path, monkeypatch)
    gen = torch.Generator().manual_seed(11)
    excluded = torch.randperm(numel, generator=gen)[: numel // 3].sort().values
    a = grow_random(numel, excluded, k, torch.Generator().manual_seed(5))
    b = grow_random(numel, excluded, k, torch.Generator().manual_seed(5))
    c = grow_random(numel, excluded, k, torch.Generator().manual_seed(6))
    assert torch.equal(a, b)  # a function of the generator's state
    assert torch.equal(a, c) == (k >= numel - excluded.numel())  # another seed, other positions unless all taken
    assert a.numel() == min(k, numel - excluded.numel()) and a.dtype == torch.int64
    assert bool((a[1:] > a[:-1]).all())  # ascending, hence unique
    assert int(a.min()) >= 0 and int(a.max()) < numel
    assert not torch.isin(a, excluded).any()


def test_grow_random_takes_everything_free_when_asked_for_more():
    excluded = torch.tensor([0, 3, 4, 9])
    assert grow_random(10, excluded, 50, torch.Generator()).tolist() == [1, 2, 5, 6, 7, 8]
    big = torch.arange(0, 200_000, 2)
    got = grow_random(200_000, big, 150_000, torch.Generator().manual_seed(1))
    assert torch.equal(got, torch.arange(1, 200_000, 2))


def test_free_positions_of_ranks_matches_enumeration():
    gen = torch.Generator().manual_seed(2)
    numel = 1_000
    excluded = torch.randperm(numel, generator=gen)[:400].sort().values
    free = torch.ones(numel, dtype=torch.bool)
    free[excluded] = False
    free_positions = free.nonzero().squeeze(1)
    ranks = torch.arange(600)
    assert torch.equal(free_positions_of_ranks(excluded, ranks), free_positions)
    assert torch.equal(free_positions_of_ranks(torch.zeros(0, dtype=torch.long), ranks), ranks)


@pytest.mark.parametrize("path", PATHS)
def test_sample_ranks_is_uniform_over_positions(path, monkeypatch):
    # counts of each value over many draws of k of n: each value should appear k/n of the time
    n = _setup(path, monkeypatch)
    bins = 50
    k = 2 * n // 5 if path == "permute" else 300  # the "complement" path (k > n/2) is covered below
    draws = 400 if path == "permute" else 200
    counts = torch.zeros(bins)
    for seed in range(draws):
        got = sample_ranks(n, k, torch.Generator().manual_seed(1000 + seed))
        assert got.numel() == k and bool((got[1:] > got[:-1]).all())
        counts += torch.bincount(got * bins // n, minlength=bins).float()
    expected = draws * k / bins
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 110.0, chi2  # 49 degrees of freedom: P(chi2 > 110) < 1e-6


def test_sample_ranks_complement_path_is_uniform():
    n, k, draws = 100_000, 80_000, 30
    counts = torch.zeros(n)
    for seed in range(draws):
        got = sample_ranks(n, k, torch.Generator().manual_seed(seed))
        assert got.numel() == k and bool((got[1:] > got[:-1]).all())
        counts[got] += 1
    # each value is kept with probability 0.8: per-value counts are Binomial(30, 0.8); test 100 bins of 1000 values
    binned = counts.view(100, 1_000).sum(1)
    expected, variance = draws * 0.8 * 1_000, draws * 0.8 * 0.2 * 1_000
    chi2 = float(((binned - expected) ** 2 / variance).sum())
    assert chi2 < 180.0, chi2  # ~chi-square with 100 degrees of freedom: P(> 180) < 1e-6


def test_sample_ranks_small_sets_are_equally_likely():
    # all 10 subsets of size 2 of {0..4} over 5000 fixed-seed draws (small ranges are permuted)
    import itertools

    counts = {pair: 0 for pair in itertools.combinations(range(5), 2)}
    for seed in range(5_000):
        counts[tuple(sample_ranks(5, 2, torch.Generator().manual_seed(seed)).tolist())] += 1
    expected = 500.0
    chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
    assert chi2 < 45.0, chi2  # 9 degrees of freedom: P(chi2 > 45) < 1e-6


def test_sample_ranks_rejects_bad_k():
    with pytest.raises(ValueError, match="k must be in"):
        sample_ranks(5, 6, torch.Generator())


@pytest.mark.parametrize("kind", ["continuous", "ties", "nan", "zeros_and_inf", "bfloat16"])
@pytest.mark.parametrize("n,k", [(50, 7), (5_000, 600), (5_000, 4_000), (5_000, 5_000)])
def test_drop_smallest_equals_a_stable_full_sort(kind, n, k):
    gen = torch.Generator().manual_seed(n + k)
    values = torch.randn(n, generator=gen)
    if kind == "ties":
        values = torch.randint(-3, 4, (n,), generator=gen).float()
    if kind == "nan":
        values[::17] = float("nan")
        values[::23] = -float("nan")
    if kind == "zeros_and_inf":  # -0.0 and 0.0 tie; infinities before NaN
        values[::3], values[1::5], values[2::7] = -0.0, 0.0, float("inf")
        values[::11] = float("nan")
    if kind == "bfloat16":
        values = values.bfloat16()
    expected = torch.sort(values.float().abs(), stable=True).indices[:k]
    assert torch.equal(policies.drop_smallest(values, k), expected)


@pytest.mark.parametrize("offset", [0, -1_000, 1 << 30])  # the table, and the sorted-search path twice
def test_is_member_large_queries(offset):
    gen = torch.Generator().manual_seed(4)
    sorted_set = (torch.randperm(400_000, generator=gen)[:150_000] + offset).sort().values
    query = torch.randint(0, 400_000, (100_000,), generator=gen) + offset
    expected = torch.tensor([q in set(sorted_set.tolist()) for q in query[:2_000].tolist()])
    got = policies.is_member(sorted_set, query)
    assert torch.equal(got[:2_000], expected)
    assert torch.equal(got, torch.isin(query, sorted_set))
    shuffled = sorted_set[torch.randperm(sorted_set.numel(), generator=gen)]
    assert torch.equal(policies.is_member(shuffled, query, assume_sorted=False), got)
    small = policies.is_member(shuffled[:50], query[:50], assume_sorted=False)  # the binary-search path
    assert torch.equal(small, torch.isin(query[:50], shuffled[:50]))


@pytest.mark.parametrize(
    "set_size, query_size, span",
    [(3_000, 2_000, 100_000), (3_000, 2_000, 10**9), (5, 1_500, 7_000), (40, 30, 1_000)],
    ids=["table", "search-wide-range", "table-small-set", "search-small-query"],
)
def test_is_member_mid_size_queries(set_size, query_size, span):
    # the table answers queries whose range is within a few dozen times their size; the rest are searched
    gen = torch.Generator().manual_seed(set_size + query_size)
    members = torch.randint(0, span, (set_size,), generator=gen).unique()
    query = torch.cat(
        [
            members[torch.randint(0, members.numel(), (query_size // 2,), generator=gen)],
            torch.randint(0, span, (query_size - query_size // 2,), generator=gen),
        ]
    ).view(-1, 2)
    expected = torch.isin(query, members)
    assert torch.equal(policies.is_member(members, query), expected)
    shuffled = members[torch.randperm(members.numel(), generator=gen)]
    assert torch.equal(policies.is_member(shuffled, query, assume_sorted=False), expected)


@pytest.mark.parametrize("k", [1, 300, 9_000, 140_000])
def test_sample_ranks_mask_and_sort_give_the_same_ranks(k, monkeypatch):
    # which bookkeeping runs (chosen by size) must not change the result of a generator's state
    n = 300_000
    monkeypatch.setattr(policies, "_MASK_SHARE", 10**9)
    by_mask = sample_ranks(n, k, torch.Generator().manual_seed(k))
    monkeypatch.setattr(policies, "_MASK_LIMIT", 1_000)
    by_sort = sample_ranks(n, k, torch.Generator().manual_seed(k))
    assert by_mask.numel() == k and torch.equal(by_mask, by_sort)
