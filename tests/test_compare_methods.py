"""experiments/compare_methods.py on a tiny random LLaMA and a tiny instruction file."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_tokenizers import WordTokenizer  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
BS = 16
# trained here: one arm of each code path (a mask from calibration statistics, a weights-only
# mask that sets the tile family's rate, LoRA, full); every other mask method is computed and
# checked without training (each training run costs a compile, ~3 s on the shared CPU)
ARMS = ("sylva", "random", "lora", "full")


@pytest.fixture
def fast_compiles():
    """XLA's cheap optimisation level: compile time dominates these tiny runs."""
    import jax

    old = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", old)


def _module():
    spec = importlib.util.spec_from_file_location("compare_methods", REPO / "experiments" / "compare_methods.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _tiny_model():
    import jax
    from flax import nnx

    from sylva_jax.models import llama

    cfg = llama.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    graphdef, abstract = llama.split(nnx.eval_shape(lambda: llama.LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: np.asarray(rng.normal(0.0, 0.08, s.shape) if len(s.shape) == 2
                                               else np.ones(s.shape), s.dtype), abstract)
    tok = WordTokenizer()
    tok.vocab_limit = 512
    return graphdef, params, tok


def _data(path: Path, n=40):
    rng = np.random.default_rng(1)
    words = [f"w{i}" for i in range(60)]
    rows = []
    for i in range(n):
        q = " ".join(rng.choice(words, 4))
        rows.append({"instruction": f"repeat {q}", "input": "", "output": f"{q} {q}"})
    path.write_text(json.dumps(rows))


def _settings(cm, data):
    return cm.settings_for(
        "quick", data=str(data), scopes=["self_attn"], arms=list(ARMS), max_len=32, block_size=BS,
        num_partition=2, n_heldout=8, n_val=6, heldout_eval=8, curve_n=4, curve_points=1, steps=3, batch=2,
        seeds=1, sweep="family", lr_points=2, calib_samples=4, curve_sparsities=[0.75, 0.5], sparsity=0.75,
        mmlu_limit=0, eval_batch=4, lr_centre={"tiles": 3e-2, "lora": 3e-2, "full": 1e-2}, lr_extend=1)


def test_study_structure_training_split_and_resume(tmp_path, fast_compiles):
    cm = _module()
    data = tmp_path / "instruct.json"
    _data(data)
    out = tmp_path / "quality.json"
    s = _settings(cm, data)
    study = cm.Study(s, out, cache_dir=tmp_path / "cache", load_model=_tiny_model)
    res = study.run()

    # the split: disjoint, complete, fixed
    sp = res["data"]["split"]
    h, v, f = set(sp["heldout"]), set(sp["val"]), set(sp["fit"])
    assert not (h & v) and not (h & f) and not (v & f)
    assert len(h) == 8 and len(v) == 6 and h | v | f == set(range(40))
    assert sp == cm.split_indices(40, seed=0, n_heldout=8, n_val=6)

    base = res["base"]["heldout_loss"]
    expect = {f"self_attn/{a}" for a in ARMS if a != "full"} | {"any/full"}
    expect |= {f"self_attn/{a}@{sp_:g}" for a in ("sylva", "lora") for sp_ in (0.5,)}
    assert set(res["arms"]) == expect
    for key, a in res["arms"].items():
        assert len(a["runs"]) == 1, key
        for r in a["runs"]:
            assert len(r["train_losses"]) == 3 and all(np.isfinite(r["train_losses"]))
            # every arm trained: the held-out loss moved and its trainable weights changed
            assert r["heldout_loss"] != pytest.approx(base, abs=1e-6), key
            assert r["integrity"]["changed_trainable_fraction"] > 0.5 or a["family"] == "lora", key
            # the curve: untuned, the snapshot (main arms only), the end
            want = [0, 3] if "@" in key else [0, 2, 3]
            assert [p[0] for p in r["curve"]] == want, (key, r["curve"])
            assert r["curve"][-1][1] != pytest.approx(r["curve"][0][1], abs=1e-6), key
        if a["family"] in ("tiles", "lora"):  # frozen weights stay bit-identical
            assert a["runs"][0]["integrity"]["max_change_outside_trainable"] == 0.0, key
        if a["family"] == "lora":
            assert a["runs"][0]["integrity"]["lora_b_abs_sum"] > 0
        assert a["heldout_mean"] == pytest.approx(np.mean([r["heldout_loss"] for r in a["runs"]]))
        assert a["improvement"] == pytest.approx(base - a["heldout_mean"])
        assert a["trainable_params"] > 0 and a["opt_state_bytes"] > 0
    # the training loss decreases in the arm that trains everything
    assert res["arms"]["any/full"]["runs"][0]["train_losses"][-1] < res["arms"]["any/full"]["runs"][0]["train_losses"][0]

    # sweeps: the representative / lora / full sweep two rates; the chosen rate has the best val loss
    for key in ("self_attn/random", "self_attn/lora", "any/full"):
        a = res["arms"][key]
        # a 2-point grid always has its best on an edge: it is extended once, beyond that edge
        first, extra = [r["lr"] for r in a["sweep"][:2]], a["sweep"][2]["lr"]
        assert a["lr_extended"] == 1 and len(a["sweep"]) == 3 and a["lr_grid"] == sorted(first + [extra])
        best2 = min(a["sweep"][:2], key=lambda r: r["val_loss"])["lr"]
        assert extra == pytest.approx(best2 * (10 ** 0.5 if best2 == max(first) else 10 ** -0.5), rel=1e-2)
        assert a["best_lr"] == min(a["sweep"], key=lambda r: r["val_loss"])["lr"]
        # the sweep never looks at the held-out set; the chosen run is the reported seed 0
        assert all("heldout_loss" not in r for r in a["sweep"])
        chosen = min(a["sweep"], key=lambda r: r["val_loss"])
        assert a["runs"][0]["train_losses"] == chosen["train_losses"] and a["runs"][0]["lr"] == a["best_lr"]
    assert res["arms"]["self_attn/sylva"]["best_lr"] == res["arms"]["self_attn/random"]["best_lr"]
    assert res["arms"]["self_attn/sylva"]["sweep"] == [] and res["arms"]["self_attn/sylva"]["lr_grid"] is None
    # every mask method: the same number of tiles per layer (equal trainable counts), distinct masks
    masks = {a: study.masks("self_attn", a, 0.75, 0) for a in cm.TILE_ARMS}
    for a, m in masks.items():
        assert set(m) == set(masks["sylva"]), a
        for n in m:
            assert m[n].shape == masks["sylva"][n].shape and m[n].sum() == masks["sylva"][n].sum(), (a, n)
    differ = {a for a in cm.TILE_ARMS if any((masks[a][n] != masks["sylva"][n]).any() for n in masks[a])}
    assert {"random", "magnitude", "sylva_tokens"} <= differ, differ
    # per-token factors come from their own calibration pass
    assert study.res["calibration"]["self_attn#tokens"]["num_samples"] == 4
    # the spread variant ranks by sylva's scores but touches at least as many rows / columns
    sp_, sy_ = cm.mask_spread(masks["sylva_spread"]), cm.mask_spread(masks["sylva"])
    assert sp_["rows"] >= sy_["rows"] and sp_["cols"] >= sy_["cols"] and sp_["cols"] == 1.0
    assert set(res["mask_spread"]["self_attn"]) == {"sylva", "random"}
    neg = res["calibration"]["self_attn"]["inv_diag_negative_fraction"]
    assert set(neg) == {"abs_1e-06", "rel_0.1"} and all(0.0 <= x <= 1.0 for x in neg.values())
    # LoRA rank matched to the tiles' trainable count as closely as integer ranks allow
    n_tiles = res["arms"]["self_attn/sylva"]["trainable_params"]
    assert n_tiles == res["arms"]["self_attn/random"]["trainable_params"]
    lora = res["arms"]["self_attn/lora"]["trainable_params"]
    per_rank = lora // res["arms"]["self_attn/lora"]["lora_rank"]
    assert abs(lora - n_tiles) <= per_rank / 2
    assert res["arms"]["self_attn/sylva@0.5"]["trainable_params"] == 2 * n_tiles
    assert res["calibration"]["self_attn"]["num_samples"] == 4
    # masks differ between methods (else the study compares nothing)
    assert min(res["mask_overlap_with_sylva"]["self_attn"].values()) < 1.0
    assert res["mask_overlap_with_sylva"]["self_attn"]["sylva"] == 1.0
    assert res["table"] and (tmp_path / "quality_curves.png").exists() and (tmp_path / "quality_params.png").exists()
    on_disk = json.loads(out.read_text())
    assert set(on_disk["arms"]) == expect and on_disk["fingerprint"] == cm.fingerprint(s)
    assert sorted(study.ran) == sorted(expect)
    # each arm's kept weights (what the MMLU stage scores) rebuild the model of its seed 0
    for key in ("self_attn/sylva", "self_attn/lora", "any/full"):
        got = study.eval_loss(study.kept_params(key), "heldout")["loss"]
        assert got == pytest.approx(res["arms"][key]["runs"][0]["heldout_loss"], abs=1e-6), key

    # resume: nothing finished is retrained; a removed arm is the only one that runs again
    again = cm.Study(s, out, cache_dir=tmp_path / "cache", load_model=_tiny_model)
    again.run()
    assert again.ran == []
    on_disk["arms"].pop("self_attn/lora@0.5")
    out.write_text(json.dumps(on_disk))
    third = cm.Study(s, out, cache_dir=tmp_path / "cache", load_model=_tiny_model)
    res3 = third.run()
    assert third.ran == ["self_attn/lora@0.5"]
    assert set(res3["arms"]) == expect
    # other settings refuse to mix into the same file
    with pytest.raises(SystemExit):
        cm.Study({**s, "steps": 4}, out, cache_dir=tmp_path / "cache", load_model=_tiny_model)
    # the arm list is not part of the protocol: an added arm runs alone, at the family's rate
    more = cm.Study({**s, "arms": list(ARMS) + ["sylva_spread"]}, out, cache_dir=tmp_path / "cache",
                    load_model=_tiny_model)
    assert more.fp == study.fp
    res4 = more.run()
    assert more.ran == ["self_attn/sylva_spread"] and set(res4["arms"]) == expect | {"self_attn/sylva_spread"}
    assert res4["arms"]["self_attn/sylva_spread"]["mask"]["spread"] is True
    assert res4["arms"]["self_attn/sylva_spread"]["best_lr"] == res4["arms"]["self_attn/random"]["best_lr"]
    # a file fingerprinted by an earlier version (arm lists included) keeps its name
    on_disk = json.loads(out.read_text())
    on_disk["fingerprint"] = "0123456789abcdef"
    out.write_text(json.dumps(on_disk))
    legacy = cm.Study(s, out, load_model=_tiny_model, cache_dir=tmp_path / "cache")
    assert legacy.fp == "0123456789abcdef" and legacy.res["settings"]["arms"] == list(ARMS)


def test_lr_grid_is_log_spaced():
    cm = _module()
    g = cm.lr_grid(1e-3, 3)
    assert g == pytest.approx([3.16e-4, 1e-3, 3.16e-3], rel=1e-2)
    assert g[1] / g[0] == pytest.approx(g[2] / g[1], rel=1e-2)


def test_full_preset_estimate_counts_the_work():
    """The full study's estimate follows its structure: more steps, seeds or arms cost more;
    the second scope runs only its own arms."""
    cm = _module()
    unit = {"tiles": {"s_per_sequence": 2.0, "compile_s": 20.0}, "lora": {"s_per_sequence": 2.0, "compile_s": 20.0},
            "full": {"s_per_sequence": 3.3, "compile_s": 20.0}, "eval_s_per_example": 0.6, "calib_s_per_sample": 4.0}
    full = cm.settings_for("full")
    assert set(full["scope_arms"]["self_attn"]) < set(full["arms"]) and "full" in full["arms"]
    h = cm.estimate_hours(full, unit, None)
    assert 1.0 < h < 8.0
    assert cm.estimate_hours({**full, "steps": 2 * full["steps"]}, unit, None) > h
    assert cm.estimate_hours({**full, "seeds": full["seeds"] + 1}, unit, None) > h
    assert cm.estimate_hours({**full, "scope_arms": {}}, unit, None) > h
    # an explicit --arms applies to every scope
    assert "scope_arms" not in cm.settings_for("full", arms=["sylva", "lora"])


def test_comparisons_and_report_on_a_synthetic_result():
    """The hypothesis check pairs seeds and compares the mean gap with the larger seed spread."""
    cm = _module()

    def arm(name, losses, scope="model.layers"):
        hl = np.array(losses)
        return {"scope": scope, "arm": name, "family": "tiles", "runs": [{"heldout_loss": x} for x in losses],
                "heldout_mean": float(hl.mean()), "heldout_std": float(hl.std(ddof=1)), "improvement": 2.0 - hl.mean(),
                "best_lr": 1e-3, "best_lr_at_grid_edge": False, "lora_rank": None, "trainable_params": 10,
                "opt_state_bytes": 80, "train_s_total": 1.0, "wall_s": 2.0}

    res = {"base": {"heldout_loss": 2.0}, "arms": {
        "model.layers/sylva": arm("sylva", [1.50, 1.52, 1.51]),
        "model.layers/random": arm("random", [1.56, 1.57, 1.55]),      # worse by 0.05 >> spread 0.01
        "model.layers/grad": arm("grad", [1.49, 1.53, 1.52]),          # mixed, within spread
        "self_attn/random": arm("random", [1.0, 1.0, 1.0], "self_attn"),  # other scope: not compared
    }}
    c = cm.comparisons(res)
    assert set(c) == {"model.layers"} and set(c["model.layers"]) == {"random", "grad"}
    r, g = c["model.layers"]["random"], c["model.layers"]["grad"]
    assert r["diff_per_seed"] == pytest.approx([-0.06, -0.05, -0.04])
    assert r["diff_mean"] == pytest.approx(-0.05) and r["seed_spread"] == pytest.approx(0.01)
    assert r["beyond_spread"] and r["ref_better_every_seed"]
    assert not g["beyond_spread"] and not g["ref_better_every_seed"]
    md = cm.report_markdown(res)
    assert "| model.layers/sylva |" in md and "| random | -0.0600, -0.0500, -0.0400 | -0.0500 | 0.0100 | yes |" in md


def test_an_interrupted_arm_resumes_at_its_next_run(tmp_path, fast_compiles):
    """A study stopped inside an arm (Ctrl-C, the end of a session) keeps the runs it
    finished: the next process trains only the rest, and the arm's result is the one an
    uninterrupted study gives. Stopped after 2 of 4 runs (inside the sweep), the second
    process reloads the chosen run's weights and snapshots to evaluate its curve."""
    stop_after = 2
    cm = _module()
    data = tmp_path / "instruct.json"
    _data(data)
    s = {**_settings(cm, data), "arms": ["lora"], "curve_sparsities": [0.75], "seeds": 2, "sweep": "arm"}

    class Stop(Exception):
        pass

    def counting(study, stop_after=None):
        calls = []
        fresh = study._train_run

        def wrapped(*a, **k):
            if stop_after is not None and len(calls) == stop_after:
                raise Stop
            calls.append((a[1:4], k["want_val"]))
            return fresh(*a, **k)
        study._train_run = wrapped
        return calls

    clean = cm.Study(s, tmp_path / "clean.json", cache_dir=tmp_path / "c1", load_model=_tiny_model)
    all_runs = counting(clean)
    want = clean.run()["arms"]["self_attn/lora"]
    # a 2-point sweep extended once, then seed 1: four runs; none left on disk afterwards
    assert len(all_runs) == 4 and not list((tmp_path / "c1" / "runs").iterdir())
    # the chosen rate is one of the two runs the first process will finish
    assert want["best_lr"] in [r["lr"] for r in want["sweep"][:stop_after]]

    first = cm.Study(s, tmp_path / "q.json", cache_dir=tmp_path / "c2", load_model=_tiny_model)
    done = counting(first, stop_after=stop_after)
    with pytest.raises(Stop):
        first.run()
    assert len(done) == stop_after and "self_attn/lora" not in json.loads((tmp_path / "q.json").read_text())["arms"]
    second = cm.Study(s, tmp_path / "q.json", cache_dir=tmp_path / "c2", load_model=_tiny_model)
    rest = counting(second)
    got = second.run()["arms"]["self_attn/lora"]
    assert rest == all_runs[stop_after:]  # only the runs that had not finished
    for k in ("lr_grid", "best_lr", "heldout_mean", "val_loss", "trainable_params", "lora_rank"):
        assert got[k] == want[k], k
    assert [r["val_loss"] for r in got["sweep"]] == [r["val_loss"] for r in want["sweep"]]
    assert [r["curve"] for r in got["runs"]] == [r["curve"] for r in want["runs"]]
    assert not list((tmp_path / "c2" / "runs").iterdir())
