"""Training glue: the optimizer hook that drives reselection and the Trainer callback for total_steps."""

from .hooks import after_optimizer_step, install, set_total_steps

__all__ = ["after_optimizer_step", "install", "set_total_steps"]
