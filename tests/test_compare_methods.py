"""The tile-selection study (experiments/compare_methods.py, quality_*.py) on a tiny random
LLaMA and a tiny instruction file: stages, selection logic, resume, splits, verdicts."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import compare_methods
import quality_arms
import quality_report
import quality_study
from data_tokenizers import WordTokenizer

BS = 16


@pytest.fixture
def fast_compiles():
    """XLA's cheap optimisation level: compile time dominates these tiny runs."""
    import jax

    old = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", old)


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


def _settings(data):
    return quality_study.settings_for(
        True, data=str(data), max_len=32, block_size=BS, num_partition=2, n_heldout=8, n_val=6,
        calib_samples=4, eval_batch=4, batch=2, scopes=["self_attn"], sparsities=[0.75],
        pilot_scope="self_attn", pilot_sparsity=0.75, pilot_arms=["random", "grad"], pilot_lr=3e-2,
        pilot_steps=4, pilot_points=[1, 2, 4], min_steps=2, scorers=["grad", "random", "sylva", "magnitude"],
        alloc_scorers=[], leaders=1, seeds=2,
        lr_grid={"tiles": [1e-2, 3e-2], "lora": [3e-2], "full": [1e-2]})


class Interrupt(Exception):
    pass


def test_stages_select_on_validation_and_resume_identically(tmp_path, fast_compiles):
    data = tmp_path / "instruct.json"
    _data(data)
    s = _settings(data)
    study = quality_study.Study(s, tmp_path / "a.json", cache_dir=tmp_path / "ca", load_model=_tiny_model)
    res = study.run_stages(quality_study.STAGES)

    sp = res["data"]["split"]
    h, v, f = set(sp["heldout"]), set(sp["val"]), set(sp["fit"])
    assert not (h & v) and not (h & f) and not (v & f) and h | v | f == set(range(40))

    # pilot: one curve per arm at the pilot points; the length follows the rule
    p = res["pilot"]
    assert set(p["curves"]) == {"random", "grad"} and p["steps"] == [1, 2, 4]
    assert p["length"] == quality_study.choose_length(p["curves"], min_steps=2, gap_frac=s["gap_frac"])["length"]
    assert p["length"] >= 2

    # screen: every scorer + LoRA in the cell, one seed, at the length; decided on validation
    cell = res["cells"]["self_attn@0.75"]
    assert set(cell["screen"]) == {"grad", "random", "sylva", "magnitude", "lora"}
    grad_sweep = [r for r in res["runs"].values() if r["arm"] == "grad" and r["seed"] == 0 and r["steps"] == p["length"]]
    best = min(grad_sweep, key=lambda r: r["val_loss"])["lr"]
    assert cell["rates"]["tiles"]["lr"] == best and cell["screen"]["sylva"]["lr"] == best
    screen_runs = [r for r in res["runs"].values() if r["steps"] == p["length"] and r["seed"] == 0]
    for r in screen_runs:
        if r["family"] != "full":  # the screen never looked at the held-out set ...
            assert "heldout_loss" not in r or r["arm"] in res["confirm"]["arms"], r["key"]
    assert cell["overlap_with_grad"]["grad"] == 1.0
    # ... and the leader is the best non-baseline by validation gap to grad
    assert res["confirm"]["leaders"] == ["magnitude"]

    # confirm: leaders + baselines, 2 seeds, held-out per seed; seed 0 is the screen's run
    rows = res["confirm"]["cells"]["self_attn@0.75"]
    assert set(rows) == {"magnitude", "grad", "random", "sylva", "lora"}
    for name, r in rows.items():
        assert len(r["heldout"]) == 2 and all(np.isfinite(r["heldout"]))
        assert r["heldout"][0] != pytest.approx(res["base"]["heldout"], abs=1e-6), name
    for r in res["runs"].values():
        if r["family"] == "tiles":
            assert r["integrity"]["max_change_outside_trainable"] == 0.0, r["key"]
            assert r["integrity"]["changed_trainable_fraction"] > 0.5, r["key"]
    lora = [r for r in res["runs"].values() if r["family"] == "lora"]
    assert lora and all(r["integrity"]["max_change_outside_trainable"] == 0.0 for r in lora)
    assert all(r["trainable_params"] > 0 for r in res["runs"].values())
    assert "confirm self_attn@0.75" in quality_report.markdown(res)
    # a run's kept weights rebuild its trained model: the held-out loss of seed 1 (evaluated
    # when trained) again from the run cache, for a tile arm and for LoRA
    for name in ("sylva", "lora"):
        r1 = next(r for r in res["runs"].values() if r["arm"] == name and r["seed"] == 1)
        spec = study.spec(quality_arms.Arm.parse(name), "self_attn", 0.75, r1["lr"], 1)
        assert spec.key == r1["key"]
        again_loss = study.evaluate(study.kept_params(spec, r1), "heldout")["loss"]
        assert again_loss == pytest.approx(r1["heldout_loss"], rel=1e-5), name

    # the run cache is gone (a new machine; the results file came with the repository): a
    # run's weights are trained again, checked against the recorded validation loss
    bare = quality_study.Study(s, tmp_path / "a.json", cache_dir=tmp_path / "empty", load_model=_tiny_model)
    r1 = next(r for r in res["runs"].values() if r["arm"] == "sylva" and r["seed"] == 1)
    spec = bare.spec(quality_arms.Arm.parse("sylva"), "self_attn", 0.75, r1["lr"], 1)
    assert bare.evaluate(bare.kept_params(spec, r1), "heldout")["loss"] == pytest.approx(r1["heldout_loss"], rel=1e-5)
    assert bare.cache.record(quality_study._stem(spec.key)) is not None and bare.ran == []

    # interrupted inside confirm: the file holds the runs finished before, and no confirm
    # summary (it is written after a cell's runs); the rerun trains only the rest, identically
    keys = list(res["runs"])
    cut = {k: v for k, v in res.items() if k != "confirm"}
    cut["runs"] = {k: res["runs"][k] for k in keys[:-3]}
    (tmp_path / "b.json").write_text(json.dumps(cut))
    again = quality_study.Study(s, tmp_path / "b.json", cache_dir=tmp_path / "ca", load_model=_tiny_model)
    res_b = again.run_stages(quality_study.STAGES)
    assert again.ran == keys[-3:]
    assert res_b["confirm"] == res["confirm"] and res_b["pilot"] == res["pilot"]
    for k in keys[-3:]:
        assert res_b["runs"][k]["train_losses"] == res["runs"][k]["train_losses"], k
        assert res_b["runs"][k]["heldout_loss"] == res["runs"][k]["heldout_loss"], k


