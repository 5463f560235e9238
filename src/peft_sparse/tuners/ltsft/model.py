"""LTSFTModel: the PEFT tuner of LT-SFT; injection, the two phases, the L1 term, composition."""

from __future__ import annotations

import copy
import logging
import time
import warnings
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import ModulesToSaveWrapper
from torch import nn

from ...delta import combine
from ...selection import allocate_budgets
from ...selection.topk import ChangeSource, largest_changes, largest_changes_per_tensor
from ..loading import ModelSnapshot
from ..sparse_model import SparseTunerModel, _sparse_layers
from .layer import DENSE, SPARSE, LTSFTLayer, LTSFTModule, supported_module

logger = logging.getLogger("peft_sparse.ltsft")


@dataclass
class LTSFTState:
    """Bookkeeping of one adapter: the budget, the current iteration and what rewinding needs for the heads."""

    budget: int
    maskable: int
    num_model_parameters: int
    iteration: int = 1
    n_iterations: int = 1
    head_start: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    def iteration_budget(self, iteration: int) -> int:
        """Entries selected at ``iteration`` (1-based): K // n, the last one takes the remainder."""
        share = self.budget // self.n_iterations
        return share + (self.budget - share * self.n_iterations if iteration == self.n_iterations else 0)


@dataclass
class SelectionReport:
    """What ``select_and_rewind`` chose. ``per_module`` maps ``module.weight`` / ``module.bias`` to a count."""

    adapter_name: str
    iteration: int
    n_iterations: int
    selected: int
    total: int
    maskable: int
    threshold: float
    ties: int
    per_module: dict[str, int]
    seconds: float
    scope: str

    def __str__(self) -> str:
        top = sorted(self.per_module.items(), key=lambda kv: -kv[1])[:5]
        listed = ", ".join(f"{name} {count:,}" for name, count in top if count)
        return (
            f"LT-SFT selection [{self.adapter_name}] iteration {self.iteration}/{self.n_iterations}: "
            f"{self.selected:,} entries ({self.scope}), {self.total:,} in the adapter = "
            f"{100.0 * self.total / max(1, self.maskable):.3f}% of {self.maskable:,} targeted entries; "
            f"smallest selected |theta1 - theta0| = {self.threshold:.3e} ({self.ties} selected at that value); "
            f"{self.seconds:.2f} s. Most selected: {listed or 'none'}"
        )


