"""The LT-SFT layer: sparse deltas of a module's weight and bias, for nn.Linear, transformers' Conv1D and nn.Embedding.

Per adapter it holds the weight delta of ``SparseDeltaLayer`` (``sparse_values``, ``sparse_indices``,
``sparse_shape``) and a bias delta (``sparse_bias_values``, ``sparse_bias_indices``; empty without a bias).

An adapter is in one of two phases (``ltsft_phase``): "dense" (LT-SFT phase 1: the base weight itself trains and the
layer is a plain pass-through; ``ltsft_theta0`` holds the one copy of the pre-trained weight and bias that selection
and rewinding need) or "sparse" (phase 2, and every loaded or composed adapter: the deltas are applied).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from ...delta import check_delta, index_dtype_for, merge_exact, restore_exact
from ...sparse_linear import sparse_delta_linear
from ..base_weight import DenseBaseWeight
from ..sparse_layer import DTYPES, Conv1D, SparseDeltaLayer, mark_delta_values

DENSE, SPARSE = "dense", "sparse"


def supported_module(module: nn.Module) -> bool:
    """True for the module types LT-SFT can wrap: nn.Linear, transformers' Conv1D and nn.Embedding."""
    return isinstance(module, (nn.Linear, nn.Embedding)) or (bool(Conv1D) and isinstance(module, Conv1D))


