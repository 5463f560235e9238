"""The shipped corpus and the helpers that turn it into training windows."""

import pytest
import torch

from peft_sparse.data import TokenWindows, corpus_path, encode, load_corpus


def test_corpus_ships_with_the_package():
    text = load_corpus()
    assert corpus_path().is_file() and len(text) > 40_000 and text.isascii()


def test_encode_and_windows():
    tokens = encode("abcdefgh")
    assert tokens.tolist() == list(b"abcdefgh")
    windows = TokenWindows(tokens, seq_len=3, stride=2)
    assert len(windows) == 3
    assert windows[1]["input_ids"].tolist() == list(b"cde")
    assert torch.equal(windows[1]["labels"], windows[1]["input_ids"])
    with pytest.raises(ValueError, match="too few"):
        TokenWindows(tokens, seq_len=20, stride=1)
