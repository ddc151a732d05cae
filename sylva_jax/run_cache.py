"""A directory of finished training runs, so that a long study stopped midway resumes at
its next run instead of its next arm.

One run is two files under the cache root, both written atomically (:mod:`sylva_jax.atomic`):

``<name>.npz``   the run's trainable pytree (leaves ``t0, t1, ...``) and snapshots of it
                 at some steps (leaves ``s<j>_<i>``);
``<name>.json``  its record (any JSON object) plus ``snap_steps``; written LAST, so its
                 presence says the arrays are complete.

A loaded run comes back with the structure of a ``treedef`` the caller gives (the
trainable pytree of its method; the file stores leaves only).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np

from sylva_jax import atomic

__all__ = ["RunCache"]


class RunCache:
    """Finished runs under ``root`` (created on the first save), keyed by file-name-safe
    ``name`` strings (no ``/``)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _files(self, name: str) -> tuple[Path, Path]:
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"run name {name!r} must be a non-empty file name without '/'")
        return self.root / f"{name}.npz", self.root / f"{name}.json"

    def save(self, name: str, record: dict, trainable: Any,
             snapshots: Sequence[tuple[int, Any]] = ()) -> None:
        """Store a finished run: ``record`` (JSON-able), the ``trainable`` pytree and
        ``snapshots`` ``[(step, pytree like trainable)]``; arrays are copied to the host."""
        npz, js = self._files(name)
        self.root.mkdir(parents=True, exist_ok=True)
        arrays = {f"t{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(trainable))}
        for j, (_, tree) in enumerate(snapshots):
            arrays.update({f"s{j}_{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(tree))})
        with atomic.atomic_open(npz, "wb") as f:
            np.savez(f, **arrays)
        self.update_record(name, record, [int(st) for st, _ in snapshots])

    def update_record(self, name: str, record: dict, snap_steps: Sequence[int]) -> None:
        """Rewrite the record of a stored run (e.g. with evaluation results added)."""
        _, js = self._files(name)
        atomic.write_json(js, {**record, "snap_steps": [int(s) for s in snap_steps]}, indent=1,
                          default=atomic.json_default)

    def record(self, name: str) -> tuple[dict, list[int]] | None:
        """``(record, snap_steps)`` of a stored run, or ``None`` if it is not (completely) stored."""
        _, js = self._files(name)
        if not js.exists():
            return None
        rec = json.loads(js.read_text())
        return rec, list(rec.pop("snap_steps", []))

    def load(self, name: str, treedef, *, snapshots: bool = True):
        """``(record, trainable, [(step, snapshot)])`` of a stored run with the leaves put
        into ``treedef`` (host NumPy arrays), or ``None`` if it is not stored."""
        got = self.record(name)
        if got is None:
            return None
        rec, steps = got
        npz, _ = self._files(name)
        n = treedef.num_leaves
        with np.load(npz) as z:
            if len([k for k in z.files if k.startswith("t")]) != n:
                raise ValueError(f"run {name!r} in {self.root} has {len(z.files)} arrays, the given tree "
                                 f"{n} leaves: a different method or model; remove the file to retrain")
            trainable = jax.tree.unflatten(treedef, [z[f"t{i}"] for i in range(n)])
            snaps = [(st, jax.tree.unflatten(treedef, [z[f"s{j}_{i}"] for i in range(n)]))
                     for j, st in enumerate(steps)] if snapshots else []
        return rec, trainable, snaps

    def drop(self, prefix: str) -> int:
        """Remove every stored run whose name starts with ``prefix``; returns how many files."""
        if not self.root.exists():
            return 0
        files = [f for f in self.root.iterdir() if f.name.startswith(prefix) and f.suffix in (".npz", ".json")]
        for f in files:
            f.unlink()
        return len(files)
