"""Adapters saved by the SpIEL reference fork of PEFT (``peft_type: "SFT"``).

Keys ``base_model.model.<module>.sft_delta.values`` (float) and ``.sft_delta.indices`` (int32, flat row-major),
``num_deltas`` (module -> K) in ``adapter_config.json``; ``adapter_model.bin`` by default, or ``.safetensors``.
They load as SpIEL adapters of this package.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn

from ..delta import check_delta
from ..tuners.sparse_layer import DTYPES, supported_weight
from ..tuners.sparse_model import _sparse_layers
from ..tuners.spiel import SpIELConfig

PathLike = str | os.PathLike
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.sft_delta(?:\.[^.]+)?\.(?P<field>values|indices)$")
_TASK_HEADS = {  # task_type -> heads PEFT adds to modules_to_save by itself
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}
_HYPERPARAMETERS = {  # reference config name -> SpIELConfig name
    "reselection_steps": "reselection_steps",
    "selection_accumulation_steps": "accumulation_steps",
    "initial_reselection_rate": "initial_reselection_rate",
}


def read_spiel_reference(path: PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``adapter_config.json`` (a dict) and tensors of a SpIEL-reference adapter directory, checked for peft_type."""
    path = Path(path)
    config_file = path / "adapter_config.json"
    if not config_file.is_file():
        raise ValueError(f"{path}: no adapter_config.json (expected a SpIEL reference adapter directory)")
    config = json.loads(config_file.read_text())
    if config.get("peft_type") != "SFT":
        raise ValueError(f"{config_file}: peft_type is {config.get('peft_type')!r}, the SpIEL reference writes 'SFT'")
    if (path / "adapter_model.safetensors").is_file():
        tensors = load_file(str(path / "adapter_model.safetensors"))
    elif (path / "adapter_model.bin").is_file():
        try:
            tensors = torch.load(path / "adapter_model.bin", map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
            raise ValueError(f"{path / 'adapter_model.bin'}: not a readable state dict ({err})") from err
    else:
        raise ValueError(f"{path}: neither adapter_model.safetensors nor adapter_model.bin found")
    return config, tensors


def load_spiel_reference(
    model: nn.Module, path: PathLike, adapter_name: str = "default", is_trainable: bool = False
) -> PeftModel:
    """Load an adapter saved by the SpIEL reference fork onto ``model`` as a SpIEL adapter (``PeftModel``).

    The deltas keep their positions and values; ``reselection_steps``, ``selection_accumulation_steps`` and
    ``initial_reselection_rate`` carry over, the growth criterion is SpIEL's default. Heads saved for
    ``modules_to_save`` are restored. Every name and shape is checked before ``model`` is touched.
    """
    config, tensors = read_spiel_reference(path)
    where = Path(path)
    deltas: dict[str, dict[str, torch.Tensor]] = {}
    heads: dict[str, torch.Tensor] = {}
    saved = list(config.get("modules_to_save") or [])
    # PEFT 0.6, which the reference forks, saved the task head of classification and QA models without listing it
    for head in _TASK_HEADS.get(str(config.get("task_type")), ()):
        if head not in saved and any(k.removeprefix("base_model.model.").startswith(head + ".") for k in tensors):
            saved.append(head)
    errors = []
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match:
            deltas.setdefault(match["module"], {})[match["field"]] = tensor
            continue
        name = key.removeprefix("base_model.model.")
        if any(name.startswith(m + ".") or f".{m}." in f".{name}" for m in saved):
            heads[name] = tensor
        else:
            errors.append(f"{key}: neither an sft_delta nor a parameter of modules_to_save {saved}")
    num_deltas = config.get("num_deltas") or {}
    for module_name, fields in deltas.items():
        if set(fields) != {"values", "indices"}:
            errors.append(f"{module_name}: has {sorted(fields)} but not both sft_delta values and indices")
            continue
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            errors.append(f"{module_name}: no such module in {type(model).__name__}")
            continue
        if not supported_weight(module):
            errors.append(f"{module_name}: a {type(module).__name__}; SpIEL deltas need nn.Linear or Conv1D")
            continue
        try:
            check_delta(fields["indices"], fields["values"], tuple(module.weight.shape), module_name)
        except ValueError as err:
            errors.append(str(err))
        if module_name in num_deltas and int(num_deltas[module_name]) != fields["values"].numel():
            errors.append(
                f"{module_name}: num_deltas says {num_deltas[module_name]}, the file has "
                f"{fields['values'].numel()} values"
            )
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, tensor in heads.items():
        if name not in params:
            errors.append(f"{name}: no such parameter in {type(model).__name__}")
        elif tuple(params[name].shape) != tuple(tensor.shape):
            errors.append(f"{name}: shape {tuple(tensor.shape)} in the file, {tuple(params[name].shape)} in the model")
    if not deltas:
        errors.append("no sft_delta tensors found")
    if errors:
        more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
        raise ValueError(f"{where}: does not fit the model: " + "; ".join(errors[:3]) + more)

    dtypes = {str(f["values"].dtype).replace("torch.", "") for f in deltas.values()}
    delta_dtype = dtypes.pop() if len(dtypes) == 1 and next(iter(dtypes)) in DTYPES else "float32"
    options = {ours: config[theirs] for theirs, ours in _HYPERPARAMETERS.items() if config.get(theirs) is not None}
    if options.get("accumulation_steps", 0) > options.get("reselection_steps", 20):
        options.pop("accumulation_steps")
    spiel_config = SpIELConfig(
        target_modules=sorted(deltas),
        modules_to_save=saved or None,
        num_tunable_weights=sum(f["values"].numel() for f in deltas.values()),
        delta_dtype=delta_dtype,
        base_model_name_or_path=config.get("base_model_name_or_path"),
        task_type=config.get("task_type"),
        inference_mode=True,
        **options,
    )
    peft_model = get_peft_model(model, spiel_config, adapter_name=adapter_name)
    with torch.no_grad():
        for name, layer in _sparse_layers(peft_model.base_model.model):
            if name in deltas and adapter_name in layer.sparse_config:
                layer.set_delta(adapter_name, deltas[name]["indices"], deltas[name]["values"])
        for param_name, tensor in heads.items():
            owner = next(m for m in saved if param_name.startswith(m + ".") or f".{m}." in f".{param_name}")
            prefix = param_name[: param_name.index(owner) + len(owner)]
            wrapper = peft_model.base_model.model.get_submodule(prefix)
            wrapper.modules_to_save[adapter_name].get_parameter(param_name[len(prefix) + 1 :]).copy_(tensor)
    if is_trainable:
        spiel_config.inference_mode = False
        peft_model.base_model.set_requires_grad(adapter_name, True)
    return peft_model
