"""Keeping every rank's sparse deltas identical under data parallelism (DDP) and sharding (FSDP2).

The indices and the training-state buffers of a sparse layer are replicated: every rank holds all of them and must
change them identically. The values are replicated under DDP and sharded under FSDP2 (``fully_shard`` turns each
into a ``DTensor`` of which every rank keeps one contiguous slice, ``Shard(0)``); so is the optimizer's per-entry
state. The layer therefore:

- plans a reselection on the full values (gathered once per reselection under FSDP2), with growth statistics that
  are the same on every rank (SpIEL-MA: from the averaged gradient; SpIEL-AG: candidates picked from the dense
  gradient averaged over ranks, candidate gradients averaged over ranks, which is what one process would compute on
  the concatenated batches);
- takes rank 0's plan (slots, new positions) so that indices can never diverge;
- writes only the local slice of the values and of the per-entry optimizer state.

All ranks of the default process group are taken to be data-parallel replicas. Engines that flatten parameters into
buffers the layer cannot see (FSDP1, DeepSpeed ZeRO) are refused at the first optimizer step by
:func:`check_engine`, never trained silently with a fixed mask.
"""

from __future__ import annotations

import gc
import sys
import weakref
from typing import Any, Optional

import torch
import torch.distributed as dist

try:
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover - torch < 2.4 has no public DTensor
    DTensor, Shard = (), ()


