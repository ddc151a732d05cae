"""What a run of the reference experiment tells its user: log lines, stage timings, metric
lines over a window of steps, and the curves plot."""
from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from sylva_jax import atomic

__all__ = ["LOG_PREFIX", "log", "tag", "set_process_tag", "stage", "MetricWindow", "plot_curves"]

LOG_PREFIX = "[oasst_mmlu]"
_TAG = [LOG_PREFIX]  # gains "[i/n]" in multi-host runs


def tag() -> str:
    """The prefix of every log line (``[oasst_mmlu]``, ``[oasst_mmlu][1/2]``)."""
    return _TAG[0]


def set_process_tag(index: int, count: int) -> None:
    _TAG[0] = f"{LOG_PREFIX}[{index}/{count}]"


def log(msg: str) -> None:
    print(f"{tag()} {msg}", flush=True)


@contextlib.contextmanager
def stage(name: str, times: dict[str, float]) -> Iterator[None]:
    """Log the stage ``name`` and add its wall time (seconds) to ``times[name]``."""
    log(f"stage {name} ...")
    t0 = time.perf_counter()
    ok = False
    try:
        yield
        ok = True
    finally:
        dt = time.perf_counter() - t0
        times[name] = times.get(name, 0.0) + dt
        if ok:
            log(f"stage {name} done in {dt:.1f} s")


class MetricWindow:
    """Per-step records since the last metric line; :meth:`line` folds them into one.

    A line holds the step, the mean loss over the window, the last ``lr`` and
    ``grad_norm``, the window's tokens per second (tokens / step time, both summed) and
    ``elapsed_s`` since ``t_start`` (``time.perf_counter`` at the start of the run).
    """

    def __init__(self, t_start: float):
        self.t_start = t_start
        self.records: list[dict] = []

    def add(self, rec: dict) -> None:
        self.records.append(rec)

    def line(self) -> dict:
        w, self.records = self.records, []
        return {"step": w[-1]["step"], "loss": float(np.mean([r["loss"] for r in w])),
                "lr": w[-1]["lr"], "grad_norm": w[-1]["grad_norm"],
                "tokens_per_s": sum(r["tokens"] for r in w) / max(sum(r["step_time_s"] for r in w), 1e-9),
                "elapsed_s": time.perf_counter() - self.t_start}


def plot_curves(path: Path, metrics: list[dict], evals: list[dict], title: str) -> None:
    """Training loss (left axis) and MMLU (right axis) against the optimizer step, as PNG."""
    try:
        import matplotlib  # lazy: optional and slow to import, only the plot needs it

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        log("matplotlib missing: no plot")
        return
    fig, ax1 = plt.subplots(figsize=(7, 4))
    if metrics:
        ax1.plot([m["step"] for m in metrics], [m["loss"] for m in metrics], color="tab:blue", label="train loss")
    ax1.set_xlabel("optimizer step")
    ax1.set_ylabel("training loss", color="tab:blue")
    ax2 = ax1.twinx()
    if evals:
        ax2.plot([e["step"] for e in evals], [e["mmlu"] for e in evals], "o-", color="tab:red", label="MMLU")
    ax2.set_ylabel("MMLU accuracy (macro)", color="tab:red")
    ax1.set_title(title)
    fig.tight_layout()
    with atomic.atomic_open(path, "wb") as f:
        fig.savefig(f, dpi=100, format="png")
    plt.close(fig)
