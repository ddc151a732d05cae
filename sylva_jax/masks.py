"""Mask files and mask reports.

A mask set is ``{weight path: bool [out/bs, in/bs]}`` (docs/ARCHITECTURE.md). On disk it is
ONE safetensors file (masks stored as ``uint8``) whose header metadata holds the JSON
description of how the masks were made (model identity, scope, sparsity, block size,
method, partitions, samples, factor, seed) and a SHA-256 hash of those fields. One file
means one atomic ``os.replace``: a reader sees either the old or the new masks, never a mix.
The experiment reuses a cached file only when :func:`masks_match` says its metadata is the
one wanted (``docs/algorithm.md`` §0: masks are made once and reused).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any, Mapping

import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save

from sylva_jax import tree as tree_lib
from sylva_jax.atomic import atomic_open

__all__ = ["IDENTITY_KEYS", "mask_metadata", "metadata_hash", "save_masks", "load_masks",
           "masks_match", "mask_report", "format_mask_report"]

FORMAT = "sylva_jax.masks/1"
# the fields that identify how a mask set was made; the hash covers exactly these
IDENTITY_KEYS = ("model", "scope", "sparsity", "block_size", "method", "num_partition",
                 "num_samples", "factor", "seed")


def _jsonable(value):
    """Canonical JSON-friendly form (a compiled scope pattern becomes ``"re:<pattern>"``)."""
    if isinstance(value, re.Pattern):
        return "re:" + value.pattern
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    return value


def _canon(value) -> Any:
    """JSON round trip, so wanted values compare like stored ones (tuples -> lists, ...)."""
    return json.loads(json.dumps(_jsonable(value), sort_keys=True))


def metadata_hash(metadata: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the canonical JSON of the identity fields present in ``metadata``."""
    ident = {k: _jsonable(metadata[k]) for k in IDENTITY_KEYS if k in metadata}
    blob = json.dumps(ident, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def mask_metadata(*, model: str, scope, sparsity: float, block_size: int, method: str,
                  num_partition: int | None = None, num_samples: int | None = None,
                  factor: str | None = None, seed: int = 0, **extra) -> dict[str, Any]:
    """The metadata dict for :func:`save_masks` / :func:`masks_match`, with its ``hash``.

    ``model`` identifies the base model (a name plus, ideally, a file hash or revision).
    Extra keyword fields are stored too (informational, not hashed)."""
    md = {"model": model, "scope": scope, "sparsity": float(sparsity),
          "block_size": int(block_size), "method": method, "num_partition": num_partition,
          "num_samples": num_samples, "factor": factor, "seed": int(seed), **extra}
    md = _canon(md)
    md["hash"] = metadata_hash(md)
    return md


def _check_masks(masks: Mapping[str, Any]) -> dict[str, np.ndarray]:
    if not isinstance(masks, Mapping) or not masks:
        raise ValueError("masks must be a non-empty dict {weight path: bool [out/bs, in/bs]}")
    out = {}
    for n, m in masks.items():
        a = np.asarray(m)
        if a.ndim != 2:
            raise ValueError(f"mask {n!r} must be 2-D [out/bs, in/bs], got shape {a.shape}")
        if a.dtype != bool and not np.all((a == 0) | (a == 1)):
            raise ValueError(f"mask {n!r} must be boolean (0/1), got values outside {{0, 1}}")
        out[str(n)] = a.astype(bool)
    return out


def save_masks(masks: Mapping[str, Any], path: str | os.PathLike,
               metadata: Mapping[str, Any]) -> str:
    """Write ``masks`` and ``metadata`` to ``path`` atomically (:func:`sylva_jax.atomic.atomic_open`:
    temp file, fsync, ``os.replace``).

    The stored ``hash`` is (re)computed from the identity fields. Returns the path."""
    arrays = {n: m.astype(np.uint8) for n, m in _check_masks(masks).items()}
    md = _canon(dict(metadata))
    md["hash"] = metadata_hash(md)
    path = os.fspath(path)
    blob = save(arrays, metadata={"format": FORMAT, "sylva_metadata": json.dumps(md, sort_keys=True)})
    with atomic_open(path, "wb") as f:
        f.write(blob)
    return path


def load_masks(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """``(masks {name: bool [out/bs, in/bs]}, metadata)`` from a :func:`save_masks` file."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no mask file at {path!r}; compute masks first (compute_masks)")
    try:
        with safe_open(path, framework="numpy") as f:
            header = f.metadata() or {}
            masks = {k: f.get_tensor(k).astype(bool) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"{path!r} is not a readable safetensors mask file ({e})") from None
    if header.get("format") != FORMAT or "sylva_metadata" not in header:
        raise ValueError(f"{path!r} is a safetensors file but not a sylva_jax mask file "
                         f"(format {header.get('format')!r}, expected {FORMAT!r})")
    return masks, json.loads(header["sylva_metadata"])


def masks_match(metadata: Mapping[str, Any] | None, wanted: Mapping[str, Any]) -> tuple[bool, str]:
    """Whether cached masks with ``metadata`` can stand for masks made with ``wanted``.

    Compares every identity field present in either dict (and any extra field in ``wanted``);
    also checks the stored hash against the stored fields. Returns ``(ok, reason)``, the
    reason naming each differing field with its cached and wanted values."""
    if not metadata:
        return False, "no cached metadata"
    md, want = _canon(dict(metadata)), _canon(dict(wanted))
    if "hash" in md and md["hash"] != metadata_hash(md):
        return False, "cached metadata hash does not match its fields (file edited or corrupted)"
    keys = [k for k in IDENTITY_KEYS if k in md or k in want]
    keys += sorted(k for k in want if k not in IDENTITY_KEYS and k != "hash")
    diffs = [f"{k}: cached {md.get(k, '<missing>')!r}, wanted {want.get(k, '<missing>')!r}"
             for k in keys if md.get(k, None) != want.get(k, None)]
    if diffs:
        return False, "metadata differs: " + "; ".join(diffs)
    return True, "metadata matches"


def _flat_params(params) -> dict[str, Any]:
    if isinstance(params, nnx.Module):
        params = nnx.state(params, nnx.Param)
    return tree_lib.flatten(params)


def mask_report(masks: Mapping[str, Any], params) -> dict[str, Any]:
    """Tiles kept per layer and the achieved sparsity (``docs/algorithm.md`` §4).

    ``params``: the model's parameters (nested dict, NNX ``State``/``Module`` or flat dict);
    every parameter counts toward the overall sparsity, so a model training 5% of its
    attention weights reports e.g. ``95% in scope, 98.4% overall``. Returns a dict with
    ``layers`` ({name: shape, block_size, tiles, kept}), ``kept_tiles``, ``total_tiles``,
    ``trainable_params``, ``scope_params``, ``total_params``, ``sparsity_in_scope``,
    ``sparsity_overall`` and ``summary`` (a printable line)."""
    ms = _check_masks(masks)
    flat = _flat_params(params)
    total = int(sum(int(np.size(x)) for x in flat.values()))
    layers, kept_params, scope_params = {}, 0, 0
    for n, m in ms.items():
        if n not in flat:
            raise ValueError(f"mask {n!r} names no parameter of the model; masks are keyed by "
                             "weight path, e.g. 'model.layers.0.self_attn.q_proj.weight'")
        shape = tuple(int(d) for d in np.shape(flat[n]))
        r, c = m.shape
        if len(shape) != 2 or shape[0] % r or shape[1] % c or shape[0] // r != shape[1] // c:
            raise ValueError(f"mask {n!r} of shape {m.shape} does not tile weight {shape} with "
                             "square blocks")
        bs = shape[0] // r
        k = int(m.sum())
        layers[n] = {"shape": list(shape), "block_size": bs, "tiles": int(m.size), "kept": k}
        kept_params += k * bs * bs
        scope_params += shape[0] * shape[1]
    rep = {
        "layers": layers,
        "kept_tiles": int(sum(v["kept"] for v in layers.values())),
        "total_tiles": int(sum(v["tiles"] for v in layers.values())),
        "trainable_params": kept_params,
        "scope_params": scope_params,
        "total_params": total,
        "sparsity_in_scope": 1.0 - kept_params / scope_params,
        "sparsity_overall": 1.0 - kept_params / total if total else float("nan"),
    }
    rep["summary"] = format_mask_report(rep)
    return rep


def format_mask_report(report: Mapping[str, Any], per_layer: bool = False) -> str:
    """Printable form of :func:`mask_report` (one line; ``per_layer`` adds one line each)."""
    line = (f"{report['kept_tiles']}/{report['total_tiles']} tiles kept in "
            f"{len(report['layers'])} layers: {report['trainable_params']:,} trainable of "
            f"{report['total_params']:,} parameters ({100 * report['sparsity_overall']:.1f}% "
            f"sparsity overall, {100 * report['sparsity_in_scope']:.1f}% in scope)")
    if not per_layer:
        return line
    rows = [f"  {n}: {v['kept']}/{v['tiles']} tiles of {v['block_size']}x{v['block_size']} "
            f"(weight {v['shape'][0]}x{v['shape'][1]})" for n, v in report["layers"].items()]
    return "\n".join([line, *rows])
