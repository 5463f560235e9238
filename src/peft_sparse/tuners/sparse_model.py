"""The tuner (``BaseTuner``) shared by the sparse methods: injection, budgets, checked loading, composition."""

from __future__ import annotations

import copy
from typing import Any, Iterator, Optional, Sequence

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTuner
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, ModulesToSaveWrapper
from peft.utils.other import _get_submodules
from torch import nn

from ..delta import combine
from ..selection import allocate_budgets
from ..training.distributed import skip_ddp_buffer_broadcast
from .bnb import dequantize_layer
from .loading import AdapterLoadError, ModelSnapshot
from .sparse_layer import SparseDeltaLayer

BUDGET_FIELDS = ("density", "num_tunable_weights", "match_lora_rank")


class SparseTunerModel(BaseTuner):
    """Base of the sparse tuners. Subclasses set ``prefix``, ``tuner_layer_cls`` and ``layer_cls``."""

    layer_cls: type
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def _create_and_replace(
        self,
        peft_config: Any,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        if isinstance(target, self.tuner_layer_cls):
            target.update_layer(adapter_name, peft_config, current_key)
            return
        if isinstance(target, SparseDeltaLayer) or not self.layer_cls.supports(target):
            raise ValueError(
                f"target_modules matches {current_key!r}, a {type(target).__name__}; {self.layer_cls.__name__} "
                f"supports {self.layer_cls.supported_types}"
            )
        new_module = self.layer_cls(target, adapter_name, peft_config, current_key)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        # Budgets depend on all targets together, so deltas are drawn once every target is wrapped. This is done here
        # and not in _post_injection_hook, which PeftModel.add_adapter (a second adapter) never calls.
        # A failure anywhere (a target that cannot be wrapped, an impossible budget) puts the model back as it was.
        snapshot = ModelSnapshot(model)
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
            self._init_deltas(model, adapter_name)
        except Exception:
            snapshot.restore()
            self.peft_config.pop(adapter_name, None)
            raise

    def _init_deltas(self, model: nn.Module, adapter_name: str) -> None:
        config = self.peft_config[adapter_name]
        layers = [m for _, m in _sparse_layers(model) if adapter_name in m.sparse_config]
        budgets = allocate_budgets(
            [m.weight_shape for m in layers],
            config.density,
            config.num_tunable_weights,
            config.match_lora_rank,
            getattr(config, "budget_allocation", "equal_density"),
        )
        if layers and sum(budgets) == 0:
            budget = next(f"{f}={getattr(config, f)!r}" for f in BUDGET_FIELDS if getattr(config, f, None) is not None)
            raise ValueError(f"{budget} gives 0 tunable entries over the {len(layers)} targeted weights")
        for layer, budget in zip(layers, budgets):
            layer.init_delta(adapter_name, budget)
        skip_ddp_buffer_broadcast(model)  # ranks keep the sparse buffers identical themselves

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        super()._mark_only_adapters_as_trainable(model)
        for _, layer in _sparse_layers(model):
            layer.freeze_empty_values()

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        # BaseTuner's version copies child.weight onto a new module without base_layer, which fails when unloading a
        # modules_to_save head that has no .weight (BertLMPredictionHead, RobertaClassificationHead). Our layers are
        # created on the base weight's device, so nothing else is needed (as in LoraModel).
        if isinstance(child, SparseDeltaLayer):  # unloading: hand back the weight without a held merge in it
            child.release_held_merge()
        setattr(parent, child_name, new_module)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        # The values already have the config's delta_dtype; PEFT's default upcast of bf16/fp16 to float32 would
        # silently override a delta_dtype the user chose.
        return

    # ----------------------------------------------------------------------------------------- loading
    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: Any, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        # A saved delta has its own positions and size; they replace the random ones drawn at injection after the
        # whole checkpoint has been checked (every key belongs to this adapter, dtypes, shapes, finiteness, ranges),
        # so a bad file changes nothing.
        state_dict = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        installs, errors, known = [], [], set()
        for name, layer in _sparse_layers(model):
            if adapter_name not in layer.sparse_config:
                continue
            tensors = {}
            for attr in layer.adapter_layer_names + layer.other_param_names:
                key = f"{name}.{attr}.{adapter_name}" if name else f"{attr}.{adapter_name}"
                known.add(key)
                if key in state_dict:
                    tensors[layer.role_of(attr)] = state_dict[key]
            if "values" not in tensors or "indices" not in tensors:
                errors.append(f"{name}: the checkpoint holds no sparse delta for this layer")
                continue
            try:
                layer.validate_loaded(adapter_name, tensors, name)
            except ValueError as err:
                errors.append(str(err))
                continue
            installs.append((layer, tensors))
        errors += _check_heads(model, adapter_name, state_dict, known)
        unknown = sorted(k for k in state_dict if k not in known)
        if unknown:
            more = f" (and {len(unknown) - 3} more)" if len(unknown) > 3 else ""
            errors.append(
                f"keys {unknown[:3]}{more} are not part of this adapter (neither its sparse deltas nor its "
                "modules_to_save); an adapter file may not overwrite base weights"
            )
        if errors:
            more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
            raise AdapterLoadError(f"cannot load sparse adapter {adapter_name!r}: " + "; ".join(errors[:3]) + more)
        for layer, tensors in installs:
            layer.install_loaded(adapter_name, tensors)
        return state_dict

    def merge_and_unload(
        self,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: Optional[list[str]] = None,
        dequantize: bool = False,
    ) -> nn.Module:
        """Merge the deltas into the base weights and return the base model without adapter layers.

        With 4-bit base weights the merge goes into the NF4 weight (lossy; see ``peft_sparse.tuners.bnb``) unless
        ``dequantize=True``, which first turns each adapted 4-bit layer into an ``nn.Linear`` of the compute dtype
        holding the dequantised weight, so the merge is exact.
        """
        if dequantize:
            for _, layer in _sparse_layers(self.model):
                dequantize_layer(layer)
        return super().merge_and_unload(progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names)

    # ----------------------------------------------------------------------------------------- composition
    def _check_weighted_adapter_args(
        self, adapters: Sequence[str], weights: Sequence[float], adapter_name: str
    ) -> tuple[list[str], list[float]]:
        """Validate ``add_weighted_adapter``'s arguments; returns them as lists."""
        adapters, weights = list(adapters), [float(w) for w in weights]
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter_name {adapter_name!r} already exists")
        if not adapters or len(adapters) != len(weights):
            raise ValueError(
                f"need as many weights as adapters, got {len(adapters)} adapters and {len(weights)} weights"
            )
        missing = [a for a in adapters if a not in self.peft_config]
        if missing:
            raise ValueError(f"adapters {missing} do not exist; available: {sorted(self.peft_config)}")
        return adapters, weights

    def add_weighted_adapter(self, adapters: Sequence[str], weights: Sequence[float], adapter_name: str) -> None:
        """Add ``adapter_name`` = sum of ``weights[j] * adapters[j]``: union of positions, overlapping values summed.

        The new adapter is not made active (call ``set_adapter``). Adapters with ``modules_to_save`` cannot be
        combined (their dense heads have no sparse sum).
        """
        adapters, weights = self._check_weighted_adapter_args(adapters, weights, adapter_name)
        configs = [self.peft_config[a] for a in adapters]
        with_heads = [a for a, c in zip(adapters, configs) if c.modules_to_save]
        if with_heads:
            raise ValueError(f"adapters {with_heads} have modules_to_save, which add_weighted_adapter cannot combine")
        new_config = copy.deepcopy(configs[0])
        new_config.init_weights = True
        targets = [c.target_modules for c in configs]
        if all(isinstance(t, (set, list)) for t in targets):
            new_config.target_modules = set().union(*targets)
        self.peft_config[adapter_name] = new_config
        for name, layer in _sparse_layers(self.model):
            present = [(a, w) for a, w in zip(adapters, weights) if a in layer.sparse_values]
            if not present:
                continue
            indices, values = combine(
                [(layer.sparse_indices[a], layer.sparse_values[a]) for a, _ in present],
                [w for _, w in present],
                layer.weight_numel,
            )
            layer.update_layer(adapter_name, new_config, name)
            layer.set_delta(adapter_name, indices, values)
            layer.set_adapter(layer.active_adapters)


def _check_heads(model: nn.Module, adapter_name: str, state_dict: dict[str, torch.Tensor], known: set) -> list[str]:
    """Errors for checkpoint tensors of ``adapter_name``'s ``modules_to_save`` copies that do not fit; adds the heads'
    keys to ``known``."""
    errors = []
    for name, module in model.named_modules():
        if not (isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save):
            continue
        prefix = f"{name}.modules_to_save.{adapter_name}."
        for key, current in module.modules_to_save[adapter_name].state_dict(keep_vars=True).items():
            known.add(prefix + key)
            saved = state_dict.get(prefix + key)
            if saved is None:
                continue
            if tuple(saved.shape) != tuple(current.shape):
                errors.append(f"{prefix + key}: shape {tuple(saved.shape)} in the file, {tuple(current.shape)} here")
            elif saved.dtype.is_floating_point != current.dtype.is_floating_point:
                errors.append(f"{prefix + key}: dtype {saved.dtype} in the file, {current.dtype} here")
            elif saved.dtype.is_floating_point and not torch.isfinite(saved).all():
                errors.append(f"{prefix + key}: holds non-finite values")
    return errors


def _sparse_layers(model: nn.Module) -> Iterator[tuple[str, SparseDeltaLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, SparseDeltaLayer):
            yield name, module


def remove_adapter_everywhere(model: nn.Module, adapter_name: str) -> None:
    """Remove ``adapter_name`` from ``model``; layers and heads that held only it go back to the base modules."""
    for name, module in list(model.named_modules()):
        if isinstance(module, SparseDeltaLayer) and adapter_name in module.sparse_config:
            if set(module.sparse_config) == {adapter_name}:
                parent, _, target_name = _get_submodules(model, name)
                setattr(parent, target_name, module.get_base_layer())
            else:
                module.delete_adapter(adapter_name)
        elif isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
            if set(module.modules_to_save) == {adapter_name}:
                parent, _, target_name = _get_submodules(model, name)
                setattr(parent, target_name, module.original_module)
            else:
                module.delete_adapter(adapter_name)
    configs = getattr(model, "peft_config", None)
    if isinstance(configs, dict):
        configs.pop(adapter_name, None)
    for module in model.modules():
        # PEFT copies its config dict onto the wrapped model; left empty there, the next wrap would warn that the
        # model already has adapters
        if not isinstance(module, BaseTuner) and module.__dict__.get("peft_config") == {}:
            del module.peft_config


def sparse_deltas(
    model: nn.Module, adapter_name: Optional[str] = None
) -> Iterator[tuple[str, torch.Tensor, torch.Tensor, tuple[int, int]]]:
    """Yield ``(module_name, indices, values, shape)`` for every sparse delta of ``adapter_name`` (default: the
    active adapters).

    ``indices`` are flat row-major positions into a weight of ``shape`` (the base weight as stored); ``values`` is the
    live trainable tensor. ``module_name`` is relative to the transformers model (no PEFT wrapper prefix).
    """
    base = model
    if isinstance(base, PeftModel):
        base = base.base_model
    if isinstance(base, BaseTuner):
        base = base.model
    for name, layer in _sparse_layers(base):
        adapters = [adapter_name] if adapter_name is not None else layer.active_adapters
        for adapter in adapters:
            if adapter in layer.sparse_values:
                yield name, layer.sparse_indices[adapter], layer.sparse_values[adapter], layer.weight_shape
