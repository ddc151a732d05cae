"""The stages of the reference experiment (the command line is :mod:`sylva_jax.experiment`).

:func:`execute` runs them in order, each a function from small explicit values to its
result and its summary fields:

1. open the run: join a multi-host job, check and prepare ``output_dir``
   (:mod:`sylva_jax.run_dir`), record the settings, build the device mesh;
2. load the model, the training data and MMLU;
3. methods that train tiles (:attr:`sylva_jax.recipes.Recipe.needs_masks`): reuse
   cached tile masks whose metadata matches, or compute them;
4. build the trainer (:func:`sylva_jax.train.make_train_step`) and its state;
5. evaluate before training (or restore the latest checkpoint), train
   (:func:`sylva_jax.experiment_train.train`);
6. export from the best checkpoint (the method's adapter, PEFT adapter, merged model);
7. write ``summary.json`` and the plot.

What depends on the method is looked up in :data:`sylva_jax.recipes.RECIPES`. Imported
only when a run starts (by :func:`sylva_jax.experiment.run`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from sylva_jax import checkpoint as ckpt_lib
from sylva_jax import compile_cache
from sylva_jax import export as export_lib
from sylva_jax.importance import compute_masks
from sylva_jax import masks as masks_lib
from sylva_jax import recipes
from sylva_jax import run_dir as rd
from sylva_jax import sharding
from sylva_jax import tree as tree_lib
from sylva_jax.data import instruct, mmlu
from sylva_jax.data.batching import batches, pad_id_of
from sylva_jax.experiment_config import ExperimentConfig, ExperimentError
from sylva_jax.experiment_train import (Devices, Loop, Outcome, SampleStream, bucket, make_answer_logits,
                                        make_evaluator, start, train)
from sylva_jax.models import llama
from sylva_jax.models.loading import load_pretrained
from sylva_jax.runlock import RunLock, RunLockError
from sylva_jax.run_log import LOG_PREFIX, log, plot_curves, set_process_tag, stage
from sylva_jax.train import make_train_step

__all__ = ["execute", "SampleStream", "LOG_PREFIX", "params_sha256"]

_bucket = bucket  # the name before the split


# ----------------------------------------------------------------------------- 1. the run


def _start_distributed(cfg: ExperimentConfig) -> bool:
    """Join a multi-host job when asked (flags or environment), before jax starts; whether
    this is the primary process."""
    try:
        joined = sharding.initialize_distributed(cfg.coordinator, cfg.num_processes, cfg.process_id)
    except ValueError as e:
        raise ExperimentError(f"multi-host setup: {e}") from e
    if joined:
        set_process_tag(jax.process_index(), jax.process_count())
        log(f"joined a {jax.process_count()}-process job; {len(jax.local_devices())} local "
            f"of {len(jax.devices())} devices; output written by process 0")
    return jax.process_index() == 0


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _devices(cfg: ExperimentConfig, primary: bool) -> tuple[Devices, dict]:
    """One device: the plain single-device path. Several devices (or processes): a
    ``data x fsdp`` mesh over all of them (:mod:`sylva_jax.sharding`)."""
    n, fsdp = len(jax.devices()), int(cfg.mesh_fsdp)
    if cfg.mesh_data is None and n % fsdp:
        raise ExperimentError(f"--mesh_fsdp {fsdp} does not divide the {n} devices; "
                              f"choose a divisor of {n} (or set --mesh_data too)")
    data = int(cfg.mesh_data) if cfg.mesh_data is not None else n // fsdp
    if jax.process_count() > 1 and data * fsdp != n:
        raise ExperimentError(f"with {jax.process_count()} processes the mesh must cover all {n} devices; "
                              f"got --mesh_data {data} x --mesh_fsdp {fsdp}")
    mesh = None
    if data * fsdp > 1 or jax.process_count() > 1:
        try:
            mesh = sharding.make_mesh(data, fsdp)
        except ValueError as e:
            raise ExperimentError(f"device mesh: {e}") from e
    ways = data * fsdp
    global_batch = cfg.per_device_train_batch_size * ways
    if mesh is not None:
        log(f"mesh data={data} x fsdp={fsdp} over {n} devices: global batch "
            f"{cfg.per_device_train_batch_size} x {ways} = {global_batch} sequences per micro-step")
    facts = {"mesh": {"data": data, "fsdp": fsdp, "devices": n, "processes": jax.process_count(),
                      "global_batch": global_batch}}
    return Devices(mesh=mesh, ways=ways, primary=primary), facts


def _lock(run: rd.RunDir, primary: bool, stack: contextlib.ExitStack) -> None:
    """Take the run directory's lock (process 0 of a job) for the rest of the run."""
    try:
        lock = stack.enter_context(RunLock(run.root, enabled=primary))
    except RunLockError as e:
        raise ExperimentError(str(e)) from None
    if lock.took_over:
        log(f"took over the lock of {run.root} left by a process that died "
            f"(pid {lock.took_over.get('pid')} on {lock.took_over.get('host')})")


