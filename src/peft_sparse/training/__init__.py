"""Training glue: the optimizer hook that drives reselection, the Trainer callback for total_steps, and what keeps
ranks identical under DDP and FSDP2 (``distributed``; layers are found through ``registry``)."""

from .hooks import after_optimizer_step, install, set_total_steps

__all__ = ["after_optimizer_step", "install", "set_total_steps"]
