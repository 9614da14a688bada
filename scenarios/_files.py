"""Finding and checking benchmark files under the data root.

Every failure is a `UsageError` that names the file or directory involved and what to
do about it, so a missing or damaged dataset never surfaces as a traceback from deep
inside pickle, tarfile or PIL.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from pathlib import Path
from typing import Iterable, Sequence

from clbench.errors import DataNotFoundError, UsageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def require(directory: Path, expected: Sequence[str], *, dataset: str, how: str) -> None:
    """Fail at once when any of `expected` (paths relative to `directory`) is absent."""
    missing = [name for name in expected if not (directory / name).exists()]
    if missing:
        raise missing_error(directory, missing, dataset=dataset, how=how)


def missing_error(directory: Path, missing: Sequence[str], *, dataset: str, how: str) -> DataNotFoundError:
    shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
    state = "the directory does not exist" if not directory.exists() else "not there"
    return DataNotFoundError(f"{dataset} not found: looked in {directory} for {shown} ({state}); {how}")


def md5sum(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_md5(path: Path, expected: str, *, how: str) -> None:
    got = md5sum(path)
    if got != expected:
        raise UsageError(f"{path} is corrupt or truncated (MD5 {got}, expected {expected}); delete it and {how}")


def read_pickle(path: Path, *, how: str) -> dict:
    """A CIFAR-style pickle (bytes keys); a damaged file is an error naming it."""
    try:
        with open(path, "rb") as f:
            data = pickle.load(f, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError, IndexError,
            KeyError, MemoryError, OverflowError, UnicodeDecodeError) as e:  # what damaged bytes raise
        raise UsageError(f"{path} is corrupt or truncated ({type(e).__name__}: {e}); {how}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path} holds a {type(data).__name__}, expected a dict of arrays; {how}")
    return data


def read_table(path: Path, columns: int, *, how: str, sep: str | None = None) -> list[list[str]]:
    """Whitespace- (or `sep`-) separated rows with at least `columns` fields; blank lines skipped."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            fields = line.rstrip("\n").split(sep) if sep else line.split(maxsplit=columns - 1)
            if len(fields) < columns:
                raise UsageError(
                    f"{path} line {number} is malformed: {line.strip()!r} (expected {columns} fields); {how}"
                )
            rows.append([x.strip() for x in fields])
    return rows


def read_names(path: Path) -> list[str]:
    """One name per line; `#` starts a comment."""
    return read_names_text(path.read_text(encoding="utf-8"))


def read_names_text(text: str) -> list[str]:
    names = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(line)
    return names


def image_files(directory: Path) -> list[str]:
    """The images directly inside `directory`, sorted by name (ImageFolder's order)."""
    with os.scandir(directory) as entries:
        found = [e.path for e in entries if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(found)


def class_folders(directory: Path) -> list[str]:
    with os.scandir(directory) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


def expect_count(found: Iterable, expected: int, *, what: str, where: Path, how: str) -> None:
    n = len(list(found))
    if n != expected:
        raise UsageError(f"{where} holds {n} {what}, expected {expected}; {how}")