class LTSFTModel(SparseTunerModel):
    """Creates an LT-SFT model from a pretrained transformers model (``get_peft_model`` with an ``LTSFTConfig``).

    A freshly created trainable adapter starts in the dense phase; see ``peft_sparse.tuners.ltsft`` for the recipe.
    """

    prefix: str = "ltsft_"
    tuner_layer_cls = LTSFTLayer
    layer_cls = LTSFTModule

    def __init__(self, model: nn.Module, config: Any, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        self.ltsft_state: dict[str, LTSFTState] = {}
        self.last_l1_penalty: torch.Tensor | None = None
        self._l1_hook = None
        self._warned: set[str] = set()
        from .phases import install_progress_callback

        install_progress_callback()
        super().__init__(model, config, adapter_name, *args, **kwargs)

    # ----------------------------------------------------------------------------------------- injection
    def _prepare_adapter_config(self, peft_config: Any, model_config: dict) -> Any:
        return peft_config  # target_modules=None is resolved from the model itself in _prepare_model

    def _prepare_model(self, peft_config: Any, model: nn.Module) -> None:
        if peft_config.untie_output_embeddings:
            _untie_output_embeddings(model)
        if peft_config.target_modules is None:
            peft_config.target_modules = default_target_modules(model, peft_config.modules_to_save)

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        config = self.peft_config[adapter_name]
        dense = [a for a in self.ltsft_state if self.phase(a) == DENSE]
        if dense and not config.inference_mode:
            raise ValueError(
                f"adapter {dense[0]!r} is in the LT-SFT dense phase, which trains the base weights; finish it "
                f"(select_and_rewind) before adding the trainable adapter {adapter_name!r}"
            )
        num_parameters = count_model_parameters(model)
        snapshot = ModelSnapshot(model)  # any failure below puts the model back as it was
        try:
            BaseTuner.inject_adapter(self, model, adapter_name, *args, **kwargs)
            self._init_adapter(model, adapter_name, num_parameters)
        except Exception:
            snapshot.restore()
            self.peft_config.pop(adapter_name, None)
            self.ltsft_state.pop(adapter_name, None)
            raise
        self._ensure_l1_hook()

    def _init_adapter(self, model: nn.Module, adapter_name: str, num_parameters: int) -> None:
        config = self.peft_config[adapter_name]
        layers = self._layers(adapter_name)
        # the exact module names: PEFT may have shortened a long list to suffixes such as "embed_tokens", which would
        # make save_pretrained store whole embedding matrices next to the deltas
        config.target_modules = {name for name, _ in layers}
        _check_no_shared_weights(model, layers)
        maskable = sum(_maskable_numel(layer, config) for _, layer in layers)
        budget = config.num_tunable_weights
        if budget is None:
            budget = max(1, min(maskable, round(config.density * maskable)))
        if budget > maskable:
            raise ValueError(f"num_tunable_weights={budget} exceeds the {maskable} entries of the targeted modules")
        state = LTSFTState(budget, maskable, num_parameters, n_iterations=config.n_iterations)
        self.ltsft_state[adapter_name] = state
        if config.inference_mode:
            state.iteration = config.n_iterations
            self._allocate_recorded_sizes(adapter_name)
        else:
            config.delta_sizes = None
            self._enter_dense_phase(adapter_name)

    def _allocate_recorded_sizes(self, adapter_name: str) -> None:
        # zero deltas of the saved sizes (placeholder positions 0..k-1), which the checkpoint's tensors then replace
        sizes = self.peft_config[adapter_name].delta_sizes or {}
        for name, layer in self._layers(adapter_name):
            weight_k, bias_k = sizes.get(name, (0, 0))
            # made on the base weight's device: with low_cpu_mem_usage the injected values live on "meta"
            dtype = layer.deltas_of(adapter_name)["weight"][1].dtype
            device = layer.get_base_layer().weight.device
            layer.set_delta(adapter_name, torch.arange(weight_k), torch.zeros(weight_k, dtype=dtype, device=device))
            if bias_k and layer.base_bias is not None:
                zeros = torch.zeros(bias_k, dtype=dtype, device=device)
                layer.set_bias_delta(adapter_name, torch.arange(bias_k), zeros)

    def _record_delta_sizes(self, adapter_name: str) -> None:
        """Store the current delta sizes in the adapter's config (saved with it, see ``LTSFTConfig.delta_sizes``)."""
        sizes = {}
        for name, layer in self._layers(adapter_name):
            deltas = layer.deltas_of(adapter_name)
            sizes[name] = [int(deltas["weight"][1].numel()), int(deltas["bias"][1].numel()) if "bias" in deltas else 0]
        self.peft_config[adapter_name].delta_sizes = sizes

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: Any, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        state_dict = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        tuner = getattr(model, "base_model", model)
        state = getattr(tuner, "ltsft_state", {}).get(adapter_name)
        if state is not None:  # a loaded adapter is finished: no further iterations, heads come from the file
            state.iteration, state.head_start = state.n_iterations, {}
            tuner._record_delta_sizes(adapter_name)
        return state_dict

    @classmethod
    def _get_adapter_state_dict(
        cls, model: nn.Module, config: Any, adapter_name: str, state_dict: dict, unwanted_adapter_names: list
    ) -> dict[str, torch.Tensor]:
        tuner = getattr(model, "base_model", None)
        if isinstance(tuner, LTSFTModel) and adapter_name in tuner.ltsft_state and tuner.phase(adapter_name) == DENSE:
            warnings.warn(
                f"saving LT-SFT adapter {adapter_name!r} in its dense phase: it has no deltas yet, so the file holds "
                "empty deltas (the base weights being trained are not saved). Call "
                "peft_sparse.ltsft.select_and_rewind(model) first to save the sparse fine-tuning.",
                stacklevel=4,
            )
        return super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        super()._mark_only_adapters_as_trainable(model)
        for adapter in getattr(self, "ltsft_state", {}):
            for _, layer in self._layers(adapter):
                for kind in layer.ltsft_theta0.get(adapter, {}):
                    layer.base_tensor(kind).requires_grad_(True)

    def _layers(self, adapter_name: str) -> list[tuple[str, LTSFTLayer]]:
        return [(n, m) for n, m in _sparse_layers(self.model) if adapter_name in m.sparse_config]

    def _heads(self, adapter_name: str) -> list[tuple[str, ModulesToSaveWrapper]]:
        return [
            (n, m)
            for n, m in self.model.named_modules()
            if isinstance(m, ModulesToSaveWrapper) and adapter_name in m.modules_to_save
        ]

    # ----------------------------------------------------------------------------------------- phases
    def phase(self, adapter_name: str) -> str:
        """``"dense"`` or ``"sparse"``: the LT-SFT phase ``adapter_name`` is in."""
        for _, layer in self._layers(adapter_name):
            return layer.ltsft_phase.get(adapter_name, SPARSE)
        return SPARSE

    def _adapter_in(self, phase: str, adapter_name: str | None) -> str:
        if adapter_name is not None:
            if adapter_name not in self.ltsft_state:
                raise ValueError(f"no LT-SFT adapter named {adapter_name!r}; available: {sorted(self.ltsft_state)}")
            if self.phase(adapter_name) != phase:
                raise ValueError(f"adapter {adapter_name!r} is in the {self.phase(adapter_name)} phase, not {phase}")
            return adapter_name
        candidates = [a for a in self.ltsft_state if self.phase(a) == phase]
        if not candidates:
            raise ValueError(f"no LT-SFT adapter is in the {phase} phase")
        return candidates[0]

    def _enter_dense_phase(self, adapter_name: str) -> None:
        config = self.peft_config[adapter_name]
        for _, layer in self._layers(adapter_name):
            if layer.merged:
                raise ValueError("unmerge the adapters before starting an LT-SFT dense phase")
            layer.enter_dense_phase(adapter_name, config.theta0_device)
        # the heads are rewound to their values at the start of this dense phase
        self.ltsft_state[adapter_name].head_start = {
            name: {k: v.detach().clone() for k, v in wrapper.modules_to_save[adapter_name].state_dict().items()}
            for name, wrapper in self._heads(adapter_name)
        }

    def start_dense_phase(self, adapter_name: str | None = None) -> int:
        """Begin the next LT-SFT iteration (``n_iterations`` > 1): the current deltas are added into the base weights,
        which train densely again. Returns the iteration number."""
        if adapter_name is None:
            unfinished = [
                a
                for a, s in self.ltsft_state.items()
                if s.iteration < s.n_iterations and not self.peft_config[a].inference_mode
            ]
            adapter_name = unfinished[0] if unfinished else None
        adapter = self._adapter_in(SPARSE, adapter_name)
        state = self.ltsft_state[adapter]
        if state.iteration >= state.n_iterations:
            raise ValueError(
                f"adapter {adapter!r} has finished all its n_iterations={state.n_iterations} LT-SFT iterations"
            )
        if self.peft_config[adapter].inference_mode:
            raise ValueError(f"adapter {adapter!r} is in inference mode")
        state.iteration += 1
        self._enter_dense_phase(adapter)
        logger.info("LT-SFT [%s]: dense phase of iteration %d/%d", adapter, state.iteration, state.n_iterations)
        return state.iteration

    @torch.no_grad()
    def select_and_rewind(self, adapter_name: str | None = None, verbose: bool = True) -> SelectionReport:
        """End the dense phase: select the entries that changed most, rewind, and start the sparse phase.

        Selects ``K / n_iterations`` new positions (the last iteration the remainder) with the largest
        ``|theta1 - theta0|``, exactly, ties to the lowest (module order, flat index); scope ``global`` or
        ``per_tensor``. Every targeted weight and bias goes back to its value at the start of the dense phase, the
        ``modules_to_save`` heads too; then only the selected values train (with a fresh optimizer). Returns a
        ``SelectionReport`` (also logged, and printed when ``verbose``).
        """
        started = time.perf_counter()
        adapter = self._adapter_in(DENSE, adapter_name)
        config, state = self.peft_config[adapter], self.ltsft_state[adapter]
        layers = self._layers(adapter)
        entries = [(name, layer, kind) for name, layer in layers for kind in layer.ltsft_theta0[adapter]]
        sources = [
            ChangeSource(layer.base_tensor(kind), layer.theta0(adapter, kind), layer.deltas_of(adapter)[kind][0])
            for _, layer, kind in entries
        ]
        k = state.iteration_budget(state.iteration)
        if config.selection_scope == "global":
            result = largest_changes(sources, k)
        else:
            finals = allocate_budgets([(s.numel, 1) for s in sources], num_tunable_weights=state.budget)
            per_iteration = [
                LTSFTState(b, 0, 0, n_iterations=state.n_iterations).iteration_budget(state.iteration) for b in finals
            ]
            result = largest_changes_per_tensor(sources, per_iteration)
        per_module, total = {}, 0
        for (name, layer, kind), chosen in zip(entries, result.indices):
            tensor = layer.base_tensor(kind)
            tensor.copy_(layer.theta0(adapter, kind))  # rewind
            old_indices, old_values = layer.deltas_of(adapter)[kind]
            indices = torch.cat([old_indices.long(), chosen.to(old_indices.device)])
            values = torch.cat([old_values, old_values.new_zeros(chosen.numel())])
            order = torch.argsort(indices)
            (layer.set_delta if kind == "weight" else layer.set_bias_delta)(adapter, indices[order], values[order])
            per_module[f"{name}.{kind}"] = int(chosen.numel())
            total += int(indices.numel())
        for _, layer in layers:
            layer.enter_sparse_phase(adapter)
        for name, wrapper in self._heads(adapter):
            wrapper.modules_to_save[adapter].load_state_dict(state.head_start[name])
        state.head_start = {}
        self._record_delta_sizes(adapter)
        report = SelectionReport(
            adapter,
            state.iteration,
            state.n_iterations,
            result.count,
            total,
            state.maskable,
            result.threshold,
            result.ties,
            per_module,
            time.perf_counter() - started,
            config.selection_scope,
        )
        logger.info("%s", report)
        if verbose:
            print(report)
        return report

    # ----------------------------------------------------------------------------------------- L1 term
    def l1_penalty(self) -> torch.Tensor | None:
        """``sum over active adapters of lambda / N * sum |theta - theta0|`` (float32, differentiable), or None.

        Dense phase: over the targeted weights and biases (lambda = ``dense_l1_reg``); sparse phase: over the values,
        which are ``theta - theta0`` (lambda = ``sparse_l1_reg``). N = number of model parameters.
        """
        total = None
        for adapter in self.active_adapters:
            state, config = self.ltsft_state.get(adapter), self.peft_config.get(adapter)
            if state is None or config is None or config.inference_mode:
                continue
            dense = self.phase(adapter) == DENSE
            lam = config.dense_l1_reg if dense else config.sparse_l1_reg
            if not lam:
                continue
            terms = []
            for _, layer in self._layers(adapter):
                if dense:
                    for kind in layer.ltsft_theta0[adapter]:
                        terms.append(l1_distance(layer.base_tensor(kind), layer.theta0(adapter, kind)))
                else:
                    for _, values in layer.deltas_of(adapter).values():
                        if values.numel():
                            terms.append(values.float().abs().sum())
            if not terms:
                continue
            device = terms[0].device
            term = torch.stack([t.to(device) for t in terms]).sum() * (float(lam) / state.num_model_parameters)
            total = term if total is None else total + term.to(total.device)
        return total

    def _ensure_l1_hook(self) -> None:
        if self._l1_hook is not None:
            return
        tuner = weakref.ref(self)

        def add_l1_to_loss(module, args, kwargs, output):
            owner = tuner()
            return None if owner is None else owner._add_l1_to_loss(module, kwargs, output)

        self._l1_hook = self.model.register_forward_hook(add_l1_to_loss, with_kwargs=True)

    def _add_l1_to_loss(self, module: nn.Module, kwargs: dict, output: Any) -> Any:
        # The term goes into the model's loss, so gradient accumulation, fp16 loss scaling and autocast treat it like
        # the task loss. When the loss is a share of a larger batch (num_items_in_batch), the term gets the same share.
        if not (module.training and torch.is_grad_enabled()):
            return None
        if isinstance(output, Mapping):
            loss = output.get("loss")
        elif isinstance(output, tuple) and kwargs.get("labels") is not None and output and torch.is_tensor(output[0]):
            loss = output[0]
        else:
            loss = None
        if loss is None or loss.dim() != 0:
            return None
        penalty = self.l1_penalty()
        if penalty is None:
            return None
        share = self._micro_batch_share(kwargs)
        if share is not None:
            penalty = penalty * share
        self.last_l1_penalty = penalty.detach()
        new_loss = loss + penalty.to(loss.device)
        if isinstance(output, Mapping):
            output["loss"] = new_loss
            return output
        return (new_loss,) + tuple(output[1:])

    def _micro_batch_share(self, kwargs: dict) -> torch.Tensor | None:
        total = kwargs.get("num_items_in_batch")
        if total is None:
            return None
        labels = kwargs.get("shift_labels")
        if labels is None:
            labels = kwargs.get("labels")
            if labels is None:
                self._warn_once("share", "num_items_in_batch was given without labels; the L1 term is added whole")
                return None
            if _loss_shifts_labels(self.model):
                labels = labels[..., 1:]
        count = labels.ne(-100).sum().float()
        return count / (total.to(count.device).float() if torch.is_tensor(total) else float(total))

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=3)

    # ----------------------------------------------------------------------------------------- composition
    def add_weighted_adapter(self, adapters: Sequence[str], weights: Sequence[float], adapter_name: str) -> None:
        """Add ``adapter_name`` = sum of ``weights[j] * adapters[j]`` (weights and biases): union of positions,
        overlapping values summed. ``modules_to_save`` heads are copied unweighted from the one adapter that has them
        (two adapters with a head for the same module are an error). The new adapter is not made active."""
        adapters, weights = self._check_weighted_adapter_args(adapters, weights, adapter_name)
        dense = [a for a in adapters if self.phase(a) == DENSE]
        if dense:
            raise ValueError(f"adapters {dense} are in the LT-SFT dense phase and have no deltas yet")
        head_owner: dict[str, str] = {}
        for adapter in adapters:
            for name, _ in self._heads(adapter):
                if name in head_owner:
                    raise ValueError(
                        f"adapters {head_owner[name]!r} and {adapter!r} both have a head for {name!r}; "
                        "add_weighted_adapter cannot combine dense heads"
                    )
                head_owner[name] = adapter
        configs = [self.peft_config[a] for a in adapters]
        new_config = copy.deepcopy(configs[0])
        targets = [c.target_modules for c in configs]
        if all(isinstance(t, (set, list)) for t in targets):
            new_config.target_modules = set().union(*targets)
        saved = [set(self.peft_config[a].modules_to_save or []) for a in sorted(set(head_owner.values()))]
        new_config.modules_to_save = sorted(set().union(*saved)) or None
        new_config.untie_output_embeddings = any(c.untie_output_embeddings for c in configs)
        self.peft_config[adapter_name] = new_config
        total = 0
        for name, layer in _sparse_layers(self.model):
            present = [(a, w) for a, w in zip(adapters, weights) if a in layer.sparse_values]
            if not present:
                continue
            layer.update_layer(adapter_name, new_config, name)
            for kind in ("weight", "bias"):
                parts = [(layer.deltas_of(a)[kind], w) for a, w in present if kind in layer.deltas_of(a)]
                if not parts:
                    continue
                numel = layer.base_tensor(kind).numel()
                indices, values = combine([p for p, _ in parts], [w for _, w in parts], numel)
                (layer.set_delta if kind == "weight" else layer.set_bias_delta)(adapter_name, indices, values)
                total += int(indices.numel())
            layer.set_adapter(layer.active_adapters)
        for name, adapter in head_owner.items():
            wrapper = self.model.get_submodule(name)
            wrapper.update(adapter_name)
            wrapper.modules_to_save[adapter_name].load_state_dict(wrapper.modules_to_save[adapter].state_dict())
        new_config.num_tunable_weights, new_config.density = max(1, total), None
        state = LTSFTState(max(1, total), max(1, total), self.ltsft_state[adapters[0]].num_model_parameters)
        self.ltsft_state[adapter_name] = state
        self._record_delta_sizes(adapter_name)

    # ----------------------------------------------------------------------------------------- cleanup
    def delete_adapter(self, adapter_name: str) -> None:
        """Delete ``adapter_name``; deleting an adapter in the dense phase first rewinds the base weights."""
        if adapter_name in self.ltsft_state and self.phase(adapter_name) == DENSE:
            with torch.no_grad():
                for _, layer in self._layers(adapter_name):
                    for kind in list(layer.ltsft_theta0.get(adapter_name, {})):
                        layer.base_tensor(kind).copy_(layer.theta0(adapter_name, kind))
                    layer.enter_sparse_phase(adapter_name)
        super().delete_adapter(adapter_name)
        self.ltsft_state.pop(adapter_name, None)

    def _unload_and_optionally_merge(self, *args: Any, **kwargs: Any) -> nn.Module:
        dense = [a for a in self.ltsft_state if self.phase(a) == DENSE]
        if dense:
            raise ValueError(
                f"adapter {dense[0]!r} is in the LT-SFT dense phase; call select_and_rewind (or delete_adapter, which "
                "rewinds the base weights) before unloading"
            )
        model = super()._unload_and_optionally_merge(*args, **kwargs)
        if self._l1_hook is not None:
            self._l1_hook.remove()
            self._l1_hook = None
        self.ltsft_state.clear()
        return model


