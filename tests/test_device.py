"""peft_sparse._device: the k-th smallest value off the CPU (torch.topk) against torch.kthvalue."""

import pytest
import torch

from peft_sparse import _device


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64])
@pytest.mark.parametrize("n", [1, 2, 7, 1000])
def test_kth_smallest_off_the_cpu_matches_kthvalue(dtype, n, monkeypatch):
    gen = torch.Generator().manual_seed(n)
    if dtype == torch.int64:
        values = torch.randint(-3, 4, (n,), generator=gen)  # many ties
    else:
        values = (torch.randn(n, generator=gen) * 5).to(dtype)
    ks = sorted({1, 2, n // 2, n - 1, n} & set(range(1, n + 1)))
    expected = [torch.kthvalue(values, k).values for k in ks]
    assert [_device.kth_smallest(values, k) for k in ks] == expected  # the CPU: kthvalue itself
    monkeypatch.setattr(_device, "host_reads_are_free", lambda device: False)
    for k, want in zip(ks, expected):
        got = _device.kth_smallest(values, k)
        assert got.dim() == 0 and got.dtype == dtype and torch.equal(got, want), (k, got, want)


def test_kth_smallest_orders_nan_last_like_kthvalue(monkeypatch):
    values = torch.tensor([1.0, float("nan"), 0.5, float("inf"), float("nan")])
    monkeypatch.setattr(_device, "host_reads_are_free", lambda device: False)
    for k in range(1, 6):
        torch.testing.assert_close(
            _device.kth_smallest(values, k), torch.kthvalue(values, k).values, rtol=0, atol=0, equal_nan=True
        )


def test_kth_smallest_rejects_bad_arguments():
    with pytest.raises(ValueError, match="k=0"):
        _device.kth_smallest(torch.ones(3), 0)
    with pytest.raises(ValueError, match="k=4"):
        _device.kth_smallest(torch.ones(3), 4)
    with pytest.raises(ValueError, match=r"shape \(2, 2\)"):
        _device.kth_smallest(torch.ones(2, 2), 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_kth_smallest_matches_kthvalue_without_synchronizing():
    gen = torch.Generator(device="cuda").manual_seed(0)
    values = torch.randn(3_000_001, generator=gen, device="cuda")  # a long vector, as the AG candidate pool
    values[::1000] = values[1]  # ties
    ks = [1, 2, 1_000_000, 1_500_001, 2_999_999, 3_000_001]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = [_device.kth_smallest(values, k) for k in ks]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    expected = [torch.kthvalue(values.cpu(), k).values for k in ks]
    assert [g.cpu() for g in got] == expected
