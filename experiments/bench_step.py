"""Benchmark: one training step of sylva vs LoRA vs full fine-tuning vs the floor.

`docs/algorithm.md` §5. SmolLM2-135M shapes (vocab 49152, hidden 576, 30 layers, 9 heads,
3 KV heads, MLP 1536, tied embeddings), float32, batch 1x512 and 4x512 tokens, scopes
``self_attn`` and ``model.layers``. Weights are random by default (timing does not depend
on their values; ``--pretrained`` loads the real model through ``load_pretrained``).

Arms (all through ``sylva_jax.train.make_train_step``, the state donated):
  floor     forward + backward to the embedding output, no weight gradient, no update
            (the cheapest step any fine-tuning method can take; :func:`floor`, a
            ``sylva_jax.methods.Method`` defined here, not a library method)
  sylva     95% sparsity, block 64, random masks (per layer: round(5% of the tiles), >= 1)
  lora      rank chosen so that r * sum(in + out) ~ sylva's trainable count, dropout 0
  lora_do   the same with dropout 0.05 (PEFT's usual setting)
  full      AdamW on every parameter

Per arm: median step time over interleaved rounds after a warm-up (round-robin, so load
drift on a shared CPU hits every arm alike), XLA's compiled FLOPs
(``compiled.cost_analysis()``) and memory (``compiled.memory_analysis()``: arguments +
outputs - aliased (donated) + temporaries). Ratios are sylva over the others.

Variants: ``--remat`` (model.layers 1x512 with ``remat=True``: activations recomputed per
decoder block) and ``--accum`` (sylva, 4 micro-batches of 1x512, ``accum_mode="scan"`` vs
``"loop"``).

Writes experiments/results/step.json. The LAST line printed is one JSON object for scope
``model.layers`` at 1x512 tokens.

Usage: python experiments/bench_step.py [--quick] [--rounds 7] [--remat] [--accum]
       [--cases model.layers:1x512,self_attn:4x512] [--append] [--pretrained]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flax import nnx  # noqa: E402

from sylva_jax import compile_cache
from sylva_jax import tree as tree_lib  # noqa: E402
from sylva_jax.adapter import make_adapter  # noqa: E402
from sylva_jax.lora import lora_paths, rank_for_budget  # noqa: E402
from sylva_jax.methods import Method  # noqa: E402
from sylva_jax.models import llama  # noqa: E402
from sylva_jax.ops import dense_linear  # noqa: E402
from sylva_jax.train import make_train_step  # noqa: E402

BS = 64
SPARSITY = 0.95
SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
               max_position_embeddings=2048, rope_theta=100000.0, rms_norm_eps=1e-5)


def random_model(layers: int, remat: bool = False, with_params: bool = True):
    cfg = llama.LlamaConfig(**{**SMOLLM2, "num_hidden_layers": layers, "remat": remat})
    graphdef, abstract = llama.split(nnx.eval_shape(lambda: llama.LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))))
    if not with_params:
        return graphdef, None
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: jnp.asarray(
        rng.standard_normal(s.shape, np.float32) * 0.02 if len(s.shape) == 2 else np.ones(s.shape, np.float32)),
        abstract)
    return graphdef, params


def pretrained_model():
    from sylva_jax.models.loading import load_pretrained

    loaded = load_pretrained("smollm2-135m")
    model = loaded[0] if isinstance(loaded, tuple) else loaded
    return llama.split(model)


def random_masks(params, scope, seed=0):
    rng = np.random.default_rng(seed)
    masks = {}
    for path in lora_paths(params, scope):
        w = tree_lib.flatten(params)[path]
        n_r, n_c = w.shape[0] // BS, w.shape[1] // BS
        k = max(1, round((1 - SPARSITY) * n_r * n_c))
        m = np.zeros(n_r * n_c, bool)
        m[rng.choice(n_r * n_c, k, replace=False)] = True
        masks[path] = m.reshape(n_r, n_c)
    return masks


def floor(probe: str = r"(^|\.)layers\.0\.") -> Method:
    """The cheapest step any fine-tuning method can take: plain frozen linear layers whose
    inputs (for the layers matching ``probe``; default the first decoder layer, i.e. the
    backward down to the embedding output) are scaled by ``1 + p`` with one scalar ``p = 0``
    as the only trainable value, so ``d loss / d p`` needs the backward of every activation
    down to those inputs and nothing else: no weight gradient and no weight update."""
    probe_re = re.compile(probe)

    def forward(params, extras, p, rng):
        def linear_fn(name, x, w, b=None):
            if probe_re.search(name):
                x = x * (1.0 + p).astype(x.dtype)
            return dense_linear(x, jax.lax.stop_gradient(w), None if b is None else jax.lax.stop_gradient(b))

        return params, linear_fn

    return Method(
        name="floor", init=lambda params, rng: {},
        trainable=lambda params, extras: jnp.zeros((), jnp.float32),
        forward=forward, eval_forward=lambda params, extras: (params, None),
        apply_updates=lambda params, extras, updates: (params, extras),
        merge=lambda params, extras: params, num_trainable=lambda params, extras: 0,
        adamw=lambda *args, **kwargs: optax.set_to_zero())


def compiled_stats(trainer, state, batch):
    """(stats, compiled executable): the executable is what gets timed (no second compile)."""
    compiled = trainer.step_fn.lower(state, batch).compile()
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    mem = compiled.memory_analysis()
    out = {"flops": float(cost.get("flops", float("nan"))) if cost else float("nan"),
           "bytes_accessed": float(cost.get("bytes accessed", float("nan"))) if cost else float("nan")}
    if mem is not None:
        arg, outb = mem.argument_size_in_bytes, mem.output_size_in_bytes
        alias, temp = mem.alias_size_in_bytes, mem.temp_size_in_bytes
        out.update(argument_bytes=arg, output_bytes=outb, alias_bytes=alias, temp_bytes=temp,
                   memory_bytes=arg + outb - alias + temp)
    return out, compiled


def make_arms(graphdef, params, scope, arms, accum=1):
    masks = random_masks(params, scope)
    adapter = make_adapter(params, masks, block_size=BS)
    rank = rank_for_budget(params, scope, adapter.num_trainable)
    common = dict(learning_rate=1e-4, schedule="constant", warmup_steps=0, accum_steps=accum)
    spec = {
        "floor": dict(method=floor(), **common),
        "sylva": dict(method="sylva", adapter=adapter, **common),
        "lora": dict(method="lora", scope=scope, lora_rank=rank, lora_alpha=2 * rank, **common),
        "lora_do": dict(method="lora", scope=scope, lora_rank=rank, lora_alpha=2 * rank, lora_dropout=0.05,
                        **common),
        "full": dict(method="full", **common),
        "sylva_loop": dict(method="sylva", adapter=adapter, accum_mode="loop", **common),
    }
    return {a: make_train_step(graphdef, **spec[a]) for a in arms}, adapter, rank


def batch_of(b, t, lead=()):
    rng = np.random.default_rng(1)
    ids = jnp.asarray(rng.integers(0, SMOLLM2["vocab_size"], lead + (b, t)), jnp.int32)
    return {"input_ids": ids, "attention_mask": jnp.ones_like(ids), "labels": ids}


def bench_case(graphdef, params, scope, b, t, arms, rounds, accum=1, stats=True, warmup=2):
    trainers, adapter, rank = make_arms(graphdef, params, scope, arms, accum)
    batch = batch_of(b, t, (accum,) if accum > 1 else ())
    states, res, steps = {}, {}, {}
    for name, tr in trainers.items():
        states[name] = tr.init(jax.tree.map(jnp.copy, params))
        res[name] = {"num_trainable": tr.num_trainable, "times_s": []}
        steps[name] = tr.step
        t0 = time.perf_counter()
        if stats and tr.accum_mode == "scan":
            st, steps[name] = compiled_stats(tr, states[name], batch)
            res[name].update(st)
        for _ in range(max(1, warmup)):  # warm-up (compiles, for the arms not compiled above)
            states[name], m = steps[name](states[name], batch)
            jax.block_until_ready((states[name], m))
        res[name]["compile_and_warmup_s"] = time.perf_counter() - t0
        print(f"  {scope} {b}x{t} {name}: ready after {res[name]['compile_and_warmup_s']:.0f} s", flush=True)
    for _ in range(rounds):
        for name in trainers:
            t0 = time.perf_counter()
            states[name], m = steps[name](states[name], batch)
            jax.block_until_ready((states[name], m))
            res[name]["times_s"].append(time.perf_counter() - t0)
    for name in res:
        res[name]["median_s"] = statistics.median(res[name]["times_s"])
    del states
    return {"scope": scope, "batch": b, "tokens": t, "accum": accum, "lora_rank": rank,
            "sylva_tiles": adapter.num_tiles, "arms": res}


def ratios(case):
    a = case["arms"]
    out = {}
    for other in ("lora", "lora_do", "full", "floor"):
        if "sylva" in a and other in a:
            out[f"sylva_over_{other}"] = a["sylva"]["median_s"] / a[other]["median_s"]
            if "flops" in a["sylva"] and "flops" in a[other]:
                out[f"flops_sylva_over_{other}"] = a["sylva"]["flops"] / a[other]["flops"]
            if "memory_bytes" in a["sylva"] and "memory_bytes" in a[other]:
                out[f"memory_sylva_over_{other}"] = a["sylva"]["memory_bytes"] / a[other]["memory_bytes"]
    return out


def parse_cases(text):
    out = []
    for item in text.split(","):
        scope, _, size = item.strip().partition(":")
        b, _, t = size.partition("x")
        out.append((scope, int(b), int(t)))
    return out


def case_key(case):
    return (case["scope"], case["batch"], case["tokens"], case.get("remat", False))


def summary_line(results):
    head = next((c for c in results if case_key(c) == ("model.layers", 1, 512, False)), results[0])
    a = head["arms"]
    return {"scope": head["scope"], "tokens": f"{head['batch']}x{head['tokens']}", **head["ratios"],
            **{f"{k}_s": v["median_s"] for k, v in a.items()},
            **{f"{k}_memory_mb": v.get("memory_bytes", 0) / 2**20 for k, v in a.items()},
            "loadavg_during": head.get("loadavg")}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="scope model.layers, 1x512 only (a few minutes)")
    ap.add_argument("--cases", default=None,
                    help="comma list scope:BxT (default: model.layers and self_attn at 1x512 and 4x512)")
    ap.add_argument("--rounds", type=int, default=None, help="timed interleaved rounds per case")
    ap.add_argument("--remat", action="store_true", help="also model.layers 1x512 with remat=True "
                    "(activations recomputed per decoder block)")
    ap.add_argument("--accum", action="store_true", help="also sylva accumulation of 4x(1x512): scan vs loop")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per arm after compiling")
    ap.add_argument("--append", action="store_true", help="merge into an existing --out file")
    ap.add_argument("--layers", type=int, default=SMOLLM2["num_hidden_layers"], help="decoder layers (30 = SmolLM2)")
    ap.add_argument("--pretrained", action="store_true", help="load the real SmolLM2-135M weights")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "step.json"))
    compile_cache.add_argument(ap)
    args = ap.parse_args()
    compile_cache.from_args(args)
    rounds = args.rounds or (5 if args.quick else 7)
    graphdef, params = pretrained_model() if args.pretrained else random_model(args.layers)

    arms = ["floor", "sylva", "lora", "lora_do", "full"]
    if args.cases:
        cases = parse_cases(args.cases)
    elif args.quick:
        cases = [("model.layers", 1, 512)]
    else:
        cases = [("model.layers", 1, 512), ("self_attn", 1, 512), ("model.layers", 4, 512), ("self_attn", 4, 512)]
    out = {
        "benchmark": "train step: sylva vs lora vs full vs floor",
        "model": "SmolLM2-135M " + ("pretrained" if args.pretrained else f"shapes, random weights, {args.layers} layers"),
        "dtype": "float32", "block_size": BS, "sparsity": SPARSITY,
        "device": str(jax.devices()[0]), "platform": platform.platform(), "jax": jax.__version__,
        "cpu_count": os.cpu_count(), "cases": [], "accumulation": None,
        "note": "shared 2-core CPU: other engineers' jobs ran during the measurement (see loadavg per case); "
                "arms are interleaved round-robin so drift hits all alike",
    }
    if args.append and os.path.exists(args.out):
        with open(args.out) as f:
            out = json.load(f)

    def save():
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)

    def add(case):
        out["cases"] = [c for c in out["cases"] if case_key(c) != case_key(case)] + [case]
        save()

    def run_accum():
        acc = bench_case(graphdef, params, "model.layers", 1, 512, ["sylva", "sylva_loop"], rounds, accum=4,
                         stats=False, warmup=args.warmup)
        acc["scan_over_loop"] = acc["arms"]["sylva"]["median_s"] / acc["arms"]["sylva_loop"]["median_s"]
        acc.update(rounds=rounds, loadavg=os.getloadavg())
        out["accumulation"] = acc
        save()
        print(json.dumps({"accum4_scan_s": acc["arms"]["sylva"]["median_s"],
                          "accum4_loop_s": acc["arms"]["sylva_loop"]["median_s"],
                          "scan_over_loop": acc["scan_over_loop"]}), flush=True)

    # order: the headline case first, then the variants, then the rest (a long run that is
    # stopped early still has the important numbers on disk)
    todo = [("case", scope, b, t, False) for scope, b, t in cases[:1]]
    if args.remat:
        todo.append(("case", "model.layers", 1, 512, True))
    if args.accum:
        todo.append(("accum",))
    todo += [("case", scope, b, t, False) for scope, b, t in cases[1:]]
    for item in todo:
        if item[0] == "accum":
            run_accum()
            continue
        _, scope, b, t, remat = item
        if remat:
            g, _ = random_model(args.layers, remat=True, with_params=False)
            case = bench_case(g, params, scope, b, t, ["floor", "sylva", "lora", "full"], rounds,
                              warmup=args.warmup)
        else:
            case = bench_case(graphdef, params, scope, b, t, arms, rounds, warmup=args.warmup)
        case.update(remat=remat, rounds=rounds, loadavg=os.getloadavg())
        case["ratios"] = ratios(case)
        add(case)
        print(json.dumps({k: case[k] for k in ("scope", "batch", "tokens", "remat", "lora_rank")}
                         | {a: round(v["median_s"], 4) for a, v in case["arms"].items()} | case["ratios"]),
              flush=True)
    print(json.dumps(summary_line(out["cases"])))


if __name__ == "__main__":
    main()
