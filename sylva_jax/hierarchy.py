"""Former home of the curvature factors; they live in :mod:`sylva_jax.curvature` now.

Kept so that ``from sylva_jax import hierarchy`` and ``hierarchy.init(...)`` etc. keep
working; new code imports :mod:`sylva_jax.curvature`.
"""
from sylva_jax.curvature import *  # noqa: F401,F403  (every name of curvature.__all__)
from sylva_jax.curvature import __all__  # noqa: F401
