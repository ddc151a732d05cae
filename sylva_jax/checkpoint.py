"""Checkpoints: full training state (Orbax) and adapter-only files (`docs/algorithm.md` §5).

Full state (:class:`RunCheckpoints`, or the functions :func:`checkpoint_manager`,
:func:`save_state`, :func:`restore_state`): the whole :class:`sylva_jax.train.TrainState`
pytree -- weights, optimizer state, LoRA factors, step, data position, RNG key -- plus a
small JSON item of the caller's own (``extra``), saved with
``orbax.checkpoint.CheckpointManager``. Restoring the latest checkpoint into a fresh state
and continuing gives bitwise the same weights as never stopping (the step is a
deterministic function of the state and the batch, and the data position is in the
state). Saves are atomic: Orbax writes a step into a temporary directory and renames it
when complete, so a crash or an exception during a save leaves the previous checkpoint
as the latest usable one (half-written temporary directories are never listed as steps).
Keep-best: a second manager keeps the ``keep_best`` checkpoints with the best metric
(``best_fn`` / ``best_mode`` options of ``CheckpointManagerOptions``).

The state is copied to host memory before Orbax sees it, so the caller may donate it to
the next training step while an asynchronous save is still writing.

Adapter only (:func:`save_adapter`, :func:`load_adapter`): the trained tile values, their
coordinates, block size and layout (``adapter.safetensors`` + ``adapter.json``), a few
MB for a model whose full state is GBs, plus a fingerprint of the base model it applies
to (:func:`fingerprint`). Loading writes the saved tiles into a freshly loaded base model
(a scatter-SET, not an add), so the result is bitwise the fine-tuned model.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from sylva_jax import atomic
from sylva_jax import tree as tree_lib
from sylva_jax.adapter import Adapter
from sylva_jax.inputs import reading

__all__ = [
    "CheckpointWriteError",
    "RunCheckpoints",
    "checkpoint_manager",
    "save_state",
    "restore_state",
    "fingerprint",
    "save_adapter",
    "load_adapter",
    "ADAPTER_FORMAT",
]

ADAPTER_FORMAT = "sylva-adapter/1"
_TILES = "adapter.safetensors"
_META = "adapter.json"


# ---------------------------------------------------------------------------------------
# full training state
# ---------------------------------------------------------------------------------------
def _ocp():
    import orbax.checkpoint as ocp  # lazy: orbax is heavy and only full-state checkpoints need it

    return ocp


def checkpoint_manager(directory: str | os.PathLike, *, max_to_keep: int | None = 2,
                       save_every: int = 1, best_metric: str | None = None,
                       best_mode: str = "max", async_save: bool = True,
                       barrier_prefix: str | None = None):
    """An ``ocp.CheckpointManager`` for :func:`save_state` / :func:`restore_state`.

    max_to_keep: checkpoints kept (the oldest, or with ``best_metric`` the worst, are
      deleted); ``None`` keeps all.
    save_every: ``save_interval_steps``: :func:`save_state` without ``force`` saves only
      steps that are multiples of it.
    best_metric, best_mode: keep-best: rank checkpoints by ``metrics[best_metric]``
      (``"max"`` or ``"min"``) instead of recency.
    async_save: write in a background thread (call ``wait_until_finished``/``close``).
    barrier_prefix: the prefix of this manager's multi-host barrier names. Orbax names its
      barriers by step (``async_write_complete.<step>...``), so two managers of one job that
      save the same step at once (the resume and the best checkpoint after an evaluation)
      must have different prefixes, or the coordination service refuses the second
      ("Barrier ... is already ongoing") and the job dies. ``None``: Orbax's default.
    """
    ocp = _ocp()
    if best_mode not in ("max", "min"):
        raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
    best_fn = None
    if best_metric is not None:
        def best_fn(metrics, _name=best_metric):
            if _name not in metrics:
                raise KeyError(f"checkpoint metrics {sorted(metrics)} lack the best metric {_name!r}")
            return float(metrics[_name])
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, save_interval_steps=int(save_every), best_fn=best_fn,
        best_mode=best_mode, keep_checkpoints_without_metrics=False if best_fn else True,
        enable_async_checkpointing=bool(async_save), create=True,
        multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=barrier_prefix))
    return ocp.CheckpointManager(Path(directory).absolute(), options=options,
                                 item_names=("state", "extra"))


def _host_copy(tree):
    """A copy of every array leaf that the training step cannot donate away: a host (NumPy)
    copy where this process holds the whole array; on a multi-host mesh, where each process
    holds only its shards, an on-device copy with the same sharding (Orbax then writes each
    process's shards, and the primary process the metadata)."""
    def one(x):
        if not hasattr(x, "shape"):
            return x
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return jnp.array(x, copy=True)
        return np.array(x, copy=True)

    return jax.tree.map(one, tree)


def _abstract(tree):
    """``ShapeDtypeStruct`` leaves (with sharding when known) as a restore target."""
    def leaf(x):
        if not hasattr(x, "shape"):
            return x
        sharding = getattr(x, "sharding", None)
        if sharding is None:
            sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return jax.tree.map(leaf, tree)


def save_state(manager, step: int, state: Any, *, extra: Mapping[str, Any] | None = None,
               metrics: Mapping[str, float] | None = None, force: bool = True) -> bool:
    """Save ``state`` (any pytree of arrays, e.g. a ``TrainState``) as ``step``.

    extra: JSON-serialisable dict saved beside it (restored by :func:`restore_state`).
    metrics: for keep-best managers. force: ignore Orbax's save policy (``save_every``; note
    that Orbax also saves the first step it sees). A step that already
    exists is not rewritten (returns ``False``). Returns whether a save was started.
    """
    ocp = _ocp()
    step = int(step)
    if step in manager.all_steps():
        return False
    if not force and not manager.should_save(step):
        return False
    extra = dict(extra or {})
    json.dumps(extra)  # fail here, before anything is written, if it is not JSON
    args = ocp.args.Composite(state=ocp.args.StandardSave(_host_copy(state)),
                              extra=ocp.args.JsonSave(extra))
    return bool(manager.save(step, args=args, metrics=None if metrics is None else dict(metrics),
                             force=True))


def restore_state(manager, target_state: Any, *, step: int | None = None) -> tuple[Any, dict] | None:
    """``(state, extra)`` of ``step`` (default: the latest), or ``None`` if there is none.

    ``target_state`` gives the structure, shapes, dtypes and placement (e.g. a fresh
    ``trainer.init(params)``; its arrays are not read).
    """
    ocp = _ocp()
    manager.wait_until_finished()
    if step is None:
        manager.reload()
        step = manager.latest_step()
        if step is None:
            return None
    where = Path(manager.directory) / str(int(step))
    with reading(where, "checkpoint", "it is damaged or from another run: delete that step's "
                 "directory to resume from an earlier one, or start afresh"):
        restored = manager.restore(int(step), args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_abstract(target_state)), extra=ocp.args.JsonRestore()))
    return restored["state"], dict(restored["extra"] or {})


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (a full disk, a failing file system, a crash inside
    the writer). The step being written is discarded; complete earlier steps stay loadable."""


@contextlib.contextmanager
def _writing(directory: Path, what: str, last_good: Callable[[], int | None]):
    try:
        yield
    except CheckpointWriteError:
        raise
    except Exception as e:
        good = last_good()
        keep = (f"the last complete checkpoint (step {good}) is intact and a relaunch resumes from it"
                if good is not None else "no complete checkpoint exists yet")
        raise CheckpointWriteError(f"could not write {what} under {directory}: {_cause(e)}. "
                                   f"Free disk space or fix the file system; {keep}.") from e


def _cause(e: BaseException) -> str:
    """The telling part of a writer's error: the OS error if there is one, else its text
    (long tensorstore messages keep their head and their tail, where the OS error is)."""
    text = " ".join(str(e).split())
    if "No space left on device" in text or getattr(e, "errno", None) == 28:
        return "no space left on device (ENOSPC)"
    if len(text) > 400:
        text = text[:180] + " ... " + text[-200:]
    return f"{type(e).__name__}: {text}"


class RunCheckpoints:
    """Resume and keep-best checkpoints of one training run.

    ``directory/latest``: the last ``keep`` states (for ``--resume``), every
    ``save_every`` steps when saved with ``force=False``;
    ``directory/best``: the ``keep_best`` states with the best ``best_metric``.

    Typical loop::

        ckpt = RunCheckpoints(out / "checkpoints", keep=2)
        restored = ckpt.restore_latest(trainer.init(params))   # None on a fresh run
        ...
        ckpt.save(step, state, {"best": best})                # every N steps
        ckpt.save_best(step, state, {"mmlu": score})          # after an evaluation
        ckpt.wait()
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int = 2, keep_best: int = 1,
                 best_metric: str = "mmlu", best_mode: str = "max", save_every: int = 1,
                 async_save: bool = True):
        self.directory = Path(directory)
        self.best_metric = best_metric
        self.save_every = int(save_every)
        if self.save_every < 1:
            raise ValueError(f"save_every must be a positive number of steps, got {save_every}")
        self.latest = checkpoint_manager(self.directory / "latest", max_to_keep=keep,
                                         save_every=save_every, async_save=async_save,
                                         barrier_prefix="sylva_latest")
        self.best = checkpoint_manager(self.directory / "best", max_to_keep=keep_best,
                                       best_metric=best_metric, best_mode=best_mode,
                                       async_save=async_save, barrier_prefix="sylva_best")

    def save(self, step: int, state: Any, extra: Mapping[str, Any] | None = None, *,
             force: bool = True) -> bool:
        """Save the resume checkpoint of ``step`` (no-op if that step is already saved).
        With ``force=False`` only steps that are multiples of ``save_every`` are saved, so
        the training loop may call this after every step."""
        if not force and int(step) % self.save_every:
            return False
        with self._writing(f"the checkpoint of step {int(step)}"):
            return save_state(self.latest, step, state, extra=extra)

    def save_best(self, step: int, state: Any, metrics: Mapping[str, float],
                  extra: Mapping[str, Any] | None = None) -> bool:
        """Offer ``state`` as a best checkpoint; Orbax keeps the ``keep_best`` best by
        ``metrics[best_metric]``."""
        if self.best_metric not in metrics:
            raise KeyError(f"save_best needs metrics[{self.best_metric!r}]; got {sorted(metrics)}")
        with self._writing(f"the best checkpoint of step {int(step)}"):
            return save_state(self.best, step, state,
                              extra={**(extra or {}), "metrics": dict(metrics)}, metrics=metrics)

    def restore_latest(self, target_state: Any) -> tuple[Any, dict] | None:
        """``(state, extra)`` of the latest resume checkpoint, or ``None``."""
        return restore_state(self.latest, target_state)

    def restore_best(self, target_state: Any) -> Any | None:
        """The best state so far, or ``None`` if no best checkpoint exists."""
        self.best.wait_until_finished()
        self.best.reload()
        step = self.best.best_step()
        if step is None:
            return None
        return restore_state(self.best, target_state, step=step)[0]

    @property
    def latest_step(self) -> int | None:
        self.latest.wait_until_finished()
        return self.latest.latest_step()

    @property
    def best_step(self) -> int | None:
        self.best.wait_until_finished()
        return self.best.best_step()

    def wait(self) -> None:
        """Block until pending asynchronous saves are on disk (raises their errors as
        :class:`CheckpointWriteError`)."""
        with self._writing("a checkpoint"):
            self.latest.wait_until_finished()
            self.best.wait_until_finished()

    def _writing(self, what: str):
        def last_good():
            try:
                self.latest.reload()
                return self.latest.latest_step()
            except Exception:  # the error being reported may be what breaks the listing
                return None
        return _writing(self.directory, what, last_good)

    def close(self) -> None:
        self.latest.close()
        self.best.close()


