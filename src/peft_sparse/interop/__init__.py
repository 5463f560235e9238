"""Readers and writers for the formats of earlier implementations: composable-sft (LT-SFT) and the SpIEL reference
implementation."""

from .composable_sft import (
    SFT_FILE_NAME,
    ComposableSFT,
    load_composable_sft,
    read_composable_sft,
    save_composable_sft,
    write_composable_sft,
)
from .spiel_reference import load_spiel_reference, read_spiel_reference

__all__ = [
    "SFT_FILE_NAME",
    "ComposableSFT",
    "load_composable_sft",
    "load_spiel_reference",
    "read_composable_sft",
    "read_spiel_reference",
    "save_composable_sft",
    "write_composable_sft",
]
