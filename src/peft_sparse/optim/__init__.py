"""Optimizer support for sparse fine-tuning: SM3 and re-seeding the state of regrown entries."""

from .reseed import reseed_optimizer_state
from .sm3 import SM3, sm3_accumulate

__all__ = ["SM3", "reseed_optimizer_state", "sm3_accumulate"]
