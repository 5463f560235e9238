"""The training hot path: value-gradient strategies, the sorted-position cache, the in-place merged weight and the
threshold top-k of an outer product, each against an independent dense float64 (or brute-force) computation."""

from __future__ import annotations

import importlib
import warnings

import pytest
import torch
from helpers import HostReads

from peft_sparse import _device, sparse_linear
from peft_sparse.kernels import (
    dispatch,
    sddmm,
    sddmm_csr,
    sddmm_dense,
    sorted_positions,
    topk_outer_product,
    topk_outer_product_batched,
    topk_outer_product_many,
    topk_outer_product_reference,
    topk_outer_product_threshold,
)
from peft_sparse.kernels.positions import build_sorted_positions, rows_and_cols
from peft_sparse.sparse_linear import merge_mode, merged_weight, release_held_merges, sparse_delta_linear
from peft_sparse.tuners.base_weight import DenseBaseWeight

# the package exports functions of these names
sddmm_module = importlib.import_module("peft_sparse.kernels.sddmm")
topk_module = importlib.import_module("peft_sparse.kernels.topk_outer_product")
STRATEGIES = {"csr": sddmm_csr, "dense": sddmm_dense}


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    for var in (dispatch.ENV_VAR, dispatch.SDDMM_ENV_VAR, "PEFT_SPARSE_INPLACE_MERGE"):
        monkeypatch.delenv(var, raising=False)
    dispatch.set_sddmm_strategy(None)
    yield
    dispatch.set_sddmm_strategy(None)  # a strategy pinned by a test must not reach the next test file


def _operands(tokens, rows, cols, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, rows, generator=gen).to(dtype), torch.randn(tokens, cols, generator=gen).to(dtype)


def _indices(numel, k, dtype=torch.int64, seed=0):
    return torch.randperm(numel, generator=torch.Generator().manual_seed(seed))[:k].to(dtype)


def _dense_truth(a, b, indices):
    return (a.double().T @ b.double()).flatten()[indices.long()]


