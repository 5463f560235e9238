"""Sampled dense-dense product: the gradient of a sparse delta's values.

For a linear layer ``y = x @ W.T`` the gradient of the delta value at flat position ``p = o * in + i`` is
``sum_t dy[t, o] * x[t, i]`` (thesis appendix E.4): only K numbers, never the dense ``dy.T @ x``.

The Triton kernel gives each program ``BLOCK_K`` positions and walks the tokens in blocks of ``BLOCK_T``: it gathers
the ``[BLOCK_T, BLOCK_K]`` tiles ``a[t, row(p)]`` and ``b[t, col(p)]``, multiplies them in float32 and sums over the
tokens, so memory traffic is ``O(tokens * K)`` gathers and nothing of size ``rows * ncols`` is allocated. When there
are too few position blocks to fill the GPU, the tokens are split over a second grid axis and the partial sums are
added by ``torch.sum`` (deterministic, unlike float atomics).

Operand layout: the kernel takes any strides. By default it reads ``a`` and ``b`` as given (token-major rows, no
copy): the gathers along a token row are scattered. ``token_major=True`` first copies both operands to
``[features, tokens]`` so that each position reads a contiguous run of tokens, at the cost of one transposed copy of
``a`` and ``b``. Which is faster has not been measured (no GPU was available when this was written); the default
avoids the extra memory, and ``benchmarks/bench_kernels.py`` times both. ``sddmm_triton_sorted`` runs it token-major
on the positions in row-major order, so that a block of positions shares few rows of ``a``.

Strategies. Besides the gather reference and that kernel, two PyTorch strategies compute the same K numbers, both on
the positions in row-major order (``sorted_positions``, cached per indices tensor, so the slots keep their order):

- ``csr``: ``torch.sparse.sampled_addmm`` on a CSR matrix of the positions (ATen's kernel on CPU, cuSPARSE's SDDMM
  on CUDA), float32 operands transposed to ``[features, tokens]`` by ``token_major_chunks``, which keeps the last
  copy of each operand for the next call with the same tensor; on the CPU one product per run of
  ``CSR_CPU_TOKEN_CHUNK`` tokens, each adding into the last;
- ``dense``: the dense product ``a.T @ b`` (the compute dtype in, float32 out; tensor cores on a GPU) and a gather,
  a block of rows at a time so that at most ``DENSE_CHUNK_ELEMENTS`` numbers of it exist at once.

``dispatch.sddmm`` chooses among them (see ``choose_sddmm_strategy`` there).
"""

from __future__ import annotations

import warnings
import weakref

import torch

from .. import _device
from ._triton import INTERPRETED, cdiv, multiprocessor_count, tl, triton
from .positions import sorted_positions

# Rows of (tokens x K) gathered at once by the reference; bounds its working memory.
_REFERENCE_CHUNK_ELEMENTS = 1 << 24
# Tokens per sampled product of the ``csr`` strategy on the CPU: the run of b that one product reads at random columns
# then stays in a core's cache. Measured with ATen's kernel (one thread, 2 MiB L2, both operands transposed per call,
# caches flushed between calls, best of 15 or 3): runs of 128 tokens took 6-18 % less time than one product over all
# 512 tokens at [1024..2816]-sized projections, 18-44 % less at Llama-7B shapes with 512 and 2,048 tokens, and less
# than runs of 192 or 256 tokens at every shape.
CSR_CPU_TOKEN_CHUNK = 128
# Numbers of the dense product formed at once by the ``dense`` strategy (256 MiB of float32).
DENSE_CHUNK_ELEMENTS = 1 << 26

# Explicit, unmeasured launch configuration: positions per program and tokens per inner step.
BLOCK_K = 64
BLOCK_T = 64
NUM_WARPS = 4
# Programs per streaming multiprocessor below which the tokens are split over a second grid axis.
_PROGRAMS_PER_SM = 4

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INDEX_DTYPES = (torch.int32, torch.int64)


