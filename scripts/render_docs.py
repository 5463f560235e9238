"""Fill the generated blocks of README.md and docs/*.md from the committed results files.

A generated block is everything between two markers in a Markdown file::

    <!-- BEGIN generated: NAME -->
    ...written by this script, never by hand...
    <!-- END generated: NAME -->

``NAME`` is a key of ``SOURCES``: the results file(s) the block is made from and the function that writes it.
Numbers in the README and the docs therefore always come from a file a script wrote, and the configuration tables
from the config classes' field help; ``tests/test_docs.py`` fails when a block (or a copied image, ``ASSETS``)
differs from what this script would write now.

    python scripts/render_docs.py            # rewrite the blocks in place
    python scripts/render_docs.py --check    # exit status 1 (and the names) if any block is out of date

After re-running a benchmark or the quickstart (each one's docstring gives its command), run this script and commit
both. To add a table: write a function ``render_x(root) -> str`` that reads the committed file(s), add one entry
``"x": render_x`` to ``SOURCES``, and put the two markers where the table belongs. A benchmark that already writes a
Markdown report can be included as it is with ``markdown_file("benchmarks/results/.../results.md")``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(
    r"(?P<begin><!-- BEGIN generated: (?P<name>[\w.-]+) -->\n)(?P<body>.*?)(?P<end><!-- END generated: (?P=name) -->)",
    re.S,
)


def _read_json(root: Path, relative: str):
    return json.loads((root / relative).read_text(encoding="utf-8"))


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _day(date: str) -> str:
    return date[:10]


# --------------------------------------------------------------------------------------------- renderers
def render_quickstart(root: Path) -> str:
    """SpIEL vs LoRA from ``examples/quickstart.py`` (``benchmarks/results/quickstart/results.json``)."""
    r = _read_json(root, "benchmarks/results/quickstart/results.json")
    v = r["versions"]
    rows = []
    for row in r["rows"]:
        rows.append(
            [
                row["method"],
                f"{row['params']:,}" if row["params"] is not None else "-",
                f"{row['train']:.4f}" if row["train"] is not None else "-",
                f"{row['held']:.4f}",
                f"{row['step']:.3f}" if row["step"] is not None else "-",
            ]
        )
    table = _table(["method", "trainable params", "final train loss", "held-out loss", "median step (s)"], rows)
    moves = r["curves"]["SpIEL"]["reselections"]  # [update, entries moved, budget]
    reselections = [step for step, _, _ in moves]
    checks = r["checks"]
    st = r["settings"]
    settings = (
        f"{st['steps']} optimizer updates of {st['batch_size']} x {st['seq_len']} tokens per method, rank "
        f"{st['rank']}, SpIEL-{st['selection'].upper()} lr {st['spiel_lr']:g} with reselection every "
        f"{st['reselection_steps']} updates, LoRA lr {st['lora_lr']:g}, seed {st['seed']}"
    )
    load = r.get("load_average_1min")
    load = (
        f", load average {load[0]:.1f} at the start and {load[1]:.1f} at the end"
        if load and load[0] is not None
        else ""
    )
    ok = "OK" if checks["reload_ok"] and checks["merge_ok"] else "FAILED"
    return (
        f"Measured {_day(r['date'])} on {r['machine']}, {r['threads']} torch thread(s) (torch {v['torch']}, "
        f"transformers {v['transformers']}, peft {v['peft']}, peft-sparse {v['peft_sparse']}): "
        f"`{r['command']}` ({r['total_time_s']:.0f} s in all{load}); {settings}. Losses in {r['loss_unit']}; "
        f"final train loss = mean of the last 10 steps.\n\n"
        f"{table}\n\n"
        f"SpIEL reselections after updates {reselections}"
        + (f"; the first moved {moves[0][1]:,} of {moves[0][2]:,} entries, the last {moves[-1][1]:,}" if moves else "")
        + f". Save, reload and `merge_and_unload()` reproduce the "
        f"trained model's logits: {ok} (largest differences {checks['reload_max_abs_logit_diff']:.1e} and "
        f"{checks['merge_max_abs_logit_diff']:.1e}).\n"
    )


def _bench_train(root: Path, folder: str) -> tuple[dict, list[dict]]:
    meta = _read_json(root, f"benchmarks/results/{folder}/meta.json")
    records = [r for r in _read_json(root, f"benchmarks/results/{folder}/results.json") if "error" not in r]
    return meta, [r for r in records if not r["gradient_checkpointing"]]


_METHOD_NAMES = {
    "full": "full fine-tuning",
    "lora": "LoRA",
    "lora-dropout": "LoRA, dropout 0.1",
    "ia3": "(IA)^3",
    "spiel-ag": "SpIEL-AG",
    "spiel-ma": "SpIEL-MA (SM3)",
    "spiel-random": "SpIEL-random",
    "ltsft": "LT-SFT (both phases)",
    "qlora": "qLoRA",
    "qspiel-ag": "qSpIEL-AG",
    "qspiel-ma": "qSpIEL-MA",
}


def _bench_train_ratios(root: Path, folder: str) -> str:
    meta, records = _bench_train(root, folder)
    lora = next(r for r in records if r["method"] == "lora")
    # methods interleaved update by update in one process, when that run is committed too: steadier ratios
    interleaved_file = f"benchmarks/results/{folder}/interleaved.json"
    interleaved = _read_json(root, interleaved_file) if (root / interleaved_file).exists() else None
    rows = []
    for r in records:
        if r["method"] == "lora":
            continue
        row = [
            _METHOD_NAMES.get(r["method"], r["method"]),
            f"{r['trainable_params']:,}",
            f"{r['step_time_s_median'] / lora['step_time_s_median']:.2f}",
        ]
        if interleaved is not None:
            entry = interleaved["methods"].get(r["method"])
            row.append("-" if entry is None else f"{entry['cpu_ratio_median']:.2f} / {entry['cpu_ratio_of_sums']:.2f}")
        row += [
            f"{r['peak_mem_above_baseline_bytes'] / lora['peak_mem_above_baseline_bytes']:.2f}",
            f"{r['eval_loss'] - lora['eval_loss']:+.4f}",
        ]
        rows.append(row)
    header = ["method", "trainable", "step time (median) / LoRA"]
    if interleaved is not None:
        header.append("interleaved: per update (median) / whole run")
    header += ["training memory above baseline / LoRA", "held-out loss - LoRA"]
    text = (
        f"Measured {_day(meta['date'])} on {meta['machine']}: `{meta['command']}`. Gradient checkpointing off; "
        f"LoRA (dropout 0): {lora['step_time_s_median']:.4f} s per update, held-out loss {lora['eval_loss']:.4f} "
        f"(nats per byte). Full table: `benchmarks/results/{folder}/results.md`."
    )
    if interleaved is not None:
        text += (
            f" Interleaved: CPU-time ratios to LoRA's update in the same round, with every method in one process "
            f"(`{interleaved['command']}`, {_day(interleaved['date'])}; "
            f"`benchmarks/results/{folder}/interleaved.md`); each method in its own process, as in the step-time "
            "column, the ratios move by 10-30 % between runs on a shared machine."
        )
    return f"{text}\n\n{_table(header, rows)}\n"


def render_bench_train_cpu_tiny(root: Path) -> str:
    """``benchmarks/bench_train.py --preset cpu-tiny``: every method as ratios to LoRA."""
    return _bench_train_ratios(root, "cpu-tiny")


def render_bench_train_cpu_tiny_120(root: Path) -> str:
    """The same preset for 120 updates: quality against LoRA and where the sparse entries sit."""
    meta, records = _bench_train(root, "cpu-tiny-120")
    lora = next(r for r in records if r["method"] == "lora")
    rows = []
    for r in records:
        d = r.get("delta_structure")
        if not d:
            continue
        rows.append(
            [
                _METHOD_NAMES.get(r["method"], r["method"]),
                f"{r['eval_loss'] - lora['eval_loss']:+.4f}",
                f"{100 * d['rows_covered']:.1f}%",
                f"{100 * d['cols_covered']:.1f}%",
                f"{100 * d['top_decile_rows_share']:.1f}%",
            ]
        )
    table = _table(
        [
            "method",
            "held-out loss - LoRA",
            "rows with an entry",
            "columns with an entry",
            "entries in the fullest 10 % of rows",
        ],
        rows,
    )
    return (
        f"Measured {_day(meta['date'])} on {meta['machine']}: `{meta['command']}`. Entry positions after training, "
        f"mean over the deltas. Full table: `benchmarks/results/cpu-tiny-120/results.md`.\n\n{table}\n"
    )


def render_bench_formulations(root: Path) -> str:
    """``benchmarks/bench_formulations.py``: merged (W + delta) against split (x W^T + x delta^T) layers."""
    r = _read_json(root, "benchmarks/results/bench_formulations_cpu.json")
    meta = r["meta"]
    rows = [
        [
            f"{100 * row['density']:.2f}%",
            f"{row['tokens']:,}",
            f"{row['split_train_s'] / row['merged_train_s']:.2f}",
            f"{row['split_inference_s'] / row['merged_inference_s']:.2f}",
            "yes" if row["results_agree"] else "NO",
        ]
        for row in r["rows"]
    ]
    table = _table(
        ["density", "tokens", "training: split time / merged", "inference: split time / merged", "results agree"],
        rows,
    )
    return (
        f"Measured {_day(meta['date'])} on {meta['machine']}: `{meta['command']}`; weight [{meta['shape']}], "
        f"medians; above 1 the merged layer is faster. Times in ms: "
        f"`benchmarks/results/bench_formulations_cpu.md`.\n\n{table}\n"
    )


def render_bench_ltsft_selection(root: Path) -> str:
    """``benchmarks/bench_ltsft_selection.py``: exact global top-K over many tensors."""
    r = _read_json(root, "benchmarks/results/bench_ltsft_selection_cpu.json")
    x = r["result"]
    table = _table(
        ["entries", "K", "tensors", "seconds", "passes", "peak extra memory (MiB)", "inputs (MiB)"],
        [
            [
                f"{x['numel']:,}",
                f"{x['k']:,}",
                f"{x['tensors']}",
                f"{x['seconds']:.1f}",
                f"{x['passes']}",
                f"{x['peak_extra_mib']:.0f}",
                f"{x['inputs_mib']:.0f}",
            ]
        ],
    )
    return (
        f"Measured {_day(r['date'])} on {r['machine']} ({r['cpus']} CPUs, torch {r['torch']}, {x['dtype']}, "
        f"{x['threads']} threads): `python benchmarks/bench_ltsft_selection.py --numel {x['numel']}`.\n\n{table}\n"
    )


def _config_fields(class_name: str) -> Callable[[Path], str]:
    """A renderer of the fields a peft-sparse config adds to PEFT's ``PeftConfig``: name, default, help text."""

    def render(root: Path) -> str:
        import dataclasses

        from peft.config import PeftConfig

        import peft_sparse

        cls = getattr(peft_sparse, class_name)
        inherited = {f.name for f in dataclasses.fields(PeftConfig)}
        rows = []
        for f in dataclasses.fields(cls):
            if f.name in inherited or not f.init:
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            help_text = " ".join(f.metadata.get("help", "").split()).replace("|", "\\|")
            rows.append([f"`{f.name}`", f"`{default!r}`", help_text])
        return (
            f"Generated from the field help of `peft_sparse.{class_name}`, besides PEFT's common fields "
            f"(`task_type`, `inference_mode`, ...).\n\n" + _table(["field", "default", "meaning"], rows) + "\n"
        )

    render.__doc__ = f"The fields of ``peft_sparse.{class_name}``."
    return render


