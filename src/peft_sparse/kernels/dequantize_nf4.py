"""Dequantising an NF4 weight and adding a sparse delta: ``DEQUANT(W_nf4) + scatter(indices, values)`` (qSpIEL).

The weight is bitsandbytes' 4-bit NormalFloat format: ``packed`` holds two 4-bit codes per byte, high nibble first
(element ``2j`` is ``byte[j] >> 4``, element ``2j + 1`` is ``byte[j] & 0xF``; an odd element count leaves the last low
nibble as padding), over the flat row-major weight. Element ``p`` is ``NF4[code] * absmax[p // blocksize]``, one
float32 multiplication. With double quantisation (``compress_statistics=True``) ``absmax`` is itself stored as uint8
codes into ``state2.code`` with one float32 scale per ``state2.blocksize`` (256) blocks and a float32 ``offset``:
``absmax[b] = state2.code[q[b]] * state2.absmax[b // state2.blocksize] + offset``, a float32 product rounded before the
float32 sum, exactly as bitsandbytes computes it (``dequantize_blockwise`` then ``absmax += offset``).

The reference (CPU path and test oracle) is bitsandbytes' own ``dequantize_4bit`` followed by an index-put that adds
each value in float32 and rounds once, like ``apply_delta_reference``.

The Triton path runs two launches. The first dequantises: each program takes whole absmax blocks, computes each
block's scale once (through the nested statistics when present), looks the two codes of every byte up in the NF4 table,
multiplies, interleaves them back into element order and stores the result in ``out_dtype`` (float32 products rounded
once, to nearest even). The second is ``apply_delta``'s scatter kernel over the K delta positions: it loads the
dequantised entry, adds the value in float32 and stores the rounded sum. One launch would be a race: the delta indices
are unique but unsorted, so a program cannot know which deltas fall in its block, and a program that applied a delta
elsewhere could be overwritten by the program that dequantises that position, since Triton has no grid-wide barrier.
Making one pass possible would need the indices sorted (or bucketed per block) first, itself a launch or more, while
the second launch moves O(K) bytes next to the first's O(out * in). The first kernel is compiled with
``enable_fp_fusion=False`` so that the nested scale's multiply and add are not contracted into a fused multiply-add
(one rounding instead of bitsandbytes' two).

bitsandbytes' CPU kernel (its AVX-512 path, taken when the last dimension is a multiple of 16) indexes ``absmax`` per
row (``row * (n // blocksize) + col // blocksize``), which is wrong when the last dimension ``n`` is not a multiple of
the block size (quantisation blocks are flat): e.g. a ``[64, 96]`` weight with blocksize 64 dequantises wrongly. The
reference therefore asks bitsandbytes for the flat 1-D weight in that case (one row, where the two indexings agree)
and reshapes; elsewhere it passes the shape as given.
"""

from __future__ import annotations

import copy

import torch

from ._triton import INTERPRETED, cdiv, tl, triton

if triton is not None:
    from .apply_delta import BLOCK as _SCATTER_BLOCK
    from .apply_delta import NUM_WARPS as _SCATTER_NUM_WARPS
    from .apply_delta import _scatter_add_kernel, _to_bfloat16_rtne

# Explicit, unmeasured launch configuration: output elements per program (whole absmax blocks, at least one).
ELEMENTS_PER_PROGRAM = 2048
NUM_WARPS = 4

# Block sizes bitsandbytes accepts for 4-bit quantisation (all powers of two, as the kernel's tile shapes need).
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INDEX_DTYPES = (torch.int32, torch.int64)
# How the kernel writes each dtype: 1 rounds to bfloat16 by hand (the interpreter truncates casts to bfloat16), 0 casts
# (float32 as is; bfloat16 on CUDA and float16 everywhere round to nearest even).
_OUT_KIND = {torch.float32: 0, torch.bfloat16: 1 if INTERPRETED else 0, torch.float16: 0}

_nf4_tables: dict[torch.device, torch.Tensor] = {}


def _nf4_table(device: torch.device) -> torch.Tensor:
    """bitsandbytes' NF4 code table (16 float32 values) on ``device``: the one ``dequantize_4bit`` itself uses."""
    if device not in _nf4_tables:
        from bitsandbytes.functional import get_4bit_type

        _nf4_tables[device] = get_4bit_type("nf4", device=device).float().contiguous()
    return _nf4_tables[device]


def _numel(quant_state) -> int:
    return torch.Size(quant_state.shape).numel()


def _dequantize_bnb(packed: torch.Tensor, quant_state, out_dtype: torch.dtype) -> torch.Tensor:
    """bitsandbytes' ``dequantize_4bit`` of ``packed`` in ``out_dtype``, contiguous, of shape ``quant_state.shape``."""
    from bitsandbytes.functional import dequantize_4bit

    shape = torch.Size(quant_state.shape)
    state = copy.copy(quant_state)
    state.dtype = out_dtype
    if len(shape) >= 2 and shape[-1] % quant_state.blocksize:
        # bitsandbytes' CPU kernel would index absmax per row here (see the module docstring); one row is exact.
        state.shape = torch.Size([shape.numel()])
    # reshape: bitsandbytes returns a transposed view when ``packed`` has one row (at most two elements here).
    return dequantize_4bit(packed, state).reshape(shape).contiguous()