def open_run(cfg: ExperimentConfig, stack: contextlib.ExitStack
             ) -> tuple[ExperimentConfig, rd.RunDir, Devices, dict]:
    """Join the job, lock, check and prepare the run directory, record the settings, build
    the mesh: ``(cfg, run, devices, summary fields)``, ``cfg.resume`` being ``require`` when
    this launch continues a run and ``never`` when it starts one."""
    primary = _start_distributed(cfg)
    run = rd.RunDir(Path(cfg.output_dir))
    rd.check_output_path(run)
    _lock(run, primary, stack)
    action = rd.prepare(run, resume=cfg.resume, overwrite=cfg.overwrite, primary=primary,
                        barrier=_barrier)
    settings = cfg.to_dict()
    if action == "resume":
        rd.check_resume_settings(run, settings)
    if primary:
        if action in ("resume", "restart"):
            rd.record_restart(run, action)
        rd.write_json(run.args, settings)
    cfg = dataclasses.replace(cfg, resume="require" if action == "resume" else "never")
    log("settings: " + ", ".join(f"{k}={settings[k]}" for k in sorted(settings)))
    log(f"jax {jax.__version__} on {jax.devices()[0].platform} ({len(jax.devices())} device(s), "
        f"{jax.process_count()} process(es))")
    devices, facts = _devices(cfg, primary)
    return cfg, run, devices, facts


# ----------------------------------------------------------------------------- 2. inputs


def load_model(cfg: ExperimentConfig):
    """``(model, graphdef, params, tokenizer, summary fields)``, ``(graphdef, params)``
    being :func:`sylva_jax.models.llama.split` of the model."""
    try:
        model, tok = load_pretrained(cfg.model_name_or_path, dtype=cfg.dtype)
    except (FileNotFoundError, ValueError, OSError, ImportError) as e:
        raise ExperimentError(f"cannot load model {cfg.model_name_or_path!r}: {e}") from e
    graphdef, params = llama.split(model)
    n = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
    log(f"model {cfg.model_name_or_path}: {n / 1e6:.1f} M parameters, dtype {cfg.dtype}")
    return model, graphdef, params, tok, {"model": cfg.model_name_or_path, "model_params": n}


def load_data(cfg: ExperimentConfig, tok) -> tuple[list, dict]:
    """The tokenized training examples (assistant tokens labelled) and summary fields."""
    try:
        data = instruct.load_default_train_data(cfg.data_path, seed=cfg.seed)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise ExperimentError(f"cannot load training data {cfg.data_path!r}: {e}") from e
    if data.fallback:
        log("!" * 78)
        log(f"OFFLINE FALLBACK: training data = {data.source}")
        log("!" * 78)
    convs = data.conversations
    if cfg.max_train_samples is not None:
        # tokenize a few more than needed: conversations whose answer falls past
        # max_seq_len are dropped, and the cap applies to usable examples
        convs = convs[: 4 * cfg.max_train_samples]
    examples, stats = instruct.tokenize_dataset(tok, convs, cfg.max_seq_len, cfg.template)
    if cfg.max_train_samples is not None:
        examples = examples[: cfg.max_train_samples]
        stats["n"] = len(examples)
    if not examples:
        raise ExperimentError(f"training data {data.source} gave no example with assistant tokens "
                              f"within --max_seq_len {cfg.max_seq_len}")
    log(f"training data: {data.source}: {stats}")
    return examples, {"data": {"source": data.source, "fallback": data.fallback, **stats}}