# ---------------------------------------------------------------------------------------
# adapter-only checkpoints
# ---------------------------------------------------------------------------------------
_MIX = np.uint32(0x9E3779B1)  # odd (golden-ratio) constant


@jax.jit
def _checksums(x: jax.Array, keep: jax.Array) -> jax.Array:
    """Two order-independent, exact 32-bit checksums of the bits of ``x`` where ``keep``.

    ``c1 = sum_i bits_i * (2 i + 1)`` and ``c2 = sum_i (bits_i ^ (i * MIX)) * MIX`` mod 2^32.
    Integer addition mod 2^32 is associative, so the value does not depend on the device
    or the reduction order; ``2 i + 1`` is odd, so changing any single element changes
    ``c1`` with certainty, and the position weights detect moved elements.
    """
    if x.dtype.itemsize == 8:
        bits = jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)
        keep = jnp.repeat(keep.reshape(-1), 2)
    else:
        utype = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
        bits = jax.lax.bitcast_convert_type(x, utype).reshape(-1).astype(jnp.uint32)
        keep = keep.reshape(-1)
    bits = jnp.where(keep, bits, jnp.uint32(0))
    i = jnp.arange(bits.shape[0], dtype=jnp.uint32)
    c1 = jnp.sum(bits * (2 * i + 1), dtype=jnp.uint32)
    c2 = jnp.sum((bits ^ (i * _MIX)) * _MIX, dtype=jnp.uint32)
    return jnp.stack([c1, c2])


