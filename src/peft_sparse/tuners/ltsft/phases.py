"""Driving the LT-SFT phases from a user's script: functions on a PeftModel, and a Trainer callback for progress."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from peft import PeftModel
from torch import nn

from .layer import DENSE
from .model import LTSFTModel, SelectionReport

_callback_installed = False


@dataclass(frozen=True)
class PhaseInfo:
    """Where an LT-SFT adapter is: ``phase`` ("dense" or "sparse") of ``iteration`` out of ``n_iterations``."""

    adapter_name: str
    phase: str
    iteration: int
    n_iterations: int

    @property
    def dense(self) -> bool:
        return self.phase == DENSE

    def __str__(self) -> str:
        return f"LT-SFT [{self.adapter_name}] {self.phase} phase, iteration {self.iteration}/{self.n_iterations}"


def ltsft_tuner(model: nn.Module) -> LTSFTModel:
    """The ``LTSFTModel`` inside ``model`` (a PeftModel or the tuner itself); TypeError if there is none."""
    tuner = find_ltsft_tuner(model)
    if tuner is None:
        raise TypeError(f"expected a PeftModel with an LT-SFT adapter, got {type(model).__name__}")
    return tuner


def find_ltsft_tuner(model: Any) -> LTSFTModel | None:
    """Like ``ltsft_tuner`` but returns None; also looks through DDP/accelerate wrappers (``.module``)."""
    for _ in range(4):
        if isinstance(model, LTSFTModel):
            return model
        if isinstance(model, PeftModel):
            model = model.base_model
        elif hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        else:
            return None
    return None


def current_phase(model: nn.Module, adapter_name: str | None = None) -> PhaseInfo:
    """The phase of ``adapter_name`` (default: the active adapter)."""
    tuner = ltsft_tuner(model)
    adapter = adapter_name or tuner.active_adapters[0]
    if adapter not in tuner.ltsft_state:
        raise ValueError(f"no LT-SFT adapter named {adapter!r}; available: {sorted(tuner.ltsft_state)}")
    state = tuner.ltsft_state[adapter]
    return PhaseInfo(adapter, tuner.phase(adapter), state.iteration, state.n_iterations)


def select_and_rewind(model: nn.Module, adapter_name: str | None = None, verbose: bool = True) -> SelectionReport:
    """End the dense phase of the LT-SFT adapter of ``model``: select, rewind to theta0, start the sparse phase.

    See ``LTSFTModel.select_and_rewind``. Train the sparse phase with a fresh optimizer and LR schedule (a new
    Trainer).
    """
    return ltsft_tuner(model).select_and_rewind(adapter_name, verbose=verbose)


def start_dense_phase(model: nn.Module, adapter_name: str | None = None) -> int:
    """Start the dense phase of the next iteration (only with ``n_iterations`` > 1); returns its number."""
    return ltsft_tuner(model).start_dense_phase(adapter_name)


def l1_penalty(model: nn.Module) -> torch.Tensor | None:
    """The L1 term ``lambda / N * sum |theta - theta0|`` of the active LT-SFT adapter(s), or None if lambda is 0.

    It is added to ``outputs.loss`` automatically; call this only when the loss is computed outside the model.
    """
    return ltsft_tuner(model).l1_penalty()


def phases(model: nn.Module, adapter_name: str | None = None, verbose: bool = True) -> Iterator[PhaseInfo]:
    """Iterate over the phases of every iteration, switching between them; train once per yielded phase::

        for phase in peft_sparse.ltsft.phases(model):
            Trainer(model=model, args=dense_args if phase.dense else sparse_args, ...).train()

    The adapter must be at the start of its first dense phase (fresh from ``get_peft_model``).
    """
    tuner = ltsft_tuner(model)
    info = current_phase(model, adapter_name)
    if not info.dense or info.iteration != 1:
        raise ValueError(f"phases() starts at the first dense phase, but {info}")
    adapter = info.adapter_name
    for iteration in range(1, info.n_iterations + 1):
        yield PhaseInfo(adapter, "dense", iteration, info.n_iterations)
        tuner.select_and_rewind(adapter, verbose=verbose)
        yield PhaseInfo(adapter, "sparse", iteration, info.n_iterations)
        if iteration < info.n_iterations:
            tuner.start_dense_phase(adapter)


# --------------------------------------------------------------------------------------------- Trainer glue
def _make_progress_callback():
    from transformers import TrainerCallback

    class LTSFTProgressCallback(TrainerCallback):
        """Prints the LT-SFT phase when training starts, checks that the optimizer holds what this phase trains, and
        adds ``ltsft_phase`` (1 dense, 2 sparse) and ``ltsft_l1`` (the last L1 term) to the logs."""

        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            tuner = find_ltsft_tuner(model)
            if tuner is None:
                return
            for adapter in tuner.active_adapters:
                if adapter not in tuner.ltsft_state or tuner.peft_config[adapter].inference_mode:
                    continue
                info = current_phase(tuner, adapter)
                trainable = _phase_parameters(tuner, adapter, info.dense)
                if optimizer is not None:
                    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
                    missing = sum(1 for p in trainable if id(p) not in held)
                    if missing:
                        raise ValueError(
                            f"{info}: the optimizer does not hold {missing} of the {len(trainable)} tensors this "
                            "phase trains. Each LT-SFT phase needs a fresh optimizer and LR schedule: create a new "
                            "Trainer after select_and_rewind (or set trainer.optimizer = trainer.lr_scheduler = None)."
                        )
                if state.is_world_process_zero:
                    count = sum(p.numel() for p in trainable)
                    what = "weights train densely" if info.dense else "selected values train"
                    print(f"{info}: {count:,} {what}, {state.max_steps} optimizer steps")

        def on_log(self, args, state, control, logs=None, model=None, **kwargs):
            tuner = find_ltsft_tuner(model)
            if tuner is None or logs is None or "loss" not in logs:
                return
            adapters = [a for a in tuner.active_adapters if a in tuner.ltsft_state]
            if adapters:
                logs["ltsft_phase"] = 1 if tuner.phase(adapters[0]) == DENSE else 2
            if tuner.last_l1_penalty is not None:
                logs["ltsft_l1"] = float(tuner.last_l1_penalty)

    return LTSFTProgressCallback


def _phase_parameters(tuner: LTSFTModel, adapter: str, dense: bool) -> list[torch.Tensor]:
    params = []
    for _, layer in tuner._layers(adapter):
        if dense:
            params += [layer.base_tensor(kind) for kind in layer.ltsft_theta0.get(adapter, {})]
        else:
            params += [v for _, v in layer.deltas_of(adapter).values() if v.numel() and v.requires_grad]
    return params


def install_progress_callback() -> None:
    """Add the LT-SFT progress callback to transformers' default Trainer callbacks, once per process."""
    global _callback_installed
    if _callback_installed:
        return
    _callback_installed = True
    try:
        import transformers.trainer as trainer_module
    except ImportError:  # pragma: no cover - transformers is a dependency
        return
    callback = _make_progress_callback()
    if not any(getattr(c, "__name__", "") == callback.__name__ for c in trainer_module.DEFAULT_CALLBACKS):
        trainer_module.DEFAULT_CALLBACKS.append(callback)
