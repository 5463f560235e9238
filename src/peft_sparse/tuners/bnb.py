"""qSpIEL support: sparse deltas over bitsandbytes 4-bit NF4 base weights (thesis §7.3.2, eq. 7.8).

The frozen weight stays packed NF4 (optionally with double-quantised absmax); each use dequantises it to the compute
dtype and adds the delta. Merging into the 4-bit weight follows PEFT's convention for 4-bit layers but re-quantises
only the NF4 blocks that contain a changed entry: every other block keeps its bytes and its absmax. Because those
blocks are re-quantised, the merge is lossy; the largest deviation from ``W + delta`` is measured and reported. What
a merge overwrites is kept, so unmerging restores the packed weight exactly. The lossless way to ship is
``merge_and_unload(dequantize=True)``: dense layers in the compute dtype, then an exact merge.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..kernels import dequantize_nf4_delta


def require_bitsandbytes() -> None:
    """Raise ``ImportError`` with the install command if bitsandbytes (needed only for qSpIEL) is missing."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as error:
        raise ImportError(
            "qSpIEL (a sparse delta over a bitsandbytes 4-bit weight) needs bitsandbytes, which is not installed: "
            'python -m pip install "peft-sparse[qspiel]"'
        ) from error


@dataclass
class NF4MergeRecord:
    """What a 4-bit merge overwrote (for an exact unmerge) and the error it measured."""

    byte_positions: torch.Tensor
    bytes_before: torch.Tensor
    blocks: torch.Tensor
    absmax_before: torch.Tensor
    max_error: float


