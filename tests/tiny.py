"""The tiny random LLaMA that tests build: one builder instead of one per test file.

``tiny_config(**overrides)`` is a :class:`LlamaConfig` with 2 layers, hidden 64,
intermediate 128, 4 query / 2 key-value heads (head_dim 16), vocabulary 256 and 64
positions; every field can be overridden. ``tiny_llama`` initializes it (``init_model``,
deterministic in ``seed``); ``tiny_llama_dir`` also writes it in Hugging Face format;
``tiny_split`` gives ``(graphdef, params)`` with NumPy-drawn values (no eager init: fast).
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sylva_jax.models import llama
from sylva_jax.models.llama import LlamaConfig, LlamaForCausalLM, init_model
from sylva_jax.models.loading import save_pretrained

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def tiny_config(**overrides) -> LlamaConfig:
    """:data:`TINY` with ``overrides`` applied (any :class:`LlamaConfig` field)."""
    return LlamaConfig(**{**TINY, **overrides})


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A random tiny LLaMA of ``tiny_config(**overrides)``."""
    return init_model(tiny_config(**overrides), seed=seed)


def tiny_llama_dir(path: str | os.PathLike, *, seed: int = 0, tokenizer=None, **overrides) -> str:
    """``tiny_llama(seed, **overrides)`` saved as a Hugging Face directory at ``path``
    (with ``tokenizer`` when given); returns ``str(path)``."""
    save_pretrained(tiny_llama(seed, **overrides), path, tokenizer=tokenizer)
    return str(path)


def tiny_split(seed: int = 0, cfg: LlamaConfig | None = None, *, std: float = 0.08, **overrides):
    """``(graphdef, params)`` of a tiny LLaMA (``cfg``, else ``tiny_config(**overrides)``):
    shapes from ``nnx.eval_shape``, 2-D weights drawn ``N(0, std^2)`` from NumPy's generator
    seeded by ``seed``, every other leaf ones (the norms). Weights this large give gradients
    that are not tiny; far faster than an eager init."""
    cfg = tiny_config(**overrides) if cfg is None else cfg
    graphdef, abstract = llama.split(nnx.eval_shape(lambda: LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)
    params = jax.tree.map(
        lambda s: jnp.asarray(rng.normal(0.0, std, s.shape) if len(s.shape) == 2 else np.ones(s.shape),
                              s.dtype), abstract)
    return graphdef, params
