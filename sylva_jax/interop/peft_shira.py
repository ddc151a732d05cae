"""Sylva tiles <-> a PEFT SHiRA adapter directory (docs/algorithm.md, the adapter).

PEFT's SHiRA layer adds a sparse COO delta to a frozen ``nn.Linear``: per module ``M``
with weight ``[out, in]``

    W' = W + sparse_coo(shira_indices [2, n], shira_weight [n], (out, in)),  scaling 1,

where row 0 of the indices is the output index and row 1 the input index, and
``n = r * (in + out)`` exactly, with one global ``r`` for the adapter (peft refuses a
module with ``r * (in + out) > in * out``). A Sylva adapter trains whole ``bs x bs`` tiles
inside the weights, so its SHiRA form is, per adapted weight, the entries of its tiles
with values ``W_tuned - W_base`` (float32), padded with zero-valued entries up to ``n``
(duplicate COO indices sum, so a zero adds nothing). ``r`` is the smallest that holds the
largest weight's tile entries. ``mask_type`` is ``"sylva_tiles"`` (not ``"random"``), so
PEFT builds no mask of its own on load and takes the saved indices.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sylva_jax import tree as tree_lib
from sylva_jax.checkpoint import fingerprint
from sylva_jax.interop import _files
from sylva_jax.progress import track

__all__ = ["ShiraBudgetError", "shira_rank", "shira_tensors", "save_peft_shira", "load_peft_shira"]

MASK_TYPE = "sylva_tiles"


class ShiraBudgetError(ValueError):
    """The adapter's tiles do not fit SHiRA's one rank (see :func:`shira_rank`)."""


def _out_in(adapter, path: str) -> tuple[int, int]:
    if adapter.layout != "out_in" or len(adapter.shapes[path]) != 2:
        raise ValueError(f"{path!r}: PEFT SHiRA adapts nn.Linear weights stored [out, in]; this adapter has "
                         f"layout {adapter.layout!r} and weight shape {adapter.shapes[path]}. Export a merged "
                         "checkpoint instead (sylva_jax.export.export_merged)")
    return adapter.out_in_shape(path)


def shira_rank(adapter) -> int:
    """The smallest global SHiRA ``r`` with ``r * (in + out) >= nnz * bs**2`` for every
    adapted weight; :class:`ShiraBudgetError` (a ``ValueError``) naming the weight when a
    module cannot hold ``r * (in + out)`` entries (``> in * out``, PEFT's limit).

    With the same tile density ``f`` in every weight (Sylva's per-layer top-k) this is
    ``r ~ f * max(in * out / (in + out))`` against the smallest ``in * out / (in + out)``:
    on SmolLM2's attention a sparsity above about 0.5 fits (the default 0.95 gives ``r = 15``)."""
    bs2 = adapter.block_size ** 2
    r = 1
    for path, (rows, _) in adapter.coords.items():
        out_dim, in_dim = _out_in(adapter, path)
        r = max(r, math.ceil(rows.shape[0] * bs2 / (out_dim + in_dim)))
    for path in adapter.coords:
        out_dim, in_dim = _out_in(adapter, path)
        if r * (out_dim + in_dim) > out_dim * in_dim:
            widest = max(adapter.coords, key=lambda p: adapter.coords[p][0].shape[0] * bs2 / sum(_out_in(adapter, p)))
            raise ShiraBudgetError(
                f"this Sylva adapter does not fit PEFT SHiRA: SHiRA has one rank r for every module, and r = {r} "
                f"(needed by {widest!r}, {adapter.coords[widest][0].shape[0]} tiles of {adapter.block_size}x"
                f"{adapter.block_size}) gives {_files.module_name(path)!r} ([{out_dim}, {in_dim}]) "
                f"r * (in + out) = {r * (out_dim + in_dim)} entries, more than its {out_dim * in_dim} weights, "
                "which peft refuses. Export a merged checkpoint instead (sylva_jax.export.export_merged), or train "
                "fewer tiles per weight")
    return r


def _entry_indices(rows: np.ndarray, cols: np.ndarray, bs: int) -> tuple[np.ndarray, np.ndarray]:
    """Output / input indices of every entry of the tiles ``(rows, cols)``, in the order of
    ``tiles[t, i, j]`` flattened (tile-major, then row, then column)."""
    i = np.arange(bs)
    shape = (rows.shape[0], bs, bs)
    out_idx = np.broadcast_to(rows[:, None, None] * bs + i[None, :, None], shape)
    in_idx = np.broadcast_to(cols[:, None, None] * bs + i[None, None, :], shape)
    return out_idx.reshape(-1), in_idx.reshape(-1)


def shira_tensors(adapter, params: Any, base_params: Any) -> tuple[int, dict[str, np.ndarray]]:
    """``(r, {peft key: array})``: per adapted weight ``shira_indices`` int32
    ``[2, r * (in + out)]`` and ``shira_weight`` float32 ``[r * (in + out)]`` holding
    ``tiles(params) - tiles(base_params)``, zero-padded (see the module doc)."""
    r = shira_rank(adapter)
    tuned = adapter.tiles(params)
    base = adapter.tiles(base_params)
    bs = adapter.block_size
    out: dict[str, np.ndarray] = {}
    for path in track(adapter.coords, "SHiRA deltas", unit="weight", every_s=10, delay_s=2):
        rows, cols = adapter.coords[path]
        out_dim, in_dim = _out_in(adapter, path)
        n = r * (out_dim + in_dim)
        delta = np.asarray(jax.device_get(tuned[path].astype(jnp.float32) - base[path].astype(jnp.float32)))
        oi, ii = _entry_indices(rows, cols, bs)
        pad = n - oi.shape[0]
        indices = np.stack([np.concatenate([oi, np.full(pad, oi[0])]),
                            np.concatenate([ii, np.full(pad, ii[0])])]).astype(np.int32)
        values = np.concatenate([delta.reshape(-1), np.zeros(pad, np.float32)])
        out[_files.peft_key(path, "shira_indices")] = indices
        out[_files.peft_key(path, "shira_weight")] = values
    return r, out


def save_peft_shira(out_dir: str | os.PathLike, adapter, params: Any, base_params: Any = None, *,
                    base_tiles: Any = None, base_name_or_path: str | None = None,
                    base_fingerprint: str | None = None) -> Path:
    """Write the trained tiles of ``params`` as a PEFT SHiRA adapter directory.

    Args:
      out_dir: the directory (written atomically; an existing export is replaced).
      adapter: the run's :class:`sylva_jax.adapter.Adapter`.
      params: the fine-tuned parameters (tiles trained in place).
      base_params: the base model's parameters (the deltas are ``params - base_params``
        on the tiles; its :func:`sylva_jax.checkpoint.fingerprint` is stored).
      base_tiles: instead of ``base_params``, the base model's tiles
        (``adapter.tiles(base_params)`` taken before training, a few MB): the base is then
        ``adapter.unmerge(params, base_tiles)``.
      base_name_or_path: ``base_model_name_or_path`` in the config.
      base_fingerprint: precomputed fingerprint of ``base_params``.
    Raises ``ValueError`` when the tiles do not fit SHiRA's one rank (:func:`shira_rank`).
    """
    if not adapter.coords:
        raise ValueError("the adapter has no tiles; nothing to export")
    if (base_params is None) == (base_tiles is None):
        raise ValueError("save_peft_shira needs exactly one of base_params (the base model's parameters) or "
                         "base_tiles (adapter.tiles(base_params), taken before training)")
    if base_params is None:
        base_params = adapter.unmerge(params, base_tiles)
    r, tensors = shira_tensors(adapter, params, base_params)
    config = {
        **_files.base_config(base_name_or_path),
        "peft_type": "SHIRA",
        "r": r,
        "mask_type": MASK_TYPE,
        "random_seed": None,
        "init_weights": True,
        "target_modules": sorted(_files.module_name(p) for p in adapter.coords),
    }
    fp = base_fingerprint or fingerprint(base_params)
    with _files.atomic_dir(out_dir) as tmp:
        _files.write_adapter(tmp, config, tensors, fingerprint=fp)
    return Path(out_dir)


def load_peft_shira(path: str | os.PathLike, params: Any, *, check_base: bool = True) -> Any:
    """``params`` with a PEFT SHiRA adapter merged in: ``W += scaling-1 sparse delta`` per
    module (duplicates summed, as torch's COO tensor), in float32 then rounded once to the
    weight dtype. Refuses modules ``params`` lacks, indices out of range, and (with
    ``check_base``) an adapter exported from another base model."""
    config, tensors, saved_fp = _files.read_adapter(path, "SHIRA")
    flat = tree_lib.flatten(params)
    deltas: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for key, value in tensors.items():
        module, _, tensor = key[len(_files.PEFT_PREFIX):].rpartition(".")
        if not key.startswith(_files.PEFT_PREFIX) or tensor not in ("shira_indices", "shira_weight"):
            raise ValueError(f"{path}: tensor {key!r} is not a PEFT SHiRA tensor "
                             f"({_files.PEFT_PREFIX}<module>.shira_indices / .shira_weight)")
        w = f"{module}.weight"
        if w not in flat:
            raise ValueError(f"{path}: the adapter adapts {module!r}, which this model does not have; load the "
                             "base model the adapter was trained on")
        idx, val = deltas.get(w, (None, None))
        deltas[w] = (value, val) if tensor == "shira_indices" else (idx, value)
    for w, (idx, val) in deltas.items():
        out_dim, in_dim = flat[w].shape
        if idx is None or val is None or idx.shape != (2, val.shape[0]):
            raise ValueError(f"{path}: {w!r} needs shira_indices [2, n] and shira_weight [n]")
        if idx.min() < 0 or idx[0].max() >= out_dim or idx[1].max() >= in_dim:
            raise ValueError(f"{path}: shira_indices of {w!r} fall outside its [{out_dim}, {in_dim}] weight")
    _files.check_fingerprint(path, saved_fp, params, check_base=check_base)

    def merge(p, leaf):
        if p not in deltas:
            return leaf
        idx, val = deltas[p]
        w = jnp.asarray(leaf)
        new = w.astype(jnp.float32).at[idx[0], idx[1]].add(jnp.asarray(val, jnp.float32))
        return new.astype(w.dtype)

    return tree_lib.map_flat(merge, params)