def load_mmlu(cfg: ExperimentConfig, tok) -> tuple[list, dict]:
    """The encoded MMLU questions to evaluate (tokenized once) and summary fields."""
    try:
        data = mmlu.load_mmlu(cfg.mmlu_source, k_shot=cfg.mmlu_shots, seed=cfg.seed)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise ExperimentError(f"cannot load MMLU from {cfg.mmlu_source!r}: {e}") from e
    qs = mmlu.subset(data.questions, cfg.mmlu_limit, seed=cfg.seed)
    log(f"MMLU: {data.source}: evaluating {len(qs)} questions, {cfg.mmlu_shots}-shot")
    return mmlu.encode_mmlu(tok, qs, max_len=cfg.mmlu_max_len), {
        "mmlu": {"source": data.source, "fallback": data.fallback, "n": len(qs), "shots": cfg.mmlu_shots}}


# ----------------------------------------------------------------------------- 3. masks


def model_identity(name: str, params) -> str:
    """Model name plus a cheap content fingerprint (shapes and the first 64 values of each)."""
    h = hashlib.sha256(str(name).encode())
    for key, leaf in sorted(tree_lib.flatten(params).items()):
        a = np.asarray(leaf.reshape(-1)[:64], dtype=np.float32)
        h.update(key.encode() + str(tuple(leaf.shape)).encode() + a.tobytes())
    return f"{name}#{h.hexdigest()[:16]}"


def _cached_masks(path: Path, wanted: dict):
    """The masks at ``path`` if their metadata matches ``wanted``, else None (logged why)."""
    if not path.exists():
        return None
    try:
        cached, md = masks_lib.load_masks(path)
        ok, reason = masks_lib.masks_match(md, wanted)
    except (ValueError, OSError) as e:
        ok, reason = False, f"unreadable cache ({e})"
    log(f"reusing cached masks {path} ({reason})" if ok else
        f"cached masks {path} not reused: {reason}; recomputing")
    return cached if ok else None


def _preprocess_model(model, graphdef, params, devices: Devices, block_size: int):
    """What pre-processing runs on: the model (one device), the model on the mesh (one
    process: the factors are sums over data shards, equal to one device's), or, with
    several processes, each process's local devices (every process computes the same
    masks from the same calibration batches; process 0's are then used everywhere)."""
    if devices.mesh is None:
        return model
    mesh = devices.mesh if jax.process_count() == 1 else sharding.make_mesh(devices=jax.local_devices())
    return sharding.sharded_model(graphdef, params, mesh, block_size=block_size)


def _same_on_all_processes(masks):
    if jax.process_count() == 1:
        return masks
    got = multihost_utils.broadcast_one_to_all({k: np.asarray(v) for k, v in masks.items()})
    return {k: np.asarray(v).astype(bool) for k, v in got.items()}


