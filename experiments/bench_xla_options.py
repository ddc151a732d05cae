"""Benchmark: XLA:CPU compile options for the training step (issue 17).

Which of the compiler options that XLA:CPU offers in this jax version make our step
faster on this CPU, with the same numbers? Each option set compiles the same jitted step
(``step_fn.lower(state, batch).compile(compiler_options=...)``: per-executable, so every
set lives in one process) for the arms ``sylva`` (95% random tiles in ``model.layers``),
``full`` and ``floor`` (bench_step.py), SmolLM2-135M shapes, float32, ``B x T`` random
tokens. Every (arm, set) is warmed up, then all are interleaved round-robin; the median
step time per (arm, set), its ratio to the default set (of the medians, and the median of
the per-round ratios, which cancels the machine's drift), and the first step's loss
(the largest |loss - default's| must stay at float32 rounding for a set to be usable).

Option sets (``OPTION_SETS``): the default (YNNPACK fuses dots, element-wise ops and
reductions), YNNPACK for individual dots only, YNNPACK dots without reductions, no YNNPACK
(Eigen dots), oneDNN dots, and the scheduler / vector-width knobs.

Usage: python experiments/bench_xla_options.py [--arms sylva floor full] [--sets default ...]
       [--rounds 5] [--tokens 512] [--out experiments/results/xla_options.json]
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

from bench_step import batch_of, make_arms, random_model
from sylva_jax.atomic import atomic_open

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
YNN = "xla_cpu_experimental_ynn_fusion_type"
OPTION_SETS = {
    "default": {},
    "ynn_dot_eltwise": {YNN: "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_ELTWISE"},
    "ynn_individual_dot": {YNN: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"},
    "no_ynn": {YNN: ""},
    "onednn": {YNN: "", "xla_cpu_use_onednn": True},
    "sequential_scheduler": {"xla_cpu_enable_concurrency_optimized_scheduler": False},
    "vector_512": {"xla_cpu_prefer_vector_width": 512},
    "sequential_individual_dot": {"xla_cpu_enable_concurrency_optimized_scheduler": False,
                                  YNN: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"},
}


def compile_sets(trainer, state, batch, sets):
    lowered = trainer.step_fn.lower(state, batch)
    out = {}
    for name in sets:
        t0 = time.perf_counter()
        out[name] = (lowered.compile(compiler_options=OPTION_SETS[name]), time.perf_counter() - t0)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arms", nargs="+", default=["sylva", "floor", "full"])
    ap.add_argument("--sets", nargs="+", default=list(OPTION_SETS), choices=list(OPTION_SETS))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--out", default=os.path.join(RESULTS, "xla_options.json"))
    a = ap.parse_args(argv)

    graphdef, params = random_model(a.layers)
    trainers, adapter, _ = make_arms(graphdef, params, "model.layers", a.arms)
    batch = batch_of(a.batch, a.tokens)
    live, res = {}, {}
    for arm, tr in trainers.items():
        state0 = tr.init(jax.tree.map(jnp.copy, params))
        for name, (exe, secs) in compile_sets(tr, state0, batch, a.sets).items():
            state = tr.init(jax.tree.map(jnp.copy, params))
            losses = []
            for _ in range(max(1, a.warmup)):
                state, m = exe(state, batch)
                losses.append(float(jax.block_until_ready(m["loss"])))
            live[arm, name] = [exe, state]
            res.setdefault(arm, {})[name] = {"compile_s": secs, "first_losses": losses, "times_s": []}
            print(f"  {arm} {name}: compiled in {secs:.0f} s, losses {losses}", flush=True)
        del state0
    load0 = os.getloadavg()
    for _ in range(a.rounds):
        for (arm, name), cell in live.items():
            t0 = time.perf_counter()
            cell[1], m = cell[0](cell[1], batch)
            jax.block_until_ready((cell[1], m))
            res[arm][name]["times_s"].append(time.perf_counter() - t0)
    for arm, sets in res.items():
        base = sets["default"] if "default" in sets else None
        for name, r in sets.items():
            r["median_s"] = statistics.median(r["times_s"])
            if base is not None:
                r["over_default"] = r["median_s"] / statistics.median(base["times_s"])
                # per-round ratios: both times of a round share the machine's state then
                # (this CPU drifts by 20-40% over minutes), so their median is the steadier ratio
                r["paired_over_default"] = statistics.median(
                    t / b for t, b in zip(r["times_s"], base["times_s"]))
                r["max_abs_loss_diff_vs_default"] = max(abs(x - y) for x, y in
                                                        zip(r["first_losses"], base["first_losses"]))
        print(arm, {n: (round(r.get("over_default", float("nan")), 3), round(r.get("paired_over_default", float("nan")), 3))
                    for n, r in sets.items()}, flush=True)
    out = {"benchmark": "XLA:CPU compile options for the training step, one process, interleaved",
           "model": f"SmolLM2-135M shapes, random weights, {a.layers} layers", "dtype": "float32",
           "batch": a.batch, "tokens": a.tokens, "scope": "model.layers", "sylva_tiles": adapter.num_tiles,
           "rounds": a.rounds, "warmup": a.warmup, "option_sets": {n: OPTION_SETS[n] for n in a.sets},
           "versions": {"jax": jax.__version__}, "platform": platform.platform(), "cpu_count": os.cpu_count(),
           "loadavg_start": load0, "loadavg_end": os.getloadavg(), "arms": res}
    with atomic_open(a.out, "w") as f:
        json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
