"""Device-dependent choices: whether reading a tensor's value on the host costs only the read, and the k-th value.

Reading a value of a tensor that lives on an accelerator (``int(t)``, ``bool(t)``, ``t.tolist()``, ``nonzero``, a
boolean-mask index) makes the host wait until the device has run everything queued before it, so the device idles
while the host queues the next work. Reading a CPU tensor costs nothing more than the read. Code on the training hot
path asks ``host_reads_are_free`` and, where it says no, computes without reading (tests force that answer on the CPU
to check that no read remains).

``kth_smallest`` is ``torch.kthvalue`` on the CPU (a quickselect) and a ``torch.topk`` elsewhere: on CUDA
``kthvalue`` selects within one thread block per slice, so on one long vector it is many times slower than a sort
(pytorch/pytorch#75599), while ``topk`` spreads one slice over many blocks.
"""

from __future__ import annotations

import torch


def host_reads_are_free(device: torch.device | str) -> bool:
    """True if a tensor on ``device`` can be read on the host without waiting for queued device work (the CPU)."""
    return torch.device(device).type == "cpu"


def kth_smallest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k``-th smallest entry (1-based) of the 1-D ``values`` as a 0-d tensor on its device; ``torch.kthvalue``'s
    value, without its index. NaN counts as the largest value, as in ``torch.kthvalue`` and ``torch.topk``."""
    n = values.numel()
    if values.dim() != 1 or not 1 <= k <= n:
        raise ValueError(f"values must be 1-D with at least k entries, got shape {tuple(values.shape)} and k={k}")
    if host_reads_are_free(values.device):
        return torch.kthvalue(values, k).values
    # the smaller of the two selections, ordered so that its last entry is the answer (topk orders NaN as kthvalue)
    if k <= n - k + 1:
        return torch.topk(values, k, largest=False, sorted=True).values[-1]
    return torch.topk(values, n - k + 1, largest=True, sorted=True).values[-1]
