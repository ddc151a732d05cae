"""Tile scorers (``docs/algorithm.md`` §4), one module per family, as a registry:
:data:`SCORERS` maps a method name to a :class:`Scorer` whose ``fn(layer, settings)``
returns ``float64 [out/bs, in/bs]`` tile scores.

- :mod:`.first_order`: ``fisher``, ``grad_sq``, ``adam_gain``, ``grad``, ``magnitude``,
  ``random``;
- :mod:`.kronecker`: ``sylva``, ``sylva_published``, ``kfac``, ``newton``;
- :mod:`.tile_newton`: ``tile_newton``.
"""
from sylva_jax.scorers._registry import SCORERS, Scorer, Settings, register, tile_sum  # noqa: F401
from sylva_jax.scorers import kronecker, tile_newton, first_order  # noqa: F401  (registers)

__all__ = ["SCORERS", "Scorer", "Settings", "register", "tile_sum"]
