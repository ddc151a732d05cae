"""The names the library's registries accept, in a module that imports nothing.

Command lines list these as ``choices`` without loading jax (``--help`` stays fast). Each
tuple is the one place a name is added; ``tests/test_package.py`` checks that the
registries behind them hold exactly these names:

- :data:`MASK_SCORERS`: tile scorers of :data:`sylva_jax.importance.METHODS`
  (docs/algorithm.md, tile importance);
- :data:`DEFAULT_SCORER`: the scorer of the experiment and of ``compute_masks`` when none
  is given;
- :data:`TRAIN_METHODS`: fine-tuning methods, one constructor each in
  :mod:`sylva_jax.methods`, one merge each in :data:`sylva_jax.interop.merged.MERGES` and
  one recipe each (masks, trainer keywords, exports) in :data:`sylva_jax.recipes.RECIPES`.
"""
from __future__ import annotations

__all__ = ["MASK_SCORERS", "DEFAULT_SCORER", "TRAIN_METHODS"]

MASK_SCORERS: tuple[str, ...] = ("sylva", "sylva_published", "kfac", "newton", "tile_newton", "fisher",
                                 "grad_sq", "adam_gain", "grad", "magnitude", "random")
# the best tile scorer measured (docs/quality.md, tile-selection study): held-out loss over
# 3 seeds in model.layers at sparsity 0.99, below grad, adam_gain and the published score
DEFAULT_SCORER = "tile_newton"
TRAIN_METHODS: tuple[str, ...] = ("sylva", "lora", "full")
