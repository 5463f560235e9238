"""The forward and backward of a linear layer whose weight carries sparse deltas.

``y = x @ (W + scatter(indices, values)).T + b``. The base weight ``W`` never gets a gradient; the values get
``grad[n] = sum_t dy[t, o_n] * x[t, i_n]`` through the SDDMM op (``kernels.dispatch.sddmm`` chooses how).

For a dense base weight whose dtype is the compute dtype, ``W + delta`` is not a copy: the delta is added into ``W`` in
place, exactly as ``merge`` does (each sum rounded once), and the overwritten entries are written back bit for bit
later, which costs O(K) instead of a copy of ``W``. When the forward's input needs a gradient and the weight is on the
CPU, the merge made for the forward product is *held* until the backward has run its product with it
(``dx = dy @ W_eff``), so an update merges and restores once instead of twice (on a GPU, where the check below would
read a result on the host once per layer, the merge is made per product). The hold is checked before the backward
uses it (the values and indices unchanged, and ``W`` still holding the merged entries, which a sharding engine that
gathers ``W`` again for the backward does not: it restores every entry at once, so the check compares up to
``HOLD_CHECK_ENTRIES`` entries spread over those the merge changed) and is undone by that backward, when its
autograd graph is freed, before the layer runs without its delta (adapters disabled, merging, unloading,
``state_dict``) or by ``release_held_merges``. Between a forward and its backward, code that reads ``W`` directly
sees ``W + delta``.

``PEFT_SPARSE_INPLACE_MERGE`` chooses: ``hold`` (the default; ``1`` means the same), ``product`` (merge for each
product and restore right after it, so ``W`` is unmerged whenever no product runs) or ``0`` (a fresh ``W + delta``
for each product, ``W`` never written). Other weights (4-bit, or a compute dtype that differs from the stored one)
always get a fresh ``W + delta``.
"""

from __future__ import annotations

import contextlib
import os
import threading
import weakref
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F

from . import _device
from .kernels import SortedPositions, sddmm, sorted_positions

# observer(a, b, ncols, indices, values_grad): called in the backward with the two factors of the dense weight
# gradient, grad_W[r, c] = sum_t a[t, r] * b[t, c] in the stored weight layout, and the float32 gradient at the flat
# positions ``indices`` that the backward has computed already (None when the values need no gradient).
GradientObserver = Callable[[torch.Tensor, torch.Tensor, int, torch.Tensor, Optional[torch.Tensor]], None]


INPLACE_ENV_VAR = "PEFT_SPARSE_INPLACE_MERGE"
MERGE_MODES = {"hold": "hold", "1": "hold", "product": "product", "0": "copy", "copy": "copy"}


def merge_mode() -> str:
    """How ``W + delta`` is formed, from ``PEFT_SPARSE_INPLACE_MERGE``: ``"hold"`` (default), ``"product"`` or
    ``"copy"`` (the value ``0``)."""
    value = os.environ.get(INPLACE_ENV_VAR, "hold").strip().lower()
    if value not in MERGE_MODES:
        raise ValueError(f"{INPLACE_ENV_VAR} must be one of hold, product, 0; got {value!r}")
    return MERGE_MODES[value]


