"""LT-SFT selection: time and peak extra memory of the exact global top-K over a model's worth of tensors.

Random "pre-trained" and "fine-tuned" tensors with Llama-like shapes (``--hidden``) add up to ``--numel`` entries;
``peft_sparse.selection.largest_changes`` selects ``K = density * numel`` of them exactly. Peak extra memory is the
highest resident set size sampled during the selection minus the size just before it (CPU), or the CUDA allocator's
peak minus its level before (CUDA). ``--reference-numel N`` also times composable-sft's way (a Python list of every
``|diff|`` and ``np.partition``) on N entries, and ``--check`` compares the result with a dense ``torch.sort``.

    python benchmarks/bench_ltsft_selection.py                       # 50M entries, < 1 min on a 2-core CPU
    python benchmarks/bench_ltsft_selection.py --numel 1000000000    # 1B entries: ~8 GB for the two copies

Writes ``bench_ltsft_selection_<device>.json`` and ``.md`` into ``benchmarks/results/`` (or ``--out``).

Measured 2026-11-21 on the project's 2-core x86-64 CPU machine (23 GB, torch 2.13.0+cpu, other jobs running):

    --numel 1000000000 (178 tensors, K = 10,000,000, float32): 14.9 s, one pass, peak extra memory 971 MiB
        (the inputs are 7.6 GiB; the extra is the ~K kept (value, position) pairs and their copies)
    --numel 20000000 --reference-numel 20000000 --check: 0.3-1.3 s, matches a dense torch.sort; the Python-list
        selection of composable-sft takes 4.4 s on the same 20M entries (~220 s and ~32 GB of Python floats at 1B)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import threading
import time
from pathlib import Path

import numpy as np
import torch

from peft_sparse.selection import ChangeSource, largest_changes


def llama_like_shapes(numel: int, hidden: int) -> list[tuple[int, ...]]:
    """Tensor shapes of a Llama-like stack (attention, MLP, norms) until ``numel`` entries; the last one is cut."""
    ffn = int(hidden * 8 / 3) // 64 * 64
    cycle = [(hidden, hidden)] * 4 + [(ffn, hidden), (ffn, hidden), (hidden, ffn), (hidden,), (hidden,)]
    shapes, total = [], 0
    while total < numel:
        for shape in cycle:
            size = int(np.prod(shape))
            if total + size > numel:
                rest = numel - total
                if rest:
                    shapes.append((rest,))
                total = numel
                break
            shapes.append(shape)
            total += size
    return shapes


def make_tensors(shapes, device: str, dtype: torch.dtype, seed: int) -> tuple[list, list]:
    generator = torch.Generator(device=device).manual_seed(seed)
    before, after = [], []
    for shape in shapes:
        t0 = torch.randn(shape, generator=generator, device=device, dtype=torch.float32).to(dtype)
        t1 = t0.clone()
        t1.add_(torch.randn(shape, generator=generator, device=device, dtype=torch.float32).to(dtype), alpha=1e-3)
        before.append(t0)
        after.append(t1)
    return before, after


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak extra memory during a block: CUDA allocator peak, or sampled resident set size on CPU."""

    def __init__(self, device: str) -> None:
        self.device, self.peak, self._stop = device, 0, threading.Event()

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = _rss_bytes()
            self.peak = self.base
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, _rss_bytes())
        self.extra = self.peak - self.base


def python_list_selection(before, after, k: int) -> float:
    """composable-sft's selection (every |diff| into a Python list, then np.partition); returns the threshold."""
    diffs = []
    for b, a in zip(before, after):
        diffs.extend((a.float() - b.float()).abs().reshape(-1).tolist())
    diffs = np.partition(diffs, len(diffs) - k)
    return float(diffs[len(diffs) - k])


