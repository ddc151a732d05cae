"""Evaluation pieces of a fine-tuning study: length-bucketed batches, the token-mean loss
over a held-out set, and which weights a run moved.

Batch convention: :mod:`sylva_jax.losses` (``input_ids`` / ``attention_mask`` / ``labels``
``[B, T]``, ``labels = -100`` where no loss is taken). The held-out loss is the token mean
over the union of the examples' loss tokens (every token weighs the same, whatever its
example's length): ``sum_e sum_t nll[e, t] / sum_e n_e``.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from sylva_jax import tree as tree_lib
from sylva_jax.data.batching import collate
from sylva_jax.losses import IGNORE_INDEX, token_nll

__all__ = ["bucket_length", "eval_batches", "token_sums", "heldout_loss", "moved_weights",
           "everywhere", "nowhere", "inside_tiles"]

Region = Callable[[str, tuple], np.ndarray]  # (path, stored shape) -> bool [shape]: may move


def bucket_length(n: int, max_len: int, first: int = 64) -> int:
    """The padded length of a batch whose longest row has ``n`` tokens: the smallest of
    ``first, 2 first, 4 first, ...`` that holds ``n``, capped at ``max_len`` (a row longer
    than ``max_len`` keeps its length). Few distinct shapes: few compilations."""
    if n < 0 or first < 1:
        raise ValueError(f"bucket_length needs n >= 0 and first >= 1, got n={n}, first={first}")
    b = int(first)
    while b < n:
        b *= 2
    return min(b, max_len) if n <= max_len else int(n)


def eval_batches(examples: Sequence[Mapping], batch_size: int, *, pad_id: int, max_len: int,
                 first_bucket: int = 64) -> list[tuple[list[int], dict[str, np.ndarray]]]:
    """``[(indices, batch)]``: ``examples`` sorted by length (longest first), ``batch_size``
    per batch, each padded to :func:`bucket_length` of its longest row. ``indices`` are the
    examples' positions in ``examples``; the last batch is filled up with rows without
    labels (they add no loss), so every batch has ``batch_size`` rows."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    out = []
    for j in range(0, len(order), batch_size):
        idx = order[j:j + batch_size]
        rows = [examples[i] for i in idx]
        length = bucket_length(max(len(r["input_ids"]) for r in rows), max_len, first_bucket)
        filler = {"input_ids": rows[0]["input_ids"], "labels": np.full_like(rows[0]["labels"], IGNORE_INDEX)}
        rows = rows + [filler] * (batch_size - len(rows))
        out.append((idx, collate(rows, pad_id=pad_id, pad_to=length)))
    return out


def token_sums(apply_fn: Callable) -> Callable:
    """Jitted ``sums(params, input_ids, attention_mask, labels) -> (nll [B], count [B])``:
    per row, the summed next-token NLL over its loss tokens and their number, with
    ``apply_fn(params, input_ids, attention_mask) -> logits [B, T, V]``."""
    @jax.jit
    def sums(params, input_ids, attention_mask, labels):
        nll, valid = token_nll(apply_fn(params, input_ids, attention_mask), labels)
        return nll.sum(axis=1), valid.sum(axis=1)

    return sums


def heldout_loss(sums: Callable, params: Any, batches: Sequence[tuple[Sequence[int], Mapping]]) -> dict:
    """Token-mean loss of ``params`` over ``batches`` (from :func:`eval_batches`).

    Returns ``{"loss": float, "nll": [n], "count": [n], "n": n}`` with ``nll[e]`` and
    ``count[e]`` the summed NLL and loss tokens of example ``e`` (its position in the
    examples), so the loss of any subset ``S`` is ``nll[S].sum() / count[S].sum()``.
    """
    n = sum(len(idx) for idx, _ in batches)
    nll, count = np.zeros(n), np.zeros(n)
    for idx, batch in batches:
        a, c = sums(params, batch["input_ids"], batch["attention_mask"], batch["labels"])
        nll[list(idx)], count[list(idx)] = np.asarray(a)[: len(idx)], np.asarray(c)[: len(idx)]
    return {"loss": float(nll.sum() / max(count.sum(), 1.0)), "nll": nll, "count": count, "n": n}


def everywhere(path: str, shape: tuple) -> np.ndarray:
    """Region of full fine-tuning: every element may move."""
    return np.ones(shape, bool)


def nowhere(path: str, shape: tuple) -> np.ndarray:
    """Region of methods that keep the weights frozen (LoRA before merging)."""
    return np.zeros(shape, bool)


def inside_tiles(adapter) -> Region:
    """Region of a Sylva run: the elements of ``adapter``'s tiles (stored layout)."""
    bs = adapter.block_size

    def region(path: str, shape: tuple) -> np.ndarray:
        allowed = np.zeros(shape, bool)
        if path not in adapter.coords:
            return allowed
        rows, cols = adapter.coords[path]
        view = allowed.T if adapter.layout == "in_out" else allowed  # coords are [out, in]
        for r, c in zip(np.asarray(rows), np.asarray(cols)):
            view[r * bs:(r + 1) * bs, c * bs:(c + 1) * bs] = True
        return allowed

    return region


def moved_weights(base: Mapping[str, Any], params: Any, region: Region) -> dict:
    """Which weights a run moved, against its base weights ``base`` (``{path: array}`` as
    :func:`sylva_jax.tree.flatten` gives, e.g. host copies taken before training).

    Returns ``max_change_outside_trainable`` (the largest ``|w - w0|`` where ``region``
    says nothing may move: 0.0 for a correct run) and ``changed_trainable_fraction`` (the
    fraction of the elements inside ``region`` that differ from the base). Differences are
    taken in float64.
    """
    flat = tree_lib.flatten(params)
    missing = sorted(set(base) ^ set(flat))
    if missing:
        raise KeyError(f"moved_weights: base and params differ in {missing[:3]}; pass the same model's weights")
    out_max, changed, allowed_total = 0.0, 0, 0
    for path, w in flat.items():
        d = np.abs(np.asarray(w).astype(np.float64) - np.asarray(base[path]).astype(np.float64))
        allowed = region(path, d.shape)
        if (~allowed).any():
            out_max = max(out_max, float(d[~allowed].max()))
        changed += int((d[allowed] > 0).sum())
        allowed_total += int(allowed.sum())
    return {"max_change_outside_trainable": out_max,
            "changed_trainable_fraction": changed / max(allowed_total, 1)}