def world_size() -> int:
    """Number of processes of the default process group (1 when torch.distributed is not initialised)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def average_across_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """Replace ``tensor`` in place by its mean over all ranks (no-op with one process); returns it.

    Every rank must call this for the same tensors in the same order.
    """
    world = world_size()
    if world > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(world)
    return tensor


def is_sharded(tensor: Optional[torch.Tensor]) -> bool:
    """True if ``tensor`` is a DTensor split across ranks (FSDP2's sharded parameters, gradients and state)."""
    return isinstance(tensor, DTensor) and any(isinstance(p, Shard) for p in tensor.placements)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole of ``tensor``: all-gathered for a DTensor (a collective), ``tensor`` itself otherwise."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``tensor`` (writes to it change ``tensor``); ``tensor`` itself when not a DTensor."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def local_range(tensor: torch.Tensor) -> tuple[int, int]:
    """``(start, length)`` along dim 0 of this rank's slice of ``tensor`` (the whole of a plain tensor).

    Raises ValueError for a DTensor sharded along another dimension than 0 (FSDP2 shards dim 0 unless told
    otherwise with ``shard_placement_fn``).
    """
    if not isinstance(tensor, DTensor):
        return 0, tensor.shape[0] if tensor.dim() else 1
    for placement in tensor.placements:
        if isinstance(placement, Shard) and placement.dim != 0:
            raise ValueError(
                f"sparse-delta values must be sharded along dim 0, got placements {tuple(tensor.placements)}"
            )
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    return int(offset[0]), int(shape[0])


def local_part(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The slice of ``full`` (a whole tensor of ``like``'s global shape) that this rank holds of ``like``."""
    start, length = local_range(like)
    return full.narrow(0, start, length) if isinstance(like, DTensor) else full


def agree_on_plan(*tensors: Optional[torch.Tensor]) -> tuple[Optional[torch.Tensor], ...]:
    """Make rank 0's ``tensors`` (a reselection plan: slots, positions, ...) every rank's; returns them.

    Every rank computes the plan from identical data, so this only guards against rounding that differs between
    ranks; its cost is a few broadcasts of ``k`` numbers per reselection. ``None`` entries are passed through.
    """
    if world_size() <= 1:
        return tensors
    out = []
    for tensor in tensors:
        if tensor is None:
            out.append(None)
            continue
        size = torch.tensor([tensor.numel()], dtype=torch.int64, device=tensor.device)
        dist.broadcast(size, src=0)
        if int(size) != tensor.numel():
            tensor = tensor.new_empty(int(size))
        tensor = tensor.contiguous()
        dist.broadcast(tensor, src=0)
        out.append(tensor)
    return tuple(out)


def _local_view_of_optimizer(optimizer: torch.optim.Optimizer, param: torch.Tensor, local: torch.Tensor):
    # An object of the optimizer's own class whose only parameter is the local slice of ``param`` and whose state
    # is the local slices of ``param``'s state, so the per-entry re-seeding code runs unchanged on shards.
    view = object.__new__(type(optimizer))
    state = {key: local_tensor(value) for key, value in optimizer.state.get(param, {}).items()}
    view.state = {local: state} if state else {}
    group = next((g for g in optimizer.param_groups if any(p is param for p in g["params"])), None)
    view.param_groups = [dict(group, params=[local])] if group is not None else []
    return view


@torch.no_grad()
def write_regrown(
    optimizer: Optional[torch.optim.Optimizer],
    values: torch.Tensor,
    slots: torch.Tensor,
    first_moment: Optional[torch.Tensor] = None,
    second_moment: Optional[torch.Tensor] = None,
    age: Optional[int] = None,
) -> None:
    """Zero ``values`` at global ``slots`` and re-seed the optimizer's per-entry state there, on this rank's slice.

    ``first_moment``/``second_moment`` (one number per slot, or None) and ``age`` are the growth estimates that the
    re-seeding turns into Adam moments (see ``peft_sparse.optim.reseed_optimizer_state``).
    """
    from ..optim import reseed_optimizer_state

    if not isinstance(values, DTensor):
        values[slots] = 0
        if optimizer is not None:
            reseed_optimizer_state(optimizer, values, slots, first_moment, second_moment, age=age)
        return
    start, length = local_range(values)
    mine = (slots >= start) & (slots < start + length)
    local_slots = slots[mine] - start
    local = values.to_local()
    local[local_slots] = 0
    if optimizer is None:
        return
    if first_moment is not None:
        first_moment, second_moment = first_moment[mine], second_moment[mine]
    view = _local_view_of_optimizer(optimizer, values, local)
    reseed_optimizer_state(view, local, local_slots, first_moment, second_moment, age=age)


@torch.no_grad()
def correct_adam_step_for_age(optimizer: torch.optim.Optimizer, values: torch.Tensor, age: torch.Tensor) -> bool:
    """``peft_sparse.optim.correct_adam_step_for_age`` on this rank's slice of ``values`` (``age``: one per entry)."""
    from ..optim import correct_adam_step_for_age as correct

    if not isinstance(values, DTensor):
        return correct(optimizer, values, age)
    local = values.to_local()
    return correct(_local_view_of_optimizer(optimizer, values, local), local, local_part(age, values))


class _SparseBufferNames:
    # The names of a model's sparse-delta buffers, listed when iterated: DDP reads its ignore list when it wraps the
    # model, by which time every adapter has been added. Each name is given relative to the model and relative to
    # the PeftModel around it (``base_model.model.`` + name); names DDP does not find are harmless.
    def __init__(self, model: torch.nn.Module, extra: Any = ()) -> None:
        self.model = model
        self.extra = list(extra)

    def __iter__(self):
        from .registry import live_layers

        live = {id(layer) for layer in live_layers()}
        yield from self.extra
        for module_name, module in self.model.named_modules():
            if id(module) not in live or not hasattr(module, "after_optimizer_step"):  # SpIEL layers only
                continue
            prefix = f"{module_name}." if module_name else ""
            for container in module.other_param_names:
                for adapter in getattr(module, container, {}):
                    name = f"{prefix}{container}.{adapter}"
                    yield name
                    yield "base_model.model." + name


def skip_ddp_buffer_broadcast(model: torch.nn.Module) -> None:
    """Keep DDP from broadcasting the SpIEL buffers of ``model`` from rank 0 before every forward.

    With ``broadcast_buffers=True`` (DDP's default) DDP would re-send every index, statistic and counter each forward
    (for a 7B model at density 1 %, about 270 MB of indices); they need no broadcast, since every rank changes them
    identically (see this module). Done through DDP's ``_ddp_params_and_buffers_to_ignore``, which the sparse tuner
    sets on the base model when an adapter is injected (a PeftModel forwards the attribute). Other buffers (e.g.
    rotary caches) are still broadcast as usual.
    """
    existing = model.__dict__.get("_ddp_params_and_buffers_to_ignore")
    if isinstance(existing, _SparseBufferNames):
        return
    model._ddp_params_and_buffers_to_ignore = _SparseBufferNames(model, existing or ())


def _engine_holding(layers: list[tuple[Any, str]]) -> Optional[str]:
    # Name of an engine that keeps sparse values where SpIEL cannot follow them, or None.
    for layer, adapter in layers:
        values = layer.sparse_values.get(adapter)
        if values is None:
            continue
        if hasattr(values, "ds_id"):
            return "DeepSpeed ZeRO-3"
        if getattr(values, "_fsdp_flattened", False):
            return "FSDP1 (torch.distributed.fsdp.FullyShardedDataParallel)"
        if values.numel() != layer.sparse_indices[adapter].numel():
            return f"an engine that resized the values to {values.numel()} entries on this rank"
    return None


_not_deepspeed: "weakref.WeakSet[torch.optim.Optimizer]" = weakref.WeakSet()


def check_engine(
    optimizer: torch.optim.Optimizer, owned: list[tuple[Any, str]], waiting: list[tuple[Any, str]]
) -> None:
    """Raise RuntimeError if ``optimizer`` steps sparse deltas held by an engine SpIEL cannot drive.

    ``owned`` are the ``(layer, adapter)`` pairs whose values ``optimizer`` holds; ``waiting`` those whose values
    took part in a forward with gradients since their last counted update (looked at only when ``owned`` is
    empty: a DeepSpeed ZeRO optimizer steps flat partitions in which no values can be found). Called by the
    optimizer hook after every step, so an unsupported engine fails at its first update instead of training the
    initial random mask silently.
    """
    engine = _engine_holding(owned)
    if engine is None and not owned and waiting:
        if _is_deepspeed_optimizer(optimizer):
            zero3 = any(hasattr(layer.sparse_values.get(adapter), "ds_id") for layer, adapter in waiting)
            engine = "DeepSpeed ZeRO-3" if zero3 else "DeepSpeed ZeRO-1/2"
        else:
            engine = _engine_holding(waiting)
    if engine is None:
        return
    names = sorted({adapter for _, adapter in owned or waiting})
    raise RuntimeError(
        f"peft_sparse: SpIEL adapter(s) {names} are trained under {engine}, which does not hand the optimizer the "
        "sparse-delta values as whole tensors, so reselection cannot run (the mask would silently stay the initial "
        "random one). Use FSDP2 (torch.distributed.fsdp.fully_shard; accelerate or the Trainer with "
        "fsdp_version=2) or DDP instead; see the 'Distributed training' documentation."
    )


def _is_deepspeed_optimizer(optimizer: torch.optim.Optimizer) -> bool:
    # DeepSpeed's ZeRO optimizers step a torch optimizer whose parameters are flat fp32 partitions that belong to
    # no module; recognise the run by the ZeRO optimizer that wraps this one (searched once per optimizer).
    if "deepspeed" not in sys.modules or optimizer in _not_deepspeed:
        return False
    classes = []
    for module_name, class_name in (
        ("deepspeed.runtime.zero.stage_1_and_2", "DeepSpeedZeroOptimizer"),
        ("deepspeed.runtime.zero.stage3", "DeepSpeedZeroOptimizer_Stage3"),
    ):
        cls = getattr(sys.modules.get(module_name), class_name, None)
        if cls is not None:
            classes.append(cls)
    if classes and any(
        isinstance(obj, tuple(classes)) and getattr(obj, "optimizer", None) is optimizer for obj in gc.get_objects()
    ):
        return True
    _not_deepspeed.add(optimizer)
    return False