def test_choose_length_takes_the_first_point_where_the_gap_has_opened():
    curves = {"random": [[16, 2.0], [32, 1.9], [64, 1.80], [128, 1.70], [256, 1.65]],
              "grad": [[16, 2.0], [32, 1.88], [64, 1.79], [128, 1.66], [256, 1.61]]}
    got = quality_study.choose_length(curves, min_steps=64, gap_frac=0.75)
    assert got["gaps"] == pytest.approx([0.0, 0.02, 0.01, 0.04, 0.04])
    assert got["length"] == 128  # 64 has a quarter of the largest gap from 64 on
    assert quality_study.choose_length(curves, min_steps=64, gap_frac=0.2)["length"] == 64
    assert quality_study.choose_length(curves, min_steps=512, gap_frac=0.75)["length"] == 256


def test_verdicts_on_synthetic_numbers():
    ref = [1.60, 1.61, 1.62]  # std 0.01
    win = quality_report.verdict([1.57, 1.58, 1.59], ref)
    assert win["verdict"] == "win" and win["diff_mean"] == pytest.approx(-0.03) and win["better_every_seed"]
    assert win["spread"] == pytest.approx(0.01)
    tie = quality_report.verdict([1.595, 1.605, 1.615], ref)
    assert tie["verdict"] == "tie" and tie["better_every_seed"]  # better on every seed, within the spread
    noisy = quality_report.verdict([1.65, 1.60, 1.70], ref)  # worse by 0.04, but the arm's std is 0.05
    assert noisy["verdict"] == "tie" and noisy["spread"] == pytest.approx(0.05)
    assert quality_report.verdict([1.64, 1.65, 1.66], ref)["verdict"] == "loss"
    assert quality_report.verdict([1.5], [1.6])["verdict"] is None
    with pytest.raises(ValueError, match="same seeds"):
        quality_report.verdict([1.5, 1.6], [1.6])


def test_the_plan_can_grow_without_invalidating_finished_runs():
    s = quality_study.settings_for(False)
    grown = quality_study.settings_for(False, scopes=["self_attn"], seeds=5, screen_cells=["self_attn@0.99"],
                                       leaders=1, full=False)
    assert quality_study.fingerprint(s) == quality_study.fingerprint(grown)
    assert quality_study.fingerprint(s) != quality_study.fingerprint(quality_study.settings_for(False, max_len=128))
    assert quality_study.parse_cell("model.layers@0.99") == ("model.layers", 0.99)
    with pytest.raises(ValueError, match="SCOPE@SPARSITY"):
        quality_study.settings_for(False, screen_cells=["model.layers"])


def test_split_is_disjoint_and_refuses_too_little_data():
    sp = quality_study.split_indices(999, seed=0, n_heldout=150, n_val=32)
    assert len(sp["heldout"]) == 150 and len(sp["val"]) == 32 and len(sp["fit"]) == 817
    assert not set(sp["heldout"]) & set(sp["val"]) and not set(sp["fit"]) & (set(sp["heldout"]) | set(sp["val"]))
    assert sp == quality_study.split_indices(999, seed=0, n_heldout=150, n_val=32)
    with pytest.raises(ValueError, match="n_heldout"):
        quality_study.split_indices(10, seed=0, n_heldout=8, n_val=2)