def sddmm_reference(a: torch.Tensor, b: torch.Tensor, indices: torch.Tensor, ncols: int) -> torch.Tensor:
    """Return ``out[n] = sum_t a[t, indices[n] // ncols] * b[t, indices[n] % ncols]`` in float32.

    ``a`` is ``[tokens, rows]``, ``b`` is ``[tokens, ncols]``; ``indices`` are flat row-major positions into a
    ``[rows, ncols]`` matrix. Accumulates in float32 whatever the input dtype. Gathers the K needed products unless
    ``tokens * K`` reaches ``rows * ncols``, where it forms the dense product once and picks the K entries.
    """
    k = indices.numel()
    out = torch.zeros(k, dtype=torch.float32, device=a.device)
    if k == 0 or a.shape[0] == 0:
        return out
    idx = indices.long()
    if k * a.shape[0] >= a.shape[1] * ncols:
        # gathering would touch more numbers than the dense product holds: the BLAS product is then faster and no
        # larger (the CPU path only; the Triton kernel never forms it)
        return (a.float().t() @ b.float()).view(-1)[idx]
    rows, cols = idx // ncols, idx % ncols
    step = max(1, _REFERENCE_CHUNK_ELEMENTS // max(1, a.shape[0]))
    for start in range(0, k, step):
        r, c = rows[start : start + step], cols[start : start + step]
        out[start : start + step] = (a[:, r].float() * b[:, c].float()).sum(0)
    return out


if triton is not None:

    @triton.jit
    def _sddmm_kernel(
        a_ptr,
        b_ptr,
        idx_ptr,
        out_ptr,
        n_positions,
        n_tokens,
        n_rows,
        n_cols,
        tokens_per_split,
        stride_a_token,
        stride_a_row,
        stride_b_token,
        stride_b_col,
        BLOCK_K: tl.constexpr,
        BLOCK_T: tl.constexpr,
    ):
        pid_k = tl.program_id(0)
        pid_split = tl.program_id(1)
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        in_range = offs_k < n_positions
        # int64 throughout: flat positions and byte offsets can pass 2**31 on large layers.
        idx = tl.load(idx_ptr + offs_k, mask=in_range, other=0).to(tl.int64)
        rows = idx // n_cols
        cols = idx - rows * n_cols
        # Positions outside the matrix contribute nothing instead of reading out of bounds.
        valid = in_range & (idx >= 0) & (rows < n_rows)
        a_cols = rows * stride_a_row
        b_cols = cols * stride_b_col
        t_begin = pid_split * tokens_per_split
        t_end = tl.minimum(t_begin + tokens_per_split, n_tokens)
        acc = tl.zeros([BLOCK_K], dtype=tl.float32)
        for t0 in range(t_begin, t_end, BLOCK_T):
            offs_t = (t0 + tl.arange(0, BLOCK_T)).to(tl.int64)
            mask = (offs_t < t_end)[:, None] & valid[None, :]
            a_tile = tl.load(a_ptr + offs_t[:, None] * stride_a_token + a_cols[None, :], mask=mask, other=0.0)
            b_tile = tl.load(b_ptr + offs_t[:, None] * stride_b_token + b_cols[None, :], mask=mask, other=0.0)
            acc += tl.sum(a_tile.to(tl.float32) * b_tile.to(tl.float32), axis=0)
        tl.store(out_ptr + pid_split.to(tl.int64) * n_positions + offs_k, acc, mask=in_range)


def check_sddmm_args(a: torch.Tensor, b: torch.Tensor, indices: torch.Tensor, ncols: int) -> None:
    """Raise ``ValueError`` naming the argument when the operands of ``sddmm`` do not fit together."""
    if a.dim() != 2:
        raise ValueError(f"a must be 2-D [tokens, rows], got shape {tuple(a.shape)}")
    if b.dim() != 2:
        raise ValueError(f"b must be 2-D [tokens, ncols], got shape {tuple(b.shape)}")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"a and b must have the same number of tokens, got {a.shape[0]} and {b.shape[0]}")
    if ncols <= 0 or b.shape[1] != ncols:
        raise ValueError(f"ncols must equal b.shape[1] = {b.shape[1]}, got {ncols}")
    if a.dtype not in _FLOAT_DTYPES or b.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"a and b must be float32, bfloat16 or float16, got {a.dtype} and {b.dtype}")
    if indices.dim() != 1 or indices.dtype not in _INDEX_DTYPES:
        raise ValueError(f"indices must be a 1-D int32 or int64 tensor, got {indices.dtype} {tuple(indices.shape)}")
    if not (a.device == b.device == indices.device):
        raise ValueError(f"a, b and indices must be on one device, got {a.device}, {b.device}, {indices.device}")


