"""Pre-processing cost on SmolLM2-135M: plain forward+backward passes vs full Sylva
pre-processing (statistics, inverse diagonals, masks), and the memory held by the factors.

    python experiments/bench_preprocess.py [--samples 32] [--seq 128] [--batch 8] [--repeats 3]

Both arms see the same batches and differentiate the same weights (every linear layer in
``model.layers``). The plain arm is one jitted ``jax.grad`` of the token-mean loss per batch;
the full arm is ``capture.preprocess`` + ``importance.select_blocks`` (= ``compute_masks``).
After a warm-up of each (compilation, timed separately), the arms are interleaved and medians
reported. Writes ``experiments/results/preprocess.json``.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


from sylva_jax import compile_cache
from sylva_jax import capture, curvature, importance  # noqa: E402
from sylva_jax import tree as tree_lib  # noqa: E402
from sylva_jax.losses import lm_loss  # noqa: E402
from sylva_jax.models import llama  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
DATA = os.path.join(ROOT, "..", "shared", "data", "instruct", "alpaca_en_demo.json")
OUT = os.path.join(ROOT, "experiments", "results", "preprocess.json")


def calibration_batches(tokenizer, n, seq, batch):
    """``n`` alpaca samples ``instruction\\ninput\\noutput``, tokenised, cut/right-padded to
    ``seq``; labels = ids (-100 at padding)."""
    with open(DATA) as f:
        rows = json.load(f)[:n]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = np.full((n, seq), pad, np.int32)
    am = np.zeros((n, seq), np.int32)
    for i, r in enumerate(rows):
        text = "\n".join(x for x in (r["instruction"], r["input"], r["output"]) if x)
        t = tokenizer(text)["input_ids"][:seq]
        ids[i, :len(t)] = t
        am[i, :len(t)] = 1
    labels = np.where(am == 1, ids, -100).astype(np.int32)
    return [{"input_ids": ids[i:i + batch], "attention_mask": am[i:i + batch],
             "labels": labels[i:i + batch]} for i in range(0, n, batch)]


def plain_passes(model, scope):
    """Jitted forward+backward (grad w.r.t. the scoped weights only), summed over batches."""
    fn = capture.functional_model(model)
    scoped = capture.scoped_weights(fn, scope)

    @functools.partial(jax.jit, donate_argnums=0)  # same buffer donation as preprocess
    def grad_step(acc, ws, params, extra, ids, am, labels):
        def loss(ws):
            p = tree_lib.map_flat(lambda n, x: ws.get(n, x), params)
            return lm_loss(fn.apply(p, extra, ids, am, None), labels)
        g = jax.grad(loss)(ws)
        return jax.tree.map(lambda a, b: a + b.astype(jnp.float32), acc, g)

    def run(batches):
        acc = {n: jnp.zeros(w.shape, jnp.float32) for n, w in scoped.items()}
        for b in batches:
            acc = grad_step(acc, scoped, fn.params, fn.extra, b["input_ids"], b["attention_mask"],
                            b["labels"])
        return jax.block_until_ready(acc)

    return run


def full_preprocessing(model, scope, args):
    def run(batches):
        t0 = time.perf_counter()
        stats = capture.preprocess(model, batches, scope=scope, num_samples=args.samples,
                                   num_partition=args.partitions)
        t1 = time.perf_counter()
        masks = importance.select_blocks(stats, sparsity=args.sparsity, block_size=64)
        t2 = time.perf_counter()
        return stats, masks, {"preprocess": t1 - t0, "select": t2 - t1}

    return run


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--partitions", type=int, default=8)
    ap.add_argument("--sparsity", type=float, default=0.95)
    ap.add_argument("--scope", default="model.layers")
    ap.add_argument("--out", default=OUT)
    compile_cache.add_argument(ap)
    args = ap.parse_args()
    compile_cache.from_args(args)

    from sylva_jax.models.loading import load_pretrained

    t = time.perf_counter()
    model, tokenizer = load_pretrained(args.model)
    load_s = time.perf_counter() - t
    batches = calibration_batches(tokenizer, args.samples, args.seq, args.batch)
    real_tokens = int(sum(b["attention_mask"].sum() for b in batches))
    plain = plain_passes(model, args.scope)
    full = full_preprocessing(model, args.scope, args)

    t = time.perf_counter()
    plain(batches)
    warm_plain = time.perf_counter() - t
    t = time.perf_counter()
    stats, masks, _ = full(batches)
    warm_full = time.perf_counter() - t
    print(f"warm-up (compile + first run): plain {warm_plain:.1f}s, full {warm_full:.1f}s", flush=True)

    plain_s, full_s, parts = [], [], []
    for r in range(args.repeats):
        t = time.perf_counter()
        plain(batches)
        plain_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        stats, masks, p = full(batches)
        full_s.append(time.perf_counter() - t)
        parts.append(p)
        print(f"repeat {r}: plain {plain_s[-1]:.2f}s, full {full_s[-1]:.2f}s "
              f"(preprocess {p['preprocess']:.2f}s, select {p['select']:.2f}s)", flush=True)

    # time split inside the full arm: the inverse diagonals alone (compiled, other damping)
    t = time.perf_counter()
    jax.block_until_ready(stats.inv_diags(damping=2e-6))
    inv_s = time.perf_counter() - t

    mem = stats.factor_nbytes()
    per_dim = {}
    for n, s in stats.items():
        for h in (s.A, s.G):
            d = per_dim.setdefault(str(h.dim), {"factors": 0, "bytes_each": curvature.nbytes(h),
                                                "dense_bytes_each": 4 * h.dim * h.dim,
                                                "num_partition": h.num_partition,
                                                "padded_dim": h.padded_dim})
            d["factors"] += 1
    for d in per_dim.values():
        L = d["padded_dim"] >> d["num_partition"]
        d["leaf_size"] = L
        # O(dim (L + P)): leaves d*L, levels P*d + 2^P - 1 numbers (float32)
        d["bound_bytes"] = 4 * (d["padded_dim"] * (L + d["num_partition"]) + (1 << d["num_partition"]))
    kept = int(sum(m.sum() for m in masks.values()))
    total = int(sum(m.size for m in masks.values()))
    med_plain, med_full = statistics.median(plain_s), statistics.median(full_s)
    result = {
        "model": args.model,
        "scope": args.scope,
        "layers_in_scope": len(stats),
        "samples": args.samples, "seq": args.seq, "batch": args.batch,
        "real_tokens": real_tokens,
        "num_partition": args.partitions,
        "partitions_used": {str(k): v for k, v in stats.partitions.items()},
        "repeats": args.repeats,
        "seconds": {
            "plain_passes_median": med_plain,
            "full_preprocessing_median": med_full,
            "plain_passes": plain_s,
            "full_preprocessing": full_s,
            "full_parts": parts,
            "inverse_diagonals_alone": inv_s,
            "warmup_plain": warm_plain,
            "warmup_full": warm_full,
            "model_load": load_s,
        },
        "ratio_full_over_plain": med_full / med_plain,
        "target_ratio": 1.5,
        "factor_memory": {
            "hodlr_bytes": mem["factors"],
            "dense_bytes": mem["dense_equivalent"],
            "ratio": mem["factors"] / mem["dense_equivalent"],
            "per_dim": per_dim,
        },
        "masks": {"kept_tiles": kept, "total_tiles": total, "sparsity": args.sparsity},
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "jax": jax.__version__, "backend": jax.default_backend(),
                    "loadavg_at_end": os.getloadavg()},
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps({k: result[k] for k in ("ratio_full_over_plain", "seconds", "factor_memory")},
                     indent=2))


if __name__ == "__main__":
    main()
