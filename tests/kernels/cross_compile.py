"""Compile every Triton kernel of peft_sparse for a CUDA architecture on a machine without a GPU.

Triton's interpreter (what CI runs the kernels in) checks the arithmetic but not whether a kernel compiles for a real
GPU: lowering to PTX, register allocation and shared memory only happen in the CUDA backend. This script installs a
stand-in driver that reports a CUDA target (compute capability 90 by default, i.e. Hopper: H100/H200), compiles each
kernel through ``JITFunction.warmup`` with the argument types and specialisations its launcher produces, assembles
it with the ``ptxas`` that ships with Triton, and reads the cubin's resource usage with the bundled ``cuobjdump``.

Run as ``python tests/kernels/cross_compile.py [--arch 90]``; prints one JSON object per line:
``{"kernel", "variant", "arch", "ok", "error", "regs", "stack", "local", "shared"}`` (shared in bytes), and a failed
record for any kernel of ``peft_sparse.kernels`` that has no variant listed here; exits 1 if any record failed.
``TRITON_INTERPRET`` must not be set (the kernels must be defined as ``JITFunction``); the script removes it before
importing peft_sparse.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402

# A layer of Llama-7B's MLP: [11008, 4096], 8192 tokens, 1 % density. The launchers pass these kinds of values; the
# sizes matter only through Triton's specialisation (an int equal to 1 becomes a constant, a multiple of 16 gets a
# divisibility hint), so odd and aligned values are both represented.
ROWS, COLS, TOKENS, POSITIONS = 11008, 4096, 8192, 450_887
FLOATS = (torch.float32, torch.bfloat16, torch.float16)


class _StandInDriver:
    """The parts of Triton's active driver that compilation reads: a device index, a stream and the target."""

    def __init__(self, arch: int) -> None:
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return self.target


def _module(name: str):
    return importlib.import_module(f"peft_sparse.kernels.{name}")


