"""Access to a tuner layer's frozen base weight, whatever its storage.

A sparse layer needs five things of its base weight: its logical shape, where it lives, a dense copy with the delta
added (for the forward and backward), and an exact merge/restore. ``DenseBaseWeight`` serves ``nn.Linear`` and
``Conv1D``; ``peft_sparse.tuners.bnb.NF4BaseWeight`` serves bitsandbytes' 4-bit ``Linear4bit``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..delta import merge_exact, restore_exact
from ..kernels import apply_delta


class DenseBaseWeight:
    """The weight of ``module`` is an ordinary dense tensor (read from the module each time, never cached)."""

    returns_input_dtype = False  # nn.Linear's output has the compute dtype
    # merge/restore are exact, so the forward may add the delta in place and undo it (sparse_linear.merged_weight)
    merge_is_exact = True

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    @property
    def tensor(self) -> torch.Tensor:
        return self.module.weight

    @property
    def shape(self) -> tuple[int, int]:
        """Logical shape as stored (``[out, in]`` for Linear, ``[in, out]`` for Conv1D)."""
        return tuple(self.tensor.shape)

    @property
    def device(self) -> torch.device:
        return self.tensor.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the forward computes in when autocast is off."""
        return self.tensor.dtype

    def with_delta(
        self, indices: torch.Tensor, values: torch.Tensor, dtype: torch.dtype, backend: str
    ) -> torch.Tensor:
        """A dense ``W + scatter(indices, values)`` in ``dtype`` (a new tensor; ``W`` is untouched)."""
        return apply_delta(self.tensor, indices, values, backend).to(dtype)

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        """The base weight as a dense tensor in ``dtype``."""
        return self.tensor.detach().to(dtype)

    def merge(self, indices: torch.Tensor, values: torch.Tensor) -> Any:
        """Add the delta into the stored weight; returns what ``restore`` needs to undo it bit-exactly."""
        return merge_exact(self.tensor, indices, values)

    def restore(self, indices: torch.Tensor, saved: Any) -> None:
        """Undo ``merge``."""
        restore_exact(self.tensor, indices, saved)

    def merge_error(self, saved: Any) -> float:
        """Largest deviation of the merged weight from ``W + delta`` (0 for dense weights)."""
        return 0.0


def base_weight_for(module: nn.Module):
    """The accessor for ``module``'s weight: NF4 for bitsandbytes 4-bit layers, dense otherwise."""
    if hasattr(getattr(module, "weight", None), "quant_state"):
        from .bnb import NF4BaseWeight

        return NF4BaseWeight(module)
    return DenseBaseWeight(module)
