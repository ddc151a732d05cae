"""The reference experiment's training loop: batches in data order, steps, metric lines,
MMLU evaluations, the best and the resume checkpoints, and stopping.

The loop is resumable bit for bit: the sample order is a pure function of the data
position stored in the training state (:class:`SampleStream`), and every checkpoint holds
the state plus ``{"best", "mmlu_before"}``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import sys
import time
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from sylva_jax import run_dir as rd
from sylva_jax import sharding
from sylva_jax.data.batching import collate, epoch_order
from sylva_jax.data.mmlu import evaluate_mmlu
from sylva_jax.experiment_config import ExperimentConfig, ExperimentError
from sylva_jax.progress import Progress
from sylva_jax.run_log import MetricWindow, log, tag

__all__ = ["Devices", "Loop", "Outcome", "SampleStream", "bucket", "make_answer_logits",
           "make_evaluator", "start", "train"]


@dataclasses.dataclass(frozen=True)
class Devices:
    """Where the run executes: ``mesh`` (None: one device), ``ways`` = data x fsdp,
    ``primary`` (process 0, the one that writes files)."""

    mesh: Any
    ways: int
    primary: bool

    def host(self, tree):
        """NumPy values of (possibly sharded, possibly multi-host) arrays; a collective when
        several processes hold shards, so every process calls it at the same point."""
        return tree if self.mesh is None else sharding.to_host(tree)

    def barrier(self, name: str) -> None:
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(name)


class SampleStream:
    """The training sample order as one endless stream over epochs, resumable by position.

    Sample ``p`` of the stream is ``examples[order_e[p % n]]`` with ``e = p // n`` and
    ``order_e = epoch_order(n, seed, epoch=e)``: a run resumed at data position ``p``
    sees exactly the samples an uninterrupted run would.
    """

    def __init__(self, examples, *, seed: int):
        self.examples = examples
        self.n = len(examples)
        self.seed = seed
        self._cache: dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._cache:
            self._cache = {epoch: epoch_order(self.n, seed=self.seed, epoch=epoch, shuffle=True)}
        return self._cache[epoch]

    def take(self, pos: int, count: int) -> list:
        out = []
        for p in range(pos, pos + count):
            e, i = divmod(p, self.n)
            out.append(self.examples[int(self._order(e)[i])])
        return out


def bucket(n: int, max_len: int) -> int:
    """Pad lengths to a few buckets (64, 128, 256, ... max_len): few step recompilations."""
    b = 64
    while b < n:
        b *= 2
    return min(b, max_len) if n <= max_len else n


# ----------------------------------------------------------------------------- evaluation


def make_answer_logits(logits: Callable, devices: Devices, eval_batch_size: int) -> Callable:
    """``answer_logits(state, ids, mask) -> [B, V]``: the logits at each row's last real
    token, from ``logits(state, ids, mask, positions=...)`` (the trainer's), on device. On
    a mesh, rows are split when ``eval_batch_size`` divides by ``devices.ways``, weights
    stay as sharded for training, and the small result is replicated and read everywhere."""
    def last(state, ids, mask):
        return logits(state, ids, mask, positions=jnp.sum(mask, axis=-1) - 1)

    if devices.mesh is None:
        return jax.jit(last)
    rep = NamedSharding(devices.mesh, PartitionSpec())
    rows = sharding.batch_sharding(devices.mesh) if eval_batch_size % devices.ways == 0 else rep
    f = jax.jit(last, out_shardings=rep)

    def answer_logits(state, ids, mask):
        g = sharding.put({"ids": np.asarray(ids), "mask": np.asarray(mask)}, rows)
        return sharding.to_host(f(state, g["ids"], g["mask"]))

    return answer_logits


def make_evaluator(answer_logits: Callable, tok, questions, *, batch_size: int,
                   times: dict[str, float]) -> Callable[[Any], dict]:
    """``evaluate(state) -> evaluate_mmlu's result + {"seconds"}``; adds the time to
    ``times["evaluate"]``."""
    def evaluate(state) -> dict:
        t0 = time.perf_counter()
        n_batches = -(-len(questions) // batch_size)
        with Progress(n_batches, "MMLU", unit="batch", log=log, delay_s=5) as bar:
            res = evaluate_mmlu(lambda ids, mask: answer_logits(state, ids, mask), tok, questions,
                                batch_size=batch_size, progress=lambda done, _: bar.update(done - bar.n))
        res["seconds"] = time.perf_counter() - t0
        times["evaluate"] = times.get("evaluate", 0.0) + res["seconds"]
        return res

    return evaluate


# ----------------------------------------------------------------------------- the loop


@dataclasses.dataclass(frozen=True)
class Loop:
    """Everything the loop reads: settings, files, devices, the jitted ``step(state,
    batch) -> (state, metrics)``, ``evaluate(state)``, the checkpoints
    (:class:`sylva_jax.checkpoint.RunCheckpoints`) and the training examples."""

    cfg: ExperimentConfig
    run: rd.RunDir
    devices: Devices
    step: Callable
    evaluate: Callable[[Any], dict]
    ckpts: Any
    examples: list
    pad_id: int
    total_steps: int
    global_batch: int
    t_start: float

    @property
    def eval_interval(self) -> int:
        return self.cfg.eval_interval or self.total_steps

    @property
    def save_interval(self) -> int:
        return self.cfg.save_interval or self.eval_interval


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What the loop ends with. ``status``: finished, target_reached, stopped (by
    ``--stop_at_step``) or interrupted (Ctrl-C); ``best``: ``{"score", "step"}``;
    ``last_eval``: this session's latest MMLU result (None if none ran)."""

    status: str
    state: Any
    best: dict
    last_eval: dict | None
    tokens_timed: int
    train_time: float


def _record(loop: Loop, path, rec: dict) -> None:
    if loop.devices.primary:
        rd.append_jsonl(path, rec)


def _eval_record(step: int, res: dict) -> dict:
    return {"step": step, "mmlu": res["accuracy_macro"], "mmlu_micro": res["accuracy_micro"],
            "seconds": res["seconds"]}


def start(loop: Loop, state) -> tuple[Any, dict, dict]:
    """``(state, best, facts)`` to train from: restored from the latest checkpoint with
    ``--resume`` (JSONL records past it dropped), else ``state`` after the MMLU evaluation
    before training. ``facts`` are summary fields (``mmlu_before``, ...)."""
    best = {"score": -1.0, "step": None}
    if loop.cfg.resume == "require":
        restored = loop.ckpts.restore_latest(state)
        if restored is None:
            raise ExperimentError(f"--resume: no usable checkpoint in {loop.run.checkpoints}")
        state, extra = restored
        best = extra.get("best", best)
        step0 = int(loop.devices.host(state.step))
        if loop.devices.primary:
            rd.truncate_jsonl(loop.run.metrics, step0)
            rd.truncate_jsonl(loop.run.evals, step0)
        log(f"resumed from step {step0} (data position {int(loop.devices.host(state.data_pos))}); "
            f"best so far {best}")
        return state, best, {"mmlu_before": extra.get("mmlu_before")}
    res = loop.evaluate(state)
    _record(loop, loop.run.evals, _eval_record(0, res))
    log(f"MMLU before training: {res['accuracy_macro']:.4f} (macro), {res['accuracy_micro']:.4f} (micro)")
    return state, best, {"mmlu_before": res["accuracy_macro"], "mmlu_before_per_subject": res["per_subject"]}


def _batch(loop: Loop, stream: SampleStream, pos: int) -> tuple[dict, int]:
    """The batch of the optimizer step at data position ``pos`` (``[k, B, T]`` with
    ``k`` accumulation micro-batches, ``[B, T]`` when k = 1; on a mesh, this process's
    rows, sharded) and its number of real tokens over all processes."""
    b, k = loop.global_batch, loop.cfg.gradient_accumulation_steps
    samples = stream.take(pos, b * k)
    t = bucket(max(len(s["input_ids"]) for s in samples), loop.cfg.max_seq_len)
    micro = [collate(samples[i * b:(i + 1) * b], pad_id=loop.pad_id, pad_to=t) for i in range(k)]
    batch = micro[0] if k == 1 else {name: np.stack([m[name] for m in micro]) for name in micro[0]}
    tokens = int(np.sum(batch["attention_mask"]))
    if loop.devices.mesh is not None:
        rows = sharding.process_batch_slice(b, loop.devices.mesh)  # this process reads only its rows
        mine = {n: (v[rows] if k == 1 else v[:, rows]) for n, v in batch.items()}
        batch = sharding.shard_batch(mine, loop.devices.mesh, accum_steps=k, global_batch_size=b)
    return batch, tokens


def _step(loop: Loop, state, batch, tokens: int, step: int) -> tuple[Any, dict]:
    """One optimizer step; its record. A non-finite loss is an :class:`ExperimentError`
    (the donated state is gone; the last good checkpoint on disk is untouched)."""
    t0 = time.perf_counter()
    new_state, m = loop.step(state, batch)
    m = loop.devices.host(m)
    loss = float(m["loss"])  # waits for the step
    dt = time.perf_counter() - t0
    if not math.isfinite(loss):
        raise ExperimentError(
            f"loss is {loss} at optimizer step {step + 1}; stopping. The last good checkpoint "
            f"in {loop.run.checkpoints} is intact (lower --learning_rate, or check the data)")
    return new_state, {"step": step + 1, "loss": loss, "lr": float(m["lr"]), "grad_norm": float(m["grad_norm"]),
                       "tokens": tokens, "loss_tokens": int(m["tokens"]), "step_time_s": dt,
                       "tokens_per_s": tokens / dt if dt > 0 else None}


class _Stop:
    """Ctrl-C asks the loop to stop after the current step; a second one aborts at once."""

    def __init__(self):
        self.requested = False

    def __call__(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{tag()} Ctrl-C: finishing the current step, saving, exiting "
              f"(press again to abort without saving)", flush=True)

    @contextlib.contextmanager
    def installed(self) -> Iterator["_Stop"]:
        old = signal.signal(signal.SIGINT, self)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, old)


