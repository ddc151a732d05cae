"""Deterministic, resumable padded batches of tokenized examples (plain NumPy).

An *example* is a mapping with ``input_ids`` and ``labels`` (1-D int sequences of the same
length, labels aligned with input_ids as in :mod:`sylva_jax.losses`), e.g. the output of
:func:`sylva_jax.data.instruct.tokenize_conversation`. A *batch* follows the batch convention
of :mod:`sylva_jax.losses`: ``input_ids`` ``[B, T]`` int32, ``attention_mask`` ``[B, T]``
int32 (1 = real token), ``labels`` ``[B, T]`` int32 with ``IGNORE_INDEX`` (-100) on padding.
Padding is on the right.

The order of epoch ``e`` is a permutation drawn from ``numpy.random.default_rng([seed, e])``,
so it depends only on ``(seed, epoch, len(examples))``: a run restarted with the same
arguments and ``start=k`` yields exactly batches ``k, k+1, ...`` of the uninterrupted run.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import numpy as np

# Same value as sylva_jax.losses.IGNORE_INDEX; repeated here so that the data package never
# imports jax (loaders return plain Python / NumPy).
IGNORE_INDEX = -100

__all__ = ["IGNORE_INDEX", "pad_id_of", "num_batches", "epoch_order", "collate", "batches"]


def pad_id_of(tok) -> int:
    """The padding id to use with tokenizer ``tok``: ``tok.pad_token_id``, or its eos when the
    tokenizer defines no pad token (padded positions are masked, so any valid id works)."""
    pad = getattr(tok, "pad_token_id", None)
    if pad is None:
        pad = getattr(tok, "eos_token_id", None)
    if pad is None:
        raise ValueError("tokenizer has neither pad_token_id nor eos_token_id; pass pad_id explicitly")
    return int(pad)


def num_batches(n_examples: int, batch_size: int, *, drop_last: bool = False) -> int:
    """Number of batches one epoch of ``n_examples`` yields."""
    _check_batch_size(batch_size)
    return n_examples // batch_size if drop_last else -(-n_examples // batch_size)


def epoch_order(n_examples: int, *, seed: int, epoch: int = 0, shuffle: bool = True) -> np.ndarray:
    """Example indices of one epoch, ``[n_examples]`` int64; deterministic in (seed, epoch)."""
    if not shuffle:
        return np.arange(n_examples)
    return np.random.default_rng([int(seed), int(epoch)]).permutation(n_examples)


def collate(
    examples: Sequence[Mapping],
    *,
    pad_id: int,
    pad_to: int | None = None,
    pad_to_multiple_of: int | None = None,
) -> dict[str, np.ndarray]:
    """Right-pad a list of examples into one batch.

    Returns ``{"input_ids", "attention_mask", "labels"}``, each ``[B, T]`` int32, with
    ``T = pad_to`` if given, else the longest example rounded up to ``pad_to_multiple_of``
    (if given). Padding: ``input_ids = pad_id``, ``attention_mask = 0``, ``labels = -100``.
    An example may carry its own ``attention_mask``; otherwise all its tokens are real.
    """
    if len(examples) == 0:
        raise ValueError("collate needs at least one example")
    ids = [np.asarray(e["input_ids"]) for e in examples]
    labels = [np.asarray(e["labels"]) for e in examples]
    for i, (a, b) in enumerate(zip(ids, labels)):
        if a.ndim != 1 or a.shape != b.shape:
            raise ValueError(
                f"example {i}: input_ids and labels must be 1-D and of equal length, got shapes "
                f"{a.shape} and {b.shape}"
            )
    longest = max(len(a) for a in ids)
    if pad_to is not None:
        if longest > pad_to:
            raise ValueError(
                f"an example has {longest} tokens, more than pad_to={pad_to}; tokenize with "
                f"max_len <= {pad_to} (truncation) or raise pad_to"
            )
        length = int(pad_to)
    else:
        length = longest
        if pad_to_multiple_of:
            length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    length = max(length, 1)
    out_ids = np.full((len(ids), length), pad_id, dtype=np.int32)
    out_mask = np.zeros((len(ids), length), dtype=np.int32)
    out_labels = np.full((len(ids), length), IGNORE_INDEX, dtype=np.int32)
    for i, (e, a, b) in enumerate(zip(examples, ids, labels)):
        n = len(a)
        out_ids[i, :n] = a
        out_labels[i, :n] = b
        out_mask[i, :n] = np.asarray(e["attention_mask"]) if "attention_mask" in e else 1
    return {"input_ids": out_ids, "attention_mask": out_mask, "labels": out_labels}


def batches(
    examples: Sequence[Mapping],
    batch_size: int,
    *,
    seed: int,
    pad_id: int,
    shuffle: bool = True,
    drop_last: bool = False,
    epoch: int = 0,
    start: int = 0,
    pad_to: int | None = None,
    pad_to_multiple_of: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Iterate over one epoch of padded batches, deterministically and resumably.

    examples: sequence of ``{"input_ids", "labels"}`` (1-D). Batch ``j`` holds examples
    ``order[j*batch_size:(j+1)*batch_size]`` with ``order = epoch_order(len(examples), seed=seed,
    epoch=epoch, shuffle=shuffle)``. ``start`` is the index of the first *batch* to yield
    (resume after ``start`` batches of this epoch were consumed); ``list(batches(..., start=k))
    == list(batches(...))[k:]``. ``drop_last`` drops a final incomplete batch. ``pad_to`` fixes
    ``T`` for every batch (no recompiles; examples must already be at most that long);
    ``pad_to_multiple_of`` rounds each batch's longest example up instead (few shapes).
    Yields ``{"input_ids", "attention_mask", "labels"}``, each ``[B, T]`` int32.
    """
    _check_batch_size(batch_size)
    if pad_id is None:
        raise ValueError("pad_id is None; use sylva_jax.data.pad_id_of(tok) (pad, else eos)")
    n = len(examples)
    total = num_batches(n, batch_size, drop_last=drop_last)
    if not 0 <= start <= total:
        raise ValueError(f"start={start} is outside the epoch's {total} batches")
    order = epoch_order(n, seed=seed, epoch=epoch, shuffle=shuffle)
    for j in range(start, total):
        idx = order[j * batch_size:(j + 1) * batch_size]
        yield collate([examples[int(i)] for i in idx], pad_id=pad_id, pad_to=pad_to,
                      pad_to_multiple_of=pad_to_multiple_of)


def _check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
