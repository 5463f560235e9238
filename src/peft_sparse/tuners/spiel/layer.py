"""The SpIEL layer: a sparse delta whose positions are dropped and regrown during training (thesis §7.3).

Training state per adapter, saved with the adapter so that a resumed run equals the uninterrupted one:
``spiel_step`` (optimizer updates seen), ``spiel_age`` (int32, one per entry: the updates since it was grown,
counting the estimation phase that seeded its Adam moments; Adam's bias correction uses it),
``spiel_row_stats``/``spiel_col_stats`` (SpIEL-MA, float32, ``rows`` and ``cols`` numbers),
``spiel_candidates``/``spiel_candidate_grad``/``spiel_candidate_sq`` (SpIEL-AG growth candidates and their float32
gradient sums during an estimation phase; empty otherwise) and ``spiel_anchor`` (the values right after the last
reselection, float32, only with ``drop_criterion="change_since_reselection"``; empty otherwise). An adapter saved
without ``spiel_age`` (an earlier version) loads with every age set to its ``spiel_step``.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

from ... import _device
from ...delta import check_delta, index_dtype_for
from ...kernels import sddmm
from ...kernels.positions import rows_and_cols
from ...optim import SM3, sm3_accumulate
from ...selection import (
    grow_by_accumulated_gradient,
    grow_by_momentum_approximation,
    grow_by_momentum_approximation_many,
    grow_random,
    in_estimation_phase,
    is_reselection_step,
    place_growth,
    plan_drop,
    reselection_count,
    top_gradient_candidates,
)
from ...sparse_linear import GradientObserver
from ...training import distributed
from ..sparse_layer import DTYPES, SparseDeltaLayer

TRAINING_STATE = (
    "spiel_step",
    "spiel_row_stats",
    "spiel_col_stats",
    "spiel_candidates",
    "spiel_candidate_grad",
    "spiel_candidate_sq",
    "spiel_age",
    "spiel_anchor",
)


class SpIELLayer(SparseDeltaLayer):
    """Sparse delta with drop-and-grow driven by optimizer updates (see ``peft_sparse.training``)."""

    method_prefix = "spiel_"
    adapter_layer_names = ("spiel_values",)
    other_param_names = ("spiel_indices", "spiel_shape") + TRAINING_STATE

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        super().__init__(base_layer, **kwargs)
        self.layer_seed: dict[str, int] = {}
        self._pending: dict[str, torch.Tensor] = {}
        # the backward's gradient of the values over the same micro-batches, to bring ``_pending`` to the units of
        # the gradient the optimizer steps with (after clipping)
        self._pending_values: dict[str, torch.Tensor] = {}
        self._step_cache: dict[str, int] = {}
        self._fresh_candidates: set[str] = set()  # candidates picked since the last update (dropped if it is skipped)

    def update_layer(self, adapter_name: str, config: Any, layer_key: str = "") -> None:
        """Add ``adapter_name`` with an empty delta and fresh training state; the budget comes later."""
        self.layer_seed[adapter_name] = zlib.crc32(layer_key.encode())
        self.add_adapter_slot(adapter_name, config)
        self.reset_training_state(adapter_name)

    def reset_training_state(self, adapter_name: str) -> None:
        """Zero the update counter and clear the growth statistics of ``adapter_name``."""
        config = self.sparse_config[adapter_name]
        device = self.weight_device
        rows, cols = self.weight_shape
        f32 = dict(dtype=torch.float32, device=device)
        self.spiel_step[adapter_name] = torch.zeros((), dtype=torch.int64, device=device)
        self._step_cache[adapter_name] = 0
        self._reset_entry_state(adapter_name, age=0)
        ma = config.selection == "ma"
        self.spiel_row_stats[adapter_name] = torch.zeros(rows if ma else 0, **f32)
        self.spiel_col_stats[adapter_name] = torch.zeros(cols if ma else 0, **f32)
        self._clear_candidates(adapter_name)

    def _reset_entry_state(self, adapter_name: str, age: int) -> None:
        # per-entry state for the current values: every age set to ``age``, the anchor to the values
        # buffers live on the weight's device (values may be on "meta" while PEFT injects with low_cpu_mem_usage)
        values, device = self.sparse_values[adapter_name], self.weight_device
        self.spiel_age[adapter_name] = torch.full((values.numel(),), age, dtype=torch.int32, device=device)
        track = self.sparse_config[adapter_name].drop_criterion == "change_since_reselection"
        if not track:
            anchor = torch.zeros(0, device=device)
        elif values.is_meta:
            anchor = torch.zeros(values.numel(), device=device)
        else:
            anchor = values.detach().float().to(device, copy=True)
        self.spiel_anchor[adapter_name] = anchor

    def set_delta(self, adapter_name: str, indices: torch.Tensor, values: torch.Tensor) -> None:
        """Install ``(indices, values)``; per-entry state of a changed size restarts (age = the update count)."""
        super().set_delta(adapter_name, indices, values)
        age = self.spiel_age[adapter_name] if adapter_name in self.spiel_age else None
        if age is None or age.numel() != self.sparse_values[adapter_name].numel():
            step = int(self.spiel_step[adapter_name]) if adapter_name in self.spiel_step else 0
            self._reset_entry_state(adapter_name, age=step)

    def _clear_candidates(self, adapter_name: str) -> None:
        device = self.weight_device
        self.spiel_candidates[adapter_name] = torch.zeros(0, dtype=index_dtype_for(self.weight_numel), device=device)
        self.spiel_candidate_grad[adapter_name] = torch.zeros(0, dtype=torch.float32, device=device)
        self.spiel_candidate_sq[adapter_name] = torch.zeros(0, dtype=torch.float32, device=device)
        self._pending.pop(adapter_name, None)
        self._pending_values.pop(adapter_name, None)
        self._fresh_candidates.discard(adapter_name)

    def init_delta(self, adapter_name: str, budget: int) -> None:
        """Give ``adapter_name`` ``budget`` random positions (seeded by ``config.seed`` and the layer's name)."""
        config = self.sparse_config[adapter_name]
        generator = self._generator(adapter_name, 0)
        indices = grow_random(self.weight_numel, torch.zeros(0, dtype=torch.long), budget, generator)
        if config.init_weights:
            values = torch.zeros(indices.numel())
        else:  # a non-zero delta, for tests
            values = torch.randn(indices.numel(), generator=generator) * 0.1
        self.set_delta(adapter_name, indices, values.to(DTYPES[config.delta_dtype]))
        self._reset_entry_state(adapter_name, age=self.current_step(adapter_name))

    def _generator(self, adapter_name: str, step: int) -> torch.Generator:
        seed = self.sparse_config[adapter_name].seed
        mixed = (seed * 1_000_003 + self.layer_seed.get(adapter_name, 0) * 7919 + step) % (2**63)
        return torch.Generator().manual_seed(mixed)

    # ----------------------------------------------------------------------------------------- state
    def current_step(self, adapter_name: str) -> int:
        """Number of optimizer updates this adapter has seen."""
        if adapter_name not in self._step_cache:
            self._step_cache[adapter_name] = int(self.spiel_step[adapter_name])
        return self._step_cache[adapter_name]

    def validate_loaded(self, adapter_name: str, tensors: dict[str, torch.Tensor], where: str) -> None:
        super().validate_loaded(adapter_name, tensors, where)
        check_training_state(tensors, self.weight_shape, self.sparse_config[adapter_name].selection, where)

    def install_loaded(self, adapter_name: str, tensors: dict[str, torch.Tensor]) -> None:
        super().install_loaded(adapter_name, tensors)
        self._step_cache.pop(adapter_name, None)
        self._pending.pop(adapter_name, None)
        self._pending_values.pop(adapter_name, None)
        values, device = self.sparse_values[adapter_name], self.weight_device
        if "age" not in tensors:  # saved before per-entry ages existed: treat every entry as trained all along
            self._reset_entry_state(adapter_name, age=self.current_step(adapter_name))
        else:
            self.spiel_age[adapter_name] = self.spiel_age[adapter_name].to(torch.int32)
        track = self.sparse_config[adapter_name].drop_criterion == "change_since_reselection"
        anchor = self.spiel_anchor[adapter_name]
        if track and anchor.numel() != values.numel():  # not tracked when saved: measure from the pre-trained weight
            self.spiel_anchor[adapter_name] = torch.zeros(values.numel(), device=device)
        elif not track and anchor.numel():
            self.spiel_anchor[adapter_name] = torch.zeros(0, device=device)

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        for state in (self.layer_seed, self._step_cache, self._pending, self._pending_values):
            state.pop(adapter_name, None)
        self._fresh_candidates.discard(adapter_name)

    # ----------------------------------------------------------------------------------------- estimation
    def _estimating_adapters(self) -> list[str]:
        if not (self.training and torch.is_grad_enabled()):
            return []
        out = []
        for adapter, _, values in self.active_deltas():
            config = self.sparse_config[adapter]
            if config.selection != "ag" or not values.requires_grad:
                continue
            if in_estimation_phase(
                self.current_step(adapter) + 1, config.reselection_steps, config.accumulation_steps, config.total_steps
            ):
                out.append(adapter)
        return out

    def gradient_observer(self) -> Optional[GradientObserver]:
        adapters = self._estimating_adapters()
        if not adapters:
            return None

        def observe(a: torch.Tensor, b: torch.Tensor, ncols: int, indices: torch.Tensor, values_grad) -> None:
            for adapter in adapters:
                # the backward's gradient is this adapter's own when its delta was the only one in the product
                own = values_grad if indices is self.sparse_indices[adapter] else None
                self._observe_gradient(adapter, a, b, ncols, own)

        return observe

    @torch.no_grad()
    def _observe_gradient(
        self, adapter: str, a: torch.Tensor, b: torch.Tensor, ncols: int, values_grad: Optional[torch.Tensor] = None
    ) -> None:
        # The first micro-batch of a phase picks the candidates from the dense gradient (freed right away);
        # later ones only gather the gradient at the candidates. ``values_grad``: the gradient of this adapter's
        # values in float32 if the backward computed it already.
        backend = self.sparse_config[adapter].kernel_backend
        candidates = self.spiel_candidates[adapter]
        if candidates.numel() == 0:
            budget = self.sparse_values[adapter].numel()
            # the gradient averaged over ranks, so that every rank picks the same candidates
            top, grad = top_gradient_candidates(a, b, budget, reduce=distributed.average_across_ranks)
            candidates = top.to(self.spiel_candidates[adapter].dtype)
            self.spiel_candidates[adapter] = candidates
            self.spiel_candidate_grad[adapter] = torch.zeros(candidates.numel(), dtype=torch.float32, device=a.device)
            self.spiel_candidate_sq[adapter] = torch.zeros(candidates.numel(), dtype=torch.float32, device=a.device)
            self._fresh_candidates.add(adapter)
        else:
            grad = sddmm(a, b, candidates, ncols, backend)
        _accumulate(self._pending, adapter, grad)
        if self._tracks_units(adapter):
            if values_grad is None:
                values_grad = sddmm(a, b, self.sparse_indices[adapter], ncols, backend)
            else:  # a copy: the backward hands the same tensor to autograd, and the sums are changed in place
                values_grad = values_grad.clone()
            _accumulate(self._pending_values, adapter, values_grad)

    def _tracks_units(self, adapter: str) -> bool:
        return self.sparse_config[adapter].ag_statistics == "as_stepped"

    @torch.no_grad()
    def after_gradient_unscale(self, adapter_name: str, inv_scale: torch.Tensor, skipped: bool) -> None:
        """Called when a loss scaler has unscaled the gradients of an update (``peft_sparse.training.precision``):
        bring the statistics gathered since the last update to unscaled units, or drop them (and candidates picked
        from them) when the scaler found inf/NaN and will skip the update."""
        if skipped:
            self._pending.pop(adapter_name, None)
            self._pending_values.pop(adapter_name, None)
            if adapter_name in self._fresh_candidates:
                self._clear_candidates(adapter_name)
            return
        for pending in (self._pending.get(adapter_name), self._pending_values.get(adapter_name)):
            if pending is not None:
                pending.mul_(inv_scale.to(pending.device))

    # ----------------------------------------------------------------------------------------- updates
    @torch.no_grad()
    def after_optimizer_step(
        self,
        adapter_name: str,
        optimizer: torch.optim.Optimizer,
        due: Optional[list[tuple["SpIELLayer", str, int]]] = None,
    ) -> None:
        """Account for one optimizer update of ``adapter_name``'s values.

        First the update is bias-corrected by each entry's age (torch Adam/AdamW), then the statistics are updated,
        then entries are reselected if due: at once, or, for SpIEL-MA given a list ``due``, by appending
        ``(self, adapter_name, step)`` to it for the caller to reselect with others (``reselect_together``).
        """
        config = self.sparse_config[adapter_name]
        values = self.sparse_values[adapter_name]
        self._awaiting_update.discard(adapter_name)
        step = self.current_step(adapter_name) + 1
        self.spiel_step[adapter_name].fill_(step)
        self._step_cache[adapter_name] = step
        if values.grad is not None and values.numel():
            self._age_entries(adapter_name, optimizer)
        # peft_sparse.SM3 has already added this update to the statistics: they are its accumulators
        accumulated = isinstance(optimizer, SM3)
        if config.selection == "ma" and values.grad is not None and values.numel() and not accumulated:
            rows, cols = rows_and_cols(self.sparse_indices[adapter_name], self.weight_shape[1])
            sm3_accumulate(
                self.spiel_row_stats[adapter_name],
                self.spiel_col_stats[adapter_name],
                rows,
                cols,
                distributed.full_tensor(values.grad),  # averaged over ranks by DDP/FSDP2
            )
        pending = self._pending.pop(adapter_name, None)
        pending_values = self._pending_values.pop(adapter_name, None)
        self._fresh_candidates.discard(adapter_name)
        if pending is not None:
            distributed.average_across_ranks(pending)
            if pending_values is not None and values.grad is not None:
                # gradient clipping scales every gradient of the update by one factor: measure it on the values
                stepped = distributed.full_tensor(values.grad).float().norm()
                backward = distributed.average_across_ranks(pending_values).norm()
                # no host read of the norms: a factor of 1 when the backward's gradient was zero
                scale = torch.where(backward > 0, stepped / backward, torch.ones_like(backward))
                pending.mul_(scale.to(pending.device))
            self.spiel_candidate_grad[adapter_name] += pending
            self.spiel_candidate_sq[adapter_name] += pending * pending
        if is_reselection_step(step, config.reselection_steps, config.total_steps, config.accumulation_steps):
            if due is not None and config.selection == "ma":
                due.append((self, adapter_name, step))
            else:
                self.reselect(adapter_name, optimizer, step)

    def sm3_statistics(self, adapter_name: str) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """SpIEL-MA's row and column statistics of ``adapter_name`` for ``peft_sparse.SM3`` to use as its
        accumulators (None for other selections).

        They are the same SM3-II numbers SM3 keeps, so SM3 updates these in place and the layer does not compute
        the update a second time after the step.
        """
        if self.sparse_config[adapter_name].selection != "ma":
            return None
        return self.spiel_row_stats[adapter_name], self.spiel_col_stats[adapter_name]

    def _age_entries(self, adapter_name: str, optimizer: torch.optim.Optimizer) -> None:
        # An entry's age never exceeds the optimizer's own step count (a fresh optimizer after loading a trained
        # adapter starts every entry's moments, and so its age, afresh).
        values = self.sparse_values[adapter_name]
        if self.spiel_age[adapter_name].numel() != values.numel():  # values replaced outside set_delta
            self._reset_entry_state(adapter_name, age=self.current_step(adapter_name) - 1)
        age = self.spiel_age[adapter_name]
        step = optimizer.state.get(values, {}).get("step")
        age.add_(1)
        if isinstance(step, torch.Tensor) and not _device.host_reads_are_free(step.device):
            age.clamp_(max=step.to(device=age.device, dtype=age.dtype))  # a fused optimizer's count: not read
        elif step is not None:
            age.clamp_(max=int(float(step)))
        distributed.correct_adam_step_for_age(optimizer, values, age)

    @torch.no_grad()
    def reselect(self, adapter_name: str, optimizer: Optional[torch.optim.Optimizer], step: int) -> int:
        """Drop and regrow entries of ``adapter_name`` after update ``step``; returns how many slots changed.

        Regrown slots get value 0, re-seeded optimizer state and an age: AG seeds Adam's moments with the gradient
        estimates of its estimation phase and the entry's age is the number of updates in that phase (as in the
        SpIEL reference code; ``ag_seed_moments``); otherwise the moments are zero and the age 0.
        """
        return self.plan_reselection(adapter_name, step).finish(optimizer)

    @torch.no_grad()
    def plan_reselection(self, adapter_name: str, step: int) -> "PlannedReselection":
        """The first half of ``reselect``: choose the entries to drop after update ``step``; ``finish`` grows and
        writes. ``reselect_together`` plans several adapters and computes their SpIEL-MA growth in one call."""
        config = self.sparse_config[adapter_name]
        values = distributed.full_tensor(self.sparse_values[adapter_name])  # under FSDP2 only a slice is local
        k = reselection_count(
            step,
            values.numel(),
            config.reselection_steps,
            config.initial_reselection_rate,
            config.total_steps,
            config.reselection_schedule,
            accumulation_steps=config.accumulation_steps,
        )
        numel = self.weight_numel
        positions_of = momentum = mean = mean_sq = None
        updates = 0
        if config.selection == "ag":
            candidates = self.spiel_candidates[adapter_name]
            updates = max(1, min(config.accumulation_steps, step))
            mean = self.spiel_candidate_grad[adapter_name] / updates
            mean_sq = self.spiel_candidate_sq[adapter_name] / updates

            def grow(excluded, n):
                return grow_by_accumulated_gradient(candidates, mean, excluded, n)

            def positions_of(chosen):
                return candidates[chosen]
        elif config.selection == "ma":
            row, col = momentum = self.spiel_row_stats[adapter_name], self.spiel_col_stats[adapter_name]

            def grow(excluded, n):
                return grow_by_momentum_approximation(row, col, excluded, n, config.kernel_backend)
        else:
            generator = self._generator(adapter_name, step)

            def grow(excluded, n):
                return grow_random(numel, excluded, n, generator)

        anchor = self.spiel_anchor[adapter_name]
        scores = values.detach().float() - anchor if anchor.numel() else values
        drop, excluded = plan_drop(
            self.sparse_indices[adapter_name], scores, k, exclude_dropped=config.excludes_dropped_from_growth
        )
        return PlannedReselection(
            self, adapter_name, values, k, drop, excluded, grow, positions_of, momentum, mean, mean_sq, updates
        )

    def _write_reselection(
        self, plan: "PlannedReselection", optimizer: Optional[torch.optim.Optimizer], choices: torch.Tensor
    ) -> int:
        adapter_name = plan.adapter_name
        config = self.sparse_config[adapter_name]
        param, indices, values = self.sparse_values[adapter_name], self.sparse_indices[adapter_name], plan.values
        slots, new_positions, chosen = place_growth(indices, plan.drop, choices, plan.positions_of)
        if optimizer is not None:  # during training every rank reselects: all apply rank 0's plan
            slots, new_positions, chosen = distributed.agree_on_plan(slots, new_positions, chosen)
        indices[slots] = new_positions.to(indices.dtype)
        values[slots] = 0  # a gathered copy under FSDP2; write_regrown zeroes the local slice of the parameter
        seeded = config.ag_seed_moments and plan.mean is not None and plan.mean.numel() > 0
        self.spiel_age[adapter_name][slots] = plan.updates if seeded else 0
        anchor = self.spiel_anchor[adapter_name]
        if anchor.numel():
            anchor.copy_(values.detach().float())
        if seeded:
            distributed.write_regrown(
                optimizer, param, slots, plan.mean[chosen], plan.mean_sq[chosen], age=plan.updates
            )
        else:
            distributed.write_regrown(optimizer, param, slots)
        if config.selection == "ag":
            self._clear_candidates(adapter_name)
        return int(slots.numel())


@dataclass
class PlannedReselection:
    """One adapter's reselection between its drop and its growth (``SpIELLayer.plan_reselection``).

    ``drop`` holds the slots to drop and ``excluded`` the sorted positions growth may not choose (both empty when
    nothing is replaced); ``grow(excluded, k)`` returns the growth choices, ``positions_of`` maps them to positions
    (SpIEL-AG's candidate handles; None when they are positions); ``momentum`` holds SpIEL-MA's row and column
    statistics (None for other selections), whose growth ``reselect_together`` computes for many plans at once;
    ``mean``/``mean_sq`` are SpIEL-AG's gradient estimates over ``updates`` updates (None otherwise).
    """

    layer: SpIELLayer
    adapter_name: str
    values: torch.Tensor
    k: int
    drop: torch.Tensor
    excluded: torch.Tensor
    grow: Callable[[torch.Tensor, int], torch.Tensor]
    positions_of: Optional[Callable[[torch.Tensor], torch.Tensor]]
    momentum: Optional[tuple[torch.Tensor, torch.Tensor]]
    mean: Optional[torch.Tensor]
    mean_sq: Optional[torch.Tensor]
    updates: int

    @property
    def backend(self) -> str:
        return self.layer.sparse_config[self.adapter_name].kernel_backend

    @torch.no_grad()
    def finish(self, optimizer: Optional[torch.optim.Optimizer], choices: Optional[torch.Tensor] = None) -> int:
        """Grow (``choices``, if given, are the growth choices already computed) and write the new entries, their
        values, ages and optimizer state; returns how many slots changed."""
        if choices is None:
            choices = self.grow(self.excluded, self.k) if self.drop.numel() else self.drop
        return self.layer._write_reselection(self, optimizer, choices)


# reselect_together plans and grows at most about this many entries at a time: the kept positions (int64) and their
# exact scores (float64) of every delta in a group are held together.
RESELECT_TOGETHER_ENTRIES = 1 << 24


@torch.no_grad()
def reselect_together(
    due: list[tuple[SpIELLayer, str, int]],
    optimizer: Optional[torch.optim.Optimizer],
    max_entries: Optional[int] = None,
) -> list[int]:
    """``layer.reselect(adapter_name, optimizer, step)`` for every ``(layer, adapter_name, step)`` of ``due``, in
    order, with the SpIEL-MA growth of each group of adapters on one device and kernel backend computed by one
    ``grow_by_momentum_approximation_many`` call (the same positions as one call per adapter, with a few host reads
    per distinct weight shape instead of about ten per adapter). Groups hold at most about ``max_entries`` entries
    (a group's drop plans live until its growth is done; default ``RESELECT_TOGETHER_ENTRIES``). Returns each
    adapter's count of changed slots."""
    max_entries = RESELECT_TOGETHER_ENTRIES if max_entries is None else max_entries
    changed: list[int] = []
    group: list[tuple[SpIELLayer, str, int]] = []
    entries = 0
    for item in due:
        group.append(item)
        entries += item[0].sparse_values[item[1]].numel()
        if entries >= max_entries:
            changed += _reselect_group(group, optimizer)
            group, entries = [], 0
    return changed + _reselect_group(group, optimizer)


def _reselect_group(due: list[tuple[SpIELLayer, str, int]], optimizer: Optional[torch.optim.Optimizer]) -> list[int]:
    plans = [layer.plan_reselection(adapter_name, step) for layer, adapter_name, step in due]
    groups: dict[tuple[str, str], list[int]] = {}
    for i, plan in enumerate(plans):
        if plan.momentum is not None and plan.drop.numel():
            groups.setdefault((str(plan.excluded.device), plan.backend), []).append(i)
    choices: dict[int, torch.Tensor] = {}
    for (_, backend), members in groups.items():
        grown = grow_by_momentum_approximation_many(
            [plans[i].momentum[0] for i in members],
            [plans[i].momentum[1] for i in members],
            [plans[i].excluded for i in members],
            [plans[i].k for i in members],
            backend,
        )
        choices.update(zip(members, grown))
    return [plan.finish(optimizer, choices.get(i)) for i, plan in enumerate(plans)]


class SpIELLinear(nn.Module, SpIELLayer):
    """SpIEL on ``nn.Linear`` or transformers' ``Conv1D``."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: Any, layer_key: str = "") -> None:
        super().__init__()
        SpIELLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, layer_key)

    forward = SparseDeltaLayer.forward

    def __repr__(self) -> str:
        return "spiel." + super().__repr__()


def check_training_state(
    tensors: dict[str, torch.Tensor], weight_shape: tuple[int, int], selection: str, where: str
) -> None:
    """Raise ValueError (naming ``where``, the tensor and the value) unless checkpoint training state ``tensors``
    (keyed by role: ``step``, ``row_stats``, ...) has the dtypes, shapes, ranges and finiteness that resuming a
    ``selection`` run needs. Missing roles are fine (a fresh state is used)."""
    rows, cols = weight_shape
    step = tensors.get("step")
    if step is not None:
        if step.dtype.is_floating_point or step.dtype == torch.bool or step.dtype.is_complex or step.dim() != 0:
            raise ValueError(
                f"{where}: spiel_step must be a 0-d integer tensor, got dtype {step.dtype} and shape "
                f"{tuple(step.shape)}"
            )
        if int(step) < 0:
            raise ValueError(f"{where}: spiel_step must be non-negative, got {int(step)}")
    expected = {"row_stats": rows if selection == "ma" else 0, "col_stats": cols if selection == "ma" else 0}
    for role in ("row_stats", "col_stats", "candidate_grad", "candidate_sq"):
        tensor = tensors.get(role)
        if tensor is None:
            continue
        if not tensor.dtype.is_floating_point or tensor.dim() != 1:
            raise ValueError(
                f"{where}: spiel_{role} must be a 1-D floating-point tensor, got dtype {tensor.dtype} and shape "
                f"{tuple(tensor.shape)}"
            )
        if not torch.isfinite(tensor).all():
            raise ValueError(f"{where}: spiel_{role} holds non-finite values (NaN or inf)")
        if role != "candidate_grad" and tensor.numel() and float(tensor.min()) < 0:
            raise ValueError(f"{where}: spiel_{role} holds a negative value {float(tensor.min())}; it sums squares")
        if role in expected and tensor.numel() != expected[role]:
            raise ValueError(
                f"{where}: spiel_{role} has {tensor.numel()} entries, selection={selection!r} needs "
                f"{expected[role]} (was the adapter trained with another selection?)"
            )
    k = tensors["values"].numel() if "values" in tensors else None
    age = tensors.get("age")
    if age is not None:
        if age.dtype.is_floating_point or age.dtype == torch.bool or age.dtype.is_complex or age.dim() != 1:
            raise ValueError(
                f"{where}: spiel_age must be a 1-D integer tensor, got dtype {age.dtype} and shape {tuple(age.shape)}"
            )
        if k is not None and age.numel() != k:
            raise ValueError(f"{where}: spiel_age has {age.numel()} entries, expected {k} (one per value)")
        if age.numel() and int(age.min()) < 0:
            raise ValueError(f"{where}: spiel_age must be non-negative, got {int(age.min())}")
    anchor = tensors.get("anchor")
    if anchor is not None:
        if not anchor.dtype.is_floating_point or anchor.dim() != 1:
            raise ValueError(
                f"{where}: spiel_anchor must be a 1-D floating-point tensor, got dtype {anchor.dtype} and shape "
                f"{tuple(anchor.shape)}"
            )
        if k is not None and anchor.numel() not in (0, k):
            raise ValueError(f"{where}: spiel_anchor has {anchor.numel()} entries, expected 0 or {k}")
        if not torch.isfinite(anchor).all():
            raise ValueError(f"{where}: spiel_anchor holds non-finite values (NaN or inf)")
    roles = ("candidates", "candidate_grad", "candidate_sq")
    sizes = {tensors[r].numel() for r in roles if r in tensors}
    if len(sizes) > 1:
        raise ValueError(f"{where}: growth candidates and their statistics differ in length: {sorted(sizes)}")
    candidates = tensors.get("candidates")
    if candidates is not None and candidates.numel():
        if selection != "ag":
            raise ValueError(
                f"{where}: spiel_candidates holds {candidates.numel()} AG growth candidates, but selection="
                f"{selection!r} (was the adapter trained with another selection?)"
            )
        if candidates.dim() != 1:
            raise ValueError(f"{where}: spiel_candidates must be 1-D, got shape {tuple(candidates.shape)}")
        check_delta(candidates, torch.zeros(candidates.numel()), weight_shape, f"{where} (growth candidates)")


def _accumulate(sums: dict[str, torch.Tensor], adapter: str, tensor: torch.Tensor) -> None:
    if adapter in sums:
        sums[adapter] += tensor
    else:
        sums[adapter] = tensor