class _Progress:
    """The tqdm bar, or (no terminal) plain log lines with an ETA from training time only."""

    def __init__(self, total: int, step: int):
        self.total, self.first = total, step
        self.bar = tqdm(total=total, initial=step, desc="train", dynamic_ncols=True, disable=None,
                        file=sys.stdout)

    def step(self, rec: dict) -> None:
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{rec['lr']:.2e}",
                             tok_s=f"{rec['tokens'] / max(rec['step_time_s'], 1e-9):.0f}")

    def line(self, agg: dict, train_time: float) -> None:
        if self.bar.disable:
            step = agg["step"]
            eta = (self.total - step) * (train_time / max(step - self.first - 1, 1))
            log(f"step {step}/{self.total} loss {agg['loss']:.4f} lr {agg['lr']:.2e} "
                f"{agg['tokens_per_s']:.0f} tok/s, ETA {eta / 60:.1f} min (training only)")

    def write(self, msg: str) -> None:
        self.bar.write(f"{tag()} {msg}")

    def close(self) -> None:
        self.bar.close()


def _evaluate_at(loop: Loop, bar: _Progress, state, step: int, best: dict) -> tuple[dict, dict]:
    """Evaluate MMLU at ``step``, record it, save the best checkpoint when it improves;
    ``(result, best)``."""
    res = loop.evaluate(state)
    score = res["accuracy_macro"]
    _record(loop, loop.run.evals, _eval_record(step, res))
    bar.write(f"step {step}: MMLU {score:.4f} (best {max(best['score'], score):.4f})")
    if score > best["score"]:
        best = {"score": score, "step": step}
        loop.ckpts.save_best(step, state, {"mmlu": score})
    return res, best


