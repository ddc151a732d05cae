"""Atomic file writes: a reader (or a rerun after a crash or Ctrl-C) sees either the old
file or the complete new one, never a half-written one.

The content goes to a temporary file in the same folder (same file system), is flushed and
``fsync``-ed, then ``os.replace``-d over the target; on any error the temporary file is
removed and the target is left as it was.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

__all__ = ["atomic_open", "atomic_dir", "write_json", "write_text", "json_default"]


def json_default(o: Any) -> Any:
    """``json.dump``'s ``default``: NumPy integers, floats and arrays as numbers and lists,
    anything else as its ``str``."""
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[Any]:
    """``with atomic_open(p, "wb") as f: ...``: ``f`` is a temporary file beside ``p`` that
    replaces ``p`` when the block ends without an exception."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """``with atomic_dir(p) as tmp: write files into tmp``: ``tmp`` is a fresh directory
    beside ``p``; when the block ends without an exception its files are ``fsync``-ed and it
    replaces ``p`` (an existing ``p`` is swapped out and deleted only then). On an exception
    ``tmp`` is deleted and ``p`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path) as f:
        f.write(text)


def write_json(path: str | os.PathLike, obj: Any, *, indent: int = 1,
               default: Callable[[Any], Any] | None = None) -> None:
    """``json.dump(obj)`` (keys sorted) to ``path`` atomically."""
    with atomic_open(path) as f:
        json.dump(obj, f, indent=indent, sort_keys=True, default=default)
