"""SM3 (Anil et al. 2019), the memory-lean optimizer the thesis pairs with SpIEL-MA.

For a sparse delta of a ``[rows, cols]`` weight, SM3 keeps a row accumulator (``rows`` numbers) and a column
accumulator (``cols`` numbers) instead of Adam's two moments per entry. Per entry the second-moment estimate is
``nu = min(r[o], c[i]) + g**2``; then each row and column accumulator becomes the maximum of itself and the ``nu``
of its entries (SM3-II, Anil et al. 2019, Algorithm 2), so accumulators never decrease.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch

from ..kernels.positions import rows_and_cols
from ..training.distributed import full_tensor, local_part, local_tensor
from ..training.registry import owners_of


def sm3_accumulate(
    row_acc: torch.Tensor, col_acc: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, grad: torch.Tensor
) -> torch.Tensor:
    """One SM3-II accumulator update for entries at ``(rows, cols)`` with gradient ``grad``; returns ``nu``.

    ``row_acc``/``col_acc`` (float32) are updated in place: each row/column becomes the max of its current value and
    the ``nu`` of its entries (SM3-II); rows and columns without entries keep their value.
    """
    g = grad.float()
    # index_select: much faster than advanced indexing for a long index on CPU
    nu = torch.minimum(row_acc.index_select(0, rows), col_acc.index_select(0, cols)).addcmul_(g, g)
    row_acc.scatter_reduce_(0, rows, nu, reduce="amax", include_self=True)
    col_acc.scatter_reduce_(0, cols, nu, reduce="amax", include_self=True)
    return nu


def sparse_layout(param: torch.Tensor) -> Optional[tuple[torch.Tensor, tuple[int, int]]]:
    """``(indices, shape)`` if ``param`` is the values tensor of a live sparse delta, else None."""
    owner = owners_of([param]).get(id(param))
    return None if owner is None else _layout(owner)


def _layout(owner: tuple) -> tuple[torch.Tensor, tuple[int, int]]:
    layer, adapter = owner
    return layer.sparse_indices[adapter], layer.weight_shape


class SM3(torch.optim.Optimizer):
    """SM3 with optional momentum and decoupled weight decay.

    Sparse-delta values (the trainable tensors of SpIEL layers) get row/column accumulators of their weight's shape;
    other 2-D parameters get row/column accumulators of their own shape; everything else a per-entry accumulator.
    Parameters sharded by FSDP2 (``DTensor``) are updated from their all-gathered gradient, so the accumulators
    (replicated on every rank) equal those of one process; the momentum buffer holds the local slice only.
    For SpIEL-MA values the row/column accumulators are the layer's own growth statistics (``spiel_row_stats`` /
    ``spiel_col_stats``, saved with the adapter): the thesis's MA growth reads SM3's accumulators (§7.3.2), so they are
    kept once and updated once per step; the optimizer's state refers to those tensors.

    Args:
        params: parameters or parameter groups.
        lr: learning rate.
        momentum: heavy-ball momentum on the preconditioned update (0 disables it and its per-entry buffer).
        weight_decay: decoupled weight decay (pulls sparse values toward the pre-trained weights).
        eps: added to the square root of the second-moment estimate.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        eps: float = 1e-30,
    ) -> None:
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimization step; returns the closure's loss if a closure is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        owners = owners_of(p for group in self.param_groups for p in group["params"])
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                owner = owners.get(id(p))
                self._update(p, group, None if owner is None else _layout(owner), owner)
        return loss

    def _update(self, p: torch.Tensor, group: dict, layout: Optional[tuple], owner: Optional[tuple] = None) -> None:
        state = self.state[p]
        grad = full_tensor(p.grad).float()  # the whole gradient: SM3's accumulators span rows and columns
        target = local_tensor(p)
        if layout is not None:
            indices, (rows, cols) = layout
            r, c = rows_and_cols(indices, cols)
            shape = (rows, cols)
        elif p.dim() == 2:
            shape = tuple(p.shape)
            r = torch.arange(shape[0], device=p.device).repeat_interleave(shape[1])
            c = torch.arange(shape[1], device=p.device).repeat(shape[0])
        else:
            shape = None
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            if shape is None:
                state["accumulator"] = torch.zeros(p.shape, dtype=torch.float32, device=target.device)
            else:
                state["row_accumulator"] = torch.zeros(shape[0], dtype=torch.float32, device=p.device)
                state["col_accumulator"] = torch.zeros(shape[1], dtype=torch.float32, device=p.device)
            if group["momentum"] > 0:
                state["momentum_buffer"] = torch.zeros_like(target, dtype=torch.float32)
        state["step"] += 1
        # SpIEL-MA layers keep these very statistics for growth: use theirs (updated once per step, saved with the
        # adapter) as the accumulators
        shared = None if owner is None else owner[0].sm3_statistics(owner[1])
        if shared is not None:
            state["row_accumulator"], state["col_accumulator"] = shared
        if shape is None:
            nu = state["accumulator"].add_(grad * grad)
        else:
            nu = sm3_accumulate(state["row_accumulator"], state["col_accumulator"], r, c, grad.reshape(-1))
            nu = nu.view_as(grad)
        update = local_part(grad / (nu.sqrt() + group["eps"]), p)
        if group["momentum"] > 0:
            buf = state["momentum_buffer"]
            buf.mul_(group["momentum"]).add_(update, alpha=1 - group["momentum"])
            update = buf
        if group["weight_decay"]:
            target.mul_(1 - group["lr"] * group["weight_decay"])
        target.add_(update.to(target.dtype), alpha=-group["lr"])