def test_arm_names_round_trip_and_bad_names_are_refused():
    for name in ("grad", "lora", "full", "random"):
        assert quality_arms.Arm.parse(name).name == name
    assert quality_arms.Arm.parse("grad+global") == quality_arms.Arm("tiles", "grad", "global")
    with pytest.raises(ValueError, match="unknown arm"):
        quality_arms.Arm.parse("gradd")


def test_estimate_counts_the_work_of_each_stage():
    s = quality_study.settings_for(False, steps=64, scorers=["grad", "random", "sylva"], alloc_scorers=[])
    u = dict(quality_study.UNIT_COSTS, compile_s=0.0, eval_s_per_example=0.0, calib_s_per_sample=0.0)
    est = quality_study.estimate_seconds(s, u, set(), None, None, traced=True)
    per_tile, per_lora, per_full = 64 * 2 * u["tiles"], 64 * 2 * u["lora"], 64 * 2 * u["full"]
    # 4 cells x (3 grad rates + random + sylva at grad's rate, 3 LoRA rates: its screen run is the best of them)
    # + 3 full rates
    assert est["screen"] == pytest.approx(4 * (5 * per_tile + 3 * per_lora) + 3 * per_full)
    # 4 cells x (3 leaders + 4 baselines) x 2 new seeds
    assert est["confirm"] == pytest.approx(4 * 7 * 2 * per_tile)
    assert est["pilot"] == pytest.approx(2 * 128 * 2 * u["tiles"])


def test_report_reads_the_old_study(capsys):
    res = compare_methods.main(["--report", "--out", str(Path(compare_methods.RESULTS) / "quality_full.json")])
    assert "arms" in res and "model.layers/grad" in capsys.readouterr().out


def test_one_calibration_pass_gives_every_scorers_masks(fast_compiles):
    """Every scorer of importance.METHODS, and the allocation variants where the library
    has them, builds its mask from the study's single calibration pass."""
    from sylva_jax import capture, importance
    from sylva_jax.data.batching import collate

    graphdef, params, tok = _tiny_model()
    rng = np.random.default_rng(0)
    rows = [{"input_ids": rng.integers(1, 500, 32), "labels": rng.integers(1, 500, 32)} for _ in range(4)]
    calib = [collate(rows[i:i + 2], pad_id=0, pad_to=32) for i in (0, 2)]
    fn = capture.functional_model((graphdef, params))
    st, sec = quality_arms.calibrate(fn, calib, scope="self_attn", num_samples=4, num_partition=2)
    wst = quality_arms.weights_stats(fn, "self_attn")
    assert sec > 0 and len(st) == 4
    for arm in quality_arms.screen_arms(importance.METHODS, ["grad"]):
        if arm.family != "tiles":
            continue
        m = quality_arms.arm_masks(st if arm.scorer in importance.NEEDS_STATS else wst, arm, sparsity=0.75,
                                   block_size=BS, seed=0, batch=2)
        assert set(m) == set(st.layers) and sum(int(v.sum()) for v in m.values()) > 0, arm.name
        if arm.allocation == "layer":  # per-layer top-k: a quarter of each layer's tiles
            assert all(int(v.sum()) == round(0.25 * v.size) for v in m.values()), arm.name


def test_tiles_round_trip_keeps_the_params_structure():
    """A run's kept tiles written back give the trained weights in the params' own tree
    structure (int layer keys, 12 layers: a string-keyed rebuild would reorder them)."""
    import jax
    from tiny import tiny_split

    from sylva_jax import tree as tree_lib

    _, params = tiny_split(num_hidden_layers=12)
    flat = tree_lib.flatten(params)
    masks = {"model.layers.10.mlp.up_proj.weight": np.array([[True], [False]]),
             "model.layers.2.mlp.gate_proj.weight": np.array([[False], [True]])}
    trained = {n: np.asarray(w) + (1.0 if n in masks else 0.0) for n, w in flat.items()}
    tiles = quality_arms.tiles_of(tree_lib.unflatten(trained), masks, 64)
    back = quality_arms.with_tiles(params, masks, tiles, 64)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    out = tree_lib.flatten(back)
    for n, m in masks.items():
        r = int(np.nonzero(m)[0][0])
        np.testing.assert_array_equal(out[n][r * 64:(r + 1) * 64], np.asarray(flat[n])[r * 64:(r + 1) * 64] + 1.0)
        np.testing.assert_array_equal(np.delete(out[n], np.s_[r * 64:(r + 1) * 64], 0),
                                      np.delete(np.asarray(flat[n]), np.s_[r * 64:(r + 1) * 64], 0))
    assert all(np.array_equal(out[n], np.asarray(flat[n])) for n in flat if n not in masks)
