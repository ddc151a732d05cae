"""Tile importance and top-k block masks (``docs/algorithm.md`` §4).

Every method maps a layer's statistics to a score per ``block_size x block_size`` tile of
its weight ``W [out, in]`` (tile ``(r, c)`` = ``W[r*bs:(r+1)*bs, c*bs:(c+1)*bs]``), and the
mask keeps the ``k`` best tiles of each layer. Methods (one signature, for ablations):

- ``sylva``: hierarchical factors ``A`` (``in x in``) and ``G`` (``out x out``):
  ``in_imp[i]  = (Gbar[:, i]^T G Gbar[:, i]) / diag((A + l I)^-1)[i]``  (one matmat ``G Gbar``),
  ``out_imp[o] = (Gbar[o, :] A Gbar[o, :]^T) / diag((G + l I)^-1)[o]``  (one matmat ``A Gbar^T``),
  ``imp[o, i] = out_imp[o] * in_imp[i]``; tile score = sum of ``imp`` over the tile =
  ``outer(block_sum(out_imp), block_sum(in_imp))`` (no ``[out, in]`` importance matrix);
- ``kfac``: the same formula with exact dense factors (float64 NumPy; small models);
- ``fisher``: tile sum of ``Gbar^2`` (diagonal empirical Fisher, FISH-style);
- ``grad``: tile sum of ``|Gbar|``;
- ``magnitude``: tile sum of ``|W|``;
- ``random``: uniform scores from a generator seeded by ``(seed, crc32(layer name))``.
"""
from __future__ import annotations

import functools
import math
import time
import zlib
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from sylva_jax import capture, curvature
from sylva_jax import masks as masks_lib
from sylva_jax.statistics import LayerStats, Stats

__all__ = ["METHODS", "num_kept", "tile_scores", "topk_mask", "select_blocks", "compute_masks"]

METHODS = ("sylva", "kfac", "fisher", "grad", "magnitude", "random")
NEEDS_STATS = ("sylva", "kfac", "fisher", "grad")


def _check_sparsity(sparsity) -> float:
    s = float(sparsity)
    if not (0.0 <= s < 1.0) or math.isnan(s):
        raise ValueError(
            f"sparsity must be in [0, 1) (the fraction of tiles frozen; 0.95 keeps 5%), got {sparsity!r}"
        )
    return s


def _check_method(method):
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; use one of {', '.join(map(repr, METHODS))}")


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


def num_kept(sparsity: float, n_tiles: int) -> int:
    """``k = round((1 - sparsity) * n_tiles)``, rounding halves up, at least 1 (sparsity < 1).

    A ``1e-9`` guard absorbs binary round-off so that e.g. ``(1 - 0.7) * 10`` gives 3."""
    s = _check_sparsity(sparsity)
    k = int(math.floor((1.0 - s) * n_tiles + 0.5 + 1e-9))
    return min(max(k, 1), n_tiles)


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


