"""Tile importance and top-k block masks (``docs/algorithm.md`` §4).

Every method maps a layer's statistics to a score per ``block_size x block_size`` tile of
its weight ``W [out, in]`` (tile ``(r, c)`` = ``W[r*bs:(r+1)*bs, c*bs:(c+1)*bs]``); the
scorers are a registry (:mod:`sylva_jax.scorers`, one module per family, each scorer's
docstring giving its equation), and :data:`METHODS` lists them. The mask keeps each layer's
best tiles, as many as the allocation (:mod:`sylva_jax.allocation`) grants it: ``"layer"``
(``k`` per layer, published), ``"global"`` or ``"proportional"``.

- Kronecker: ``sylva`` (the published formula on the HODLR factors), ``sylva_published``
  (the authors' numerics), ``kfac`` (the formula with exact dense factors), ``newton``
  (OBS-scored K-FAC Newton step);
- ``tile_newton``: the exact Newton gain of training one tile alone (tile-diagonal blocks);
- first order: ``fisher`` (mean per-sample squared gradient; needs ``per_sample=True``
  calibration), ``grad_sq`` (``Gbar^2``), ``adam_gain`` (gain of an Adam step; per-sample),
  ``grad`` (``|Gbar|``), ``magnitude`` (``|W|``), ``random``.
"""
from __future__ import annotations

import time
from typing import Any, Mapping

import numpy as np

from sylva_jax import capture
from sylva_jax import masks as masks_lib
from sylva_jax.allocation import ALLOCATIONS, kept_counts, num_kept
from sylva_jax.allocation import check_sparsity as _check_sparsity
from sylva_jax.names import DEFAULT_SCORER
from sylva_jax.scorers import SCORERS, Settings
from sylva_jax.statistics import LayerStats, Stats

__all__ = ["METHODS", "NEEDS_STATS", "NEEDS_PER_SAMPLE", "NEEDS_DENSE", "ALLOCATIONS",
           "num_kept", "kept_counts", "tile_scores", "topk_mask", "select_blocks",
           "compute_masks"]

METHODS = tuple(SCORERS)
NEEDS_STATS = tuple(m for m, sc in SCORERS.items() if sc.stats)
NEEDS_PER_SAMPLE = tuple(m for m, sc in SCORERS.items() if sc.per_sample)
NEEDS_DENSE = tuple(m for m, sc in SCORERS.items() if sc.dense)


def _check_method(method):
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; use one of {', '.join(map(repr, METHODS))}")


def _scorer_kwargs(method: str, given: Mapping[str, Any]) -> dict:
    """The scorer's keyword arguments: its defaults updated by ``given`` (``TypeError`` for
    one it does not take)."""
    allowed = SCORERS[method].kwargs
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise TypeError(f"method {method!r} takes no keyword(s) {unknown}; its keywords are "
                        f"{sorted(allowed) or 'none'}")
    return {**allowed, **given}


def _check_blocks(shapes: Mapping[str, tuple], block_size: int):
    if int(block_size) != block_size or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    bad = {n: tuple(s) for n, s in shapes.items() if s[0] % block_size or s[1] % block_size}
    if bad:
        listing = "; ".join(f"{n} {s}" for n, s in bad.items())
        raise ValueError(
            f"block_size {block_size} does not divide the shape [out, in] of layer(s): {listing}. "
            "Choose a block size dividing both dimensions, or narrow the scope to exclude them."
        )


def topk_mask(scores: np.ndarray, k: int, name: str = "layer") -> np.ndarray:
    """Bool mask of ``scores``' shape keeping the ``k`` highest entries; ties go to the lower
    flat index (stable sort by ``(-score, index)``)."""
    scores = np.asarray(scores, np.float64)
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"non-finite tile scores in {name}; check its statistics (damping?)")
    order = np.argsort(-scores.ravel(), kind="stable")
    mask = np.zeros(scores.size, bool)
    mask[order[:k]] = True
    return mask.reshape(scores.shape)


