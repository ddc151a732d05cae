"""Progress you can see: a tqdm bar on a terminal, periodic log lines otherwise.

One object for both: ``Progress(total, desc)`` (a context manager) or ``track(iterable,
desc)`` (an iterator wrapper). When the output stream is a terminal it draws a tqdm bar;
otherwise (a log file, CI, a pipe) it writes one line per ``every_s`` seconds,

    <desc>: 12/57 (21%), 40.2 s elapsed, ETA 2.5 min [loss=0.41]

plus a last line when the stage ends (unless it would repeat the previous one), so a job that sits in one stage for minutes still
says where it is and when it will be done.
"""
from __future__ import annotations

import sys
import time
from typing import Any, Callable, Iterable, Iterator, TextIO, TypeVar

from tqdm.auto import tqdm

__all__ = ["Progress", "track"]

T = TypeVar("T")


def _duration(s: float) -> str:
    if s < 90:
        return f"{s:.1f} s"
    if s < 5400:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


class Progress:
    """Progress of a stage of ``total`` units (``None``: unknown).

    Args:
      total: units expected (the ETA needs it).
      desc: the stage's name, first on every line.
      unit: what is counted (``"it"``, ``"batch"``, ``"question"``...).
      every_s: seconds between log lines when not on a terminal.
      file: the stream (default ``sys.stdout``); a terminal gets the bar.
      log: a ``log(msg)`` function for the lines instead of writing to ``file`` (e.g. one
        adding a run's prefix).
      bar: ``True`` / ``False`` forces the bar / the lines; ``None`` (default) picks by
        ``file.isatty()``.
      delay_s: show nothing for a stage that ends within this many seconds (quick stages
        stay silent; tqdm's ``delay``).
      enabled: ``False`` silences everything (counting still works).
      clock: the time source (``time.monotonic``).
    """

    def __init__(self, total: int | None = None, desc: str = "", *, unit: str = "it", every_s: float = 30.0,
                 file: TextIO | None = None, log: Callable[[str], None] | None = None, bar: bool | None = None,
                 delay_s: float = 0.0, enabled: bool = True, clock: Callable[[], float] = time.monotonic):
        self.total = None if total is None else int(total)
        self.desc, self.unit, self.every_s, self.delay_s = desc, unit, float(every_s), float(delay_s)
        self.n = 0
        self.postfix: dict[str, Any] = {}
        self._file = sys.stdout if file is None else file
        self._log = log
        self._clock = clock
        self._t0 = self._last = clock()
        self._last_n = None  # the count of the last line written
        self._closed = False
        self.enabled = bool(enabled)
        if bar is None:
            isatty = getattr(self._file, "isatty", None)
            bar = bool(isatty and isatty())
        self._bar = None
        if self.enabled and bar:
            self._bar = tqdm(total=self.total, desc=desc, unit=unit, file=self._file, dynamic_ncols=True,
                             delay=self.delay_s)

    # -- counting -----------------------------------------------------------------------
    def update(self, n: int = 1) -> None:
        """``n`` more units done; writes a line if ``every_s`` has passed since the last."""
        self.n += int(n)
        if self._bar is not None:
            self._bar.update(n)
        elif self.enabled and self._clock() - self._last >= self.every_s and self._shown():
            self._emit()

    def set_postfix(self, **values: Any) -> None:
        """Values shown after the count (``loss=0.41``)."""
        self.postfix = dict(values)
        if self._bar is not None:
            self._bar.set_postfix(values, refresh=False)

    def write(self, msg: str) -> None:
        """A message that does not break the bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(msg, file=self._file)
        else:
            self._out(msg)

    # -- lines --------------------------------------------------------------------------
    def line(self) -> str:
        """The current state as one line (what is logged)."""
        elapsed = self._clock() - self._t0
        if self.total:
            text = f"{self.desc}: {self.n}/{self.total} {self.unit} ({100 * self.n / self.total:.0f}%), " \
                   f"{_duration(elapsed)} elapsed"
            if 0 < self.n < self.total:
                text += f", ETA {_duration(elapsed * (self.total - self.n) / self.n)}"
        else:
            text = f"{self.desc}: {self.n} {self.unit}, {_duration(elapsed)} elapsed"
        if self.postfix:
            text += " [" + ", ".join(f"{k}={v}" for k, v in self.postfix.items()) + "]"
        return text

    def _out(self, msg: str) -> None:
        if self._log is not None:
            self._log(msg)
        else:
            print(msg, file=self._file, flush=True)

    def _shown(self) -> bool:
        return self._clock() - self._t0 >= self.delay_s

    def _emit(self) -> None:
        self._last, self._last_n = self._clock(), self.n
        self._out(self.line())

    def close(self) -> None:
        """End the stage: close the bar, or write the final line. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.enabled and self._shown() and self._last_n != self.n:  # not the same line twice
            self._emit()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def track(iterable: Iterable[T], desc: str = "", *, total: int | None = None, **kwargs) -> Iterator[T]:
    """Yield from ``iterable`` with a :class:`Progress` counting one unit per item.
    ``total`` defaults to ``len(iterable)`` when it has one; ``kwargs`` go to
    :class:`Progress`."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    with Progress(total, desc, **kwargs) as p:
        for item in iterable:
            yield item
            p.update()
