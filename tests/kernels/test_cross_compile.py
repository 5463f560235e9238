"""The Triton kernels compile for real CUDA GPUs, checked on a machine without one.

The interpreter tests check what the kernels compute; this checks that Triton's CUDA backend accepts them: every
kernel, in every dtype and specialisation its launcher uses, is lowered to PTX and assembled by ``ptxas`` for Ampere
(sm_80) and Hopper (sm_90), with no register spills and shared memory that fits one block. ``cross_compile.py`` beside
this file does the compiling in a subprocess, since the kernels of this process are defined for the interpreter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from peft_sparse.kernels import _triton

SCRIPT = Path(__file__).with_name("cross_compile.py")
# Shared memory one block may use: 163 KiB on sm_80 (A100), 227 KiB on sm_90 (H100/H200).
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


def _ptxas_available() -> bool:
    if _triton.triton is None:
        return False
    return (Path(_triton.triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists()


@pytest.mark.skipif(not _ptxas_available(), reason="needs triton with its bundled CUDA ptxas (Linux x86-64)")
@pytest.mark.parametrize("arch", sorted(SHARED_LIMIT))
def test_every_kernel_compiles_for_cuda(arch):
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--arch", str(arch)], capture_output=True, text=True, env=env
    )
    records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    failed = [(r["kernel"], r["variant"], r["error"]) for r in records if not r["ok"]]
    assert not failed, failed
    assert done.returncode == 0, done.stderr[-2000:]
    kernels = {r["kernel"] for r in records}
    # The five ops: scatter (apply_delta), SDDMM, split product, MA top-k (three passes), NF4 dequantisation.
    assert {"_scatter_add_kernel", "_sddmm_kernel", "_sparse_delta_matmul_kernel", "_dequantize_nf4_kernel"} <= kernels
    assert {"_topk_histogram_kernel", "_topk_row_ties_kernel", "_topk_collect_kernel"} <= kernels
    for record in records:
        where = (record["kernel"], record["variant"])
        assert record["arch"] == arch
        assert record["local"] == 0 and record["stack"] == 0, f"register spills in {where}: {record}"
        assert 0 < record["regs"] <= 255, where
        assert record["shared"] <= SHARED_LIMIT[arch], where
