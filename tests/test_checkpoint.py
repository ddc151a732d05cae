"""Orbax full-state checkpoints (exact resume, atomic saves, keep-best) and adapter-only
checkpoints (exact reload, small, bound to their base model) on a tiny random LLaMA."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from sylva_jax import tree as tree_lib
from sylva_jax.checkpoint import RunCheckpoints, fingerprint, load_adapter, save_adapter
from sylva_jax.train import make_train_step
from test_train import BS, copy, make_batch, shared

N = 2  # steps between saves


@pytest.fixture(scope="module")
def setup():
    """The tiny LLaMA, adapter and trainers of tests/test_train.py (compiled once); the
    lora trainer has dropout, so an exact resume must also restore the RNG."""
    return shared()


def run(trainer, state, steps):
    """``steps`` updates; the batch is a function of the data position kept in the state."""
    for _ in range(steps):
        state, _ = trainer.step(state, make_batch(int(state.data_pos), 2))
    return state


def assert_trees_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b) and len(la) == len(lb)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("method", ["sylva", "lora_dropout", "full"])
def test_resume_is_bitwise_exact(setup, tmp_path, method):
    """2N steps straight == N steps, save, restore into a fresh state, N steps."""
    _, params, _, trainers = setup
    trainer = trainers[method]
    straight = run(trainer, trainer.init(copy(params), seed=7), 2 * N)

    ckpt = RunCheckpoints(tmp_path / "ck", keep=2)
    state = run(trainer, trainer.init(copy(params), seed=7), N)
    assert ckpt.save(N, state, {"note": "half way"})
    state = run(trainer, state, 1)  # the old state is donated while the async save runs
    ckpt.wait()
    del state
    restored, extra = RunCheckpoints(tmp_path / "ck").restore_latest(trainer.init(copy(params), seed=0))
    assert extra == {"note": "half way"}
    assert int(restored.step) == N and int(restored.data_pos) == 2 * N
    resumed = run(trainer, restored, N)
    assert_trees_equal(resumed, straight)  # params, optimizer state, LoRA factors, rng, step, data_pos


def test_crash_during_save_keeps_previous_checkpoint(setup, tmp_path, monkeypatch):
    _, params, _, trainers = setup
    trainer = trainers["sylva"]
    state = run(trainer, trainer.init(copy(params)), 1)
    ckpt = RunCheckpoints(tmp_path / "ck", keep=3)
    ckpt.save(1, state, {"ok": True})
    ckpt.wait()
    saved = jax.tree.map(np.array, state)
    state = run(trainer, state, 1)

    # an exception inside Orbax's save, after the state item has been written
    def boom(*args, **kwargs):
        raise RuntimeError("simulated crash in the middle of a save")

    monkeypatch.setattr(ocp.JsonCheckpointHandler, "async_save", boom)
    monkeypatch.setattr(ocp.JsonCheckpointHandler, "save", boom)
    with pytest.raises(RuntimeError, match="simulated crash"):
        ckpt.save(2, state, {"ok": False})
        ckpt.wait()
    monkeypatch.undo()
    assert not (tmp_path / "ck" / "latest" / "2").exists()
    # a leftover half-written directory from a killed process
    junk = tmp_path / "ck" / "latest" / "3.orbax-checkpoint-tmp-1234567"
    (junk / "state").mkdir(parents=True)
    (junk / "state" / "garbage").write_bytes(b"\0" * 100)

    fresh = RunCheckpoints(tmp_path / "ck")  # as after a restart
    assert fresh.latest_step == 1
    restored, extra = fresh.restore_latest(trainer.init(copy(params)))
    assert extra == {"ok": True}
    assert_trees_equal(restored, saved)
    # and saving continues normally after the failure
    assert fresh.save(2, restored, {"ok": "again"})
    fresh.wait()
    assert fresh.latest_step == 2


def test_save_every_n_steps(setup, tmp_path):
    _, params, _, trainers = setup
    trainer = trainers["sylva"]
    ckpt = RunCheckpoints(tmp_path / "ck", keep=None, save_every=N)
    state = trainer.init(copy(params))
    saved = []
    for step in range(1, 2 * N + 2):
        state = run(trainer, state, 1)
        saved.append(ckpt.save(step, state, force=False))
    ckpt.wait()
    assert saved == [step % N == 0 for step in range(1, 2 * N + 2)]
    assert sorted(ckpt.latest.all_steps()) == [N, 2 * N] and ckpt.latest_step == 2 * N


def test_keep_best_by_metric(setup, tmp_path):
    _, params, _, trainers = setup
    trainer = trainers["sylva"]
    ckpt = RunCheckpoints(tmp_path / "ck", keep=1, keep_best=1, best_metric="mmlu")
    state = trainer.init(copy(params))
    steps = {}
    for step, score in ((1, 0.30), (2, 0.50), (3, 0.40)):
        state = run(trainer, state, 1)
        steps[step] = jax.tree.map(np.array, state.params)
        ckpt.save_best(step, state, {"mmlu": score})
        ckpt.save(step, state)
    ckpt.wait()
    assert ckpt.best_step == 2 and ckpt.latest_step == 3
    assert sorted(int(d) for d in os.listdir(tmp_path / "ck" / "best") if d.isdigit()) == [2]
    best = ckpt.restore_best(trainer.init(copy(params)))
    assert_trees_equal(best.params, steps[2])
    with pytest.raises(KeyError, match="mmlu"):
        ckpt.save_best(4, state, {"loss": 1.0})


def test_adapter_checkpoint_roundtrip_size_and_base_check(setup, tmp_path):
    graphdef, params, adapter, trainers = setup
    trainer = trainers["sylva"]
    base_fp = fingerprint(params, adapter)
    state = run(trainer, trainer.init(copy(params)), 3)
    assert fingerprint(state.params, adapter) == base_fp  # training changes only the tiles
    batch = make_batch(100, 2)
    tuned_logits = trainer.logits(state, batch["input_ids"], batch["attention_mask"])

    path = save_adapter(tmp_path / "adapter", adapter, state.params)
    loaded, adapter2 = load_adapter(path, copy(params))
    assert adapter2 == adapter
    assert_trees_equal(loaded, state.params)
    np.testing.assert_array_equal(trainer.logits(state.replace(params=loaded), batch["input_ids"],
                                                 batch["attention_mask"]), tuned_logits)

    # size: proportional to the tiles (4 bytes each plus coordinates and JSON): here ~20%
    # of the layer weights are tiles, so the file is < 1/3 of the model (5% at 95% sparsity)
    size = sum(f.stat().st_size for f in path.iterdir())
    model_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    assert adapter.num_trainable * 4 <= size < adapter.num_trainable * 4 + 32 * 1024
    assert size < model_bytes * adapter.num_trainable / sum(x.size for x in jax.tree.leaves(params)) + 32 * 1024
    assert size < model_bytes / 3

    # a different base: one element of a frozen (non-tile) part changed -> clear error
    flat = tree_lib.flatten(params)
    for victim in ("model.norm.weight", "model.layers.1.self_attn.q_proj.weight"):
        w = np.array(flat[victim])
        if victim in adapter.coords:  # an element outside the tiles of an adapted weight
            rows, cols = adapter.coords[victim]
            tiles = set(zip(rows.tolist(), cols.tolist()))
            r, c = next((i, j) for i in range(w.shape[0]) for j in range(w.shape[1])
                        if (i // BS, j // BS) not in tiles)
            w[r, c] += 1e-3
        else:
            w[0] += 1e-3
        other = tree_lib.map_flat(lambda p, x: jnp.asarray(w) if p == victim else x, params)
        with pytest.raises(ValueError, match="different base model"):
            load_adapter(path, other)
    # a base differing only inside the tiles is the same base for this adapter: the tiles
    # are overwritten on load, so the fine-tuned model is reproduced exactly
    loaded2, _ = load_adapter(path, copy(state.params))  # the tuned params as "base"
    assert_trees_equal(loaded2, state.params)
    # shapes that do not fit
    smaller = tree_lib.map_flat(lambda p, x: x[: x.shape[0] // 2] if p in adapter.coords else x, params)
    with pytest.raises(ValueError, match="shape"):
        load_adapter(path, smaller)


def test_fingerprint_is_exact_and_sensitive():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(64, 96)), jnp.float32)
    tree = {"a": {"weight": x}, "b": jnp.arange(5.0).astype(jnp.bfloat16)}
    fp = fingerprint(tree)
    assert fp == fingerprint(jax.tree.map(jnp.copy, tree))
    # swapping two elements (same multiset of values) is detected: position-weighted
    swapped = x.at[0, 0].set(x[0, 1]).at[0, 1].set(x[0, 0])
    assert fingerprint({"a": {"weight": swapped}, "b": tree["b"]}) != fp
    # the smallest possible change (one ulp in one element) is detected
    nudged = x.at[5, 7].set(jnp.nextafter(x[5, 7], jnp.inf))
    assert fingerprint({"a": {"weight": nudged}, "b": tree["b"]}) != fp
    assert fingerprint({"a": {"weight": x}, "b": tree["b"].at[2].set(7.0)}) != fp
