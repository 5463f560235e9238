"""Split formulation of a sparse-delta linear layer: the product with the delta alone.

A layer ``y = x @ (W + Delta).T`` with a K-sparse ``Delta`` can be computed two ways:

- merged (what the layer does): ``W_eff = apply_delta(W, idx, val)`` then a dense GEMM. Extra cost per forward and
  per backward: one copy of ``W`` (read + write ``out * in`` elements) and a K-element scatter, plus a transient
  ``out * in`` buffer. The GEMMs are the frozen layer's, at full tensor-core speed.
- split (this op): ``y = x @ W.T + x @ Delta.T`` and ``dx = dy @ W + dy @ Delta``. No copy of ``W`` and no transient
  buffer, but each product touches ``tokens * K`` gathered inputs and float32 atomic adds, which run on the
  memory system rather than the tensor cores.

Measured on a 2-core CPU (PyTorch references, weight [2752, 1024], densities 0.5 % and 1 %;
``benchmarks/results/bench_formulations_cpu.md``): split is about 2x faster for a single token (decoding), mixed at
16 tokens (0.8x to 1.4x the merged time), and 1.2x to 4.6x slower from 64 tokens on, for training steps and for
inference alike. So the layer uses the merged formulation for every shape: training batches are far past the
crossover, decoding is better served by ``merge_and_unload()`` (no delta at all), and merged outputs equal a merged
model's bit for bit, which the split sum does not. On a GPU the crossover has not been measured (no GPU was
available); ``benchmarks/bench_kernels.py`` times both formulations at Llama-7B shapes for that.

``sparse_delta_product`` (the ``SparseDeltaMatmul`` autograd Function) is the differentiable form: its backward
uses this op transposed for ``dx`` and ``sddmm`` for the values, so ``F.linear(x, W) + sparse_delta_product(...)`` is
a complete split layer.

The Triton kernel gives each program a ``[BLOCK_T, BLOCK_K]`` tile of (tokens, positions), gathers the inputs, scales
them by the values and adds them into the float32 output with atomics; the order of those additions, and so the
last bits of the result, can vary between runs on a GPU.
"""

from __future__ import annotations

import torch

from ._triton import INTERPRETED, cdiv, tl, triton

# Elements of (tokens x K) gathered at once by the reference; bounds its working memory.
_REFERENCE_CHUNK_ELEMENTS = 1 << 24

# Explicit, unmeasured launch configuration.
BLOCK_T = 32
BLOCK_K = 64
NUM_WARPS = 4

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INDEX_DTYPES = (torch.int32, torch.int64)


