"""Setting the optimizer state of regrown sparse entries (thesis §7.3.1).

A slot that receives a new position must not inherit the moments of the entry dropped from it. Adam-family state is
re-seeded so that the bias-corrected moments equal the given estimates (or zero): for torch Adam/AdamW, whose steps
are bias-corrected by each entry's age (``peft_sparse.optim.age``), the estimates are scaled by ``1 - beta**age``
with the age the grown entry starts with (as the SpIEL reference implementation does); for other Adam-like
optimizers by ``1 - beta**step`` with their global step. SM3's per-entry momentum is
zeroed (its row/column accumulators describe positions, not slots, and stay). Any other optimizer has its per-entry
state tensors zeroed at the slots, logged once; state of another shape cannot be re-seeded and raises.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from .age import supports_per_entry_age
from .sm3 import SM3

logger = logging.getLogger(__name__)
_warned: set[str] = set()


def _group_of(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> dict:
    for group in optimizer.param_groups:
        if any(p is param for p in group["params"]):
            return group
    raise ValueError(f"the parameter is not managed by this {type(optimizer).__name__}")


def reseed_optimizer_state(
    optimizer: torch.optim.Optimizer,
    param: torch.Tensor,
    slots: torch.Tensor,
    first_moment: Optional[torch.Tensor] = None,
    second_moment: Optional[torch.Tensor] = None,
    age: Optional[int] = None,
) -> None:
    """Re-seed ``optimizer``'s state of ``param`` at ``slots``.

    With ``first_moment``/``second_moment`` (estimates of the mean gradient and mean squared gradient of the new
    entries) and an Adam-family optimizer, ``exp_avg``/``exp_avg_sq`` are set so that after bias correction they equal
    the estimates: by ``age`` (the updates the estimates stand for) for torch Adam/AdamW, otherwise by the current
    global step. Without estimates the per-entry state at ``slots`` becomes zero.
    """
    state = optimizer.state.get(param)
    if not state or slots.numel() == 0:
        return
    slots = slots.to(param.device)
    if "exp_avg" in state and "exp_avg_sq" in state:
        step = 0.0
        if first_moment is not None and second_moment is not None:
            if age is not None and supports_per_entry_age(optimizer):
                step = float(age)
            elif "step" in state:
                step = float(state["step"])
        beta1, beta2 = _group_of(optimizer, param)["betas"]
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        if step > 0:
            exp_avg[slots] = (first_moment.float() * (1 - beta1**step)).to(exp_avg.device, exp_avg.dtype)
            exp_avg_sq[slots] = (second_moment.float() * (1 - beta2**step)).to(exp_avg_sq.device, exp_avg_sq.dtype)
        else:
            exp_avg[slots] = 0
            exp_avg_sq[slots] = 0
        if "max_exp_avg_sq" in state:
            state["max_exp_avg_sq"][slots] = exp_avg_sq[slots].to(state["max_exp_avg_sq"].dtype)
        return
    name = type(optimizer).__name__
    for key, value in state.items():
        if not torch.is_tensor(value) or value.numel() <= 1:
            continue
        if isinstance(optimizer, SM3) and key in ("row_accumulator", "col_accumulator"):
            continue
        if value.shape != param.shape:
            raise ValueError(
                f"cannot re-seed state {key!r} of {name} (shape {tuple(value.shape)}, parameter "
                f"{tuple(param.shape)}) for regrown sparse entries; use torch.optim.AdamW, Adam, SGD or "
                "peft_sparse.SM3"
            )
        value[slots] = 0
    if not isinstance(optimizer, SM3) and name not in _warned:
        _warned.add(name)
        logger.info("peft_sparse: %s state of regrown sparse entries is reset to zero", name)
