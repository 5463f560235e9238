"""How a budget of tunable entries is spread over the targeted weights (thesis §7.3.1, footnote 2)."""

from __future__ import annotations

from typing import Optional, Sequence

BUDGET_ALLOCATIONS = ("equal_density", "lora_per_tensor")


def allocate_budgets(
    shapes: Sequence[tuple[int, int]],
    density: Optional[float] = None,
    num_tunable_weights: Optional[int] = None,
    match_lora_rank: Optional[int] = None,
    allocation: str = "equal_density",
) -> list[int]:
    """Number of tunable entries for each weight of ``shapes``; exactly one of the three budgets is given.

    ``density``: the same fraction of every weight (rounded). ``num_tunable_weights``: that total, spread at equal
    density, i.e. in proportion to each weight's size (largest remainder, so the total is exact). ``match_lora_rank``
    r: the total parameter count of LoRA at rank r, ``sum of r * (rows + cols)`` over the weights, spread at equal
    density like ``num_tunable_weights`` (thesis §7.3.1, footnote 2). ``allocation="lora_per_tensor"`` instead gives
    each weight LoRA's own count ``r * (rows + cols)`` (capped at the weight's size); it only affects
    ``match_lora_rank``.
    """
    given = [
        name
        for name, v in (
            ("density", density),
            ("num_tunable_weights", num_tunable_weights),
            ("match_lora_rank", match_lora_rank),
        )
        if v is not None
    ]
    if len(given) != 1:
        raise ValueError(f"exactly one of density, num_tunable_weights, match_lora_rank must be set, got {given}")
    if allocation not in BUDGET_ALLOCATIONS:
        raise ValueError(f"budget_allocation must be one of {BUDGET_ALLOCATIONS}, got {allocation!r}")
    sizes = [int(r) * int(c) for r, c in shapes]
    if density is not None:
        return [min(n, round(density * n)) for n in sizes]
    if match_lora_rank is not None:
        per_tensor = [match_lora_rank * (int(r) + int(c)) for r, c in shapes]
        if allocation == "lora_per_tensor":
            return [min(n, k) for n, k in zip(sizes, per_tensor)]
        num_tunable_weights = min(sum(per_tensor), sum(sizes))
    total = sum(sizes)
    if num_tunable_weights > total:
        raise ValueError(
            f"num_tunable_weights={num_tunable_weights} exceeds the {total} entries of the targeted weights"
        )
    exact = [num_tunable_weights * n / total for n in sizes]
    budgets = [int(e) for e in exact]
    remainders = sorted(range(len(sizes)), key=lambda i: (budgets[i] - exact[i], i))
    for i in remainders[: num_tunable_weights - sum(budgets)]:
        budgets[i] += 1
    return budgets
