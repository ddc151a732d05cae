"""The stages of the reference experiment (see :mod:`sylva_jax.experiment` for the CLI).

Kept apart from the argument parsing so that ``--help`` and flag errors never import jax.
"""
from __future__ import annotations

import json
import math
import shutil
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from sylva_jax import atomic
from sylva_jax.experiment import ExperimentError

LOG_PREFIX = "[oasst_mmlu]"
# settings that may differ between a stopped run and its --resume
_RESUMABLE_CHANGES = ("resume", "overwrite", "stop_at_step", "log_interval", "coordinator",
                      "process_id")


_TAG = [LOG_PREFIX]  # gains the process index in multi-host runs


def log(msg: str) -> None:
    print(f"{_TAG[0]} {msg}", flush=True)


class _Stage:
    """Context manager that logs a stage and records its wall time in ``times``."""

    def __init__(self, name: str, times: dict):
        self.name, self.times = name, times

    def __enter__(self):
        log(f"stage {self.name} ...")
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        dt = time.perf_counter() - self.t0
        self.times[self.name] = self.times.get(self.name, 0.0) + dt
        if exc[0] is None:
            log(f"stage {self.name} done in {dt:.1f} s")
        return False


def _atomic_write_json(path: Path, obj: Any) -> None:
    atomic.write_json(path, obj, indent=2, default=_json_default)


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


class SampleStream:
    """The training sample order as one endless stream over epochs, resumable by position.

    Sample ``p`` of the stream is ``examples[order_e[p % n]]`` with ``e = p // n`` and
    ``order_e = epoch_order(n, seed, epoch=e)``: a run resumed at data position ``p``
    sees exactly the samples an uninterrupted run would.
    """

    def __init__(self, examples, *, seed: int):
        from sylva_jax.data.batching import epoch_order

        self.examples = examples
        self.n = len(examples)
        self.seed = seed
        self._epoch_order = epoch_order
        self._cache: dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._cache:
            self._cache = {epoch: self._epoch_order(self.n, seed=self.seed, epoch=epoch, shuffle=True)}
        return self._cache[epoch]

    def take(self, pos: int, count: int) -> list:
        out = []
        for p in range(pos, pos + count):
            e, i = divmod(p, self.n)
            out.append(self.examples[int(self._order(e)[i])])
        return out


def _bucket(n: int, max_len: int) -> int:
    """Pad lengths to a few buckets (64, 128, 256, ... max_len): few step recompilations."""
    b = 64
    while b < n:
        b *= 2
    return min(b, max_len) if n <= max_len else n


