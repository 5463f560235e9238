"""Drop/grow policies and the reselection schedule: pure functions on tensors."""

from .budget import allocate_budgets
from .policies import (
    drop_smallest,
    grow_by_accumulated_gradient,
    grow_by_momentum_approximation,
    grow_by_momentum_approximation_many,
    grow_random,
    is_member,
    place_growth,
    plan_drop,
    replace_entries,
    top_gradient_candidates,
)
from .schedule import SCHEDULES, in_estimation_phase, is_reselection_step, reselection_count
from .topk import ChangeSource, TopKSelection, largest_changes, largest_changes_per_tensor

__all__ = [
    "SCHEDULES",
    "ChangeSource",
    "TopKSelection",
    "allocate_budgets",
    "drop_smallest",
    "grow_by_accumulated_gradient",
    "grow_by_momentum_approximation",
    "grow_by_momentum_approximation_many",
    "grow_random",
    "in_estimation_phase",
    "is_member",
    "is_reselection_step",
    "largest_changes",
    "largest_changes_per_tensor",
    "place_growth",
    "plan_drop",
    "replace_entries",
    "reselection_count",
    "top_gradient_candidates",
]