def select_masks(cfg: ExperimentConfig, run: rd.RunDir, devices: Devices, model, graphdef, params,
                 examples, tok, data_source: str) -> tuple[dict, dict]:
    """Tile masks ``{weight name: bool [out/bs, in/bs]}``: cached ones whose metadata
    matches, else pre-processing and selection (:func:`sylva_jax.importance.compute_masks`)
    on calibration batches, saved to the cache. Returns the masks and summary fields.
    ``model`` is the module, ``(graphdef, params)`` its split."""
    cache_dir = Path(cfg.mask_cache_dir or run.masks)
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"masks-{cfg.mask_method}.safetensors"
    wanted = masks_lib.mask_metadata(
        model=model_identity(cfg.model_name_or_path, params), scope=cfg.scope, sparsity=cfg.sparsity,
        block_size=cfg.block_size, method=cfg.mask_method, num_partition=cfg.num_partition,
        num_samples=cfg.preprocess_num_samples, factor=cfg.factor, seed=cfg.seed,
        data=data_source, max_seq_len=cfg.max_seq_len)
    masks = _cached_masks(path, wanted)
    cached = masks is not None
    if not cached:
        calib = batches(examples, min(8, cfg.preprocess_num_samples), seed=cfg.seed + 1,
                        pad_id=pad_id_of(tok), shuffle=True, pad_to=cfg.max_seq_len)
        try:
            masks, rep = compute_masks(
                _preprocess_model(model, graphdef, params, devices, cfg.block_size), calib,
                scope=cfg.scope, sparsity=cfg.sparsity, block_size=cfg.block_size, method=cfg.mask_method,
                seed=cfg.seed, num_samples=cfg.preprocess_num_samples, num_partition=cfg.num_partition,
                factor=cfg.factor)
        except ValueError as e:
            raise ExperimentError(f"pre-processing failed: {e}") from e
        log(f"pre-processing + selection: {rep.get('seconds')}")
    masks = _same_on_all_processes(masks)
    if not cached and devices.primary:
        masks_lib.save_masks(masks, path, wanted)
        log(f"masks saved to {path}")
    rep = masks_lib.mask_report(masks, params)
    log(masks_lib.format_mask_report(rep))
    return masks, {"masks_cached": cached, "mask_report": rep, "sparsity_scope": rep["sparsity_in_scope"],
                   "sparsity_total": rep["sparsity_overall"]}


# ----------------------------------------------------------------------------- 4. trainer


@dataclasses.dataclass(frozen=True)
class Built:
    """The trainer (:class:`sylva_jax.train.Trainer`), its first state, the step to call
    (jitted; on a mesh, re-jitted with shardings), the method's adapter (``None`` when its
    recipe has none) and the length."""

    trainer: Any
    state: Any
    step: Any
    adapter: Any
    total_steps: int
    base_tiles: Any = None  # with an adapter: its tiles before training (PEFT deltas)
    graphdef: Any = None    # the model's structure, for the merged export


def _total_steps(cfg: ExperimentConfig, n_examples: int, per_step: int) -> int:
    if cfg.max_steps is not None:
        return int(cfg.max_steps)
    return max(1, int(math.ceil(cfg.num_train_epochs * n_examples / per_step)))


def build_trainer(cfg: ExperimentConfig, devices: Devices, graphdef, params, masks, n_examples: int,
                  global_batch: int) -> tuple[Built, dict]:
    """The training step of ``cfg.method`` through :func:`sylva_jax.train.make_train_step`
    (its adapter and keywords from :data:`sylva_jax.recipes.RECIPES`; ``masks`` as
    :func:`select_masks`, ``None`` for a method that needs none), its state from the
    weights ``params``, and summary fields."""
    recipe = recipes.recipe_of(cfg.method)
    total = _total_steps(cfg, n_examples, global_batch * cfg.gradient_accumulation_steps)
    warm = min(cfg.num_warmup_steps, max(total - 1, 0))
    if warm != cfg.num_warmup_steps:
        log(f"warm-up shortened to {warm} updates (only {total} updates in the run)")
    kw = dict(method=cfg.method, learning_rate=cfg.learning_rate, schedule=cfg.scheduler,
              warmup_steps=warm, total_steps=total if cfg.scheduler != "constant" else None,
              weight_decay=cfg.weight_decay, accum_steps=cfg.gradient_accumulation_steps)
    adapter = None if recipe.adapter is None else recipe.adapter(params, masks, cfg.block_size)
    trainer = make_train_step(graphdef, **kw, **recipe.train_kwargs(cfg, adapter))
    base_tiles = None if adapter is None else jax.device_get(adapter.tiles(params))
    if devices.mesh is None:
        state, step = trainer.init(params, seed=cfg.seed), trainer.step
    else:
        state = trainer.init(sharding.shard_params(params, devices.mesh, block_size=cfg.block_size),
                             seed=cfg.seed)
        step, state = sharding.sharded_step(trainer, devices.mesh, state, block_size=cfg.block_size)
    n = trainer.num_trainable
    log(f"method {cfg.method}: {n:,} trainable parameters; {total} optimizer updates of "
        f"{cfg.per_device_train_batch_size} x {cfg.gradient_accumulation_steps} sequences")
    facts = {"method": cfg.method, "trainable_params": n, "total_steps": total,
             "tokens_per_step_max": global_batch * cfg.gradient_accumulation_steps * cfg.max_seq_len}
    if not recipe.needs_masks:
        facts.update(sparsity_scope=None, sparsity_total=None)
    return Built(trainer, state, step, adapter, total, base_tiles, graphdef), facts


