"""Smoke test of benchmarks/bench_train.py: a micro run (two methods, three updates) and the argument checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import load_benchmark

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_train.py"
REQUIRED = {
    "method": str,
    "preset": str,
    "device": str,
    "trainable_params": int,
    "step_time_s_median": float,
    "step_time_s_min": float,
    "step_time_s_max": float,
    "peak_mem_bytes": int,
    "eval_loss": float,
    "gradient_checkpointing": bool,
}


def load_script():
    return load_benchmark("bench_train")


def test_micro_run_writes_results(tmp_path: Path) -> None:
    out = tmp_path / "out"
    command = [
        sys.executable,
        str(SCRIPT),
        "--preset",
        "cpu-tiny",
        "--methods",
        "lora,spiel-ag",
        "--steps",
        "3",
        "--pretrain-steps",
        "2",
        "--gradient-checkpointing",
        "off",
        "--profile",
        "none",
        "--repeats",
        "1",
        "--out",
        str(out),
        "--base-dir",
        str(tmp_path / "base"),
        "--worker-timeout",
        "0",  # a slow machine must not fail the test
    ]
    proc = subprocess.run(command, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]

    records = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in records] == ["lora", "spiel-ag"]
    for record in records:
        for key, kind in REQUIRED.items():
            assert isinstance(record[key], kind), (record["method"], key, record.get(key))
        assert record["preset"] == "cpu-tiny" and record["gradient_checkpointing"] is False
        assert record["step_time_s_min"] <= record["step_time_s_median"] <= record["step_time_s_max"]
        assert record["peak_mem_bytes"] > 0 and 0 < record["eval_loss"] < 10
        assert len(record["loss_curve"]) == 3
    lora, spiel = records
    # LoRA r=4 on q, k, v, o (128 x 128), gate, up (352 x 128) and down (128 x 352), 4 layers: r * (in + out) each
    expected = 4 * (4 * (128 + 128) + 3 * (128 + 352)) * 4
    assert lora["trainable_params"] == spiel["trainable_params"] == expected

    assert lora["delta_structure"] is None
    assert spiel["delta_structure"]["deltas"] == 4 * 7
    table = (out / "results.md").read_text()
    assert "date:" in table and "machine:" in table and "x LoRA" in table
    assert "| spiel-ag | " in table.split("Where the sparse entries are")[1]
    assert (out / "results.png").stat().st_size > 0


def test_arguments_are_checked(tmp_path: Path) -> None:
    bench = load_script()
    out = ["--out", str(tmp_path)]
    with pytest.raises(SystemExit):
        bench.parse_args(["--preset", "cpu-tiny", "--methods", "qlora", *out])  # GPU only
    with pytest.raises(SystemExit):
        bench.parse_args(["--preset", "cpu-tiny", "--methods", "lora,nope", *out])
    with pytest.raises(SystemExit):
        bench.parse_args(["--preset", "cpu-tiny"])  # --out is required
    assert bench.parse_args(["--preset", "cpu-tiny", "--methods", "lora", *out]).methods == ("lora",)
    gpu = ["--preset", "gpu-1b", "--methods", "lora,qspiel-ma", "--gradient-checkpointing", "on"]
    args = bench.parse_args(gpu + out)
    assert args.methods == ("lora", "qspiel-ma") and args.gc_settings == [True]
    assert args.settings["seq_len"] == 2048 and args.settings["rank"] == 64


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message printed without CUDA")
def test_gpu_preset_fails_clearly_without_cuda(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bench = load_script()
    assert bench.main(["--preset", "gpu-1b", "--methods", "lora", "--out", str(tmp_path)]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


def test_delta_structure_matches_a_dense_mask() -> None:
    from helpers import tiny_llama
    from peft import get_peft_model

    import peft_sparse

    bench = load_script()
    model = get_peft_model(
        tiny_llama(num_hidden_layers=1),
        peft_sparse.SpIELConfig(target_modules=["q_proj", "up_proj"], num_tunable_weights=120),
    )
    # Put every entry of up_proj ([48, 32]) into its first rows, so the two deltas differ clearly.
    for name, indices, _, _ in peft_sparse.sparse_deltas(model):
        if "up_proj" in name:
            indices.copy_(torch.arange(indices.numel(), dtype=indices.dtype))
    rows, cols, top = [], [], []
    for _, indices, _, (n_rows, n_cols) in peft_sparse.sparse_deltas(model):
        mask = torch.zeros(n_rows * n_cols, dtype=torch.bool)
        mask[indices.long()] = True
        mask = mask.view(n_rows, n_cols)
        rows.append(mask.any(1).float().mean().item())
        cols.append(mask.any(0).float().mean().item())
        per_row = mask.sum(1).sort(descending=True).values
        top.append(per_row[: max(1, n_rows // 10)].sum().item() / mask.sum().item())
    structure = bench.delta_structure(model)
    assert structure["deltas"] == 2
    assert structure["rows_covered"] == pytest.approx(sum(rows) / 2)
    assert structure["cols_covered"] == pytest.approx(sum(cols) / 2)
    assert structure["top_decile_rows_share"] == pytest.approx(sum(top) / 2)
    # up_proj's entries fill its first rows completely: few rows, every column
    assert min(rows) < 0.5 and max(cols) == 1.0
    assert bench.delta_structure(tiny_llama(num_hidden_layers=1)) is None


@pytest.mark.parametrize("mode,holds", [("product", False), ("hold", True)])
def test_interleaved_run_applies_a_method_merge_mode(tmp_path: Path, monkeypatch, mode, holds) -> None:
    import peft_sparse.sparse_linear as sparse_linear

    monkeypatch.delenv("PEFT_SPARSE_INPLACE_MERGE", raising=False)
    bench = load_script()
    calls = []
    hold_merged = sparse_linear._hold_merged

    def counting(*args):
        calls.append(sparse_linear.merge_mode())
        return hold_merged(*args)

    monkeypatch.setattr(sparse_linear, "_hold_merged", counting)
    argv = ["--preset", "cpu-tiny", "--methods", f"lora,spiel-ma@{mode}", "--steps", "3", "--warmup-steps", "1"]
    argv += ["--pretrain-steps", "0", "--gradient-checkpointing", "off", "--interleave-steps", "--out", str(tmp_path)]
    assert bench.main(argv + ["--base-dir", str(tmp_path / "base")]) == 0
    assert bool(calls) == holds and set(calls) <= {"hold"}
    result = json.loads((tmp_path / "interleaved.json").read_text())
    assert list(result["methods"]) == ["lora", f"spiel-ma@{mode}"]
    assert len(result["methods"][f"spiel-ma@{mode}"]["cpu_times_s"]) == 3
    assert "PEFT_SPARSE_INPLACE_MERGE" not in os.environ  # restored after the run


def test_merge_mode_variants_need_an_interleaved_spiel_run(tmp_path: Path) -> None:
    bench = load_script()
    out = ["--preset", "cpu-tiny", "--out", str(tmp_path)]
    for methods, extra in (("lora,spiel-ma@product", []), ("lora@hold", ["--interleave-steps"])):
        with pytest.raises(SystemExit):
            bench.parse_args(["--methods", methods, *extra, *out])
    with pytest.raises(SystemExit):
        bench.parse_args(["--methods", "lora,spiel-ag@sometimes", "--interleave-steps", *out])
    args = bench.parse_args(["--methods", "lora,spiel-ag@0", "--interleave-steps", *out])
    assert args.methods == ("lora", "spiel-ag@0")


def test_interleaved_table_pairs_a_merge_mode_variant_with_the_default() -> None:
    bench = load_script()

    def entry(cpu_times):
        return {
            "step_time_s_median": 1.0,
            "cpu_time_s_median": 1.0,
            "ratio_median": 1.0,
            "cpu_ratio_median": 1.0,
            "ratio_of_sums": 1.0,
            "cpu_ratio_of_sums": 1.0,
            "cpu_times_s": cpu_times,
        }

    result = {
        "preset": "cpu-hotpath",
        "date": "2026-11-30T00:00:00",
        "machine": "m",
        "command": "c",
        "settings": {"threads": 1, "steps": 4},
        "warmup_rounds": 1,
        "load_average_per_round": [],
        "methods": {
            "lora": entry([9.0, 1.0, 1.0, 1.0]),
            "spiel-ma": entry([9.0, 1.000, 1.010, 1.020]),
            "spiel-ma@product": entry([0.0, 1.004, 1.018, 1.015]),  # differences +4, +8, -5 ms
        },
    }
    table = bench.interleaved_markdown(result)
    assert "| spiel-ma@product | spiel-ma | +4.0 | 2 of 3 |" in table


@pytest.mark.parametrize(
    "device, clock, verdict", [("cpu", "CPU", "met, cpu_ratio_median"), ("cuda", "wall", "missed, ratio_median")]
)
def test_interleaved_targets_use_cpu_time_on_the_cpu_and_wall_time_on_a_gpu(device, clock, verdict) -> None:
    # a GPU run's host spins while it waits, so its CPU time says nothing the wall time does not
    bench = load_script()
    ratios = {"ratio_median": 1.2, "cpu_ratio_median": 1.0, "ratio_of_sums": 1.2, "cpu_ratio_of_sums": 1.0}
    entry = {"step_time_s_median": 1.0, "cpu_time_s_median": 1.0, **ratios}
    result = {
        "preset": "cpu-hotpath",
        "date": "2026-11-30T00:00:00",
        "machine": "m",
        "command": "c",
        "settings": {"threads": 1, "steps": 4, "device": device},
        "warmup_rounds": 1,
        "load_average_per_round": [],
        "methods": {"lora": dict(entry, **dict.fromkeys(ratios, 1.0)), "spiel-ma": entry},
    }
    table = bench.interleaved_markdown(result)
    assert f"target (on {clock} time)" in table
    assert f"<= 1.05x ({verdict})" in table


def test_repeats_take_peak_memory_from_the_runs_without_the_profiler() -> None:
    bench = load_script()

    def run(peak, above, profiled, times):
        return {
            "method": "spiel-ag",
            "peak_mem_bytes": peak,
            "peak_mem_above_baseline_bytes": above,
            "profiled": profiled,
            "step_times_s": times,
            "step_time_s_median": times[len(times) // 2],
        }

    # the first repeat profiled some method: its peaks (the profiler's memory stays in the process) are left out,
    # for a profiled method and an unprofiled one alike
    runs = [run(900, 230, True, [1.0, 3.0]), run(750, 120, False, [2.0]), run(760, 118, False, [4.0])]
    merged = bench.merge_repeats(runs, profiled_first=True)
    assert (merged["peak_mem_bytes"], merged["peak_mem_above_baseline_bytes"]) == (760, 120)
    assert merged["repeat_peak_mem_bytes"] == [900, 750, 760] and merged["repeat_profiled"] == [True, False, False]
    assert merged["step_times_s"] == [1.0, 3.0, 2.0, 4.0] and merged["step_time_s_median"] == 2.5
    unprofiled = bench.merge_repeats([run(800, 130, False, [1.0]), run(700, 90, False, [1.0])], profiled_first=True)
    assert (unprofiled["peak_mem_bytes"], unprofiled["peak_mem_above_baseline_bytes"]) == (700, 90)
    # nothing profiled: the largest of all runs
    merged = bench.merge_repeats([run(700, 90, False, [1.0]), run(650, 95, False, [1.0])])
    assert (merged["peak_mem_bytes"], merged["peak_mem_above_baseline_bytes"]) == (700, 95)
    single = run(900, 230, True, [1.0])
    assert bench.merge_repeats([single], profiled_first=True) is single