def _frozen_mask(adapter, path: str, shape) -> jax.Array:
    """bool mask of the stored weight, False on the adapter's tiles of ``path``."""
    bs = adapter.block_size
    rows, cols = adapter.coords[path]
    if adapter.layout == "in_out":
        rows, cols = cols, rows
    m = np.ones((shape[0] // bs, shape[1] // bs), bool)
    m[rows, cols] = False
    return jnp.asarray(np.repeat(np.repeat(m, bs, 0), bs, 1))


def fingerprint(params: Any, adapter=None) -> str:
    """A hex fingerprint of a base model that training with ``adapter`` does not change.

    Covers every parameter: its path, shape, dtype and two exact 32-bit checksums of its
    bits (see ``_checksums``: any single changed element is always detected), where the
    adapter's tiles are excluded from the adapted weights' checksums -- they are the only
    values training changes, and :func:`load_adapter` overwrites them. So the fingerprint
    of the fine-tuned parameters equals that of the base model, and it differs for any
    other base. Cost: one on-device pass over the weights (no host transfer of weights).
    """
    h = hashlib.sha256(b"sylva-fingerprint/1")
    coords = {} if adapter is None else adapter.coords
    for path, leaf in sorted(tree_lib.flatten(params).items()):
        x = jnp.asarray(leaf)
        keep = (_frozen_mask(adapter, path, x.shape) if path in coords
                else jnp.ones(x.shape, bool))
        sums = np.asarray(_checksums(x, keep))
        h.update(f"{path}|{tuple(x.shape)}|{x.dtype}|{int(sums[0])}|{int(sums[1])}\n".encode())
    return h.hexdigest()


def save_adapter(path: str | os.PathLike, adapter, params: Any, *,
                 base_fingerprint: str | None = None) -> Path:
    """Save the trained tiles of ``params`` and the adapter's layout to directory ``path``.

    Writes ``adapter.safetensors`` (per adapted weight ``tiles/<path>`` ``[nnz, bs, bs]``
    in the weight dtype, ``rows/<path>``, ``cols/<path>`` int32 tile coordinates,
    ``shape/<path>``) and ``adapter.json`` (format, block size, layout, dtypes, counts,
    base fingerprint). ``base_fingerprint`` defaults to :func:`fingerprint` of ``params``
    (tiles excluded, so fine-tuned and base parameters give the same value). The directory
    is written beside the target and renamed into place (an existing one is replaced only
    once the new one is complete). Returns ``path``.
    """
    path = Path(path)
    tiles = adapter.tiles(params)
    arrays: dict[str, np.ndarray] = {}
    dtypes = {}
    for p, (rows, cols) in adapter.coords.items():
        t = tiles[p]
        dtypes[p] = str(t.dtype)
        # safetensors/NumPy have no bfloat16: store its bits (uint16) and record the dtype
        arrays[f"tiles/{p}"] = np.asarray(t) if t.dtype != jnp.bfloat16 else \
            np.asarray(jax.lax.bitcast_convert_type(t, jnp.uint16))
        arrays[f"rows/{p}"] = np.asarray(rows, np.int32)
        arrays[f"cols/{p}"] = np.asarray(cols, np.int32)
        arrays[f"shape/{p}"] = np.asarray(adapter.shapes[p], np.int64)
    meta = {
        "format": ADAPTER_FORMAT,
        "block_size": adapter.block_size,
        "layout": adapter.layout,
        "num_weights": len(adapter.coords),
        "num_tiles": adapter.num_tiles,
        "num_trainable": adapter.num_trainable,
        "dtypes": dtypes,
        "base_fingerprint": base_fingerprint or fingerprint(params, adapter),
    }
    with atomic.atomic_dir(path) as tmp:
        save_file(arrays, str(tmp / _TILES), metadata={"format": ADAPTER_FORMAT})
        (tmp / _META).write_text(json.dumps(meta, indent=1))
    return path


def load_adapter(path: str | os.PathLike, params: Any, *, check_base: bool = True):
    """Apply a saved adapter to a freshly loaded base model: returns ``(params, adapter)``.

    The saved tile values are written into the weights (scatter-set), so the result equals
    the fine-tuned parameters bitwise. Raises ``ValueError`` when ``params`` is not the
    base model the adapter was trained from (fingerprint mismatch; ``check_base=False``
    skips the check) or has other shapes.
    """
    path = Path(path)
    if not (path / _META).is_file() or not (path / _TILES).is_file():
        raise FileNotFoundError(f"{path} is not an adapter directory (needs {_META} and {_TILES}; "
                                "write one with save_adapter)")
    fix = "the adapter is truncated or corrupt: save it again with save_adapter"
    with reading(path / _META, "adapter metadata", fix):
        meta = json.loads((path / _META).read_text())
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
    if meta.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{path}: unknown adapter format {meta.get('format')!r}, expected {ADAPTER_FORMAT!r}")
    with reading(path / _TILES, "adapter tiles", fix):
        arrays = load_file(str(path / _TILES))
        state = {"block_size": np.asarray(meta["block_size"]), "layout": np.asarray(meta["layout"])}
        for key, value in arrays.items():
            if not key.startswith("tiles/"):
                state[key] = value
        adapter = Adapter.from_state_dict(state)
    flat = tree_lib.flatten(params)
    for p, shape in adapter.shapes.items():
        if p not in flat:
            raise ValueError(f"the adapter in {path} adapts {p!r}, which this model does not have; "
                             "load the base model the adapter was trained from")
        if tuple(flat[p].shape) != tuple(shape):
            raise ValueError(f"the adapter in {path} was trained on {p!r} of shape {tuple(shape)}, this "
                             f"model's is {tuple(flat[p].shape)}; load the base model it was trained from")
    if check_base:
        got = fingerprint(params, adapter)
        if got != meta["base_fingerprint"]:
            raise ValueError(
                f"the adapter in {path} was trained on a different base model (base fingerprint "
                f"{meta['base_fingerprint'][:16]}..., this model {got[:16]}...); load the base model it "
                "was trained from (check_base=False applies it anyway)")
    tiles = {}
    for p in adapter.coords:
        t = arrays[f"tiles/{p}"]
        dt = meta["dtypes"][p]
        tiles[p] = (jax.lax.bitcast_convert_type(jnp.asarray(t), jnp.bfloat16) if dt == "bfloat16"
                    else jnp.asarray(t, dt))
    return adapter.set_tiles(params, tiles), adapter
