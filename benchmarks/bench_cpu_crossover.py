"""Where ``csr`` beats ``dense`` for the values' gradient on the CPU, and how well the dispatch rule predicts it.

For each matrix shape, density and token count it times ``peft_sparse.kernels.sddmm_csr`` (sampled products on
transposed operands) and ``sddmm_dense`` (the dense ``dY^T X`` and a gather), the median of ``--repeats`` calls after
two warm-up calls, with the transposed-operand cache cleared and 32 MiB written between calls so that every call
starts from memory, as in a training step. Each row gives the measured csr / dense time, the ratio the dispatch
rule estimates (``kernels.dispatch.cpu_csr_cost_ratio``: ``CPU_CSR_ENTRY_COST * K + threads ** CPU_CSR_THREAD_EXPONENT
* CPU_CSR_FEATURE_COST * (rows + cols)`` against ``rows * cols``), the strategy it picks and how much slower that is
than the faster one.

    python benchmarks/bench_cpu_crossover.py --threads 1      # the grid the rule was fitted to, < 1 minute
    python benchmarks/bench_cpu_crossover.py --threads 2      # the same with two threads
    python benchmarks/bench_cpu_crossover.py --small          # a few points, seconds

Writes ``bench_cpu_crossover_threads<N>.json`` and ``.md`` into ``benchmarks/results/`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from peft_sparse.kernels import dispatch
from peft_sparse.kernels.sddmm import clear_token_major_cache, sddmm_csr, sddmm_dense

SHAPES = ((128, 128), (352, 128), (256, 256), (512, 512), (1024, 512), (1024, 1024), (2816, 1024), (1024, 2816))
DENSITIES = (0.005, 0.02, 0.05, 0.1)
TOKENS = (128, 512, 2048)
# the largest dense product timed (tokens * rows * cols): keeps the grid to a few minutes
MAX_WORK = 2048 * 1024 * 1024
REPEATS = 15


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--repeats", type=int, default=REPEATS, help="timed calls per point (5 for the largest)")
    parser.add_argument("--small", action="store_true", help="three shapes, two densities, 128 tokens")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    return args


def _median_seconds(fn, repeats: int, flush: torch.Tensor) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        clear_token_major_cache()
        flush.mul_(1.0)
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure(args: argparse.Namespace) -> list[dict]:
    if args.small:
        shapes, densities, tokens = SHAPES[:2] + SHAPES[5:6], DENSITIES[1:3], TOKENS[:1]
    else:
        shapes, densities, tokens = SHAPES, DENSITIES, TOKENS
    flush = torch.ones(8 << 20)
    generator = torch.Generator().manual_seed(0)
    rows_out = []
    for n_tokens in tokens:
        for rows, cols in shapes:
            for density in densities:
                if n_tokens * rows * cols > MAX_WORK:
                    continue
                k = max(1, int(density * rows * cols))
                indices = torch.randperm(rows * cols, generator=generator)[:k]
                dy = torch.randn(n_tokens, rows, generator=generator)
                x = torch.randn(n_tokens, cols, generator=generator)
                # both sum the same float32 products over the tokens in different orders
                torch.testing.assert_close(
                    sddmm_csr(dy, x, indices, cols),
                    sddmm_dense(dy, x, indices, cols),
                    rtol=1e-4,
                    atol=1e-4 * n_tokens**0.5,
                )
                repeats = min(args.repeats, 5) if n_tokens * rows * cols > MAX_WORK // 4 else args.repeats
                operands = (dy, x, indices, cols)
                csr = _median_seconds(lambda operands=operands: sddmm_csr(*operands), repeats, flush)
                dense = _median_seconds(lambda operands=operands: sddmm_dense(*operands), repeats, flush)
                estimate = dispatch.cpu_csr_cost_ratio(rows, cols, k, args.threads)
                chosen = "csr" if dispatch.cpu_csr_is_faster(rows, cols, k, args.threads) else "dense"
                record = {
                    "tokens": n_tokens,
                    "rows": rows,
                    "cols": cols,
                    "k": k,
                    "density": k / (rows * cols),
                    "csr_s": csr,
                    "dense_s": dense,
                    "measured_ratio": csr / dense,
                    "estimated_ratio": estimate,
                    "chosen": chosen,
                    "chosen_over_fastest": (csr if chosen == "csr" else dense) / min(csr, dense),
                }
                rows_out.append(record)
                print(
                    f"{n_tokens:5d} tokens [{rows}, {cols}] {record['density']:.1%}: csr {csr * 1e3:.3f} ms, dense "
                    f"{dense * 1e3:.3f} ms, ratio {record['measured_ratio']:.2f} (estimated "
                    f"{record['estimated_ratio']:.2f}), picks {chosen}",
                    flush=True,
                )
    return rows_out


def summary(rows: list[dict]) -> dict:
    errors = [abs(r["estimated_ratio"] / r["measured_ratio"] - 1) for r in rows]
    return {
        "points": len(rows),
        "estimate_within_15_percent": sum(e <= 0.15 for e in errors),
        "estimate_within_25_percent": sum(e <= 0.25 for e in errors),
        "picks_the_slower": sum(r["chosen_over_fastest"] > 1 for r in rows),
        "worst_chosen_over_fastest": max((r["chosen_over_fastest"] for r in rows), default=None),
    }


def to_markdown(meta: dict, rows: list[dict]) -> str:
    s = meta["summary"]
    lines = [
        "# CPU value gradient: csr against dense",
        "",
        f"Measured {meta['date']} on {meta['machine']}, {meta['threads']} torch thread(s): `{meta['command']}`.",
        f"Rule: csr when {dispatch.CPU_CSR_ENTRY_COST} K + threads^{dispatch.CPU_CSR_THREAD_EXPONENT} x "
        f"{dispatch.CPU_CSR_FEATURE_COST} (rows + cols) < rows cols.",
        f"Estimate within 15 % of the measured ratio at {s['estimate_within_15_percent']} of {s['points']} points, "
        f"within 25 % at {s['estimate_within_25_percent']}; the rule picks the slower strategy at "
        f"{s['picks_the_slower']}, at worst {s['worst_chosen_over_fastest']:.2f}x the faster one's time.",
        "",
        "| tokens | shape | density | csr (ms) | dense (ms) | csr / dense | estimated | picks | picked / fastest |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['tokens']:,} | [{r['rows']}, {r['cols']}] | {r['density']:.1%} | {r['csr_s'] * 1e3:.3f} | "
            f"{r['dense_s'] * 1e3:.3f} | {r['measured_ratio']:.2f} | {r['estimated_ratio']:.2f} | {r['chosen']} | "
            f"{r['chosen_over_fastest']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = measure(args)
    meta = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, torch {torch.__version__}",
        "threads": args.threads,
        "command": "python benchmarks/bench_cpu_crossover.py "
        + " ".join(
            a
            for a in (
                f"--threads {args.threads}",
                f"--repeats {args.repeats}" if args.repeats != REPEATS else "",
                "--small" if args.small else "",
            )
            if a
        ),
        "rule": {
            "entry_cost": dispatch.CPU_CSR_ENTRY_COST,
            "feature_cost": dispatch.CPU_CSR_FEATURE_COST,
            "thread_exponent": dispatch.CPU_CSR_THREAD_EXPONENT,
        },
        "summary": summary(rows),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"bench_cpu_crossover_threads{args.threads}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    stem.with_suffix(".md").write_text(to_markdown(meta, rows))
    print(f"wrote {stem}.json and .md: {meta['summary']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
