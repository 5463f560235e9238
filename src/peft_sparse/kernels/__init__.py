"""Sparse-delta ops: each with a PyTorch reference (the CPU path and the test oracle) and, where written, a
Triton kernel used on CUDA. ``dispatch`` decides which one runs.

Importing this package never needs CUDA, and works without Triton (then only the references exist).
"""

from . import _triton
from .apply_delta import apply_delta_reference, apply_delta_triton
from .dequantize_nf4 import dequantize_nf4_delta_reference, dequantize_nf4_delta_triton
from .dispatch import (
    BACKENDS,
    SDDMM_STRATEGIES,
    apply_delta,
    dequantize_nf4_delta,
    register_triton_op,
    requested_backend,
    resolve,
    sddmm,
    set_sddmm_strategy,
    sparse_delta_matmul,
    topk_outer_product,
    topk_outer_product_many,
)
from .positions import SortedPositions, sorted_positions
from .sddmm import sddmm_csr, sddmm_dense, sddmm_reference, sddmm_triton, sddmm_triton_sorted
from .sparse_delta_matmul import (
    SparseDeltaMatmul,
    sparse_delta_matmul_reference,
    sparse_delta_matmul_triton,
    sparse_delta_product,
)
from .topk_outer_product import (
    topk_outer_product_batched,
    topk_outer_product_reference,
    topk_outer_product_threshold,
    topk_outer_product_triton,
)

# Without Triton the op modules define no kernels, and dispatch keeps serving the references.
if _triton.triton is not None:
    register_triton_op("apply_delta", apply_delta_triton)
    register_triton_op("dequantize_nf4_delta", dequantize_nf4_delta_triton)
    register_triton_op("sddmm", sddmm_triton)
    register_triton_op("sparse_delta_matmul", sparse_delta_matmul_triton)
    register_triton_op("topk_outer_product", topk_outer_product_triton)

__all__ = [
    "BACKENDS",
    "SDDMM_STRATEGIES",
    "SortedPositions",
    "SparseDeltaMatmul",
    "apply_delta",
    "apply_delta_reference",
    "apply_delta_triton",
    "dequantize_nf4_delta",
    "dequantize_nf4_delta_reference",
    "dequantize_nf4_delta_triton",
    "register_triton_op",
    "requested_backend",
    "resolve",
    "sddmm",
    "sddmm_csr",
    "sddmm_dense",
    "sddmm_reference",
    "sddmm_triton",
    "sddmm_triton_sorted",
    "set_sddmm_strategy",
    "sorted_positions",
    "sparse_delta_matmul",
    "sparse_delta_matmul_reference",
    "sparse_delta_matmul_triton",
    "sparse_delta_product",
    "topk_outer_product",
    "topk_outer_product_batched",
    "topk_outer_product_many",
    "topk_outer_product_reference",
    "topk_outer_product_threshold",
    "topk_outer_product_triton",
]