def spread_topk_mask(scores: np.ndarray, k: int, name: str = "layer") -> np.ndarray:
    """Like :func:`topk_mask`, but no row or column of tiles takes more than its share:
    tiles are taken in score order (ties as in ``topk_mask``) while their row holds fewer
    than ``ceil(k / rows)`` and their column fewer than ``ceil(k / cols)`` kept tiles; if
    the caps leave fewer than ``k``, the best remaining tiles fill up.

    Why: Sylva's score is an outer product (``imp[o, i] = out_imp[o] * in_imp[i]``, so the
    tile scores are too), and a plain top-k of an outer product is a corner of the matrix:
    the kept tiles share a few input columns (those carrying large activations). This
    variant keeps the ranking and spreads the tiles (an ablation of the quality study)."""
    scores = np.asarray(scores, np.float64)
    mask = topk_mask(scores, 0, name)  # validates the scores
    rows, cols = scores.shape
    cap_r, cap_c = -(-k // rows), -(-k // cols)
    n_r, n_c = np.zeros(rows, int), np.zeros(cols, int)
    order = np.argsort(-scores.ravel(), kind="stable")
    taken = 0
    for f in order:
        r, c = divmod(int(f), cols)
        if n_r[r] < cap_r and n_c[c] < cap_c:
            mask[r, c] = True
            n_r[r] += 1
            n_c[c] += 1
            taken += 1
            if taken == k:
                return mask
    for f in order:  # the caps blocked some: fill with the best remaining
        r, c = divmod(int(f), cols)
        if not mask[r, c]:
            mask[r, c] = True
            taken += 1
            if taken == k:
                break
    return mask


def tile_scores(stats: Stats, *, block_size: int = 64, method: str = "sylva",
                seed: int = 0, damping: float | None = None,
                relative_damping: bool | None = None, **scorer_kwargs
                ) -> dict[str, np.ndarray]:
    """``{weight path: float64 [out/bs, in/bs]}`` tile scores of ``method``.

    ``damping=None``: the scorer's default (``1e-6`` for the Sylva family and ``kfac``,
    ``1e-2`` relative for ``newton`` / ``tile_newton``); ``relative_damping=None``: the
    ``Stats``' setting (Sylva family). ``scorer_kwargs``: the method's own keywords
    (``adam_gain``: ``b``, ``eps``; ``sylva_published``: ``published_matvec``).
    """
    _check_method(method)
    bs = int(block_size)
    _check_blocks({n: s.shape for n, s in stats.items()}, bs)
    scorer = SCORERS[method]
    if scorer.stats and any(s.grad_mean is None for s in stats.values()):
        raise ValueError(f"method {method!r} needs calibration statistics; use preprocess() "
                         "(or compute_masks) rather than weights-only Stats")
    relative = getattr(stats, "relative_damping", False) if relative_damping is None else relative_damping
    cfg = Settings(block_size=bs, seed=int(seed), damping=damping, relative_damping=bool(relative),
                   stats=stats, kwargs=_scorer_kwargs(method, scorer_kwargs))
    return {n: np.asarray(scorer.fn(s, cfg), np.float64) for n, s in stats.items()}


def select_blocks(stats: Stats, *, sparsity: float, block_size: int = 64,
                  method: str = "sylva", seed: int = 0, damping: float | None = None,
                  spread: bool = False, allocation: str = "layer",
                  **scorer_kwargs) -> dict[str, np.ndarray]:
    """Tile masks: ``{weight path: bool [out/bs, in/bs]}``.

    Each layer keeps its best ``count`` tiles, ties broken by the lower tile index;
    ``count = round((1 - sparsity) * n_tiles)`` (halves up; at least one tile) per layer for
    ``allocation="layer"``; ``"global"`` / ``"proportional"`` redistribute the same total
    (:func:`sylva_jax.allocation.kept_counts`). ``spread=True`` caps the tiles per row and
    column of tiles (:func:`spread_topk_mask`). ``stats`` comes from
    :func:`capture.preprocess` (or a weights-only ``Stats`` for ``magnitude`` / ``random``).
    Errors: sparsity outside ``[0, 1)``, unknown method or allocation, a block size not
    dividing a layer's dimensions.
    """
    _check_sparsity(sparsity)
    scores = tile_scores(stats, block_size=block_size, method=method, seed=seed, damping=damping,
                         **scorer_kwargs)
    counts = kept_counts(scores, sparsity, allocation)
    pick = spread_topk_mask if spread else topk_mask
    return {n: pick(sc, counts[n], n) for n, sc in scores.items()}


_PREPROCESS_KEYS = ("num_samples", "num_partition", "factor", "factor_kind", "keep_dense",
                    "relative_damping", "per_sample", "token_update")


def _preprocess_kw(method: str, given: Mapping[str, Any]) -> dict:
    """``given`` with what ``method`` needs turned on: exact dense factors for
    :data:`NEEDS_DENSE` (unless the factors are dense already), per-sample squared gradients
    for :data:`NEEDS_PER_SAMPLE`."""
    unknown = set(given) - set(_PREPROCESS_KEYS)
    if unknown:
        raise TypeError(f"unknown keyword(s) {sorted(unknown)}; preprocess accepts {_PREPROCESS_KEYS}")
    kw = dict(given)
    if method in NEEDS_DENSE and kw.get("factor_kind", "hodlr") != "dense":
        kw["keep_dense"] = True
    if method in NEEDS_PER_SAMPLE:
        kw["per_sample"] = True
    return kw


def compute_masks(model, batches, *, scope, sparsity: float, block_size: int = 64,
                  method: str = DEFAULT_SCORER, seed: int = 0, damping: float | None = None,
                  allocation: str = "layer", scorer_kwargs: Mapping[str, Any] | None = None,
                  **preprocess_kw) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Pre-processing and mask selection in one call.

    ``method``: the tile scorer, default :data:`sylva_jax.names.DEFAULT_SCORER`
    (``tile_newton``, the best measured; ``"sylva"`` is the published score).
    Returns ``(masks, report)``; ``report`` is :func:`sylva_jax.masks.mask_report` plus the
    method, the settings, the per-layer kept counts (``kept``) and wall times (``seconds``:
    ``preprocess``, ``select``). ``magnitude`` and ``random`` skip the calibration passes
    (``batches`` is then unused). ``preprocess_kw`` go to :func:`capture.preprocess`
    (``num_samples``, ``num_partition``, ``factor``, ``factor_kind``, ``keep_dense``,
    ``relative_damping``, ``per_sample``, ``token_update``); ``kfac`` turns ``keep_dense`` on
    unless the factors are dense already, ``fisher`` / ``adam_gain`` turn ``per_sample`` on.
    ``damping``: the scorer's (``None``: its default); the inverse diagonals computed during
    pre-processing use ``1e-6`` when it is ``None``. ``scorer_kwargs``: the method's own
    keywords (:func:`tile_scores`).
    """
    _check_sparsity(sparsity)
    _check_method(method)
    kw = _preprocess_kw(method, preprocess_kw)
    fn = capture.functional_model(model)
    weights = capture.scoped_weights(fn, scope)
    _check_blocks({n: w.shape for n, w in weights.items()}, int(block_size))

    t0 = time.perf_counter()
    if method in NEEDS_STATS:
        stats = capture.preprocess(fn, batches, scope=scope,
                                   damping=1e-6 if damping is None else damping, **kw)
    else:
        stats = Stats(layers={n: LayerStats(name=n, weight=w) for n, w in weights.items()},
                      scope=scope)
    t1 = time.perf_counter()
    masks = select_blocks(stats, sparsity=sparsity, block_size=block_size, method=method,
                          seed=seed, damping=damping, allocation=allocation,
                          **dict(scorer_kwargs or {}))
    t2 = time.perf_counter()
    report = masks_lib.mask_report(masks, fn.params)
    report.update(method=method, sparsity_requested=float(sparsity), block_size=int(block_size),
                  seed=int(seed), num_samples=int(stats.num_samples), allocation=allocation,
                  kept={n: int(m.sum()) for n, m in masks.items()},
                  seconds={"preprocess": t1 - t0, "select": t2 - t1})
    if method in NEEDS_STATS:
        report.update(factor=stats.factor, factor_kind=stats.factor_kind,
                      num_partition=stats.num_partition)
    return masks, report
