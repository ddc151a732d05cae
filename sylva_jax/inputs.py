"""Reading files users hand us: a parse failure becomes one error naming the file and the fix.

``with reading(path, "model weights", "re-download or re-export the model"): ...`` runs the
block that parses ``path``; any exception it raises (a JSON error, a ``SafetensorError`` of a
truncated file, a short read in a GGUF, a missing key) is re-raised as
:class:`InputFileError` ``"cannot read <what> <path>: <reason>. <fix>"``. A missing file
(``FileNotFoundError``) and an :class:`InputFileError` from an inner ``reading`` pass through
unchanged, since they already say what is wrong. ``InputFileError`` is a ``ValueError``, so
callers that report bad input as ``ValueError`` keep doing so.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

__all__ = ["InputFileError", "reading"]


class InputFileError(ValueError):
    """A file exists but cannot be parsed as what it should be."""

    def __init__(self, path: str | os.PathLike, what: str, reason: str, fix: str = ""):
        self.path, self.what, self.reason = os.fspath(path), what, reason
        super().__init__(f"cannot read {what} {self.path}: {reason}" + (f". {fix}" if fix else ""))


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0].rstrip(".") if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


@contextlib.contextmanager
def reading(path: str | os.PathLike, what: str, fix: str = "") -> Iterator[None]:
    try:
        yield
    except (InputFileError, FileNotFoundError, MemoryError):
        raise
    except Exception as e:  # any parser's failure is a property of the file here
        raise InputFileError(path, what, _reason(e), fix) from e