def _prepare(cfg: ExperimentConfig, run: rd.RunDir, devices: Devices, global_batch: int,
             times: dict) -> tuple[Built, Any, list, list, dict]:
    """Stages 2-4: ``(built, tokenizer, examples, MMLU questions, summary fields)``. The
    model's own arrays are dropped on return: the training state owns (and donates) them."""
    facts: dict = {}
    with stage("load_model", times):
        model, graphdef, params, tok, f = load_model(cfg)
        facts.update(f)
    with stage("load_data", times):
        examples, f = load_data(cfg, tok)
        facts.update(f)
    with stage("load_mmlu", times):
        questions, f = load_mmlu(cfg, tok)
        facts.update(f)
    masks = None
    if recipes.recipe_of(cfg.method).needs_masks:
        with stage("masks", times):
            masks, f = select_masks(cfg, run, devices, model, graphdef, params, examples, tok,
                                    facts["data"]["source"])
            facts.update(f)
    with stage("build_trainer", times):
        built, f = build_trainer(cfg, devices, graphdef, params, masks, len(examples), global_batch)
        facts.update(f)
    return built, tok, examples, questions, facts


# ----------------------------------------------------------------------------- 6-7. the end


def params_sha256(params) -> str:
    """Content hash of every weight (names, shapes, bytes): equal runs give equal hashes."""
    h = hashlib.sha256()
    for name, leaf in sorted(tree_lib.flatten(params).items()):
        a = np.asarray(leaf)
        h.update(name.encode() + str(a.shape).encode() + str(a.dtype).encode() + a.tobytes())
    return h.hexdigest()


def outcome_facts(outcome: Outcome, devices: Devices) -> dict:
    """The summary fields of the training loop's outcome."""
    facts: dict = {}
    if outcome.last_eval is not None:
        facts.update(mmlu_last=outcome.last_eval["accuracy_macro"],
                     mmlu_last_per_subject=outcome.last_eval["per_subject"])
    if outcome.status not in ("interrupted", "stopped"):
        facts["mmlu_after"] = facts.get("mmlu_last")
    best = outcome.best
    facts.update(params_sha256=params_sha256(devices.host(outcome.state.params)),
                 best_step=best["step"], mmlu_best=best["score"] if best["step"] else None,
                 steps_done=int(devices.host(outcome.state.step)), tokens_timed=outcome.tokens_timed,
                 tokens_per_s=outcome.tokens_timed / outcome.train_time if outcome.train_time > 0 else None)
    return facts