# The README's quality table: each method as the library runs it by default, plus SpIEL-AG without moment seeding
# (method, tag, weight decay); the docs' table has every variant that was measured.
QUALITY_HEADLINE = {
    ("lora", "", 0.0),
    ("spiel-ag", "as-stepped", 0.0),
    ("spiel-ag", "no-seeding", 0.0),
    ("spiel-ma", "ma-regrow", 0.0),
    ("spiel-random", "", 0.0),
    ("ltsft", "", 0.0),
    ("full", "", 0.0),
}


def render_quality_headline(root: Path) -> str:
    """The quality table restricted to ``QUALITY_HEADLINE`` (the library's defaults)."""
    return render_quality(root, headline=True)


def render_quality(root: Path, headline: bool = False) -> str:
    """SpIEL vs LoRA on SmolLM2-135M-Instruct (``benchmarks/results/quality/results.json``, ``bench_quality.py``)."""
    sys.path.insert(0, str(root / "benchmarks"))
    import bench_quality  # noqa: E402 - the benchmark's own aggregation, not a copy of it

    records = [r for r in _read_json(root, "benchmarks/results/quality/results.json") if not r.get("error")]
    rows = []
    for row in bench_quality.summarize(records):
        if headline and (row["method"], row["tag"] or "", row["weight_decay"]) not in QUALITY_HEADLINE:
            continue
        several = len(row["seeds"]) > 1
        swept = sorted({r["lr"] for r in row["group"] if r["seed"] == row["seeds"][0]})
        edge = " (grid edge)" if len(swept) > 1 and row["lr"] in (swept[0], swept[-1]) else ""
        rows.append(
            [
                bench_quality.label(row),
                str(row["records"][0]["updates"]),
                f"{row['lr']:g}{edge}",
                ", ".join(f"{lr:g}" for lr in swept),
                ",".join(str(s) for s in row["seeds"]),
                bench_quality.mean_std(row["eval_loss"], ".4f", several),
                bench_quality.mean_std(row["exact_match"], ".3f", several),
                " / ".join(f"{row['per_task'][t][0]:.2f}" for t in bench_quality.TASKS if t in row["per_task"]),
            ]
        )
    table = _table(
        [
            "method [tag]",
            "updates",
            "best lr",
            "lrs swept",
            "seeds",
            "held-out answer loss",
            "exact match",
            "EM " + " / ".join(bench_quality.TASKS),
        ],
        rows,
    )
    days = sorted({_day(r["date"]) for r in records})
    machines = "; ".join(sorted({r["machine"] for r in records}))
    return (
        f"Measured {days[0]}{'..' + days[-1] if len(days) > 1 else ''} on {machines}, one torch thread per run "
        f"(`benchmarks/bench_quality.py`; settings, per-lr sweep and commands in "
        f"`benchmarks/results/quality/results.md`). Mean +- std over the seeds at each method's best lr (by the "
        "first seed's held-out loss); every sparse method trains exactly LoRA r=8's parameter count.\n\n"
        + table
        + "\n"
    )


