"""How a budget of tunable entries is spread over the targeted weights (thesis §7.3)."""

from __future__ import annotations

from typing import Optional, Sequence


def allocate_budgets(
    shapes: Sequence[tuple[int, int]],
    density: Optional[float] = None,
    num_tunable_weights: Optional[int] = None,
    match_lora_rank: Optional[int] = None,
) -> list[int]:
    """Number of tunable entries for each weight of ``shapes``; exactly one of the three budgets is given.

    ``density``: the same fraction of every weight (rounded). ``num_tunable_weights``: that total, spread in
    proportion to each weight's size (largest remainder, so the total is exact). ``match_lora_rank`` r:
    ``r * (rows + cols)`` per weight, LoRA's parameter count at rank r (capped at the weight's size).
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
    sizes = [int(r) * int(c) for r, c in shapes]
    if density is not None:
        return [min(n, round(density * n)) for n in sizes]
    if match_lora_rank is not None:
        return [min(n, match_lora_rank * (int(r) + int(c))) for n, (r, c) in zip(sizes, shapes)]
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