def _short(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _variants() -> Iterator[tuple[str, str, Callable]]:
    """(kernel, variant, compile) for every dtype and specialisation combination the launchers use."""
    apply_delta = _module("apply_delta")
    for out_dtype in FLOATS:
        for value_dtype in sorted({torch.float32, out_dtype}, key=str):
            for index_dtype in (torch.int32, torch.int64):
                yield (
                    "_scatter_add_kernel",
                    f"weight {_short(out_dtype)}, values {_short(value_dtype)}, indices {_short(index_dtype)}",
                    lambda o=out_dtype, v=value_dtype, i=index_dtype: apply_delta._scatter_add_kernel.warmup(
                        o,
                        i,
                        v,
                        POSITIONS,
                        ROWS * COLS,
                        BLOCK=apply_delta.BLOCK,
                        IS_BF16=o == torch.bfloat16,
                        num_warps=apply_delta.NUM_WARPS,
                        grid=(1,),
                    ),
                )

    sddmm = _module("sddmm")
    for dtype in FLOATS:
        for index_dtype in (torch.int32, torch.int64):
            for token_major in (False, True):
                # a is [tokens, rows] (dy), b is [tokens, cols] (x); token_major views them with token stride 1.
                strides = (1, TOKENS, 1, TOKENS) if token_major else (ROWS, 1, COLS, 1)
                yield (
                    "_sddmm_kernel",
                    f"{_short(dtype)}, indices {_short(index_dtype)}, token_major={token_major}",
                    lambda d=dtype, i=index_dtype, s=strides: sddmm._sddmm_kernel.warmup(
                        d,
                        d,
                        i,
                        torch.float32,
                        POSITIONS,
                        TOKENS,
                        ROWS,
                        COLS,
                        TOKENS,
                        *s,
                        BLOCK_K=sddmm.BLOCK_K,
                        BLOCK_T=sddmm.BLOCK_T,
                        num_warps=sddmm.NUM_WARPS,
                        grid=(1,),
                    ),
                )

    matmul = _module("sparse_delta_matmul")
    for dtype in FLOATS:
        for transpose in (False, True):
            n_in, n_out = (ROWS, COLS) if transpose else (COLS, ROWS)
            yield (
                "_sparse_delta_matmul_kernel",
                f"{_short(dtype)}, transpose={transpose}",
                lambda d=dtype, t=transpose, n_in=n_in, n_out=n_out: matmul._sparse_delta_matmul_kernel.warmup(
                    d,
                    torch.int32,
                    torch.float32,
                    torch.float32,
                    TOKENS,
                    POSITIONS,
                    ROWS,
                    COLS,
                    n_in,
                    1,
                    n_out,
                    TRANSPOSE=t,
                    BLOCK_T=matmul.BLOCK_T,
                    BLOCK_K=matmul.BLOCK_K,
                    num_warps=matmul.NUM_WARPS,
                    grid=(1,),
                ),
            )

    topk = _module("topk_outer_product")
    blocks = dict(BLOCK_R=topk.BLOCK_R, BLOCK_C=topk.BLOCK_C, num_warps=topk.NUM_WARPS, grid=(1,))
    f32, i64 = torch.float32, torch.int64
    yield (
        "_topk_histogram_kernel",
        "float32 scores",
        lambda: topk._topk_histogram_kernel.warmup(f32, f32, i64, i64, ROWS, COLS, **blocks),
    )
    yield (
        "_topk_row_ties_kernel",
        "float32 scores",
        lambda: topk._topk_row_ties_kernel.warmup(f32, f32, i64, i64, ROWS, COLS, **blocks),
    )
    yield (
        "_topk_collect_kernel",
        "float32 scores",
        lambda: topk._topk_collect_kernel.warmup(f32, f32, i64, i64, torch.int32, POSITIONS, ROWS, COLS, **blocks),
    )

    nf4 = _module("dequantize_nf4")
    for blocksize in nf4.BLOCKSIZES:
        for nested in (True, False):
            for out_dtype in FLOATS if blocksize in (64, 128) else (torch.bfloat16,):
                numel = ROWS * COLS
                n_blocks = numel // blocksize
                absmax = torch.uint8 if nested else torch.float32
                yield (
                    "_dequantize_nf4_kernel",
                    f"blocksize {blocksize}, nested={nested}, out {_short(out_dtype)}",
                    lambda b=blocksize, n=nested, o=out_dtype, a=absmax, nb=n_blocks, ne=numel: (
                        nf4._dequantize_nf4_kernel.warmup(
                            torch.uint8,
                            a,
                            f32,
                            f32,
                            f32,
                            f32,
                            o,
                            ne,
                            ne // 2,
                            nb,
                            256 if n else 1,
                            BLOCKSIZE=b,
                            HALF_BLOCK=b // 2,
                            BLOCKS_PER_PROGRAM=max(1, nf4.ELEMENTS_PER_PROGRAM // b),
                            NESTED=n,
                            OUT_KIND=0,
                            num_warps=nf4.NUM_WARPS,
                            enable_fp_fusion=False,
                            grid=(1,),
                        )
                    ),
                )


def _defined_kernels() -> set[str]:
    """Names of the ``@triton.jit`` kernels (``*_kernel``; the other jit functions are device helpers) in every
    ``peft_sparse.kernels`` module."""
    from triton.runtime.jit import JITFunction

    package = importlib.import_module("peft_sparse.kernels")
    names = set()
    for info in pkgutil.iter_modules(package.__path__):
        module = _module(info.name)
        names |= {
            name
            for name, value in vars(module).items()
            if isinstance(value, JITFunction) and name.endswith("_kernel") and value.__module__ == module.__name__
        }
    return names


def _resource_usage(cubin: bytes) -> dict[str, int]:
    """REG / STACK / SHARED / LOCAL of the one function in ``cubin``, as ``cuobjdump --dump-resource-usage`` says."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "kernel.cubin")
        with open(path, "wb") as handle:
            handle.write(cubin)
        text = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True, check=True).stdout
    names = {"REG": "regs", "STACK": "stack", "SHARED": "shared", "LOCAL": "local"}
    return {names[key]: int(value) for key, value in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability as an integer (90: Hopper)")
    args = parser.parse_args(argv)
    driver.set_active(_StandInDriver(args.arch))
    failures = 0
    covered = set()
    for kernel, variant, compile_fn in _variants():
        covered.add(kernel)
        record = {"kernel": kernel, "variant": variant, "arch": args.arch}
        try:
            compiled = compile_fn()
            record |= {"ok": True, "error": None, **_resource_usage(compiled.asm["cubin"])}
            record["shared"] = max(record.get("shared", 0), compiled.metadata.shared)
        except Exception as error:  # report every failure, not only the first
            failures += 1
            record |= {"ok": False, "error": f"{type(error).__name__}: {error}"[:2000]}
        print(json.dumps(record), flush=True)
    for kernel in sorted(_defined_kernels() - covered):
        failures += 1
        record = {"kernel": kernel, "variant": None, "arch": args.arch, "ok": False, "error": "no variant listed here"}
        print(json.dumps(record), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
