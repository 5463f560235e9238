"""Loading sparse adapters without side effects on failure.

A failed ``PeftModel.from_pretrained``, ``PeftModel.load_adapter``, transformers' ``load_adapter`` or
``get_peft_model`` with a sparse config leaves the model as it was: the module tree, every module's attributes,
``requires_grad`` flags and the model config are restored from a snapshot taken before the call, and the error is a
``ValueError`` (``AdapterLoadError`` when the cause was another exception, such as an unreadable safetensors file).
The checkpoint itself is validated before any tensor of the model is written (``SparseTunerModel``'s
``_remap_adapter_state_dict_for_load``), so tensors are never half-written either.
"""

from __future__ import annotations

import functools
import inspect
import os
from typing import Any, Callable

import torch
from torch import nn

SPARSE_PEFT_TYPES = ("SPIEL", "LTSFT")
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


class AdapterLoadError(ValueError):
    """A sparse adapter could not be loaded; the model was left as it was before the call."""


class ModelSnapshot:
    """Shallow snapshot of a module tree, enough to undo an adapter injection or a failed load.

    Captures each module's ``__dict__`` (parameters, buffers, submodules, hooks and plain attributes; containers are
    copied one level deep and restored in place, so objects shared between modules stay shared), each parameter's
    ``requires_grad`` and each transformers config's attributes. Tensor contents are not copied.
    """

    def __init__(self, *roots: nn.Module) -> None:
        self._modules: list[tuple[nn.Module, dict[str, Any], dict[int, Any]]] = []
        self._requires_grad: list[tuple[torch.Tensor, bool]] = []
        self._configs: list[tuple[Any, dict[str, Any]]] = []
        seen: set[int] = set()
        for root in roots:
            for module in root.modules():
                if id(module) in seen:
                    continue
                seen.add(id(module))
                attrs = dict(module.__dict__)
                contents = {id(v): _contents(v) for v in attrs.values() if isinstance(v, (dict, list, set))}
                self._modules.append((module, attrs, contents))
                for param in module._parameters.values():
                    if param is not None:
                        self._requires_grad.append((param, param.requires_grad))
                config = module.__dict__.get("config")
                if config is not None and hasattr(config, "to_dict") and id(config) not in seen:
                    seen.add(id(config))
                    self._configs.append((config, _config_state(config)))

    def restore(self) -> None:
        """Put every captured module, flag and config back as it was at capture time."""
        restored: set[int] = set()
        for module, attrs, contents in self._modules:
            module.__dict__.clear()
            module.__dict__.update(attrs)
            for value in attrs.values():
                if id(value) in contents and id(value) not in restored:
                    restored.add(id(value))
                    _set_contents(value, contents[id(value)])
        for param, flag in self._requires_grad:
            param.requires_grad_(flag)
        for _config, state in self._configs:
            for obj, values in state:
                obj.__dict__.clear()
                obj.__dict__.update(values)


def _contents(container: Any) -> Any:
    return list(container.items()) if isinstance(container, dict) else list(container)


def _set_contents(container: Any, contents: Any) -> None:
    if isinstance(container, dict):
        container.clear()
        container.update(contents)
    elif isinstance(container, list):
        container[:] = contents
    else:
        container.clear()
        container.update(contents)


def _config_state(config: Any) -> list[tuple[Any, dict[str, Any]]]:
    # the model config and its sub-configs (untie_output_embeddings edits the text config too)
    state = [(config, dict(config.__dict__))]
    for value in list(config.__dict__.values()):
        if hasattr(value, "to_dict") and hasattr(value, "__dict__") and value is not config:
            state.append((value, dict(value.__dict__)))
    return state


def _missing_file_hint(model_id: Any, bound: inspect.BoundArguments) -> str:
    if model_id is None or not os.path.isdir(model_id):
        return ""
    folder = os.path.join(model_id, _extra_kwargs(bound).get("subfolder") or "")
    if any(os.path.isfile(os.path.join(folder, name)) for name in WEIGHT_FILES):
        return ""
    return f"the folder holds neither {' nor '.join(WEIGHT_FILES)}; "


def _is_sparse_config(config: Any) -> bool:
    peft_type = getattr(config, "peft_type", None)
    return str(getattr(peft_type, "value", peft_type)) in SPARSE_PEFT_TYPES


def _is_sparse_checkpoint(model_id: Any, kwargs: dict[str, Any]) -> bool:
    from peft import PeftConfig

    hub = {k: kwargs[k] for k in ("subfolder", "revision", "cache_dir", "token") if kwargs.get(k) is not None}
    try:
        return str(PeftConfig._get_peft_type(model_id, **hub)) in SPARSE_PEFT_TYPES
    except Exception:  # noqa: BLE001 - not readable here: the wrapped loader reports it in its own words
        return False


def _guard(original: Callable, sparse: Callable[[inspect.BoundArguments], bool], root: str) -> Callable:
    signature = inspect.signature(original)

    @functools.wraps(original)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError:  # wrong arguments: the loader itself says so
            return original(*args, **kwargs)
        if not sparse(bound):
            return original(*args, **kwargs)
        snapshot = ModelSnapshot(bound.arguments[root])
        try:
            return original(*args, **kwargs)
        except Exception as err:
            snapshot.restore()
            if isinstance(err, AdapterLoadError):
                raise
            model_id = bound.arguments.get("model_id", bound.arguments.get("peft_model_id"))
            adapter = bound.arguments.get("adapter_name") or "default"
            raise AdapterLoadError(
                f"cannot load sparse adapter {adapter!r} from {model_id}: {_missing_file_hint(model_id, bound)}"
                f"{type(err).__name__}: {err}"
            ) from err

    guarded._peft_sparse_guard = True
    return guarded


