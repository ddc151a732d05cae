"""Benchmark: the SmolLM2-135M model itself (load, compile, forward, forward+backward).

Measures on the current machine:
  load       ``load_pretrained("smollm2-135m")`` (GGUF open, dequantize, tokenizer), per run
  compile    jit lower+compile of the forward and of forward+backward (value_and_grad of the
             mean token NLL w.r.t. all parameters), per sequence length
  forward    median wall time of a jitted forward, batch 1 x T tokens
  fwd+bwd    median wall time of jitted value_and_grad, batch 1 x T tokens
for T in {128, 512}. The timed arms are interleaved round-robin after a warm-up so that
load drift on a shared CPU hits every arm alike; medians and the fwd+bwd / forward ratio
are reported. The load average before and after is recorded (contention note).

Writes experiments/results/model.json and prints a short summary.

Usage: python experiments/bench_model.py [--rounds 5] [--lengths 128 512] [--loads 2]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from sylva_jax.losses import lm_loss  # noqa: E402
from sylva_jax.models.llama import apply, split  # noqa: E402
from sylva_jax.models.loading import load_pretrained  # noqa: E402

OUT = os.path.join(os.path.dirname(__file__), "results", "model.json")


def _time(fn, *args) -> float:
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t


def main() -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--lengths", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--loads", type=int, default=2, help="how many times to time load_pretrained")
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args()

    load_before = os.getloadavg()
    load_times = []
    for _ in range(args.loads):
        t = time.perf_counter()
        model, tok = load_pretrained("smollm2-135m")
        jax.block_until_ready(split(model)[1])
        load_times.append(time.perf_counter() - t)
    graphdef, params = split(model)
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))

    def fwd(p, ids):
        return apply(graphdef, p, ids)

    def loss(p, ids):
        return lm_loss(apply(graphdef, p, ids), ids)

    fwd_j = jax.jit(fwd)
    grad_j = jax.jit(jax.value_and_grad(loss))

    rng = np.random.default_rng(0)
    arms, compile_s = {}, {}
    for T in args.lengths:
        ids = jnp.asarray(rng.integers(3, tok.vocab_size, size=(1, T)), jnp.int32)
        for name, f in (("forward", fwd_j), ("fwd_bwd", grad_j)):
            t = time.perf_counter()
            compiled = f.lower(params, ids).compile()
            compile_s[f"{name}_{T}"] = time.perf_counter() - t
            _time(compiled, params, ids)  # warm-up
            arms[f"{name}_{T}"] = (compiled, ids)

    times = {k: [] for k in arms}
    for _ in range(args.rounds):
        for k, (compiled, ids) in arms.items():
            times[k].append(_time(compiled, params, ids))
    med = {k: statistics.median(v) for k, v in times.items()}

    result = {
        "model": "smollm2-135m (SmolLM2-135M-Instruct GGUF, dequantized to float32)",
        "n_params": int(n_params),
        "dtype": model.config.dtype,
        "batch": 1,
        "rounds": args.rounds,
        "load_s": {"median": statistics.median(load_times), "all": load_times},
        "compile_s": compile_s,
        "median_s": med,
        "all_s": times,
        "tokens_per_s": {k: int(k.rsplit("_", 1)[1]) / v for k, v in med.items()},
        "fwd_bwd_over_forward": {T: med[f"fwd_bwd_{T}"] / med[f"forward_{T}"] for T in args.lengths},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "jax": jax.__version__,
                    "backend": jax.default_backend(), "device": str(jax.devices()[0]),
                    "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"SmolLM2-135M ({n_params / 1e6:.1f}M params, {result['dtype']}) on {jax.default_backend()}, "
          f"load avg {load_before[0]:.1f} -> {result['machine']['loadavg_after'][0]:.1f}")
    print(f"  load_pretrained: {result['load_s']['median']:.1f} s (median of {args.loads})")
    for T in args.lengths:
        print(f"  1x{T}: compile fwd {compile_s[f'forward_{T}']:.1f} s, fwd+bwd {compile_s[f'fwd_bwd_{T}']:.1f} s; "
              f"forward {med[f'forward_{T}'] * 1e3:.0f} ms, fwd+bwd {med[f'fwd_bwd_{T}'] * 1e3:.0f} ms "
              f"(x{result['fwd_bwd_over_forward'][T]:.2f}); median of {args.rounds} interleaved")
    print(f"  wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
