"""Every sparse-delta kernel against its PyTorch reference and an independent dense computation, plus dispatch.

Without CUDA the Triton kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before any
kernel is defined); shapes stay small so the interpreter is quick. Tests marked ``cuda`` run only on a GPU.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from peft_sparse.kernels import (
    _triton,
    apply_delta,
    apply_delta_reference,
    dispatch,
    register_triton_op,
    resolve,
    sddmm,
    sddmm_reference,
    sparse_delta_matmul,
    sparse_delta_matmul_reference,
    sparse_delta_product,
    topk_outer_product,
    topk_outer_product_reference,
)
from peft_sparse.kernels.sddmm import sddmm_dense, sddmm_launch, sddmm_triton_sorted
from peft_sparse.kernels.topk_outer_product import _topk_outer_product_chunked

HAS_CUDA = torch.cuda.is_available()
CPU = torch.device("cpu")
OPS = ("apply_delta", "sddmm", "sparse_delta_matmul", "topk_outer_product")

triton_runs = pytest.mark.skipif(
    _triton.triton is None or not (HAS_CUDA or _triton.INTERPRETED),
    reason="needs triton, and CUDA or TRITON_INTERPRET=1 set before the kernels were defined",
)
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")

SHAPES = [(7, 13), (33, 65)]
TOKENS = [1, 37]
DENSITIES = [0.001, 0.01, 0.1]
INDEX_DTYPES = [torch.int32, torch.int64]


@pytest.fixture(autouse=True)
def _no_backend_env(monkeypatch):
    # A backend set in the caller's environment would override every setting these tests choose.
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)


def _device() -> torch.device:
    return torch.device("cuda") if HAS_CUDA else CPU


def _random_indices(numel: int, k: int, dtype: torch.dtype, seed: int, device=CPU) -> torch.Tensor:
    """``k`` unique flat positions in ``[0, numel)`` in random (unsorted) order."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(numel, generator=gen)[:k].to(dtype).to(device)


def _count(numel: int, density: float) -> int:
    return max(1, round(density * numel))