def sparse_delta_matmul_reference(
    x: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, nrows: int, ncols: int, transpose: bool = False
) -> torch.Tensor:
    """Return ``x @ Delta.T`` (or ``x @ Delta`` with ``transpose``) in float32 without building ``Delta``.

    ``Delta`` is the ``[nrows, ncols]`` matrix with ``values`` at the flat row-major ``indices`` (duplicates add up).
    ``x`` is ``[tokens, ncols]`` giving ``[tokens, nrows]``, or with ``transpose`` ``[tokens, nrows]`` giving
    ``[tokens, ncols]``: the forward and the input-gradient products of a linear layer.
    """
    check_sparse_delta_matmul_args(x, indices, values, nrows, ncols, transpose)
    n_out = ncols if transpose else nrows
    out = torch.zeros((x.shape[0], n_out), dtype=torch.float32, device=x.device)
    k = indices.numel()
    if k == 0 or x.shape[0] == 0:
        return out
    idx = indices.long()
    rows, cols = idx // ncols, idx % ncols
    src, dst = (rows, cols) if transpose else (cols, rows)
    step = max(1, _REFERENCE_CHUNK_ELEMENTS // x.shape[0])
    vals = values.detach().float()
    for start in range(0, k, step):
        end = start + step
        out.index_add_(1, dst[start:end], x[:, src[start:end]].float() * vals[start:end])
    return out


def check_sparse_delta_matmul_args(
    x: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, nrows: int, ncols: int, transpose: bool
) -> None:
    """Raise ``ValueError`` naming the argument when ``x``, ``indices``, ``values`` and the shape do not fit."""
    if nrows <= 0 or ncols <= 0:
        raise ValueError(f"nrows and ncols must be positive, got {nrows} and {ncols}")
    n_in = nrows if transpose else ncols
    if x.dim() != 2 or x.shape[1] != n_in:
        raise ValueError(f"x must be [tokens, {n_in}] (transpose={transpose}), got shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x must be float32, bfloat16 or float16, got {x.dtype}")
    if indices.dim() != 1 or indices.dtype not in _INDEX_DTYPES:
        raise ValueError(f"indices must be a 1-D int32 or int64 tensor, got {indices.dtype} {tuple(indices.shape)}")
    if values.shape != indices.shape or not values.is_floating_point():
        raise ValueError(f"values must be float with the shape of indices, got {values.dtype} {tuple(values.shape)}")
    if not (x.device == indices.device == values.device):
        raise ValueError(
            f"x, indices and values must be on one device, got {x.device}, {indices.device}, {values.device}"
        )


if triton is not None:

    @triton.jit
    def _sparse_delta_matmul_kernel(
        x_ptr,
        idx_ptr,
        val_ptr,
        out_ptr,
        n_tokens,
        n_positions,
        n_rows,
        n_cols,
        stride_x_token,
        stride_x_feature,
        stride_out_token,
        TRANSPOSE: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        offs_t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
        offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        in_range = offs_k < n_positions
        idx = tl.load(idx_ptr + offs_k, mask=in_range, other=0).to(tl.int64)
        rows = idx // n_cols
        cols = idx - rows * n_cols
        # Positions outside the matrix contribute nothing instead of touching memory out of bounds.
        valid = in_range & (idx >= 0) & (rows < n_rows)
        if TRANSPOSE:
            src, dst = rows, cols
        else:
            src, dst = cols, rows
        values = tl.load(val_ptr + offs_k, mask=valid, other=0.0).to(tl.float32)
        mask = (offs_t < n_tokens)[:, None] & valid[None, :]
        gathered = tl.load(
            x_ptr + offs_t[:, None] * stride_x_token + src[None, :] * stride_x_feature, mask=mask, other=0.0
        )
        contribution = gathered.to(tl.float32) * values[None, :]
        tl.atomic_add(out_ptr + offs_t[:, None] * stride_out_token + dst[None, :], contribution, mask=mask)


def sparse_delta_matmul_triton(
    x: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, nrows: int, ncols: int, transpose: bool = False
) -> torch.Tensor:
    """Triton version of ``sparse_delta_matmul_reference`` (same arguments, float32 result)."""
    if triton is None:
        raise RuntimeError("sparse_delta_matmul_triton needs triton, which is not installed")
    check_sparse_delta_matmul_args(x, indices, values, nrows, ncols, transpose)
    if x.device.type != "cuda" and not INTERPRETED:
        raise RuntimeError(f"Triton kernels run on CUDA or under TRITON_INTERPRET=1, got tensors on {x.device.type}")
    n_tokens, k = x.shape[0], indices.numel()
    out = torch.zeros((n_tokens, ncols if transpose else nrows), dtype=torch.float32, device=x.device)
    if k == 0 or n_tokens == 0:
        return out
    grid = (cdiv(n_tokens, BLOCK_T), cdiv(k, BLOCK_K))
    _sparse_delta_matmul_kernel[grid](
        x,
        indices.contiguous(),
        values.detach().contiguous(),
        out,
        n_tokens,
        k,
        nrows,
        ncols,
        x.stride(0),
        x.stride(1),
        out.stride(0),
        TRANSPOSE=transpose,
        BLOCK_T=BLOCK_T,
        BLOCK_K=BLOCK_K,
        num_warps=NUM_WARPS,
    )
    return out


class SparseDeltaMatmul(torch.autograd.Function):
    """Differentiable ``x @ Delta.T`` for 2-D ``x``: gradients for ``x`` (``dy @ Delta``) and the values (SDDMM)."""

    @staticmethod
    def forward(ctx, x, values, indices, nrows, ncols, setting):
        from .dispatch import sparse_delta_matmul

        ctx.save_for_backward(x, values, indices)
        ctx.shape, ctx.setting = (nrows, ncols), setting
        return sparse_delta_matmul(x, indices, values, nrows, ncols, False, setting).to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        from .dispatch import sddmm, sparse_delta_matmul

        x, values, indices = ctx.saved_tensors
        nrows, ncols = ctx.shape
        dy = dy.contiguous()
        dx = dvalues = None
        if ctx.needs_input_grad[0]:
            dx = sparse_delta_matmul(dy, indices, values, nrows, ncols, True, ctx.setting).to(x.dtype)
        if ctx.needs_input_grad[1]:
            dvalues = sddmm(dy, x, indices, ncols, ctx.setting).to(values.dtype)
        return dx, dvalues, None, None, None, None


def sparse_delta_product(
    x: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, nrows: int, ncols: int, setting: str = "auto"
) -> torch.Tensor:
    """Differentiable ``x @ Delta.T`` for the split formulation: ``y = F.linear(x, W) + sparse_delta_product(...)``.

    ``x`` is ``[..., ncols]``; returns ``[..., nrows]`` in ``x``'s dtype (accumulated in float32). Gradients flow to
    ``x`` and ``values``; ``setting`` picks the backend as in ``dispatch``.
    """
    flat = x.reshape(-1, x.shape[-1])
    out = SparseDeltaMatmul.apply(flat, values, indices, nrows, ncols, setting)
    return out.reshape(*x.shape[:-1], nrows)
