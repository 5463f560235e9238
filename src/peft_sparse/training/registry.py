"""Which sparse layer owns a tensor an optimizer holds.

Engines that shard parameters replace them: FSDP2's ``fully_shard`` puts a new ``DTensor`` parameter in place of each
original one, so an attribute set on the original never reaches the optimizer. Every sparse layer therefore registers
itself here when it is built, and owners are found by identity: a tensor belongs to ``(layer, adapter)`` when it *is*
``layer.sparse_values[adapter]`` at the time of the question (outside forward and backward FSDP2 keeps the sharded
parameter, the one the optimizer holds, on the module).
"""

from __future__ import annotations

import weakref
from typing import Any, Iterable

import torch

_live_layers: "weakref.WeakSet[Any]" = weakref.WeakSet()


def register_layer(layer: Any) -> None:
    """Remember ``layer`` (a sparse-delta tuner layer) for as long as it lives."""
    _live_layers.add(layer)


def live_layers() -> list[Any]:
    """Every sparse-delta layer alive in this process."""
    return list(_live_layers)


def owners_of(params: Iterable[torch.Tensor]) -> dict[int, tuple[Any, str]]:
    """``{id(tensor): (layer, adapter)}`` for those of ``params`` that are the values of a live sparse delta."""
    wanted = {id(p): p for p in params}
    found: dict[int, tuple[Any, str]] = {}
    if not wanted:
        return found
    for layer in live_layers():
        for adapter, values in layer.sparse_values.items():
            if wanted.get(id(values)) is values:
                found[id(values)] = (layer, adapter)
    return found


def optimizer_owners(optimizer: torch.optim.Optimizer) -> list[tuple[Any, str]]:
    """``(layer, adapter)`` of every sparse delta whose values ``optimizer`` holds, in the optimizer's order."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    found = owners_of(params)
    return [found[id(p)] for p in params if id(p) in found]
