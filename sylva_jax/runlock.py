"""One writer per run directory: an exclusive, advisory lock on ``<run_dir>/.lock``.

Contract:
- ``RunLock(run_dir).acquire()`` takes an exclusive ``flock`` on ``<run_dir>/.lock`` without
  waiting. The kernel drops the lock when the holding process exits, however it exits
  (``kill -9`` included), so a lock left by a dead process is free: it is taken over and the
  previous holder is reported in :attr:`RunLock.took_over`.
- While it is held the file records the holder as JSON ``{"host", "pid", "started"}``; a
  second launch on the same directory (another process, or another open of the file in
  the same process) raises :class:`RunLockError` naming that holder and what to do.
- ``release()`` (or leaving the ``with`` block) empties the file, then unlocks: a file that
  still names a holder while nobody holds the lock was left by a process that died.

On a multi-host run only process 0 writes the run directory: pass ``enabled=False`` on the
other processes and the lock becomes a no-op there.
"""
from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
from pathlib import Path
from typing import Any

__all__ = ["RunLock", "RunLockError", "LOCK_NAME"]

LOCK_NAME = ".lock"


class RunLockError(RuntimeError):
    """The run directory is held by a live process."""


def _read_holder(fd: int) -> dict[str, Any] | None:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 4096)
    try:
        holder = json.loads(raw.decode())
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return holder if isinstance(holder, dict) else None


def _describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "an unknown process"
    return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} "
            f"(since {holder.get('started', '?')})")


class RunLock:
    """Exclusive lock on a run directory (see the module docstring)."""

    def __init__(self, run_dir: str | os.PathLike, *, enabled: bool = True):
        self.path = Path(run_dir) / LOCK_NAME
        self.enabled = enabled
        self.took_over: dict[str, Any] | None = None
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "RunLock":
        if not self.enabled or self.held:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunLockError(
                f"{self.path.parent} is in use by {_describe(holder)}: another run writes "
                "this directory. Wait for it to finish, stop it, or choose another "
                "--output_dir.") from None
        except OSError as e:  # a file system without flock support
            os.close(fd)
            raise RunLockError(
                f"cannot lock {self.path}: {e.strerror}. Put --output_dir on a file system "
                "that supports flock (a local disk), or run on one host only.") from None
        previous = _read_holder(fd)
        mine = {"host": socket.gethostname(), "pid": os.getpid(),
                "started": datetime.datetime.now(datetime.timezone.utc).isoformat(
                    timespec="seconds")}
        if previous and previous.get("pid") is not None:
            self.took_over = previous
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(mine).encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