def sddmm_launch(
    a: torch.Tensor,
    b: torch.Tensor,
    indices: torch.Tensor,
    ncols: int,
    *,
    token_major: bool = False,
    block_k: int = BLOCK_K,
    block_t: int = BLOCK_T,
    token_splits: int | None = None,
) -> torch.Tensor:
    """Run the Triton SDDMM with an explicit configuration; returns float32 ``[K]`` like ``sddmm_reference``.

    ``token_major`` copies the operands to ``[features, tokens]`` first; ``token_splits`` (default: enough programs to
    fill the GPU) splits the tokens over a second grid axis. Used by ``sddmm_triton``, the tests and the benchmark.
    """
    if triton is None:
        raise RuntimeError("sddmm_launch needs triton, which is not installed")
    check_sddmm_args(a, b, indices, ncols)
    if a.device.type != "cuda" and not INTERPRETED:
        raise RuntimeError(f"Triton kernels run on CUDA or under TRITON_INTERPRET=1, got tensors on {a.device.type}")
    k, n_tokens = indices.numel(), a.shape[0]
    if k == 0 or n_tokens == 0:
        return torch.zeros(k, dtype=torch.float32, device=a.device)
    indices = indices.contiguous()
    if token_major:
        a_view, b_view = a.t().contiguous().t(), b.t().contiguous().t()
    else:
        a_view, b_view = a, b
    n_kblocks = cdiv(k, block_k)
    if token_splits is None:
        wanted = cdiv(_PROGRAMS_PER_SM * multiprocessor_count(a.device), n_kblocks)
        token_splits = max(1, min(wanted, cdiv(n_tokens, 4 * block_t)))
    if token_splits < 1:
        raise ValueError(f"token_splits must be >= 1, got {token_splits}")
    tokens_per_split = cdiv(n_tokens, token_splits)
    token_splits = cdiv(n_tokens, tokens_per_split)
    partial = torch.empty((token_splits, k), dtype=torch.float32, device=a.device)
    _sddmm_kernel[(n_kblocks, token_splits)](
        a_view,
        b_view,
        indices,
        partial,
        k,
        n_tokens,
        a.shape[1],
        ncols,
        tokens_per_split,
        a_view.stride(0),
        a_view.stride(1),
        b_view.stride(0),
        b_view.stride(1),
        BLOCK_K=block_k,
        BLOCK_T=block_t,
        num_warps=NUM_WARPS,
    )
    return partial[0] if token_splits == 1 else partial.sum(0)


def sddmm_triton(a: torch.Tensor, b: torch.Tensor, indices: torch.Tensor, ncols: int) -> torch.Tensor:
    """Triton version of ``sddmm_reference`` (same arguments, float32 ``[K]`` result), default configuration."""
    return sddmm_launch(a, b, indices, ncols)


def sddmm_triton_sorted(a: torch.Tensor, b: torch.Tensor, indices: torch.Tensor, ncols: int) -> torch.Tensor:
    """The Triton SDDMM on the positions in row-major order with ``[features, tokens]`` operands; returns float32
    ``[K]`` in the slot order of ``indices`` like ``sddmm_reference``.

    A block of consecutive sorted positions falls in few rows, so the kernel's loads of ``a`` repeat a row's tokens
    across its positions (served from cache), and each position reads its tokens contiguously. Costs a transposed
    copy of each operand (shared between calls, as in ``sddmm_csr``) and a scatter of the result into slot
    order; the row-major order is cached per indices tensor (``sorted_positions``).
    """
    check_sddmm_args(a, b, indices, ncols)
    order = sorted_positions(indices, a.shape[1], ncols)
    a_view = token_major_operand(a, a.dtype, role="a").t()
    b_view = token_major_operand(b, b.dtype, role="b").t()
    sampled = sddmm_launch(a_view, b_view, order.sorted, ncols)
    return torch.empty_like(sampled).index_copy_(0, order.perm, sampled)