def dequantize_nf4_delta_reference(
    packed: torch.Tensor, quant_state, indices: torch.Tensor, values: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """Return ``DEQUANT(packed) + scatter(indices, values)`` as a new contiguous ``out_dtype`` tensor of shape
    ``quant_state.shape``.

    ``packed`` and ``quant_state`` are a bitsandbytes NF4 weight (``Params4bit.data`` and its ``quant_state``, double
    quantised or not); the dequantisation is bitsandbytes' ``dequantize_4bit`` in ``out_dtype``. ``indices`` are unique
    flat row-major positions (possibly none); each sum is formed in float32 and rounded once to ``out_dtype``.
    """
    check_dequantize_nf4_args(packed, quant_state, indices, values, out_dtype)
    out = _dequantize_bnb(packed, quant_state, out_dtype)
    if indices.numel():
        flat = out.view(-1)
        idx = indices.to(out.device)
        flat[idx] = (flat[idx].float() + values.detach().float().to(out.device)).to(out_dtype)
    return out


if triton is not None:

    @triton.jit
    def _dequantize_nf4_kernel(
        packed_ptr,
        absmax_ptr,
        nested_code_ptr,
        nested_absmax_ptr,
        offset_ptr,
        nf4_ptr,
        out_ptr,
        numel,
        n_bytes,
        n_blocks,
        nested_blocksize,
        BLOCKSIZE: tl.constexpr,
        HALF_BLOCK: tl.constexpr,
        BLOCKS_PER_PROGRAM: tl.constexpr,
        NESTED: tl.constexpr,
        OUT_KIND: tl.constexpr,
    ):
        # int64 throughout: element positions pass 2**31 on large layers.
        blocks = tl.program_id(0).to(tl.int64) * BLOCKS_PER_PROGRAM + tl.arange(0, BLOCKS_PER_PROGRAM)
        block_ok = blocks < n_blocks
        # One scale per absmax block, as bitsandbytes forms it: float32 product, then (nested) float32 sum.
        if NESTED:
            q = tl.load(absmax_ptr + blocks, mask=block_ok, other=0).to(tl.int32)
            nested_code = tl.load(nested_code_ptr + q, mask=block_ok, other=0.0).to(tl.float32)
            nested_absmax = tl.load(nested_absmax_ptr + blocks // nested_blocksize, mask=block_ok, other=0.0)
            scale = nested_code * nested_absmax.to(tl.float32)
            scale = scale + tl.load(offset_ptr).to(tl.float32)
        else:
            scale = tl.load(absmax_ptr + blocks, mask=block_ok, other=0.0).to(tl.float32)
        byte_offs = blocks[:, None] * HALF_BLOCK + tl.arange(0, HALF_BLOCK)[None, :]
        byte = tl.load(packed_ptr + byte_offs, mask=byte_offs < n_bytes, other=0)
        high = tl.load(nf4_ptr + (byte >> 4).to(tl.int32))
        low = tl.load(nf4_ptr + (byte & 0xF).to(tl.int32))
        # High nibble first: element 2j comes from byte j's high nibble, element 2j + 1 from its low nibble.
        values = tl.interleave(high * scale[:, None], low * scale[:, None])
        out_offs = blocks[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
        if OUT_KIND == 1:
            result = _to_bfloat16_rtne(values)
        else:
            result = values.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + out_offs, result, mask=out_offs < numel)


def _packed_bytes(packed: torch.Tensor) -> torch.Tensor:
    """``packed`` as a flat uint8 tensor (bitsandbytes may store the bytes in another dtype)."""
    flat = packed.reshape(-1)
    return flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)


def check_dequantize_nf4_args(
    packed: torch.Tensor, quant_state, indices: torch.Tensor, values: torch.Tensor, out_dtype: torch.dtype
) -> None:
    """Raise ``ValueError`` naming the argument when the operands of ``dequantize_nf4_delta`` do not fit together."""
    quant_type = getattr(quant_state, "quant_type", None)
    if quant_type != "nf4":
        raise ValueError(f"quant_state.quant_type must be 'nf4', got {quant_type!r}")
    if quant_state.blocksize not in BLOCKSIZES:
        raise ValueError(f"quant_state.blocksize must be one of {BLOCKSIZES}, got {quant_state.blocksize}")
    if out_dtype not in _FLOAT_DTYPES:
        raise ValueError(f"out_dtype must be float32, bfloat16 or float16, got {out_dtype}")
    numel = _numel(quant_state)
    n_bytes = packed.numel() * packed.element_size()
    if n_bytes < cdiv(numel, 2):
        raise ValueError(
            f"packed holds {n_bytes} bytes, fewer than the {cdiv(numel, 2)} that shape "
            f"{tuple(quant_state.shape)} needs"
        )
    n_blocks = cdiv(numel, quant_state.blocksize)
    if quant_state.absmax.numel() < n_blocks:
        raise ValueError(f"quant_state.absmax has {quant_state.absmax.numel()} entries, fewer than {n_blocks} blocks")
    if indices.dim() != 1 or indices.dtype not in _INDEX_DTYPES:
        raise ValueError(f"indices must be a 1-D int32 or int64 tensor, got {indices.dtype} {tuple(indices.shape)}")
    if values.shape != indices.shape:
        raise ValueError(f"values must have the shape of indices {tuple(indices.shape)}, got {tuple(values.shape)}")
    if values.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"values must be float32, bfloat16 or float16, got {values.dtype}")
    if not (packed.device == indices.device == values.device):
        raise ValueError(
            f"packed, indices and values must be on one device, got {packed.device}, {indices.device}, {values.device}"
        )


