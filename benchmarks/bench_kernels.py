"""Speed and memory of the sparse-delta kernels on Llama-7B projection shapes.

Measures, in bf16 on one GPU (float32 with ``--device cpu``):

- value gradient: dense ``dY.T @ X`` then gather K entries (what earlier implementations do) against every strategy
  behind ``peft_sparse.kernels.sddmm``: ``csr`` (``torch.sparse.sampled_addmm``), ``dense`` (row-blocked dense
  product, float32 out), the Triton SDDMM in its default (operands as given) and token-major (operands transposed
  first) layouts and on the positions in row-major order (``triton_sorted``), ``gather`` (the reference; CPU only)
  and ``auto`` (what dispatch picks: timed once per shape on CUDA, the measured crossover on CPU);
- a linear layer's forward + backward: frozen ``nn.Linear``-style GEMMs, the sparse-delta layer as ``SpIELLayer`` runs
  it (``peft_sparse.sparse_linear.sparse_delta_linear``: ``W + delta`` merged in place and restored, the values'
  gradient by ``sddmm``'s choice; and, where ``tokens * K`` is small enough, the split formulation with the Triton
  product), and LoRA of the same parameter count (``r = K / (in + out)``, dropout 0);
- ``apply_delta`` (clone + scatter) against the in-place exact merge + restore the layer now uses, and
  ``topk_outer_product`` (SpIEL-MA growth): Triton radix select, the chunked reference and the threshold search;
- one reselection (drop + grow) of an ``[11008, 4096]`` delta at LoRA r=64's budget for SpIEL-random, -MA and -AG,
  and SpIEL-MA's growth of all 28 projections of four Llama-7B layers, one search per matrix against
  ``topk_outer_product_batched``;
- qSpIEL's ``DEQUANT(W_nf4) + Delta`` (NF4, blocksize 64, double-quantised absmax, bf16 output): the fused Triton
  dequantise + delta against bitsandbytes' ``dequantize_4bit`` + clone + ``scatter_add_`` (needs bitsandbytes).

Writes ``bench_kernels_<device>.json``, ``.md`` and ``.png`` into ``--out`` (default ``benchmarks/results/``) with the
device name and the date. ``--device cpu`` measures the PyTorch strategies (no Triton, no layer and NF4 groups) at
the Llama-7B shapes on one thread with 512 tokens; ``--device cpu --small`` runs tiny shapes with the Triton kernels in
Triton's interpreter, only to check that the script works (its timings mean nothing).

Usage: ``python benchmarks/bench_kernels.py [--out DIR] [--repeats N]``, ``python benchmarks/bench_kernels.py
--device cpu`` or ``python benchmarks/bench_kernels.py --device cpu --small``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import sys
import time
from pathlib import Path

LLAMA_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]  # [out, in]: q/k/v/o, down, gate/up
LLAMA_TOKENS = [2048, 8192, 32768]
CPU_TOKENS = [512]
SMALL_SHAPES = [(33, 65), (64, 48), (48, 64)]
SMALL_TOKENS = [16, 37]
DENSITIES = [0.003, 0.01, 0.023, 0.05]
CPU_DENSITIES = [0.003, 0.01, 0.023]
# Reselection benchmark: the largest Llama-7B projection at LoRA r=64's budget (K = 64 * (out + in), 2.1 %).
RESELECTION_SHAPE = (11008, 4096)
RESELECTION_RANK = 64
# Fraction of K regrown at a SpIEL-MA reselection (initial_reselection_rate, thesis §7.3.1).
GROWTH_FRACTION = 0.2
# SpIEL-MA growth of a whole model's reselection: the 7 projections of this many Llama-7B decoder layers.
GROWTH_BATCH_LAYERS = 4
LLAMA_LAYER = [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]  # q, k, v, o, gate, up, down


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; ``--device cpu`` requires ``--small``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results", help="output folder")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu runs the Triton interpreter")
    parser.add_argument("--small", action="store_true", help="tiny shapes: a smoke test of the script")
    parser.add_argument("--repeats", type=int, default=20, help="timed repetitions per measurement (median kept)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls first (the first compiles kernels)")
    parser.add_argument("--budget-s", type=float, default=5.0, help="stop repeating a measurement after this long")
    parser.add_argument(
        "--split-max-ratio",
        type=float,
        default=64.0,
        help="run the split formulation only where tokens * K <= this * out * in (it is slow beyond)",
    )
    parser.add_argument("--threads", type=int, default=1, help="CPU: torch threads (default 1)")
    parser.add_argument("--tokens", default=None, help="comma-separated token counts (default: per device)")
    parser.add_argument("--densities", default=None, help="comma-separated densities, e.g. 0.003,0.01,0.023")
    parser.add_argument("--no-reselection", action="store_true", help="skip the reselection group")
    parser.add_argument("--reselection-only", action="store_true", help="only the reselection group")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 1:
        parser.error(f"--repeats and --warmup must be >= 1, got {args.repeats} and {args.warmup}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run every measurement and write the result files; returns the process exit code."""
    args = parse_args(argv)
    if args.device == "cpu" and args.small:
        # Must be set before the kernels are defined (at import) for them to run on CPU tensors.
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    if args.device == "cpu":
        torch.set_num_threads(args.threads)

    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_kernels: CUDA is not available, nothing measured. Run it on a GPU, or check the script with")
        print("  python benchmarks/bench_kernels.py --device cpu --small")
        return 0
    bench = Bench(args)
    # A time limit (gpu_check.sh runs this under `timeout`) ends the run with SIGTERM: keep what was measured.
    signal.signal(signal.SIGTERM, _stop_on_signal)
    try:
        results = bench.run()
    except _Stopped as stop:
        bench.results["meta"]["stopped_early"] = f"{stop} after {time.perf_counter() - bench.started:.0f} s"
        write_results(bench.results, args.out)
        print(f"bench_kernels: stopped early ({stop}); the files above hold the measurements made before it")
        return 1
    write_results(results, args.out)
    return 0


