"""The forward and backward of a linear layer whose weight carries sparse deltas.

``y = x @ (W + scatter(indices, values)).T + b``. The base weight ``W`` never gets a gradient; the values get
``grad[n] = sum_t dy[t, o_n] * x[t, i_n]`` through the SDDMM op (``kernels.dispatch.sddmm`` chooses how).

``W + delta`` exists only while the forward product and the backward product run, never between them. For a dense
base weight whose dtype is the compute dtype it is not a copy either: the delta is added into ``W`` in place, exactly
as ``merge`` does (each sum rounded once), and the overwritten entries are written back bit for bit right after the
product (``merged_weight``), which costs O(K) instead of a copy of ``W``. Other weights (4-bit, or a compute dtype that
differs from the stored one) get a fresh dense ``W + delta``. ``PEFT_SPARSE_INPLACE_MERGE=0`` always copies.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F

from .kernels import sddmm, sorted_positions

# observer(a, b, ncols, indices, values_grad): called in the backward with the two factors of the dense weight
# gradient, grad_W[r, c] = sum_t a[t, r] * b[t, c] in the stored weight layout, and the float32 gradient at the flat
# positions ``indices`` that the backward has computed already (None when the values need no gradient).
GradientObserver = Callable[[torch.Tensor, torch.Tensor, int, torch.Tensor, Optional[torch.Tensor]], None]


INPLACE_ENV_VAR = "PEFT_SPARSE_INPLACE_MERGE"


@contextlib.contextmanager
def merged_weight(
    base_weight, indices: torch.Tensor, values: torch.Tensor, dtype: torch.dtype, backend: str
) -> Iterator[torch.Tensor]:
    """``W + scatter(indices, values)`` in ``dtype`` for the duration of the ``with`` block.

    In place (an exact merge undone bit for bit on exit, even after an exception) when the base weight allows it
    (``merge_is_exact``), is frozen, contiguous and already has ``dtype``; a new tensor otherwise. The caller must not
    keep the yielded tensor past the block.
    """
    weight = getattr(base_weight, "tensor", None)
    in_place = (
        getattr(base_weight, "merge_is_exact", False)
        and weight is not None
        and weight.dtype == dtype
        and not weight.requires_grad
        and weight.is_contiguous()
        and os.environ.get(INPLACE_ENV_VAR, "1") != "0"
    )
    if not in_place:
        yield base_weight.with_delta(indices, values, dtype, backend)
        return
    flat = weight.data.view(-1)  # .data: the merge is undone before anything else reads W, as in merge_exact
    # row-major order (cached per indices tensor): the gathers and writes walk W forwards
    order = sorted_positions(indices, *weight.shape)
    originals = flat.index_select(0, order.sorted)
    # one rounding to the weight's dtype, as apply_delta and merge_exact do
    merged = (originals.float() + values.detach().float().index_select(0, order.perm)).to(flat.dtype)
    flat.index_copy_(0, order.sorted, merged)
    try:
        yield weight.detach()
    finally:
        flat.index_copy_(0, order.sorted, originals)


class _SparseDeltaLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, indices, values, base_weight, transposed, compute_dtype, observer, backend):
        with merged_weight(base_weight, indices, values, compute_dtype, backend) as w_eff:
            out = F.linear(x, w_eff.t() if transposed else w_eff, bias)
        ctx.save_for_backward(x, indices, values)
        ctx.base_weight, ctx.transposed, ctx.compute_dtype = base_weight, transposed, compute_dtype
        ctx.observer, ctx.backend, ctx.has_bias = observer, backend, bias is not None
        return out

    @staticmethod
    def backward(ctx, dy):
        x, indices, values = ctx.saved_tensors
        grad_x = grad_values = grad_bias = None
        if ctx.needs_input_grad[0]:
            # rebuilt rather than kept from the forward: no weight copy alive between them
            with merged_weight(ctx.base_weight, indices, values, ctx.compute_dtype, ctx.backend) as w_eff:
                grad_x = dy @ (w_eff.t() if ctx.transposed else w_eff)
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
        return grad_x, grad_bias, None, grad_values, None, None, None, None, None


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
        out = _SparseDeltaLinear.apply(
            x.to(compute_dtype), bias, indices, values, base_weight, transposed, compute_dtype, observer, backend
        )
    # like the base layer: 4-bit layers hand back the input's dtype, dense ones the compute dtype
    return out.to(x.dtype) if base_weight.returns_input_dtype else out