class NF4BaseWeight:
    """Accessor for the weight of a bitsandbytes ``Linear4bit`` (NF4, packed two codes per byte, high nibble first)."""

    returns_input_dtype = True  # as Linear4bit.forward does

    def __init__(self, module: nn.Module) -> None:
        require_bitsandbytes()
        self.module = module
        # Keep bitsandbytes from re-packing the weight for its CPU inference kernel (which would also lose the exact
        # unmerge): the layout stays the one dequantize_4bit reads.
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False

    @property
    def params(self):
        return self.module.weight

    @property
    def quant_state(self):
        return self.params.quant_state

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.quant_state.shape)

    @property
    def device(self) -> torch.device:
        return self.params.device

    @property
    def dtype(self) -> torch.dtype:
        return getattr(self.module, "compute_dtype", None) or self.quant_state.dtype

    def _standard_layout(self) -> None:
        # bitsandbytes re-packs 4-bit weights for its CPU inference kernel the first time a Linear4bit runs in eval
        # mode on an AVX512-BF16 CPU; its own inverse brings back the layout that dequantize_4bit reads.
        qs = self.quant_state
        if getattr(qs, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            self.params.data, self.params.quant_state = _convert_weight_packed_for_cpu_inverse(self.params.data, qs)

    def dense(self, dtype: torch.dtype, backend: str = "auto") -> torch.Tensor:
        """The dequantised weight in ``dtype``."""
        empty = torch.zeros(0, dtype=torch.int64, device=self.device)
        return self.with_delta(empty, empty.float(), dtype, backend)

    def with_delta(
        self, indices: torch.Tensor, values: torch.Tensor, dtype: torch.dtype, backend: str
    ) -> torch.Tensor:
        """``DEQUANT(W) + scatter(indices, values)`` in ``dtype``, in one fused op where a kernel exists."""
        self._standard_layout()
        return dequantize_nf4_delta(self.params.data, self.quant_state, indices, values, dtype, backend)

    # ----------------------------------------------------------------------------------------- merging
    def _block_scales(self, blocks: torch.Tensor, needed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For each block, the absmax entry to store and the scale it dequantises to (>= ``needed`` if possible)."""
        qs = self.quant_state
        if not qs.nested:
            return needed.to(qs.absmax.dtype), needed
        nested = qs.state2
        group_absmax = nested.absmax.float()[blocks // nested.blocksize]
        # every scale this block's absmax byte can express, given its group's nested scale and the offset
        options = nested.code.float()[None, :].to(group_absmax.device) * group_absmax[:, None] + qs.offset
        fits = options >= needed[:, None]
        smallest_fit = torch.where(fits, options, torch.full_like(options, float("inf"))).argmin(1)
        choice = torch.where(fits.any(1), smallest_fit, options.argmax(1))
        return choice.to(qs.absmax.dtype), options.gather(1, choice[:, None]).squeeze(1)

    @torch.no_grad()
    def merge(self, indices: torch.Tensor, values: torch.Tensor) -> NF4MergeRecord:
        """Add the delta into the packed weight, re-quantising only the blocks it touches."""
        qs = self.quant_state
        packed = self.params.data.view(-1)
        numel, block = self.shape[0] * self.shape[1], qs.blocksize
        target = self.dense(torch.float32).view(-1)
        idx = indices.long().to(target.device)
        target[idx] += values.detach().float().to(target.device)
        blocks = torch.unique(idx // block)
        positions = blocks[:, None] * block + torch.arange(block, device=target.device)[None, :]
        valid = positions < numel
        block_values = torch.where(
            valid, target[positions.clamp(max=numel - 1)], torch.zeros((), device=target.device)
        )
        stored, scale = self._block_scales(blocks, block_values.abs().amax(1))
        normalised = block_values / torch.where(scale > 0, scale, torch.ones_like(scale))[:, None]
        code = qs.code.float().to(target.device)
        codes = (normalised[..., None] - code).abs().argmin(-1).to(torch.uint8)
        # bytes of these blocks: positions 2j (high nibble) and 2j+1 (low nibble)
        byte_positions = positions[:, 0::2] // 2
        in_range = byte_positions < packed.numel()
        byte_positions = byte_positions[in_range]
        before = packed[byte_positions].clone()
        high, low = codes[:, 0::2][in_range], codes[:, 1::2][in_range]
        low_valid = valid[:, 1::2][in_range]
        low = torch.where(low_valid, low, before & 0x0F)  # padding nibble past the last entry stays as it was
        record = NF4MergeRecord(byte_positions, before, blocks, qs.absmax[blocks].clone(), 0.0)
        packed[byte_positions] = (high << 4) | low
        qs.absmax[blocks] = stored
        merged = self.dense(torch.float32).view(-1)[positions.clamp(max=numel - 1)]
        record.max_error = float(((merged - block_values) * valid).abs().max()) if blocks.numel() else 0.0
        return record

    @torch.no_grad()
    def restore(self, indices: torch.Tensor, record: NF4MergeRecord) -> None:
        """Undo ``merge``: the packed bytes and absmax entries it overwrote are written back."""
        if getattr(self.quant_state, "packing_format_for_cpu", False):
            raise RuntimeError(
                "bitsandbytes re-packed this 4-bit weight for CPU inference after the merge, so the merge cannot be "
                "undone exactly; unmerge before running the merged 4-bit model in eval mode on CPU, or merge with "
                "merge_and_unload(dequantize=True)"
            )
        self.params.data.view(-1)[record.byte_positions] = record.bytes_before
        self.quant_state.absmax[record.blocks] = record.absmax_before

    def merge_error(self, record: NF4MergeRecord) -> float:
        return record.max_error


def dequantize_layer(layer) -> None:
    """Replace a sparse layer's 4-bit base layer by an ``nn.Linear`` holding the dequantised weight (compute dtype)."""
    base = layer.get_base_layer()
    access = layer.base_weight_access
    if not isinstance(access, NF4BaseWeight):
        return
    rows, cols = access.shape
    dense = nn.Linear(cols, rows, bias=base.bias is not None, dtype=access.dtype, device=access.device)
    dense.weight = nn.Parameter(access.dense(access.dtype), requires_grad=False)
    if base.bias is not None:
        dense.bias = nn.Parameter(base.bias.detach().to(access.dtype), requires_grad=False)
    layer.base_layer = dense
