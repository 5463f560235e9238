"""Composing sparse fine-tunings, and turning a dense fine-tune into one (thesis §4.3.2, eq. 7.9).

Composition is addition: ``theta0 + sum_j w_j * phi_j``. ``compose_adapters`` does it on saved adapters (SpIEL or
LT-SFT, in any mix) and writes one LT-SFT adapter; ``PeftModel.add_weighted_adapter`` does it in memory.
``sparsify`` makes an LT-SFT adapter from the top-K of the difference between a fine-tuned and a base model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

from ._atomic import replace_directory
from .delta import check_delta, combine
from .selection.topk import ChangeSource, largest_changes, largest_changes_per_tensor
from .tuners.ltsft import LTSFTConfig
from .tuners.ltsft.layer import supported_module
from .tuners.ltsft.model import _tied_embedding_weight
from .tuners.ltsft.phases import ltsft_tuner

PathLike = str | os.PathLike
Deltas = dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]  # module -> {"weight"/"bias": (indices, values)}

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."
_COMPOSABLE = ("SPIEL", "LTSFT")
_PREFIXES = ("ltsft_", "spiel_", "sparse_")  # container prefixes of saved sparse adapters
_DELTA_ROLES = {
    "values": ("weight", "values"),
    "indices": ("weight", "indices"),
    "bias_values": ("bias", "values"),
    "bias_indices": ("bias", "indices"),
}


# --------------------------------------------------------------------------------------------- composing files
def compose_adapters(
    paths: Sequence[PathLike], weights: Sequence[float] | None = None, output_dir: PathLike = "composed"
) -> Path:
    """Write ``output_dir``: one LT-SFT adapter equal to ``sum_j weights[j] * adapter_j`` (default weights 1).

    Every input is a saved SpIEL or LT-SFT adapter directory. Positions are united and overlapping values summed
    (float32). SpIEL training state is dropped. Dense ``modules_to_save`` heads are copied unweighted from the one
    adapter that has them; two adapters with the same head are an error. Returns ``output_dir``.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("compose_adapters needs at least one adapter path")
    weights = [1.0] * len(paths) if weights is None else [float(w) for w in weights]
    if len(weights) != len(paths):
        raise ValueError(f"got {len(paths)} adapters but {len(weights)} weights")
    modules: dict[str, dict[str, list]] = {}  # module -> {"weight": [((idx, val), w)], "bias": [...]}
    shapes: dict[str, tuple[int, ...]] = {}
    heads: dict[str, torch.Tensor] = {}
    head_source: dict[str, Path] = {}
    configs = []
    for path, weight in zip(paths, weights):
        config, tensors = read_adapter(path)
        configs.append(config)
        deltas, module_shapes, other = split_adapter_tensors(tensors, path)
        for module, kinds in deltas.items():
            shape = module_shapes.get(module)
            if shape is not None:
                if shapes.get(module) not in (None, shape):
                    raise ValueError(
                        f"{path}: module {module!r} has shape {shape}, another adapter has {shapes[module]}"
                    )
                shapes[module] = shape
            for kind, delta in kinds.items():
                modules.setdefault(module, {}).setdefault(kind, []).append((delta, weight))
        for key, tensor in other.items():
            if key in heads:
                raise ValueError(f"{path} and {head_source[key]} both hold {key!r}; dense heads cannot be composed")
            heads[key], head_source[key] = tensor, path
    out: dict[str, torch.Tensor] = {}
    sizes: dict[str, list[int]] = {}
    total = 0
    for module in sorted(modules):
        shape = shapes.get(module)
        if shape is None:
            raise ValueError(f"module {module!r} has no weight shape (ltsft_shape / spiel_shape) in any adapter")
        numel = 1
        for s in shape:
            numel *= s
        for kind, key_values, key_indices in (
            ("weight", "ltsft_values", "ltsft_indices"),
            ("bias", "ltsft_bias_values", "ltsft_bias_indices"),
        ):
            parts = modules[module].get(kind, [])
            if parts:
                indices, values = combine(
                    [p for p, _ in parts], [w for _, w in parts], numel if kind == "weight" else 1
                )
            else:
                indices, values = torch.zeros(0, dtype=torch.int32), torch.zeros(0)
            if kind == "bias":
                indices = indices.to(torch.int32)
            out[f"{KEY_PREFIX}{module}.{key_values}"] = values.contiguous()
            out[f"{KEY_PREFIX}{module}.{key_indices}"] = indices.contiguous()
            sizes.setdefault(module, []).append(int(indices.numel()))
            total += int(indices.numel())
        out[f"{KEY_PREFIX}{module}.ltsft_shape"] = torch.tensor(shape, dtype=torch.int64)
    out.update({k: v.contiguous() for k, v in heads.items()})
    saved_heads = set()
    for config, path in zip(configs, paths):
        if any(src == path for src in head_source.values()):
            saved_heads |= set(config.get("modules_to_save") or [])
    first = configs[0]
    new_config = LTSFTConfig(
        target_modules=sorted(modules),
        modules_to_save=sorted(saved_heads) or None,
        num_tunable_weights=max(1, total),
        delta_sizes=sizes,
        untie_output_embeddings=any(bool(c.get("untie_output_embeddings")) for c in configs),
        base_model_name_or_path=first.get("base_model_name_or_path"),
        revision=first.get("revision"),
        task_type=next((c.get("task_type") for c in configs if c.get("task_type")), None),
        inference_mode=True,
    )
    def fill(directory: Path) -> None:
        new_config.save_pretrained(str(directory))
        save_file(out, str(directory / SAFETENSORS_NAME), metadata={"format": "pt"})

    # config and weights change together: an interruption leaves the old adapter or the new one, never a mix
    return replace_directory(output_dir, fill, (CONFIG_NAME, SAFETENSORS_NAME, BIN_NAME))


