"""Adam bias correction by the age of each sparse entry (thesis §7.3.1).

Adam divides its moments by ``1 - beta1**t`` and ``1 - beta2**t`` to undo their bias toward zero. In SpIEL the
entries of a delta are grown at different times, so the right ``t`` is each entry's own age (the updates since it
was grown, counting the estimation phase that seeded its moments), not the optimizer's global step. Stock
``torch.optim.Adam``/``AdamW`` use the global step; ``correct_adam_step_for_age`` runs right after their step and
moves each entry from torch's update to the per-age one:

``p += lr * m / (bc1(t) * (sqrt(v) / sqrt(bc2(t)) + eps)) - lr * m / (bc1(a) * (sqrt(v) / sqrt(bc2(a)) + eps))``

with ``m``, ``v`` the moments after the step (``max_exp_avg_sq`` for amsgrad), ``t`` torch's step and ``a`` the
entry's age. Weight decay (decoupled for AdamW, in the gradient for Adam) does not depend on ``t``, so the result
equals an Adam whose bias correction uses ``a``, up to float rounding; an entry whose age equals the global step is
left bit-for-bit as torch made it. This holds for every torch Adam/AdamW implementation (for-loop, foreach, fused,
capturable, amsgrad, maximize). Other optimizers keep their own global-step correction (logged once).
"""

from __future__ import annotations

import logging

import torch

from .sm3 import SM3

logger = logging.getLogger(__name__)
_warned: set[str] = set()


def supports_per_entry_age(optimizer: torch.optim.Optimizer) -> bool:
    """True if ``optimizer`` is a torch Adam or AdamW, whose steps ``correct_adam_step_for_age`` can correct."""
    return isinstance(optimizer, torch.optim.Adam)


def _bias_corrections(ages: torch.Tensor, t: int, beta1: float, beta2: float) -> tuple[torch.Tensor, ...]:
    """``1 - beta1**a`` and ``sqrt(1 - beta2**a)`` per entry and at ``a = t`` (float64).

    Ages take few distinct values (entries grown at the same reselection share one), so when the range of ages is
    shorter than the entries the corrections are computed once per age in that range and gathered; the entries'
    and the global step's values then come from the same table, so an entry of age ``t`` gets exactly torch's.
    """
    low, high = min(int(ages.min()), t), max(int(ages.max()), t)
    if high - low + 1 <= ages.numel():
        span = torch.arange(low, high + 1, dtype=torch.float64, device=ages.device)
        bc1, bc2_sqrt = 1 - beta1**span, (1 - beta2**span).sqrt()
        offset = (ages - low).long()
        return bc1[offset], bc2_sqrt[offset], bc1[t - low], bc2_sqrt[t - low]
    steps = torch.cat([ages.to(torch.float64), torch.tensor([float(t)], dtype=torch.float64, device=ages.device)])
    bc1, bc2_sqrt = 1 - beta1**steps, (1 - beta2**steps).sqrt()
    return bc1[:-1], bc2_sqrt[:-1], bc1[-1], bc2_sqrt[-1]


def _adam_update(exp_avg, second_sqrt, lr: float, eps: float, bc1: torch.Tensor, bc2_sqrt: torch.Tensor):
    # torch's Adam update (float64 here), with per-entry or global bias corrections
    return exp_avg * (lr / bc1) / (second_sqrt / bc2_sqrt + eps)


@torch.no_grad()
def correct_adam_step_for_age(optimizer: torch.optim.Optimizer, param: torch.Tensor, age: torch.Tensor) -> bool:
    """Re-do ``optimizer``'s last update of ``param`` with bias correction by per-entry ``age``; True if done.

    ``age`` (integer, one per entry of ``param``) counts the updates each entry has had including the one just made.
    Call right after ``optimizer.step()``. Does nothing (returns False) for optimizers other than torch Adam/AdamW,
    for a parameter the optimizer holds no state of, and when every age equals the global step.
    """
    if not supports_per_entry_age(optimizer):
        name = type(optimizer).__name__
        if not isinstance(optimizer, (SM3, torch.optim.SGD)) and name not in _warned:
            _warned.add(name)
            logger.info(
                "peft_sparse: %s is not torch.optim.Adam/AdamW; regrown sparse entries use its global-step bias "
                "correction, not their own age",
                name,
            )
        return False
    state = optimizer.state.get(param)
    if not state or "exp_avg" not in state or "step" not in state:
        return False
    t = int(state["step"])
    ages = age.to(device=param.device)
    if t <= 0 or bool((ages == t).all()):
        return False
    group = next(g for g in optimizer.param_groups if any(p is param for p in g["params"]))
    beta1, beta2 = (float(b) for b in group["betas"])
    lr, eps = float(group["lr"]), float(group["eps"])
    second = state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]
    exp_avg, second_sqrt = state["exp_avg"].double(), second.double().sqrt()
    bc1_age, bc2_sqrt_age, bc1_step, bc2_sqrt_step = _bias_corrections(ages, t, beta1, beta2)
    torch_update = _adam_update(exp_avg, second_sqrt, lr, eps, bc1_step, bc2_sqrt_step)
    age_update = _adam_update(exp_avg, second_sqrt, lr, eps, bc1_age, bc2_sqrt_age)
    param.add_((torch_update - age_update).to(param.dtype))
    return True
