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
left bit-for-bit as torch made it. Both updates are computed in float32 with the same operations (one pass each
over the moments), so the corrected update differs from the exact per-age one by a few float32 roundings, as
torch's own update does from the exact global-step one. This holds for every torch Adam/AdamW implementation
(for-loop, foreach, fused, capturable, amsgrad, maximize). Other optimizers keep their own global-step correction
(logged once).

On the CPU the ages' range is read to compute the coefficients once per distinct age. On an accelerator nothing is
read on the host (that would wait for the device once per parameter and update): each entry's coefficients are
computed from its age, and the step's from the optimizer's step count, as tensors on the device.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from .. import _device
from .sm3 import SM3

logger = logging.getLogger(__name__)
_warned: set[str] = set()


def supports_per_entry_age(optimizer: torch.optim.Optimizer) -> bool:
    """True if ``optimizer`` is a torch Adam or AdamW, whose steps ``correct_adam_step_for_age`` can correct."""
    return isinstance(optimizer, torch.optim.Adam)


def _update_coefficients(
    ages: torch.Tensor, span: Optional[tuple[int, int]], t, beta1: float, beta2: float, lr, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Torch's Adam update rewritten as ``m * k1 / (sqrt(v) + k2)``: per entry ``k1`` and ``k2`` (float32) for the
    entries' ages and, as one-entry tensors, for the global step ``t`` (an int, or a tensor holding it); ``lr`` is a
    float or a float64 tensor on the ages' device.

    With ``c = sqrt(1 - beta2**a)``: ``lr * (m / (1 - beta1**a)) / (sqrt(v) / c + eps) = m * k1 / (sqrt(v) + k2)``,
    ``k1 = lr * c / (1 - beta1**a)``, ``k2 = eps * c``, computed in float64 and rounded once to float32. Ages take few
    distinct values (entries grown at the same reselection share one), so when their range ``span`` (``(low, high)``,
    including ``t``) is known and shorter than the entries the coefficients are computed once per age and gathered;
    else once per entry. Either way an entry of age ``t`` gets exactly the global step's coefficients (the same
    operations on the same number).
    """

    def coefficients(steps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = (1 - beta2**steps).sqrt()
        return (lr * c / (1 - beta1**steps)).float(), (eps * c).float()

    if span is not None and span[1] - span[0] + 1 <= ages.numel():
        low, high = span
        k1, k2 = coefficients(torch.arange(low, high + 1, dtype=torch.float64, device=ages.device))
        offset = ages - low if ages.dtype in (torch.int32, torch.int64) else (ages - low).long()
        at_step = slice(t - low, t - low + 1)
        return k1.index_select(0, offset), k2.index_select(0, offset), k1[at_step], k2[at_step]
    if isinstance(t, torch.Tensor):  # the step count on the device: no copy through the host
        step = t.to(device=ages.device, dtype=torch.float64).reshape(1)
    else:
        step = torch.full((1,), float(t), dtype=torch.float64, device=ages.device)
    k1, k2 = coefficients(torch.cat([ages.double(), step]))
    return k1[:-1], k2[:-1], k1[-1:], k2[-1:]


@torch.no_grad()
def correct_adam_step_for_age(optimizer: torch.optim.Optimizer, param: torch.Tensor, age: torch.Tensor) -> bool:
    """Re-do ``optimizer``'s last update of ``param`` with bias correction by per-entry ``age``; True if done.

    ``age`` (integer, one per entry of ``param``) counts the updates each entry has had including the one just made.
    Call right after ``optimizer.step()``. Does nothing (returns False) for optimizers other than torch Adam/AdamW,
    for a parameter the optimizer holds no state of, and, where the ages and the step count are read on the host
    (on the CPU), when every age equals the global step (on an accelerator such entries get a correction of exactly 0
    instead).
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
    if param.numel() == 0:
        return False
    ages = age.to(device=param.device)
    t, span = state["step"], None
    if not isinstance(t, torch.Tensor) or _device.host_reads_are_free(t.device):
        t = int(t)  # torch keeps the step count on the CPU unless the optimizer is fused or capturable
        if t <= 0:
            return False
    if isinstance(t, int) and _device.host_reads_are_free(ages.device):
        low, high = (int(a) for a in ages.aminmax())
        if low == high == t:
            return False
        span = (min(low, t), max(high, t))
    group = next(g for g in optimizer.param_groups if any(p is param for p in g["params"]))
    beta1, beta2 = (float(b) for b in group["betas"])
    lr, eps = group["lr"], float(group["eps"])
    if isinstance(lr, torch.Tensor) and not _device.host_reads_are_free(lr.device):
        lr = lr.to(device=ages.device, dtype=torch.float64)  # a device learning rate (capturable/fused Adam): not read
    else:
        lr = float(lr)
    second = state["max_exp_avg_sq"] if group.get("amsgrad") else state["exp_avg_sq"]
    k1, k2, k1_step, k2_step = _update_coefficients(ages, span, t, beta1, beta2, lr, eps)
    exp_avg, root = state["exp_avg"].float(), second.float().sqrt()
    # the same operations in the same order for both updates: an entry of age t gets a correction of exactly 0
    age_update = (exp_avg * k1).div_(k2.add_(root))
    torch_update = (exp_avg * k1_step).div_(root.add_(k2_step))
    param.add_(torch_update.sub_(age_update).to(param.dtype))
    return True