def read_adapter(path: PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The ``adapter_config.json`` (as a dict) and tensors of a saved SpIEL or LT-SFT adapter directory."""
    path = Path(path)
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise ValueError(f"{path}: no {CONFIG_NAME}; expected a directory written by save_pretrained")
    config = json.loads(config_file.read_text())
    peft_type = str(config.get("peft_type", ""))
    if peft_type not in _COMPOSABLE:
        raise ValueError(f"{path}: peft_type {peft_type!r} is not a sparse adapter; expected one of {_COMPOSABLE}")
    if (path / SAFETENSORS_NAME).is_file():
        tensors = load_file(str(path / SAFETENSORS_NAME))
    elif (path / BIN_NAME).is_file():
        tensors = torch.load(path / BIN_NAME, map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"{path}: neither {SAFETENSORS_NAME} nor {BIN_NAME} found")
    return config, tensors


def split_adapter_tensors(
    tensors: dict[str, torch.Tensor], where: Any = "adapter"
) -> tuple[Deltas, dict[str, tuple[int, ...]], dict[str, torch.Tensor]]:
    """Split a saved sparse adapter's tensors into deltas per module, weight shapes per module, and the other
    tensors (dense heads). Training state (SpIEL's ``spiel_step``, statistics) is dropped. Raises ValueError for
    incomplete deltas."""
    parts: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    shapes, other = {}, {}
    for key, tensor in tensors.items():
        module, _, attr = key.rpartition(".")
        module = module.removeprefix(KEY_PREFIX)
        prefix = next((p for p in _PREFIXES if attr.startswith(p)), None)
        role = attr[len(prefix) :] if prefix else None
        if role in _DELTA_ROLES:
            kind, field_name = _DELTA_ROLES[role]
            parts.setdefault(module, {}).setdefault(kind, {})[field_name] = tensor
        elif role == "shape":
            shapes[module] = tuple(int(s) for s in tensor.tolist())
        elif prefix is None:
            other[key] = tensor  # a dense head (modules_to_save)
        # anything else is training state (SpIEL's step counter and growth statistics): not part of the delta
    deltas: Deltas = {}
    for module, kinds in parts.items():
        for kind, fields in kinds.items():
            if set(fields) != {"values", "indices"}:
                raise ValueError(
                    f"{where}: module {module!r} has {kind} {sorted(fields)} but not both values and indices"
                )
            if kind == "weight" and module in shapes:
                check_delta(fields["indices"], fields["values"], shapes[module], f"{where}: {module}")
            deltas.setdefault(module, {})[kind] = (fields["indices"], fields["values"])
    return deltas, shapes, other


# --------------------------------------------------------------------------------------------- building adapters
def ltsft_model_from_deltas(
    model: nn.Module,
    deltas: Deltas,
    heads: dict[str, torch.Tensor] | None = None,
    adapter_name: str = "default",
    is_trainable: bool = False,
    **config_kwargs: Any,
) -> PeftModel:
    """Wrap ``model`` in an LT-SFT adapter holding the given deltas (flat row-major indices per module and
    ``weight``/``bias``) and dense ``heads`` (parameter name -> tensor; their modules become ``modules_to_save``).

    Everything is checked before ``model`` is touched; ValueError names the first problems.
    """
    heads = dict(heads or {})
    errors = []
    for module_name, kinds in deltas.items():
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            errors.append(f"{module_name}: no such module in the model")
            continue
        if not supported_module(module):
            errors.append(f"{module_name}: a {type(module).__name__}, which a sparse delta cannot hold")
            continue
        for kind, (indices, values) in kinds.items():
            tensor = getattr(module, kind, None) if kind in ("weight", "bias") else None
            if tensor is None:
                errors.append(f"{module_name}: has no {kind}")
                continue
            try:
                check_delta(indices, values, tuple(tensor.shape), f"{module_name}.{kind}")
            except ValueError as err:
                errors.append(str(err))
    head_modules = _owning_modules(list(heads))
    for name, tensor in heads.items():
        try:
            param = model.get_parameter(name)
        except AttributeError:
            errors.append(f"{name}: no such parameter in the model")
            continue
        if tuple(param.shape) != tuple(tensor.shape):
            errors.append(f"{name}: shape {tuple(tensor.shape)} does not fit the model's {tuple(param.shape)}")
    for module_name in deltas:
        inside = [h for h in head_modules if module_name == h or module_name.startswith(h + ".")]
        if inside:
            errors.append(f"{module_name}: has a sparse delta but lies inside the dense head {inside[0]!r}")
    if errors:
        more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
        raise ValueError("cannot build the sparse adapter: " + "; ".join(errors[:3]) + more)
    total = sum(int(v.numel()) for kinds in deltas.values() for _, v in kinds.values())
    tied = _tied_embedding_weight(model)
    if tied is not None and any(model.get_submodule(m).weight is tied for m in deltas):
        # as the SFT was trained (composable-sft unties and freezes the output embedding): the delta reaches the input
        # embedding only
        config_kwargs.setdefault("untie_output_embeddings", True)
    config = LTSFTConfig(
        target_modules=sorted(deltas),
        modules_to_save=head_modules or None,
        num_tunable_weights=max(1, total),
        inference_mode=True,
        **config_kwargs,
    )
    peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    tuner = ltsft_tuner(peft_model)
    with torch.no_grad():
        for name, layer in tuner._layers(adapter_name):
            for kind, (indices, values) in deltas.get(name, {}).items():
                (layer.set_delta if kind == "weight" else layer.set_bias_delta)(adapter_name, indices, values)
        tuner._record_delta_sizes(adapter_name)
        for name, wrapper in tuner._heads(adapter_name):
            copy = wrapper.modules_to_save[adapter_name]
            for param_name, tensor in heads.items():
                if param_name.startswith(name + "."):
                    copy.get_parameter(param_name[len(name) + 1 :]).copy_(tensor)
    if is_trainable:
        config.inference_mode = False
        tuner.set_requires_grad(adapter_name, True)
        for _, layer in tuner._layers(adapter_name):
            layer.enter_sparse_phase(adapter_name)
    return peft_model


def _owning_modules(param_names: list[str]) -> list[str]:
    """The smallest set of module names that contains every parameter of ``param_names``."""
    owners = sorted({name.rpartition(".")[0] for name in param_names})
    return [m for m in owners if not any(m.startswith(o + ".") for o in owners if o != m)]


def sparsify(
    base_model: nn.Module,
    finetuned_model: nn.Module,
    num_tunable_weights: int,
    target_modules: list[str] | str | None = None,
    modules_to_save: list[str] | None = None,
    selection_scope: str = "global",
    adapter_name: str = "default",
) -> PeftModel:
    """An LT-SFT adapter on ``base_model`` from any dense fine-tune: the ``num_tunable_weights`` entries with the
    largest ``|finetuned - base|`` (exact, ties to the lowest module order and flat index), with values
    ``finetuned - base`` there. ``modules_to_save`` heads are copied from ``finetuned_model``. Targets as in
    ``LTSFTConfig`` (default: every Linear/Conv1D/Embedding of the base model, weights and biases).

    ``base_model`` is wrapped in place (inference mode); ``finetuned_model`` is only read.
    """
    config = LTSFTConfig(
        target_modules=target_modules,
        modules_to_save=modules_to_save,
        num_tunable_weights=num_tunable_weights,
        selection_scope=selection_scope,
        inference_mode=True,
    )
    peft_model = get_peft_model(base_model, config, adapter_name=adapter_name)
    tuner = ltsft_tuner(peft_model)
    try:
        with torch.no_grad():
            _sparsify_into(tuner, finetuned_model, adapter_name)
    except ValueError:
        tuner.unload()
        raise
    return peft_model


def _sparsify_into(tuner: Any, finetuned: nn.Module, adapter: str) -> None:
    config, state = tuner.peft_config[adapter], tuner.ltsft_state[adapter]
    tuned = dict(finetuned.named_parameters(remove_duplicate=False))
    entries, sources = [], []
    for name, layer in tuner._layers(adapter):
        kinds = ["weight"] + (["bias"] if config.include_biases and layer.base_bias is not None else [])
        for kind in kinds:
            base = layer.base_tensor(kind)
            other = tuned.get(f"{name}.{kind}")
            if other is None:
                raise ValueError(f"the fine-tuned model has no parameter {name}.{kind}")
            if other.shape != base.shape:
                raise ValueError(
                    f"{name}.{kind}: shape {tuple(other.shape)} in the fine-tuned model, "
                    f"{tuple(base.shape)} in the base"
                )
            entries.append((layer, kind))
            sources.append(ChangeSource(other.detach().to(base.device), base))
    if config.selection_scope == "global":
        result = largest_changes(sources, state.budget)
    else:
        from .selection import allocate_budgets

        budgets = allocate_budgets([(s.numel, 1) for s in sources], num_tunable_weights=state.budget)
        result = largest_changes_per_tensor(sources, budgets)
    for (layer, kind), source, chosen in zip(entries, sources, result.indices):
        base = layer.base_tensor(kind).detach().reshape(-1)
        values = source.current.reshape(-1)[chosen].float() - base[chosen].float()
        (layer.set_delta if kind == "weight" else layer.set_bias_delta)(adapter, chosen, values)
    tuner._record_delta_sizes(adapter)
    for name, wrapper in tuner._heads(adapter):
        wrapper.modules_to_save[adapter].load_state_dict(finetuned.get_submodule(name).state_dict())
