"""How many tiles each layer keeps (``docs/algorithm.md`` §4, budget allocation).

The budget is the per-layer one, ``K = sum_l k_l`` with ``k_l = round((1 - sparsity) n_l)``
(:func:`num_kept`, ``n_l`` the layer's tile count); an allocation redistributes it:

- ``"layer"`` (published): layer ``l`` keeps ``k_l``;
- ``"global"`` (FISH, SpIEL): the ``K`` best tiles of all layers ranked together, every layer
  first granted its single best tile (so each keeps ``>= 1``);
- ``"proportional"``: layer ``l`` keeps its share ``q_l = K m_l / sum_j m_j`` of the budget
  by score mass ``m_l = sum of max(score, 0)`` over its tiles, rounded by largest remainder
  under the bounds ``1 <= count_l <= n_l`` (equal shares per tile if every mass is 0).

Every allocation keeps exactly ``K`` tiles, at least 1 and at most ``n_l`` per layer; which
tiles a layer keeps is then its ``count_l`` best (``importance.topk_mask``).
"""
from __future__ import annotations

import math
from typing import Mapping

import numpy as np

__all__ = ["ALLOCATIONS", "num_kept", "kept_counts"]

ALLOCATIONS = ("layer", "global", "proportional")


def check_sparsity(sparsity) -> float:
    s = float(sparsity)
    if not (0.0 <= s < 1.0) or math.isnan(s):
        raise ValueError(
            f"sparsity must be in [0, 1) (the fraction of tiles frozen; 0.95 keeps 5%), got {sparsity!r}"
        )
    return s


def num_kept(sparsity: float, n_tiles: int) -> int:
    """``k = round((1 - sparsity) * n_tiles)``, rounding halves up, at least 1 (sparsity < 1).

    A ``1e-9`` guard absorbs binary round-off so that e.g. ``(1 - 0.7) * 10`` gives 3."""
    s = check_sparsity(sparsity)
    k = int(math.floor((1.0 - s) * n_tiles + 0.5 + 1e-9))
    return min(max(k, 1), n_tiles)


def _global(scores: Mapping[str, np.ndarray], budget: int) -> dict[str, int]:
    """Each layer's best tile, then the best ``budget - L`` of the rest across layers (ties:
    layer order, then the lower flat index)."""
    names = list(scores)
    flat = [np.asarray(scores[n], np.float64).ravel() for n in names]
    counts = {n: 1 for n in names}
    rest_s, rest_l = [], []
    for j, f in enumerate(flat):
        order = np.argsort(-f, kind="stable")
        rest_s.append(f[order[1:]])
        rest_l.append(np.full(f.size - 1, j))
    rest_s, rest_l = np.concatenate(rest_s), np.concatenate(rest_l)
    for j in rest_l[np.argsort(-rest_s, kind="stable")[: budget - len(names)]]:
        counts[names[j]] += 1
    return counts


def _proportional(scores: Mapping[str, np.ndarray], budget: int) -> dict[str, int]:
    """Largest-remainder rounding of ``q_l = K m_l / sum m`` within ``[1, n_l]``."""
    names = list(scores)
    sizes = np.array([np.size(scores[n]) for n in names])
    mass = np.array([np.maximum(np.asarray(scores[n], np.float64), 0).sum() for n in names])
    if not mass.sum() > 0:
        mass = sizes.astype(np.float64)
    quota = budget * mass / mass.sum()
    counts = np.clip(np.floor(quota).astype(int), 1, sizes)
    while counts.sum() != budget:  # hand out (or take back) one tile at a time
        gap = quota - counts
        if counts.sum() < budget:
            room = np.where(counts < sizes, gap, -np.inf)
            counts[int(np.argmax(room))] += 1   # argmax: the lowest index among ties
        else:
            room = np.where(counts > 1, gap, np.inf)
            counts[int(np.argmin(room))] -= 1
    return {n: int(c) for n, c in zip(names, counts)}


def kept_counts(scores: Mapping[str, np.ndarray], sparsity: float,
                allocation: str = "layer") -> dict[str, int]:
    """``{layer: tiles kept}`` for tile scores ``{layer: [R, C]}`` under ``allocation``
    (module docstring); the counts sum to ``sum_l num_kept(sparsity, n_l)``."""
    if allocation not in ALLOCATIONS:
        raise ValueError(f"unknown allocation {allocation!r}; use one of "
                         f"{', '.join(map(repr, ALLOCATIONS))}")
    per_layer = {n: num_kept(sparsity, int(np.size(sc))) for n, sc in scores.items()}
    budget = sum(per_layer.values())
    if allocation == "layer" or not scores:
        return per_layer
    bad = [n for n, sc in scores.items() if not np.all(np.isfinite(np.asarray(sc, np.float64)))]
    if bad:
        raise ValueError(f"non-finite tile scores in {bad}; check their statistics (damping?)")
    return (_global if allocation == "global" else _proportional)(scores, budget)