def render_gpu_check(root: Path) -> str:
    """The H200 run of ``benchmarks/gpu_check.sh`` (``benchmarks/results/gpu-check``): training step time and memory
    per method, the interleaved ratios, and the value-gradient strategies at Llama-7B shapes."""
    base = "benchmarks/results/gpu-check"
    meta = _read_json(root, f"{base}/train/meta.json")
    records = {r["method"]: r for r in _read_json(root, f"{base}/train/results.json")}
    interleaved = _read_json(root, f"{base}/train/interleaved.json")["methods"]
    kernels = _read_json(root, f"{base}/bench_kernels_nvidia_h200.json")
    lora = records["lora"]
    rows = []
    for method, r in records.items():
        mixed = interleaved.get(method, {})
        rows.append(
            [
                method,
                f"{r['step_time_s_median'] * 1e3:.1f}",
                f"{r['step_time_s_median'] / lora['step_time_s_median']:.2f}",
                f"{r['step_time_s_mean'] * 1e3:.1f}",
                f"{r['step_time_s_mean'] / lora['step_time_s_mean']:.2f}",
                f"{mixed['ratio_median']:.3f} / {mixed['ratio_of_sums']:.3f}" if mixed else "-",
                f"{r['peak_mem_bytes'] / 2**20:,.0f}",
                f"{r['peak_mem_bytes'] / lora['peak_mem_bytes']:.2f}",
            ]
        )
    training = _table(
        [
            "method",
            "update ms (median)",
            "/ LoRA",
            "update ms (mean, whole run)",
            "/ LoRA",
            "interleaved: per update / whole run",
            "peak MiB",
            "/ LoRA",
        ],
        rows,
    )
    by_case: dict[tuple, dict[str, dict]] = {}
    for r in kernels["value_gradient"]:
        by_case.setdefault((tuple(r["shape"]), r["tokens"], r["density"]), {})[r["method"]] = r
    kernel_rows = []
    for (shape, tokens, density), methods in by_case.items():
        auto = methods["auto"]
        kernel_rows.append(
            [
                f"{shape[0]}x{shape[1]}",
                str(tokens),
                f"{density:.1%}",
                *(f"{methods[m]['time_ms']:.3g}" for m in ("dense_gather", "dense", "csr", "triton_sorted")),
                f"{auto['time_ms']:.3g} ({auto['chose'].removeprefix('tuned: ')})",
            ]
        )
    value_gradient = _table(
        ["out x in", "tokens", "density", "dense bf16 + gather", "dense", "csr", "triton_sorted", "auto (picks)"],
        kernel_rows,
    )
    km = kernels["meta"]
    return (
        f"Measured {_day(meta['date'])} on {meta['machine']}, `benchmarks/gpu_check.sh` "
        f"(`{base}/summary.md`). Two decoder layers of Llama-7B's shape, bf16, 2 x 2048 tokens, LoRA r=64 against "
        f"each SpIEL at its parameter count, {meta['settings']['steps']} updates (reselections after updates 5 and "
        "25; median and mean after 3 warm-up updates; whole-run figures include the first reselection's Triton "
        f"compilation and tuning). Full tables: `{base}/train/results.md`, `{base}/train/interleaved.md`.\n\n"
        + training
        + f"\n\nValue gradient (`sddmm`) in ms at Llama-7B shapes ({km['dtype']}, torch {km['torch']}, Triton "
        f"{km['triton']}): the dense product in bf16 then a gather (what earlier implementations do; bf16 output), "
        "the strategies behind `peft_sparse.kernels.sddmm`, and `auto`, what `sddmm` runs: it times the candidates "
        "once per (shape, K, tokens) bucket and keeps the fastest (picks: those kept for the shape so far in the run, "
        f"not only this row's). All strategies: `{base}/bench_kernels_nvidia_h200.md`.\n\n"
        + value_gradient
        + "\n"
    )


