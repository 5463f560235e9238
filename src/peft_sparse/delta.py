"""The sparse delta of one weight: K unique flat row-major ``indices`` and K ``values``.

``W' = W + scatter(indices, values)``. Everything here is a pure function on tensors; the tuner layers hold the
tensors and call these.
"""

from __future__ import annotations

import torch

INT32_LIMIT = 2**31


def index_dtype_for(numel: int) -> torch.dtype:
    """int32 while every flat position of a ``numel``-element weight fits in it, else int64."""
    return torch.int32 if numel < INT32_LIMIT else torch.int64


def check_delta(indices: torch.Tensor, values: torch.Tensor, shape: tuple[int, ...], where: str) -> None:
    """Raise ValueError (naming ``where``) unless ``indices``/``values`` form a valid delta of a ``shape`` weight.

    Valid: both 1-D and of equal length, integer unique indices in ``[0, numel)``, floating values.
    """
    numel = 1
    for s in shape:
        numel *= int(s)
    if indices.dim() != 1 or values.dim() != 1:
        raise ValueError(
            f"{where}: indices and values must be 1-D, got shapes {tuple(indices.shape)} and {tuple(values.shape)}"
        )
    if indices.numel() != values.numel():
        raise ValueError(f"{where}: {indices.numel()} indices but {values.numel()} values")
    if indices.dtype.is_floating_point or indices.dtype == torch.bool:
        raise ValueError(f"{where}: indices must be integers, got dtype {indices.dtype}")
    if not values.dtype.is_floating_point:
        raise ValueError(f"{where}: values must be floating point, got dtype {values.dtype}")
    if indices.numel() > numel:
        raise ValueError(f"{where}: {indices.numel()} entries do not fit a weight of shape {tuple(shape)}")
    if indices.numel() == 0:
        return
    lo, hi = int(indices.min()), int(indices.max())
    if lo < 0 or hi >= numel:
        bad = lo if lo < 0 else hi
        raise ValueError(
            f"{where}: index {bad} is out of range for a weight of shape {tuple(shape)} ({numel} entries)"
        )
    if torch.unique(indices).numel() != indices.numel():
        raise ValueError(f"{where}: indices contain duplicates")


def to_dense(indices: torch.Tensor, values: torch.Tensor, shape: tuple[int, ...], dtype=None) -> torch.Tensor:
    """The delta as a dense tensor of ``shape`` (for references and merging into other formats)."""
    dense = torch.zeros(shape, dtype=dtype or values.dtype, device=values.device)
    dense.view(-1).index_add_(0, indices.to(values.device), values.detach().to(dense.dtype))
    return dense


def merge_exact(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Add the delta (unique ``indices``) into ``weight`` in place; return the original values at ``indices`` for
    ``restore_exact``."""
    flat = weight.data.view(-1)
    idx = indices.to(flat.device)
    originals = flat[idx].clone()
    # one rounding to the weight's dtype, as in the forward
    flat[idx] = (originals.float() + values.detach().float().to(flat.device)).to(flat.dtype)
    return originals


def restore_exact(weight: torch.Tensor, indices: torch.Tensor, originals: torch.Tensor) -> None:
    """Undo ``merge_exact`` bit-exactly by writing the saved originals back at ``indices``."""
    flat = weight.data.view(-1)
    flat[indices.to(flat.device)] = originals.to(flat.device)


def combine(
    deltas: list[tuple[torch.Tensor, torch.Tensor]], weights: list[float], numel: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted sum of several deltas of the same weight: union of positions, overlapping values summed.

    Returns sorted unique indices (dtype from ``index_dtype_for``) and float32 values.
    """
    if len(deltas) != len(weights):
        raise ValueError(f"got {len(deltas)} deltas but {len(weights)} weights")
    device = deltas[0][1].device if deltas else torch.device("cpu")
    if not deltas:
        return torch.zeros(0, dtype=index_dtype_for(numel)), torch.zeros(0)
    all_idx = torch.cat([i.to(device=device, dtype=torch.int64) for i, _ in deltas])
    all_val = torch.cat(
        [v.detach().to(device=device, dtype=torch.float32) * float(w) for (_, v), w in zip(deltas, weights)]
    )
    uniq, inverse = torch.unique(all_idx, return_inverse=True)
    summed = torch.zeros(uniq.numel(), dtype=torch.float32, device=device).index_add_(0, inverse, all_val)
    return uniq.to(index_dtype_for(numel)), summed