class Run:
    def __init__(self, cfg: dict[str, Any]):
        self.cfg = cfg
        self.out = Path(cfg["output_dir"])
        self.times: dict[str, float] = {}
        self.summary: dict[str, Any] = {}
        self._stop_requested = False

    # ------------------------------------------------------------------ output dir
    def _prepare_output_dir(self) -> None:
        cfg, out = self.cfg, self.out
        summary = out / "summary.json"
        ckpts = out / "checkpoints"
        clear = False
        if out.exists() and any(out.iterdir()):
            finished = False
            if summary.exists():
                try:
                    finished = json.loads(summary.read_text()).get("status") in ("finished", "target_reached")
                except (OSError, ValueError):
                    finished = False
            if cfg["overwrite"]:
                clear = True
            elif cfg["resume"]:
                if finished:
                    raise ExperimentError(f"{out} holds a finished run; nothing to resume "
                                          f"(use --overwrite to start again, or another --output_dir)")
                if not ckpts.exists():
                    raise ExperimentError(f"--resume: {out} has no checkpoints to resume from "
                                          f"(drop --resume to start a new run there)")
            elif finished:
                raise ExperimentError(f"{out} holds a finished run (summary.json); refusing to overwrite it. "
                                      f"Pass --overwrite to replace it, or choose another --output_dir")
            elif ckpts.exists():
                raise ExperimentError(f"{out} holds an unfinished run; pass --resume to continue it, "
                                      f"--overwrite to start again, or choose another --output_dir")
        elif cfg["resume"]:
            raise ExperimentError(f"--resume: {out} does not exist or is empty; nothing to resume")
        # every process has checked the same directory; only the primary one changes it
        self._barrier("output_dir_checked")
        if self.primary:
            if clear:
                log(f"--overwrite: clearing {out}")
                for child in out.iterdir():
                    if child.name == "masks":  # cached masks are keyed by metadata: keep
                        continue
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
            out.mkdir(parents=True, exist_ok=True)
        self._barrier("output_dir_ready")

    # ------------------------------------------------------------------ stages
    def execute(self) -> dict[str, Any]:
        cfg = self.cfg
        t_start = self.t_start = time.perf_counter()
        self._start_distributed()
        self._prepare_output_dir()
        args_path = self.out / "args.json"
        if cfg["resume"] and args_path.exists():
            old = json.loads(args_path.read_text())
            diffs = {k: (old.get(k), cfg[k]) for k in cfg
                     if k not in _RESUMABLE_CHANGES and old.get(k) != cfg[k]}
            if diffs:
                raise ExperimentError(
                    "--resume with different settings than the stopped run: "
                    + "; ".join(f"{k}: was {a!r}, now {b!r}" for k, (a, b) in sorted(diffs.items()))
                    + ". Resume with the same flags, or start a new run")
        if self.primary:
            _atomic_write_json(args_path, cfg)
        log("settings: " + ", ".join(f"{k}={cfg[k]}" for k in sorted(cfg)))

        import jax

        log(f"jax {jax.__version__} on {jax.devices()[0].platform} ({len(jax.devices())} device(s), "
            f"{jax.process_count()} process(es))")
        self._make_mesh()
        with _Stage("load_model", self.times):
            self._load_model()
        with _Stage("load_data", self.times):
            self._load_data()
        with _Stage("load_mmlu", self.times):
            self._load_mmlu()
        if cfg["method"] == "sylva":
            with _Stage("masks", self.times):
                self._masks()
        with _Stage("build_trainer", self.times):
            self._build_trainer()
        status = self._train_and_evaluate()
        self.summary.update(
            status=status,
            wall_time_s=time.perf_counter() - t_start,
            stage_times_s=self.times,
        )
        if self.primary:
            _atomic_write_json(self.out / "summary.json", self.summary)
            self._plot()
        log(f"summary: {json.dumps({k: v for k, v in self.summary.items() if k not in ('mmlu_per_subject', 'mask_report')}, default=_json_default)}")
        return self.summary

    def _start_distributed(self) -> None:
        """Join a multi-host job when asked (flags or environment); before jax starts."""
        from sylva_jax import sharding

        cfg = self.cfg
        try:
            joined = sharding.initialize_distributed(cfg["coordinator"], cfg["num_processes"],
                                                     cfg["process_id"])
        except ValueError as e:
            raise ExperimentError(f"multi-host setup: {e}") from e
        import jax

        self.primary = jax.process_index() == 0
        if joined:
            _TAG[0] = f"{LOG_PREFIX}[{jax.process_index()}/{jax.process_count()}]"
            log(f"joined a {jax.process_count()}-process job; {len(jax.local_devices())} local "
                f"of {len(jax.devices())} devices; output written by process 0")

    def _barrier(self, name: str) -> None:
        import jax

        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(name)

    def _make_mesh(self) -> None:
        """One device: the plain single-device path. Several devices (or processes): a
        ``data x fsdp`` mesh over all of them (:mod:`sylva_jax.sharding`)."""
        import jax

        from sylva_jax import sharding

        cfg = self.cfg
        n = len(jax.devices())
        fsdp = int(cfg["mesh_fsdp"])
        data = cfg["mesh_data"]
        if data is None:
            if n % fsdp:
                raise ExperimentError(f"--mesh_fsdp {fsdp} does not divide the {n} devices; "
                                      f"choose a divisor of {n} (or set --mesh_data too)")
            data = n // fsdp
        data = int(data)
        if jax.process_count() > 1 and data * fsdp != n:
            raise ExperimentError(f"with {jax.process_count()} processes the mesh must cover all {n} devices; "
                                  f"got --mesh_data {data} x --mesh_fsdp {fsdp}")
        self.mesh = None
        if data * fsdp > 1 or jax.process_count() > 1:
            try:
                self.mesh = sharding.make_mesh(data, fsdp)
            except ValueError as e:
                raise ExperimentError(f"device mesh: {e}") from e
        self.ways = data * fsdp
        self.global_batch = cfg["per_device_train_batch_size"] * self.ways
        self.summary["mesh"] = {"data": data, "fsdp": fsdp, "devices": n,
                                "processes": jax.process_count(), "global_batch": self.global_batch}
        if self.mesh is not None:
            log(f"mesh data={data} x fsdp={fsdp} over {n} devices: global batch "
                f"{cfg['per_device_train_batch_size']} x {self.ways} = {self.global_batch} sequences "
                f"per micro-step")

    def _load_model(self) -> None:
        from sylva_jax.models.loading import load_pretrained
        from sylva_jax.models import llama

        cfg = self.cfg
        try:
            model, tok = load_pretrained(cfg["model_name_or_path"], dtype=cfg["dtype"])
        except (FileNotFoundError, ValueError, OSError, ImportError) as e:
            raise ExperimentError(f"cannot load model {cfg['model_name_or_path']!r}: {e}") from e
        self.tok = tok
        self.graphdef, self.params = llama.split(model)
        self.model = model
        n = sum(int(np.prod(x.shape)) for x in jax_leaves(self.params))
        self.summary["model"] = cfg["model_name_or_path"]
        self.summary["model_params"] = n
        log(f"model {cfg['model_name_or_path']}: {n / 1e6:.1f} M parameters, dtype {cfg['dtype']}")

    def _load_data(self) -> None:
        from sylva_jax.data import instruct

        cfg = self.cfg
        try:
            data = instruct.load_default_train_data(cfg["data_path"], seed=cfg["seed"])
        except (FileNotFoundError, ValueError, OSError) as e:
            raise ExperimentError(f"cannot load training data {cfg['data_path']!r}: {e}") from e
        if data.fallback:
            bar = "!" * 78
            log(bar)
            log(f"OFFLINE FALLBACK: training data = {data.source}")
            log(bar)
        convs = data.conversations
        if cfg["max_train_samples"] is not None:
            # tokenize a few more than needed: conversations whose answer falls past
            # max_seq_len are dropped, and the cap applies to usable examples
            convs = convs[: 4 * cfg["max_train_samples"]]
        examples, stats = instruct.tokenize_dataset(self.tok, convs, cfg["max_seq_len"], cfg["template"])
        if cfg["max_train_samples"] is not None:
            examples = examples[: cfg["max_train_samples"]]
            stats["n"] = len(examples)
        if not examples:
            raise ExperimentError(f"training data {data.source} gave no example with assistant tokens "
                                  f"within --max_seq_len {cfg['max_seq_len']}")
        self.examples = examples
        self.summary["data"] = {"source": data.source, "fallback": data.fallback, **stats}
        log(f"training data: {data.source}: {stats}")

    def _load_mmlu(self) -> None:
        from sylva_jax.data import mmlu

        cfg = self.cfg
        try:
            data = mmlu.load_mmlu(cfg["mmlu_source"], k_shot=cfg["mmlu_shots"], seed=cfg["seed"])
        except (FileNotFoundError, ValueError, OSError) as e:
            raise ExperimentError(f"cannot load MMLU from {cfg['mmlu_source']!r}: {e}") from e
        qs = mmlu.subset(data.questions, cfg["mmlu_limit"], seed=cfg["seed"])
        self.mmlu_questions = mmlu.encode_mmlu(self.tok, qs, max_len=cfg["mmlu_max_len"])  # tokenize once
        self.summary["mmlu"] = {"source": data.source, "fallback": data.fallback, "n": len(qs),
                                "shots": cfg["mmlu_shots"]}
        log(f"MMLU: {data.source}: evaluating {len(qs)} questions, {cfg['mmlu_shots']}-shot")

    def _calibration_batches(self):
        from sylva_jax.data.batching import batches

        cfg = self.cfg
        pad = _pad_id(self.tok)
        return batches(self.examples, min(8, cfg["preprocess_num_samples"]), seed=cfg["seed"] + 1,
                       pad_id=pad, shuffle=True, pad_to=cfg["max_seq_len"])

    def _masks(self) -> None:
        from sylva_jax import masks as masks_lib
        from sylva_jax.importance import compute_masks

        cfg = self.cfg
        cache_dir = Path(cfg["mask_cache_dir"] or (self.out / "masks"))
        cache_dir.mkdir(parents=True, exist_ok=True)
        path = cache_dir / f"masks-{cfg['mask_method']}.safetensors"
        wanted = masks_lib.mask_metadata(
            model=self._model_identity(), scope=cfg["scope"], sparsity=cfg["sparsity"],
            block_size=cfg["block_size"], method=cfg["mask_method"],
            num_partition=cfg["num_partition"], num_samples=cfg["preprocess_num_samples"],
            factor=cfg["factor"], seed=cfg["seed"],
            data=self.summary["data"]["source"], max_seq_len=cfg["max_seq_len"])
        masks = None
        if path.exists():
            try:
                cached, md = masks_lib.load_masks(path)
                ok, reason = masks_lib.masks_match(md, wanted)
            except (ValueError, OSError) as e:
                ok, reason = False, f"unreadable cache ({e})"
            if ok:
                masks = cached
                log(f"reusing cached masks {path} ({reason})")
                self.summary["masks_cached"] = True
            else:
                log(f"cached masks {path} not reused: {reason}; recomputing")
        if masks is None:
            self.summary["masks_cached"] = False
            try:
                masks, rep = compute_masks(
                    self._preprocess_model(), self._calibration_batches(), scope=cfg["scope"], sparsity=cfg["sparsity"],
                    block_size=cfg["block_size"], method=cfg["mask_method"], seed=cfg["seed"],
                    num_samples=cfg["preprocess_num_samples"], num_partition=cfg["num_partition"],
                    factor=cfg["factor"])
            except ValueError as e:
                raise ExperimentError(f"pre-processing failed: {e}") from e
            log(f"pre-processing + selection: {rep.get('seconds')}")
            masks = self._same_on_all_processes(masks)
            if self.primary:
                masks_lib.save_masks(masks, path, wanted)
                log(f"masks saved to {path}")
        else:
            masks = self._same_on_all_processes(masks)
        rep = masks_lib.mask_report(masks, self.params)
        log(masks_lib.format_mask_report(rep))
        self.masks = masks
        self.summary["mask_report"] = rep
        self.summary["sparsity_scope"] = rep["sparsity_in_scope"]
        self.summary["sparsity_total"] = rep["sparsity_overall"]

    def _preprocess_model(self):
        """What pre-processing runs on: the model (one device), the model on the mesh (one
        process: the factors are sums over data shards, equal to one device's), or, with
        several processes, each process's local devices (every process computes the same
        masks from the same calibration batches; process 0's are then used everywhere)."""
        import jax

        from sylva_jax import sharding

        if self.mesh is None:
            return self.model
        mesh = self.mesh if jax.process_count() == 1 else sharding.make_mesh(devices=jax.local_devices())
        return sharding.sharded_model(self.graphdef, self.params, mesh, block_size=self.cfg["block_size"])

    def _same_on_all_processes(self, masks):
        import jax

        if jax.process_count() == 1:
            return masks
        from jax.experimental import multihost_utils

        got = multihost_utils.broadcast_one_to_all({k: np.asarray(v) for k, v in masks.items()})
        return {k: np.asarray(v).astype(bool) for k, v in got.items()}

    def _model_identity(self) -> str:
        """Model name plus a cheap content fingerprint (shapes and a few sums)."""
        import hashlib

        from sylva_jax import tree as tree_lib

        h = hashlib.sha256(str(self.cfg["model_name_or_path"]).encode())
        for name, leaf in sorted(tree_lib.flatten(self.params).items()):
            a = np.asarray(leaf.reshape(-1)[:64], dtype=np.float32)
            h.update(name.encode() + str(tuple(leaf.shape)).encode() + a.tobytes())
        return f"{self.cfg['model_name_or_path']}#{h.hexdigest()[:16]}"

    def _build_trainer(self) -> None:
        from sylva_jax.train import make_train_step

        cfg = self.cfg
        per_step = self.global_batch * cfg["gradient_accumulation_steps"]
        if cfg["max_steps"] is not None:
            total = int(cfg["max_steps"])
        else:
            total = max(1, int(math.ceil(cfg["num_train_epochs"] * len(self.examples) / per_step)))
        self.total_steps = total
        warm = min(cfg["num_warmup_steps"], max(total - 1, 0))
        if warm != cfg["num_warmup_steps"]:
            log(f"warm-up shortened to {warm} updates (only {total} updates in the run)")
        kw = dict(method=cfg["method"], learning_rate=cfg["learning_rate"], schedule=cfg["scheduler"],
                  warmup_steps=warm, total_steps=total if cfg["scheduler"] != "constant" else None,
                  weight_decay=cfg["weight_decay"], accum_steps=cfg["gradient_accumulation_steps"])
        if cfg["method"] == "sylva":
            from sylva_jax.adapter import make_adapter

            self.adapter = make_adapter(self.params, self.masks, block_size=cfg["block_size"])
            kw["adapter"] = self.adapter
        elif cfg["method"] == "lora":
            kw.update(scope=cfg["scope"], lora_rank=cfg["lora_rank"], lora_alpha=cfg["lora_alpha"],
                      lora_dropout=cfg["lora_dropout"])
        self.trainer = make_train_step(self.graphdef, **kw)
        if self.mesh is None:
            self.state = self.trainer.init(self.params, seed=cfg["seed"])
            self._step = self.trainer.step
        else:
            from sylva_jax import sharding

            params = sharding.shard_params(self.params, self.mesh, block_size=cfg["block_size"])
            self.params = None
            state = self.trainer.init(params, seed=cfg["seed"])
            self._step, self.state = sharding.sharded_step(self.trainer, self.mesh, state,
                                                           block_size=cfg["block_size"])
        self._build_eval()
        self.params = None  # the state owns (and donates) the weights now
        self.model = None
        n = self.trainer.num_trainable
        self.summary.update(method=cfg["method"], trainable_params=n, total_steps=total,
                            tokens_per_step_max=self.global_batch * cfg["gradient_accumulation_steps"] * cfg["max_seq_len"])
        if cfg["method"] != "sylva":
            self.summary.setdefault("sparsity_scope", None)
            self.summary.setdefault("sparsity_total", None)
        log(f"method {cfg['method']}: {n:,} trainable parameters; {total} optimizer updates of "
            f"{cfg['per_device_train_batch_size']} x {cfg['gradient_accumulation_steps']} sequences")

    # ------------------------------------------------------------------ evaluation
    def _build_eval(self) -> None:
        """``self._answer_logits(ids, mask) -> [B, V]``: the logits at each row's last real
        token, computed on device (on the mesh: rows split when the batch divides, weights
        as sharded for training; the small result replicated and read on every process)."""
        import jax
        import jax.numpy as jnp

        logits = self.trainer.logits

        def last(state, ids, mask):  # the LM head at each row's last real token only
            return logits(state, ids, mask, positions=jnp.sum(mask, axis=-1) - 1)

        if self.mesh is None:
            f = jax.jit(last)
            self._answer_logits = lambda ids, mask: f(self.state, ids, mask)
            return
        from jax.sharding import NamedSharding, PartitionSpec

        from sylva_jax import sharding

        rep = NamedSharding(self.mesh, PartitionSpec())
        rows = (sharding.batch_sharding(self.mesh) if self.cfg["eval_batch_size"] % self.ways == 0
                else rep)
        f = jax.jit(last, out_shardings=rep)

        def answer_logits(ids, mask):
            g = sharding.put({"ids": np.asarray(ids), "mask": np.asarray(mask)}, rows)
            return sharding.to_host(f(self.state, g["ids"], g["mask"]))

        self._answer_logits = answer_logits

    def _evaluate(self) -> dict:
        from sylva_jax.data.mmlu import evaluate_mmlu

        cfg = self.cfg
        t0 = time.perf_counter()
        res = evaluate_mmlu(self._answer_logits, self.tok, self.mmlu_questions, batch_size=cfg["eval_batch_size"])
        res["seconds"] = time.perf_counter() - t0
        self.times["evaluate"] = self.times.get("evaluate", 0.0) + res["seconds"]
        return res

    # ------------------------------------------------------------------ training
    def _step_batch(self, pos: int) -> dict:
        cfg = self.cfg
        from sylva_jax.data.batching import collate

        b, k = self.global_batch, cfg["gradient_accumulation_steps"]
        samples = self.stream.take(pos, b * k)
        T = _bucket(max(len(s["input_ids"]) for s in samples), cfg["max_seq_len"])
        pad = _pad_id(self.tok)
        micro = [collate(samples[i * b:(i + 1) * b], pad_id=pad, pad_to=T) for i in range(k)]
        if k == 1:
            batch = micro[0]
        else:
            batch = {name: np.stack([m[name] for m in micro]) for name in micro[0]}
        tokens = int(np.sum(batch["attention_mask"]))  # real (non-padding) tokens, all processes
        if self.mesh is not None:
            from sylva_jax import sharding

            rows = sharding.process_batch_slice(b, self.mesh)  # this process reads only its rows
            mine = {n: (v[rows] if k == 1 else v[:, rows]) for n, v in batch.items()}
            batch = sharding.shard_batch(mine, self.mesh, accum_steps=k, global_batch_size=b)
        return batch, tokens

    def _train_and_evaluate(self) -> str:
        import jax

        from sylva_jax import checkpoint as ckpt_lib

        cfg = self.cfg
        self.stream = SampleStream(self.examples, seed=cfg["seed"])
        eval_interval = cfg["eval_interval"] or self.total_steps
        save_interval = cfg["save_interval"] or eval_interval
        metrics_path = self.out / "metrics.jsonl"
        evals_path = self.out / "evals.jsonl"
        self.ckpt = ckpt_lib.RunCheckpoints(self.out / "checkpoints", keep=cfg["keep_checkpoints"])

        best = {"score": -1.0, "step": None}
        if cfg["resume"]:
            restored = self.ckpt.restore_latest(self.state)
            if restored is None:
                raise ExperimentError(f"--resume: no usable checkpoint in {self.out / 'checkpoints'}")
            self.state, extra = restored
            best = extra.get("best", best)
            self.summary["mmlu_before"] = extra.get("mmlu_before")
            step0 = int(self._host(self.state.step))
            if self.primary:
                _truncate_jsonl(metrics_path, step0)
                _truncate_jsonl(evals_path, step0)
            log(f"resumed from step {step0} (data position {self._data_pos()}); best so far {best}")
        else:
            with _Stage("evaluate_before", self.times):
                res = self._evaluate()
            self.summary["mmlu_before"] = res["accuracy_macro"]
            self.summary["mmlu_before_per_subject"] = res["per_subject"]
            self._append(evals_path, {"step": 0, "mmlu": res["accuracy_macro"],
                                       "mmlu_micro": res["accuracy_micro"], "seconds": res["seconds"]})
            log(f"MMLU before training: {res['accuracy_macro']:.4f} (macro), {res['accuracy_micro']:.4f} (micro)")

        status = "finished"
        old_handler = signal.signal(signal.SIGINT, self._on_sigint)
        tokens_trained = 0
        train_time = 0.0
        first_step = True
        window: list[dict] = []
        try:
            from tqdm.auto import tqdm

            step = int(self._host(self.state.step))
            step0_session = step
            bar = tqdm(total=self.total_steps, initial=step, desc="train", dynamic_ncols=True,
                       disable=None, file=sys.stdout)
            while step < self.total_steps:
                batch, tok = self._step_batch(self._data_pos())
                t0 = time.perf_counter()
                new_state, m = self._step(self.state, batch)
                m = self._host(m)
                loss = float(m["loss"])  # waits for the step
                dt = time.perf_counter() - t0
                if not math.isfinite(loss):
                    # the donated old state is gone; the new one holds non-finite values: keep the
                    # last good checkpoint on disk untouched and stop
                    self.state = None
                    raise ExperimentError(
                        f"loss is {loss} at optimizer step {step + 1}; stopping. The last good checkpoint "
                        f"in {self.out / 'checkpoints'} is intact (lower --learning_rate, or check the data)")
                self.state = new_state
                step += 1
                if not first_step:  # the first step of a session includes compilation
                    tokens_trained += tok
                    train_time += dt
                first_step = False
                rec = {"step": step, "loss": loss, "lr": float(m["lr"]), "grad_norm": float(m["grad_norm"]),
                       "tokens": tok, "loss_tokens": int(m["tokens"]), "step_time_s": dt, "tokens_per_s": tok / dt if dt > 0 else None}
                window.append(rec)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{rec['lr']:.2e}", tok_s=f"{tok / max(dt, 1e-9):.0f}")
                if step % cfg["log_interval"] == 0 or step == self.total_steps:
                    agg = {"step": step, "loss": float(np.mean([r["loss"] for r in window])),
                           "lr": rec["lr"], "grad_norm": rec["grad_norm"],
                           "tokens_per_s": sum(r["tokens"] for r in window) / max(sum(r["step_time_s"] for r in window), 1e-9),
                           "elapsed_s": time.perf_counter() - self.t_start}
                    self._append(metrics_path, agg)
                    if bar.disable:  # no terminal: a plain log line instead of the bar
                        eta = (self.total_steps - step) * (train_time / max(step - step0_session - 1, 1))
                        log(f"step {step}/{self.total_steps} loss {agg['loss']:.4f} lr {agg['lr']:.2e} "
                            f"{agg['tokens_per_s']:.0f} tok/s, ETA {eta / 60:.1f} min (training only)")
                    window = []
                did_eval = False
                if step % eval_interval == 0 or step == self.total_steps:
                    res = self._evaluate()
                    did_eval = True
                    score = res["accuracy_macro"]
                    self._append(evals_path, {"step": step, "mmlu": score, "mmlu_micro": res["accuracy_micro"],
                                               "seconds": res["seconds"]})
                    bar.write(f"{_TAG[0]} step {step}: MMLU {score:.4f} (best {max(best['score'], score):.4f})")
                    if score > best["score"]:
                        best = {"score": score, "step": step}
                        self.ckpt.save_best(step, self.state, {"mmlu": score})
                    self.summary["mmlu_last"] = score
                    self.summary["mmlu_last_per_subject"] = res["per_subject"]
                    if cfg["target_score"] is not None and score >= cfg["target_score"]:
                        status = "target_reached"
                if did_eval or step % save_interval == 0 or status == "target_reached":
                    self.ckpt.save(step, self.state, {"best": best, "mmlu_before": self.summary.get("mmlu_before")})
                if status == "target_reached":
                    bar.write(f"{_TAG[0]} target score {cfg['target_score']} reached at step {step}; stopping")
                    break
                planned_stop = (cfg["stop_at_step"] is not None and step >= cfg["stop_at_step"]
                                and step < self.total_steps)
                if self._stop_requested or planned_stop:
                    self.ckpt.save(step, self.state, {"best": best, "mmlu_before": self.summary.get("mmlu_before")})
                    status = "interrupted" if self._stop_requested else "stopped"
                    bar.write(f"{_TAG[0]} {status}: checkpoint saved at step {step}; "
                              f"continue with --resume")
                    break
            bar.close()
        finally:
            signal.signal(signal.SIGINT, old_handler)
            self.ckpt.wait()

        if status not in ("interrupted", "stopped"):
            self.summary["mmlu_after"] = self.summary.get("mmlu_last")
        self.summary["params_sha256"] = _params_sha256(self._host(self.state.params))
        self.summary.update(best_step=best["step"], mmlu_best=best["score"] if best["step"] else None,
                            steps_done=int(self._host(self.state.step)), tokens_timed=tokens_trained,
                            tokens_per_s=tokens_trained / train_time if train_time > 0 else None)
        if status not in ("interrupted", "stopped") and cfg["method"] == "sylva":
            from sylva_jax.checkpoint import save_adapter

            best_state = self.ckpt.restore_best(self.state) or self.state
            best_params = self._host(best_state.params)  # gathered on every process
            if self.primary:
                path = save_adapter(self.out / "adapter", self.adapter, best_params)
                log(f"adapter (best step {best['step']}) saved to {path}")
        return status

    def _host(self, tree):
        """NumPy values of (possibly sharded, possibly multi-host) arrays; a collective when
        several processes hold shards, so every process calls it at the same point."""
        if self.mesh is None:
            return tree
        from sylva_jax import sharding

        return sharding.to_host(tree)

    def _data_pos(self) -> int:
        return int(self._host(self.state.data_pos))

    def _append(self, path: Path, rec: dict) -> None:
        if self.primary:
            _append_jsonl(path, rec)

    def _on_sigint(self, signum, frame):
        if self._stop_requested:  # second Ctrl-C: give up at once
            raise KeyboardInterrupt
        self._stop_requested = True
        print(f"\n{LOG_PREFIX} Ctrl-C: finishing the current step, saving, exiting "
              f"(press again to abort without saving)", flush=True)

    # ------------------------------------------------------------------ plot
    def _plot(self) -> None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:  # pragma: no cover
            log("matplotlib missing: no plot")
            return
        metrics = _read_jsonl(self.out / "metrics.jsonl")
        evals = _read_jsonl(self.out / "evals.jsonl")
        fig, ax1 = plt.subplots(figsize=(7, 4))
        if metrics:
            ax1.plot([m["step"] for m in metrics], [m["loss"] for m in metrics], color="tab:blue", label="train loss")
        ax1.set_xlabel("optimizer step")
        ax1.set_ylabel("training loss", color="tab:blue")
        ax2 = ax1.twinx()
        if evals:
            ax2.plot([e["step"] for e in evals], [e["mmlu"] for e in evals], "o-", color="tab:red", label="MMLU")
        ax2.set_ylabel("MMLU accuracy (macro)", color="tab:red")
        ax1.set_title(f"{self.cfg['method']} on {self.cfg['model_name_or_path']}")
        fig.tight_layout()
        fig.savefig(self.out / "curves.png", dpi=100)
        plt.close(fig)


def _params_sha256(params) -> str:
    """Content hash of every weight (names, shapes, bytes): equal runs give equal hashes."""
    import hashlib

    from sylva_jax import tree as tree_lib

    h = hashlib.sha256()
    for name, leaf in sorted(tree_lib.flatten(params).items()):
        a = np.asarray(leaf)
        h.update(name.encode() + str(a.shape).encode() + str(a.dtype).encode() + a.tobytes())
    return h.hexdigest()


def jax_leaves(tree):
    import jax

    return jax.tree_util.tree_leaves(tree)


def _pad_id(tok) -> int:
    from sylva_jax.data.batching import pad_id_of

    return pad_id_of(tok)


def _append_jsonl(path: Path, rec: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(rec, default=_json_default) + "\n")
        f.flush()


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except ValueError:
                pass  # a line cut by a crash
    return out


def _truncate_jsonl(path: Path, step: int) -> None:
    """Drop records past ``step`` (written after the checkpoint we resume from)."""
    recs = [r for r in _read_jsonl(path) if r.get("step", 0) <= step]
    atomic.write_text(path, "".join(json.dumps(r) + "\n" for r in recs))
