"""Benchmark: scoring one answer position per row (MMLU) with the LM head at that position
only (``apply(..., logits_at=pos)``) against the full ``[B, T, V]`` logits then a gather.

SmolLM2-135M (embedded), right-padded batches of B x T tokens whose rows end at different
positions. For each T both arms are jitted and checked to agree (max |difference| of the
[B, V] logits and the same argmax over the four answer letters' ids); then

  flops       XLA ``cost_analysis`` of each compiled program (no loops in either, so the
              counts compare);
  temp bytes  XLA ``memory_analysis`` temporary buffers (the [B, T, V] float32 logits are
              the difference);
  time        medians of interleaved calls (A B A B ... after a warm-up), and the ratio.

Writes experiments/results/answer_logits.json. Usage:
python experiments/bench_answer_logits.py [--rounds 5] [--batch 4] [--lengths 256 1024]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from sylva_jax import compile_cache
from sylva_jax import atomic  # noqa: E402
from sylva_jax.models.llama import apply, split  # noqa: E402
from sylva_jax.models.loading import load_pretrained  # noqa: E402

OUT = os.path.join(os.path.dirname(__file__), "results", "answer_logits.json")


def _cost(compiled) -> float:
    c = compiled.cost_analysis()
    c = c[0] if isinstance(c, (list, tuple)) else c
    return float(c.get("flops", float("nan")))


def _temp(compiled) -> int | None:
    m = compiled.memory_analysis()
    return None if m is None else int(m.temp_size_in_bytes)


def main() -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lengths", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--out", default=OUT)
    compile_cache.add_argument(ap)
    args = ap.parse_args()
    compile_cache.from_args(args)

    model, tok = load_pretrained("smollm2-135m")
    graphdef, params = split(model)
    letters = [tok.encode(" " + c, add_special_tokens=False)[-1] for c in "ABCD"]

    def full(p, ids, am):
        out = apply(graphdef, p, ids, am)
        return out[jnp.arange(ids.shape[0]), jnp.sum(am, axis=-1) - 1]

    def at(p, ids, am):
        return apply(graphdef, p, ids, am, logits_at=jnp.sum(am, axis=-1) - 1)

    load0 = os.getloadavg()
    rows = {}
    for T in args.lengths:
        rng = np.random.default_rng(T)
        ids = rng.integers(0, model.config.vocab_size, (args.batch, T)).astype(np.int32)
        lens = np.linspace(T // 2, T, args.batch).astype(int)
        am = (np.arange(T)[None] < lens[:, None]).astype(np.int32)
        ids, am = jnp.asarray(ids), jnp.asarray(am)
        arms = {}
        for name, fn in (("full_then_gather", full), ("logits_at", at)):
            t0 = time.perf_counter()
            compiled = jax.jit(fn).lower(params, ids, am).compile()
            arms[name] = {"fn": compiled, "compile_s": time.perf_counter() - t0,
                          "flops": _cost(compiled), "temp_bytes": _temp(compiled)}
        a = np.asarray(arms["full_then_gather"]["fn"](params, ids, am))
        b = np.asarray(arms["logits_at"]["fn"](params, ids, am))
        agree = {"max_abs_diff": float(np.abs(a - b).max()), "max_abs_logit": float(np.abs(a).max()),
                 "same_answer_letter": bool((a[:, letters].argmax(-1) == b[:, letters].argmax(-1)).all())}
        times = {k: [] for k in arms}
        for _ in range(1 + args.rounds):  # the first round is the warm-up, dropped
            for k, arm in arms.items():
                t0 = time.perf_counter()
                arm["fn"](params, ids, am).block_until_ready()
                times[k].append(time.perf_counter() - t0)
        med = {k: statistics.median(v[1:]) for k, v in times.items()}
        rows[str(T)] = {
            "batch": args.batch, "row_lengths": lens.tolist(), "agreement": agree,
            "arms": {k: {"median_s": med[k], "times_s": times[k][1:], "compile_s": arm["compile_s"],
                         "flops": arm["flops"], "temp_bytes": arm["temp_bytes"]} for k, arm in arms.items()},
            "time_ratio_at_over_full": med["logits_at"] / med["full_then_gather"],
            "flops_ratio_at_over_full": arms["logits_at"]["flops"] / arms["full_then_gather"]["flops"],
        }
        r = rows[str(T)]
        tb = [arms[k]["temp_bytes"] for k in ("full_then_gather", "logits_at")]
        print(f"T={T}: time x{r['time_ratio_at_over_full']:.3f}, flops x{r['flops_ratio_at_over_full']:.3f}, "
              f"temp {tb[0] / 2**20:.0f} -> {tb[1] / 2**20:.0f} MiB; max |diff| {agree['max_abs_diff']:.2e}, "
              f"same letter: {agree['same_answer_letter']}")
    result = {"model": "smollm2-135m", "rounds": args.rounds, "lengths": rows,
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "jax": jax.__version__,
                          "backend": jax.default_backend(), "loadavg_before": load0,
                          "loadavg_after": os.getloadavg()}}
    atomic.write_json(args.out, result)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
