"""The run directory of the reference experiment: its layout, the rules for reusing it, and
the small files in it.

Layout of ``<output_dir>``: ``args.json`` (the settings), ``metrics.jsonl`` and
``evals.jsonl`` (one record per line, each with its ``step``), ``summary.json``,
``curves.png``, ``masks/`` (cached masks, kept by ``--overwrite``), ``checkpoints/``
(Orbax) and ``adapter/``. JSON files are written atomically; JSONL files are appended a
line at a time, and a line cut by a crash is skipped when read.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np

from sylva_jax import atomic
from sylva_jax.experiment_config import ExperimentError
from sylva_jax.run_log import log

__all__ = ["RunDir", "FINISHED", "RESUMABLE_CHANGES", "prepare", "check_resume_settings",
           "to_json", "write_json", "append_jsonl", "read_jsonl", "truncate_jsonl"]

FINISHED = ("finished", "target_reached")  # summary statuses of a run that is done
# settings that may differ between a stopped run and its --resume
RESUMABLE_CHANGES = ("resume", "overwrite", "stop_at_step", "log_interval", "coordinator", "process_id")


@dataclasses.dataclass(frozen=True)
class RunDir:
    """The paths of one run's files under ``root``."""

    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    args = property(lambda self: self.root / "args.json")
    metrics = property(lambda self: self.root / "metrics.jsonl")
    evals = property(lambda self: self.root / "evals.jsonl")
    summary = property(lambda self: self.root / "summary.json")
    plot = property(lambda self: self.root / "curves.png")
    masks = property(lambda self: self.root / "masks")
    checkpoints = property(lambda self: self.root / "checkpoints")
    adapter = property(lambda self: self.root / "adapter")

    def finished(self) -> bool:
        """Whether ``summary.json`` records a finished run (an unreadable one does not)."""
        try:
            return json.loads(self.summary.read_text()).get("status") in FINISHED
        except (OSError, ValueError):
            return False


def _refusal(run: RunDir, *, resume: bool, overwrite: bool) -> str | None:
    """Why ``run`` may not be used with these switches, or None."""
    out = run.root
    if not (out.exists() and any(out.iterdir())):
        return f"--resume: {out} does not exist or is empty; nothing to resume" if resume else None
    if overwrite:
        return None
    finished = run.finished()
    if resume and finished:
        return (f"{out} holds a finished run; nothing to resume "
                f"(use --overwrite to start again, or another --output_dir)")
    if resume and not run.checkpoints.exists():
        return (f"--resume: {out} has no checkpoints to resume from "
                f"(drop --resume to start a new run there)")
    if not resume and finished:
        return (f"{out} holds a finished run (summary.json); refusing to overwrite it. "
                f"Pass --overwrite to replace it, or choose another --output_dir")
    if not resume and run.checkpoints.exists():
        return (f"{out} holds an unfinished run; pass --resume to continue it, "
                f"--overwrite to start again, or choose another --output_dir")
    return None


def prepare(run: RunDir, *, resume: bool, overwrite: bool, primary: bool,
            barrier: Callable[[str], None]) -> None:
    """Check that ``run`` may be used (:class:`ExperimentError` saying why not), then, on the
    primary process only, clear it for ``overwrite`` (keeping ``masks/``) and create it.
    Every process checks; ``barrier(name)`` keeps them in step around the change."""
    why = _refusal(run, resume=resume, overwrite=overwrite)
    if why is not None:
        raise ExperimentError(why)
    clear = overwrite and run.root.exists() and any(run.root.iterdir())
    barrier("output_dir_checked")
    if primary:
        if clear:
            log(f"--overwrite: clearing {run.root}")
            for child in run.root.iterdir():
                if child.name == run.masks.name:  # cached masks are keyed by metadata: keep
                    continue
                shutil.rmtree(child) if child.is_dir() else child.unlink()
        run.root.mkdir(parents=True, exist_ok=True)
    barrier("output_dir_ready")


def check_resume_settings(run: RunDir, settings: dict[str, Any]) -> None:
    """A resume must use the stopped run's settings (``args.json``), except those in
    :data:`RESUMABLE_CHANGES`; :class:`ExperimentError` lists every difference."""
    if not run.args.exists():
        return
    old = json.loads(run.args.read_text())
    diffs = {k: (old.get(k), v) for k, v in settings.items()
             if k not in RESUMABLE_CHANGES and old.get(k) != v}
    if diffs:
        raise ExperimentError(
            "--resume with different settings than the stopped run: "
            + "; ".join(f"{k}: was {a!r}, now {b!r}" for k, (a, b) in sorted(diffs.items()))
            + ". Resume with the same flags, or start a new run")


def _json_default(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def to_json(obj: Any) -> str:
    """One-line JSON; NumPy scalars and arrays as numbers and lists, anything else as str."""
    return json.dumps(obj, default=_json_default)


def write_json(path: Path, obj: Any) -> None:
    """``obj`` as indented JSON (keys sorted), atomically."""
    atomic.write_json(path, obj, indent=2, default=_json_default)


def append_jsonl(path: Path, rec: dict) -> None:
    with open(path, "a") as f:
        f.write(to_json(rec) + "\n")
        f.flush()


def read_jsonl(path: Path) -> list[dict]:
    """The records of ``path`` (none if it is missing), skipping a line cut by a crash."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def truncate_jsonl(path: Path, step: int) -> None:
    """Drop records past ``step`` (written after the checkpoint a run resumes from)."""
    recs = [r for r in read_jsonl(path) if r.get("step", 0) <= step]
    atomic.write_text(path, "".join(json.dumps(r) + "\n" for r in recs))
