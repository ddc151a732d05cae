"""Subprocess worker for tests/test_sharding.py (jax must start with its own device count).

python tests/sharding_worker.py mesh OUT.json
    8 CPU devices (XLA_FLAGS set by the caller): pre-processing, masks and two training steps
    of sylva / lora / full (with 2-step gradient accumulation) on meshes 8x1, 4x2, 1x8
    against the single-device run; writes the measured differences as JSON.
python tests/sharding_worker.py dist OUT.json COORDINATOR NUM_PROCESSES PROCESS_ID
    one process of a jax.distributed job (2 CPU devices per process): three sylva steps on a
    data=2 x fsdp=2 mesh spanning both processes, each process feeding only its own batch
    rows; compares the gathered final weights with a single-device run on a local device
    and writes a digest of them (the test checks the processes agree bit for bit).
"""
from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np


BS = 16
SCOPE = "self_attn"


def tiny(seed=0):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from sylva_jax.models import llama

    cfg = llama.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=64)
    graphdef, abstract = llama.split(nnx.eval_shape(lambda: llama.LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)
    params = jax.tree.map(
        lambda s: np.asarray(rng.normal(0.0, 0.08, s.shape) if len(s.shape) == 2 else np.ones(s.shape),
                             s.dtype), abstract)
    return graphdef, params


def make_batch(seed, b, t=16, lead=()):
    """Random ids, a random ignored prefix per row, one right-padded row (token counts differ
    per row, so the token-mean weighting of accumulation matters)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 128, lead + (b, t)).astype(np.int32)
    mask = np.ones_like(ids)
    labels = ids.copy()
    fl, fm = labels.reshape(-1, t), mask.reshape(-1, t)
    for r in range(fl.shape[0]):
        fl[r, : rng.integers(0, t // 2)] = -100
    fm[0, -3:] = 0
    fl[0, -3:] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def rel(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def trainer_for(graphdef, method, adapter, accum):
    from sylva_jax.train import make_train_step

    return make_train_step(graphdef, method=method, adapter=adapter, learning_rate=1e-3,
                           schedule="constant", warmup_steps=0, accum_steps=accum,
                           scope="self_attn", lora_rank=8)


def host(tree):
    import jax

    return jax.tree.map(lambda x: np.asarray(x), tree)


def run_mesh(out_path):
    import jax

    from sylva_jax import capture, importance, sharding
    from sylva_jax import tree as tree_lib
    from sylva_jax.adapter import make_adapter
    from sylva_jax.hierarchy import to_dense

    assert len(jax.devices()) == 8, jax.devices()
    t_start = time.perf_counter()
    graphdef, params = tiny()
    calib = [make_batch(10 + i, 8) for i in range(2)]
    # relative damping 1e-2: a well-conditioned inverse, so that scores (not only masks) are
    # comparable; at tiny absolute damping the HODLR factor of a low-rank sum is indefinite
    # and inv_diag amplifies float32 rounding (hierarchy.py docs)
    damp = 1e-2
    pkw = dict(scope=SCOPE, num_samples=16, num_partition=2, damping=damp, relative_damping=True)
    ref_stats = capture.preprocess((graphdef, params), calib, **pkw)
    ref_scores = importance.tile_scores(ref_stats, block_size=BS, damping=damp)
    ref_masks = importance.select_blocks(ref_stats, sparsity=0.75, block_size=BS, damping=damp)
    adapter = make_adapter(params, ref_masks, block_size=BS)

    train_batches = [make_batch(100 + i, 8, lead=(2,)) for i in range(2)]
    meshes = [(8, 1), (4, 2), (1, 8)]
    methods = ("sylva", "lora", "full")
    # sylva on every mesh; lora where both axes are used; full on the widest FSDP split
    per_mesh = {(8, 1): ("sylva",), (4, 2): ("sylva", "lora"), (1, 8): ("sylva", "full")}

    def train_single(method):
        tr = trainer_for(graphdef, method, adapter, 2)
        st = tr.init(jax.tree.map(np.copy, params))
        losses = []
        for b in train_batches:
            st, m = tr.step(st, b)
            losses.append(float(m["loss"]))
        return losses, host(st.params), host(st.extras)

    t0 = time.perf_counter()
    refs = {m: train_single(m) for m in methods}
    report = {"meshes": {}, "seconds": {"preprocess_single": t0 - t_start,
                                        "train_single": time.perf_counter() - t0}}
    for data, fsdp in meshes:
        mesh = sharding.make_mesh(data, fsdp)
        entry = {}
        t0 = time.perf_counter()
        stats = sharding.preprocess((graphdef, params), calib, mesh, block_size=BS, **pkw)
        f_err = 0.0
        g_err = 0.0
        for n, s in ref_stats.items():
            f_err = max(f_err, rel(to_dense(stats[n].A), to_dense(s.A)),
                        rel(to_dense(stats[n].G), to_dense(s.G)))
            g_err = max(g_err, rel(stats[n].grad_mean, s.grad_mean))
        scores = importance.tile_scores(stats, block_size=BS, damping=damp)
        masks = importance.select_blocks(stats, sparsity=0.75, block_size=BS, damping=damp)
        entry["factor_rel_err"] = f_err
        entry["grad_mean_rel_err"] = g_err
        entry["score_rel_err"] = max(rel(scores[n], ref_scores[n]) for n in ref_scores)
        entry["masks_equal"] = all(np.array_equal(masks[n], ref_masks[n]) for n in ref_masks)
        # how far the top-k boundary is from a tie, relative to the largest score: the score
        # error must stay far below this for the masks to be a meaningful equality check
        gaps = []
        for n, sc in ref_scores.items():
            v = np.sort(np.asarray(sc, np.float64).ravel())[::-1]
            k = int(ref_masks[n].sum())
            if k < v.size:
                gaps.append((v[k - 1] - v[k]) / v[0])
        entry["min_topk_gap"] = float(min(gaps))
        entry["seconds_preprocess"] = time.perf_counter() - t0
        p0 = tree_lib.flatten(params)
        for method in per_mesh[(data, fsdp)]:
            t0 = time.perf_counter()
            tr = trainer_for(graphdef, method, adapter, 2)
            st = tr.init(jax.tree.map(np.copy, params))
            step, st = sharding.sharded_step(tr, mesh, st, block_size=BS)
            losses = []
            for b in train_batches:
                st, m = step(st, sharding.shard_batch(b, mesh, accum_steps=2))
                losses.append(float(m["loss"]))
            r_losses, r_params, r_extras = refs[method]
            fp, fr = tree_lib.flatten(host(st.params)), tree_lib.flatten(r_params)
            # weight error relative to the size of the training update of that method
            upd = max(float(np.max(np.abs(fr[k].astype(np.float64) - p0[k]))) for k in fr)
            w_err = max(float(np.max(np.abs(fp[k].astype(np.float64) - fr[k]))) for k in fr)
            ex_err = 0.0
            if method == "lora":
                ex_err = max(float(np.max(np.abs(a.astype(np.float64) - b)))
                             for a, b in zip(jax.tree.leaves(host(st.extras)), jax.tree.leaves(r_extras)))
            spec = {k: str(v.sharding.spec) for k, v in tree_lib.flatten(st.params).items()}
            entry[method] = {
                "loss_rel_err": max(abs(a - b) / abs(b) for a, b in zip(losses, r_losses)),
                "weight_abs_err": w_err, "update_max": upd, "extras_abs_err": ex_err,
                "seconds": time.perf_counter() - t0,
                "losses": losses, "ref_losses": r_losses,
                "q_proj_spec": spec["model.layers.0.self_attn.q_proj.weight"],
            }
        report["meshes"][f"{data}x{fsdp}"] = entry
    with open(out_path, "w") as f:
        json.dump(report, f, indent=1)


def run_dist(out_path, coordinator, nproc, pid):
    from sylva_jax import sharding

    sharding.initialize_distributed(coordinator, int(nproc), int(pid), timeout_s=60)
    import jax
    from jax.experimental import multihost_utils

    from sylva_jax import tree as tree_lib
    from sylva_jax.adapter import make_adapter

    assert jax.process_count() == int(nproc) and len(jax.devices()) == 2 * int(nproc)
    graphdef, params = tiny()
    rng = np.random.default_rng(5)
    masks = {}
    for k, w in tree_lib.flatten(params).items():
        if k.startswith("model.layers") and w.ndim == 2:
            m = rng.random((w.shape[0] // BS, w.shape[1] // BS)) < 0.3
            m.flat[0] = True
            masks[k] = m
    adapter = make_adapter(params, masks, block_size=BS)
    batches = [make_batch(200 + i, 8) for i in range(3)]

    # the single-device reference, on this process's first local device
    local = jax.local_devices()[0]
    tr = trainer_for(graphdef, "sylva", adapter, 1)
    st = tr.init(jax.device_put(jax.tree.map(np.copy, params), local))
    ref_losses = []
    for b in batches:
        st, m = tr.step(st, jax.device_put(b, local))
        ref_losses.append(float(m["loss"]))
    ref = tree_lib.flatten(host(st.params))

    mesh = sharding.make_mesh(2, 2)
    rows = sharding.process_batch_slice(8, mesh)
    tr = trainer_for(graphdef, "sylva", adapter, 1)
    st = tr.init(jax.tree.map(np.copy, params))
    step, st = sharding.sharded_step(tr, mesh, st, block_size=BS)
    losses = []
    for b in batches:
        mine = {k: v[rows] for k, v in b.items()}  # this host reads only its own rows
        st, m = step(st, sharding.shard_batch(mine, mesh, global_batch_size=8))
        losses.append(float(np.asarray(m["loss"].addressable_shards[0].data)))  # replicated
    full = tree_lib.flatten(jax.tree.map(np.asarray, multihost_utils.process_allgather(st.params, tiled=True)))
    digest = hashlib.sha256()
    for k in sorted(full):
        digest.update(k.encode() + np.ascontiguousarray(full[k]).tobytes())
    p0 = tree_lib.flatten(params)
    upd = max(float(np.max(np.abs(ref[k].astype(np.float64) - p0[k]))) for k in ref)
    err = max(float(np.max(np.abs(full[k].astype(np.float64) - ref[k]))) for k in ref)
    out = {"process": int(pid), "rows": [rows.start, rows.stop], "digest": digest.hexdigest(),
           "weight_abs_err": err, "update_max": upd, "losses": losses, "ref_losses": ref_losses}
    out.update(checkpoint_round_trip(st, Path(out_path).parent / "ckpt", full))
    with open(out_path, "w") as f:
        json.dump(out, f)
    jax.distributed.shutdown()


def checkpoint_round_trip(state, directory, full) -> dict:
    """The training loop's checkpoint pattern after each evaluation, on a sharded multi-host
    state: the best and the resume checkpoint of the same step, saved asynchronously back to
    back (their two Orbax managers then run same-step barriers at once), for several steps;
    then the best one restored and gathered. ``full``: the gathered weights it must equal."""
    import jax
    from jax.experimental import multihost_utils

    from sylva_jax import checkpoint as ckpt_lib
    from sylva_jax import tree as tree_lib

    ck = ckpt_lib.RunCheckpoints(directory, keep=2)
    best = 3
    for step in range(1, 7):
        s = state if step == best else state.replace(params=jax.tree.map(lambda w: w * 0 + step, state.params))
        ck.save_best(step, s, {"mmlu": 1.0 if step == best else 0.1 * step})
        ck.save(step, s, {"step": step})
    ck.wait()
    restored = ck.restore_best(state)
    got = tree_lib.flatten(jax.tree.map(np.asarray, multihost_utils.process_allgather(restored.params, tiled=True)))
    steps = {"ckpt_best_step": ck.best_step, "ckpt_latest_step": ck.latest_step}
    ck.close()
    return {**steps, "ckpt_restored_max_err": max(float(np.max(np.abs(got[k] - full[k]))) for k in full)}


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "mesh":
        run_mesh(sys.argv[2])
    elif mode == "dist":
        run_dist(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5])
    else:
        raise SystemExit(f"unknown mode {mode!r}")