# operand role -> (weak reference to the tensor owning the memory, key, copy): the last operand of each role in the
# layout sampled_addmm reads, kept while that tensor lives and is not modified
_token_major: dict[str, tuple] = {}


def _forget_token_major(role: str, ref: weakref.ref) -> None:
    entry = _token_major.get(role)
    if entry is not None and entry[0] is ref:
        _token_major.pop(role, None)


def clear_token_major_cache() -> None:
    """Forget the kept transposed operands (benchmarks use it to time the transposes of every call)."""
    _token_major.clear()


def _transpose_into(out: torch.Tensor, rows: torch.Tensor) -> None:
    """``out[:] = rows.T`` for a ``[features, n]`` ``out``. ATen copies a 2-D transpose in cache-sized blocks on one
    thread; through a 3-D view the same copy is an elementwise one that spreads over torch's threads. Measured on the
    CPU ([128 or 512 tokens, 2816] float32, caches flushed): one thread 0.53 / 2.3 ms (blocked) against 0.64 / 2.6
    (elementwise); two threads 0.54 / 2.3 against 0.36 / 1.3. So the blocked copy with one thread, the spread one
    with more (on the CPU; a GPU copies either as one kernel)."""
    if out.device.type == "cpu" and torch.get_num_threads() > 1:
        out.unsqueeze(-1).copy_(rows.t().unsqueeze(-1))
    else:
        out.copy_(rows.t())


def token_major_chunks(
    t: torch.Tensor, chunk: int, dtype: torch.dtype = torch.float32, role: str = "b"
) -> tuple[torch.Tensor, ...]:
    """``t`` ([tokens, features]) as ``dtype`` copies in the layout ``torch.sparse.sampled_addmm`` reads (it copies
    any other layout into it itself): one contiguous ``[features, n]`` tensor per run of ``chunk`` consecutive
    tokens (the last run may be shorter; one empty run for no tokens), carved from one buffer.

    The last copy of each ``role`` is reused while the same memory comes again unmodified: the projections of a
    transformer block that read one input (query/key/value, gate/up) pass the same activation to their backward,
    and SpIEL-AG's estimation updates take a second product with the same operands for their candidates, so each is
    transposed once instead of once per product. A copy is kept only while the tensor it was made from lives.
    """
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    owner = t if t._base is None else t._base
    key = (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype, t.device, owner._version, dtype, chunk)
    entry = _token_major.get(role)
    if entry is not None and entry[0]() is owner and entry[1] == key:
        return entry[2]
    tokens, features = t.shape
    buffer = torch.empty(features * tokens, dtype=dtype, device=t.device)
    chunks = []
    for start in range(0, max(tokens, 1), chunk):
        n = min(chunk, tokens - start)
        part = buffer[features * start : features * (start + n)].view(features, n)
        _transpose_into(part, t[start : start + n])
        chunks.append(part)
    copy = tuple(chunks)
    try:
        ref = weakref.ref(owner, lambda dead, role=role: _forget_token_major(role, dead))
    except TypeError:  # not weak-referenceable: do not keep it
        return copy
    _token_major[role] = (ref, key, copy)
    return copy


def token_major_operand(t: torch.Tensor, dtype: torch.dtype = torch.float32, role: str = "b") -> torch.Tensor:
    """``t`` ([tokens, features]) as one ``dtype`` ``[features, tokens]`` contiguous copy: ``token_major_chunks``
    with all tokens in one run (kept and shared the same way)."""
    return token_major_chunks(t, max(t.shape[0], 1), dtype, role)[0]


