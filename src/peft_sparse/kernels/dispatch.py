"""The one place that decides which backend runs a sparse op.

``kernel_backend`` is "auto" (Triton for CUDA tensors when a kernel exists, PyTorch otherwise), "torch" or
"triton"; the environment variable ``PEFT_SPARSE_KERNEL_BACKEND`` overrides the setting. A request that cannot be
served by Triton runs the PyTorch reference and says why once in the log. Triton kernels run on CPU tensors only in
Triton's interpreter (``TRITON_INTERPRET=1`` set before ``peft_sparse`` is imported), which is what the tests use.

``sddmm`` (the value gradient, the hot op of a training step) has several strategies (``SDDMM_STRATEGIES``); see
``choose_sddmm_strategy``.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch

from . import _triton
from .apply_delta import apply_delta_reference
from .dequantize_nf4 import dequantize_nf4_delta_reference
from .sddmm import sddmm_csr, sddmm_dense, sddmm_reference, sddmm_triton_sorted
from .sparse_delta_matmul import sparse_delta_matmul_reference
from .topk_outer_product import (
    topk_outer_product_batched,
    topk_outer_product_reference,
    topk_outer_product_threshold,
)

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "triton")
ENV_VAR = "PEFT_SPARSE_KERNEL_BACKEND"
SDDMM_STRATEGIES = ("auto", "csr", "dense", "gather", "triton", "triton_sorted")
SDDMM_ENV_VAR = "PEFT_SPARSE_SDDMM_STRATEGY"
# CPU: per token, ``csr`` costs about CPU_CSR_ENTRY_COST * K + CPU_CSR_FEATURE_COST * (rows + cols) and ``dense``
# rows * cols, in units of one multiply-add of the dense product on one thread: each sampled entry is a dot product
# over the tokens (in runs of sddmm.CSR_CPU_TOKEN_CHUNK), and both operands are transposed first, which on a small
# matrix costs more than the whole dense product. ``csr`` runs where its estimate is the smaller
# (``cpu_csr_cost_ratio``). Fitted to timings of one thread with caches flushed between calls, [128, 128] to
# [2816, 1024], 0.5-10 % density, 128 / 512 / 2,048 tokens (``benchmarks/bench_cpu_crossover.py``; its committed runs
# have the estimate, the pick and its cost at every point). With more threads the dense and the sampled products
# spread over them (1 -> 2 threads at [2816, 1024], 2 % density, 512 tokens: 20 -> 10 ms and 3.0 -> 1.7 ms) and the
# transposes less (``sddmm._transpose_into``), so their term grows with threads ** CPU_CSR_THREAD_EXPONENT. In the
# committed two-thread run a factor of 1.2-1.4 picks the faster strategy at all 88 points; 1 (no growth) the slower
# at 3 (up to 1.64x), 1.7 at 6 and 2 at 12 (in another run 1.2-1.7 did best, 7 near ties). Beyond two threads (more
# than this machine has) it is an extrapolation.
CPU_CSR_ENTRY_COST = 6.7
CPU_CSR_FEATURE_COST = 118.0
CPU_CSR_THREAD_EXPONENT = 0.5

# op name -> (reference, triton implementation or None)
_OPS: dict[str, tuple[Callable, Callable | None]] = {
    "apply_delta": (apply_delta_reference, None),
    "dequantize_nf4_delta": (dequantize_nf4_delta_reference, None),
    "sddmm": (sddmm_reference, None),
    "sparse_delta_matmul": (sparse_delta_matmul_reference, None),
    "topk_outer_product": (topk_outer_product_reference, None),
}
_logged: set[tuple[str, str]] = set()


def register_triton_op(name: str, fn: Callable) -> None:
    """Register the Triton implementation of op ``name`` (same signature as its reference)."""
    if name not in _OPS:
        raise ValueError(f"name must be one of {tuple(_OPS)}, got {name!r}")
    reference, _ = _OPS[name]
    _OPS[name] = (reference, fn)


def requested_backend(setting: str = "auto") -> str:
    """The backend asked for: the environment variable if set, else ``setting``; validated."""
    value = os.environ.get(ENV_VAR) or setting
    if value not in BACKENDS:
        source = ENV_VAR if os.environ.get(ENV_VAR) else "kernel_backend"
        raise ValueError(f"{source} must be one of {BACKENDS}, got {value!r}")
    return value


def _triton_usable(device: torch.device) -> str | None:
    """None if Triton kernels can run on ``device``, else the reason they cannot."""
    if device.type == "cuda":
        return None
    if os.environ.get("TRITON_INTERPRET") != "1":
        return f"tensors are on {device.type} and TRITON_INTERPRET is not set"
    if not _triton.INTERPRETED:
        return f"tensors are on {device.type} and TRITON_INTERPRET was set after the kernels were defined"
    return None


def _log_once(op: str, reason: str) -> None:
    if (op, reason) not in _logged:
        _logged.add((op, reason))
        logger.info("peft_sparse: using the PyTorch reference for %s: %s", op, reason)


def resolve(op: str, device: torch.device, setting: str = "auto") -> Callable:
    """Return the implementation of ``op`` to run for tensors on ``device`` under ``setting``."""
    reference, triton_fn = _OPS[op]
    backend = requested_backend(setting)
    if backend == "torch":
        return reference
    if backend == "auto" and device.type != "cuda":
        return reference
    if triton_fn is None:
        _log_once(op, "no Triton kernel is available for it")
        return reference
    reason = _triton_usable(device)
    if reason is not None:
        _log_once(op, reason)
        return reference
    return triton_fn


def apply_delta(
    weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, setting: str = "auto"
) -> torch.Tensor:
    """``weight + scatter(indices, values)`` as a new tensor, on the chosen backend."""
    return resolve("apply_delta", weight.device, setting)(weight, indices, values)


def dequantize_nf4_delta(
    packed: torch.Tensor,
    quant_state,
    indices: torch.Tensor,
    values: torch.Tensor,
    out_dtype: torch.dtype,
    setting: str = "auto",
) -> torch.Tensor:
    """``DEQUANT(W_nf4) + scatter(indices, values)`` as a new ``out_dtype`` tensor of shape ``quant_state.shape``, for
    a bitsandbytes NF4 weight (``packed`` bytes and its ``quant_state``), on the chosen backend."""
    return resolve("dequantize_nf4_delta", packed.device, setting)(packed, quant_state, indices, values, out_dtype)


_SDDMM_FUNCTIONS: dict[str, Callable] = {"csr": sddmm_csr, "dense": sddmm_dense, "gather": sddmm_reference}
_sddmm_pinned: str | None = None
# (device, dtype, rows, ncols, K bucket, token bucket, candidates) -> strategy chosen by timing
_sddmm_tuned: dict[tuple, str] = {}
# Back-to-back runs per candidate when tuning: one run of a sub-millisecond GPU product is too noisy to choose by;
# a candidate whose first timed run takes this long or longer is not repeated (a growth search of a whole model).
TUNING_REPEATS = 3
TUNING_REPEAT_BELOW_S = 0.005
# How much faster than the incumbent (``dense`` for the value gradient) another candidate must time to replace it: a
# near tie is timing noise, and the value gradient's promise is to be no slower than ``dense``.
TUNING_INCUMBENT_EDGE = 0.10


def set_sddmm_strategy(strategy: str | None) -> None:
    """Pin the value-gradient strategy for the process (one of ``SDDMM_STRATEGIES``; None or "auto" to choose).

    The environment variable ``PEFT_SPARSE_SDDMM_STRATEGY`` takes precedence.
    """
    global _sddmm_pinned
    if strategy is not None and strategy not in SDDMM_STRATEGIES:
        raise ValueError(f"strategy must be one of {SDDMM_STRATEGIES} or None, got {strategy!r}")
    _sddmm_pinned = None if strategy in (None, "auto") else strategy


def pinned_sddmm_strategy() -> str | None:
    """The strategy pinned by ``PEFT_SPARSE_SDDMM_STRATEGY`` or ``set_sddmm_strategy``, else None; validated."""
    value = os.environ.get(SDDMM_ENV_VAR)
    if value:
        if value not in SDDMM_STRATEGIES:
            raise ValueError(f"{SDDMM_ENV_VAR} must be one of {SDDMM_STRATEGIES}, got {value!r}")
        return None if value == "auto" else value
    return _sddmm_pinned


def _bucket(n: int) -> int:
    """``n`` rounded up to a power of two (shapes that differ a little share one timing)."""
    return 1 << max(0, int(n) - 1).bit_length()


def _time_strategies(
    candidates: list[str], run: Callable[[str], torch.Tensor], device: torch.device, incumbent: str | None = None
):
    """Time each candidate and return the fastest and its result.

    A candidate runs once to warm up (compiling, allocating), then once timed; unless that took more than twice the
    best time so far (it cannot win) or ``TUNING_REPEAT_BELOW_S`` or more (long enough to tell apart),
    ``TUNING_REPEATS`` more runs are timed back to back, as the products run in training (a GPU queues one while the
    host issues the next), and the mean of those counts when it is lower. The ``incumbent`` (one of the candidates,
    timed first) is replaced only by a candidate at least ``TUNING_INCUMBENT_EDGE`` faster."""
    if incumbent is not None:
        if incumbent not in candidates:
            raise ValueError(f"incumbent must be one of the candidates {candidates}, got {incumbent!r}")
        candidates = [incumbent] + [name for name in candidates if name != incumbent]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(runs: int) -> tuple[float, torch.Tensor]:
        sync()
        started = time.perf_counter()
        for _ in range(runs):
            out = run(name)
        sync()
        return (time.perf_counter() - started) / runs, out

    best, best_time, best_out = None, float("inf"), None
    for name in candidates:
        run(name)
        elapsed, out = timed(1)
        if elapsed <= 2 * best_time and elapsed < TUNING_REPEAT_BELOW_S:
            elapsed = min(elapsed, timed(TUNING_REPEATS)[0])
        to_beat = best_time * (1 - TUNING_INCUMBENT_EDGE) if best == incumbent else best_time
        if best is None or elapsed < to_beat:
            best, best_time, best_out = name, elapsed, out
    return best, best_out


def choose_sddmm_strategy(a: torch.Tensor, b: torch.Tensor, indices: torch.Tensor, ncols: int, setting: str) -> str:
    """The strategy ``sddmm`` runs for these operands, or "tune" when it must time the candidates.

    In order: a pinned strategy (``PEFT_SPARSE_SDDMM_STRATEGY``, ``set_sddmm_strategy``); ``kernel_backend`` "triton"
    (setting or ``PEFT_SPARSE_KERNEL_BACKEND``) runs the Triton kernel; off CUDA ``cpu_csr_is_faster`` (a cost
    model fitted to measurements) picks ``csr`` or ``dense``; on CUDA "tune": the candidates are timed once per
    (shape, K, dtype, tokens) bucket and the fastest is kept, as ``cudnn.benchmark`` does. ``dense`` is always a
    candidate and is kept unless another times ``TUNING_INCUMBENT_EDGE`` faster, so the choice is never slower than
    dense + gather by more than the timing's error beyond that edge.
    """
    backend = requested_backend(setting)
    pinned = pinned_sddmm_strategy()
    if pinned is not None:
        return pinned
    if backend == "triton":
        return "triton"
    if a.device.type != "cuda":
        return "csr" if cpu_csr_is_faster(a.shape[1], ncols, indices.numel()) else "dense"
    return "tune"


def cpu_csr_cost_ratio(rows: int, cols: int, k: int, threads: int | None = None) -> float:
    """The estimated time of ``csr`` over that of ``dense`` on the CPU for K positions of a ``[rows, cols]`` matrix
    with ``threads`` torch threads (default ``torch.get_num_threads()``); the number of tokens cancels out.

    ``(CPU_CSR_ENTRY_COST * k + threads ** CPU_CSR_THREAD_EXPONENT * CPU_CSR_FEATURE_COST * (rows + cols)) / (rows *
    cols)``: the sampled products and the dense product spread over the threads, the transposes of the operands
    less, so their share grows with the threads."""
    threads = torch.get_num_threads() if threads is None else threads
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive int, got {threads!r}")
    transposes = threads**CPU_CSR_THREAD_EXPONENT * CPU_CSR_FEATURE_COST * (rows + cols)
    return (CPU_CSR_ENTRY_COST * k + transposes) / max(1, rows * cols)


def cpu_csr_is_faster(rows: int, cols: int, k: int, threads: int | None = None) -> bool:
    """Whether ``csr`` is estimated faster than ``dense`` on the CPU: ``cpu_csr_cost_ratio(...) < 1``."""
    return cpu_csr_cost_ratio(rows, cols, k, threads) < 1.0


def _run_sddmm_strategy(
    name: str, a: torch.Tensor, b: torch.Tensor, indices: torch.Tensor, ncols: int
) -> torch.Tensor:
    if name == "triton":
        return resolve("sddmm", a.device, "triton")(a, b, indices, ncols)
    if name == "triton_sorted":
        if resolve("sddmm", a.device, "triton") is sddmm_reference:  # no usable Triton: said why in the log
            return sddmm_reference(a, b, indices, ncols)
        return sddmm_triton_sorted(a, b, indices, ncols)
    return _SDDMM_FUNCTIONS[name](a, b, indices, ncols)


def sddmm(a: torch.Tensor, b: torch.Tensor, indices: torch.Tensor, ncols: int, setting: str = "auto") -> torch.Tensor:
    """``out[n] = sum_t a[t, idx // ncols] * b[t, idx % ncols]`` in float32, by the strategy
    ``choose_sddmm_strategy`` picks."""
    strategy = choose_sddmm_strategy(a, b, indices, ncols, setting)
    if strategy != "tune":
        return _run_sddmm_strategy(strategy, a, b, indices, ncols)
    candidates = ["csr", "dense"]
    if requested_backend(setting) == "auto" and _OPS["sddmm"][1] is not None:
        candidates += ["triton", "triton_sorted"]
    key = (str(a.device), a.dtype, a.shape[1], ncols, _bucket(indices.numel()), _bucket(a.shape[0]), tuple(candidates))
    runners = {name: (lambda name=name: _run_sddmm_strategy(name, a, b, indices, ncols)) for name in candidates}
    return _run_tuned(_sddmm_tuned, key, runners, a.device, "sddmm", incumbent="dense")


def tuned_sddmm_strategies() -> dict[tuple, str]:
    """The strategies chosen by timing so far (a copy), keyed by (device, dtype, rows, ncols, K, tokens,
    candidates)."""
    return dict(_sddmm_tuned)


def sparse_delta_matmul(
    x: torch.Tensor,
    indices: torch.Tensor,
    values: torch.Tensor,
    nrows: int,
    ncols: int,
    transpose: bool = False,
    setting: str = "auto",
) -> torch.Tensor:
    """``x @ Delta.T`` (``x @ Delta`` with ``transpose``) in float32 for the ``[nrows, ncols]`` sparse ``Delta``."""
    return resolve("sparse_delta_matmul", x.device, setting)(x, indices, values, nrows, ncols, transpose)


def topk_outer_product(
    row_scores: torch.Tensor, col_scores: torch.Tensor, exclude_sorted: torch.Tensor, k: int, setting: str = "auto"
) -> torch.Tensor:
    """Flat positions (int64, ascending) of the ``k`` largest ``row_scores[o] * col_scores[i]`` not in
    ``exclude_sorted`` (strictly increasing flat positions); ties go to the lower position. On the chosen backend;
    the PyTorch backend runs ``topk_outer_product_threshold`` (the reference's result without scoring every
    position)."""
    fn = resolve("topk_outer_product", row_scores.device, setting)
    if fn is topk_outer_product_reference:
        fn = topk_outer_product_threshold
    return fn(row_scores, col_scores, exclude_sorted, k)


def topk_outer_product_many(
    row_scores: Sequence[torch.Tensor],
    col_scores: Sequence[torch.Tensor],
    exclude_sorted: Sequence[torch.Tensor],
    ks: Sequence[int],
    setting: str = "auto",
) -> list[torch.Tensor]:
    """``topk_outer_product`` of several matrices (element ``m`` of each sequence is one call's arguments; all
    tensors on one device). The PyTorch backend searches them together (``topk_outer_product_batched``: a few host
    reads per distinct shape instead of about ten per matrix); ``kernel_backend="triton"`` runs the Triton kernel
    matrix by matrix. With ``"auto"`` on CUDA, where both run, they are timed once per set of shapes (and total
    ``k``, to a power of two) and the faster is kept, as ``sddmm`` does: both return the same positions."""
    if not row_scores:
        return []
    device = row_scores[0].device
    fn = resolve("topk_outer_product", device, setting)
    args = list(zip(row_scores, col_scores, exclude_sorted, ks))
    runners = {
        "batched": lambda: topk_outer_product_batched(row_scores, col_scores, exclude_sorted, ks),
        "per_matrix": lambda: [fn(*call) for call in args],
    }
    if fn is topk_outer_product_reference:
        return runners["batched"]()
    if requested_backend(setting) == "triton" or device.type != "cuda":
        return runners["per_matrix"]()
    shapes = Counter((r.numel(), c.numel()) for r, c in zip(row_scores, col_scores))
    key = (str(device), tuple(sorted(shapes.items())), _bucket(sum(ks)))
    return _run_tuned(_topk_tuned, key, runners, device, "topk_outer_product_many")


_topk_tuned: dict[tuple, str] = {}


def _run_tuned(
    cache: dict,
    key: tuple,
    runners: dict[str, Callable[[], Any]],
    device: torch.device,
    op: str,
    incumbent: str | None = None,
) -> Any:
    """The result of ``runners[cache[key]]()``; when ``key`` is new, time every runner (``_time_strategies``, with
    ``incumbent``), remember the fastest under ``key`` and return its result."""
    chosen = cache.get(key)
    if chosen is not None:
        return runners[chosen]()
    chosen, out = _time_strategies(list(runners), lambda name: runners[name](), device, incumbent)
    cache[key] = chosen
    logger.info("peft_sparse: %s %s for key %s", op, chosen, key)
    return out


def tuned_topk_strategies() -> dict[tuple, str]:
    """The ``topk_outer_product_many`` runners chosen by timing so far (a copy), keyed by (device, shapes and their
    counts, total k bucket)."""
    return dict(_topk_tuned)
