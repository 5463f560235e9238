"""The forward and backward of a linear layer whose weight carries sparse deltas.

``y = x @ (W + scatter(indices, values)).T + b``. The base weight ``W`` never gets a gradient; the values get
``grad[n] = sum_t dy[t, o_n] * x[t, i_n]`` through the SDDMM op, so the dense ``dy.T @ x`` is never formed.
``W + delta`` is rebuilt in the backward instead of being kept alive between forward and backward.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .kernels import sddmm

# observer(a, b, ncols): called in the backward with the two factors of the dense weight gradient,
# grad_W[r, c] = sum_t a[t, r] * b[t, c] in the stored weight layout.
GradientObserver = Callable[[torch.Tensor, torch.Tensor, int], None]


class _SparseDeltaLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, indices, values, base_weight, transposed, compute_dtype, observer, backend):
        w_eff = base_weight.with_delta(indices, values, compute_dtype, backend)
        ctx.save_for_backward(x, indices, values)
        ctx.base_weight, ctx.transposed, ctx.compute_dtype = base_weight, transposed, compute_dtype
        ctx.observer, ctx.backend, ctx.has_bias = observer, backend, bias is not None
        return F.linear(x, w_eff.t() if transposed else w_eff, bias)

    @staticmethod
    def backward(ctx, dy):
        x, indices, values = ctx.saved_tensors
        grad_x = grad_values = grad_bias = None
        if ctx.needs_input_grad[0]:
            # rebuilt rather than kept from the forward: one weight copy alive at a time
            w_eff = ctx.base_weight.with_delta(indices, values, ctx.compute_dtype, ctx.backend)
            grad_x = dy @ (w_eff.t() if ctx.transposed else w_eff)
        x2d = x.reshape(-1, x.shape[-1])
        dy2d = dy.reshape(-1, dy.shape[-1])
        # stored-layout factors: Linear weight is [out, in], Conv1D weight is [in, out]
        a, b = (x2d, dy2d) if ctx.transposed else (dy2d, x2d)
        ncols = b.shape[1]
        if ctx.needs_input_grad[3]:
            grad_values = sddmm(a, b, indices, ncols, ctx.backend).to(values.dtype)
        if ctx.observer is not None:
            ctx.observer(a, b, ncols)
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
