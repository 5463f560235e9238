"""How training drives reselection without a line of user code.

A global optimizer step post-hook (``torch.optim.Optimizer.register_optimizer_step_post_hook``) runs after every
``optimizer.step()`` of any torch optimizer: for each sparse-delta values tensor the optimizer holds, the owning
layer counts the update, updates its statistics and reselects when due. So the HF Trainer, TRL and plain loops all
drive SpIEL the same way, and gradient accumulation counts optimizer updates, not micro-batches.

A ``TrainerCallback`` added to transformers' default callbacks gives SpIEL the run's total number of updates
(``total_steps=None`` in the config) at the start of training.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

from .distributed import check_engine
from .registry import live_layers, optimizer_owners

_installed = False


def _owned_values(optimizer: torch.optim.Optimizer) -> list[tuple[Any, str]]:
    # found by identity among the live layers, so FSDP2's replacement parameters are found too
    return [owner for owner in optimizer_owners(optimizer) if hasattr(owner[0], "after_optimizer_step")]


def after_optimizer_step(optimizer: torch.optim.Optimizer, args: Any = None, kwargs: Any = None) -> None:
    """Tell every sparse layer whose values ``optimizer`` updated that an update happened; the SpIEL-MA
    reselections due after this update then run together (``reselect_together``: their growth in one call).

    If the values sit with an engine SpIEL cannot follow (FSDP1, DeepSpeed ZeRO), raise instead of training a fixed
    mask silently.
    """
    owned = _owned_values(optimizer)
    waiting = []
    if not owned:
        for layer in live_layers():
            if hasattr(layer, "after_optimizer_step"):
                waiting += [(layer, adapter) for adapter in getattr(layer, "_awaiting_update", ())]
    check_engine(optimizer, owned, waiting)
    due: list = []
    for layer, adapter in owned:
        layer.after_optimizer_step(adapter, optimizer, due)
    if due:
        from ..tuners.spiel.layer import reselect_together  # the tuners import this module

        reselect_together(due, optimizer)


def set_total_steps(model: torch.nn.Module, total_steps: int) -> int:
    """Set ``total_steps`` on every sparse adapter config of ``model`` that has none; returns how many were set."""
    seen, count = set(), 0
    for module in model.modules():
        for config in getattr(module, "sparse_config", {}).values():
            if id(config) in seen or not hasattr(config, "total_steps"):
                continue
            seen.add(id(config))
            if config.total_steps is None and total_steps and total_steps > 0:
                config.total_steps = int(total_steps)
                count += 1
    return count


def _make_trainer_callback():
    from transformers import TrainerCallback

    class SparseTrainingCallback(TrainerCallback):
        """Gives sparse adapters with ``total_steps=None`` the Trainer's ``max_steps`` when training begins."""

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if model is not None:
                set_total_steps(model, state.max_steps)

    return SparseTrainingCallback


def install() -> None:
    """Install the optimizer hook and the Trainer callback once per process."""
    global _installed
    if _installed:
        return
    _installed = True
    register_optimizer_step_post_hook(after_optimizer_step)
    try:
        import transformers.trainer as trainer_module
    except ImportError:  # pragma: no cover - transformers is a dependency
        return
    callback = _make_trainer_callback()
    if not any(getattr(c, "__name__", "") == callback.__name__ for c in trainer_module.DEFAULT_CALLBACKS):
        trainer_module.DEFAULT_CALLBACKS.append(callback)
