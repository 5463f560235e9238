"""Applying a sparse delta to a dense weight: ``W + scatter(indices, values)``.

The Triton path copies ``weight`` with ``torch`` (a bandwidth-bound copy) and then runs one scatter kernel over the
K positions that loads ``W[p]``, adds the value in float32 and stores the rounded sum. Because the delta's indices
are unique, no atomics are needed (with duplicates neither path is defined). A single pass that copies and adds at
once would need the indices sorted to find which positions fall in each
copied block; they are not sorted in general, and K is small next to the copy.
"""

from __future__ import annotations

import torch

from ._triton import INTERPRETED, cdiv, tl, triton

# Explicit, unmeasured launch configuration: positions per program.
BLOCK = 1024
NUM_WARPS = 4

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INDEX_DTYPES = (torch.int32, torch.int64)


def apply_delta_reference(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Return a new contiguous tensor equal to ``weight`` with ``values`` added at the unique flat row-major
    ``indices``.

    ``weight`` is left unchanged. Each sum is formed in float32 and rounded once to ``weight``'s dtype, exactly as
    ``peft_sparse.delta.merge_exact`` merges, so merged and unmerged models agree bit for bit.
    """
    out = weight.detach().clone(memory_format=torch.contiguous_format)
    if indices.numel():
        flat = out.view(-1)
        flat[indices] = (flat[indices].float() + values.detach().float()).to(out.dtype)
    return out


if triton is not None:

    @triton.jit
    def _to_bfloat16_rtne(x):
        # Round float32 to nearest-even bfloat16 by hand: Triton's interpreter truncates in x.to(tl.bfloat16).
        bits = x.to(tl.uint32, bitcast=True)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
        return tl.where(is_nan, x, rounded).to(tl.bfloat16)

    @triton.jit
    def _scatter_add_kernel(out_ptr, idx_ptr, val_ptr, n_positions, numel, BLOCK: tl.constexpr, IS_BF16: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        in_range = offs < n_positions
        idx = tl.load(idx_ptr + offs, mask=in_range, other=0).to(tl.int64)
        # Positions outside the weight are skipped instead of writing out of bounds.
        mask = in_range & (idx >= 0) & (idx < numel)
        values = tl.load(val_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        current = tl.load(out_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        # Add in float32 and round once, as the reference and merge_exact do.
        if IS_BF16:
            total = _to_bfloat16_rtne(current + values)
        else:
            total = (current + values).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + idx, total, mask=mask)


def check_apply_delta_args(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> None:
    """Raise ``ValueError`` naming the argument when ``weight``, ``indices`` and ``values`` do not fit together."""
    if indices.dim() != 1 or indices.dtype not in _INDEX_DTYPES:
        raise ValueError(f"indices must be a 1-D int32 or int64 tensor, got {indices.dtype} {tuple(indices.shape)}")
    if values.shape != indices.shape:
        raise ValueError(f"values must have the shape of indices {tuple(indices.shape)}, got {tuple(values.shape)}")
    if weight.dtype not in _FLOAT_DTYPES or values.dtype not in _FLOAT_DTYPES:
        raise ValueError(
            f"weight and values must be float32, bfloat16 or float16, got {weight.dtype} and {values.dtype}"
        )
    if not (weight.device == indices.device == values.device):
        raise ValueError(
            f"weight, indices and values must be on one device, got {weight.device}, {indices.device}, {values.device}"
        )


def apply_delta_triton(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Triton version of ``apply_delta_reference`` for unique ``indices``: a new contiguous tensor, ``weight`` kept."""
    if triton is None:
        raise RuntimeError("apply_delta_triton needs triton, which is not installed")
    check_apply_delta_args(weight, indices, values)
    if weight.device.type != "cuda" and not INTERPRETED:
        raise RuntimeError(
            f"Triton kernels run on CUDA or under TRITON_INTERPRET=1, got tensors on {weight.device.type}"
        )
    out = weight.detach().clone(memory_format=torch.contiguous_format)
    k = indices.numel()
    if k == 0:
        return out
    _scatter_add_kernel[(cdiv(k, BLOCK),)](
        out,
        indices.contiguous(),
        values.detach().contiguous(),
        k,
        out.numel(),
        BLOCK=BLOCK,
        IS_BF16=out.dtype == torch.bfloat16,
        num_warps=NUM_WARPS,
    )
    return out
