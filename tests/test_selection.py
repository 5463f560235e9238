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
    is_reselection_step,
    policies,
    replace_entries,
    reselection_count,
    top_gradient_candidates,
)


def test_first_reselection_after_gamma_replaces_everything_then_linear_and_cosine_decay():
    # thesis eq. 7.6 and the reference schedule: reselections after updates gamma, S + gamma, 2S + gamma, ...
    count = reselection_count
    assert [t for t in range(1, 70) if count(t, 1000, 20, 0.2, 100, accumulation_steps=5)] == [5, 25, 45, 65]
    assert count(5, 1000, 20, 0.2, 100, accumulation_steps=5) == 1000
    assert count(20, 1000, 20, 0.2, 100, accumulation_steps=5) == 0  # the old first reselection point
    assert count(25, 1000, 20, 0.2, 100, accumulation_steps=5) == int(0.2 * (1 - 25 / 100) * 1000)
    cosine = count(45, 1000, 20, 0.2, 100, "cosine", accumulation_steps=5)
    assert cosine == int(0.1 * (1 + math.cos(math.pi * 0.45)) * 1000)
    assert count(26, 1000, 20, 0.2, 100, accumulation_steps=5) == 0  # not a reselection step
    assert count(45, 1000, 20, 0.2, 45, accumulation_steps=5) == 0  # t = T
    assert count(5, 1000, 20, 0.2, 5, accumulation_steps=5) == 0  # t = T, even the first
    assert count(65, 1000, 20, 0.2, None, accumulation_steps=5) == 200  # T unknown: constant rate
    assert count(20, 1000, 20, 0.2, 100, accumulation_steps=20) == 1000  # gamma = S
    with pytest.raises(ValueError, match="reselection_schedule"):
        count(25, 1000, 20, 0.2, 100, "step", accumulation_steps=5)


def test_is_reselection_step_follows_gamma_then_every_s():
    assert [t for t in range(0, 40) if is_reselection_step(t, 10, None, 3)] == [3, 13, 23, 33]
    assert [t for t in range(0, 40) if is_reselection_step(t, 10, 23, 3)] == [3, 13]
    assert [t for t in range(0, 25) if is_reselection_step(t, 4, None, 4)] == [4, 8, 12, 16, 20, 24]


def test_estimation_phase_is_the_gamma_updates_before_each_reselection():
    # S = 5, gamma = 2: reselections after 2, 7, 12, 17; phases 1-2, 6-7, 11-12, 16-17
    phase = [t for t in range(1, 21) if in_estimation_phase(t, 5, 2, None)]
    assert phase == [1, 2, 6, 7, 11, 12, 16, 17]
    assert [t for t in range(1, 21) if in_estimation_phase(t, 5, 2, 10)] == [1, 2, 6, 7]  # none at t >= T
    assert [t for t in range(1, 13) if in_estimation_phase(t, 4, 4, None)] == list(range(1, 13))  # gamma = S


def test_budgets():
    shapes = [(8, 4), (16, 16), (3, 5)]
    assert allocate_budgets(shapes, density=0.25) == [8, 64, 4]
    spread = allocate_budgets(shapes, num_tunable_weights=50)
    assert sum(spread) == 50
    for k, (r, c) in zip(spread, shapes):
        assert abs(k - 50 * r * c / 303) < 1
    # LoRA r=2 on these shapes has 2*(12 + 32 + 8) = 104 parameters; spread at equal density over 303 entries:
    # exact shares 104*32/303 = 10.98, 104*256/303 = 87.87, 104*15/303 = 5.15 -> 10, 87, 5 + 2 by largest remainder
    assert allocate_budgets(shapes, match_lora_rank=2) == [11, 88, 5]
    assert allocate_budgets(shapes, match_lora_rank=2, allocation="lora_per_tensor") == [24, 64, 15]  # capped
    assert allocate_budgets(shapes, match_lora_rank=100) == [32, 256, 15]  # more than all entries: everything
    with pytest.raises(ValueError, match="budget_allocation"):
        allocate_budgets(shapes, match_lora_rank=2, allocation="per_tensor")
    with pytest.raises(ValueError, match="exceeds"):
        allocate_budgets(shapes, num_tunable_weights=304)
    with pytest.raises(ValueError, match="exactly one"):
        allocate_budgets(shapes, density=0.1, match_lora_rank=2)


def test_match_lora_rank_is_lora_total_at_equal_density_on_llama_7b_shapes():
    # Llama-7B attention (4096 x 4096) and MLP (11008 x 4096) shapes, LoRA r = 8 on q, k, v, o, gate, up, down
    shapes = [(4096, 4096)] * 4 + [(11008, 4096), (11008, 4096), (4096, 11008)]
    lora_total = 4 * 8 * 8192 + 3 * 8 * 15104  # 262144 + 362496 = 624640
    budgets = allocate_budgets(shapes, match_lora_rank=8)
    assert sum(budgets) == lora_total
    entries = 4 * 4096 * 4096 + 3 * 11008 * 4096
    density = lora_total / entries  # 624640 / 202375168
    for k, (r, c) in zip(budgets, shapes):
        assert abs(k - density * r * c) < 1
    # exact shares 51783.63 (x4) and 139168.50 (x3): floors leave 4 over, which go to the larger remainders
    assert budgets == [51784] * 4 + [139168] * 3
    per_tensor = allocate_budgets(shapes, match_lora_rank=8, allocation="lora_per_tensor")
    assert per_tensor == [65536] * 4 + [120832] * 3


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
    # fewer allowed candidates than asked for: only those
    chosen = grow_by_accumulated_gradient(candidates[:3], mean[:3], torch.tensor([3, 7]), 2)
    assert candidates[chosen].tolist() == [10]


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