class _Stopped(BaseException):  # not Exception: the Triton interpreter wraps those
    """Raised by the SIGTERM handler so that the measurements made so far are written."""


def _stop_on_signal(signum: int, frame) -> None:
    raise _Stopped(f"signal {signal.Signals(signum).name}")


class Bench:
    """Holds the configuration and runs the four groups of measurements."""

    def __init__(self, args: argparse.Namespace):
        import torch

        from peft_sparse import kernels

        self.torch = torch
        self.kernels = kernels
        self.args = args
        self.device = torch.device(args.device)
        # CPU without --small: only the PyTorch strategies, in float32 (CPU half GEMMs and sampled_addmm are not fast)
        self.cpu_full = self.device.type == "cpu" and not args.small
        self.triton = not self.cpu_full
        self.dtype = torch.float32 if self.cpu_full else torch.bfloat16
        self.shapes = SMALL_SHAPES if args.small else LLAMA_SHAPES
        self.tokens = SMALL_TOKENS if args.small else CPU_TOKENS if self.cpu_full else LLAMA_TOKENS
        self.densities = CPU_DENSITIES if self.cpu_full else DENSITIES
        if args.tokens:
            self.tokens = [int(t) for t in args.tokens.split(",")]
        if args.densities:
            self.densities = [float(d) for d in args.densities.split(",")]
        if args.small:
            args.repeats, args.warmup = min(args.repeats, 2), 1
        if self.cpu_full:
            args.repeats, args.warmup = min(args.repeats, 3), 1

    # ------------------------------------------------------------------------------------------------ timing

    def _sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def measure(self, fn, once: bool = False) -> dict:
        """Median milliseconds of ``fn()`` over the repeats, and its peak extra memory in MiB (CUDA only).

        ``once``: a single timed call without warm-up (slow PyTorch references at full size on the CPU)."""
        torch = self.torch
        for _ in range(0 if once else self.args.warmup):
            fn()
        self._sync()
        times: list[float] = []
        cpu_times: list[float] = []  # CPU: the process's CPU time, which load from other processes hardly changes
        for _ in range(1 if once else self.args.repeats):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                began, began_cpu = time.perf_counter(), time.process_time()
                fn()
                times.append((time.perf_counter() - began) * 1e3)
                cpu_times.append((time.process_time() - began_cpu) * 1e3)
            if len(times) >= 3 and sum(times) > self.args.budget_s * 1e3:
                break
        peak = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            baseline = torch.cuda.memory_allocated()
            fn()
            self._sync()
            peak = (torch.cuda.max_memory_allocated() - baseline) / 2**20
        cpu_ms = statistics.median(cpu_times) if cpu_times else None
        return {"time_ms": statistics.median(times), "cpu_ms": cpu_ms, "repeats": len(times), "peak_mib": peak}

    # ------------------------------------------------------------------------------------------------ helpers

    def _indices(self, numel: int, k: int):
        torch = self.torch
        index_dtype = torch.int64 if numel >= 2**31 else torch.int32
        gen = torch.Generator(device=self.device).manual_seed(k)
        return torch.randperm(numel, generator=gen, device=self.device)[:k].to(index_dtype)

    def _randn(self, *shape, scale: float = 1.0):
        return self.torch.randn(*shape, device=self.device, dtype=self.dtype) * scale

    def _free(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.empty_cache()

    # ------------------------------------------------------------------------------------------------ groups

    def run(self) -> dict:
        torch = self.torch
        import triton

        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else platform.processor() or "cpu"
        meta = {
            "device": name,
            "device_type": self.device.type,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "torch": torch.__version__,
            "triton": triton.__version__,
            "dtype": str(self.dtype).removeprefix("torch."),
            "small": self.args.small,
            "interpreter": self.device.type == "cpu" and self.args.small,
            "repeats": self.args.repeats,
            "warmup": self.args.warmup,
            "threads": torch.get_num_threads() if self.device.type == "cpu" else None,
            "reselection_only": self.args.reselection_only,
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        }
        results = {"meta": meta, "value_gradient": [], "layer": [], "apply_delta": [], "topk_outer_product": []}
        results.update(nf4_dequant_delta=[], reselection=[], ma_growth_batch=[])
        self.results, self.started = results, time.perf_counter()  # what main writes if the run is stopped early
        if not self.args.no_reselection:
            results["reselection"] = self.bench_reselection()
            results["ma_growth_batch"] = self.bench_growth_batch()
        for out_f, in_f in [] if self.args.reselection_only else self.shapes:
            for density in self.densities:
                results["apply_delta"] += self.bench_apply_delta(out_f, in_f, density)
                results["topk_outer_product"] += self.bench_topk(out_f, in_f, density)
                self._free()
                if not self.cpu_full:
                    results["nf4_dequant_delta"] += self.bench_nf4(out_f, in_f, density)
                    self._free()
                for tokens in self.tokens:
                    results["value_gradient"] += self.bench_value_gradient(out_f, in_f, tokens, density)
                    self._free()
                    if not self.cpu_full:
                        results["layer"] += self.bench_layer(out_f, in_f, tokens, density)
                        self._free()
                    print(f"done [{out_f}, {in_f}] tokens={tokens} density={density:.3%}", flush=True)
        if hasattr(os, "getloadavg"):
            meta["load_average_end"] = list(os.getloadavg())
        return results

    def bench_reselection(self) -> list[dict]:
        """One drop-and-grow of ``GROWTH_FRACTION`` of K at the reselection shape, per selection method: the
        ``replace_entries`` plan with the layer's growth function (what ``SpIELLayer.reselect`` runs before it writes
        the slots and re-seeds the optimizer state)."""
        torch = self.torch
        from peft_sparse.selection import (
            grow_by_accumulated_gradient,
            grow_by_momentum_approximation,
            grow_random,
            replace_entries,
        )

        out_f, in_f = SMALL_SHAPES[0] if self.args.small else RESELECTION_SHAPE
        rank = 1 if self.args.small else RESELECTION_RANK
        numel = out_f * in_f
        k = rank * (out_f + in_f)
        regrow = max(1, round(GROWTH_FRACTION * k))
        gen = torch.Generator(device=self.device).manual_seed(5)
        indices = self._indices(numel, k).long()
        values = torch.randn(k, generator=gen, device=self.device)
        row_stats = torch.rand(out_f, generator=gen, device=self.device) ** 4
        col_stats = torch.rand(in_f, generator=gen, device=self.device) ** 4
        candidates = self._indices(numel, k).long().flip(0)
        mean_grad = torch.randn(k, generator=gen, device=self.device)
        growth = {
            "random": (lambda ex, n: grow_random(numel, ex, n, torch.Generator().manual_seed(7)), None),
            "ma": (lambda ex, n: grow_by_momentum_approximation(row_stats, col_stats, ex, n), None),
            "ag": (
                lambda ex, n: grow_by_accumulated_gradient(candidates, mean_grad, ex, n),
                lambda chosen: candidates[chosen],
            ),
        }
        rows = []
        # 20 %: a later reselection; all of K: the first one (thesis ch. 7: the random initial positions all go)
        for count in (regrow, k):
            for selection, (grow, positions_of) in growth.items():

                def plan(grow=grow, positions_of=positions_of, count=count):
                    return replace_entries(indices, values, count, grow, positions_of)

                record = self.measure(plan)
                slots, new_positions, _ = plan()
                rows.append(
                    {
                        "shape": [out_f, in_f],
                        "k": k,
                        "regrown": count,
                        "selection": selection,
                        **record,
                        "new_positions": int(new_positions.numel()),
                    }
                )
                print(f"reselection {selection} of {count}: {record['time_ms']:.1f} ms", flush=True)
        return rows

    def bench_growth_batch(self) -> list[dict]:
        """SpIEL-MA growth of every projection of ``GROWTH_BATCH_LAYERS`` Llama-7B layers at LoRA r=64's budgets
        (``GROWTH_FRACTION`` of K, the rest of K excluded), as one reselection of a model grows them: one
        ``topk_outer_product`` per matrix (Triton where it runs, and the threshold search) against
        ``topk_outer_product_batched`` (the threshold search of all matrices of a shape at once)."""
        torch = self.torch
        kernels = self.kernels
        shapes = (SMALL_SHAPES if self.args.small else LLAMA_LAYER) * (2 if self.args.small else GROWTH_BATCH_LAYERS)
        rank = 1 if self.args.small else RESELECTION_RANK
        gen = torch.Generator(device=self.device).manual_seed(11)
        rows_, cols_, excludes, ks = [], [], [], []
        for out_f, in_f in shapes:
            k = rank * (out_f + in_f)
            rows_.append(torch.rand(out_f, generator=gen, device=self.device) ** 4)  # SM3-like: heavy-tailed
            cols_.append(torch.rand(in_f, generator=gen, device=self.device) ** 4)
            excludes.append(self._indices(out_f * in_f, k - round(GROWTH_FRACTION * k)).long().sort().values)
            ks.append(round(GROWTH_FRACTION * k))
        methods = [
            (
                "per_matrix_threshold",
                lambda: [kernels.topk_outer_product_threshold(*a) for a in zip(rows_, cols_, excludes, ks)],
            ),
            ("batched", lambda: kernels.topk_outer_product_batched(rows_, cols_, excludes, ks)),
        ]
        if self.triton:
            methods.insert(
                0,
                (
                    "per_matrix_triton",
                    lambda: [kernels.topk_outer_product_triton(*a) for a in zip(rows_, cols_, excludes, ks)],
                ),
            )
        records, outputs = [], {}
        for method, fn in methods:
            record = self.measure(fn)
            outputs[method] = fn()
            records.append({"matrices": len(shapes), "grown": sum(ks), "method": method, **record})
            print(f"MA growth of {len(shapes)} matrices, {method}: {record['time_ms']:.1f} ms", flush=True)
        first = outputs[methods[0][0]]
        for record in records:
            same = all(torch.equal(a, b) for a, b in zip(outputs[record["method"]], first))
            record["identical_to_first"] = same
        return records

    def bench_value_gradient(self, out_f: int, in_f: int, tokens: int, density: float) -> list[dict]:
        """dL/dvalues of a Linear: dense dY.T @ X + gather against the SDDMM kernel in both layouts."""
        from peft_sparse.kernels.sddmm import clear_token_major_cache, sddmm_launch

        numel = out_f * in_f
        k = max(1, round(density * numel))
        dy, x = self._randn(tokens, out_f), self._randn(tokens, in_f)
        idx = self._indices(numel, k)
        long_idx = idx.long()
        element = dy.element_size()

        def dense():
            return (dy.t() @ x).view(-1)[long_idx].float()

        def unshared(fn):
            # every call transposes x afresh, as for a projection whose input no other projection reads
            return lambda: (clear_token_major_cache(), fn())[1]

        kernels = self.kernels
        methods = {
            "dense_gather": dense,
            "csr": unshared(lambda: kernels.sddmm_csr(dy, x, idx, in_f)),
            "dense": lambda: kernels.sddmm_dense(dy, x, idx, in_f),
        }
        if self.triton:
            methods["sddmm"] = lambda: sddmm_launch(dy, x, idx, in_f)
            methods["sddmm_token_major"] = lambda: sddmm_launch(dy, x, idx, in_f, token_major=True)
            methods["triton_sorted"] = unshared(lambda: kernels.sddmm_triton_sorted(dy, x, idx, in_f))
        if self.device.type == "cpu":
            methods["gather"] = lambda: kernels.sddmm_reference(dy, x, idx, in_f)
        methods["auto"] = unshared(lambda: kernels.sddmm(dy, x, idx, in_f))
        # float32 oracle: shows the bf16 rounding of the dense path next to the SDDMM's float32 accumulation.
        expected = (dy.float().t() @ x.float()).view(-1)[long_idx]
        rows = []
        for method, fn in methods.items():
            record = self.measure(fn, once=self.cpu_full and method == "gather")
            dense_like = method in ("dense_gather", "dense")
            flops = 2 * tokens * (numel if dense_like else k)
            if dense_like:
                moved = tokens * (out_f + in_f) * element + numel * element + k * (element + idx.element_size() + 4)
            else:
                moved = 2 * tokens * k * element + k * (idx.element_size() + 4)
            seconds = record["time_ms"] / 1e3
            max_diff = float((fn() - expected).abs().max())
            if method == "auto":
                record["chose"] = kernels.dispatch.choose_sddmm_strategy(dy, x, idx, in_f, "auto")
                if record["chose"] == "tune":
                    # the pick for exactly this case: (rows, cols, K bucket, tokens bucket) of the tuning key
                    case = (out_f, in_f, kernels.dispatch._bucket(k), kernels.dispatch._bucket(tokens))
                    tuned = [v for key, v in kernels.dispatch.tuned_sddmm_strategies().items() if key[2:6] == case]
                    record["chose"] = "tuned: " + ",".join(sorted(set(tuned)))
            rows.append(
                {
                    "shape": [out_f, in_f],
                    "tokens": tokens,
                    "density": density,
                    "k": k,
                    "method": method,
                    **record,
                    "tflops": flops / seconds / 1e12,
                    "gbps": moved / seconds / 1e9,
                    "max_abs_diff_vs_fp32": max_diff,
                }
            )
        return rows

    def bench_layer(self, out_f: int, in_f: int, tokens: int, density: float) -> list[dict]:
        """Forward + backward of frozen, sparse-delta (the layer and the split formulation) and LoRA linears of equal
        parameter count."""
        torch = self.torch
        functional = torch.nn.functional
        numel = out_f * in_f
        k = max(1, round(density * numel))
        rank = max(1, round(k / (in_f + out_f)))
        weight = self._randn(out_f, in_f, scale=in_f**-0.5)
        x = self._randn(tokens, in_f).requires_grad_(True)
        dy = self._randn(tokens, out_f)
        idx = self._indices(numel, k)
        values = torch.zeros(k, device=self.device, dtype=torch.float32).normal_(0, 1e-3).requires_grad_(True)
        lora_a = self._randn(rank, in_f, scale=in_f**-0.5).requires_grad_(True)
        lora_b = self._randn(out_f, rank, scale=1e-3).requires_grad_(True)
        from peft_sparse.sparse_linear import sparse_delta_linear
        from peft_sparse.tuners.base_weight import base_weight_for

        frozen = torch.nn.Linear(in_f, out_f, bias=False, device=self.device, dtype=self.dtype).requires_grad_(False)
        frozen.weight.copy_(weight)
        base_weight = base_weight_for(frozen)
        sorted_idx = idx.sort().values  # SpIEL keeps a delta's positions in row-major order
        product = self.kernels.sparse_delta_product

        def split_forward():
            return functional.linear(x, weight) + product(x, idx, values, out_f, in_f, setting="triton")

        def step(forward, params):
            for p in params:
                p.grad = None
            forward().backward(dy)

        methods = {
            "frozen": (lambda: functional.linear(x, weight), [x]),
            "sparse_layer": (lambda: sparse_delta_linear(x, base_weight, None, sorted_idx, values), [x, values]),
            "lora": (
                lambda: functional.linear(x, weight) + (x @ lora_a.t()) @ lora_b.t() * (16 / rank),
                [x, lora_a, lora_b],
            ),
        }
        if tokens * k <= self.args.split_max_ratio * numel:
            methods["sparse_split"] = (split_forward, [x, values])
        rows, frozen_ms = [], None
        for method, (forward, params) in methods.items():
            record = self.measure(lambda forward=forward, params=params: step(forward, params))
            frozen_ms = record["time_ms"] if method == "frozen" else frozen_ms
            seconds = record["time_ms"] / 1e3
            rows.append(
                {
                    "shape": [out_f, in_f],
                    "tokens": tokens,
                    "density": density,
                    "k": k,
                    "lora_rank": rank,
                    "method": method,
                    **record,
                    # Two dense GEMMs (y and dx) per step: the frozen layer's work, as a common yardstick.
                    "tflops_frozen_equivalent": 4 * tokens * numel / seconds / 1e12,
                    "slowdown_vs_frozen": record["time_ms"] / frozen_ms,
                }
            )
        return rows

    def bench_apply_delta(self, out_f: int, in_f: int, density: float) -> list[dict]:
        """``W + scatter`` as a new tensor: Triton scatter after a torch clone against the index_add_ reference."""
        numel = out_f * in_f
        k = max(1, round(density * numel))
        weight = self._randn(out_f, in_f)
        idx = self._indices(numel, k)
        values = self.torch.randn(k, device=self.device)
        kernels = self.kernels
        rows = []
        from peft_sparse.delta import merge_exact, restore_exact

        def merge_and_restore(weight, idx, values):
            restore_exact(weight, idx, merge_exact(weight, idx, values))

        methods = [("torch_reference", kernels.apply_delta_reference), ("inplace_merge_restore", merge_and_restore)]
        if self.triton:
            methods.insert(0, ("triton", kernels.apply_delta_triton))
        for method, fn in methods:
            record = self.measure(lambda fn=fn: fn(weight, idx, values))
            moved = 2 * numel * weight.element_size() + k * (2 * weight.element_size() + idx.element_size() + 4)
            rows.append(
                {
                    "shape": [out_f, in_f],
                    "density": density,
                    "k": k,
                    "method": method,
                    **record,
                    "gbps": moved / (record["time_ms"] / 1e3) / 1e9,
                }
            )
        return rows

    def bench_topk(self, out_f: int, in_f: int, density: float) -> list[dict]:
        """SpIEL-MA growth of ``GROWTH_FRACTION * K`` positions: Triton radix select against the chunked reference."""
        torch = self.torch
        numel = out_f * in_f
        k = max(1, round(density * numel))
        grow = max(1, round(GROWTH_FRACTION * k))
        gen = torch.Generator(device=self.device).manual_seed(0)
        row_scores = torch.rand(out_f, generator=gen, device=self.device)
        col_scores = torch.rand(in_f, generator=gen, device=self.device)
        exclude = self._indices(numel, k).long().sort().values
        kernels = self.kernels
        rows, results = [], {}
        methods = [
            ("torch_reference", kernels.topk_outer_product_reference),
            ("torch_threshold", kernels.topk_outer_product_threshold),
        ]
        if self.triton:
            methods.insert(0, ("triton", kernels.topk_outer_product_triton))
        for method, fn in methods:
            once = self.cpu_full and method == "torch_reference"
            record = self.measure(lambda fn=fn: fn(row_scores, col_scores, exclude, grow), once=once)
            results[method] = fn(row_scores, col_scores, exclude, grow)
            rows.append({"shape": [out_f, in_f], "density": density, "k": grow, "method": method, **record})
        for row in rows:
            row["identical_to_reference"] = bool(torch.equal(results[row["method"]], results["torch_reference"]))
        return rows

    def bench_nf4(self, out_f: int, in_f: int, density: float) -> list[dict]:
        """NF4 dequantise + delta in bf16: the Triton kernel against bitsandbytes' dequantize_4bit + clone +
        scatter_add_ (what the SpIEL reference does each forward) and against dequantize_4bit alone."""
        try:
            from bitsandbytes.functional import dequantize_4bit, quantize_4bit
        except ImportError:
            print("bench_kernels: bitsandbytes is not installed, NF4 section skipped")
            return []
        torch = self.torch
        numel = out_f * in_f
        k = max(1, round(density * numel))
        weight = self._randn(out_f, in_f, scale=in_f**-0.5)
        packed, state = quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
        state.dtype = self.dtype
        del weight
        idx = self._indices(numel, k)
        long_idx = idx.long()
        values = (torch.randn(k, device=self.device) * 1e-3).to(self.dtype)  # bf16 deltas, as in the paper
        kernels = self.kernels

        def bnb_clone_scatter_add():
            dense = dequantize_4bit(packed, state).clone()
            dense.view(-1).scatter_add_(0, long_idx, values)
            return dense

        methods = {
            "triton_fused": lambda: kernels.dequantize_nf4_delta_triton(packed, state, idx, values, self.dtype),
            "bnb_dequant_clone_scatter_add": bnb_clone_scatter_add,
            "bnb_dequantize_4bit_only": lambda: dequantize_4bit(packed, state),
        }
        expected = kernels.dequantize_nf4_delta_reference(packed, state, idx, values, self.dtype)
        same = bool(torch.equal(methods["triton_fused"](), expected))
        del expected
        element = torch.finfo(self.dtype).bits // 8
        # The op's own traffic, the same for every method: packed codes, one absmax byte per block of 64, the output,
        # and the K delta entries (index, value, read-modify-write of the output).
        moved = numel // 2 + numel // 64 + numel * element + k * (idx.element_size() + 3 * element)
        rows = []
        for method, fn in methods.items():
            record = self.measure(fn)
            rows.append(
                {
                    "shape": [out_f, in_f],
                    "density": density,
                    "k": k,
                    "method": method,
                    **record,
                    "gbps": moved / (record["time_ms"] / 1e3) / 1e9,
                    "triton_identical_to_reference": same,
                }
            )
        return rows


# ---------------------------------------------------------------------------------------------------- output


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def _table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def to_markdown(results: dict) -> str:
    """The results as Markdown tables, with the definitions of the derived numbers."""
    meta = results["meta"]
    parts = [
        "# Sparse-delta kernel benchmark",
        "",
        (
            f"Device: **{meta['device']}**, date {meta['date']}, torch {meta['torch']}, triton {meta['triton']}, "
            f"dtype {meta['dtype']}, median of up to {meta['repeats']} runs after {meta['warmup']} warm-up."
        ),
    ]
    if meta.get("threads"):
        parts.append(
            f"\nCPU threads: {meta['threads']}; load average (1, 5, 15 min) at the start {meta.get('load_average')}, "
            f"at the end {meta.get('load_average_end')} (the machine is shared: compare methods within a row group)."
        )
    if meta["interpreter"]:
        parts.append("\n**Smoke run on CPU in Triton's interpreter: the timings say nothing about GPU speed.**")
    if meta.get("stopped_early"):
        parts.append(f"\n**Stopped early ({meta['stopped_early']}): the tables hold only what was measured before.**")
    parts += [
        "",
        (
            "Definitions: TFLOP/s counts useful multiply-adds (dense: `2 * tokens * out * in`; SDDMM: "
            "`2 * tokens * K`). GB/s divides a traffic model by the time: dense reads dY and X once and writes "
            "`out * in`; SDDMM counts every gathered element (`2 * tokens * K`), an upper bound as caches serve "
            "repeats. Peak MiB is the extra CUDA memory above what was allocated before the call. Layer "
            "`tflops_frozen_equivalent` is `4 * tokens * out * in` (the frozen layer's two GEMMs) over the time. "
            "Speed-up is the dense_gather time over the method's; x frozen is the step time over the frozen layer's; "
            "max diff compares with a float32 dense dY.T @ X."
        ),
        "",
        "## Reselection (drop + grow 20 % of K, and all of K as at the first reselection; the plan of "
        "SpIELLayer.reselect before it writes the slots)",
        "",
        _table(
            ["out x in", "K", "regrown", "selection", "ms", "CPU ms", "peak MiB"],
            [
                [
                    f"{r['shape'][0]}x{r['shape'][1]}",
                    r["k"],
                    r["regrown"],
                    r["selection"],
                    r["time_ms"],
                    r.get("cpu_ms"),
                    r["peak_mib"],
                ]
                for r in results.get("reselection", [])
            ],
        ),
        "",
        "## SpIEL-MA growth of a model's reselection (every projection of "
        f"{GROWTH_BATCH_LAYERS} Llama-7B layers at LoRA r=64's budgets, {GROWTH_FRACTION:.0%} of K grown): one "
        "search per matrix vs all matrices of a shape searched together",
        "",
        _table(
            ["matrices", "positions grown", "method", "ms", "CPU ms", "peak MiB", "same positions"],
            [
                [
                    r["matrices"],
                    r["grown"],
                    r["method"],
                    r["time_ms"],
                    r.get("cpu_ms"),
                    r["peak_mib"],
                    "yes" if r["identical_to_first"] else "NO",
                ]
                for r in results.get("ma_growth_batch", [])
            ],
        ),
        "",
        "## Value gradient: dense dY.T @ X + gather vs the sddmm strategies",
        "",
        "`auto` is what `peft_sparse.kernels.sddmm` runs (chose: its pick).",
        "",
    ]
    rows = []
    dense_ms: dict[tuple, float] = {}
    for r in results["value_gradient"]:
        key = (tuple(r["shape"]), r["tokens"], r["density"])
        if r["method"] == "dense_gather":
            dense_ms[key] = r["time_ms"]
        rows.append(
            [
                f"{r['shape'][0]}x{r['shape'][1]}",
                r["tokens"],
                f"{r['density']:.1%}",
                r["k"],
                r["method"] + (f" ({r['chose']})" if r.get("chose") else ""),
                r["time_ms"],
                r.get("cpu_ms"),
                r["tflops"],
                r["gbps"],
                r["peak_mib"],
                dense_ms[key] / r["time_ms"],
                r["max_abs_diff_vs_fp32"],
            ]
        )
    parts.append(
        _table(
            [
                "out x in",
                "tokens",
                "density",
                "K",
                "method",
                "ms",
                "CPU ms",
                "TFLOP/s",
                "GB/s",
                "peak MiB",
                "speed-up",
                "max diff",
            ],
            rows,
        )
    )
    if results["layer"]:
        parts += ["", "## Linear layer forward + backward (frozen, sparse delta, LoRA of equal parameter count)", ""]
    rows = [
        [
            f"{r['shape'][0]}x{r['shape'][1]}",
            r["tokens"],
            f"{r['density']:.1%}",
            r["k"],
            r["lora_rank"],
            r["method"],
            r["time_ms"],
            r["slowdown_vs_frozen"],
            r["tflops_frozen_equivalent"],
            r["peak_mib"],
        ]
        for r in results["layer"]
    ]
    headers = ["out x in", "tokens", "density", "K", "LoRA r", "method", "ms", "x frozen", "TFLOP/s eq.", "peak MiB"]
    if rows:
        parts.append(_table(headers, rows))
    parts += ["", "## apply_delta (new tensor W + scatter)", ""]
    rows = [
        [
            f"{r['shape'][0]}x{r['shape'][1]}",
            f"{r['density']:.1%}",
            r["k"],
            r["method"],
            r["time_ms"],
            r.get("cpu_ms"),
            r["gbps"],
        ]
        for r in results["apply_delta"]
    ]
    parts.append(_table(["out x in", "density", "K", "method", "ms", "CPU ms", "GB/s"], rows))
    parts += ["", f"## topk_outer_product (SpIEL-MA growth of {GROWTH_FRACTION:.0%} of K, K active excluded)", ""]
    rows = [
        [
            f"{r['shape'][0]}x{r['shape'][1]}",
            f"{r['density']:.1%}",
            r["k"],
            r["method"],
            r["time_ms"],
            r.get("cpu_ms"),
            r["peak_mib"],
            r["identical_to_reference"],
        ]
        for r in results["topk_outer_product"]
    ]
    headers = ["out x in", "density", "k grown", "method", "ms", "CPU ms", "peak MiB", "same as reference"]
    parts.append(_table(headers, rows))
    if results.get("nf4_dequant_delta"):
        parts += [
            "",
            "## NF4 dequantise + delta (qSpIEL; blocksize 64, double-quantised absmax, bf16 output and deltas)",
            "",
            (
                "GB/s is effective: the op's own traffic (`out * in / 2` packed bytes, one absmax byte per 64, the "
                "output, and K delta entries) over the time, the same model for every method. Speed-up is the "
                "bitsandbytes dequantize_4bit + clone + scatter_add_ time over the method's. Same as reference: the "
                "Triton result equals `dequantize_nf4_delta_reference` bit for bit."
            ),
            "",
        ]
        bnb_ms = {
            (tuple(r["shape"]), r["density"]): r["time_ms"]
            for r in results["nf4_dequant_delta"]
            if r["method"] == "bnb_dequant_clone_scatter_add"
        }
        rows = [
            [
                f"{r['shape'][0]}x{r['shape'][1]}",
                f"{r['density']:.1%}",
                r["k"],
                r["method"],
                r["time_ms"],
                r["gbps"],
                bnb_ms[(tuple(r["shape"]), r["density"])] / r["time_ms"],
                r["peak_mib"],
                r["triton_identical_to_reference"],
            ]
            for r in results["nf4_dequant_delta"]
        ]
        headers = ["out x in", "density", "K", "method", "ms", "GB/s", "speed-up", "peak MiB", "same as reference"]
        parts.append(_table(headers, rows))
    return "\n".join(parts) + "\n"


def plot(results: dict, path: Path) -> bool:
    """Time against density per shape: value gradient (top) and layer step (bottom). False without matplotlib or
    without such results (``--reselection-only``)."""
    if not results.get("value_gradient"):
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench_kernels: matplotlib is not installed, no plot written")
        return False
    shapes = sorted({tuple(r["shape"]) for r in results["value_gradient"]})
    tokens = sorted({r["tokens"] for r in results["value_gradient"]})
    styles = ["-", "--", ":", "-."]
    groups = [g for g in ("value_gradient", "layer") if results[g]]
    fig, axes = plt.subplots(len(groups), len(shapes), figsize=(5 * len(shapes), 4 * len(groups)), squeeze=False)
    for row, group in enumerate(groups):
        methods = sorted({r["method"] for r in results[group]})
        colors = {m: f"C{i}" for i, m in enumerate(methods)}
        for col, shape in enumerate(shapes):
            ax = axes[row][col]
            for method in methods:
                for t_i, t in enumerate(tokens):
                    points = sorted(
                        (r["density"] * 100, r["time_ms"])
                        for r in results[group]
                        if tuple(r["shape"]) == shape and r["tokens"] == t and r["method"] == method
                    )
                    if points:
                        xs, ys = zip(*points, strict=True)
                        label = f"{method}, {t} tok"
                        ax.plot(xs, ys, styles[t_i % 4], color=colors[method], marker="o", label=label)
            ax.set_yscale("log")
            ax.set_xlabel("density (%)")
            ax.set_ylabel("ms")
            title = "dL/dvalues" if group == "value_gradient" else "layer fwd+bwd"
            ax.set_title(f"{title}, [{shape[0]}, {shape[1]}]")
            ax.grid(True, which="both", alpha=0.3)
        axes[row][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    meta = results["meta"]
    fig.suptitle(f"{meta['device']} {meta['dtype']} ({meta['date'][:10]})" + (" INTERPRETER" * meta["interpreter"]))
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True


def write_results(results: dict, out: Path) -> None:
    """Write JSON, Markdown and PNG named after the device into ``out`` and print the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    meta = results["meta"]
    slug = "".join(ch if ch.isalnum() else "_" for ch in meta["device"]).strip("_").lower() or "device"
    if meta["small"]:
        slug += "_small"
    if meta.get("reselection_only"):
        slug += "_reselection"
    stem = out / f"bench_kernels_{slug}"
    Path(f"{stem}.json").write_text(json.dumps(results, indent=1) + "\n")
    markdown = to_markdown(results)
    Path(f"{stem}.md").write_text(markdown)
    plotted = plot(results, Path(f"{stem}.png"))
    print(markdown)
    written = [f"{stem}.json", f"{stem}.md"] + ([f"{stem}.png"] if plotted else [])
    print("wrote " + ", ".join(written))


if __name__ == "__main__":
    sys.exit(main())
