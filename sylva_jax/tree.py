"""Flat views of parameter pytrees, keyed by Hugging Face style '.'-joined paths.

Every part of sylva_jax that names a weight (masks, adapters, statistics, checkpoints)
uses the same key: the '.'-joined key path of the leaf in a *nested dict* of arrays, e.g.
``"model.layers.0.self_attn.q_proj.weight"``. Integer keys (list indices) are written in
decimal. This module converts between nested pytrees and such flat dicts.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax

__all__ = ["key_to_str", "path_to_str", "flatten", "unflatten", "map_flat"]


def key_to_str(key: Any) -> str:
    """One jax key-path entry as a string (DictKey, SequenceKey, GetAttrKey, ...)."""
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_to_str(path: tuple) -> str:
    """A jax key path as a '.'-joined string.

    A trailing ``.value`` (Flax NNX ``Variable`` wrappers) is dropped so that an NNX
    ``State`` and its ``to_pure_dict()`` give the same names.
    """
    parts = [key_to_str(k) for k in path]
    if parts and parts[-1] in ("value", "raw_value"):
        parts = parts[:-1]
    return ".".join(parts)


def flatten(tree: Any) -> dict[str, Any]:
    """``{path: leaf}`` for every array leaf of ``tree`` (in ``jax.tree`` order)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    out: dict[str, Any] = {}
    for path, leaf in leaves:
        name = path_to_str(path)
        if name in out:
            raise ValueError(f"two leaves share the path {name!r}; flatten needs unique paths")
        out[name] = leaf
    return out


def unflatten(flat: Mapping[str, Any]) -> dict:
    """Inverse of :func:`flatten` for nested dicts (all keys become strings).

    Use :func:`map_flat` instead when the original tree structure must be kept exactly.
    """
    root: dict = {}
    for name, leaf in flat.items():
        node = root
        parts = name.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = leaf
    return root


def map_flat(fn, tree: Any) -> Any:
    """``tree`` with every leaf replaced by ``fn(path, leaf)``; structure kept exactly."""
    return jax.tree_util.tree_map_with_path(lambda p, x: fn(path_to_str(p), x), tree)
