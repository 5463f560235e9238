"""Optimizer support for sparse fine-tuning: SM3, per-entry-age Adam bias correction and re-seeding regrown entries."""

from .age import correct_adam_step_for_age, supports_per_entry_age
from .reseed import reseed_optimizer_state
from .sm3 import SM3, sm3_accumulate

__all__ = ["SM3", "correct_adam_step_for_age", "reseed_optimizer_state", "sm3_accumulate", "supports_per_entry_age"]
