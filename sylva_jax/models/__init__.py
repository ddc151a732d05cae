"""LLaMA model (Flax NNX), pretrained-weight loading and Hugging Face export.

``loading`` is imported lazily (it pulls in transformers / gguf / safetensors).
"""
from sylva_jax.models.llama import (  # noqa: F401
    LlamaConfig,
    LlamaForCausalLM,
    apply,
    generate,
    init_model,
    merge,
    split,
)


def __getattr__(name):
    if name in ("load_pretrained", "save_pretrained", "load_gguf"):
        from sylva_jax.models import loading  # lazy: loading pulls in transformers / gguf on use

        return getattr(loading, name)
    raise AttributeError(f"module 'sylva_jax.models' has no attribute {name!r}")
