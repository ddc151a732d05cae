"""The fine-tuned model as one plain Hugging Face checkpoint, for every method.

``merged_params(method, params, extras)`` gives the parameters whose plain forward is the
fine-tuned model (docs/algorithm.md): Sylva trains its tiles inside the weights, so its
parameters already are the merged model; full fine-tuning likewise; LoRA adds
``(alpha / r) B A`` into each adapted weight (:func:`sylva_jax.lora.merge_lora`). One
small function per method, so a method object with its own ``merge`` can replace the
table. :func:`save_merged` writes the result with
:func:`sylva_jax.models.loading.save_pretrained` into a directory renamed into place when
complete; transformers, vLLM and llama.cpp's ``convert_hf_to_gguf.py`` read it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from flax import nnx

from sylva_jax.interop import _files
from sylva_jax.lora import LoraParams, merge_lora
from sylva_jax.models.llama import LlamaForCausalLM, merge, split
from sylva_jax.models.loading import save_pretrained

__all__ = ["merged_params", "save_merged", "MERGES"]


def _merge_sylva(params: Any, extras: Any) -> Any:
    del extras  # the tiles live in the weights
    return params


def _merge_full(params: Any, extras: Any) -> Any:
    del extras
    return params


def _merge_lora(params: Any, extras: Any) -> Any:
    if not isinstance(extras, LoraParams):
        raise TypeError(f"merging a lora run needs its LoraParams (TrainState.extras); got {type(extras).__name__}")
    return merge_lora(params, extras)


MERGES: dict[str, Callable[[Any, Any], Any]] = {"sylva": _merge_sylva, "lora": _merge_lora, "full": _merge_full}


def merged_params(method: str, params: Any, extras: Any = None) -> Any:
    """Parameters (same structure as ``params``) whose plain forward is the fine-tuned
    model of ``method`` (``"sylva"``, ``"lora"``, ``"full"``); ``extras`` is the
    method's trainable state beyond the weights (``LoraParams`` for lora)."""
    if method not in MERGES:
        raise ValueError(f"no merge for method {method!r}; known: {sorted(MERGES)}")
    return MERGES[method](params, extras)


def save_merged(out_dir: str | os.PathLike, model, params: Any | None = None, tokenizer=None) -> Path:
    """Write a Hugging Face checkpoint (``config.json``, ``model.safetensors``, tokenizer)
    of our LLaMA, atomically. ``model``: a :class:`sylva_jax.LlamaForCausalLM`, or its
    graphdef (:func:`sylva_jax.models.llama.split`) when ``params`` is given; ``params``:
    the nested dict of arrays to write (default: the model's own). Weights keep their
    dtype."""
    if params is not None:
        graphdef = model if isinstance(model, nnx.GraphDef) else split(model)[0]
        model = merge(graphdef, params)
    if not isinstance(model, LlamaForCausalLM):
        raise TypeError(f"save_merged writes our LLaMA (a LlamaForCausalLM, or its graphdef with params); got "
                        f"{type(model).__name__}. For any other JAX model, write merged_params(...) with your own "
                        "checkpoint writer")
    with _files.atomic_dir(out_dir) as tmp:
        save_pretrained(model, tmp, tokenizer)
    return Path(out_dir)
