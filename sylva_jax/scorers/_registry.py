"""The scorer registry: ``name -> Scorer`` (``docs/algorithm.md`` §4).

A scorer maps one layer's :class:`~sylva_jax.statistics.LayerStats` and the shared
:class:`Settings` to tile scores ``float64 [out/bs, in/bs]`` (tile ``(r, c)`` covers
``W[r*bs:(r+1)*bs, c*bs:(c+1)*bs]``). Scores are comparable across layers (the global and
proportional allocations of :mod:`sylva_jax.allocation` rank them together): every scorer
is a sum over its tile of a per-weight quantity in the same units for every layer, and the
Kronecker factors, stored as sums over the ``N`` samples, are used as means ``A / N``,
``G / N`` wherever a damping is added to them.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple

import numpy as np

__all__ = ["Scorer", "Settings", "SCORERS", "register", "tile_sum"]


@dataclasses.dataclass(frozen=True)
class Settings:
    """What every scorer may read besides the layer: block size, the seed (``random``), the
    damping (``None``: the scorer's default), whether it is relative to ``mean(diag F)``
    (the Sylva family; the Newton family is always relative), the whole ``Stats`` (for
    caches shared across layers) and the scorer's own keyword arguments."""

    block_size: int
    seed: int = 0
    damping: float | None = None
    relative_damping: bool = False
    stats: Any = None
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def damping_or(self, default: float) -> float:
        return float(default if self.damping is None else self.damping)


class Scorer(NamedTuple):
    """fn(layer, settings) -> float64 [out/bs, in/bs]; what it needs from calibration:
    ``stats`` (Gbar and factors), ``per_sample`` (``grad_sq_mean``), ``dense`` (exact dense
    factors); ``kwargs``: its own keyword arguments and their defaults."""

    fn: Callable
    stats: bool = True
    per_sample: bool = False
    dense: bool = False
    kwargs: Mapping[str, Any] = {}


SCORERS: dict[str, Scorer] = {}


def register(name: str, *, stats: bool = True, per_sample: bool = False, dense: bool = False,
             **kwargs):
    """Decorator adding ``fn`` to :data:`SCORERS` under ``name`` (registration order is the
    order of ``importance.METHODS``)."""
    def deco(fn):
        if name in SCORERS:
            raise ValueError(f"scorer {name!r} is registered twice")
        SCORERS[name] = Scorer(fn, stats, per_sample, dense, dict(kwargs))
        return fn
    return deco


def tile_sum(x, bs: int) -> np.ndarray:
    """``float64 [out/bs, in/bs]``: the sum of ``x [out, in]`` over every tile."""
    x = np.asarray(x, np.float64)
    o, i = x.shape
    return x.reshape(o // bs, bs, i // bs, bs).sum(axis=(1, 3))
