"""The sparse delta's pure functions against dense computations."""

import pytest
import torch

from peft_sparse.delta import check_delta, combine, index_dtype_for, merge_exact, restore_exact, to_dense


def test_index_dtype_switches_to_int64_at_2_pow_31():
    assert index_dtype_for(2**31 - 1) == torch.int32
    assert index_dtype_for(2**31) == torch.int64


@pytest.mark.parametrize(
    "indices,values,message",
    [
        (torch.tensor([0, 12]), torch.zeros(2), "out of range"),
        (torch.tensor([-1, 2]), torch.zeros(2), "out of range"),
        (torch.tensor([3, 3]), torch.zeros(2), "duplicates"),
        (torch.tensor([1, 2, 3]), torch.zeros(2), "3 indices but 2 values"),
        (torch.tensor([1.0]), torch.zeros(1), "must be integers"),
        (torch.tensor([1]), torch.zeros(1, dtype=torch.int64), "floating point"),
        (torch.tensor([[1]]), torch.zeros(1), "1-D"),
    ],
)
def test_check_delta_rejects_bad_deltas(indices, values, message):
    with pytest.raises(ValueError, match=message):
        check_delta(indices, values, (3, 4), "layer")


def test_merge_then_restore_is_bit_exact_in_bf16():
    torch.manual_seed(0)
    weight = torch.randn(64, 48).to(torch.bfloat16)
    original = weight.clone()
    indices = torch.randperm(weight.numel())[:500].int()
    values = torch.randn(500) * 1e-3  # small updates: bf16 rounding makes W + d - d != W
    saved = merge_exact(weight, indices, values)
    expected = original.float().view(-1).clone()
    expected[indices.long()] += values
    torch.testing.assert_close(weight.float().view(-1), expected.to(torch.bfloat16).float())
    restore_exact(weight, indices, saved)
    assert torch.equal(weight, original)


def test_combine_is_the_weighted_dense_sum():
    a = (torch.tensor([0, 5, 7]), torch.tensor([1.0, 2.0, 3.0]))
    b = (torch.tensor([5, 9]), torch.tensor([10.0, 20.0]))
    indices, values = combine([a, b], [0.5, 2.0], 12)
    expected = 0.5 * to_dense(*a, (3, 4)) + 2.0 * to_dense(*b, (3, 4))
    torch.testing.assert_close(to_dense(indices, values, (3, 4)), expected)
    assert indices.tolist() == [0, 5, 7, 9] and indices.dtype == torch.int32
