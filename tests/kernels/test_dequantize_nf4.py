"""The NF4 dequantise + sparse delta kernel against its reference (bitsandbytes' ``dequantize_4bit`` + index-put),
against bitsandbytes' ``dequantize_4bit`` called directly, and against an independent float32 formula; plus dispatch.

Without CUDA the Triton kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before any
kernel is defined). Every comparison is bit for bit (``torch.equal``). Tests marked ``cuda`` run only on a GPU.
"""

from __future__ import annotations

import copy

import pytest
import torch

from peft_sparse.kernels import (
    _triton,
    dequantize_nf4_delta,
    dequantize_nf4_delta_reference,
    dispatch,
    resolve,
)
from peft_sparse.kernels.dequantize_nf4 import check_dequantize_nf4_args

bnb_functional = pytest.importorskip("bitsandbytes.functional")

HAS_CUDA = torch.cuda.is_available()
CPU = torch.device("cpu")
OP = "dequantize_nf4_delta"

triton_runs = pytest.mark.skipif(
    _triton.triton is None or not (HAS_CUDA or _triton.INTERPRETED),
    reason="needs triton, and CUDA or TRITON_INTERPRET=1 set before the kernels were defined",
)
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")

# Odd element counts, a last dimension that is not a multiple of the block size, and one that is.
SHAPES = [(7, 13), (33, 65), (64, 96), (16, 128)]
BLOCKSIZES = [64, 128]


@pytest.fixture(autouse=True)
def _no_backend_env(monkeypatch):
    # A backend set in the caller's environment would override every setting these tests choose.
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)


def _device() -> torch.device:
    return torch.device("cuda") if HAS_CUDA else CPU


def _quantize(shape, blocksize: int, nested: bool, seed: int = 0, device=CPU, **kwargs):
    gen = torch.Generator().manual_seed(seed)
    weight = (torch.randn(shape, generator=gen) * 0.05).to(device)
    return bnb_functional.quantize_4bit(
        weight, blocksize=blocksize, compress_statistics=nested, quant_type="nf4", **kwargs
    )