# --------------------------------------------------------------------------------------------- helpers
class _L1Distance(torch.autograd.Function):
    """``sum |param - reference|`` in float32 without keeping a full-size temporary for the backward."""

    @staticmethod
    def forward(ctx, param: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(param, reference)
        return (param.detach().float() - reference.float()).abs().sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        param, reference = ctx.saved_tensors
        sign = torch.sign(param.detach().float() - reference.float())
        return (grad * sign).to(param.dtype), None


def l1_distance(param: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``sum |param - reference|`` (float32), differentiable w.r.t. ``param``; ``reference`` is moved next to it."""
    return _L1Distance.apply(param, reference.to(param.device))


def count_model_parameters(model: nn.Module) -> int:
    """Parameters of the model itself (shared ones once), not counting adapter values or copies of heads."""
    seen, total = set(), 0
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            for name in module.adapter_layer_names:
                container = getattr(module, name, None)
                seen |= {id(p) for p in container.parameters()} if isinstance(container, nn.Module) else set()
        elif isinstance(module, ModulesToSaveWrapper):
            seen |= {id(p) for p in module.modules_to_save.parameters()}
    for param in model.parameters():
        if id(param) not in seen:
            seen.add(id(param))
            total += param.numel()
    return total


def default_target_modules(model: nn.Module, modules_to_save: list[str] | None = None) -> set[str]:
    """Names of every nn.Linear / Conv1D / nn.Embedding of the base model (``model.base_model``: the pretrained body
    without the task or LM head), or of the whole model when it has no separate body. A module whose weight is
    shared with one already listed (tied weights) is left out."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    body = getattr(model, prefix, None) if prefix else None
    scope = f"{prefix}." if isinstance(body, nn.Module) and body is not model else ""
    saved = list(modules_to_save or [])
    tied = _tied_embedding_weight(model)
    names, seen, wrapped = [], set(), []
    for name, module in model.named_modules():
        if any(name.startswith(w + ".") for w in wrapped) or not name.startswith(scope):
            continue
        if isinstance(module, BaseTunerLayer):  # already adapted (another adapter): target the wrapper
            wrapped.append(name)
            if not isinstance(module, LTSFTLayer):
                continue
            module = module.get_base_layer()
        if not supported_module(module):
            continue
        if any(name == m or name.endswith(f".{m}") or f".{m}." in f".{name}" for m in saved):
            continue
        if id(module.weight) in seen:
            continue
        seen.add(id(module.weight))
        if tied is not None and module.weight is tied:
            logger.warning(
                "LT-SFT leaves %s out of the default targets: its weight is tied to the output embedding. Set "
                "untie_output_embeddings=True to target it (the output embedding keeps a frozen copy).",
                name,
            )
            continue
        names.append(name)
    if not names:
        raise ValueError(
            "found no nn.Linear, nn.Embedding or Conv1D module to target" + (f" under {prefix!r}" if scope else "")
        )
    return set(names)


def _untie_output_embeddings(model: nn.Module) -> None:
    # The output embedding gets its own frozen copy, so the dense phase trains the input embedding alone.
    if _output_embedding_weight(model) is None:
        return
    output = model.get_output_embeddings()
    output.weight = nn.Parameter(output.weight.detach().clone(), requires_grad=False)
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "tie_word_embeddings", False):
        config.tie_word_embeddings = False
    text_config = getattr(config, "get_text_config", lambda: None)()
    if text_config is not None and getattr(text_config, "tie_word_embeddings", False):
        text_config.tie_word_embeddings = False


def _output_embedding_weight(model: nn.Module) -> torch.Tensor | None:
    get_output = getattr(model, "get_output_embeddings", None)
    try:
        output = get_output() if callable(get_output) else None
    except (NotImplementedError, AttributeError):
        output = None
    weight = getattr(output, "weight", None)
    return weight if isinstance(weight, torch.Tensor) else None


def _tied_embedding_weight(model: nn.Module) -> torch.Tensor | None:
    """The weight shared by the input and output embeddings, or None when they are not tied."""
    output = _output_embedding_weight(model)
    get_input = getattr(model, "get_input_embeddings", None)
    try:
        inputs = get_input() if callable(get_input) else None
    except (NotImplementedError, AttributeError):
        inputs = None
    return output if output is not None and getattr(inputs, "weight", None) is output else None


def _check_no_shared_weights(model: nn.Module, layers: list[tuple[str, LTSFTLayer]]) -> None:
    # A delta on a tied weight would reach only one of its uses, and merging it would change both.
    tied = _tied_embedding_weight(model)
    owners: dict[int, str] = {}
    for name, layer in layers:
        weight = layer.get_base_layer().weight
        if tied is not None and weight is tied:
            raise ValueError(
                f"the weight of {name!r} is tied to the output embedding; set untie_output_embeddings=True (the "
                "output embedding keeps its own frozen copy) or leave the module out of target_modules"
            )
        key = id(weight)
        if key in owners:
            raise ValueError(
                f"modules {owners[key]!r} and {name!r} share one weight (tied embeddings?); target only one of them, "
                "or set untie_output_embeddings=True"
            )
        owners[key] = name


def _maskable_numel(layer: LTSFTLayer, config: Any) -> int:
    numel = layer.get_base_layer().weight.numel()
    if config.include_biases and layer.base_bias is not None:
        numel += layer.base_bias.numel()
    return numel


def _loss_shifts_labels(model: nn.Module) -> bool:
    # mirrors transformers' Trainer: causal-LM losses shift labels, so position 0 is never a target
    try:
        from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss
    except ImportError:  # pragma: no cover
        return False
    config = getattr(model, "config", None)
    encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
    return LOSS_MAPPING.get(getattr(model, "loss_type", None)) is ForCausalLMLoss and not encoder_decoder
