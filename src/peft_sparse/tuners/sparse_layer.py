"""The layer shared by every sparse tuner: a frozen base weight plus, per adapter, a sparse delta.

Per adapter the layer holds the delta's values (trainable, in a ``ParameterDict``), its indices (unique flat
row-major positions into the base weight as stored, int32 below 2**31 entries) and the weight shape it was made for,
the last two in persistent ``BufferDict``s so that they are saved with the adapter. The containers are named with
the method's prefix (``spiel_values``, ...) and reached through ``sparse_values``, ``sparse_indices`` and
``sparse_shape``.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any, Iterator, Optional

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from ..delta import check_delta, index_dtype_for, to_dense
from ..sparse_linear import GradientObserver, release_held_merge, sparse_delta_linear
from ..training.registry import register_layer
from .base_weight import base_weight_for

try:
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency, but keep the layer importable without it
    Conv1D = ()

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class _TensorIdentitySet:
    """Weak set of tensors compared by identity (``weakref.WeakSet`` would compare tensors with ``==``)."""

    def __init__(self) -> None:
        self._refs: dict[int, weakref.ref] = {}

    def add(self, tensor: torch.Tensor) -> None:
        key = id(tensor)
        if key not in self._refs or self._refs[key]() is not tensor:
            self._refs[key] = weakref.ref(tensor, lambda _, key=key: self._refs.pop(key, None))

    def __contains__(self, tensor: object) -> bool:
        ref = self._refs.get(id(tensor))
        return ref is not None and ref() is tensor


# values tensors that took part in a forward, which optimizer checks recognise (a set, not an attribute: loading with
# assign=True rebuilds parameters from their attributes)
DELTA_VALUES = _TensorIdentitySet()


def mark_delta_values(values: torch.Tensor) -> None:
    """Remember ``values`` as the values of a sparse delta (see ``DELTA_VALUES``)."""
    DELTA_VALUES.add(values)


def _release_held_merge_hook(module: nn.Module, *args: Any) -> None:
    module.release_held_merge()


def supported_weight(module: nn.Module) -> bool:
    """True for the layer types a sparse delta can wrap: ``nn.Linear`` and transformers' ``Conv1D``."""
    return isinstance(module, (nn.Linear, Conv1D))