def _extra_kwargs(bound: inspect.BoundArguments) -> dict[str, Any]:
    return {**bound.arguments, **bound.arguments.get("kwargs", {})}


def install() -> None:
    """Guard PEFT's ``PeftModel.from_pretrained`` / ``load_adapter`` and transformers' ``load_adapter`` (once)."""
    from peft import PeftModel

    if not getattr(PeftModel.load_adapter, "_peft_sparse_guard", False):

        def load_adapter_is_sparse(bound: inspect.BoundArguments) -> bool:
            model, adapter = bound.arguments["self"], bound.arguments.get("adapter_name")
            existing = model.peft_config.get(adapter)
            if existing is not None:
                return _is_sparse_config(existing)
            return _is_sparse_checkpoint(bound.arguments["model_id"], _extra_kwargs(bound))

        PeftModel.load_adapter = _guard(PeftModel.load_adapter, load_adapter_is_sparse, "self")

    if not getattr(PeftModel.from_pretrained, "_peft_sparse_guard", False):
        original = PeftModel.from_pretrained.__func__

        def from_pretrained_is_sparse(bound: inspect.BoundArguments) -> bool:
            config = bound.arguments.get("config")
            if config is not None:
                return _is_sparse_config(config)
            return _is_sparse_checkpoint(bound.arguments["model_id"], _extra_kwargs(bound))

        PeftModel.from_pretrained = classmethod(_guard(original, from_pretrained_is_sparse, "model"))

    try:
        from transformers.integrations.peft import PeftAdapterMixin
    except ImportError:  # pragma: no cover - transformers is a dependency
        return
    if not getattr(PeftAdapterMixin.load_adapter, "_peft_sparse_guard", False):

        def transformers_is_sparse(bound: inspect.BoundArguments) -> bool:
            config = bound.arguments.get("peft_config")
            if config is not None:
                return _is_sparse_config(config)
            model_id = bound.arguments.get("peft_model_id")
            return model_id is not None and _is_sparse_checkpoint(model_id, _extra_kwargs(bound))

        original_load = PeftAdapterMixin.load_adapter

        @functools.wraps(original_load)
        def load_adapter(self, *args: Any, **kwargs: Any) -> Any:
            bound = inspect.signature(original_load).bind(self, *args, **kwargs)
            if not transformers_is_sparse(bound) or bound.arguments.get("hotswap") is True:
                return original_load(self, *args, **kwargs)
            return _load_sparse_into_transformers_model(**bound.arguments)

        PeftAdapterMixin.load_adapter = _guard(load_adapter, transformers_is_sparse, "self")


def _load_sparse_into_transformers_model(
    self: nn.Module,
    peft_model_id: Any = None,
    adapter_name: Any = None,
    peft_config: Any = None,
    adapter_state_dict: Any = None,
    low_cpu_mem_usage: bool = False,
    is_trainable: bool = False,
    adapter_kwargs: Any = None,
    kwargs: Any = None,
    **ignored: Any,
) -> Any:
    # transformers' own loader copies checkpoint tensors into the injected ones and so needs equal shapes; a sparse
    # delta's size and training state come from the checkpoint instead. PEFT's set_peft_model_state_dict passes through
    # the tuner's checked loading (_remap_adapter_state_dict_for_load), as PeftModel.from_pretrained does.
    from peft import PeftConfig, inject_adapter_in_model, set_peft_model_state_dict
    from peft.utils import load_peft_weights

    from .sparse_layer import SparseDeltaLayer

    adapter_name = adapter_name or "default"
    if getattr(self, "_hf_peft_config_loaded", False) and adapter_name in getattr(self, "peft_config", {}):
        raise ValueError(f"Adapter with name {adapter_name} already exists. Please use a different name.")
    hub = dict(adapter_kwargs or {})
    for key in ("revision", "token", "cache_dir", "subfolder", "local_files_only"):
        if (kwargs or {}).get(key) is not None:
            hub[key] = kwargs[key]
    if peft_config is None:
        if peft_model_id is None:
            raise ValueError("adapter_name: pass peft_model_id, or peft_config and adapter_state_dict")
        peft_config = PeftConfig.from_pretrained(peft_model_id, **hub)
    peft_config.inference_mode = not is_trainable
    if adapter_state_dict is None:
        device = next((str(p.device) for p in self.parameters() if p.device.type != "meta"), "cpu")
        hub.pop("local_files_only", None)
        adapter_state_dict = load_peft_weights(peft_model_id, device=device, **hub)
    inject_adapter_in_model(peft_config, self, adapter_name)
    self._hf_peft_config_loaded = True
    result = set_peft_model_state_dict(self, adapter_state_dict, adapter_name=adapter_name)
    if peft_config.inference_mode:
        self.eval()
        for module in self.modules():
            if isinstance(module, SparseDeltaLayer):
                module.requires_grad_(False)
    try:  # what transformers' own load_adapter returns (from_pretrained(output_loading_info=True) needs to_dict)
        from transformers.utils.loading_report import LoadStateDictInfo
    except ImportError:  # pragma: no cover - older transformers
        return result
    return LoadStateDictInfo(
        missing_keys={k for k in result.missing_keys if adapter_name in k},
        unexpected_keys=set(result.unexpected_keys),
        mismatched_keys=set(),
        error_msgs=[],
        conversion_errors={},
        skipped_pp_keys=set(),
    )
