"""Smoke test of benchmarks/bench_cpu_crossover.py: a small run writes both files with consistent rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import load_benchmark


def load_script():
    return load_benchmark("bench_cpu_crossover")


def test_small_run_writes_results(tmp_path: Path) -> None:
    bench = load_script()
    assert bench.main(["--small", "--repeats", "1", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "bench_cpu_crossover_threads1.json").read_text())
    rows = data["rows"]
    assert [(r["rows"], r["cols"]) for r in rows] == [(128, 128)] * 2 + [(352, 128)] * 2 + [(1024, 1024)] * 2
    for r in rows:
        assert r["csr_s"] > 0 and r["dense_s"] > 0
        assert r["measured_ratio"] == pytest.approx(r["csr_s"] / r["dense_s"])
        expected = (6.7 * r["k"] + 1 * 118.0 * (r["rows"] + r["cols"])) / (r["rows"] * r["cols"])  # one thread
        assert r["estimated_ratio"] == pytest.approx(expected)
        assert r["chosen"] == ("csr" if expected < 1 else "dense")
        assert r["chosen_over_fastest"] == pytest.approx(r[f"{r['chosen']}_s"] / min(r["csr_s"], r["dense_s"]))
    assert data["meta"]["summary"]["points"] == len(rows)
    table = (tmp_path / "bench_cpu_crossover_threads1.md").read_text()
    assert (
        table.count("| 128 | [") == len(rows) and "Rule: csr when 6.7 K + threads^0.5 x 118.0 (rows + cols)" in table
    )


@pytest.mark.parametrize("bad", [["--threads", "0"], ["--repeats", "0"]])
def test_bad_arguments_are_refused(bad: list[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        load_script().parse_args(bad + ["--out", str(tmp_path)])
