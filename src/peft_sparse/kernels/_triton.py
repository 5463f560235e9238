"""Optional Triton import shared by the op modules.

Triton is an optional dependency: without it ``triton`` and ``tl`` are None, no kernel is defined and every op runs
its PyTorch reference. Kernels are defined when their module is imported, and Triton decides then whether they run in
its CPU interpreter, so ``TRITON_INTERPRET=1`` must be set before ``peft_sparse`` is imported for CPU runs.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the references need only torch
    triton = None
    tl = None

# Whether the kernels below were defined for the interpreter (the only way they run on CPU tensors).
INTERPRETED = triton is not None and os.environ.get("TRITON_INTERPRET") == "1"


def cdiv(a: int, b: int) -> int:
    """Ceiling of ``a / b`` for positive ``b``."""
    return -(-a // b)


def multiprocessor_count(device: torch.device) -> int:
    """Streaming multiprocessors on a CUDA ``device``; 1 elsewhere (the interpreter runs programs one by one)."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count
