"""Benchmark: Sylva on an unchanged Flax Linen transformer via ``sylva_jax.anymodel.sparsify``
against a dense-gradient step over the same masked pytree (``optax.masked`` style).

docs/algorithm.md §5. Both arms train the same tiles with Adam from the same weights:

  sparsify      g = anymodel.sparsify(loss, adapter); grads w.r.t. the tiles only
                (embedded_linear: dense forward, sdd tile gradients, no [out, in] dW);
                optax.adam on the tiles; adapter.apply_updates writes them into W.
  dense_masked  jax.grad(loss) w.r.t. the full params (what a user without Sylva writes);
                optax.chain(masked(adam, adapted weights), masked(set_to_zero, the rest))
                so XLA drops the frozen weights' gradients, and the Adam update multiplied
                by the element mask of the tiles (dense dW and dense Adam state for the
                adapted weights).

A second pair runs our own LLaMA (same sizes) with the same sparse step, once through
``sparsify`` on the unchanged model (``linear_fn=None``) and once through the explicit
``adapter.linear_fn`` hook: the interpreter should cost nothing once compiled.

Each pair is compiled and warmed up, checked to give the same loss and the same
updated weights after one step, then timed interleaved (round-robin, so machine-load drift
hits both alike); medians, the ratio and the machine load are written to
experiments/results/any_model.json.

Usage: python experiments/bench_any_model.py [--rounds 20] [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from sylva_jax import compile_cache
from sylva_jax import anymodel  # noqa: E402
from sylva_jax import tree as tree_lib  # noqa: E402
from sylva_jax.adapter import make_adapter  # noqa: E402
from sylva_jax.losses import lm_loss  # noqa: E402


class Block(nn.Module):
    heads: int
    head_dim: int
    mlp: int

    @nn.compact
    def __call__(self, x, mask):
        B, T, E = x.shape
        h = nn.LayerNorm(name="ln1")(x)
        q, k, v = (nn.Dense(self.heads * self.head_dim, name=n)(h).reshape(
            B, T, self.heads, self.head_dim) for n in ("q_proj", "k_proj", "v_proj"))
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(self.head_dim)
        allowed = jnp.tril(jnp.ones((T, T), bool))[None, None] & (mask[:, None, None, :] > 0)
        a = jax.nn.softmax(jnp.where(allowed, s, -1e9), axis=-1)
        o = jnp.einsum("bhqk,bkhd->bqhd", a, v).reshape(B, T, -1)
        x = x + nn.Dense(E, name="o_proj")(o)
        h = nn.LayerNorm(name="ln2")(x)
        return x + nn.Dense(E, name="down")(nn.gelu(nn.Dense(self.mlp, name="up")(h)))


class LM(nn.Module):
    vocab: int
    dim: int
    layers: int
    heads: int
    mlp: int

    @nn.compact
    def __call__(self, ids, mask):
        x = nn.Embed(self.vocab, self.dim, name="embed")(ids)
        for i in range(self.layers):
            x = Block(self.heads, self.dim // self.heads, self.mlp, name=f"layers_{i}")(x, mask)
        return nn.Dense(self.vocab, name="lm_head")(nn.LayerNorm(name="norm")(x))



def time_arms(arms, params, batch, adapter, rounds):
    """Compile + one step per arm (checked equal), 2 warm-up steps, ``rounds`` interleaved
    timed steps. ``arms``: {name: (jitted step(params, opt_state, batch), init(params))}."""
    state, compile_s, after_one = {}, {}, {}
    for name, (step, init) in arms.items():
        p = jax.tree.map(jnp.array, params)            # own copy (donated)
        t0 = time.perf_counter()
        p, o, value = step(p, init(p), batch)
        jax.block_until_ready(p)
        compile_s[name] = time.perf_counter() - t0
        after_one[name] = (float(value), adapter.tiles(p))
        state[name] = (p, o)
    a, b = list(arms)
    # same loss, same tiles after one step (Adam's first step is sign-like: ~lr per entry)
    loss_diff = abs(after_one[a][0] - after_one[b][0])
    tile_diff = max(float(jnp.abs(after_one[a][1][n] - after_one[b][1][n]).max())
                    for n in adapter.paths)
    for _ in range(2):                                 # warm-up
        for name, (step, _) in arms.items():
            p, o = state[name]
            p, o, v = step(p, o, batch)
            jax.block_until_ready(v)
            state[name] = (p, o)
    times = {n: [] for n in arms}
    for _ in range(rounds):
        for name, (step, _) in arms.items():
            p, o = state[name]
            t0 = time.perf_counter()
            p, o, v = step(p, o, batch)
            jax.block_until_ready((p, v))
            times[name].append(time.perf_counter() - t0)
            state[name] = (p, o)
    return {"median_s": {n: statistics.median(t) for n, t in times.items()},
            "min_s": {n: min(t) for n, t in times.items()},
            "compile_s_first_step": compile_s,
            "check_after_one_step": {"loss_abs_diff": loss_diff, "tiles_max_abs_diff": tile_diff}}


def bench_llama(cfg, B, T, bs, sparsity, rounds, batch, lr):
    """Our LLaMA at the same sizes: sparsify(unchanged model) vs the explicit hook."""
    from flax import nnx

    from sylva_jax.models import llama

    lcfg = llama.LlamaConfig(vocab_size=cfg["vocab"], hidden_size=cfg["dim"],
                             intermediate_size=cfg["mlp"], num_hidden_layers=cfg["layers"],
                             num_attention_heads=cfg["heads"],
                             num_key_value_heads=cfg["heads"])
    graphdef, params = llama.split(llama.LlamaForCausalLM(lcfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(1)
    flat = tree_lib.flatten(params)
    masks = {}
    for n, w in flat.items():
        if ".layers." in n and n.endswith("proj.weight"):
            nt = (w.shape[0] // bs) * (w.shape[1] // bs)
            m = np.zeros(nt, bool)
            m[rng.choice(nt, max(1, round((1 - sparsity) * nt)), replace=False)] = True
            masks[n] = m.reshape(w.shape[0] // bs, w.shape[1] // bs)
    adapter = make_adapter(params, masks, block_size=bs)
    tx = optax.adam(lr)

    def loss(params, batch):
        logits = llama.apply(graphdef, params, batch["input_ids"], batch["attention_mask"])
        return lm_loss(logits, batch["labels"])

    def explicit(tiles, params, batch):
        logits = llama.apply(graphdef, params, batch["input_ids"], batch["attention_mask"],
                             linear_fn=adapter.linear_fn(tiles))
        return lm_loss(logits, batch["labels"])

    def make_step(g):
        def step(params, opt_state, batch):
            tiles = adapter.tiles(params)
            value, grads = jax.value_and_grad(g)(tiles, params, batch)
            updates, opt_state = tx.update(grads, opt_state, tiles)
            return adapter.apply_updates(params, updates), opt_state, value
        return jax.jit(step, donate_argnums=(0, 1))

    init = lambda p: tx.init(adapter.tiles(p))  # noqa: E731
    arms = {"llama_sparsify": (make_step(anymodel.sparsify(loss, adapter)), init),
            "llama_explicit_hook": (make_step(explicit), init)}
    res = time_arms(arms, params, batch, adapter, rounds)
    med = res["median_s"]
    res["ratio_sparsify_over_explicit"] = med["llama_sparsify"] / med["llama_explicit_hook"]
    res["adapted_weights"] = len(adapter.paths)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    ap.add_argument("--sparsity", type=float, default=0.95)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                  "any_model.json"))
    compile_cache.add_argument(ap)
    args = ap.parse_args()
    compile_cache.from_args(args)
    if args.quick:
        cfg = dict(vocab=256, dim=128, layers=1, heads=2, mlp=256)
        B, T, bs, rounds = 2, 32, 32, 3
    else:
        cfg = dict(vocab=1024, dim=512, layers=2, heads=8, mlp=1536)
        B, T, bs, rounds = 4, 128, 64, args.rounds
    model = LM(**cfg)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg["vocab"], size=(B, T)).astype(np.int32)
    am = np.ones((B, T), np.int32)
    am[1, T - T // 4:] = 0
    batch = {"input_ids": ids, "attention_mask": am,
             "labels": np.where(am == 1, ids, -100).astype(np.int32)}
    params = jax.jit(model.init)(jax.random.key(0), ids, am)["params"]

    def loss(params, batch):
        logits = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"])
        return lm_loss(logits, batch["labels"])

    # scope: every projection of every block (attention and MLP), sparsity per layer
    flat = tree_lib.flatten(params)
    names = [n for n in flat if n.startswith("layers_") and n.endswith("kernel")]
    masks = {}
    for n in names:
        i_dim, o_dim = flat[n].shape
        nt = (o_dim // bs) * (i_dim // bs)
        keep = max(1, round((1 - args.sparsity) * nt))
        m = np.zeros(nt, bool)
        m[rng.choice(nt, keep, replace=False)] = True
        masks[n] = m.reshape(o_dim // bs, i_dim // bs)
    adapter = make_adapter(params, masks, block_size=bs, layout="in_out")
    lr = 1e-3

    # -- arm 1: sparsify ------------------------------------------------------------------
    g = anymodel.sparsify(loss, adapter)
    tx = optax.adam(lr)

    def sparse_step(params, opt_state, batch):
        tiles = adapter.tiles(params)
        value, grads = jax.value_and_grad(g)(tiles, params, batch)
        updates, opt_state = tx.update(grads, opt_state, tiles)
        return adapter.apply_updates(params, updates), opt_state, value

    # -- arm 2: dense gradient over the masked pytree ----------------------------------------
    trainable = adapter.trainable_mask(params)
    frozen = jax.tree.map(lambda t: not t, trainable)
    txd = optax.chain(optax.masked(optax.adam(lr), trainable),
                      optax.masked(optax.set_to_zero(), frozen))
    elem = tree_lib.map_flat(
        lambda n, w: (np.kron(masks[n].T, np.ones((bs, bs), np.float32))
                      if n in adapter.coords else np.float32(0)), params)

    def dense_step(params, opt_state, batch):
        value, grads = jax.value_and_grad(loss)(params, batch)
        updates, opt_state = txd.update(grads, opt_state, params)
        updates = jax.tree.map(lambda u, m: u * m, updates, elem)
        return optax.apply_updates(params, updates), opt_state, value

    arms = {
        "sparsify": (jax.jit(sparse_step, donate_argnums=(0, 1)),
                     lambda p: tx.init(adapter.tiles(p))),
        "dense_masked": (jax.jit(dense_step, donate_argnums=(0, 1)), txd.init),
    }
    load = [os.getloadavg()[0]]
    linen = time_arms(arms, params, batch, adapter, rounds)
    llama_res = bench_llama(cfg, B, T, bs, args.sparsity, rounds, batch, lr)
    load.append(os.getloadavg()[0])
    med = linen["median_s"]
    result = {
        "what": "Linen transformer train step: anymodel.sparsify (tile grads) vs dense grads "
                "over the masked pytree (optax.masked + set_to_zero, element-masked updates)",
        "model": cfg, "batch": B, "seq_len": T, "block_size": bs, "sparsity": args.sparsity,
        "adapted_weights": len(adapter.paths), "trainable": adapter.num_trainable,
        "params": int(sum(np.size(x) for x in flat.values())),
        "rounds": rounds,
        **linen,
        "ratio_dense_over_sparsify": med["dense_masked"] / med["sparsify"],
        "llama_same_sizes": llama_res,
        "load_avg_1min_before_after": load,
        "cpu_count": os.cpu_count(),
        "device": str(jax.devices()[0]), "jax": jax.__version__,
        "platform": platform.platform(),
        "note": "shared CPU: other engineers' jobs ran at the same time (see load); arms "
                "interleaved so drift hits both",
    }
    print(json.dumps(result, indent=1))
    for res in (linen, llama_res):
        chk = res["check_after_one_step"]
        if chk["tiles_max_abs_diff"] > 1e-4 or chk["loss_abs_diff"] > 1e-4:
            raise SystemExit(f"arms disagree after one step: {chk}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
