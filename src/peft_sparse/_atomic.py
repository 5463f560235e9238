"""Writing files so that an interruption never leaves a truncated file or a directory of mixed versions."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable


def atomic_write(file: os.PathLike | str, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` for a temporary file beside ``file``, then rename it over ``file`` (atomic on POSIX and
    Windows); the old file stays whole until the new one is complete. Returns ``file`` as a Path."""
    file = Path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{file.name}.", suffix=".tmp", dir=file.parent)
    os.close(handle)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb+") as stream:
            os.fsync(stream.fileno())
        os.replace(tmp, file)
    finally:
        tmp.unlink(missing_ok=True)
    return file


def replace_directory(directory: os.PathLike | str, fill: Callable[[Path], None], replaced: Iterable[str]) -> Path:
    """Write a new version of ``directory``: ``fill(tmp)`` writes into a fresh temporary directory beside it, other
    files of the old directory (not named in ``replaced``) are copied over, and the new directory takes the old one's
    place by renames. At no moment does ``directory`` hold files of both versions."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    try:
        fill(tmp)
        replaced = set(replaced)
        if directory.is_dir():
            for entry in directory.iterdir():
                if entry.name not in replaced and not (tmp / entry.name).exists():
                    (shutil.copytree if entry.is_dir() else shutil.copy2)(entry, tmp / entry.name)
            old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".old", dir=directory.parent))
            os.rmdir(old)
            os.rename(directory, old)
            os.rename(tmp, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, directory)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return directory
