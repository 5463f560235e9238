"""Whether reading a tensor's value on the host costs only the read.

Reading a value of a tensor that lives on an accelerator (``int(t)``, ``bool(t)``, ``t.tolist()``, ``nonzero``, a
boolean-mask index) makes the host wait until the device has run everything queued before it, so the device idles
while the host queues the next work. Reading a CPU tensor costs nothing more than the read. Code on the training hot
path asks ``host_reads_are_free`` and, where it says no, computes without reading (tests force that answer on the CPU
to check that no read remains).
"""

from __future__ import annotations

import torch


def host_reads_are_free(device: torch.device | str) -> bool:
    """True if a tensor on ``device`` can be read on the host without waiting for queued device work (the CPU)."""
    return torch.device(device).type == "cpu"