def _delta(numel: int, k: int, seed: int, device=CPU, index_dtype=torch.int64, value_dtype=torch.float32):
    """``k`` unique flat positions in random (unsorted) order and small values (the size of a trained delta)."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(numel, generator=gen)[:k].to(index_dtype)
    values = torch.randn(k, generator=gen) * 1e-2
    return idx.to(device), values.to(value_dtype).to(device)


def _formula(packed: torch.Tensor, quant_state, indices, values, out_dtype) -> torch.Tensor:
    """Independent oracle: ``NF4[code] * absmax[p // blocksize]`` in float32 (nested absmax: product, then offset),
    high nibble first, rounded once to ``out_dtype``; then each delta added in float32 and rounded once."""
    shape = torch.Size(quant_state.shape)
    numel, blocksize = shape.numel(), quant_state.blocksize
    data = packed.reshape(-1).view(torch.uint8).long()
    codes = torch.stack([data >> 4, data & 0xF], 1).reshape(-1)[:numel]
    if quant_state.nested:
        nested = quant_state.state2
        groups = torch.arange(quant_state.absmax.numel(), device=data.device) // nested.blocksize
        absmax = nested.code[quant_state.absmax.long()] * nested.absmax[groups]
        absmax = absmax + quant_state.offset
    else:
        absmax = quant_state.absmax.float()
    table = bnb_functional.get_4bit_type("nf4", device=data.device)
    out = (table[codes] * absmax[torch.arange(numel, device=data.device) // blocksize]).to(out_dtype)
    idx = indices.long()
    out[idx] = (out[idx].float() + values.float()).to(out_dtype)
    return out.view(shape)


def _triton_fn(device: torch.device):
    """The function ``setting="triton"`` dispatches to; fails if that would silently be the reference."""
    fn = resolve(OP, device, "triton")
    assert fn is not dispatch._OPS[OP][0], f"{OP} resolved to its reference under kernel_backend='triton'"
    return fn


def _empty(device=CPU):
    return torch.empty(0, dtype=torch.int64, device=device), torch.empty(0, device=device)


# ------------------------------------------------------------------------------------------------- triton kernel


@triton_runs
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_matches_reference_and_formula(shape, blocksize, nested, out_dtype):
    packed, state = _quantize(shape, blocksize, nested, seed=blocksize + nested)
    fn = _triton_fn(packed.device)
    numel = shape[0] * shape[1]
    k = max(1, numel // 10)
    for idx, values in (_empty(), _delta(numel, k, seed=1, index_dtype=torch.int32), _delta(numel, numel, seed=2)):
        got = dequantize_nf4_delta(packed, state, idx, values, out_dtype, setting="triton")
        assert got.dtype == out_dtype and got.shape == shape and got.is_contiguous()
        assert torch.equal(got, fn(packed, state, idx, values, out_dtype))
        assert torch.equal(got, dequantize_nf4_delta_reference(packed, state, idx, values, out_dtype))
        assert torch.equal(got, _formula(packed, state, idx, values, out_dtype))


@triton_runs
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_without_delta_matches_bnb_dequantize_4bit(shape, blocksize, nested, out_dtype):
    packed, state = _quantize(shape, blocksize, nested, seed=3)
    got = dequantize_nf4_delta(packed, state, *_empty(), out_dtype, setting="triton")
    as_dtype = copy.copy(state)
    as_dtype.dtype = out_dtype
    direct = bnb_functional.dequantize_4bit(packed, as_dtype)
    if torch.equal(got, direct):
        return
    # The one known difference: bitsandbytes' CPU kernel (AVX-512 path) indexes absmax per row, wrong when the last
    # dimension is not a multiple of the block size. Check that this is what happened, and that bitsandbytes itself
    # agrees with the kernel on the same bytes dequantised as one row (where both indexings coincide).
    assert packed.device.type == "cpu" and shape[1] % blocksize != 0
    flat = copy.copy(as_dtype)
    flat.shape = torch.Size([shape[0] * shape[1]])
    assert torch.equal(got, bnb_functional.dequantize_4bit(packed, flat).reshape(shape))
    rows, cols = torch.arange(shape[0])[:, None], torch.arange(shape[1])[None, :]
    row_blocks = (rows * (shape[1] // blocksize) + cols // blocksize).flatten()
    codes = torch.stack([packed.view(-1) >> 4, packed.view(-1) & 0xF], 1).reshape(-1)[: shape[0] * shape[1]]
    per_row = bnb_functional.get_4bit_type("nf4", device=CPU)[codes.long()] * _formula_absmax(state)[row_blocks]
    assert torch.equal(direct, per_row.to(out_dtype).view(shape))


def _formula_absmax(state) -> torch.Tensor:
    """The float32 absmax of every block, as bitsandbytes dequantises it (nested: product, then offset)."""
    if not state.nested:
        return state.absmax.float()
    groups = torch.arange(state.absmax.numel()) // state.state2.blocksize
    return state.state2.code[state.absmax.long()] * state.state2.absmax[groups] + state.offset


@triton_runs
@pytest.mark.parametrize("value_dtype", [torch.float32, torch.bfloat16])
def test_triton_half_outputs_and_bf16_values(value_dtype):
    packed, state = _quantize((33, 65), 64, True, seed=4)
    idx, values = _delta(33 * 65, 300, seed=5, value_dtype=value_dtype)
    for out_dtype in (torch.float16, torch.bfloat16):
        got = dequantize_nf4_delta(packed, state, idx, values, out_dtype, setting="triton")
        assert torch.equal(got, dequantize_nf4_delta_reference(packed, state, idx, values, out_dtype))
        assert torch.equal(got, _formula(packed, state, idx, values, out_dtype))


@triton_runs
def test_triton_other_storage_dtype_and_blocksizes():
    # bitsandbytes can store the packed bytes as another dtype (for FSDP); the bytes are the same.
    packed, state = _quantize((24, 40), 64, True, seed=6, quant_storage=torch.bfloat16)
    assert packed.dtype == torch.bfloat16
    idx, values = _delta(24 * 40, 50, seed=7)
    got = dequantize_nf4_delta(packed, state, idx, values, torch.float32, setting="triton")
    assert torch.equal(got, dequantize_nf4_delta_reference(packed, state, idx, values, torch.float32))
    for blocksize in (32, 256, 4096):
        packed, state = _quantize((9, 70), blocksize, blocksize != 256, seed=blocksize)
        got = dequantize_nf4_delta(packed, state, *_empty(), torch.float32, setting="triton")
        assert torch.equal(got, _formula(packed, state, *_empty(), torch.float32))


@triton_runs
def test_triton_params4bit_weight():
    import bitsandbytes as bnb

    gen = torch.Generator().manual_seed(8)
    weight = torch.randn(48, 80, generator=gen) * 0.05
    params = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", compress_statistics=True).to(_device())
    state = params.quant_state
    idx, values = _delta(weight.numel(), 100, seed=9, device=params.device)
    for out_dtype in (torch.float32, torch.bfloat16):
        got = dequantize_nf4_delta(params.data, state, idx, values, out_dtype, setting="triton")
        assert torch.equal(got, dequantize_nf4_delta_reference(params.data, state, idx, values, out_dtype))


def test_reference_is_bnb_dequantize_4bit_plus_one_rounding():
    packed, state = _quantize((16, 128), 64, True, seed=10)
    idx, values = _delta(16 * 128, 200, seed=11)
    as_bf16 = copy.copy(state)
    as_bf16.dtype = torch.bfloat16
    expected = bnb_functional.dequantize_4bit(packed, as_bf16).clone()
    flat = expected.view(-1)
    flat[idx] = (flat[idx].float() + values).to(torch.bfloat16)
    got = dequantize_nf4_delta_reference(packed, state, idx, values, torch.bfloat16)
    assert torch.equal(got, expected)
    untouched = torch.ones(16 * 128, dtype=torch.bool)
    untouched[idx] = False
    assert torch.equal(got.view(-1)[untouched], bnb_functional.dequantize_4bit(packed, as_bf16).view(-1)[untouched])


@pytest.mark.parametrize("setting", ["torch", "triton"])
def test_invalid_arguments_name_the_problem(setting):
    if setting == "triton" and not (_triton.INTERPRETED or HAS_CUDA):
        pytest.skip("needs the Triton interpreter or CUDA")
    packed, state = _quantize((8, 16), 64, True, seed=12)
    idx, values = _delta(128, 5, seed=13)
    fp4_state = copy.copy(state)
    fp4_state.quant_type = "fp4"
    with pytest.raises(ValueError, match="quant_type"):
        dequantize_nf4_delta(packed, fp4_state, idx, values, torch.float32, setting=setting)
    with pytest.raises(ValueError, match="out_dtype"):
        dequantize_nf4_delta(packed, state, idx, values, torch.int32, setting=setting)
    with pytest.raises(ValueError, match="packed holds"):
        dequantize_nf4_delta(packed[:10], state, idx, values, torch.float32, setting=setting)
    with pytest.raises(ValueError, match="values"):
        dequantize_nf4_delta(packed, state, idx, values[:3], torch.float32, setting=setting)
    with pytest.raises(ValueError, match="indices"):
        check_dequantize_nf4_args(packed, state, idx.float(), values, torch.float32)


# ------------------------------------------------------------------------------------------------------- dispatch


def test_dispatch_torch_setting_gives_reference():
    reference = dispatch._OPS[OP][0]
    assert reference is dequantize_nf4_delta_reference
    assert resolve(OP, CPU, "torch") is reference
    assert resolve(OP, torch.device("cuda"), "torch") is reference
    assert resolve(OP, CPU, "auto") is reference


@pytest.mark.skipif(_triton.triton is None, reason="needs triton")
def test_dispatch_auto_on_cuda_uses_triton():
    # Only the device type is inspected, so this needs no GPU.
    assert resolve(OP, torch.device("cuda"), "auto") is dispatch._OPS[OP][1] is not None


@triton_runs
def test_dispatch_env_var_overrides_setting(monkeypatch):
    reference, triton_fn = dispatch._OPS[OP]
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    assert resolve(OP, CPU, "triton") is reference
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    assert resolve(OP, CPU, "torch") is triton_fn


# ----------------------------------------------------------------------------------------------------------- CUDA


@needs_cuda
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_cuda_matches_bnb_dequantize_4bit(blocksize, nested):
    device = torch.device("cuda")
    for shape in [(7, 13), (33, 65), (64, 96), (1024, 4096), (4096, 11008 // 4)]:
        packed, state = _quantize(shape, blocksize, nested, seed=20, device=device)
        numel = shape[0] * shape[1]
        for out_dtype in (torch.float32, torch.bfloat16, torch.float16):
            got = dequantize_nf4_delta(packed, state, *_empty(device), out_dtype, setting="triton")
            as_dtype = copy.copy(state)
            as_dtype.dtype = out_dtype
            assert torch.equal(got, bnb_functional.dequantize_4bit(packed, as_dtype))
            for k in (1, max(1, numel // 100), numel):
                idx, values = _delta(numel, k, seed=k, device=device)
                got = dequantize_nf4_delta(packed, state, idx, values, out_dtype, setting="triton")
                assert torch.equal(got, dequantize_nf4_delta_reference(packed, state, idx, values, out_dtype))
                assert torch.equal(got, _formula(packed, state, idx, values, out_dtype))


@needs_cuda
def test_cuda_beyond_int32_positions():
    device = torch.device("cuda")
    shape = (2**16, 2**15 + 64)  # 2**31 + 2**22 elements
    gen = torch.Generator(device=device).manual_seed(21)
    packed = torch.randint(0, 256, (shape[0] * shape[1] // 2, 1), generator=gen, device=device, dtype=torch.uint8)
    n_blocks = shape[0] * shape[1] // 64
    state = bnb_functional.QuantState(
        absmax=torch.rand(n_blocks, generator=gen, device=device) + 0.5,
        shape=torch.Size(shape),
        dtype=torch.bfloat16,
        blocksize=64,
        code=bnb_functional.get_4bit_type("nf4", device=device),
        quant_type="nf4",
    )
    idx = torch.tensor([0, 2**31 - 1, 2**31, shape[0] * shape[1] - 1], device=device)
    values = torch.tensor([1.0, 2.0, 3.0, 4.0], device=device)
    got = dequantize_nf4_delta(packed, state, idx, values, torch.bfloat16, setting="triton").view(-1)
    codes = torch.stack([packed.view(-1) >> 4, packed.view(-1) & 0xF], 1).view(-1)
    # the deltas' positions, then untouched ones: beside the int32 boundary and past it
    check = torch.cat([idx, torch.tensor([2**31 - 2, 2**31 + 1, 2**31 + 12345], device=device)])
    plain = (state.code[codes[check].long()] * state.absmax[check // 64]).to(torch.bfloat16)
    expected = plain.clone()
    expected[:4] = (plain[:4].float() + values).to(torch.bfloat16)
    assert torch.equal(got[check], expected)
