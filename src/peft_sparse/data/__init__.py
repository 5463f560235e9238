"""Text shipped with peft-sparse, so examples and benchmarks run without downloading a dataset.

``tiny_corpus.txt`` is about 47 KB of original English prose written for this project: short descriptive
paragraphs on everyday topics (cooking, gardening, weather, travel, ...), each under a one-line title and separated
by blank lines. It is plain ASCII, so one byte is one character.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset

CORPUS_NAME = "tiny_corpus.txt"


def corpus_path() -> Path:
    """Return the path of the shipped ``tiny_corpus.txt`` (inside the installed package)."""
    return Path(__file__).resolve().parent / CORPUS_NAME


def load_corpus() -> str:
    """Return the whole shipped corpus as one string (UTF-8 decoded; the text is ASCII)."""
    return corpus_path().read_text(encoding="utf-8")


def encode(text: str, tokenizer=None) -> torch.Tensor:
    """Token ids of ``text`` (int64): its UTF-8 bytes without a tokenizer, else the tokenizer's ids (no special
    tokens)."""
    if tokenizer is None:
        return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


class TokenWindows(Dataset):
    """Fixed-length windows of a token sequence, every ``stride`` tokens; items are ``{"input_ids", "labels"}`` with
    labels equal to the inputs (causal LMs shift them)."""

    def __init__(self, tokens: torch.Tensor, seq_len: int, stride: int) -> None:
        if seq_len < 1 or stride < 1:
            raise ValueError(f"seq_len and stride must be >= 1, got {seq_len} and {stride}")
        starts = range(0, tokens.numel() - seq_len, stride)
        if not starts:
            raise ValueError(f"{tokens.numel()} tokens are too few for windows of seq_len={seq_len}")
        self.chunks = torch.stack([tokens[s : s + seq_len] for s in starts])

    def __len__(self) -> int:
        return self.chunks.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.chunks[i], "labels": self.chunks[i]}


__all__ = ["TokenWindows", "corpus_path", "encode", "load_corpus"]