def _dense_delta(nrows: int, ncols: int, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    delta = torch.zeros(nrows * ncols, dtype=torch.float64, device=values.device)
    delta[indices.long()] = values.double()
    return delta.view(nrows, ncols)


def _triton_impl(op: str, device: torch.device):
    """The function ``setting="triton"`` dispatches to; fails if that would silently be the reference."""
    fn = resolve(op, device, "triton")
    assert fn is not dispatch._OPS[op][0], f"{op} resolved to its reference under kernel_backend='triton'"
    return fn


# ---------------------------------------------------------------------------------------------------------- sddmm


def _sddmm_operands(orientation: str, tokens: int, out_f: int, in_f: int, dtype=torch.float32, device=CPU, seed=0):
    """(a, b, ncols) as the layer passes them: Linear sddmm(dy, x, ncols=in), Conv1D sddmm(x, dy, ncols=out)."""
    gen = torch.Generator().manual_seed(seed)
    dy = torch.randn(tokens, out_f, generator=gen).to(dtype).to(device)
    x = torch.randn(tokens, in_f, generator=gen).to(dtype).to(device)
    return (dy, x, in_f) if orientation == "linear" else (x, dy, out_f)


def _sddmm_dense(a: torch.Tensor, b: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    return (a.double().T @ b.double()).flatten()[indices.long()]


@triton_runs
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("orientation", ["linear", "conv1d"])
def test_sddmm_triton_matches_reference_and_dense(orientation, shape, tokens, density, index_dtype):
    a, b, ncols = _sddmm_operands(orientation, tokens, *shape)
    idx = _random_indices(a.shape[1] * ncols, _count(a.shape[1] * ncols, density), index_dtype, seed=tokens)
    fn = _triton_impl("sddmm", a.device)
    got = sddmm(a, b, idx, ncols, setting="triton")
    assert got.dtype == torch.float32 and got.shape == (idx.numel(),)
    torch.testing.assert_close(got, fn(a, b, idx, ncols))
    torch.testing.assert_close(got, sddmm_reference(a, b, idx, ncols), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.double(), _sddmm_dense(a, b, idx), rtol=1e-5, atol=1e-5)


@triton_runs
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("shape", SHAPES)
def test_sddmm_triton_empty_and_full(shape, tokens, index_dtype):
    a, b, ncols = _sddmm_operands("linear", tokens, *shape)
    numel = a.shape[1] * ncols
    empty = sddmm(a, b, torch.empty(0, dtype=index_dtype), ncols, setting="triton")
    assert empty.shape == (0,) and empty.dtype == torch.float32
    full = _random_indices(numel, numel, index_dtype, seed=1)
    got = sddmm(a, b, full, ncols, setting="triton")
    torch.testing.assert_close(got.double(), _sddmm_dense(a, b, full), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, sddmm_reference(a, b, full, ncols), rtol=1e-5, atol=1e-5)


@triton_runs
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("orientation", ["linear", "conv1d"])
def test_sddmm_triton_on_sorted_positions_matches_dense(orientation, dtype, monkeypatch):
    a, b, ncols = _sddmm_operands(orientation, 37, 33, 65, dtype=dtype, seed=6)
    idx = _random_indices(a.shape[1] * ncols, 300, torch.int32, seed=7)  # slots not in row-major order
    got = sddmm_triton_sorted(a, b, idx, ncols)
    assert got.dtype == torch.float32 and got.shape == idx.shape
    torch.testing.assert_close(got.double(), _sddmm_dense(a, b, idx), rtol=1e-5, atol=1e-5)
    # the same through the dispatcher, pinned, and as a candidate CUDA timing would try
    monkeypatch.setenv(dispatch.SDDMM_ENV_VAR, "triton_sorted")
    torch.testing.assert_close(sddmm(a, b, idx, ncols), got)


@triton_runs
def test_sddmm_triton_zero_tokens():
    a, b = torch.empty(0, 7), torch.empty(0, 13)
    got = sddmm(a, b, torch.tensor([0, 5, 90], dtype=torch.int32), 13, setting="triton")
    assert torch.equal(got, torch.zeros(3))


@triton_runs
@pytest.mark.parametrize(
    "config",
    [
        {"token_splits": 3, "block_t": 4},
        {"token_splits": 37, "block_t": 16, "block_k": 16},
        {"token_major": True},
        {"token_major": True, "token_splits": 2, "block_t": 8},
    ],
)
def test_sddmm_launch_configurations(config):
    a, b, ncols = _sddmm_operands("linear", 37, 33, 65, seed=3)
    idx = _random_indices(33 * 65, 200, torch.int64, seed=4)
    got = sddmm_launch(a, b, idx, ncols, **config)
    torch.testing.assert_close(got.double(), _sddmm_dense(a, b, idx), rtol=1e-5, atol=1e-5)


@triton_runs
def test_sddmm_triton_non_contiguous_operands():
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(33, 37, generator=gen).T  # [tokens=37, rows=33], column-major
    b = torch.randn(37, 130, generator=gen)[:, ::2]  # [37, 65], stride 2 along the features
    idx = _random_indices(33 * 65, 150, torch.int32, seed=6)
    got = sddmm(a, b, idx, 65, setting="triton")
    torch.testing.assert_close(got.double(), _sddmm_dense(a, b, idx), rtol=1e-5, atol=1e-5)


@triton_runs
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sddmm_triton_half_inputs_accumulate_in_float32(dtype):
    a, b, ncols = _sddmm_operands("conv1d", 37, 33, 65, dtype=dtype, seed=7)
    idx = _random_indices(a.shape[1] * ncols, 120, torch.int64, seed=8)
    got = sddmm(a, b, idx, ncols, setting="triton")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, sddmm_reference(a, b, idx, ncols), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.double(), _sddmm_dense(a, b, idx), rtol=1e-5, atol=1e-5)


@triton_runs
def test_sddmm_triton_positions_beyond_int32():
    # A [50000, 50000] gradient has 2.5e9 > 2**31 positions, yet the operands are tiny.
    gen = torch.Generator().manual_seed(9)
    a, b = torch.randn(5, 50_000, generator=gen), torch.randn(5, 50_000, generator=gen)
    idx = torch.randint(2**31, 50_000 * 50_000, (64,), generator=gen).unique()
    idx = idx[torch.randperm(idx.numel(), generator=gen)]
    got = sddmm(a, b, idx, 50_000, setting="triton")
    rows, cols = idx // 50_000, idx % 50_000
    expected = (a[:, rows].double() * b[:, cols].double()).sum(0)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, sddmm_reference(a, b, idx, 50_000))