# ------------------------------------------------------------------------------------------------- value gradient
@pytest.mark.parametrize("name", sorted(STRATEGIES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("tokens,rows,cols,density", [(1, 7, 13, 0.3), (37, 33, 65, 0.01), (37, 33, 65, 1.0)])
def test_sddmm_strategies_match_dense_product(name, dtype, index_dtype, tokens, rows, cols, density):
    a, b = _operands(tokens, rows, cols, dtype)
    idx = _indices(rows * cols, max(1, round(density * rows * cols)), index_dtype, seed=tokens)
    got = STRATEGIES[name](a, b, idx, cols)
    assert got.dtype == torch.float32 and got.shape == idx.shape
    torch.testing.assert_close(got.double(), _dense_truth(a, b, idx), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reads", ["cpu", "accelerator"])
def test_sddmm_dense_in_row_blocks(reads, monkeypatch):
    # blocks of 3 rows (the last one partial), some without any position; the accelerator's path reads nothing
    monkeypatch.setattr(sddmm_module, "DENSE_CHUNK_ELEMENTS", 3 * 65)
    if reads == "accelerator":
        monkeypatch.setattr(_device, "host_reads_are_free", lambda device: False)
    a, b = _operands(19, 34, 65)
    idx = torch.cat([_indices(10 * 65, 40, seed=1), 20 * 65 + _indices(14 * 65, 60, seed=2)])
    idx = idx[torch.randperm(idx.numel(), generator=torch.Generator().manual_seed(3))]  # not in row-major order
    recorder = HostReads()
    with recorder:
        got = sddmm_dense(a, b, idx, 65)
    torch.testing.assert_close(got.double(), _dense_truth(a, b, idx), rtol=1e-5, atol=1e-5)
    assert (recorder.reads == []) == (reads == "accelerator"), recorder.reads


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_sddmm_strategies_empty_and_no_tokens(name):
    a, b = _operands(5, 4, 6)
    assert STRATEGIES[name](a, b, torch.zeros(0, dtype=torch.int64), 6).numel() == 0
    got = STRATEGIES[name](a[:0], b[:0], torch.tensor([0, 7, 23]), 6)
    assert got.tolist() == [0.0, 0.0, 0.0]


def test_sorted_positions_follow_in_place_changes_of_the_indices():
    a, b = _operands(9, 11, 17)
    idx = _indices(11 * 17, 30, seed=3)
    before = idx.clone()
    first = sorted_positions(idx, 11, 17)
    assert sorted_positions(idx, 11, 17) is first  # cached
    torch.testing.assert_close(sddmm_csr(a, b, idx, 17).double(), _dense_truth(a, b, idx), rtol=1e-5, atol=1e-5)
    assert torch.equal(idx, before)  # the slots keep their order
    free = torch.tensor(sorted(set(range(11 * 17)) - set(idx.tolist()))[:5])
    idx[[0, 4, 9, 20, 29]] = free  # a reselection writes new positions into some slots
    refreshed = sorted_positions(idx, 11, 17)
    assert refreshed is not first
    assert torch.equal(refreshed.sorted, torch.sort(idx).values)
    torch.testing.assert_close(sddmm_csr(a, b, idx, 17).double(), _dense_truth(a, b, idx), rtol=1e-5, atol=1e-5)


def test_csr_shares_one_transposed_copy_of_an_input_between_projections():
    # query/key/value read one activation: their backward passes views of it, which are transposed once
    a_q, a_k = _operands(12, 9, 20, seed=1)[0], _operands(12, 9, 20, seed=2)[0]
    x = torch.randn(1, 12, 20)
    idx = _indices(9 * 20, 25, seed=4)
    first = sddmm_module.token_major_operand(x.reshape(-1, 20))
    assert torch.equal(first, x.reshape(-1, 20).T) and first.is_contiguous()
    assert sddmm_module.token_major_operand(x.reshape(-1, 20)) is first
    for a in (a_q, a_k):
        b = x.reshape(-1, 20)
        torch.testing.assert_close(sddmm_csr(a, b, idx, 20).double(), _dense_truth(a, b, idx), rtol=1e-5, atol=1e-5)
    # an in-place change of the activation is seen (its version changes), and so is a different tensor
    x.mul_(-2)
    b = x.reshape(-1, 20)
    assert sddmm_module.token_major_operand(b) is not first
    torch.testing.assert_close(sddmm_csr(a_q, b, idx, 20).double(), _dense_truth(a_q, b, idx), rtol=1e-5, atol=1e-5)
    other = x.clone()
    assert torch.equal(sddmm_module.token_major_operand(other.reshape(-1, 20)), b.T)
    assert sddmm_module.token_major_operand(other.reshape(-1, 20)) is not sddmm_module.token_major_operand(b)


def test_transposed_copy_is_not_kept_past_its_activation():
    x, dy = torch.randn(8, 30), torch.randn(8, 12)
    copy = sddmm_module.token_major_operand(x[:, :])
    dy_copy = sddmm_module.token_major_operand(dy, role="a")
    assert sddmm_module._token_major["b"][2] == (copy,) and sddmm_module._token_major["a"][2] == (dy_copy,)
    del x
    assert "b" not in sddmm_module._token_major and sddmm_module._token_major["a"][2] == (dy_copy,)
    del dy
    assert not sddmm_module._token_major


@pytest.mark.parametrize("threads", [1, 2])
def test_transposed_copies_are_exact_with_any_thread_count(threads):
    x = torch.randn(37, 300)[:, :290]  # not contiguous
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = torch.empty(290, 37)
        sddmm_module._transpose_into(out, x)
        chunks = sddmm_module.token_major_chunks(x, 16, role="test")
    finally:
        torch.set_num_threads(before)
        sddmm_module.clear_token_major_cache()
    assert torch.equal(out, x.T) and torch.equal(torch.cat(chunks, dim=1), x.T)


def test_token_major_chunks_are_runs_of_the_transpose():
    x = torch.randn(23, 7)[:, :6]  # not contiguous
    chunks = sddmm_module.token_major_chunks(x, 5, role="test")
    assert [tuple(c.shape) for c in chunks] == [(6, 5)] * 4 + [(6, 3)]
    assert all(c.is_contiguous() for c in chunks)
    assert torch.equal(torch.cat(chunks, dim=1), x.T)
    assert sddmm_module.token_major_chunks(x, 5, role="test") is chunks
    assert sddmm_module.token_major_chunks(x, 23, role="test")[0].equal(x.T)
    assert [tuple(c.shape) for c in sddmm_module.token_major_chunks(torch.randn(0, 4), 8, role="test")] == [(4, 0)]
    assert sddmm_module.token_major_chunks(x.double(), 5, torch.float64, "test")[0].dtype == torch.float64
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match=f"chunk must be a positive int, got {bad!r}"):
            sddmm_module.token_major_chunks(x, bad, role="test")
    sddmm_module.clear_token_major_cache()


@pytest.mark.parametrize("tokens", [1, 4, 5, 16, 33])
def test_csr_in_runs_of_tokens_matches_dense_truth(monkeypatch, tokens):
    # runs of 5 tokens: one shorter, one exact, several with a shorter last one
    monkeypatch.setattr(sddmm_module, "CSR_CPU_TOKEN_CHUNK", 5)
    made = []
    original = torch.sparse.sampled_addmm

    def counting(*args, **kwargs):
        made.append(args[1].shape[1])
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.sparse, "sampled_addmm", counting)
    dy, x = _operands(tokens, 9, 20, seed=tokens)
    idx = _indices(9 * 20, 40, seed=3)
    torch.testing.assert_close(sddmm_csr(dy, x, idx, 20).double(), _dense_truth(dy, x, idx), rtol=1e-5, atol=1e-5)
    assert made == [min(5, tokens - s) for s in range(0, tokens, 5)]


def test_csr_transposes_the_output_gradient_once_for_values_and_candidates(monkeypatch):
    # SpIEL-AG's estimation updates take a second product with the same dy and x (at the candidates)
    dy, x = _operands(16, 9, 20, seed=5)
    values_idx, candidates = _indices(9 * 20, 30, seed=6), _indices(9 * 20, 45, seed=7)
    made = []
    original = torch.Tensor.copy_

    def counting_copy(self, src, *args, **kwargs):
        made.append(tuple(self.shape[:2]))  # with several threads the copy goes through a [features, n, 1] view
        return original(self, src, *args, **kwargs)

    sddmm_module.clear_token_major_cache()
    monkeypatch.setattr(torch.Tensor, "copy_", counting_copy)
    first = sddmm_csr(dy, x, values_idx, 20)
    second = sddmm_csr(dy, x, candidates, 20)
    monkeypatch.undo()
    assert made == [(9, 16), (20, 16)]  # one transposed copy of each operand for both products
    torch.testing.assert_close(first.double(), _dense_truth(dy, x, values_idx), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(second.double(), _dense_truth(dy, x, candidates), rtol=1e-5, atol=1e-5)


def test_rows_and_cols_of_flat_positions():
    idx = torch.tensor([0, 16, 17, 33, 50, 101], dtype=torch.int32)
    rows, cols = rows_and_cols(idx, 17)
    assert rows.tolist() == [p // 17 for p in idx.tolist()]
    assert cols.tolist() == [p % 17 for p in idx.tolist()]
    assert rows.dtype == cols.dtype == torch.int64


@pytest.mark.parametrize("ncols", [1, 2, 3, 7, 17, 1023, 1024, 1025, 2816, 11008, 14336, 2**20 + 7, 2**30, 2**31 - 1])
def test_rows_and_cols_multiply_and_shift_int32_positions_exactly(ncols):
    # int32 positions take a multiplication and a shift instead of a division: exact up to 2**31 - 1
    gen = torch.Generator().manual_seed(ncols % 1000)
    edges = [0, 1, ncols - 1, ncols, ncols + 1, 2**31 - 1, 2**31 - 2, (2**31 - 1) // ncols * ncols]
    edges += [(2**31 - 1) // ncols * ncols - 1]
    positions = torch.cat([torch.randint(0, 2**31 - 1, (50_000,), generator=gen), torch.tensor(edges)])
    positions = positions.clamp(0, 2**31 - 1)
    wide = positions.clone()  # int64: the division
    rows, cols = rows_and_cols(positions.int(), ncols)
    assert torch.equal(rows, torch.div(positions, ncols, rounding_mode="floor"))
    assert torch.equal(cols, positions % ncols)
    wide_rows, wide_cols = rows_and_cols(wide, ncols)
    assert torch.equal(wide_rows, rows) and torch.equal(wide_cols, cols)
    assert torch.equal(wide, positions)  # the int64 input is left as it was


def test_build_sorted_positions_is_the_csr_of_the_positions():
    idx = torch.tensor([13, 2, 40, 7, 8, 39])
    order = build_sorted_positions(idx, 5, 9)
    assert order.sorted.tolist() == [2, 7, 8, 13, 39, 40]
    assert idx[order.perm].tolist() == order.sorted.tolist()
    assert order.crow.tolist() == [0, 3, 4, 4, 4, 6]  # rows 0: 2,7,8; 1: 13; 4: 39,40
    assert order.col.tolist() == [2, 7, 8, 4, 3, 4]


def test_cpu_csr_choice_follows_the_measured_crossovers():
    # one thread; small matrices: the operands' transposes cost more than the dense product, at any density
    assert not dispatch.cpu_csr_is_faster(128, 128, 81, threads=1)
    assert not dispatch.cpu_csr_is_faster(352, 128, 225, threads=1)
    # cpu-hotpath and Llama-7B shapes: csr up to about 12 % (15-16 % at [4096, 4096]), dense above
    assert dispatch.cpu_csr_is_faster(2816, 1024, 61_440, threads=1)  # LoRA r=16's budget, 2.1 %
    assert dispatch.cpu_csr_is_faster(2816, 1024, int(0.11 * 2816 * 1024), threads=1)
    assert not dispatch.cpu_csr_is_faster(2816, 1024, int(0.14 * 2816 * 1024), threads=1)
    assert dispatch.cpu_csr_is_faster(4096, 4096, int(0.14 * 4096 * 4096), threads=1)
    assert not dispatch.cpu_csr_is_faster(4096, 4096, int(0.17 * 4096 * 4096), threads=1)
    # more threads: the transposes' share grows (threads ** 0.5), so csr needs a larger matrix or fewer positions
    assert dispatch.cpu_csr_is_faster(1024, 1024, int(0.105 * 1024 * 1024), threads=1)
    assert not dispatch.cpu_csr_is_faster(1024, 1024, int(0.105 * 1024 * 1024), threads=2)
    assert dispatch.cpu_csr_is_faster(1024, 1024, int(0.02 * 1024 * 1024), threads=2)
    ratios = [dispatch.cpu_csr_cost_ratio(2816, 1024, 61_440, threads=t) for t in (1, 2, 4, 16)]
    assert ratios == sorted(ratios) and ratios[0] < ratios[-1]
    # the default is torch's thread count; the ratio is the estimate's csr / dense time
    assert dispatch.cpu_csr_cost_ratio(1024, 1024, 1000) == dispatch.cpu_csr_cost_ratio(
        1024, 1024, 1000, torch.get_num_threads()
    )
    assert dispatch.cpu_csr_cost_ratio(100, 100, 50, threads=3) == pytest.approx(
        (6.7 * 50 + 3**0.5 * 118 * 200) / 10_000
    )
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match=f"threads must be a positive int, got {bad!r}"):
            dispatch.cpu_csr_cost_ratio(8, 8, 1, bad)


def test_sddmm_strategy_choice_on_cpu(monkeypatch):
    a, b = _operands(4, 1024, 1024)
    sparse, dense = _indices(1024 * 1024, 10_000), _indices(1024 * 1024, 300_000)
    assert dispatch.choose_sddmm_strategy(a, b, sparse, 1024, "auto") == "csr"
    assert dispatch.choose_sddmm_strategy(a, b, dense, 1024, "auto") == "dense"
    small_a, small_b = _operands(4, 128, 128)
    assert dispatch.choose_sddmm_strategy(small_a, small_b, _indices(128 * 128, 100), 128, "auto") == "dense"
    assert dispatch.choose_sddmm_strategy(a, b, sparse, 1024, "triton") == "triton"
    dispatch.set_sddmm_strategy("gather")
    assert dispatch.choose_sddmm_strategy(a, b, sparse, 1024, "triton") == "gather"
    monkeypatch.setenv(dispatch.SDDMM_ENV_VAR, "dense")  # the environment wins over the pinned strategy
    assert dispatch.choose_sddmm_strategy(a, b, sparse, 1024, "auto") == "dense"
    torch.testing.assert_close(sddmm(a, b, sparse, 1024).double(), _dense_truth(a, b, sparse), rtol=1e-5, atol=1e-5)
    monkeypatch.setenv(dispatch.SDDMM_ENV_VAR, "fastest")
    with pytest.raises(ValueError, match=f"{dispatch.SDDMM_ENV_VAR}.*'fastest'"):
        sddmm(a, b, sparse, 1024)
    with pytest.raises(ValueError, match="'sparse'"):
        dispatch.set_sddmm_strategy("sparse")


def test_sddmm_timing_keeps_the_fastest_and_its_result(monkeypatch):
    calls = []

    def run(name):
        calls.append(name)
        if name == "slow":
            sum(range(200_000))
        return torch.tensor([float(len(name))])

    repeats = dispatch.TUNING_REPEATS
    monkeypatch.setattr(dispatch, "TUNING_REPEAT_BELOW_S", float("inf"))  # every candidate short enough to repeat
    best, out = dispatch._time_strategies(["slow", "quick"], run, torch.device("cpu"))
    assert best == "quick" and out.tolist() == [5.0]
    # each candidate: a warm-up run, one timed run, then the back-to-back timed runs
    assert calls == ["slow"] * (2 + repeats) + ["quick"] * (2 + repeats)
    # a candidate whose first timed run takes more than twice the best so far is not run again
    calls[:] = []
    best, out = dispatch._time_strategies(["quick", "slow"], run, torch.device("cpu"))
    assert best == "quick" and out.tolist() == [5.0]
    assert calls == ["quick"] * (2 + repeats) + ["slow", "slow"]
    # a tuned op times its runners once per key, then runs the kept one alone
    cache, calls[:] = {}, []
    runners = {name: (lambda name=name: run(name)) for name in ("slow", "quick")}
    assert dispatch._run_tuned(cache, ("k",), runners, torch.device("cpu"), "op").tolist() == [5.0]
    assert dispatch._run_tuned(cache, ("k",), runners, torch.device("cpu"), "op").tolist() == [5.0]
    assert cache == {("k",): "quick"}
    assert calls == ["slow"] * (2 + repeats) + ["quick"] * (2 + repeats) + ["quick"]
    # runs that take long enough to tell apart are timed once
    monkeypatch.setattr(dispatch, "TUNING_REPEAT_BELOW_S", 0.0)
    calls[:] = []
    assert dispatch._time_strategies(["slow", "quick"], run, torch.device("cpu"))[0] == "quick"
    assert calls == ["slow", "slow", "quick", "quick"]


def test_tuning_keeps_the_incumbent_unless_another_is_clearly_faster(monkeypatch):
    # a clock that only the candidates advance: each run of a candidate takes its listed time
    now = [0.0]
    monkeypatch.setattr(dispatch.time, "perf_counter", lambda: now[0])
    edge = dispatch.TUNING_INCUMBENT_EDGE

    def pick(times, incumbent):
        def run(name):
            now[0] += times[name]
            return torch.tensor([times[name]], dtype=torch.float64)

        return dispatch._time_strategies(list(times), run, torch.device("cpu"), incumbent)

    near_tie = 1 - edge / 2  # faster than the incumbent, by less than the edge
    best, out = pick({"csr": 0.001 * near_tie, "dense": 0.001}, "dense")
    assert best == "dense" and out.tolist() == [0.001]
    assert pick({"csr": 0.001 * near_tie, "dense": 0.001}, None)[0] == "csr"  # no incumbent: the fastest
    clearly = 1 - 2 * edge
    assert pick({"csr": 0.001 * clearly, "dense": 0.001}, "dense")[0] == "csr"
    # once replaced, the rest compete on time alone
    assert pick({"csr": 0.001 * clearly, "triton": 0.001 * clearly * 0.99, "dense": 0.001}, "dense")[0] == "triton"
    assert pick({"csr": 0.002, "dense": 0.001}, "dense")[0] == "dense"
    with pytest.raises(ValueError, match="incumbent must be one of the candidates .* got 'gather'"):
        pick({"csr": 0.001, "dense": 0.001}, "gather")


# ------------------------------------------------------------------------------------------------- merged weight
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merged_weight_is_w_plus_delta_in_place_and_restored_bit_exactly(dtype):
    layer = torch.nn.Linear(13, 7).to(dtype).requires_grad_(False)
    original = layer.weight.detach().clone()
    idx = _indices(91, 20, seed=5)
    values = torch.randn(20, generator=torch.Generator().manual_seed(6))
    expected = original.clone().view(-1)
    expected[idx] = (expected[idx].float() + values).to(dtype)
    with merged_weight(DenseBaseWeight(layer), idx, values, dtype, "torch") as w:
        assert w.data_ptr() == layer.weight.data_ptr()  # no copy
        assert torch.equal(w.reshape(-1), expected)
    assert torch.equal(layer.weight, original)
    with pytest.raises(RuntimeError, match="boom"):
        with merged_weight(DenseBaseWeight(layer), idx, values, dtype, "torch"):
            raise RuntimeError("boom")
    assert torch.equal(layer.weight, original)


def test_merged_weight_copies_for_another_dtype_or_when_disabled(monkeypatch):
    layer = torch.nn.Linear(13, 7).requires_grad_(False)
    idx, values = _indices(91, 5), torch.ones(5)
    with merged_weight(DenseBaseWeight(layer), idx, values, torch.bfloat16, "torch") as w:
        assert w.dtype == torch.bfloat16 and w.data_ptr() != layer.weight.data_ptr()
    monkeypatch.setenv("PEFT_SPARSE_INPLACE_MERGE", "0")
    with merged_weight(DenseBaseWeight(layer), idx, values, torch.float32, "torch") as w:
        assert w.data_ptr() != layer.weight.data_ptr()


@pytest.mark.parametrize("transposed", [False, True])
def test_sparse_delta_linear_gradients_match_dense_reference(transposed):
    gen = torch.Generator().manual_seed(8)
    rows, cols = (13, 7) if transposed else (7, 13)  # the stored layout
    layer = torch.nn.Linear(cols, rows).requires_grad_(False)
    if transposed:
        layer.weight = torch.nn.Parameter(torch.randn(rows, cols, generator=gen), requires_grad=False)
    original = layer.weight.detach().clone()
    idx = _indices(rows * cols, 25, seed=9)
    values = torch.randn(25, generator=gen).requires_grad_(True)
    x = torch.randn(3, 5, 13, generator=gen).requires_grad_(True)
    bias = None if transposed else layer.bias
    out = sparse_delta_linear(x, DenseBaseWeight(layer), bias, idx, values, transposed)
    grad_out = torch.randn(out.shape, generator=gen)
    out.backward(grad_out)
    # independent: a dense float64 weight with the delta, autograd through a dense product
    w = original.double().clone().view(-1)
    dense_values = values.detach().double().clone().requires_grad_(True)
    w = w.index_add(0, idx, dense_values).view(rows, cols)
    x64 = x.detach().double().requires_grad_(True)
    ref = x64 @ (w if transposed else w.T)
    if bias is not None:
        ref = ref + bias.double()
    ref.backward(grad_out.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(values.grad.double(), dense_values.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)
    assert torch.equal(layer.weight, original)


# ------------------------------------------------------------------------------------------------- held merge
def _hold_case(seed=30, rows=7, cols=13, k=25):
    gen = torch.Generator().manual_seed(seed)
    layer = torch.nn.Linear(cols, rows).requires_grad_(False)
    original = layer.weight.detach().clone()
    idx = _indices(rows * cols, k, seed=seed + 1)
    values = torch.randn(k, generator=gen).requires_grad_(True)
    x = torch.randn(2, 4, cols, generator=gen).requires_grad_(True)
    merged = original.clone().view(-1)
    merged[idx] = merged[idx] + values.detach()
    return layer, original, idx, values, x, merged.view(rows, cols)


def _dense_grads(x, weight, bias, values_idx, grad_out, uses=1):
    """Gradients of ``sum(uses copies of x @ W_eff.T + b)`` in float64 by autograd through the dense weight."""
    x64 = x.detach().double().requires_grad_(True)
    dense_values = torch.zeros(values_idx[1].numel(), dtype=torch.float64, requires_grad=True)
    w = weight.double().clone().view(-1).index_add(0, values_idx[0], dense_values + values_idx[1].double())
    out = sum(x64 @ w.view(weight.shape).T + bias.double() for _ in range(uses))
    out.backward(grad_out.double())
    return out, x64.grad, dense_values.grad


def test_forward_holds_the_merge_until_its_backward_undoes_it():
    layer, original, idx, values, x, merged = _hold_case()
    out = sparse_delta_linear(x, DenseBaseWeight(layer), layer.bias, idx, values)
    assert torch.equal(layer.weight, merged)  # held for the backward's product
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(31))
    out.backward(grad_out)
    assert torch.equal(layer.weight, original)  # undone bit for bit
    ref, x_grad, values_grad = _dense_grads(x, original, layer.bias, (idx, values.detach()), grad_out)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), x_grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(values.grad.double(), values_grad, rtol=1e-5, atol=1e-5)
    assert release_held_merges() == 0


def test_held_merge_is_undone_when_the_graph_goes_without_a_backward():
    layer, original, idx, values, x, merged = _hold_case()
    out = sparse_delta_linear(x, DenseBaseWeight(layer), layer.bias, idx, values)
    assert torch.equal(layer.weight, merged)
    del out
    assert torch.equal(layer.weight, original)
    out = sparse_delta_linear(x, DenseBaseWeight(layer), layer.bias, idx, values)
    assert release_held_merges() == 1 and torch.equal(layer.weight, original)
    out.sum().backward()  # merges again for its own product, as without a hold
    ref, x_grad, _ = _dense_grads(x, original, layer.bias, (idx, values.detach()), torch.ones(out.shape))
    torch.testing.assert_close(x.grad.double(), x_grad, rtol=1e-5, atol=1e-5)
    assert torch.equal(layer.weight, original)


@pytest.mark.parametrize("case", ["no_grad", "input_without_grad", "product_mode", "copy_mode"])
def test_no_hold_when_no_backward_product_follows_or_when_disabled(case, monkeypatch):
    layer, original, idx, values, x, _ = _hold_case()
    if case == "input_without_grad":
        x = x.detach()
    if case in ("product_mode", "copy_mode"):
        monkeypatch.setenv("PEFT_SPARSE_INPLACE_MERGE", "product" if case == "product_mode" else "0")
    with torch.set_grad_enabled(case != "no_grad"):
        out = sparse_delta_linear(x, DenseBaseWeight(layer), layer.bias, idx, values)
    assert torch.equal(layer.weight, original)
    if out.requires_grad:
        out.sum().backward()
        _, x_grad, values_grad = _dense_grads(x, original, layer.bias, (idx, values.detach()), torch.ones(out.shape))
        torch.testing.assert_close(values.grad.double(), values_grad, rtol=1e-5, atol=1e-5)
        if x.requires_grad:
            torch.testing.assert_close(x.grad.double(), x_grad, rtol=1e-5, atol=1e-5)
    assert torch.equal(layer.weight, original)


def test_a_copy_of_w_plus_delta_starts_from_the_unmerged_weight(monkeypatch):
    # a merge still held by a graph without a backward, then the copying mode (or another compute dtype)
    layer, original, idx, values, x, _ = _hold_case()
    held = sparse_delta_linear(x, DenseBaseWeight(layer), layer.bias, idx, values)
    monkeypatch.setenv("PEFT_SPARSE_INPLACE_MERGE", "0")
    out = sparse_delta_linear(x, DenseBaseWeight(layer), layer.bias, idx, values)
    assert torch.equal(layer.weight, original)
    ref, _, _ = _dense_grads(x, original, layer.bias, (idx, values.detach()), torch.ones(held.shape))
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    del held


def test_a_hold_reuses_its_weights_buffer_and_weights_sharing_positions_keep_their_own():
    layer, original, idx, values, x, merged = _hold_case()
    other = torch.nn.Linear(13, 7).requires_grad_(False)  # same shape, same indices tensor, other weights
    other_original = other.weight.detach().clone()
    pointers = []
    for _ in range(2):
        out = sparse_delta_linear(x, DenseBaseWeight(layer), layer.bias, idx, values)
        out_other = sparse_delta_linear(x, DenseBaseWeight(other), other.bias, idx, values)
        pointers.append(sparse_linear._current_hold(layer.weight).originals.data_ptr())
        assert pointers[-1] != sparse_linear._current_hold(other.weight).originals.data_ptr()
        assert torch.equal(layer.weight, merged)
        (out.sum() + out_other.sum()).backward()
        assert torch.equal(layer.weight, original) and torch.equal(other.weight, other_original)
    assert pointers[0] == pointers[1]  # nothing allocated per update for the originals
    values.data.mul_(2)  # as a reselection does: new values (and positions) of the same count reuse the buffer
    out = sparse_delta_linear(x, DenseBaseWeight(layer), layer.bias, idx.flip(0).clone(), values)
    assert sparse_linear._current_hold(layer.weight).originals.data_ptr() == pointers[0]
    out.sum().backward()
    assert torch.equal(layer.weight, original)


def test_merge_mode_names_the_variable_on_a_bad_value(monkeypatch):
    assert merge_mode() == "hold"
    for value, mode in (("1", "hold"), ("product", "product"), ("0", "copy"), ("copy", "copy")):
        monkeypatch.setenv("PEFT_SPARSE_INPLACE_MERGE", value)
        assert merge_mode() == mode
    monkeypatch.setenv("PEFT_SPARSE_INPLACE_MERGE", "sometimes")
    with pytest.raises(ValueError, match="PEFT_SPARSE_INPLACE_MERGE.*'sometimes'"):
        merge_mode()


def test_backward_merges_again_when_w_was_gathered_again():
    # a sharding engine frees W after the forward and gathers it (unmerged) again for the backward
    layer, original, idx, values, x, _ = _hold_case()
    out = sparse_delta_linear(x, DenseBaseWeight(layer), layer.bias, idx, values)
    layer.weight.data.copy_(original)
    out.sum().backward()
    _, x_grad, values_grad = _dense_grads(x, original, layer.bias, (idx, values.detach()), torch.ones(out.shape))
    torch.testing.assert_close(x.grad.double(), x_grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(values.grad.double(), values_grad, rtol=1e-5, atol=1e-5)
    assert torch.equal(layer.weight, original)


@pytest.mark.parametrize("zeros", ["none", "some", "all"])
def test_hold_checks_a_spread_of_the_changed_entries(zeros):
    # 600 entries, none, a third or all of them zero: the hold compares 32 entries spread over those the merge
    # changed, first and last included, and still sees W gathered again; with nothing changed it compares nothing
    # (both W are the same)
    layer, original, idx, values, x, _ = _hold_case(seed=40, rows=40, cols=50, k=600)
    with torch.no_grad():
        values[::3] = 0.0 if zeros != "none" else values[::3]
        if zeros == "all":
            values.zero_()
    out = sparse_delta_linear(x, DenseBaseWeight(layer), layer.bias, idx, values)
    hold = sparse_linear._current_hold(layer.weight)
    changed = torch.sort(idx[values.detach() != 0]).values
    if zeros == "all":
        assert hold.check_positions.numel() == 0 and hold.intact()
    else:
        assert hold.check_positions.numel() == sparse_linear.HOLD_CHECK_ENTRIES
        assert set(hold.check_positions.tolist()) <= set(changed.tolist())
        assert hold.check_positions[0] == changed[0] and hold.check_positions[-1] == changed[-1]
        flat = layer.weight.detach().view(-1)
        assert torch.equal(hold.check_bits, flat[hold.check_positions].view(torch.int32))
    layer.weight.data.copy_(original)  # gathered again, unmerged
    assert hold.intact() == (zeros == "all")
    out.sum().backward()
    _, x_grad, values_grad = _dense_grads(x, original, layer.bias, (idx, values.detach()), torch.ones(out.shape))
    torch.testing.assert_close(x.grad.double(), x_grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(values.grad.double(), values_grad, rtol=1e-5, atol=1e-5)
    assert torch.equal(layer.weight, original)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_hold_check_compares_bits_of_other_weight_dtypes(dtype):
    layer, original, idx, values, x, _ = _hold_case(seed=41, rows=40, cols=50, k=600)
    layer.to(dtype)
    original = layer.weight.detach().clone()
    with torch.no_grad():
        values.data = values.data.to(dtype)
    out = sparse_delta_linear(x.detach().to(dtype).requires_grad_(True), DenseBaseWeight(layer), None, idx, values)
    hold = sparse_linear._current_hold(layer.weight)
    assert hold is not None and hold.check_positions.numel() == sparse_linear.HOLD_CHECK_ENTRIES
    flat = layer.weight.detach().view(-1)
    assert torch.equal(hold.check_bits, sparse_linear._bits(flat[hold.check_positions]))
    assert hold.intact()
    layer.weight.data.copy_(original)  # gathered again, unmerged
    assert not hold.intact()
    del out
    assert torch.equal(layer.weight, original)


def test_a_freed_weight_storage_is_not_touched_and_the_backward_merges_again():
    # FSDP2 frees a resharded weight's storage (0 bytes, same shape) and re-allocates it for the backward
    layer, original, idx, values, x, _ = _hold_case()
    storage = layer.weight.untyped_storage()
    nbytes = storage.nbytes()
    outs = []
    for release_while_freed in (True, False):
        outs.append(sparse_delta_linear(x, DenseBaseWeight(layer), layer.bias, idx, values))
        storage.resize_(0)
        if release_while_freed:
            assert release_held_merges() == 1  # forgotten without reading or writing the freed memory
        storage.resize_(nbytes)
        layer.weight.data.copy_(original)  # gathered again, unmerged
    (outs[0].sum() + outs[1].sum()).backward()
    ones = torch.ones(outs[0].shape)
    _, x_grad, values_grad = _dense_grads(x, original, layer.bias, (idx, values.detach()), ones, 2)
    torch.testing.assert_close(x.grad.double(), x_grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(values.grad.double(), values_grad, rtol=1e-5, atol=1e-5)
    assert torch.equal(layer.weight, original)


def test_forwards_of_one_layer_share_the_hold_and_a_retained_graph_merges_again():
    layer, original, idx, values, x, merged = _hold_case()
    access = DenseBaseWeight(layer)
    out = sum(sparse_delta_linear(x, access, layer.bias, idx, values) for _ in range(2))
    assert torch.equal(layer.weight, merged)  # merged once, not twice
    out.sum().backward(retain_graph=True)
    assert torch.equal(layer.weight, original)
    out.sum().backward()  # the second backward merges for its products again
    assert torch.equal(layer.weight, original)
    _, x_grad, values_grad = _dense_grads(x, original, layer.bias, (idx, values.detach()), torch.ones(out.shape), 2)
    torch.testing.assert_close(x.grad.double(), 2 * x_grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(values.grad.double(), 2 * values_grad, rtol=1e-5, atol=1e-5)


def test_another_delta_on_the_weight_takes_over_the_hold():
    layer, original, idx, values, x, _ = _hold_case()
    other_idx = _indices(91, 10, seed=40)
    other_values = torch.randn(10, generator=torch.Generator().manual_seed(41)).requires_grad_(True)
    access = DenseBaseWeight(layer)
    out_a = sparse_delta_linear(x, access, layer.bias, idx, values)
    out_b = sparse_delta_linear(x, access, layer.bias, other_idx, other_values)  # undoes a's hold, holds b's
    expected_b = original.clone().view(-1)
    expected_b[other_idx] += other_values.detach()
    assert torch.equal(layer.weight.view(-1), expected_b)
    (out_a.sum() + out_b.sum()).backward()
    assert torch.equal(layer.weight, original)
    ones = torch.ones(out_a.shape)
    _, x_grad_a, values_grad_a = _dense_grads(x, original, layer.bias, (idx, values.detach()), ones)
    _, x_grad_b, values_grad_b = _dense_grads(x, original, layer.bias, (other_idx, other_values.detach()), ones)
    torch.testing.assert_close(x.grad.double(), x_grad_a + x_grad_b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(values.grad.double(), values_grad_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(other_values.grad.double(), values_grad_b, rtol=1e-5, atol=1e-5)


def test_a_failing_forward_product_leaves_nothing_held():
    layer, original, idx, values, _, _ = _hold_case()
    x = torch.randn(2, 5, requires_grad=True)  # wrong feature count: the product raises
    with pytest.raises(RuntimeError):
        sparse_delta_linear(x, DenseBaseWeight(layer), layer.bias, idx, values)
    assert torch.equal(layer.weight, original) and release_held_merges() == 0


# ------------------------------------------------------------------------------------------------- top-k (SpIEL-MA)
def _topk_brute_force(rows, cols, exclude, k):
    scores = (rows.float()[:, None] * cols.float()[None, :]).flatten()
    keep = torch.ones_like(scores, dtype=torch.bool)
    keep[exclude] = False
    positions = torch.nonzero(keep).flatten()
    order = torch.sort(scores[positions], descending=True, stable=True).indices[:k]
    return positions[order].sort().values


def _nonnegative_scores(kind, n, gen):
    if kind == "continuous":
        return torch.rand(n, generator=gen)
    if kind == "ties":
        return torch.randint(0, 3, (n,), generator=gen).float()
    if kind == "zeros":
        return torch.zeros(n)
    if kind == "heavy":  # SM3-like: a few large, most tiny, some exactly 0
        s = torch.rand(n, generator=gen) ** 8 * 1e-12
        s[::7] = 0.0
        return s
    s = torch.randn(n, generator=gen)  # signed: goes to the reference
    s[::4] = -0.0
    return s


@pytest.mark.parametrize("kind", ["continuous", "ties", "zeros", "heavy", "signed"])
@pytest.mark.parametrize("shape", [(7, 13), (33, 65), (130, 70)])
def test_topk_outer_product_threshold_matches_brute_force(kind, shape):
    gen = torch.Generator().manual_seed(21)
    rows, cols = _nonnegative_scores(kind, shape[0], gen), _nonnegative_scores(kind, shape[1], gen)
    numel = shape[0] * shape[1]
    for fraction in (0.0, 0.1, 0.5):
        exclude = _indices(numel, round(fraction * numel), seed=22).sort().values
        for k in (0, 1, 17, numel // 3, numel - exclude.numel()):
            got = topk_outer_product_threshold(rows, cols, exclude, k)
            assert torch.equal(got, _topk_brute_force(rows, cols, exclude, k)), (kind, shape, fraction, k)


def test_topk_outer_product_torch_backend_is_the_threshold_search():
    gen = torch.Generator().manual_seed(23)
    rows, cols = torch.rand(300, generator=gen), torch.rand(200, generator=gen)
    exclude = _indices(60_000, 3_000, seed=24).sort().values
    got = topk_outer_product(rows, cols, exclude, 2_000, setting="torch")
    assert torch.equal(got, topk_outer_product_reference(rows, cols, exclude, 2_000))


def _batch(seed, shapes_kinds, fractions=(0.0, 0.1, 0.5)):
    """One matrix per (shape, kind), each with its own exclusions and k (some k = 0, some every free position)."""
    gen = torch.Generator().manual_seed(seed)
    rows, cols, excludes, ks = [], [], [], []
    for m, ((n_rows, n_cols), kind) in enumerate(shapes_kinds):
        rows.append(_nonnegative_scores(kind, n_rows, gen))
        cols.append(_nonnegative_scores(kind, n_cols, gen))
        numel = n_rows * n_cols
        exclude = _indices(numel, round(fractions[m % len(fractions)] * numel), seed=seed + m).sort().values
        excludes.append(exclude)
        free = numel - exclude.numel()
        ks.append([0, 1, 17, free // 3, free][m % 5] if free >= 17 else free)
    return rows, cols, excludes, ks


KINDS = ["continuous", "ties", "zeros", "heavy", "signed"]


def test_topk_outer_product_batched_matches_brute_force():
    # shapes repeat, so several matrices share one search; kinds and exclusions differ within a shape
    shapes = [(7, 13), (33, 65), (130, 70), (33, 65), (130, 70), (33, 65)]
    batch = [(shape, kind) for shape in shapes for kind in KINDS]
    rows, cols, excludes, ks = _batch(31, batch)
    got = topk_outer_product_batched(rows, cols, excludes, ks)
    assert len(got) == len(batch)
    for m, positions in enumerate(got):
        assert positions.dtype == torch.int64
        assert torch.equal(positions, _topk_brute_force(rows[m], cols[m], excludes[m], ks[m])), (m, batch[m], ks[m])
    assert topk_outer_product_batched([], [], [], []) == []


def test_topk_outer_product_batched_scores_in_other_dtypes_and_int32_exclusions():
    gen = torch.Generator().manual_seed(37)
    dtypes = [torch.float64, torch.bfloat16, torch.float16]
    rows = [torch.rand(40, generator=gen).to(dtype) for dtype in dtypes]
    cols = [torch.rand(50, generator=gen).to(dtype) for dtype in dtypes]
    excludes = [_indices(2000, 100, torch.int32, seed=38 + m).sort().values for m in range(3)]
    ks = [30, 400, 1900]
    for m, positions in enumerate(topk_outer_product_batched(rows, cols, excludes, ks)):
        assert torch.equal(positions, _topk_brute_force(rows[m], cols[m], excludes[m].long(), ks[m])), dtypes[m]


def test_topk_outer_product_batched_searches_and_leaves_only_the_odd_cases_to_the_reference(monkeypatch):
    rows, cols, excludes, ks = _batch(32, [((130, 70), "continuous"), ((33, 65), "heavy"), ((33, 65), "signed")])
    ks = [500, 300, 300]
    reference_calls = []
    chunked = topk_module._topk_outer_product_chunked

    def spy(row_scores, *args):
        reference_calls.append(row_scores.numel())
        return chunked(row_scores, *args)

    monkeypatch.setattr(topk_module, "_topk_outer_product_chunked", spy)
    expected = [_topk_brute_force(*args) for args in zip(rows, cols, excludes, ks)]
    got = topk_outer_product_batched(rows, cols, excludes, ks)
    assert all(torch.equal(g, e) for g, e in zip(got, expected))
    assert reference_calls == [33]  # the signed matrix only
    # a cut that would enumerate too many positions, or more positions than a rank key holds: the reference
    for name, value in (("_ENUMERATION_SLACK", 0), ("_POSITION_LIMIT", 33 * 65)):
        reference_calls.clear()
        with monkeypatch.context() as patch:
            patch.setattr(topk_module, name, value)
            if name == "_ENUMERATION_SLACK":
                patch.setattr(topk_module, "_ENUMERATION_LIMIT", 0)
            got = topk_outer_product_batched(rows, cols, excludes, ks)
        assert all(torch.equal(g, e) for g, e in zip(got, expected))
        assert sorted(reference_calls) == ([33, 33, 130] if name == "_ENUMERATION_SLACK" else [33, 130])


def test_topk_outer_product_batched_reads_the_host_a_few_times_per_shape_not_per_matrix(monkeypatch):
    reads = []
    for method in ("tolist", "item", "__bool__", "__int__", "__float__", "__index__"):
        original = getattr(torch.Tensor, method)

        def counting(self, *args, _original=original, **kwargs):
            reads.append(1)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, method, counting)
    gen = torch.Generator().manual_seed(33)
    rows, cols = torch.rand(200, generator=gen), torch.rand(90, generator=gen)
    exclude = _indices(200 * 90, 400, seed=34).sort().values

    def count_reads(n, together):
        reads.clear()
        if together:
            topk_outer_product_batched([rows] * n, [cols] * n, [exclude] * n, [300] * n)
        else:
            for _ in range(n):
                topk_outer_product_threshold(rows, cols, exclude, 300)
        return len(reads)

    two, ten = count_reads(2, True), count_reads(10, True)
    one_by_one, single = count_reads(10, False), count_reads(1, False)
    monkeypatch.undo()
    assert two == ten <= 8, (two, ten)
    assert one_by_one == 10 * single > ten


def test_topk_outer_product_batched_argument_errors():
    rows, cols, exclude = torch.rand(7), torch.rand(13), torch.tensor([3, 10, 50])
    with pytest.raises(ValueError, match="one entry per matrix, got lengths 2, 2, 2, 1"):
        topk_outer_product_batched([rows] * 2, [cols] * 2, [exclude] * 2, [5])
    with pytest.raises(ValueError, match=r"ks\[1\] must be an int in \[0, 88\].*got 89"):
        topk_outer_product_batched([rows] * 2, [cols] * 2, [exclude] * 2, [5, 89])
    with pytest.raises(ValueError, match=r"row_scores\[1\] must be finite, got 1 non-finite"):
        topk_outer_product_batched([rows, torch.tensor([1.0, float("nan")])], [cols] * 2, [exclude] * 2, [5, 5])
    for unordered in ([10, 3], [3, 3]):
        with pytest.raises(ValueError, match=r"exclude_sorted\[1\] must be strictly increasing"):
            topk_outer_product_batched([rows] * 2, [cols] * 2, [exclude, torch.tensor(unordered)], [5, 5])
    with pytest.raises(ValueError, match=r"exclude_sorted\[0\] must lie in \[0, 91\)"):
        topk_outer_product_batched([rows], [cols], [torch.tensor([3, 91])], [5])
    with pytest.raises(ValueError, match=r"col_scores\[0\] must be a 1-D float tensor"):
        topk_outer_product_batched([rows], [torch.ones(2, 2)], [exclude], [5])


def test_topk_outer_product_many_runs_the_chosen_backend_per_device():
    rows, cols, excludes, ks = _batch(35, [((33, 65), "continuous"), ((130, 70), "heavy"), ((33, 65), "ties")])
    expected = [_topk_brute_force(*args) for args in zip(rows, cols, excludes, ks)]
    settings = ["auto", "torch"]
    if dispatch.resolve("topk_outer_product", rows[0].device, "triton") is not topk_outer_product_reference:
        settings.append("triton")  # Triton's interpreter: the kernel, matrix by matrix
    for setting in settings:
        got = topk_outer_product_many(rows, cols, excludes, ks, setting=setting)
        assert all(torch.equal(g, e) for g, e in zip(got, expected)), setting
    assert topk_outer_product_many([], [], [], []) == []


# ------------------------------------------------------------------------------------------------- CUDA
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_sddmm_strategies_and_tuned_dispatch(dtype):
    device = torch.device("cuda")
    for tokens, rows, cols, density in [(37, 33, 65, 0.1), (4099, 257, 513, 0.01), (2048, 1024, 2816, 0.023)]:
        a, b = (t.to(device) for t in _operands(tokens, rows, cols, dtype, seed=tokens))
        idx = _indices(rows * cols, max(1, round(density * rows * cols)), seed=rows).to(device)
        truth = _dense_truth(a, b, idx)
        tol = dict(rtol=1e-4, atol=1e-3 * max(1.0, tokens**0.5 / 8))
        for name in ("csr", "dense"):
            torch.testing.assert_close(STRATEGIES[name](a, b, idx, cols).double(), truth, **tol)
        for _ in range(2):  # the first call times the candidates, the second runs the kept one
            torch.testing.assert_close(sddmm(a, b, idx, cols).double(), truth, **tol)
    assert set(dispatch.tuned_sddmm_strategies().values()) <= {"csr", "dense", "triton", "triton_sorted"}


@needs_cuda
def test_cuda_sddmm_dense_in_row_blocks_does_not_synchronize(monkeypatch):
    monkeypatch.setattr(sddmm_module, "DENSE_CHUNK_ELEMENTS", 3 * 65)
    a, b = (t.cuda() for t in _operands(19, 34, 65))
    idx = _indices(34 * 65, 300, seed=4).cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = sddmm_dense(a, b, idx, 65)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(got.double(), _dense_truth(a, b, idx), rtol=1e-5, atol=1e-5)


@needs_cuda
def test_cuda_topk_outer_product_batched_syncs_per_shape_not_per_matrix():
    device = torch.device("cuda")
    rows, cols, excludes, _ = _batch(36, [((257, 1031), "heavy"), ((33, 65), "continuous")] * 5, fractions=(0.05,))
    rows, cols, excludes = ([t.to(device) for t in ts] for ts in (rows, cols, excludes))
    ks = [5000, 300] * 5  # every matrix searched (none left to the reference)

    def synchronizing(n):
        # two shapes either way: 2 matrices, or 10
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                got = topk_outer_product_batched(rows[:n], cols[:n], excludes[:n], ks[:n])
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught), got

    (two, _), (ten, got) = synchronizing(2), synchronizing(10)
    assert two == ten, (two, ten)
    for m, positions in enumerate(got):
        assert positions.device.type == "cuda"
        expected = _topk_brute_force(rows[m].cpu(), cols[m].cpu(), excludes[m].cpu(), ks[m])
        assert torch.equal(positions.cpu(), expected), m


@needs_cuda
def test_cuda_topk_outer_product_many_times_both_runners_once_and_keeps_the_faster():
    device = torch.device("cuda")
    rows, cols, excludes, _ = _batch(39, [((257, 1031), "heavy"), ((33, 65), "continuous")] * 3, fractions=(0.05,))
    rows, cols, excludes = ([t.to(device) for t in ts] for ts in (rows, cols, excludes))
    ks = [4000, 200] * 3
    expected = [_topk_brute_force(r.cpu(), c.cpu(), e.cpu(), k) for r, c, e, k in zip(rows, cols, excludes, ks)]
    for _ in range(2):
        got = topk_outer_product_many(rows, cols, excludes, ks)
        assert all(torch.equal(g.cpu(), e) for g, e in zip(got, expected))
    chosen = [v for k, v in dispatch.tuned_topk_strategies().items() if k[0].startswith("cuda")]
    assert chosen and set(chosen) <= {"batched", "per_matrix"}


@needs_cuda
def test_cuda_merged_weight_and_growth_stay_on_the_device():
    device = torch.device("cuda")
    layer = torch.nn.Linear(65, 33).to(device).to(torch.bfloat16).requires_grad_(False)
    original = layer.weight.detach().clone()
    idx = _indices(33 * 65, 100, seed=3).to(device)
    values = torch.randn(100, device=device)
    expected = original.clone().view(-1)
    expected[idx] = (expected[idx].float() + values).to(torch.bfloat16)
    with merged_weight(DenseBaseWeight(layer), idx, values, torch.bfloat16, "auto") as w:
        assert torch.equal(w.reshape(-1), expected)
    assert torch.equal(layer.weight, original)
    # on a GPU the merge is made per product, never held (its check would read a result on the host)
    x = torch.randn(4, 65, device=device, dtype=torch.bfloat16, requires_grad=True)
    out = sparse_delta_linear(x, DenseBaseWeight(layer), None, idx, values.clone().requires_grad_(True))
    assert torch.equal(layer.weight, original)
    out.float().sum().backward()
    assert torch.equal(layer.weight, original) and x.grad is not None
    from peft_sparse.selection import grow_random

    excluded = idx.long().sort().values
    grown = grow_random(33 * 65, excluded, 200, torch.Generator().manual_seed(1))
    assert grown.device.type == "cuda" and not torch.isin(grown, excluded).any()
    assert torch.equal(grown.cpu(), grow_random(33 * 65, excluded.cpu(), 200, torch.Generator().manual_seed(1)))
    rows, cols = torch.rand(257, device=device), torch.rand(1031, device=device)
    exclude = _indices(257 * 1031, 5000, seed=4).sort().values.to(device)
    # above the permuted range: ranks drawn on the CPU generator, tracked on the GPU (and, past half, left out)
    for k in (5000, 200_000):
        grown = grow_random(257 * 1031, exclude.long(), k, torch.Generator().manual_seed(2))
        assert grown.device.type == "cuda"
        on_cpu = grow_random(257 * 1031, exclude.long().cpu(), k, torch.Generator().manual_seed(2))
        assert torch.equal(grown.cpu(), on_cpu)
    got = topk_outer_product_threshold(rows, cols, exclude, 3000)
    assert torch.equal(got.cpu(), _topk_brute_force(rows.cpu(), cols.cpu(), exclude.cpu(), 3000))
