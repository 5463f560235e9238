"""Smoke test of benchmarks/bench_formulations.py: a tiny run writes both files, and the two formulations agree."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import load_benchmark


def load_script():
    return load_benchmark("bench_formulations")


def test_tiny_run_writes_results(tmp_path: Path) -> None:
    bench = load_script()
    argv = ["--shape", "24x40", "--densities", "0.05", "--tokens", "1,9", "--repeats", "1", "--out", str(tmp_path)]
    assert bench.main(argv) == 0
    data = json.loads((tmp_path / "bench_formulations_cpu.json").read_text())
    assert [r["tokens"] for r in data["rows"]] == [1, 9]
    for row in data["rows"]:
        assert row["k"] == int(0.05 * 24 * 40) and row["results_agree"] is True
        assert all(row[f"{name}_{kind}_s"] > 0 for name in ("merged", "split") for kind in ("train", "inference"))
    table = (tmp_path / "bench_formulations_cpu.md").read_text()
    assert "date:" in table and "machine:" in table and table.count("| yes |") == 2


@pytest.mark.parametrize("bad", [["--shape", "0x4"], ["--densities", "1.5"], ["--tokens", "a"], ["--repeats", "0"]])
def test_bad_arguments_are_refused(bad: list[str], tmp_path: Path) -> None:
    bench = load_script()
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args(bad + ["--out", str(tmp_path)])
    assert exit_info.value.code == 2