def test_sddmm_rejects_mismatched_operands():
    a, b = torch.randn(4, 7), torch.randn(5, 13)
    with pytest.raises(ValueError, match="tokens"):
        sddmm_launch(a, b, torch.tensor([1]), 13)
    with pytest.raises(ValueError, match="ncols"):
        sddmm_launch(torch.randn(5, 7), b, torch.tensor([1]), 12)
    with pytest.raises(ValueError, match="indices"):
        sddmm_launch(torch.randn(5, 7), b, torch.tensor([1.0]), 13)


# ---------------------------------------------------------------------------------------------------- apply_delta


def _apply_dense(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    flat = weight.flatten().clone()
    flat[indices.long()] += values.to(weight.dtype)
    return flat.view_as(weight)


@triton_runs
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("density", [0.001, 0.01, 0.1, 0.0, 1.0])
@pytest.mark.parametrize("shape", SHAPES)
def test_apply_delta_triton_matches_reference_and_dense(shape, density, index_dtype):
    gen = torch.Generator().manual_seed(11)
    weight = torch.randn(shape, generator=gen)
    numel = weight.numel()
    k = 0 if density == 0.0 else _count(numel, density)
    idx = _random_indices(numel, k, index_dtype, seed=12)
    values = torch.randn(k, generator=gen)
    original = weight.clone()
    _triton_impl("apply_delta", weight.device)
    got = apply_delta(weight, idx, values, setting="triton")
    assert torch.equal(weight, original), "apply_delta changed its input"
    assert got.dtype == weight.dtype and got.shape == weight.shape
    assert torch.equal(got, apply_delta_reference(weight, idx, values))
    assert torch.equal(got, _apply_dense(weight, idx, values))


@triton_runs
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_apply_delta_triton_half_weight(dtype):
    gen = torch.Generator().manual_seed(13)
    weight = torch.randn(33, 65, generator=gen).to(dtype)
    idx = _random_indices(weight.numel(), 200, torch.int64, seed=14)
    values = torch.randn(200, generator=gen)
    got = apply_delta(weight, idx, values, setting="triton")
    assert got.dtype == dtype
    torch.testing.assert_close(got, apply_delta_reference(weight, idx, values), rtol=0, atol=0)
    untouched = torch.ones(weight.numel(), dtype=torch.bool)
    untouched[idx] = False
    assert torch.equal(got.flatten()[untouched], weight.flatten()[untouched])


@triton_runs
def test_apply_delta_triton_non_contiguous_weight():
    gen = torch.Generator().manual_seed(15)
    weight = torch.randn(65, 33, generator=gen).T  # logical [33, 65]
    idx = _random_indices(weight.numel(), 100, torch.int32, seed=16)
    values = torch.randn(100, generator=gen)
    got = apply_delta(weight, idx, values, setting="triton")
    assert got.is_contiguous()
    assert torch.equal(got, _apply_dense(weight, idx, values))
    assert torch.equal(got, apply_delta_reference(weight, idx, values))


# -------------------------------------------------------------------------------------------- sparse_delta_matmul


@triton_runs
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES)
@pytest.mark.parametrize("density", [0.001, 0.01, 0.1, 0.0, 1.0])
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("transpose", [False, True])
def test_sparse_delta_matmul_triton_matches_reference_and_dense(transpose, shape, tokens, density, index_dtype):
    nrows, ncols = shape
    gen = torch.Generator().manual_seed(17)
    x = torch.randn(tokens, nrows if transpose else ncols, generator=gen)
    k = 0 if density == 0.0 else _count(nrows * ncols, density)
    idx = _random_indices(nrows * ncols, k, index_dtype, seed=18)
    values = torch.randn(k, generator=gen)
    _triton_impl("sparse_delta_matmul", x.device)
    got = sparse_delta_matmul(x, idx, values, nrows, ncols, transpose, setting="triton")
    delta = _dense_delta(nrows, ncols, idx, values)
    expected = x.double() @ delta if transpose else x.double() @ delta.T
    assert got.dtype == torch.float32 and got.shape == expected.shape
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    reference = sparse_delta_matmul_reference(x, idx, values, nrows, ncols, transpose)
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(reference.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("setting", ["torch", "triton"])
def test_sparse_delta_product_gradients_match_dense_autograd(setting):
    if setting == "triton" and (_triton.triton is None or not (HAS_CUDA or _triton.INTERPRETED)):
        pytest.skip("Triton kernels cannot run here")
    nrows, ncols = 33, 65
    gen = torch.Generator().manual_seed(27)
    x = torch.randn(2, 5, ncols, generator=gen).requires_grad_(True)
    idx = _random_indices(nrows * ncols, 200, torch.int32, seed=28)
    values = torch.randn(200, generator=gen).requires_grad_(True)
    y = sparse_delta_product(x, idx, values, nrows, ncols, setting=setting)
    dy = torch.randn(y.shape, generator=gen)
    y.backward(dy)

    x64 = x.detach().double().requires_grad_(True)
    v64 = values.detach().double().requires_grad_(True)
    delta = torch.zeros(nrows * ncols, dtype=torch.float64).index_put((idx.long(),), v64).view(nrows, ncols)
    y64 = x64 @ delta.T
    y64.backward(dy.double())
    assert y.shape == (2, 5, nrows) and y.dtype == x.dtype
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(values.grad.double(), v64.grad, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------- topk_outer_product


def _topk_dense(rows: torch.Tensor, cols: torch.Tensor, exclude: torch.Tensor, k: int) -> torch.Tensor:
    """Brute force over the full score matrix: stable descending sort of positions in ascending order."""
    scores = (rows.float()[:, None] * cols.float()[None, :]).flatten()
    keep = torch.ones_like(scores, dtype=torch.bool)
    keep[exclude] = False
    positions = torch.nonzero(keep).flatten()
    order = torch.sort(scores[positions], descending=True, stable=True).indices[:k]
    return positions[order].sort().values


def _scores(kind: str, n: int, gen: torch.Generator) -> torch.Tensor:
    if kind == "continuous":
        return torch.rand(n, generator=gen)
    if kind == "ties":
        return torch.randint(0, 3, (n,), generator=gen).float()
    if kind == "zeros":
        return torch.zeros(n)
    scores = torch.randn(n, generator=gen)  # "signed": negative scores, and products of -0.0 and 0.0 that tie
    scores[::4] = 0.0
    scores[1::5] = -0.0
    return scores


def _exclusion(numel: int, fraction: float, seed: int) -> torch.Tensor:
    return _random_indices(numel, round(fraction * numel), torch.int64, seed).sort().values


@pytest.mark.parametrize("chunk_rows", [None, 1, 3])
@pytest.mark.parametrize("kind", ["continuous", "ties", "zeros", "signed"])
@pytest.mark.parametrize("shape", SHAPES)
def test_topk_outer_product_reference_matches_dense(shape, kind, chunk_rows):
    gen = torch.Generator().manual_seed(19)
    rows, cols = _scores(kind, shape[0], gen), _scores(kind, shape[1], gen)
    numel = shape[0] * shape[1]
    for fraction in (0.0, 0.1, 0.5):
        exclude = _exclusion(numel, fraction, seed=20)
        available = numel - exclude.numel()
        for k in sorted({1, max(1, available // 7), available}):
            got = _topk_outer_product_chunked(rows, cols, exclude, k, chunk_rows)
            assert torch.equal(got, _topk_dense(rows, cols, exclude, k)), (fraction, k)


@triton_runs
@pytest.mark.parametrize("kind", ["continuous", "ties", "zeros", "signed"])
@pytest.mark.parametrize("shape", SHAPES)
def test_topk_outer_product_triton_matches_reference_and_dense(shape, kind):
    gen = torch.Generator().manual_seed(21)
    rows, cols = _scores(kind, shape[0], gen), _scores(kind, shape[1], gen)
    numel = shape[0] * shape[1]
    _triton_impl("topk_outer_product", rows.device)
    for fraction in (0.0, 0.1, 0.5):
        exclude = _exclusion(numel, fraction, seed=22)
        available = numel - exclude.numel()
        for k in sorted({1, max(1, available // 7), available}):
            got = topk_outer_product(rows, cols, exclude, k, setting="triton")
            assert got.dtype == torch.int64
            assert torch.equal(got, _topk_dense(rows, cols, exclude, k)), (fraction, k)
            assert torch.equal(got, topk_outer_product_reference(rows, cols, exclude, k)), (fraction, k)


@triton_runs
def test_topk_outer_product_triton_float64_and_int32_inputs():
    gen = torch.Generator().manual_seed(23)
    rows, cols = torch.rand(33, generator=gen, dtype=torch.float64), torch.rand(65, generator=gen)
    exclude = _exclusion(33 * 65, 0.05, seed=24).int()
    got = topk_outer_product(rows, cols, exclude, 40, setting="triton")
    assert torch.equal(got, topk_outer_product_reference(rows, cols, exclude, 40))
    assert torch.equal(got, _topk_dense(rows, cols, exclude.long(), 40))


@pytest.mark.parametrize("setting", ["torch", "triton"])
def test_topk_outer_product_k_zero_and_invalid_arguments(setting):
    if setting == "triton" and (_triton.triton is None or not (HAS_CUDA or _triton.INTERPRETED)):
        pytest.skip("Triton kernels cannot run here")
    rows, cols = torch.rand(7), torch.rand(13)
    exclude = torch.tensor([3, 10, 50])
    assert topk_outer_product(rows, cols, exclude, 0, setting=setting).numel() == 0
    with pytest.raises(ValueError, match="k must be in \\[0, 88\\].*got 89"):
        topk_outer_product(rows, cols, exclude, 89, setting=setting)
    with pytest.raises(ValueError, match="exclude_sorted must be strictly increasing"):
        topk_outer_product(rows, cols, torch.tensor([10, 3]), 5, setting=setting)
    with pytest.raises(ValueError, match="exclude_sorted must lie in \\[0, 91\\)"):
        topk_outer_product(rows, cols, torch.tensor([3, 91]), 5, setting=setting)
    with pytest.raises(ValueError, match="row_scores must be finite"):
        topk_outer_product(torch.tensor([1.0, float("nan")]), cols, exclude[:1], 5, setting=setting)


# ------------------------------------------------------------------------------------------------------- dispatch


@pytest.mark.parametrize("op", OPS)
def test_dispatch_torch_setting_always_gives_reference(op):
    reference = dispatch._OPS[op][0]
    assert resolve(op, CPU, "torch") is reference
    assert resolve(op, torch.device("cuda"), "torch") is reference


@pytest.mark.parametrize("op", OPS)
def test_dispatch_auto_on_cpu_uses_reference(op):
    assert resolve(op, CPU, "auto") is dispatch._OPS[op][0]


@pytest.mark.skipif(_triton.triton is None, reason="needs triton")
@pytest.mark.parametrize("op", OPS)
def test_dispatch_auto_on_cuda_uses_triton(op):
    # Only the device type is inspected, so this needs no GPU.
    assert resolve(op, torch.device("cuda"), "auto") is dispatch._OPS[op][1] is not None


@triton_runs
@pytest.mark.parametrize("op", OPS)
def test_dispatch_env_var_overrides_setting(op, monkeypatch):
    reference, triton_fn = dispatch._OPS[op]
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    assert resolve(op, CPU, "triton") is reference
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    assert resolve(op, CPU, "torch") is triton_fn


def test_dispatch_env_var_overrides_results(monkeypatch):
    a, b, ncols = _sddmm_operands("linear", 3, 7, 13)
    idx = torch.tensor([0, 17, 90])
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    # the PyTorch strategy the CPU picks for this small matrix, not the Triton kernel the setting asks for
    assert dispatch.choose_sddmm_strategy(a, b, idx, ncols, "triton") == "dense"
    assert torch.equal(sddmm(a, b, idx, ncols, setting="triton"), sddmm_dense(a, b, idx, ncols))
    torch.testing.assert_close(sddmm(a, b, idx, ncols, setting="triton"), sddmm_reference(a, b, idx, ncols))


def test_dispatch_invalid_setting_names_the_value():
    with pytest.raises(ValueError, match="kernel_backend.*'cuda_fast'"):
        resolve("sddmm", CPU, "cuda_fast")
    with pytest.raises(ValueError, match="'cuda_fast'"):
        sddmm(torch.randn(2, 3), torch.randn(2, 4), torch.tensor([1]), 4, setting="cuda_fast")


def test_dispatch_invalid_env_var_names_the_value(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "tritonn")
    with pytest.raises(ValueError, match=f"{dispatch.ENV_VAR}.*'tritonn'"):
        resolve("apply_delta", CPU, "auto")


@pytest.mark.skipif(_triton.triton is None, reason="needs triton")
def test_dispatch_triton_on_cpu_without_interpreter_logs_once_and_uses_reference(monkeypatch, caplog):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(dispatch, "_logged", set())
    with caplog.at_level(logging.INFO, logger=dispatch.logger.name):
        for _ in range(3):
            assert resolve("sddmm", CPU, "triton") is sddmm_reference
    messages = [r.getMessage() for r in caplog.records if "sddmm" in r.getMessage()]
    assert len(messages) == 1 and "TRITON_INTERPRET is not set" in messages[0]


def test_register_triton_op_rejects_unknown_name():
    with pytest.raises(ValueError, match="'spmv'"):
        register_triton_op("spmv", lambda *args: None)


def test_kernels_import_without_triton_uses_references():
    # Loads peft_sparse.kernels alone (a stub parent package) with ``import triton`` failing.
    src = Path(dispatch.__file__).resolve().parents[1]
    code = (
        "import sys, types, torch\n"
        "sys.modules['triton'] = None\n"
        "pkg = types.ModuleType('peft_sparse'); pkg.__path__ = [sys.argv[1]]; sys.modules['peft_sparse'] = pkg\n"
        "from peft_sparse import kernels\n"
        "assert kernels._triton.triton is None\n"
        "assert kernels.resolve('sddmm', torch.device('cuda'), 'triton') is kernels.sddmm_reference\n"
        "w = kernels.apply_delta(torch.zeros(2, 3), torch.tensor([4]), torch.tensor([1.0]), 'triton')\n"
        "assert w.flatten().tolist() == [0, 0, 0, 0, 1, 0]\n"
    )
    env = {k: v for k, v in os.environ.items() if k != dispatch.ENV_VAR}
    command = [sys.executable, "-c", code, str(src)]
    result = subprocess.run(command, check=False, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr


# ----------------------------------------------------------------------------------------------------------- CUDA


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("orientation", ["linear", "conv1d"])
def test_cuda_sddmm(dtype, orientation):
    device = torch.device("cuda")
    for tokens, (out_f, in_f), density in [(1, (7, 13), 0.1), (37, (33, 65), 0.01), (4099, (257, 513), 0.05)]:
        a, b, ncols = _sddmm_operands(orientation, tokens, out_f, in_f, dtype=dtype, device=device)
        numel = a.shape[1] * ncols
        for k in (0, _count(numel, density), numel):
            idx = _random_indices(numel, k, torch.int64 if k % 2 else torch.int32, seed=k, device=device)
            got = sddmm(a, b, idx, ncols, setting="triton")
            assert got.dtype == torch.float32
            torch.testing.assert_close(got, sddmm_reference(a, b, idx, ncols), rtol=1e-4, atol=1e-3)
            torch.testing.assert_close(got.double(), _sddmm_dense(a, b, idx), rtol=1e-4, atol=1e-3)
            for token_major in (False, True):
                got = sddmm_launch(a, b, idx, ncols, token_major=token_major)
                torch.testing.assert_close(got.double(), _sddmm_dense(a, b, idx), rtol=1e-4, atol=1e-3)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_apply_delta(dtype):
    device = torch.device("cuda")
    gen = torch.Generator().manual_seed(31)
    for shape, density in [((7, 13), 1.0), ((33, 65), 0.1), ((1025, 4097), 0.01)]:
        weight = torch.randn(shape, generator=gen).to(dtype).to(device)
        k = _count(weight.numel(), density)
        idx = _random_indices(weight.numel(), k, torch.int32, seed=32, device=device)
        values = torch.randn(k, generator=gen).to(device)
        got = apply_delta(weight, idx, values, setting="triton")
        # each sum formed in float32 and rounded once to the weight's dtype, as the reference does
        assert torch.equal(got, apply_delta_reference(weight, idx, values))
        assert torch.equal(got, _apply_dense(weight.float(), idx, values).to(dtype))


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("transpose", [False, True])
def test_cuda_sparse_delta_matmul(dtype, transpose):
    device = torch.device("cuda")
    gen = torch.Generator().manual_seed(33)
    for tokens, (nrows, ncols), density in [(1, (7, 13), 0.1), (37, (33, 65), 1.0), (513, (257, 513), 0.01)]:
        x = torch.randn(tokens, nrows if transpose else ncols, generator=gen).to(dtype).to(device)
        k = _count(nrows * ncols, density)
        idx = _random_indices(nrows * ncols, k, torch.int64, seed=34, device=device)
        values = torch.randn(k, generator=gen).to(device)
        got = sparse_delta_matmul(x, idx, values, nrows, ncols, transpose, setting="triton")
        delta = _dense_delta(nrows, ncols, idx, values)
        expected = x.double() @ delta if transpose else x.double() @ delta.T
        torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-3)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["continuous", "ties", "zeros", "signed"])
def test_cuda_topk_outer_product(dtype, kind):
    device = torch.device("cuda")
    gen = torch.Generator().manual_seed(35)
    for shape in [(7, 13), (257, 1031)]:
        rows = _scores(kind, shape[0], gen).to(dtype).to(device)
        cols = _scores(kind, shape[1], gen).to(dtype).to(device)
        exclude = _exclusion(shape[0] * shape[1], 0.05, seed=36).to(device)
        available = shape[0] * shape[1] - exclude.numel()
        for k in sorted({1, min(100, available), available}):
            got = topk_outer_product(rows, cols, exclude, k, setting="triton")
            assert torch.equal(got, topk_outer_product_reference(rows, cols, exclude, k))
            assert torch.equal(got.cpu(), _topk_dense(rows.cpu(), cols.cpu(), exclude.cpu(), k))


@needs_cuda
def test_cuda_apply_delta_beyond_int32_positions():
    device = torch.device("cuda")
    weight = torch.zeros(2**16, 2**15 + 3, dtype=torch.bfloat16, device=device)  # 2**31 + 196608 elements
    idx = torch.tensor([0, 2**31 - 1, 2**31, weight.numel() - 1], device=device)
    values = torch.tensor([1.0, 2.0, 3.0, 4.0], device=device)
    got = apply_delta(weight, idx, values, setting="triton")
    assert got.flatten()[idx].float().tolist() == [1.0, 2.0, 3.0, 4.0]
    assert float(got.float().sum()) == 10.0
