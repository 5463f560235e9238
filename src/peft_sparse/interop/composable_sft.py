"""composable-sft's ``pytorch_diff.bin`` (the LT-SFT reference implementation).

The file is a pickle (``torch.save``) of ``{"diffs": {param: {"size": torch.Size, "index_steps": [...],
"values": Tensor}}, "abs": {param: Tensor}}``. ``index_steps`` delta-encodes the sorted flat indices in COLUMN-major
order (the first dimension varies fastest); composable-sft writes its first element as a numpy int64, we write plain
ints (readable by ``torch.load(weights_only=True)``, torch's default since 2.6). ``abs`` holds dense head
parameters. Older files use ``"body"`` (torch sparse COO tensors) and ``"head"`` instead.

Reading uses ``torch.load(weights_only=True)`` with an explicit allow-list (numpy's scalar and dtype), never an
unrestricted unpickler.
"""

from __future__ import annotations

import math
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from peft import PeftModel
from peft.utils import ModulesToSaveWrapper
from torch import nn

from .._atomic import atomic_write
from ..tuners.sparse_model import sparse_deltas

SFT_FILE_NAME = "pytorch_diff.bin"
PathLike = str | os.PathLike


@dataclass
class ComposableSFT:
    """A composable-sft file in memory: ``diffs`` maps a parameter name to ``(shape, indices, values)`` with flat
    ROW-major int64 ``indices`` (ascending); ``abs`` maps a parameter name to its full tensor."""

    diffs: dict[str, tuple[tuple[int, ...], torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    abs: dict[str, torch.Tensor] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------- index orders
def column_to_row_major(indices: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Flat column-major positions (first dimension fastest) to flat row-major positions of a ``shape`` tensor."""
    rest, row = indices.long().clone(), torch.zeros_like(indices, dtype=torch.long)
    strides = _row_major_strides(shape)
    for dim, size in enumerate(shape):
        row += (rest % size) * strides[dim]
        rest //= size
    return row


def row_to_column_major(indices: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Flat row-major positions to flat column-major positions (first dimension fastest) of a ``shape`` tensor."""
    rest, col = indices.long().clone(), torch.zeros_like(indices, dtype=torch.long)
    stride = 1
    strides = _row_major_strides(shape)
    for dim, size in enumerate(shape):
        col += ((rest // strides[dim]) % size) * stride
        stride *= size
    return col


def _row_major_strides(shape: tuple[int, ...]) -> list[int]:
    strides, acc = [], 1
    for size in reversed(shape):
        strides.append(acc)
        acc *= size
    return list(reversed(strides))


# --------------------------------------------------------------------------------------------- reading
def _allowed_globals() -> list:
    try:
        from numpy._core.multiarray import scalar  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import scalar

    allowed = [(scalar, "numpy._core.multiarray.scalar"), (scalar, "numpy.core.multiarray.scalar"), np.dtype]
    allowed += [type(np.dtype(t)) for t in ("int64", "int32", "uint64", "uint32")]
    return allowed


def sft_file(path: PathLike) -> Path:
    """``path`` itself if it is a file, else ``path / pytorch_diff.bin``."""
    path = Path(path)
    return path / SFT_FILE_NAME if path.is_dir() else path


def read_composable_sft(path: PathLike) -> ComposableSFT:
    """Read ``pytorch_diff.bin`` (a directory holding it, or the file) with the safe loader and validate it."""
    file = sft_file(path)
    if not file.is_file():
        raise ValueError(f"{file}: no such file (expected composable-sft's {SFT_FILE_NAME})")
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            data = torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, ValueError) as err:
        raise ValueError(f"{file}: not a readable composable-sft file ({type(err).__name__}: {err})") from err
    if not isinstance(data, dict):
        # a malformed file, like every other file problem here, is a ValueError
        raise ValueError(f"{file}: expected a dict with 'diffs' and 'abs', got {type(data).__name__}")  # noqa: TRY004
    unknown = set(data) - {"diffs", "abs", "body", "head"}
    if unknown:
        raise ValueError(f"{file}: unexpected top-level keys {sorted(unknown)}; expected 'diffs' and 'abs'")
    for section in ("diffs", "abs", "body", "head"):
        if data.get(section) is not None and not isinstance(data[section], dict):
            kind = type(data[section]).__name__
            raise ValueError(f"{file}: {section!r} must be a dict of parameter names, got {kind}")
    out = ComposableSFT()
    decoded = [(n, _decode_diff(e, f"{file}: diffs[{n!r}]")) for n, e in (data.get("diffs") or {}).items()]
    decoded += [(n, _decode_sparse_tensor(t, f"{file}: body[{n!r}]")) for n, t in (data.get("body") or {}).items()]
    for name, diff in decoded:
        if not isinstance(name, str) or name in out.diffs:
            raise ValueError(f"{file}: parameter name {name!r} is not a string or is given twice (diffs and body)")
        out.diffs[name] = diff
    for section in ("head", "abs"):
        for name, tensor in (data.get(section) or {}).items():
            if not torch.is_tensor(tensor):
                raise ValueError(f"{file}: {section}[{name!r}] must be a tensor, got {type(tensor).__name__}")
            if not isinstance(name, str) or name in out.abs:
                raise ValueError(f"{file}: parameter name {name!r} is not a string or is given twice (head and abs)")
            out.abs[name] = tensor
    return out


def _decode_diff(entry: object, where: str) -> tuple[tuple[int, ...], torch.Tensor, torch.Tensor]:
    if not isinstance(entry, dict) or set(entry) != {"size", "index_steps", "values"}:
        keys = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
        raise ValueError(f"{where}: expected keys ['index_steps', 'size', 'values'], got {keys}")
    try:
        shape = tuple(int(s) for s in entry["size"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: size must be a sequence of integers, got {entry['size']!r}") from err
    values = entry["values"]
    if not torch.is_tensor(values) or values.dim() != 1 or not values.dtype.is_floating_point:
        raise ValueError(f"{where}: values must be a 1-D floating-point tensor")
    steps = _integer_steps(entry["index_steps"], where)
    if steps.numel() != values.numel():
        raise ValueError(f"{where}: {steps.numel()} index_steps but {values.numel()} values")
    if any(s < 0 for s in shape):
        raise ValueError(f"{where}: size must be non-negative, got {shape}")
    numel = math.prod(shape)
    if steps.numel():
        if int(steps[0]) < 0 or (steps.numel() > 1 and int(steps[1:].min()) <= 0):
            raise ValueError(f"{where}: index_steps must encode strictly increasing non-negative indices")
        if int(steps.max()) >= numel:
            raise ValueError(f"{where}: index_steps holds {int(steps.max())}, out of range for size {shape}")
        columns = torch.cumsum(steps, 0)
        # a sum that wrapped around int64 shows as a decrease
        if steps.numel() > 1 and not bool((columns[1:] > columns[:-1]).all()) or int(columns[-1]) >= numel:
            raise ValueError(
                f"{where}: index_steps sum to {sum(int(s) for s in steps.tolist())}, out of range for size {shape} "
                f"({numel} entries)"
            )
    else:
        columns = steps
    rows = column_to_row_major(columns, shape)
    order = torch.argsort(rows)
    return shape, rows[order], values[order]


def _integer_steps(steps: object, where: str) -> torch.Tensor:
    """``index_steps`` (a list of ints or numpy integers, or an integer tensor) as a 1-D int64 tensor."""
    if torch.is_tensor(steps):
        if steps.dtype.is_floating_point or steps.dtype.is_complex or steps.dtype == torch.bool or steps.dim() != 1:
            raise ValueError(f"{where}: index_steps must be a 1-D integer tensor, got dtype {steps.dtype}")
        return steps.cpu().to(torch.int64)
    if isinstance(steps, np.ndarray):
        steps = steps.tolist()
    if not isinstance(steps, (list, tuple)):
        raise ValueError(f"{where}: index_steps must be a list of integers, got {type(steps).__name__}")
    bad = next((s for s in steps if isinstance(s, bool) or not isinstance(s, (int, np.integer))), None)
    if bad is not None:
        raise ValueError(f"{where}: index_steps must be integers, got {bad!r}")
    try:
        return torch.tensor([int(s) for s in steps], dtype=torch.int64)
    except RuntimeError as err:  # beyond int64
        raise ValueError(f"{where}: index_steps holds a value beyond int64 ({err})") from err


def _decode_sparse_tensor(tensor: object, where: str) -> tuple[tuple[int, ...], torch.Tensor, torch.Tensor]:
    if not torch.is_tensor(tensor) or not tensor.is_sparse:
        raise ValueError(f"{where}: expected a sparse COO tensor")
    tensor = tensor.coalesce()
    shape = tuple(tensor.shape)
    rows = torch.zeros(tensor.indices().shape[1], dtype=torch.long)
    for dim, stride in enumerate(_row_major_strides(shape)):
        rows += tensor.indices()[dim] * stride
    order = torch.argsort(rows)
    return shape, rows[order], tensor.values()[order]


# --------------------------------------------------------------------------------------------- writing
def write_composable_sft(
    path: PathLike,
    diffs: dict[str, tuple[tuple[int, ...], torch.Tensor, torch.Tensor]],
    abs: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``pytorch_diff.bin`` in composable-sft's format; ``diffs`` as in ``ComposableSFT`` (row-major
    indices, any order, unique). ``path``: a directory (created) or a file name. Returns the file written."""
    path = Path(path)
    file = path if path.suffix else path / SFT_FILE_NAME
    file.parent.mkdir(parents=True, exist_ok=True)
    encoded = {}
    for name, (shape, indices, values) in diffs.items():
        columns = row_to_column_major(indices.cpu(), tuple(shape))
        order = torch.argsort(columns)
        columns, ordered = columns[order], values.detach().cpu()[order]
        # plain ints: numpy scalars need an allow-list under torch.load(weights_only=True), torch's default since 2.6
        steps = [] if columns.numel() == 0 else [int(columns[0])] + torch.diff(columns).tolist()
        encoded[name] = {"size": torch.Size(shape), "index_steps": steps, "values": ordered.clone()}
    data = {"diffs": encoded, "abs": {k: v.detach().cpu().clone() for k, v in (abs or {}).items()}}
    # written beside and renamed over: an interrupted write never truncates an existing file
    return atomic_write(file, lambda tmp: torch.save(data, tmp))


def save_composable_sft(model: nn.Module, path: PathLike, adapter_name: str | None = None) -> Path:
    """Write the sparse adapter ``adapter_name`` (default: the active one) of a PeftModel as ``pytorch_diff.bin``.

    Weight deltas become ``<module>.weight`` diffs, LT-SFT bias deltas ``<module>.bias`` diffs, and
    ``modules_to_save`` heads ``abs`` entries.
    """
    if not isinstance(model, PeftModel):
        raise TypeError(f"expected a PeftModel with a sparse adapter, got {type(model).__name__}")
    adapter = adapter_name or model.active_adapter
    diffs = {}
    for name, indices, values, shape in sparse_deltas(model, adapter):
        diffs[f"{name}.weight"] = (tuple(shape), indices.long(), values.detach().float())
    tuner = model.base_model
    for name, module in tuner.model.named_modules():
        bias_values = getattr(module, "sparse_bias_values", None)
        if bias_values is not None and adapter in bias_values and getattr(module, "base_bias", None) is not None:
            diffs[f"{name}.bias"] = (
                tuple(module.base_bias.shape),
                module.sparse_bias_indices[adapter].long(),
                bias_values[adapter].float(),
            )
    heads = {}
    for name, module in tuner.model.named_modules():
        if isinstance(module, ModulesToSaveWrapper) and adapter in module.modules_to_save:
            for param_name, param in module.modules_to_save[adapter].named_parameters():
                heads[f"{name}.{param_name}"] = param.detach()
    return write_composable_sft(path, diffs, heads)


# --------------------------------------------------------------------------------------------- loading
def load_composable_sft(
    model: nn.Module,
    path: PathLike,
    adapter_name: str = "default",
    with_heads: bool = True,
    is_trainable: bool = False,
) -> PeftModel:
    """Load a composable-sft ``pytorch_diff.bin`` (directory or file) onto ``model`` as an LT-SFT adapter.

    Parameter names are the HF model's own (``bert.encoder...``); a missing or extra ``model.base_model_prefix``
    is tolerated. Weight and bias diffs become sparse deltas of their modules; ``abs`` parameters (dense heads) go
    into ``modules_to_save`` unless ``with_heads=False`` (e.g. a language SFT's MLM head on a task model). Every
    name and shape is checked before ``model`` is touched: ValueError names what does not fit.
    """
    from ..compose import ltsft_model_from_deltas

    sft = read_composable_sft(path)
    where = sft_file(path)
    params = dict(model.named_parameters(remove_duplicate=False))
    deltas, errors, seen = {}, [], {}
    for name, (shape, indices, values) in sft.diffs.items():
        resolved = _resolve_name(name, model, params)
        if resolved is None:
            errors.append(f"{name}: no such parameter in {type(model).__name__}")
            continue
        if resolved in seen:
            errors.append(f"{name}: names the parameter {resolved!r}, which {seen[resolved]!r} names too")
            continue
        seen[resolved] = name
        module, _, kind = resolved.rpartition(".")
        if kind not in ("weight", "bias"):
            errors.append(f"{name}: only weights and biases can hold a sparse delta")
            continue
        if tuple(params[resolved].shape) != tuple(shape):
            errors.append(f"{name}: size {tuple(shape)} in the file, {tuple(params[resolved].shape)} in the model")
            continue
        deltas.setdefault(module, {})[kind] = (indices, values)
    heads = {}
    if with_heads:
        for name, tensor in sft.abs.items():
            resolved = _resolve_name(name, model, params)
            if resolved is not None and resolved in seen:
                errors.append(f"{name} (abs): names the parameter {resolved!r}, which {seen[resolved]!r} names too")
                continue
            seen[resolved] = name
            if resolved is None:
                errors.append(
                    f"{name} (abs): no such parameter in {type(model).__name__}; pass with_heads=False to "
                    "load the diffs without the heads"
                )
                continue
            heads[resolved] = tensor
    if errors:
        more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
        raise ValueError(f"{where}: does not fit the model: " + "; ".join(errors[:3]) + more)
    try:
        return ltsft_model_from_deltas(model, deltas, heads, adapter_name=adapter_name, is_trainable=is_trainable)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from err


def _resolve_name(name: str, model: nn.Module, params: dict[str, torch.Tensor]) -> str | None:
    if name in params:
        return name
    prefix = getattr(model, "base_model_prefix", "") or ""
    if prefix:
        if name.startswith(prefix + ".") and name[len(prefix) + 1 :] in params:
            return name[len(prefix) + 1 :]
        if f"{prefix}.{name}" in params:
            return f"{prefix}.{name}"
    return None