def _check_triton_state(packed: torch.Tensor, quant_state) -> None:
    """The parts of ``quant_state`` the kernel reads: on ``packed``'s device, with the dtypes it assumes."""
    tensors = {"quant_state.absmax": quant_state.absmax}
    if quant_state.nested:
        nested = quant_state.state2
        tensors |= {"quant_state.state2.absmax": nested.absmax, "quant_state.state2.code": nested.code}
        if quant_state.absmax.dtype != torch.uint8:
            raise ValueError(f"nested quant_state.absmax must be uint8 codes, got {quant_state.absmax.dtype}")
        if nested.code.numel() != 256 or nested.blocksize <= 0:
            raise ValueError(
                f"quant_state.state2 must have a 256-entry code and a positive blocksize, got "
                f"{nested.code.numel()} entries and blocksize {nested.blocksize}"
            )
        if nested.dtype != torch.float32 or nested.absmax.dtype != torch.float32:
            raise ValueError(
                f"quant_state.state2 must dequantise in float32, got dtype {nested.dtype} and absmax "
                f"{nested.absmax.dtype}"
            )
        n_groups = cdiv(cdiv(_numel(quant_state), quant_state.blocksize), nested.blocksize)
        if nested.absmax.numel() < n_groups:
            raise ValueError(f"quant_state.state2.absmax has {nested.absmax.numel()} entries, fewer than {n_groups}")
        if isinstance(quant_state.offset, torch.Tensor):
            tensors["quant_state.offset"] = quant_state.offset
    elif quant_state.absmax.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"quant_state.absmax must be floating point, got {quant_state.absmax.dtype}")
    for name, tensor in tensors.items():
        if tensor.device != packed.device:
            raise ValueError(f"{name} must be on packed's device {packed.device}, got {tensor.device}")


def dequantize_nf4_delta_triton(
    packed: torch.Tensor, quant_state, indices: torch.Tensor, values: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """Triton version of ``dequantize_nf4_delta_reference`` for unique ``indices``: dequantise in one launch, add the
    delta in a second (see the module docstring for why not one). Same arguments and result."""
    if triton is None:
        raise RuntimeError("dequantize_nf4_delta_triton needs triton, which is not installed")
    check_dequantize_nf4_args(packed, quant_state, indices, values, out_dtype)
    _check_triton_state(packed, quant_state)
    device = packed.device
    if device.type != "cuda" and not INTERPRETED:
        raise RuntimeError(f"Triton kernels run on CUDA or under TRITON_INTERPRET=1, got tensors on {device.type}")
    shape = torch.Size(quant_state.shape)
    numel, blocksize = shape.numel(), quant_state.blocksize
    out = torch.empty(shape, dtype=out_dtype, device=device)
    if numel == 0:
        return out
    data = _packed_bytes(packed)
    absmax = quant_state.absmax.contiguous()
    if quant_state.nested:
        nested = quant_state.state2
        nested_code, nested_absmax = nested.code.contiguous(), nested.absmax.contiguous()
        offset = torch.as_tensor(quant_state.offset, dtype=torch.float32, device=device).reshape(1)
        nested_blocksize = nested.blocksize
    else:
        # Unused by the kernel (NESTED=False), but every pointer argument needs a tensor.
        nested_code = nested_absmax = offset = absmax
        nested_blocksize = 1
    n_blocks = cdiv(numel, blocksize)
    blocks_per_program = max(1, ELEMENTS_PER_PROGRAM // blocksize)
    _dequantize_nf4_kernel[(cdiv(n_blocks, blocks_per_program),)](
        data,
        absmax,
        nested_code,
        nested_absmax,
        offset,
        _nf4_table(device),
        out,
        numel,
        data.numel(),
        n_blocks,
        nested_blocksize,
        BLOCKSIZE=blocksize,
        HALF_BLOCK=blocksize // 2,
        BLOCKS_PER_PROGRAM=blocks_per_program,
        NESTED=bool(quant_state.nested),
        OUT_KIND=_OUT_KIND[out_dtype],
        num_warps=NUM_WARPS,
        enable_fp_fusion=False,
    )
    k = indices.numel()
    if k:
        _scatter_add_kernel[(cdiv(k, _SCATTER_BLOCK),)](
            out,
            indices.contiguous(),
            values.detach().contiguous(),
            k,
            numel,
            BLOCK=_SCATTER_BLOCK,
            IS_BF16=out_dtype == torch.bfloat16,
            num_warps=_SCATTER_NUM_WARPS,
        )
    return out
