"""Half precision in training: loss scaling for the SpIEL-AG statistics, and float16 values with Adam.

With fp16 autocast, ``torch.amp.GradScaler`` multiplies the loss by a scale S, so the gradients the AG observer sees
in the backward are S times too large, and a step whose gradients overflow is skipped (``optimizer.step()`` is not
called, so the optimizer post-hook never runs). ``GradScaler.unscale_`` is wrapped: once it has unscaled an
optimizer's gradients, every sparse layer whose values that optimizer holds either brings the growth statistics
gathered since the last update to unscaled units, or, when the scaler found inf/NaN (the step will be skipped),
drops them. So the AG statistics and the Adam moments seeded from them are the same with and without loss scaling,
and an overflowing step changes nothing.

Adam-family optimizers on float16 values break: ``eps`` (1e-8) and small squared gradients underflow to 0 in
float16 and the first update turns the values into NaN. An optimizer step pre-hook refuses that combination.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from ..tuners.sparse_layer import DELTA_VALUES
from .hooks import _owned_values

_installed = False


def _after_unscale(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> None:
    owned = list(_owned_values(optimizer))
    if not owned or not scaler.is_enabled():
        return
    found = scaler._per_optimizer_states[id(optimizer)].get("found_inf_per_device", {})
    skipped = any(bool(v.item()) for v in found.values())  # GradScaler.step makes the same sync
    inv_scale = scaler._scale.double().reciprocal().float()
    for layer, adapter in owned:
        hook = getattr(layer, "after_gradient_unscale", None)
        if hook is not None:
            hook(adapter, inv_scale, skipped)


def refuse_float16_adam(optimizer: torch.optim.Optimizer, args: Any = None, kwargs: Any = None) -> None:
    """Raise ValueError before an Adam-family optimizer updates float16 sparse-delta values."""
    for group in optimizer.param_groups:
        if "betas" not in group or "eps" not in group:
            continue
        for param in group["params"]:
            if param.dtype == torch.float16 and param in DELTA_VALUES:
                raise ValueError(
                    f"delta_dtype='float16' cannot be trained with {type(optimizer).__name__}: eps={group['eps']} "
                    "and small squared gradients underflow in float16 and the values become NaN at the first "
                    "step; use delta_dtype='float32' (the default; fp16 autocast still computes in float16) or "
                    "'bfloat16', or an optimizer without second moments"
                )


def install() -> None:
    """Wrap ``torch.amp.GradScaler.unscale_`` and add the float16/Adam check, once per process."""
    global _installed
    if _installed:
        return
    _installed = True
    register_optimizer_step_pre_hook(refuse_float16_adam)
    original = torch.amp.GradScaler.unscale_

    @functools.wraps(original)
    def unscale_(self: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> None:
        original(self, optimizer)
        _after_unscale(self, optimizer)

    torch.amp.GradScaler.unscale_ = unscale_