def train(loop: Loop, state, best: dict, mmlu_before: float | None) -> Outcome:
    """Train from ``state`` to ``loop.total_steps``: a metric line every ``log_interval``
    steps, MMLU every ``eval_interval`` (and at the end), a resume checkpoint after each
    evaluation and every ``save_interval``; stop early at ``target_score``, at
    ``stop_at_step`` or on Ctrl-C (a checkpoint saved)."""
    cfg, total = loop.cfg, loop.total_steps
    stream, window = SampleStream(loop.examples, seed=cfg.seed), MetricWindow(loop.t_start)
    status, last_eval, tokens_timed, train_time = "finished", None, 0, 0.0
    step = step0 = int(loop.devices.host(state.step))

    def extra() -> dict:  # what a checkpoint stores beside the state
        return {"best": best, "mmlu_before": mmlu_before}

    with _Stop().installed() as stop:
        try:
            bar = _Progress(total, step)
            while step < total:
                batch, tokens = _batch(loop, stream, int(loop.devices.host(state.data_pos)))
                state, rec = _step(loop, state, batch, tokens, step)
                step += 1
                if step > step0 + 1:  # a session's first step includes compilation
                    tokens_timed, train_time = tokens_timed + tokens, train_time + rec["step_time_s"]
                window.add(rec)
                bar.step(rec)
                if step % cfg.log_interval == 0 or step == total:
                    agg = window.line()
                    _record(loop, loop.run.metrics, agg)
                    bar.line(agg, train_time)
                evaluated = step % loop.eval_interval == 0 or step == total
                if evaluated:
                    last_eval, best = _evaluate_at(loop, bar, state, step, best)
                    if cfg.target_score is not None and last_eval["accuracy_macro"] >= cfg.target_score:
                        status = "target_reached"
                if evaluated or step % loop.save_interval == 0:
                    loop.ckpts.save(step, state, extra())
                if status == "target_reached":
                    bar.write(f"target score {cfg.target_score} reached at step {step}; stopping")
                    break
                planned = cfg.stop_at_step is not None and cfg.stop_at_step <= step < total
                if stop.requested or planned:
                    loop.ckpts.save(step, state, extra())
                    status = "interrupted" if stop.requested else "stopped"
                    bar.write(f"{status}: checkpoint saved at step {step}; continue with --resume")
                    break
            bar.close()
        finally:
            loop.ckpts.wait()
    return Outcome(status, state, best, last_eval, tokens_timed, train_time)