def _in_place_weight(base_weight, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """The base weight tensor if ``W + delta`` may be formed in it (exact merge, frozen, contiguous, already in
    ``dtype``, not disabled), else None."""
    weight = getattr(base_weight, "tensor", None)
    if (
        getattr(base_weight, "merge_is_exact", False)
        and weight is not None
        and weight.dtype == dtype
        and not weight.requires_grad
        and weight.is_contiguous()
        and merge_mode() != "copy"
    ):
        return weight
    return None


def _merged_entries(originals: torch.Tensor, values: torch.Tensor, order: SortedPositions) -> torch.Tensor:
    # one rounding to the weight's dtype, as apply_delta and merge_exact do
    return (originals.float() + values.detach().float().index_select(0, order.perm)).to(originals.dtype)


def _merge_in_place(
    flat: torch.Tensor, values: torch.Tensor, order: SortedPositions, out: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Add the delta into ``flat`` at ``order.sorted``; return the entries it overwrote (in ``out`` if given) and
    the ones it wrote, both in row-major order."""
    # row-major order: the gathers and writes walk W forwards
    if out is None:
        originals = flat.index_select(0, order.sorted)
    else:
        originals = torch.index_select(flat, 0, order.sorted, out=out)
    merged = _merged_entries(originals, values, order)
    flat.index_copy_(0, order.sorted, merged)
    return originals, merged


_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """``t``'s bits as integers of its width (bitwise comparisons: NaN equals the same NaN, -0 differs from 0)."""
    return t.view(_INT_OF_SIZE[t.element_size()])


# How many entries a hold compares to tell whether W still holds its merge (see _HeldMerge.intact)
HOLD_CHECK_ENTRIES = 32


def _spread(n: int, device: torch.device) -> torch.Tensor:
    """Up to ``HOLD_CHECK_ENTRIES`` indices into ``range(n)`` spread evenly, first and last included."""
    return torch.linspace(0, n - 1, min(n, HOLD_CHECK_ENTRIES), device=device).round().long()


# id(weight) -> (weak reference to the weight, buffer): where a merge held in that weight keeps the entries it
# overwrote. One buffer per weight, reused by every hold of the same size (the budget stays fixed through
# reselections), so that holding allocates nothing per update: fresh buffers living between each step's activations
# raised the peak RSS by tens of MiB through allocator fragmentation. Only the weight's current hold uses it (a new
# hold first undoes the previous one).
_ORIGINALS: dict[int, tuple] = {}


def _originals_buffer(weight: torch.Tensor, numel: int) -> torch.Tensor:
    key = id(weight)
    entry = _ORIGINALS.get(key)
    if entry is not None and entry[0]() is weight and entry[1].numel() == numel and entry[1].dtype == weight.dtype:
        return entry[1]
    buffer = torch.empty(numel, dtype=weight.dtype, device=weight.device)
    _ORIGINALS[key] = (weakref.ref(weight, lambda _ref: _ORIGINALS.pop(key, None)), buffer)
    return buffer


class _HeldMerge:
    """A delta merged into ``W`` by a forward and left there for the backward products that need it."""

    def __init__(self, weight, indices, values, order, originals, merged) -> None:
        key = id(weight)
        self.weight = weakref.ref(weight, lambda _ref: _forget_hold(key, self))
        self.indices, self.values = indices, values
        self.versions = (indices._version, values._version)
        self.order, self.originals = order, originals
        self.users = 0
        # the entries intact() compares: up to HOLD_CHECK_ENTRIES spread evenly over all; if the merge left one of
        # them as it was (a zero value), which would tell nothing, spread over those it changed instead
        merged_bits, original_bits = _bits(merged), _bits(originals)
        slots = _spread(merged.numel(), merged.device)
        if not bool((merged_bits.index_select(0, slots) != original_bits.index_select(0, slots)).all()):
            changed = (merged_bits != original_bits).nonzero().squeeze(1)
            slots = changed.index_select(0, _spread(changed.numel(), changed.device))
        self.check_positions = order.sorted.index_select(0, slots)
        self.check_bits = merged_bits.index_select(0, slots)

    def matches(self, weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> bool:
        """True if this is the merge of ``indices``/``values`` (unchanged since) into ``weight``."""
        return (
            self.weight() is weight
            and self.indices is indices
            and self.values is values
            and self.versions == (indices._version, values._version)
        )

    def _flat(self) -> Optional[torch.Tensor]:
        # W's storage now, or None when it no longer has the layout merged into: swapped by an engine, or freed
        # (FSDP2 shrinks the storage of a resharded weight to 0 bytes and keeps the tensor's shape)
        weight = self.weight()
        if (
            weight is None
            or weight.dtype != self.originals.dtype
            or weight.numel() != self.order.nrows * self.order.ncols
            or not weight.is_contiguous()
            or weight.untyped_storage().nbytes() < (weight.storage_offset() + weight.numel()) * weight.element_size()
        ):
            return None
        return weight.data.view(-1)

    def intact(self) -> bool:
        """True if ``W`` still holds the merge: an engine that gathers ``W`` again (unmerged) replaces all of it, so
        comparing a few of the entries the merge changed tells, bit for bit, without reading all K (when it changed
        none, a merged and an unmerged ``W`` are the same)."""
        flat = self._flat()
        if flat is None:
            return False
        return torch.equal(_bits(flat.index_select(0, self.check_positions)), self.check_bits)

    def undo(self) -> None:
        """Write the original entries back (a no-op on entries a re-gathered ``W`` already has unmerged)."""
        flat = self._flat()
        if flat is not None:
            flat.index_copy_(0, self.order.sorted, self.originals)


# id(weight) -> the merge held in that weight; the lock makes each change to the table and to W one step, also
# when a graph is freed (releasing its holds) on another thread
_HOLDS: dict[int, _HeldMerge] = {}
_HOLDS_LOCK = threading.RLock()


def _forget_hold(key: int, hold: _HeldMerge) -> None:
    with _HOLDS_LOCK:
        if _HOLDS.get(key) is hold:
            del _HOLDS[key]


def _current_hold(weight: torch.Tensor) -> Optional[_HeldMerge]:
    hold = _HOLDS.get(id(weight))
    return hold if hold is not None and hold.weight() is weight else None


def _take_hold(weight: torch.Tensor) -> Optional[_HeldMerge]:
    """Remove and return the merge held in ``weight`` (the caller undoes it)."""
    hold = _current_hold(weight)
    if hold is not None:
        del _HOLDS[id(weight)]
    return hold


def _held_for(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> Optional[_HeldMerge]:
    """The merge of ``indices``/``values`` held intact in ``weight``, or None after undoing whatever other merge is
    held there (so that ``W`` is unmerged). Call with ``_HOLDS_LOCK`` held."""
    hold = _current_hold(weight)
    if hold is not None and hold.matches(weight, indices, values) and hold.intact():
        return hold
    if hold is not None:
        _take_hold(weight).undo()
    return None


def release_held_merge(weight: Optional[torch.Tensor]) -> None:
    """Undo now the merge a forward left in ``weight`` for its backward, if any (that backward then merges again
    for its product). Layers call it before running their base layer alone, merging or saving."""
    if weight is None:
        return
    with _HOLDS_LOCK:
        hold = _take_hold(weight)
        if hold is not None:
            hold.undo()


def release_held_merges() -> int:
    """Undo every merge held for a pending backward (see the module docs); returns how many were undone.

    Needed only before reading or changing a base weight directly while an autograd graph whose backward has not
    run is still alive, for example after an exception between a forward and its backward.
    """
    with _HOLDS_LOCK:
        holds = list(_HOLDS.values())
        _HOLDS.clear()
        for hold in holds:
            hold.undo()
    return len(holds)


class _HoldUse:
    """One forward's claim on a held merge: released by that forward's backward, or when its graph is freed."""

    __slots__ = ("hold",)

    def __init__(self, hold: _HeldMerge) -> None:
        self.hold = hold

    def release(self) -> None:
        hold, self.hold = self.hold, None
        if hold is None:
            return
        with _HOLDS_LOCK:
            hold.users -= 1
            weight = hold.weight()
            if hold.users == 0 and weight is not None and _current_hold(weight) is hold:
                _take_hold(weight).undo()

    def __del__(self) -> None:
        self.release()


def _hold_merged(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> _HoldUse:
    """Merge the delta into ``weight`` and leave it there, or join the same merge already held; the caller releases
    the returned claim once its backward product has run."""
    with _HOLDS_LOCK:
        hold = _held_for(weight, indices, values)
        if hold is None:
            order = sorted_positions(indices, *weight.shape)
            flat = weight.data.view(-1)
            buffer = _originals_buffer(weight, order.sorted.numel())
            hold = _HeldMerge(weight, indices, values, order, *_merge_in_place(flat, values, order, buffer))
            _HOLDS[id(weight)] = hold
        hold.users += 1
        return _HoldUse(hold)


@contextlib.contextmanager
def merged_weight(
    base_weight, indices: torch.Tensor, values: torch.Tensor, dtype: torch.dtype, backend: str
) -> Iterator[torch.Tensor]:
    """``W + scatter(indices, values)`` in ``dtype`` for the duration of the ``with`` block.

    ``W`` itself when the same delta is held merged in it (see the module docs); else in place (an exact merge
    undone bit for bit on exit, even after an exception) when the base weight allows it (``merge_is_exact``), is
    frozen, contiguous and already has ``dtype``; a new tensor otherwise. The caller must not keep the yielded
    tensor past the block.
    """
    weight = _in_place_weight(base_weight, dtype)
    if weight is None:
        release_held_merge(getattr(base_weight, "tensor", None))  # a copy starts from the unmerged W
        yield base_weight.with_delta(indices, values, dtype, backend)
        return
    with _HOLDS_LOCK:
        held = _held_for(weight, indices, values) is not None
    if held:
        yield weight.detach()
        return
    flat = weight.data.view(-1)  # .data: the merge is undone before anything else reads W, as in merge_exact
    order = sorted_positions(indices, *weight.shape)  # cached per indices tensor
    originals, _ = _merge_in_place(flat, values, order)
    try:
        yield weight.detach()
    finally:
        flat.index_copy_(0, order.sorted, originals)


class _SparseDeltaLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, indices, values, base_weight, transposed, compute_dtype, observer, backend, hold):
        weight = _in_place_weight(base_weight, compute_dtype) if hold and merge_mode() == "hold" else None
        if weight is None:
            with merged_weight(base_weight, indices, values, compute_dtype, backend) as w_eff:
                out = F.linear(x, w_eff.t() if transposed else w_eff, bias)
        else:
            # left merged for the backward's product with W + delta; released there or when the graph is freed
            ctx.hold = _hold_merged(weight, indices, values)
            try:
                w_eff = weight.detach()
                out = F.linear(x, w_eff.t() if transposed else w_eff, bias)
            except BaseException:
                ctx.hold.release()
                raise
        ctx.save_for_backward(x, indices, values)
        ctx.base_weight, ctx.transposed, ctx.compute_dtype = base_weight, transposed, compute_dtype
        ctx.observer, ctx.backend, ctx.has_bias = observer, backend, bias is not None
        return out

    @staticmethod
    def backward(ctx, dy):
        x, indices, values = ctx.saved_tensors
        grad_x = grad_values = grad_bias = None
        if ctx.needs_input_grad[0]:
            # the forward's held merge when it is still intact, else merged again (never a copy kept between them)
            with merged_weight(ctx.base_weight, indices, values, ctx.compute_dtype, ctx.backend) as w_eff:
                grad_x = dy @ (w_eff.t() if ctx.transposed else w_eff)
        hold = getattr(ctx, "hold", None)
        if hold is not None:
            hold.release()
        x2d = x.reshape(-1, x.shape[-1])
        dy2d = dy.reshape(-1, dy.shape[-1])
        # stored-layout factors: Linear weight is [out, in], Conv1D weight is [in, out]
        a, b = (x2d, dy2d) if ctx.transposed else (dy2d, x2d)
        ncols = b.shape[1]
        grad_values32 = sddmm(a, b, indices, ncols, ctx.backend) if ctx.needs_input_grad[3] else None
        if ctx.observer is not None:
            ctx.observer(a, b, ncols, indices, grad_values32)
        if grad_values32 is not None:
            grad_values = grad_values32.to(values.dtype)
        if ctx.has_bias and ctx.needs_input_grad[1]:
            grad_bias = dy2d.sum(0)
        return grad_x, grad_bias, None, grad_values, None, None, None, None, None, None


def sparse_delta_linear(
    x: torch.Tensor,
    base_weight,
    bias: Optional[torch.Tensor],
    indices: torch.Tensor,
    values: torch.Tensor,
    transposed: bool = False,
    observer: Optional[GradientObserver] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``x @ (W + scatter(indices, values)).T + bias`` with gradients for ``values`` (and ``x``) only.

    ``base_weight`` is the layer's base-weight accessor (``peft_sparse.tuners.base_weight``), which materialises
    ``W + delta`` densely (dequantising first for 4-bit weights). ``transposed`` is True for GPT-2's ``Conv1D``, whose
    weight is stored ``[in, out]``; ``indices`` are flat row-major positions into the weight as stored. Under autocast
    the product runs in the autocast dtype. ``observer`` (optional) receives the factors of the dense weight gradient
    in the backward.
    """
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    else:
        compute_dtype = base_weight.dtype
    if bias is not None:
        bias = bias.to(compute_dtype)
    with torch.autocast(device_type=device_type, enabled=False):
        x_compute = x.to(compute_dtype)
        # hold the forward's merge for the backward only when a backward product with W + delta will come, and only
        # on the CPU: the backward's check of the hold reads a result on the host, which on a GPU would stall the
        # queue once per layer, and there the merges are small next to the products
        hold = torch.is_grad_enabled() and x_compute.requires_grad and _device.host_reads_are_free(x_compute.device)
        out = _SparseDeltaLinear.apply(
            x_compute, bias, indices, values, base_weight, transposed, compute_dtype, observer, backend, hold
        )
    # like the base layer: 4-bit layers hand back the input's dtype, dense ones the compute dtype
    return out.to(x.dtype) if base_weight.returns_input_dtype else out
