"""Curvature factors for Sylva pre-processing (``docs/algorithm.md`` §2, §3).

:mod:`.factors` is the interface (``init``, ``update``, ``update_block``, ``matmat``,
``diag``, ``inv_diag``, ``solve``, ``to_dense``, ``from_dense``, ``nbytes``); the kinds
live beside it: :mod:`.hodlr` (the hierarchical factor and its Woodbury inverse),
:mod:`.dense` and :mod:`.diagonal`.
"""
from sylva_jax.curvature.factors import (  # noqa: F401
    KINDS,
    DenseFactor,
    DiagonalFactor,
    Factor,
    HodlrFactor,
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
from sylva_jax.curvature.factors import __all__  # noqa: F401