def export(cfg: ExperimentConfig, run: rd.RunDir, devices: Devices, built: Built, ckpts,
           outcome: Outcome, tok) -> dict:
    """The exports of a completed run, from its best checkpoint (summary fields):
    ``adapter/`` (a method with an adapter, sylva: tiles, coordinates, base fingerprint;
    always written), ``peft_adapter/`` (the recipe's PEFT writer: sylva as PEFT SHiRA, lora
    as PEFT LoRA; off with ``--no_export_peft``) and ``merged/`` (a plain
    Hugging Face checkpoint of every method; off with ``--no_export_merged``). Stopped and
    interrupted runs export nothing (they are resumed first)."""
    if outcome.status in ("interrupted", "stopped"):
        return {}
    want = built.adapter is not None or not (cfg.no_export_peft and cfg.no_export_merged)
    if not want:
        return {}
    best_state = ckpts.restore_best(outcome.state) or outcome.state
    best_params = devices.host(best_state.params)  # gathered on every process
    extras = devices.host(best_state.extras) if recipes.recipe_of(cfg.method).export_extras else None
    if not devices.primary:
        return {}
    try:
        if built.adapter is not None:
            path = ckpt_lib.save_adapter(run.adapter, built.adapter, best_params)
            log(f"adapter (best step {outcome.best['step']}) saved to {path}")
        paths = export_lib.export_run(
            run.root, cfg.method, built.graphdef, best_params, extras=extras, adapter=built.adapter,
            base_tiles=built.base_tiles, tokenizer=tok, base_name_or_path=cfg.model_name_or_path,
            lora_dropout=cfg.lora_dropout, peft=not cfg.no_export_peft,
            merged=not cfg.no_export_merged, log=log)
    except OSError as e:  # a full disk: the run is not marked finished, so a relaunch exports again
        raise ckpt_lib.CheckpointWriteError(
            f"could not write the exports under {run.root}: {e.strerror or e}. Free disk space and "
            "relaunch the same command: it resumes from the last checkpoint and exports again") from e
    return {"exports": {k: str(v) if v is not None else None for k, v in paths.items()}}


def _close(cfg: ExperimentConfig, run: rd.RunDir, devices: Devices, summary: dict) -> None:
    summary["restarts"] = rd.read_jsonl(run.restarts)  # one record per relaunch of this run
    if devices.primary:
        rd.write_json(run.summary, summary)
        plot_curves(run.plot, rd.read_jsonl(run.metrics), rd.read_jsonl(run.evals),
                    f"{cfg.method} on {cfg.model_name_or_path}")
    short = {k: v for k, v in summary.items() if k not in ("mmlu_per_subject", "mask_report")}
    log(f"summary: {rd.to_json(short)}")


# ----------------------------------------------------------------------------- all stages


def execute(cfg: ExperimentConfig) -> dict[str, Any]:
    """Run every stage for the checked ``cfg``; the summary (also ``summary.json``)."""
    with contextlib.ExitStack() as stack:
        if not cfg.no_compile_cache:
            stack.enter_context(compile_cache.enabled(cfg.compile_cache_dir))
        return _execute(cfg, stack)


def _execute(cfg: ExperimentConfig, stack: contextlib.ExitStack) -> dict[str, Any]:
    t_start = time.perf_counter()
    times: dict[str, float] = {}
    cfg, run, devices, summary = open_run(cfg, stack)
    global_batch = summary["mesh"]["global_batch"]
    built, tok, examples, questions, facts = _prepare(cfg, run, devices, global_batch, times)
    summary.update(facts)
    answer_logits = make_answer_logits(built.trainer.logits, devices, cfg.eval_batch_size)
    evaluate = make_evaluator(answer_logits, tok, questions, batch_size=cfg.eval_batch_size, times=times)
    ckpts = ckpt_lib.RunCheckpoints(run.checkpoints, keep=cfg.keep_checkpoints)
    loop = Loop(cfg=cfg, run=run, devices=devices, step=built.step, evaluate=evaluate, ckpts=ckpts,
                examples=examples, pad_id=pad_id_of(tok), total_steps=built.total_steps,
                global_batch=global_batch, t_start=t_start)
    with contextlib.nullcontext() if cfg.resume == "require" else stage("evaluate_before", times):
        state, best, facts = start(loop, built.state)
    summary.update(facts)
    built = dataclasses.replace(built, state=None)  # the loop's state replaces (and donates) it
    outcome = train(loop, state, best, summary["mmlu_before"])
    summary.update(outcome_facts(outcome, devices))
    summary.update(export(cfg, run, devices, built, ckpts, outcome, tok))
    summary.update(status=outcome.status, wall_time_s=time.perf_counter() - t_start, stage_times_s=times)
    _close(cfg, run, devices, summary)
    _barrier("sylva_run_end")  # every process returns once process 0's outputs are written
    return summary
