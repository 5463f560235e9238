"""When reselection happens and how many entries it replaces (thesis §7.3.1, eq. 7.6).

With S = ``reselection_steps``, gamma = ``accumulation_steps`` and T = ``total_steps``, reselection follows
optimizer updates gamma, S + gamma, 2S + gamma, ... (those before T), as in the SpIEL reference implementation: the
first one comes right after the first gamma updates, so the random initial positions are trained only that long. For
SpIEL-AG the gradient-estimation phase is the gamma updates that end at each reselection (the first phase is updates
1..gamma).
"""

from __future__ import annotations

import math
from typing import Optional

SCHEDULES = ("linear", "cosine")


def is_reselection_step(
    step: int, reselection_steps: int, total_steps: Optional[int], accumulation_steps: int
) -> bool:
    """True if reselection follows optimizer update ``step`` (1-based): updates gamma, S + gamma, ... before T."""
    if step < accumulation_steps or step <= 0 or (step - accumulation_steps) % reselection_steps:
        return False
    return total_steps is None or step < total_steps


def in_estimation_phase(
    next_step: int, reselection_steps: int, accumulation_steps: int, total_steps: Optional[int]
) -> bool:
    """True if the micro-batches of update ``next_step`` (1-based) feed the AG gradient estimate.

    The phase is the ``accumulation_steps`` updates that end at a reselection step.
    """
    if next_step <= 0:
        return False
    rounds = max(0, math.ceil((next_step - accumulation_steps) / reselection_steps))
    reselection_at = accumulation_steps + rounds * reselection_steps
    if not is_reselection_step(reselection_at, reselection_steps, total_steps, accumulation_steps):
        return False
    return reselection_at - next_step < accumulation_steps


def reselection_count(
    step: int,
    budget: int,
    reselection_steps: int,
    rate: float,
    total_steps: Optional[int],
    schedule: str = "linear",
    *,
    accumulation_steps: int,
) -> int:
    """Number of entries of a ``budget``-entry delta to drop and regrow after update ``step``.

    The first reselection (``step == accumulation_steps``) replaces all entries, since the initial indices are random.
    Afterwards ``rate * (1 - t/T) * budget`` (linear) or ``rate/2 * (1 + cos(pi t / T)) * budget`` (cosine), rounded
    down; with ``total_steps`` unknown, the constant ``rate * budget`` (thesis eq. 7.6 for the linear schedule).
    """
    if not is_reselection_step(step, reselection_steps, total_steps, accumulation_steps):
        return 0
    if step == accumulation_steps:
        return budget
    if total_steps is None:
        fraction = rate
    elif schedule == "linear":
        fraction = rate * (1.0 - step / total_steps)
    elif schedule == "cosine":
        fraction = rate / 2.0 * (1.0 + math.cos(math.pi * step / total_steps))
    else:
        raise ValueError(f"reselection_schedule must be one of {SCHEDULES}, got {schedule!r}")
    return max(0, min(budget, int(fraction * budget)))
