"""What an installed package promises: bitsandbytes only for qSpIEL, one version, type information."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import get_peft_model

import peft_sparse

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
ROOT = Path(__file__).resolve().parent.parent


def test_spiel_runs_without_bitsandbytes():
    # A fresh interpreter in which bitsandbytes cannot be imported: import, wrap, forward, backward.
    code = (
        "import sys; sys.modules['bitsandbytes'] = None\n"
        "import torch, peft_sparse\n"
        "from peft import get_peft_model\n"
        "model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(8, 8)),"
        " peft_sparse.SpIELConfig(target_modules=['0'], density=0.5))\n"
        "model(torch.randn(2, 8)).sum().backward()\n"
        "assert 'bitsandbytes' not in sys.modules or sys.modules['bitsandbytes'] is None\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")


def test_4bit_layer_without_bitsandbytes_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    model[0].weight.quant_state = object()  # what marks a bitsandbytes 4-bit weight
    with pytest.raises(ImportError, match=r'pip install "peft-sparse\[qspiel\]"'):
        get_peft_model(model, peft_sparse.SpIELConfig(target_modules=["0"], density=0.5))


def test_version_is_written_once():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in pyproject["project"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "peft_sparse.__version__"}
    assert "bitsandbytes" not in " ".join(pyproject["project"]["dependencies"])
    assert f"## [{peft_sparse.__version__}]" in (ROOT / "CHANGELOG.md").read_text()


def test_package_ships_py_typed():
    assert (Path(peft_sparse.__file__).parent / "py.typed").exists()