@functools.partial(jax.jit, static_argnames="bs")
def _tile_sum(x, *, bs):
    o, i = x.shape
    return x.astype(jnp.float32).reshape(o // bs, bs, i // bs, bs).sum(axis=(1, 3))


def _block_sum(v, bs):
    return np.asarray(v, np.float64).reshape(-1, bs).sum(axis=1)


@jax.jit
def _sylva_vectors(A, G, gbar, inv_a, inv_g):
    """``(out_imp [out], in_imp [in])`` from factors, ``Gbar [out, in]`` and inverse diagonals."""
    gg = curvature.matmat(G, gbar)                 # [out, in] = G Gbar
    in_imp = jnp.sum(gbar * gg, axis=0) / inv_a
    ag = curvature.matmat(A, gbar.T)               # [in, out] = A Gbar^T = (Gbar A)^T
    out_imp = jnp.sum(gbar.T * ag, axis=0) / inv_g
    return out_imp, in_imp


def _inv_diag_dense(F: np.ndarray, damping: float, relative: bool) -> np.ndarray:
    F = np.asarray(F, np.float64)
    lam = damping * float(np.mean(np.diag(F))) if relative else damping
    return np.diag(np.linalg.inv(F + lam * np.eye(F.shape[0])))


def _kfac_vectors(s: LayerStats, damping: float, relative: bool):
    if s.A_dense is None or s.G_dense is None:
        raise ValueError(
            f"method 'kfac' needs exact dense factors for {s.name}; run preprocess with "
            "keep_dense=True or factor_kind='dense'"
        )
    gbar = np.asarray(s.grad_mean, np.float64)
    A, G = np.asarray(s.A_dense, np.float64), np.asarray(s.G_dense, np.float64)
    in_imp = np.einsum("oi,oi->i", gbar, G @ gbar) / _inv_diag_dense(A, damping, relative)
    out_imp = np.einsum("oi,oi->o", gbar, gbar @ A) / _inv_diag_dense(G, damping, relative)
    return out_imp, in_imp


def tile_scores(stats: Stats, *, block_size: int = 64, method: str = "sylva",
                seed: int = 0, damping: float = 1e-6, relative_damping: bool | None = None
                ) -> dict[str, np.ndarray]:
    """``{weight path: float64 [out/bs, in/bs]}`` tile scores (module docstring)."""
    _check_method(method)
    bs = int(block_size)
    _check_blocks({n: s.shape for n, s in stats.items()}, bs)
    if method in NEEDS_STATS and any(s.grad_mean is None for s in stats.values()):
        raise ValueError(f"method {method!r} needs calibration statistics; use preprocess() "
                         "(or compute_masks) rather than weights-only Stats")
    relative = getattr(stats, "relative_damping", False) if relative_damping is None else relative_damping
    inv = stats.inv_diags(damping, relative) if method == "sylva" else None
    # first dispatch every layer's device work (asynchronous), then bring results to the host
    raw = {}
    for n, s in stats.items():
        o, i = s.shape
        if method == "sylva":
            raw[n] = _sylva_vectors(s.A, s.G, s.grad_mean, *inv[n])
        elif method == "kfac":
            raw[n] = _kfac_vectors(s, damping, relative)
        elif method == "fisher":
            raw[n] = _tile_sum(jnp.square(s.grad_mean), bs=bs)
        elif method == "grad":
            raw[n] = _tile_sum(jnp.abs(s.grad_mean), bs=bs)
        elif method == "magnitude":
            raw[n] = _tile_sum(jnp.abs(s.weight), bs=bs)
        else:  # random
            rng = np.random.default_rng([int(seed), zlib.crc32(n.encode())])
            raw[n] = rng.random((o // bs, i // bs))
    out = {}
    for n, r in raw.items():
        if method in ("sylva", "kfac"):
            oi, ii = r  # tile score = outer product of block-summed importance vectors
            r = np.outer(_block_sum(oi, bs), _block_sum(ii, bs))
        out[n] = np.asarray(r, np.float64)
    return out


def select_blocks(stats: Stats, *, sparsity: float, block_size: int = 64,
                  method: str = "sylva", seed: int = 0, damping: float = 1e-6,
                  spread: bool = False) -> dict[str, np.ndarray]:
    """Top-k tile masks per layer: ``{weight path: bool [out/bs, in/bs]}``.

    ``spread=True`` caps the tiles per row and column of tiles (:func:`spread_topk_mask`).

    ``k = round((1 - sparsity) * n_tiles)`` (halves up; at least one tile) per layer, ties
    broken by the lower tile index. ``stats`` comes from :func:`capture.preprocess` (or a
    weights-only ``Stats`` for ``magnitude`` / ``random``). Errors: sparsity outside
    ``[0, 1)``, unknown method, a block size not dividing a layer's dimensions.
    """
    _check_sparsity(sparsity)
    scores = tile_scores(stats, block_size=block_size, method=method, seed=seed, damping=damping)
    pick = spread_topk_mask if spread else topk_mask
    return {n: pick(sc, num_kept(sparsity, sc.size), n) for n, sc in scores.items()}


_PREPROCESS_KEYS = ("num_samples", "num_partition", "factor", "factor_kind", "keep_dense",
                    "relative_damping")


def compute_masks(model, batches, *, scope, sparsity: float, block_size: int = 64,
                  method: str = "sylva", seed: int = 0, damping: float = 1e-6,
                  **preprocess_kw) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Pre-processing and mask selection in one call.

    Returns ``(masks, report)``; ``report`` is :func:`sylva_jax.masks.mask_report` plus the
    method, the settings and wall times (``seconds``: ``preprocess``, ``select``).
    ``magnitude`` and ``random`` skip the calibration passes (``batches`` is then unused).
    ``preprocess_kw`` go to :func:`capture.preprocess` (``num_samples``, ``num_partition``,
    ``factor``, ``factor_kind``, ``keep_dense``, ``relative_damping``); ``kfac`` turns
    ``keep_dense`` on unless the factors are dense already.
    """
    _check_sparsity(sparsity)
    _check_method(method)
    unknown = set(preprocess_kw) - set(_PREPROCESS_KEYS)
    if unknown:
        raise TypeError(f"unknown keyword(s) {sorted(unknown)}; preprocess accepts {_PREPROCESS_KEYS}")
    fn = capture.functional_model(model)
    weights = capture.scoped_weights(fn, scope)
    _check_blocks({n: w.shape for n, w in weights.items()}, int(block_size))

    t0 = time.perf_counter()
    if method in NEEDS_STATS:
        kw = dict(preprocess_kw)
        if method == "kfac" and kw.get("factor_kind", "hodlr") != "dense":
            kw["keep_dense"] = True
        stats = capture.preprocess(fn, batches, scope=scope, damping=damping, **kw)
    else:
        stats = Stats(layers={n: LayerStats(name=n, weight=w) for n, w in weights.items()},
                      scope=scope)
    t1 = time.perf_counter()
    masks = select_blocks(stats, sparsity=sparsity, block_size=block_size, method=method,
                          seed=seed, damping=damping)
    t2 = time.perf_counter()
    report = masks_lib.mask_report(masks, fn.params)
    report.update(method=method, sparsity_requested=float(sparsity), block_size=int(block_size),
                  seed=int(seed), num_samples=int(stats.num_samples),
                  seconds={"preprocess": t1 - t0, "select": t2 - t1})
    if method in NEEDS_STATS:
        report.update(factor=stats.factor, factor_kind=stats.factor_kind,
                      num_partition=stats.num_partition)
    return masks, report