class LTSFTLayer(SparseDeltaLayer):
    """Sparse deltas of a weight and its bias; ``y = f(x; W + scatter(values), b + scatter(bias_values))``."""

    method_prefix = "ltsft_"
    adapter_layer_names = ("ltsft_values", "ltsft_bias_values")
    other_param_names = ("ltsft_indices", "ltsft_shape", "ltsft_bias_indices")

    supported_types = "torch.nn.Linear, torch.nn.Embedding and transformers' Conv1D"

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        super().__init__(base_layer, **kwargs)
        self.ltsft_phase: dict[str, str] = {}
        self.ltsft_theta0: dict[str, dict[str, torch.Tensor]] = {}  # not a buffer: never saved, never moved
        self._merged_bias_originals: dict[str, torch.Tensor] = {}
        self.is_embedding = isinstance(self.get_base_layer(), nn.Embedding)
        if self.is_embedding:  # weight [num_embeddings, dim]: indices in, vectors out
            self.in_features, self.out_features = self.weight_shape

    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        return supported_module(module)

    @property
    def sparse_bias_values(self) -> nn.ParameterDict:
        """Trainable values of each adapter's bias delta."""
        return getattr(self, self.method_prefix + "bias_values")

    @property
    def sparse_bias_indices(self) -> BufferDict:
        """Positions of each adapter's bias delta."""
        return getattr(self, self.method_prefix + "bias_indices")

    # ----------------------------------------------------------------------------------------- storage
    @property
    def base_bias(self) -> torch.Tensor | None:
        return getattr(self.get_base_layer(), "bias", None)

    def update_layer(self, adapter_name: str, config: Any, layer_key: str = "") -> None:
        """Add ``adapter_name`` with empty weight and bias deltas, in the sparse phase."""
        self.sparse_config[adapter_name] = config
        weight = self.get_base_layer().weight
        dtype = DTYPES[config.delta_dtype]
        empty = torch.zeros(0, dtype=dtype, device=weight.device)
        self.set_delta(
            adapter_name, torch.zeros(0, dtype=index_dtype_for(weight.numel()), device=weight.device), empty
        )
        self.set_bias_delta(adapter_name, torch.zeros(0, dtype=torch.int32, device=weight.device), empty)
        self.ltsft_phase[adapter_name] = SPARSE
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def set_bias_delta(self, adapter_name: str, indices: torch.Tensor, values: torch.Tensor) -> None:
        """Install ``(indices, values)`` as the bias delta of ``adapter_name``, validated against the base bias."""
        bias = self.base_bias
        shape = (0,) if bias is None else tuple(bias.shape)
        check_delta(indices, values, shape, f"adapter {adapter_name!r} (bias)")
        device = self.get_base_layer().weight.device
        indices = indices.to(device=device, dtype=torch.int32 if shape[0] < 2**31 else torch.int64)
        values = values.detach().to(device=device, dtype=DTYPES[self.sparse_config[adapter_name].delta_dtype])
        current = self.sparse_bias_values.get(adapter_name)
        if current is not None and current.numel():
            requires_grad = current.requires_grad
        else:  # as in set_delta: empty deltas never train
            config = self.sparse_config[adapter_name]
            requires_grad = not config.inference_mode and adapter_name in self.active_adapters
        requires_grad = requires_grad and values.numel() > 0
        self.sparse_bias_values[adapter_name] = nn.Parameter(values, requires_grad=requires_grad)
        self.sparse_bias_indices[adapter_name] = indices

    def deltas_of(self, adapter_name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{"weight": (indices, values), "bias": (indices, values)}`` of ``adapter_name`` (bias only with a bias)."""
        out = {"weight": (self.sparse_indices[adapter_name], self.sparse_values[adapter_name])}
        if self.base_bias is not None and adapter_name in self.sparse_bias_values:
            out["bias"] = (self.sparse_bias_indices[adapter_name], self.sparse_bias_values[adapter_name])
        return out

    def base_tensor(self, kind: str) -> torch.Tensor:
        """The base ``weight`` or ``bias`` parameter."""
        return self.get_base_layer().weight if kind == "weight" else self.base_bias

    def validate_loaded(self, adapter_name: str, tensors: dict[str, torch.Tensor], where: str) -> None:
        """Raise ValueError (naming ``where``) unless checkpoint ``tensors`` (keyed by role) fit the base tensors."""
        super().validate_loaded(adapter_name, tensors, where)
        has_values, has_indices = "bias_values" in tensors, "bias_indices" in tensors
        if has_values != has_indices:
            raise ValueError(f"{where}: the checkpoint holds only one of the bias delta's values and indices")
        if has_values:
            bias = self.base_bias
            if bias is None and tensors["bias_values"].numel():
                raise ValueError(f"{where}: the checkpoint has a bias delta but the base module has no bias")
            shape = (0,) if bias is None else tuple(bias.shape)
            check_delta(tensors["bias_indices"], tensors["bias_values"], shape, f"{where} (bias)")
            if not torch.isfinite(tensors["bias_values"]).all():
                raise ValueError(f"{where}: ltsft_bias_values holds non-finite values (NaN or inf)")

    def install_loaded(self, adapter_name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Replace the deltas by validated checkpoint ``tensors``; a loaded adapter is in the sparse phase."""
        self.set_delta(adapter_name, tensors["indices"], tensors["values"])
        if "bias_values" in tensors:
            self.set_bias_delta(adapter_name, tensors["bias_indices"], tensors["bias_values"])
        self.enter_sparse_phase(adapter_name)

    # ----------------------------------------------------------------------------------------- phases
    @torch.no_grad()
    def enter_dense_phase(self, adapter_name: str, theta0_device: str | None) -> None:
        """Keep one copy of the current weight (and bias, if selectable) as theta0, then add the adapter's deltas from
        earlier iterations into them; the base tensors become trainable, the deltas frozen and unused."""
        config = self.sparse_config[adapter_name]
        self.release_held_merge()
        theta0 = {}
        kinds = ("weight", "bias") if (config.include_biases and self.base_bias is not None) else ("weight",)
        deltas = self.deltas_of(adapter_name)
        for kind in kinds:
            tensor = self.base_tensor(kind)
            theta0[kind] = tensor.detach().to(theta0_device or tensor.device, copy=True)
            indices, values = deltas[kind]
            if values.numel():  # iteration >= 2 starts from theta0 + phi
                merge_exact(tensor, indices, values)
            tensor.requires_grad_(True)
        self.ltsft_theta0[adapter_name] = theta0
        self.ltsft_phase[adapter_name] = DENSE
        for container in (self.sparse_values, self.sparse_bias_values):
            if adapter_name in container:
                container[adapter_name].requires_grad_(False)

    def enter_sparse_phase(self, adapter_name: str) -> None:
        """Drop theta0, freeze the base tensors and make the deltas trainable (unless in inference mode)."""
        was_dense = self.ltsft_phase.get(adapter_name) == DENSE
        self.ltsft_theta0.pop(adapter_name, None)
        self.ltsft_phase[adapter_name] = SPARSE
        if was_dense:
            for kind in ("weight", "bias"):
                tensor = self.base_tensor(kind)
                if tensor is not None:
                    tensor.requires_grad_(False)
        # trainable unless in inference mode, also when not active (load_adapter(..., is_trainable=True) of a second
        # adapter); empty tensors never are (they would get no gradient)
        trainable = not self.sparse_config[adapter_name].inference_mode
        for container in (self.sparse_values, self.sparse_bias_values):
            if adapter_name in container:
                container[adapter_name].requires_grad_(trainable and container[adapter_name].numel() > 0)

    def theta0(self, adapter_name: str, kind: str) -> torch.Tensor:
        """theta0 of the ``kind`` ("weight"/"bias") tensor, moved next to the weight when its place is not fixed."""
        stored = self.ltsft_theta0[adapter_name][kind]
        tensor = self.base_tensor(kind)
        if stored.device != tensor.device and self.sparse_config[adapter_name].theta0_device is None:
            stored = stored.to(tensor.device)
            self.ltsft_theta0[adapter_name][kind] = stored
        return stored

    # ----------------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_forward(x, *args, **kwargs)
        if self.merged or any(self.ltsft_phase.get(a) == DENSE for a in self.active_adapters):
            return self.base_forward(x, *args, **kwargs)
        weight_deltas, bias_deltas, present = [], [], []
        for adapter in self.active_adapters:
            if adapter not in self.sparse_values:
                continue
            present.append(adapter)
            for kind, (indices, values) in self.deltas_of(adapter).items():
                if values.numel():
                    mark_delta_values(values)
                    (weight_deltas if kind == "weight" else bias_deltas).append((indices, values))
        if not weight_deltas and not bias_deltas:
            return self.base_forward(x, *args, **kwargs)
        base = self.get_base_layer()
        if self.is_embedding:
            return self._embedding(x, base, weight_deltas)
        bias = base.bias
        if bias_deltas:
            indices, values = _concat(bias_deltas)
            bias = bias.index_add(0, indices.long(), values.to(bias.dtype))
        if not weight_deltas:
            self.release_held_merge()
            weight = base.weight.t() if self.transposed else base.weight
            return F.linear(x, weight, bias)
        indices, values = _concat(weight_deltas)
        backend = self.sparse_config[present[0]].kernel_backend  # an active adapter may not target this layer
        return sparse_delta_linear(x, DenseBaseWeight(base), bias, indices, values, self.transposed, None, backend)

    @staticmethod
    def _embedding(x: torch.Tensor, base: nn.Embedding, deltas: list) -> torch.Tensor:
        # the embedding table with the delta added (autograd reaches the values); fine for embeddings' sizes
        indices, values = _concat(deltas)
        weight = base.weight.detach()
        table = weight.reshape(-1).index_add(0, indices.long(), values.to(weight.dtype)).view_as(weight)
        return F.embedding(
            x, table, base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse
        )

    # ----------------------------------------------------------------------------------------- merging
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the deltas into the base weight and bias; the original entries are kept so ``unmerge`` is bit-exact."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        self.release_held_merge()
        for adapter in adapter_names:
            if adapter not in self.sparse_values:
                continue
            if self.ltsft_phase.get(adapter) == DENSE:
                raise ValueError(
                    f"adapter {adapter!r} is in the LT-SFT dense phase and has no deltas yet; call "
                    "peft_sparse.ltsft.select_and_rewind(model) first"
                )
            deltas = self.deltas_of(adapter)
            if safe_merge:
                for kind, (indices, values) in deltas.items():
                    trial = self.base_tensor(kind).data.clone()
                    merge_exact(trial, indices, values)
                    if not torch.isfinite(trial).all():
                        raise ValueError(
                            f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken"
                        )
            for kind, (indices, values) in deltas.items():
                originals = merge_exact(self.base_tensor(kind), indices, values)
                (self._merged_originals if kind == "weight" else self._merged_bias_originals)[adapter] = originals
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Restore the base weight and bias exactly as they were before ``merge``."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter in self._merged_originals:
                restore_exact(
                    self.base_tensor("weight"), self.sparse_indices[adapter], self._merged_originals.pop(adapter)
                )
            if adapter in self._merged_bias_originals:
                restore_exact(
                    self.base_tensor("bias"),
                    self.sparse_bias_indices[adapter],
                    self._merged_bias_originals.pop(adapter),
                )

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self.ltsft_phase.pop(adapter_name, None)
        self.ltsft_theta0.pop(adapter_name, None)


def _concat(deltas: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """One delta from several active ones: unique positions, overlapping values summed (kernels need unique)."""
    if len(deltas) == 1:
        return deltas[0]
    indices, inverse = torch.unique(torch.cat([i.long() for i, _ in deltas]), return_inverse=True)
    summed = torch.cat([v.float() for _, v in deltas])
    return indices, summed.new_zeros(indices.numel()).index_add(0, inverse, summed)


class LTSFTModule(nn.Module, LTSFTLayer):
    """LT-SFT on ``nn.Linear``, transformers' ``Conv1D`` or ``nn.Embedding``."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: Any, layer_key: str = "") -> None:
        super().__init__()
        LTSFTLayer.__init__(self, base_layer)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, layer_key)

    forward = LTSFTLayer.forward

    def __repr__(self) -> str:
        return "ltsft." + super().__repr__()
