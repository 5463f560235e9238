"""The one place that decides which backend runs a sparse op.

``kernel_backend`` is "auto" (Triton for CUDA tensors when a kernel exists, PyTorch otherwise), "torch" or
"triton"; the environment variable ``PEFT_SPARSE_KERNEL_BACKEND`` overrides the setting. A request that cannot be
served by Triton runs the PyTorch reference and says why once in the log. Triton kernels run on CPU tensors only in
Triton's interpreter (``TRITON_INTERPRET=1`` set before ``peft_sparse`` is imported), which is what the tests use.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch

from . import _triton
from .apply_delta import apply_delta_reference
from .dequantize_nf4 import dequantize_nf4_delta_reference
from .sddmm import sddmm_reference
from .sparse_delta_matmul import sparse_delta_matmul_reference
from .topk_outer_product import topk_outer_product_reference

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "triton")
ENV_VAR = "PEFT_SPARSE_KERNEL_BACKEND"

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


def sddmm(a: torch.Tensor, b: torch.Tensor, indices: torch.Tensor, ncols: int, setting: str = "auto") -> torch.Tensor:
    """``out[n] = sum_t a[t, idx // ncols] * b[t, idx % ncols]`` in float32, on the chosen backend."""
    return resolve("sddmm", a.device, setting)(a, b, indices, ncols)


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
    ``exclude_sorted`` (strictly increasing flat positions); ties go to the lower position. On the chosen backend."""
    return resolve("topk_outer_product", row_scores.device, setting)(row_scores, col_scores, exclude_sorted, k)
