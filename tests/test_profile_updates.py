"""Smoke test of benchmarks/profile_updates.py: a few profiled updates of the tiny CPU preset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import load_benchmark


def test_profiles_the_chosen_updates_and_times_growth(tmp_path: Path) -> None:
    profile = load_benchmark("profile_updates")
    argv = ["--preset", "cpu-tiny", "--steps", "6", "--updates", "2,5", "--out", str(tmp_path)]
    argv += ["--grow-random-numel", "200000", "--pretrain-steps", "0", "--base-dir", str(tmp_path / "base")]
    assert profile.main(argv) == 0
    report = json.loads((tmp_path / "prof.json").read_text())
    for method in profile.METHODS:
        assert len(report[method]) == 6 and all(wall > 0 and cpu >= 0 for wall, cpu in report[method])
    timings = {key: value for key, value in report.items() if key.startswith("grow_random_")}
    assert len(timings) == 4 and all(len(runs) == 4 and min(runs) > 0 for runs in timings.values())
    text = (tmp_path / "prof.txt").read_text()
    for method in profile.METHODS:
        for update in (2, 5):
            for order in ("cumulative", "tottime"):
                assert f"===== {method} update {update} by {order}" in text
    assert "after_optimizer_step" in text  # update 5 reselects: the hook's time is in the profile


def test_updates_must_lie_within_the_steps(tmp_path: Path) -> None:
    profile = load_benchmark("profile_updates")
    with pytest.raises(SystemExit):
        profile.parse_args(["--steps", "6", "--updates", "7", "--out", str(tmp_path)])