def markdown_file(relative: str) -> Callable[[Path], str]:
    """A renderer that includes a Markdown report a benchmark writes, as it is (its first heading dropped)."""

    def render(root: Path) -> str:
        text = (root / relative).read_text(encoding="utf-8")
        lines = text.splitlines()
        if lines and lines[0].startswith("# "):
            lines = lines[1:]
        return "\n".join(lines).strip() + f"\n\n(From `{relative}`.)\n"

    render.__doc__ = f"``{relative}``, included as it is."
    return render


# Block name -> renderer. One entry per table.
SOURCES: dict[str, Callable[[Path], str]] = {
    "quickstart": render_quickstart,
    "bench-train-cpu-tiny": render_bench_train_cpu_tiny,
    "bench-train-cpu-tiny-120": render_bench_train_cpu_tiny_120,
    "bench-train-cpu-hotpath": markdown_file("benchmarks/results/cpu-hotpath/interleaved.md"),
    "bench-train-cpu-hotpath-merge": markdown_file("benchmarks/results/cpu-hotpath-merge/interleaved.md"),
    "gpu-check": render_gpu_check,
    "bench-formulations": render_bench_formulations,
    "bench-ltsft-selection": render_bench_ltsft_selection,
    "quality": render_quality,
    "quality-headline": render_quality_headline,
    "config-spiel": _config_fields("SpIELConfig"),
    "config-ltsft": _config_fields("LTSFTConfig"),
}


