"""What the experiment and the export need to know about each fine-tuning method.

A :class:`Recipe` says, for one method of :mod:`sylva_jax.methods`, what a run builds
around the library step: whether it selects tile masks first (docs/algorithm.md, tile
importance), the adapter it trains (saved as ``adapter/``), the
:func:`sylva_jax.train.make_train_step` arguments it takes from the run's settings, how
its PEFT adapter is written and whether exporting needs the state's ``extras``.
:data:`RECIPES` holds one per name of :data:`sylva_jax.names.TRAIN_METHODS`;
:mod:`sylva_jax.experiment_run` and :mod:`sylva_jax.export` look a method up here and
never compare its name, so adding a method is one ``Method`` constructor, one merge
(:data:`sylva_jax.interop.merged.MERGES`) and one entry here.

``cfg`` below is the run's settings (:class:`sylva_jax.experiment_config.ExperimentConfig`,
read by attribute only: this module does not import the experiment).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

from sylva_jax.adapter import Adapter, make_adapter
from sylva_jax.interop.peft_lora import save_peft_lora
from sylva_jax.interop.peft_shira import save_peft_shira

__all__ = ["Recipe", "PeftWriter", "RECIPES", "recipe_of"]

# (out_dir, params, *, adapter, lora, base_params, base_tiles, base_name_or_path, lora_dropout) -> dir
PeftWriter = Callable[..., Path]


class Recipe(NamedTuple):
    """How a run treats one fine-tuning method.

    name: the method's name (``--method``, :func:`sylva_jax.train.make_train_step`).
    needs_masks: whether tile masks ``{weight: bool [out/bs, in/bs]}`` are selected before
      training (the experiment's stage 3).
    adapter: ``(params, masks, block_size) -> Adapter``: the tiles the method trains,
      also written to ``adapter/`` at export; ``None``: the method has no adapter.
    train_kwargs: ``(cfg, adapter) -> dict``: the method's own ``make_train_step``
      keywords (beyond the optimizer and schedule every method shares).
    peft: writes the run's PEFT adapter directory (arguments of
      :func:`sylva_jax.export.export_peft`); ``None``: no PEFT adapter holds the method.
    no_peft: when ``peft`` is ``None``, the ``ValueError`` text saying what to write instead.
    export_extras: whether the exports need ``TrainState.extras`` (LoRA's factors).
    """

    name: str
    needs_masks: bool
    adapter: Optional[Callable[[Any, Any, int], Adapter]]
    train_kwargs: Callable[[Any, Optional[Adapter]], dict]
    peft: Optional[PeftWriter]
    no_peft: str = ""
    export_extras: bool = False


def _sylva_peft(out_dir: str | os.PathLike, params: Any, *, adapter=None, lora=None, base_params: Any = None,
                base_tiles: Any = None, base_name_or_path: str | None = None, lora_dropout: float = 0.0) -> Path:
    """The trained tiles as a PEFT SHiRA adapter: ``W_tuned - W_base`` on the tiles."""
    del lora, lora_dropout
    if adapter is None or (base_params is None and base_tiles is None):
        raise ValueError("export_peft('sylva', ...) needs adapter=<the run's Adapter> and base_params=<the base "
                         "model's parameters> or base_tiles=adapter.tiles(base_params) (the SHiRA values are "
                         "W_tuned - W_base on the tiles)")
    return save_peft_shira(out_dir, adapter, params, base_params, base_tiles=base_tiles,
                           base_name_or_path=base_name_or_path)


def _lora_peft(out_dir: str | os.PathLike, params: Any, *, adapter=None, lora=None, base_params: Any = None,
               base_tiles: Any = None, base_name_or_path: str | None = None, lora_dropout: float = 0.0) -> Path:
    """The LoRA factors as a PEFT LoRA adapter over the frozen base (``params`` by default)."""
    del adapter, base_tiles
    if lora is None:
        raise ValueError("export_peft('lora', ...) needs lora=<the run's LoraParams> (TrainState.extras)")
    return save_peft_lora(out_dir, lora, params if base_params is None else base_params,
                          dropout=lora_dropout, base_name_or_path=base_name_or_path)


def _lora_kwargs(cfg: Any, adapter: Optional[Adapter]) -> dict:
    del adapter
    return dict(scope=cfg.scope, lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout)


RECIPES: dict[str, Recipe] = {
    "sylva": Recipe(
        name="sylva", needs_masks=True,
        adapter=lambda params, masks, block_size: make_adapter(params, masks, block_size=block_size),
        train_kwargs=lambda cfg, adapter: {"adapter": adapter}, peft=_sylva_peft),
    "lora": Recipe(name="lora", needs_masks=False, adapter=None, train_kwargs=_lora_kwargs, peft=_lora_peft,
                   export_extras=True),
    "full": Recipe(
        name="full", needs_masks=False, adapter=None, train_kwargs=lambda cfg, adapter: {}, peft=None,
        no_peft="full fine-tuning changes every weight, which no PEFT adapter holds; write a merged "
                "checkpoint instead: sylva_jax.export.export_merged(out_dir, 'full', model, params)"),
}


def recipe_of(method: str) -> Recipe:
    """The :class:`Recipe` of ``method``; ``ValueError`` naming the known ones otherwise."""
    if method not in RECIPES:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(RECIPES)}")
    return RECIPES[method]
