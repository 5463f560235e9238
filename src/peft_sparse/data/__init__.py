"""Text shipped with peft-sparse, so examples and benchmarks run without downloading a dataset.

``tiny_corpus.txt`` is about 47 KB of original English prose written for this project: short descriptive
paragraphs on everyday topics (cooking, gardening, weather, travel, ...), each under a one-line title and separated
by blank lines. It is plain ASCII, so one byte is one character.
"""

from __future__ import annotations

from pathlib import Path

CORPUS_NAME = "tiny_corpus.txt"


def corpus_path() -> Path:
    """Return the path of the shipped ``tiny_corpus.txt`` (inside the installed package)."""
    return Path(__file__).resolve().parent / CORPUS_NAME


def load_corpus() -> str:
    """Return the whole shipped corpus as one string (UTF-8 decoded; the text is ASCII)."""
    return corpus_path().read_text(encoding="utf-8")


__all__ = ["corpus_path", "load_corpus"]