def sddmm_csr(a: torch.Tensor, b: torch.Tensor, indices: torch.Tensor, ncols: int) -> torch.Tensor:
    """``sddmm_reference`` by ``torch.sparse.sampled_addmm`` on the row-major (CSR) order of ``indices``.

    The operands are used in float32 (the sparse kernels take no half types); the result is in the slot order of
    ``indices``. Both operands go in through ``token_major_operand`` (shared by consecutive calls with the same one).
    """
    check_sddmm_args(a, b, indices, ncols)
    k = indices.numel()
    if k == 0 or a.shape[0] == 0:
        return torch.zeros(k, dtype=torch.float32, device=a.device)
    order = sorted_positions(indices, a.shape[1], ncols)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta", "invariant checks off"
        # zeros, not empty: sampled_addmm computes beta * input even for beta = 0, and 0 * NaN garbage is NaN
        pattern = torch.sparse_csr_tensor(
            order.crow, order.col, torch.zeros(k, dtype=torch.float32, device=a.device), (a.shape[1], ncols)
        )
        # on the CPU in runs of tokens, so that a run of b (read at random columns) stays in cache; each product
        # accumulates into the pattern itself (out= the input: no copy of its values and indices per run)
        chunk = CSR_CPU_TOKEN_CHUNK if a.device.type == "cpu" else a.shape[0]
        for n, (a_run, b_run) in enumerate(
            zip(token_major_chunks(a, chunk, role="a"), token_major_chunks(b, chunk, role="b"))
        ):
            torch.sparse.sampled_addmm(pattern, a_run, b_run.t(), beta=0.0 if n == 0 else 1.0, out=pattern)
    # every slot is written: perm is a permutation of them
    return torch.empty(k, dtype=torch.float32, device=a.device).index_copy_(0, order.perm, pattern.values())


def mm_float32(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x @ y`` in float32: half operands stay half (tensor cores) with float32 accumulation and output where
    ``torch.mm(..., out_dtype=)`` exists (CUDA), else they are widened first."""
    if x.dtype == torch.float32:
        return x @ y
    if x.device.type == "cuda":
        try:
            return torch.mm(x, y, out_dtype=torch.float32)
        except (RuntimeError, TypeError):
            pass
    return x.float() @ y.float()


def sddmm_dense(a: torch.Tensor, b: torch.Tensor, indices: torch.Tensor, ncols: int) -> torch.Tensor:
    """``sddmm_reference`` by the dense product ``a.T @ b`` and a gather, a block of rows at a time.

    Each block holds at most ``DENSE_CHUNK_ELEMENTS`` numbers; the positions of a block are a contiguous run of the
    row-major order, so each block gathers only its own entries (off the CPU, where reading that run's bounds would
    wait for the device, each block selects its entries among all K instead).
    """
    check_sddmm_args(a, b, indices, ncols)
    k = indices.numel()
    out = torch.zeros(k, dtype=torch.float32, device=a.device)
    if k == 0 or a.shape[0] == 0:
        return out
    if a.dtype != b.dtype:
        a, b = a.float(), b.float()
    nrows = a.shape[1]
    step = max(1, DENSE_CHUNK_ELEMENTS // ncols)
    if step >= nrows:
        out[:] = mm_float32(a.t(), b).view(-1)[indices.long()]
        return out
    if not _device.host_reads_are_free(a.device):
        # the block boundaries in the sorted positions would be read on the host: instead every block picks its
        # entries out of all K by a comparison (K work per block, nothing read)
        idx = indices.long()
        for r0 in range(0, nrows, step):
            product = mm_float32(a[:, r0 : r0 + step].t(), b).view(-1)
            local = idx - r0 * ncols
            inside = (local >= 0) & (local < product.numel())
            out = torch.where(inside, product[local.clamp(0, product.numel() - 1)], out)
        return out
    order = sorted_positions(indices, nrows, ncols)
    bounds = order.crow[::step].tolist() + ([int(order.crow[-1])] if nrows % step else [])
    for block, r0 in enumerate(range(0, nrows, step)):
        lo, hi = bounds[block], bounds[block + 1]
        if lo == hi:
            continue
        product = mm_float32(a[:, r0 : r0 + step].t(), b)
        out[order.perm[lo:hi]] = product.view(-1)[order.sorted[lo:hi] - r0 * ncols]
    return out
