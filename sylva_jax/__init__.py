"""sylva_jax: Sylva sparse embedded adapters for JAX/Flax.

Public names are imported lazily so that ``import sylva_jax`` stays cheap and never pulls
in optional GPU packages (jax-triton) or heavy dependencies before they are needed.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    # models
    "LlamaConfig": "sylva_jax.models.llama",
    "LlamaForCausalLM": "sylva_jax.models.llama",
    "load_pretrained": "sylva_jax.models.loading",
    "save_pretrained": "sylva_jax.models.loading",
    # pre-processing
    "preprocess": "sylva_jax.capture",
    "Stats": "sylva_jax.statistics",
    "StatsAccumulator": "sylva_jax.statistics",
    "match_scope": "sylva_jax.scope",
    "select_blocks": "sylva_jax.importance",
    "compute_masks": "sylva_jax.importance",
    "save_masks": "sylva_jax.masks",
    "load_masks": "sylva_jax.masks",
    "mask_report": "sylva_jax.masks",
    # adapters and training
    "make_adapter": "sylva_jax.adapter",
    "Adapter": "sylva_jax.adapter",
    "sparse_adamw": "sylva_jax.optim",
    "make_train_step": "sylva_jax.train",
    "make_step": "sylva_jax.train",
    "save_adapter": "sylva_jax.checkpoint",
    "load_adapter": "sylva_jax.checkpoint",
    # any JAX model
    "capture_stats": "sylva_jax.anymodel",
    "sparsify": "sylva_jax.anymodel",
    "find_products": "sylva_jax.anymodel",
    "UnfollowedParameterError": "sylva_jax.anymodel",
    # data
    "load_instruct": "sylva_jax.data.instruct",
    "load_default_train_data": "sylva_jax.data.instruct",
    "tokenize_conversation": "sylva_jax.data.instruct",
    "load_mmlu": "sylva_jax.data.mmlu",
    "evaluate_mmlu": "sylva_jax.data.mmlu",
    "batches": "sylva_jax.data.batching",
    # interop: PEFT adapters and merged Hugging Face checkpoints
    "export_peft": "sylva_jax.export",
    "export_merged": "sylva_jax.export",
    "load_peft_lora": "sylva_jax.export",
    "load_peft_shira": "sylva_jax.export",
}
# submodules reachable as attributes before they are imported
_MODULES = ("capture", "methods", "export")

__all__ = sorted(_EXPORTS) + list(_MODULES) + ["__version__"]


def __getattr__(name: str):
    if name in _MODULES:
        return importlib.import_module(f"sylva_jax.{name}")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sylva_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