class SparseDeltaLayer(BaseTunerLayer):
    """Base tuner layer: ``y = x @ (W + sum over active adapters of scatter(indices, values)).T + b``.

    Every per-adapter container is named ``<method_prefix><role>`` (e.g. ``spiel_values``): PEFT and transformers
    recognise adapter weights in checkpoints by the method's prefix. Subclasses set ``method_prefix`` and list their
    containers in ``adapter_layer_names`` (trainable) and ``other_param_names`` (persistent buffers).
    """

    method_prefix = "sparse_"
    adapter_layer_names = ("sparse_values",)
    other_param_names = ("sparse_indices", "sparse_shape")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        for name in self.adapter_layer_names:
            setattr(self, name, nn.ParameterDict({}))
        for name in self.other_param_names:
            setattr(self, name, BufferDict(persistent=True))
        self.sparse_config: dict[str, Any] = {}
        self._merged_originals: dict[str, torch.Tensor] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        base = self.get_base_layer()
        if not self.supports(base):
            raise TypeError(f"{type(self).__name__} wraps {self.supported_types}, got {type(base).__name__}")
        self.transposed = isinstance(base, Conv1D) if Conv1D else False
        rows, cols = self.weight_shape
        self.in_features, self.out_features = (rows, cols) if self.transposed else (cols, rows)
        self.kwargs = kwargs
        # adapters whose values took part in a forward with gradients since their last counted optimizer update
        self._awaiting_update: set[str] = set()
        register_layer(self)
        # a delta held merged in W for a backward is undone before W is saved or loaded
        self.register_state_dict_pre_hook(_release_held_merge_hook)
        self.register_load_state_dict_pre_hook(_release_held_merge_hook)

    def release_held_merge(self) -> None:
        """Undo a delta that a forward of this layer left merged in the base weight for its backward, if any."""
        release_held_merge(getattr(self.get_base_layer(), "weight", None))

    supported_types = "torch.nn.Linear and transformers' Conv1D"

    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        """True if this layer class can wrap ``module``."""
        return supported_weight(module)

    # ----------------------------------------------------------------------------------------- storage
    @property
    def sparse_values(self) -> nn.ParameterDict:
        """Trainable values of each adapter's delta."""
        return getattr(self, self.method_prefix + "values")

    @property
    def sparse_indices(self) -> BufferDict:
        """Flat row-major positions of each adapter's delta."""
        return getattr(self, self.method_prefix + "indices")

    @property
    def sparse_shape(self) -> BufferDict:
        """The weight shape each adapter's delta was made for."""
        return getattr(self, self.method_prefix + "shape")

    def role_of(self, attr: str) -> str:
        """The role of container ``attr`` without the method prefix (``spiel_values`` -> ``values``)."""
        return attr[len(self.method_prefix):]

    @property
    def weight_shape(self) -> tuple[int, int]:
        """Logical shape of the base weight as stored (``[out, in]`` for Linear, ``[in, out]`` for Conv1D)."""
        return self.base_weight_access.shape

    @property
    def base_weight_access(self):
        """Accessor of the frozen base weight (dense, or NF4 for bitsandbytes 4-bit layers)."""
        return base_weight_for(self.get_base_layer())

    @property
    def weight_numel(self) -> int:
        """Number of entries of the base weight."""
        rows, cols = self.weight_shape
        return rows * cols

    @property
    def weight_device(self) -> torch.device:
        """Device of the base weight."""
        return self.base_weight_access.device

    def update_layer(self, adapter_name: str, config: Any, layer_key: str = "") -> None:
        """Add ``adapter_name`` with an empty delta (subclasses add their own state)."""
        self.add_adapter_slot(adapter_name, config)

    def add_adapter_slot(self, adapter_name: str, config: Any) -> None:
        """Register ``adapter_name`` with an empty delta; ``set_delta`` fills it once the budget is known."""
        self.sparse_config[adapter_name] = config
        self.set_delta(
            adapter_name,
            torch.zeros(0, dtype=index_dtype_for(self.weight_numel), device=self.weight_device),
            torch.zeros(0, dtype=DTYPES[config.delta_dtype], device=self.weight_device),
        )
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def set_delta(self, adapter_name: str, indices: torch.Tensor, values: torch.Tensor) -> None:
        """Install ``(indices, values)`` as the delta of ``adapter_name``, validated against the base weight.

        Reuses the existing values tensor when the size is unchanged, so an optimizer that holds it keeps working.
        """
        shape = self.weight_shape
        check_delta(indices, values, shape, f"adapter {adapter_name!r}")
        config = self.sparse_config[adapter_name]
        device = self.weight_device
        indices = indices.to(device=device, dtype=index_dtype_for(self.weight_numel))
        values = values.detach().to(device=device, dtype=DTYPES[config.delta_dtype])
        current = self.sparse_values.get(adapter_name)
        if current is not None and current.shape == values.shape and current.device == values.device:
            with torch.no_grad():
                current.copy_(values)
            self.sparse_indices[adapter_name].copy_(indices)
        else:
            if current is not None and current.numel():
                requires_grad = current.requires_grad
            else:  # an empty delta is never trainable; once it has entries it follows PEFT's rule for adapters
                requires_grad = not config.inference_mode and adapter_name in self.active_adapters
            self.sparse_values[adapter_name] = nn.Parameter(values, requires_grad=requires_grad and values.numel() > 0)
            self.sparse_indices[adapter_name] = indices
        self.sparse_shape[adapter_name] = torch.tensor(shape, dtype=torch.int64, device=device)

    def validate_loaded(self, adapter_name: str, tensors: dict[str, torch.Tensor], where: str) -> None:
        """Raise ValueError (naming ``where``) unless checkpoint ``tensors`` (keyed by role) fit the base weight."""
        shape = self.weight_shape
        saved_shape = tensors.get("shape")
        if saved_shape is not None:
            if saved_shape.dtype.is_floating_point or saved_shape.dtype == torch.bool or saved_shape.dim() != 1:
                raise ValueError(
                    f"{where}: {self.method_prefix}shape must be a 1-D integer tensor, got dtype {saved_shape.dtype} "
                    f"and shape {tuple(saved_shape.shape)}"
                )
            if tuple(int(s) for s in saved_shape.tolist()) != tuple(shape):
                raise ValueError(
                    f"{where}: the adapter was made for a weight of shape {tuple(saved_shape.tolist())}, "
                    f"the base model's is {shape}"
                )
        check_delta(tensors["indices"], tensors["values"], shape, where)
        if not torch.isfinite(tensors["values"]).all():
            raise ValueError(f"{where}: {self.method_prefix}values holds non-finite values (NaN or inf)")

    def install_loaded(self, adapter_name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Replace the adapter's tensors by validated checkpoint ``tensors`` (keyed by role; resized as needed)."""
        self.set_delta(adapter_name, tensors["indices"], tensors["values"])
        device = self.weight_device
        for role, tensor in tensors.items():
            if role not in ("indices", "values", "shape"):
                getattr(self, self.method_prefix + role)[adapter_name] = tensor.to(device)

    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        super().set_adapter(adapter_names, inference_mode=inference_mode)
        self.freeze_empty_values()

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        super().set_requires_grad(adapter_names, requires_grad=requires_grad)
        self.freeze_empty_values()

    def freeze_empty_values(self) -> None:
        """Empty (0-entry) value tensors never train: nothing would reach them."""
        for name in self.adapter_layer_names:
            for values in getattr(self, name).values():
                if values.numel() == 0:
                    values.requires_grad_(False)

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: Optional[torch.device] = None) -> None:
        # Only the device follows the base layer: values keep delta_dtype and statistics stay float32.
        target = device if device is not None else self.weight_device
        if target.type == "meta":
            return
        for name in self.adapter_layer_names + self.other_param_names:
            container = getattr(self, name, None)
            if isinstance(container, (nn.ParameterDict, BufferDict)) and adapter_name in container:
                container[adapter_name] = container[adapter_name].to(target)

    def active_deltas(self) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        """``(adapter, indices, values)`` of every active adapter of this layer with a non-empty delta."""
        for adapter in self.active_adapters:
            values = self.sparse_values.get(adapter)
            if values is not None and values.numel():
                yield adapter, self.sparse_indices[adapter], values

    def sm3_statistics(self, adapter_name: str) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """Row and column statistics that ``peft_sparse.SM3`` should use as its accumulators for this adapter's
        values, or None to keep its own (subclasses override)."""
        return None

    # ----------------------------------------------------------------------------------------- forward
    def gradient_observer(self) -> Optional[GradientObserver]:
        """A callback that wants the dense weight gradient in this backward, or None (subclasses override)."""
        return None

    def base_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The base layer alone, after undoing a delta that a forward left merged in its weight for the backward
        (``peft_sparse.sparse_linear``)."""
        self.release_held_merge()
        return self.base_layer(x, *args, **kwargs)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_forward(x, *args, **kwargs)
        if self.merged:
            return self.base_forward(x, *args, **kwargs)
        deltas = list(self.active_deltas())
        if not deltas:
            return self.base_forward(x, *args, **kwargs)
        for adapter, _, values in deltas:
            self._note_forward(adapter, values)
            mark_delta_values(values)
        if len(deltas) == 1:
            indices, values = deltas[0][1], deltas[0][2]
        else:  # several active adapters: one delta with unique positions, overlapping values summed
            indices, inverse = torch.unique(torch.cat([d[1].long() for d in deltas]), return_inverse=True)
            summed = torch.cat([d[2].float() for d in deltas])
            values = summed.new_zeros(indices.numel()).index_add(0, inverse, summed)
        backend = self.sparse_config[deltas[0][0]].kernel_backend
        return sparse_delta_linear(
            x, self.base_weight_access, self.get_base_layer().bias, indices, values, self.transposed,
            self.gradient_observer(), backend,
        )

    def _note_forward(self, adapter: str, values: torch.Tensor) -> None:
        # optimizer hooks find layers through peft_sparse.training.registry; this only notes that an update is due
        if values.requires_grad and torch.is_grad_enabled():
            self._awaiting_update.add(adapter)

    # ----------------------------------------------------------------------------------------- merging
    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The delta of ``adapter_name`` as a dense tensor of the weight's logical shape (compute dtype)."""
        return to_dense(
            self.sparse_indices[adapter_name], self.sparse_values[adapter_name], self.weight_shape,
            self.base_weight_access.dtype,
        )

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Add the deltas into the base weight; what they overwrite is kept so ``unmerge`` is bit-exact."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        self.release_held_merge()
        access = self.base_weight_access
        for adapter in adapter_names:
            if adapter not in self.sparse_values:
                continue
            indices, values = self.sparse_indices[adapter], self.sparse_values[adapter]
            if safe_merge and not torch.isfinite(values).all():
                raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")
            self._merged_originals[adapter] = access.merge(indices, values)
            self.merged_adapters.append(adapter)
            error = access.merge_error(self._merged_originals[adapter])
            if error > 0:
                warnings.warn(
                    f"merging adapter {adapter!r} into the quantised weight re-quantised the blocks it touches; "
                    f"largest deviation from W + delta: {error:.3g}. merge_and_unload(dequantize=True) is exact.",
                    stacklevel=2,
                )

    def unmerge(self) -> None:
        """Restore the base weight exactly as it was before ``merge``."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter in self._merged_originals:
                self.base_weight_access.restore(self.sparse_indices[adapter], self._merged_originals.pop(adapter))

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.sparse_config.pop(adapter_name, None)

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return False
