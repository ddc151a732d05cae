"""What you train here, served by PEFT, transformers, vLLM or llama.cpp.

Two outputs per run, from the same parameters:

* ``export_peft(out_dir, method, params, ...)``: a PEFT adapter directory
  (``adapter_config.json`` + ``adapter_model.safetensors``) that
  ``peft.PeftModel.from_pretrained(base, out_dir)`` loads onto transformers' model of the
  base, unchanged: Sylva tiles as a SHiRA adapter (sparse deltas,
  :mod:`sylva_jax.interop.peft_shira`), LoRA factors as a LoRA adapter
  (:mod:`sylva_jax.interop.peft_lora`). Full fine-tuning has no adapter.
* ``export_merged(out_dir, method, model, params, extras)``: one plain Hugging Face
  checkpoint of the fine-tuned model for every method (:mod:`sylva_jax.interop.merged`).

And the way back: :func:`load_peft_lora` (a PEFT LoRA adapter as our ``LoraParams``, to
evaluate or continue training) and :func:`load_peft_shira` (a SHiRA adapter merged into
our parameters). Every directory is written beside its target and renamed into place when
complete; the adapters record the base model's fingerprint
(:func:`sylva_jax.checkpoint.fingerprint`), and the loaders refuse another base.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sylva_jax.interop.merged import MERGES, merged_params, save_merged
from sylva_jax.interop.peft_lora import load_peft_lora, lora_target_modules, save_peft_lora
from sylva_jax.interop.peft_shira import ShiraBudgetError, load_peft_shira, save_peft_shira, shira_rank
from sylva_jax.recipes import RECIPES, recipe_of

__all__ = [
    "export_peft",
    "export_merged",
    "export_run",
    "ShiraBudgetError",
    "save_peft_shira",
    "load_peft_shira",
    "shira_rank",
    "save_peft_lora",
    "load_peft_lora",
    "lora_target_modules",
    "merged_params",
    "save_merged",
    "MERGES",
]


def export_peft(out_dir: str | os.PathLike, method: str, params: Any, *, adapter=None, lora=None,
                base_params: Any = None, base_tiles: Any = None, base_name_or_path: str | None = None,
                lora_dropout: float = 0.0) -> Path:
    """Write the PEFT adapter of a run.

    Args:
      out_dir: the adapter directory (atomic; an existing export is replaced).
      method: ``"sylva"`` (needs ``adapter`` and ``base_params`` or ``base_tiles``: the
        tiles are exported as deltas from the base) or ``"lora"`` (needs ``lora``; ``base_params`` defaults to
        ``params``, the frozen base of a lora run).
      params: the run's parameters (``TrainState.params``).
      adapter: the Sylva :class:`sylva_jax.adapter.Adapter`.
      lora: the :class:`sylva_jax.lora.LoraParams` (``TrainState.extras``).
      base_params: the base model's parameters.
      base_tiles: for sylva, instead of ``base_params``: ``adapter.tiles(base_params)``
        taken before training.
      base_name_or_path: ``base_model_name_or_path`` written in the config.
      lora_dropout: recorded in a LoRA config.
    Returns the directory, written by the method's :attr:`sylva_jax.recipes.Recipe.peft`.
    ``ValueError`` for ``"full"`` (no adapter: use :func:`export_merged`) and for Sylva
    tiles that do not fit SHiRA (:func:`shira_rank`).
    """
    recipe = RECIPES.get(method)
    if recipe is None:
        known = " and ".join(repr(name) for name, r in RECIPES.items() if r.peft is not None)
        raise ValueError(f"unknown method {method!r}; export_peft knows {known}")
    if recipe.peft is None:
        raise ValueError(recipe.no_peft)
    return recipe.peft(out_dir, params, adapter=adapter, lora=lora, base_params=base_params, base_tiles=base_tiles,
                       base_name_or_path=base_name_or_path, lora_dropout=lora_dropout)


def export_merged(out_dir: str | os.PathLike, method: str, model, params: Any, extras: Any = None, *,
                  tokenizer=None) -> Path:
    """Write the fine-tuned model of ``method`` as a Hugging Face checkpoint directory.

    ``model``: the :class:`sylva_jax.LlamaForCausalLM` or its graphdef (structure and
    config);
    ``params``: the run's parameters; ``extras``: ``LoraParams`` for lora (merged in as
    ``W + (alpha / r) B A``); ``tokenizer``: saved beside the weights when given.
    """
    return save_merged(out_dir, model, merged_params(method, params, extras), tokenizer)


def export_run(out_dir: str | os.PathLike, method: str, model, params: Any, *, extras: Any = None,
               adapter=None, base_tiles: Any = None, base_params: Any = None, tokenizer=None,
               base_name_or_path: str | None = None, lora_dropout: float = 0.0, peft: bool = True,
               merged: bool = True, log=print) -> dict[str, Path | None]:
    """A finished run's exports: ``out_dir/peft_adapter`` (methods whose
    :class:`sylva_jax.recipes.Recipe` has a ``peft`` writer: sylva, lora) and
    ``out_dir/merged`` (every method), each optional (``peft``, ``merged``).

    Arguments as :func:`export_peft` and :func:`export_merged` (``extras`` is the lora
    run's ``LoraParams``; ``model`` our LLaMA or its graphdef). A Sylva adapter that does
    not fit SHiRA (:class:`ShiraBudgetError`) does not fail the run when the merged
    checkpoint is written: it is reported through ``log`` and ``peft_adapter`` is
    ``None``. Returns ``{"peft_adapter": path or None, "merged": path or None}``.
    """
    out = Path(out_dir)
    paths: dict[str, Path | None] = {"peft_adapter": None, "merged": None}
    if merged:
        paths["merged"] = export_merged(out / "merged", method, model, params, extras, tokenizer=tokenizer)
        log(f"merged Hugging Face checkpoint written to {paths['merged']}")
    if peft and recipe_of(method).peft is not None:
        try:
            paths["peft_adapter"] = export_peft(out / "peft_adapter", method, params, adapter=adapter, lora=extras,
                                                base_params=base_params, base_tiles=base_tiles,
                                                base_name_or_path=base_name_or_path, lora_dropout=lora_dropout)
            log(f"PEFT adapter written to {paths['peft_adapter']}")
        except ShiraBudgetError as e:
            if not merged:
                raise
            log(f"no PEFT adapter: {e}")
    return paths