def test_replace_entries_excluding_dropped_positions_grows_only_inactive_ones():
    # the SpIEL reference's MA rule: every currently active position is excluded from growth
    indices = torch.tensor([40, 11, 12, 13, 14, 15], dtype=torch.int32)
    values = torch.tensor([0.9, 0.01, 0.02, 0.03, 0.8, 0.7])
    seen = {}

    def grow(excluded, k):
        seen["excluded"] = excluded.tolist()
        return torch.tensor([99, 7, 50])

    slots, new_positions, chosen = replace_entries(indices, values, 3, grow, exclude_dropped=True)
    assert seen["excluded"] == [11, 12, 13, 14, 15, 40]
    assert slots.tolist() == [1, 2, 3] and new_positions.tolist() == [99, 7, 50]


# blocks of at most max(block_elements, 4 k) numbers of the 12 x 9 gradient: one block; 7 rows; one row at a time
@pytest.mark.parametrize("block_elements, k", [(1 << 20, 17), (7, 17), (7, 2)])
def test_gradient_candidates_are_the_top_k_of_the_dense_gradient(block_elements, k):
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randn(5, 12, generator=gen), torch.randn(5, 9, generator=gen)
    dense = (a.double().t() @ b.double()).view(-1)
    positions, grads = top_gradient_candidates(a, b, k, block_elements=block_elements)
    expected = torch.topk(dense.abs(), k).indices
    assert sorted(positions.tolist()) == sorted(expected.tolist())
    torch.testing.assert_close(grads.double(), dense[positions], rtol=1e-5, atol=1e-6)
    # the reduction (e.g. the mean over ranks) applies to every block before selection
    halved, halved_grads = top_gradient_candidates(a, b, k, reduce=lambda t: t / 2, block_elements=block_elements)
    assert sorted(halved.tolist()) == sorted(expected.tolist())
    torch.testing.assert_close(halved_grads.double(), dense[halved] / 2, rtol=1e-5, atol=1e-6)
    everything, _ = top_gradient_candidates(a, b, 1000, block_elements=block_elements)  # k above rows * cols
    assert sorted(everything.tolist()) == list(range(12 * 9))


@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)])
def test_gradient_candidates_of_half_operands_in_float32(dtypes):
    # the backward hands over the compute dtype; the candidates' gradients come out float32 either way
    gen = torch.Generator().manual_seed(4)
    a, b = torch.randn(6, 10, generator=gen).to(dtypes[0]), torch.randn(6, 8, generator=gen).to(dtypes[1])
    dense = (a.double().t() @ b.double()).view(-1)
    positions, grads = top_gradient_candidates(a, b, 9, block_elements=16)
    assert grads.dtype == torch.float32
    assert sorted(positions.tolist()) == sorted(torch.topk(dense.abs(), 9).indices.tolist())
    torch.testing.assert_close(grads.double(), dense[positions], rtol=1e-5, atol=1e-6)


def _valid_top_k(positions, grads, dense, k):
    """The candidates are k distinct positions whose magnitudes (NaN the largest) are at least every other's."""
    magnitude = dense.abs().nan_to_num(nan=float("inf"))
    chosen = torch.zeros(dense.numel(), dtype=torch.bool)
    chosen[positions] = True
    assert positions.numel() == k and int(chosen.sum()) == k
    if k < dense.numel():
        assert magnitude[chosen].min() >= magnitude[~chosen].max()
    torch.testing.assert_close(grads.double(), dense[positions], rtol=1e-5, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("block_elements", [1 << 20, 30, 9])
def test_gradient_candidates_with_ties_and_nan(block_elements):
    # integer-valued gradients: many equal magnitudes around the k-th; one NaN, which topk ranks first
    gen = torch.Generator().manual_seed(5)
    a = torch.randint(-2, 3, (3, 14), generator=gen).float()
    b = torch.randint(-2, 3, (3, 9), generator=gen).float()
    a[0, 5] = float("nan")  # a NaN row of the gradient
    dense = (a.double().t() @ b.double()).view(-1)
    for k in (1, 10, 40, 126):
        positions, grads = top_gradient_candidates(a, b, k, block_elements=block_elements)
        _valid_top_k(positions, grads, dense, k)


@pytest.mark.parametrize("block_elements, k", [(1 << 20, 50), (60, 20), (200, 50)])
def test_gradient_candidates_when_the_sampled_cut_keeps_too_few(monkeypatch, block_elements, k):
    # a sample of 4 magnitudes, which here are the 4 largest of the 40 x 30 gradient: its quantile passes fewer than
    # k entries, and the exact k-th largest of the block is used instead
    monkeypatch.setattr(policies, "CUT_SAMPLE_ELEMENTS", 4)
    gen = torch.Generator().manual_seed(6)
    a, b = torch.randn(7, 40, generator=gen), torch.randn(7, 30, generator=gen)
    a[:, [0, 10, 20, 30]] *= 50  # flat positions 0, 300, 600, 900: the strided sample of one 1200-number block
    b[:, 0] *= 50
    dense = (a.double().t() @ b.double()).view(-1)
    sizes = []
    kthvalue = torch.kthvalue
    monkeypatch.setattr(policies.torch, "kthvalue", lambda t, *args: sizes.append(t.numel()) or kthvalue(t, *args))
    positions, grads = top_gradient_candidates(a, b, k, block_elements=block_elements)
    monkeypatch.undo()
    assert sorted(positions.tolist()) == sorted(torch.topk(dense.abs(), k).indices.tolist())
    torch.testing.assert_close(grads.double(), dense[positions], rtol=1e-5, atol=1e-6)
    if block_elements > 40 * 30:
        assert 40 * 30 in sizes  # the exact cut over the whole block was needed
