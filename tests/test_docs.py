"""README and docs: generated tables agree with the committed results files; facts the docs promise hold."""

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load_render_docs():
    spec = importlib.util.spec_from_file_location("render_docs", ROOT / "scripts" / "render_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render_docs = _load_render_docs()


def test_generated_blocks_match_the_results_files():
    assert render_docs.stale() == [], "run `python scripts/render_docs.py` and commit the result"


def test_every_results_table_is_shown_somewhere():
    shown = {m["name"] for path in render_docs.documents() for m in render_docs.BLOCK.finditer(path.read_text())}
    assert shown == set(render_docs.SOURCES)


def test_a_hand_edited_number_is_detected():
    readme = (ROOT / "README.md").read_text()
    block = next(render_docs.BLOCK.finditer(readme))
    digit = re.search(r"\d", block["body"])
    assert digit is not None
    position = block.start("body") + digit.start()
    edited = readme[:position] + str((int(readme[position]) + 1) % 10) + readme[position + 1 :]
    assert render_docs.render_text(edited) == readme  # the generator writes the true value back


def test_unknown_block_name_is_an_error():
    with pytest.raises(ValueError, match="'no-such-table'"):
        render_docs.render_text("<!-- BEGIN generated: no-such-table -->\nx\n<!-- END generated: no-such-table -->")


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    command = "python -m pytest -q tests"
    assert command in readme
    assert re.search(rf"^{re.escape(command)}\b", (ROOT / ".ci" / "run").read_text(), re.M)


def test_no_citations_of_an_unpublished_spec():
    # Users cannot read an internal specification; cite the thesis or the papers.
    pattern = re.compile(r"\bSPEC\b")
    files = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", ROOT / "CHANGELOG.md", *(ROOT / "docs").rglob("*.md")]
    for folder in ("src", "tests", "examples", "benchmarks", "scripts"):
        files += [p for p in (ROOT / folder).rglob("*") if p.suffix in {".py", ".md"}]
    offenders = [str(p.relative_to(ROOT)) for p in files if p != Path(__file__) and pattern.search(p.read_text())]
    assert offenders == []