# Files copied into docs/ (MkDocs serves only docs/), destination -> source; checked like the blocks.
ASSETS: dict[str, str] = {
    "docs/assets/quickstart_loss_curves.png": "benchmarks/results/quickstart/loss_curves.png",
}


# --------------------------------------------------------------------------------------------- filling
def documents(root: Path = ROOT) -> list[Path]:
    """The Markdown files that may hold generated blocks."""
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


def render_text(text: str, root: Path = ROOT) -> str:
    """``text`` with every generated block rewritten; ``ValueError`` for a block name without a source."""

    def fill(match: re.Match) -> str:
        name = match["name"]
        if name not in SOURCES:
            raise ValueError(f"generated block name must be one of {sorted(SOURCES)}, got {name!r}")
        return match["begin"] + SOURCES[name](root).rstrip("\n") + "\n" + match["end"]

    return BLOCK.sub(fill, text)


def stale(root: Path = ROOT) -> list[str]:
    """``path: block`` for every generated block that differs from what ``render_text`` would write."""
    out = []
    for path in documents(root):
        text = path.read_text(encoding="utf-8")
        new = render_text(text, root)
        if new != text:
            old_blocks = {m["name"]: m["body"] for m in BLOCK.finditer(text)}
            new_blocks = {m["name"]: m["body"] for m in BLOCK.finditer(new)}
            names = [name for name in new_blocks if old_blocks.get(name) != new_blocks[name]]
            out += [f"{path.relative_to(root)}: {name}" for name in names]
    for destination, source in ASSETS.items():
        target = root / destination
        if not target.exists() or target.read_bytes() != (root / source).read_bytes():
            out.append(f"{destination}: copy of {source}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only report out-of-date blocks (exit status 1)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT / "src"))  # document this checkout's config classes, not another installed copy
    if args.check:
        out_of_date = stale()
        for entry in out_of_date:
            print(f"out of date: {entry}")
        return 1 if out_of_date else 0
    for path in documents():
        text = path.read_text(encoding="utf-8")
        new = render_text(text)
        if new != text:
            path.write_text(new, encoding="utf-8")
            print(f"updated {path.relative_to(ROOT)}")
    for destination, source in ASSETS.items():
        target, data = ROOT / destination, (ROOT / source).read_bytes()
        if not target.exists() or target.read_bytes() != data:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            print(f"updated {destination}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
