"""The examples a user copies still run end to end (few steps; their own checks decide the exit status)."""

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_example(args, tmp_path):
    env = dict(os.environ, MPLBACKEND="Agg", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    done = subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_quickstart_trains_saves_reloads_and_merges(tmp_path):
    out = run_example(
        [str(ROOT / "examples/quickstart.py"), "--steps", "6", "--reselection_steps", "3", "--seq_len", "32",
         "--output_dir", str(tmp_path / "qs")],
        tmp_path,
    )
    assert "SpIEL-AG" in out and "LoRA r=8" in out
    assert "-> OK" in out
    assert (tmp_path / "qs" / "adapter_model.safetensors").exists()
    results = json.loads((tmp_path / "qs" / "results.json").read_text())
    assert [row["method"] for row in results["rows"]] == ["base (no adapter)", "SpIEL-AG", "LoRA r=8"]
    assert results["checks"]["reload_ok"] and results["checks"]["merge_ok"]
    # held-out loss recorded at the last step equals the one in the table (the same model, evaluated twice)
    assert results["curves"]["SpIEL"]["held_out"][-1] == [6, results["rows"][1]["held"]]
    assert [step for step, _, _ in results["curves"]["SpIEL"]["reselections"]] == [3]


def test_train_ltsft_writes_base_and_adapter(tmp_path):
    run_example(
        [str(ROOT / "examples/train_ltsft.py"), "--output_dir", str(tmp_path / "lt"), "--dense_steps", "4",
         "--sparse_steps", "4", "--seq_len", "32"],
        tmp_path,
    )
    assert (tmp_path / "lt" / "base" / "config.json").exists()
    assert (tmp_path / "lt" / "adapter" / "adapter_config.json").exists()
    assert sorted(path.name for path in (tmp_path / "lt").iterdir()) == ["adapter", "base"]  # no empty folders


class _Parsed(Exception):
    def __init__(self, parser):
        self.parser = parser


@pytest.mark.parametrize("script", ["quickstart.py", "train_ltsft.py", "cross_lingual.py"])
def test_every_option_has_help_and_shows_its_default(script, monkeypatch):
    spec = importlib.util.spec_from_file_location(f"example_{script[:-3]}", ROOT / "examples" / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def capture(parser, *args, **kwargs):
        raise _Parsed(parser)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(_Parsed) as parsed:
        module.parse_args([])
    parser = parsed.value.parser
    assert parser.formatter_class is argparse.ArgumentDefaultsHelpFormatter
    options = [action for action in parser._actions if not isinstance(action, argparse._HelpAction)]
    assert options
    assert [a.dest for a in options if not (a.help and a.help.strip())] == []
    help_text = " ".join(parser.format_help().split())
    for action in options:
        if not action.required:
            assert f"(default: {action.default})" in help_text, action.dest
