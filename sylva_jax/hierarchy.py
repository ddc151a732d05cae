"""Former home of the curvature factors; they live in :mod:`sylva_jax.curvature` now.

Kept so that ``from sylva_jax import hierarchy`` and ``hierarchy.init(...)`` etc. keep
working; new code imports :mod:`sylva_jax.curvature`.
"""
from sylva_jax.curvature import (  # noqa: F401
    KINDS,
    DenseFactor,
    DiagonalFactor,
    Factor,
    HodlrFactor,
    __all__,
    diag,
    from_dense,
    init,
    inv_diag,
    leaf_inv_diag,
    matmat,
    max_num_partition,
    nbytes,
    published_matmat,
    solve,
    to_dense,
    update,
    update_block,
)
