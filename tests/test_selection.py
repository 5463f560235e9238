"""Schedule, budgets and drop/grow policies against brute-force references."""

import math

import pytest
import torch

from peft_sparse.selection import (
    allocate_budgets,
    drop_smallest,
    grow_by_accumulated_gradient,
    grow_by_momentum_approximation,
    grow_random,
    in_estimation_phase,
    is_member,
    replace_entries,
    reselection_count,
)


def test_first_reselection_replaces_everything_then_linear_and_cosine_decay():
    assert reselection_count(20, 1000, 20, 0.2, 100) == 1000
    assert reselection_count(40, 1000, 20, 0.2, 100) == int(0.2 * (1 - 40 / 100) * 1000)
    assert reselection_count(40, 1000, 20, 0.2, 100, "cosine") == int(0.1 * (1 + math.cos(math.pi * 0.4)) * 1000)
    assert reselection_count(41, 1000, 20, 0.2, 100) == 0  # not a reselection step
    assert reselection_count(100, 1000, 20, 0.2, 100) == 0  # t = T
    assert reselection_count(60, 1000, 20, 0.2, None) == 200  # T unknown: constant rate
    with pytest.raises(ValueError, match="reselection_schedule"):
        reselection_count(40, 1000, 20, 0.2, 100, "step")


def test_estimation_phase_is_the_gamma_updates_before_each_reselection():
    phase = [t for t in range(1, 21) if in_estimation_phase(t, 5, 2, None)]
    assert phase == [4, 5, 9, 10, 14, 15, 19, 20]
    assert [t for t in range(1, 21) if in_estimation_phase(t, 5, 2, 10)] == [4, 5]  # no reselection at t >= T


def test_budgets():
    shapes = [(8, 4), (16, 16), (3, 5)]
    assert allocate_budgets(shapes, density=0.25) == [8, 64, 4]
    spread = allocate_budgets(shapes, num_tunable_weights=50)
    assert sum(spread) == 50
    for k, (r, c) in zip(spread, shapes):
        assert abs(k - 50 * r * c / 303) < 1
    assert allocate_budgets(shapes, match_lora_rank=2) == [24, 64, 15]  # capped at numel
    with pytest.raises(ValueError, match="exceeds"):
        allocate_budgets(shapes, num_tunable_weights=304)
    with pytest.raises(ValueError, match="exactly one"):
        allocate_budgets(shapes, density=0.1, match_lora_rank=2)


def test_drop_smallest_orders_by_magnitude_with_stable_ties():
    values = torch.tensor([0.5, -0.1, 0.0, 0.1, -2.0, 0.0])
    assert drop_smallest(values, 4).tolist() == [2, 5, 1, 3]


def test_is_member():
    assert is_member(torch.tensor([1, 4, 9]), torch.tensor([0, 1, 9, 10])).tolist() == [False, True, True, False]
    assert is_member(torch.tensor([], dtype=torch.long), torch.tensor([3])).tolist() == [False]


def test_momentum_growth_matches_dense_outer_product():
    g = torch.Generator().manual_seed(0)
    rows, cols = torch.rand(13, generator=g), torch.rand(29, generator=g)
    excluded = torch.sort(torch.randperm(13 * 29, generator=g)[:40]).values
    dense = (rows[:, None] * cols[None, :]).view(-1)
    dense[excluded] = -1
    expected = torch.topk(dense, 25).indices
    got = grow_by_momentum_approximation(rows, cols, excluded, 25, "torch")
    assert set(got.tolist()) == set(expected.tolist())


def test_accumulated_gradient_growth_skips_kept_positions():
    candidates = torch.tensor([10, 3, 7, 20, 5])
    mean = torch.tensor([0.1, -0.9, 0.5, 0.4, -0.2])
    chosen = grow_by_accumulated_gradient(candidates, mean, torch.tensor([3]), 3)
    assert candidates[chosen].tolist() == [7, 20, 5]


def test_random_growth_is_unique_outside_the_excluded_set_and_seeded():
    excluded = torch.tensor([0, 5, 6, 100])
    for numel in (200, 1 << 23):  # the dense-permutation and the rejection-sampling paths
        a = grow_random(numel, excluded, 50, torch.Generator().manual_seed(3))
        b = grow_random(numel, excluded, 50, torch.Generator().manual_seed(3))
        assert torch.equal(a, b)
        assert a.unique().numel() == 50
        assert not is_member(excluded, a).any()
        assert int(a.min()) >= 0 and int(a.max()) < numel
    assert grow_random(6, torch.tensor([1, 2]), 10, torch.Generator()).sort().values.tolist() == [0, 3, 4, 5]


def test_replace_entries_keeps_regrown_slots_and_never_drops_more_than_grown():
    indices = torch.tensor([40, 11, 12, 13, 14, 15], dtype=torch.int32)
    values = torch.tensor([0.9, 0.01, 0.02, 0.03, 0.8, 0.7])
    seen = {}

    def grow(excluded, k):
        seen["excluded"], seen["k"] = excluded.tolist(), k
        return torch.tensor([12, 99])  # one dropped position regrown, one new; fewer than k

    slots, new_positions, chosen = replace_entries(indices, values, 3, grow)
    assert seen == {"excluded": [14, 15, 40], "k": 3}
    assert new_positions.tolist() == [99]
    assert slots.tolist() == [1]  # position 11, the smallest |value| not regrown
    assert chosen.tolist() == [99]
    updated = indices.clone()
    updated[slots] = new_positions.int()
    assert sorted(updated.tolist()) == [12, 13, 14, 15, 40, 99]
    empty = replace_entries(indices, values, 0, grow)
    assert all(t.numel() == 0 for t in empty)
