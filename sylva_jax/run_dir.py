"""The run directory of the reference experiment: its layout, the rules for reusing it, and
the small files in it.

Layout of ``<output_dir>``: ``args.json`` (the settings), ``metrics.jsonl`` and
``evals.jsonl`` (one record per line, each with its ``step``), ``summary.json``,
``curves.png``, ``masks/`` (cached masks, kept by ``--overwrite``), ``checkpoints/``
(Orbax), ``adapter/``, ``peft_adapter/`` and ``merged/`` (exports), ``restarts.jsonl`` (one
line per relaunch) and ``.lock`` (the one writer, :mod:`sylva_jax.runlock`). JSON files are
written atomically; JSONL files are appended a line at a time, and a line cut by a crash is
skipped when read.

What a launch does with an existing directory (:func:`plan`), by ``--resume`` mode:

| directory holds | ``auto`` (default) | ``require`` (``--resume``) | ``never`` |
|---|---|---|---|
| nothing | new run | error | new run |
| a finished run | error (``--overwrite``) | error | error (``--overwrite``) |
| an unfinished run with a checkpoint | resume | resume | error |
| an unfinished run without one | restart afresh, masks reused | error | error |

``--overwrite`` clears everything but ``masks/`` and starts a new run.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any, Callable


from sylva_jax import atomic
from sylva_jax.experiment_config import RESUME_MODES, ExperimentError
from sylva_jax.run_log import log
from sylva_jax.runlock import LOCK_NAME

__all__ = ["RunDir", "FINISHED", "RESUMABLE_CHANGES", "RESUME_MODES", "resume_mode", "plan",
           "prepare", "check_output_path", "record_restart", "check_resume_settings",
           "to_json", "write_json", "append_jsonl", "read_jsonl", "truncate_jsonl"]

FINISHED = ("finished", "target_reached")  # summary statuses of a run that is done
# settings that may differ between a stopped run and its --resume
RESUMABLE_CHANGES = ("resume", "overwrite", "stop_at_step", "log_interval", "coordinator", "process_id",
                     "compile_cache_dir", "no_compile_cache", "no_export_peft", "no_export_merged")
# what a fresh restart of an unfinished run clears (cached masks and the restart log stay)
_RUN_FILES = ("args.json", "metrics.jsonl", "evals.jsonl", "summary.json", "curves.png",
              "checkpoints", "adapter", "peft_adapter", "merged")


def resume_mode(resume: str | bool) -> str:
    """``resume`` as one of :data:`RESUME_MODES` (``True`` is ``require``, ``False`` ``never``)."""
    if resume is True or resume is False:
        return "require" if resume else "never"
    if resume not in RESUME_MODES:
        raise ExperimentError(f"--resume must be one of {', '.join(RESUME_MODES)}, got {resume!r}")
    return resume


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
    peft_adapter = property(lambda self: self.root / "peft_adapter")
    merged = property(lambda self: self.root / "merged")
    restarts = property(lambda self: self.root / "restarts.jsonl")

    def contents(self) -> list[Path]:
        """What the directory holds, its lock file aside."""
        if not self.root.is_dir():
            return []
        return [c for c in self.root.iterdir() if c.name != LOCK_NAME]

    def checkpoint_step(self) -> int | None:
        """The newest complete resume checkpoint's step (Orbax names them by step; a
        half-written one carries a temporary suffix), or None."""
        latest = self.checkpoints / "latest"
        steps = [int(c.name) for c in latest.iterdir() if c.name.isdigit()] if latest.is_dir() else []
        return max(steps, default=None)

    def finished(self) -> bool:
        """Whether ``summary.json`` records a finished run (an unreadable one does not)."""
        try:
            return json.loads(self.summary.read_text()).get("status") in FINISHED
        except (OSError, ValueError):
            return False


def plan(run: RunDir, *, resume: str | bool, overwrite: bool) -> str:
    """What a launch does with ``run`` (the table in the module docstring): ``"new"``,
    ``"resume"``, ``"restart"`` (an unfinished run with no checkpoint: afresh, masks kept) or
    ``"overwrite"``; :class:`ExperimentError` saying why when it may not be used."""
    mode, out = resume_mode(resume), run.root
    if not run.contents():
        if mode == "require":
            raise ExperimentError(f"--resume: {out} does not exist or is empty; nothing to resume")
        return "new"
    if overwrite:
        return "overwrite"
    if run.finished():
        if mode == "require":
            raise ExperimentError(f"{out} holds a finished run; nothing to resume "
                                  f"(use --overwrite to start again, or another --output_dir)")
        raise ExperimentError(f"{out} holds a finished run (summary.json); refusing to overwrite it. "
                              f"Pass --overwrite to replace it, or choose another --output_dir")
    if mode == "require":
        if not run.checkpoints.exists():
            raise ExperimentError(f"--resume: {out} has no checkpoints to resume from "
                                  f"(drop --resume to start a new run there)")
        return "resume"
    if mode == "never":
        if run.checkpoints.exists():
            raise ExperimentError(f"{out} holds an unfinished run; pass --resume to continue it, "
                                  f"--overwrite to start again, or choose another --output_dir")
        return "new"
    if run.checkpoint_step() is not None:
        return "resume"
    return "restart" if run.args.exists() else "new"


def _clear(run: RunDir, names: tuple[str, ...] | None) -> None:
    """Delete ``names`` under the run (all but ``masks/`` and the lock when None)."""
    for child in run.contents():
        if child.name == run.masks.name or (names is not None and child.name not in names):
            continue
        shutil.rmtree(child) if child.is_dir() else child.unlink()


def prepare(run: RunDir, *, resume: str | bool, overwrite: bool, primary: bool,
            barrier: Callable[[str], None]) -> str:
    """Decide what to do with ``run`` (:func:`plan`; every process checks), then, on the
    primary process only, clear it for ``overwrite`` (all but ``masks/``) or a ``restart``
    (the old run's files), and create it. ``barrier(name)`` keeps the processes in step
    around the change. Returns the plan."""
    action = plan(run, resume=resume, overwrite=overwrite)
    barrier("output_dir_checked")
    if primary:
        if action == "overwrite":
            log(f"--overwrite: clearing {run.root}")
            _clear(run, None)
        elif action == "restart":
            log(f"{run.root} holds an unfinished run with no checkpoint yet: starting it afresh "
                "(cached masks are reused when they match)")
            _clear(run, _RUN_FILES)
        run.root.mkdir(parents=True, exist_ok=True)
    barrier("output_dir_ready")
    return action


def check_output_path(run: RunDir) -> None:
    """:class:`ExperimentError` unless ``run.root`` is, or can be made, a writable directory."""
    root = run.root
    for p in [root, *root.parents]:
        if p.exists():
            if not p.is_dir():
                what = "--output_dir" if p == root else f"--output_dir's parent {p}"
                raise ExperimentError(f"{what} is an existing file, not a directory; "
                                      "choose another --output_dir")
            if not os.access(p, os.W_OK | os.X_OK):
                raise ExperimentError(f"{p} is not writable; choose another --output_dir")
            return


def record_restart(run: RunDir, action: str) -> None:
    """One line in ``restarts.jsonl`` for a relaunch (``resume`` or ``restart``)."""
    append_jsonl(run.restarts, {
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "action": action, "checkpoint_step": run.checkpoint_step(),
        "host": socket.gethostname(), "pid": os.getpid()})


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


def to_json(obj: Any) -> str:
    """One-line JSON; NumPy scalars and arrays as numbers and lists, anything else as str."""
    return json.dumps(obj, default=atomic.json_default)


def write_json(path: Path, obj: Any) -> None:
    """``obj`` as indented JSON (keys sorted), atomically."""
    atomic.write_json(path, obj, indent=2, default=atomic.json_default)


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