def dense_reference(before, after, k: int) -> list[torch.Tensor]:
    flat = torch.cat([(a.float() - b.float()).abs().reshape(-1) for b, a in zip(before, after)])
    order = torch.sort(flat, descending=True, stable=True).indices[:k]
    chosen = torch.sort(order).values
    out, start = [], 0
    for b in before:
        lo, hi = torch.searchsorted(chosen, torch.tensor([start, start + b.numel()], device=chosen.device))
        out.append(chosen[lo:hi] - start)
        start += b.numel()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--numel", type=int, default=50_000_000, help="total entries over all tensors (default 50M)")
    p.add_argument("--density", type=float, default=0.01, help="K = density * numel (default 0.01)")
    p.add_argument("--hidden", type=int, default=2048, help="hidden size of the Llama-like shapes (default 2048)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--chunk-size", type=int, default=1 << 23, help="entries scored at a time (default 2**23)")
    p.add_argument("--reference-numel", type=int, default=0, help="also time the Python-list way on this many")
    p.add_argument("--check", action="store_true", help="compare with a dense torch.sort (needs more memory)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    k = max(1, int(args.density * args.numel))

    shapes = llama_like_shapes(args.numel, args.hidden)
    started = time.perf_counter()
    before, after = make_tensors(shapes, args.device, dtype, args.seed)
    made = time.perf_counter() - started
    print(
        f"{len(shapes)} tensors, {args.numel:,} entries ({args.dtype}, {args.device}), K = {k:,}; made in {made:.1f} s"
    )
    sources = [ChangeSource(a, b) for b, a in zip(before, after)]
    with PeakMemory(args.device) as memory:
        t0 = time.perf_counter()
        result = largest_changes(sources, k, chunk_size=args.chunk_size)
        if args.device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    assert result.count == k
    row = {
        "numel": args.numel,
        "k": k,
        "tensors": len(shapes),
        "device": args.device,
        "dtype": args.dtype,
        "seconds": round(seconds, 3),
        "passes": result.passes,
        "peak_extra_mib": round(memory.extra / 2**20, 1),
        "inputs_mib": round(2 * args.numel * torch.finfo(dtype).bits / 8 / 2**20, 1),
        "threads": torch.get_num_threads(),
    }
    if args.check:
        expected = dense_reference(before, after, k)
        row["matches_dense_sort"] = all(torch.equal(g, e) for g, e in zip(result.indices, expected))
    if args.reference_numel:
        ref_shapes = llama_like_shapes(args.reference_numel, args.hidden)
        rb, ra = make_tensors(ref_shapes, "cpu", torch.float32, args.seed)
        rk = max(1, int(args.density * args.reference_numel))
        t0 = time.perf_counter()
        python_list_selection(rb, ra, rk)
        row["python_list_numel"] = args.reference_numel
        row["python_list_seconds"] = round(time.perf_counter() - t0, 3)
        t0 = time.perf_counter()
        largest_changes([ChangeSource(a, b) for b, a in zip(rb, ra)], rk, chunk_size=args.chunk_size)
        row["chunked_seconds_same_numel"] = round(time.perf_counter() - t0, 3)

    stamp = {
        "date": datetime.date.today().isoformat(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
    }
    if args.device == "cuda":
        stamp["gpu"] = torch.cuda.get_device_name()
    print(json.dumps({**row, **stamp}, indent=1))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"bench_ltsft_selection_{args.device}"
    (out / f"{name}.json").write_text(json.dumps({"result": row, **stamp}, indent=1) + "\n")
    lines = [
        f"# LT-SFT selection ({stamp['date']}, {args.device}, {os.cpu_count()} CPUs, torch {torch.__version__})",
        "",
        "| entries | K | tensors | seconds | passes | peak extra MiB | inputs MiB |",
        "|---|---|---|---|---|---|---|",
        (
            f"| {args.numel:,} | {k:,} | {len(shapes)} | {row['seconds']} | {row['passes']} | "
            f"{row['peak_extra_mib']} | {row['inputs_mib']} |"
        ),
    ]
    if args.reference_numel:
        lines += [
            "",
            (
                f"Python-list selection (composable-sft) on {args.reference_numel:,} entries: "
                f"{row['python_list_seconds']} s; chunked on the same: {row['chunked_seconds_same_numel']} s."
            ),
        ]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / name}.json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
