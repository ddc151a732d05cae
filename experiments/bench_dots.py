"""Benchmark: the model's matrix products, XLA:CPU against torch, one process (issue 17).

What the training step is made of, product by product: for every linear shape of
SmolLM2-135M (q/o 576->576, k/v 576->192, gate/up 576->1536, down 1536->576, the tied LM
head 576->49152) and ``T`` tokens, the three products of a linear layer ``y = x W^T``
(``W [out, in]``, torch's layout and ours):

- ``forward``: ``y = x W^T`` ``[T, in] x [out, in] -> [T, out]``;
- ``input_grad``: ``dx = dy W`` ``[T, out] x [out, in] -> [T, in]`` (every method's backward);
- ``weight_grad``: ``dW = dy^T x`` ``[T, out] x [T, in] -> [out, in]`` (full fine-tuning).

Arms: ``jax`` (a jitted ``lax.dot_general`` in the layout above, XLA's default options)
and ``torch`` (``F.linear`` / ``mm`` on transposed views, as autograd calls them), float32,
on random inputs; for ``weight_grad`` also two rewrites of the same product, ``jax_dyT``
(``dy^T`` materialised, then ``[out, T] x [T, in]``) and ``jax_xTdy`` (``(x^T dy)^T``), each
transpose kept by an optimisation barrier so XLA cannot fold it back. Each (product, arm) is warmed up, then all are interleaved round-robin
(``--rounds``, each timing ``reps`` calls); reported per product: the median seconds and
GFLOP/s of each arm, ``jax_over_torch`` (ratio of the medians), the largest relative
difference of the two results, and per kind the time that a SmolLM2 step (``--layers``
decoder layers and the head) spends in these products in each arm.

Usage: python experiments/bench_dots.py [--tokens 512] [--rounds 9] [--layers 30]
       [--out experiments/results/dots.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import numpy as np

from sylva_jax.atomic import atomic_open

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
# (name, in, out, uses per decoder layer); the head is used once per step
LINEARS = [("q_proj/o_proj", 576, 576, 2), ("k_proj/v_proj", 576, 192, 2), ("gate_proj/up_proj", 576, 1536, 2),
           ("down_proj", 1536, 576, 1), ("lm_head", 576, 49152, 0)]
KINDS = ("forward", "input_grad", "weight_grad")
_DIMS = {"forward": (((1,), (1,)), ((), ())), "input_grad": (((1,), (0,)), ((), ())),
         "weight_grad": (((0,), (0,)), ((), ()))}


def operands(kind, t, n_in, n_out, rng):
    """NumPy operands of ``kind`` (module doc) for ``T = t`` and a ``[n_out, n_in]`` weight."""
    x = rng.standard_normal((t, n_in), np.float32)
    w = rng.standard_normal((n_out, n_in), np.float32) * 0.05
    dy = rng.standard_normal((t, n_out), np.float32)
    return {"forward": (x, w), "input_grad": (dy, w), "weight_grad": (dy, x)}[kind]


def torch_product(kind, a, b):
    import torch

    if kind == "forward":
        return lambda: torch.nn.functional.linear(a, b)
    if kind == "input_grad":
        return lambda: a.mm(b)
    return lambda: a.t().mm(b)


def jax_product(kind):
    return jax.jit(lambda a, b: jax.lax.dot_general(a, b, _DIMS[kind]))


_barrier = jax.lax.optimization_barrier
WEIGHT_GRAD_REWRITES = {"jax_dyT": lambda dy, x: _barrier(dy.T) @ x, "jax_xTdy": lambda dy, x: (_barrier(x.T) @ dy).T}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--layers", type=int, default=30, help="decoder layers of the step the totals describe")
    ap.add_argument("--flops_per_rep", type=float, default=2e10, help="about this many FLOPs per timing")
    ap.add_argument("--out", default=os.path.join(RESULTS, "dots.json"))
    args = ap.parse_args(argv)
    if args.tokens < 1 or args.rounds < 1:
        ap.error("--tokens and --rounds must be positive")

    import torch

    load0 = os.getloadavg()
    rng = np.random.default_rng(0)
    cases = {}
    for name, n_in, n_out, uses in LINEARS:
        for kind in KINDS:
            a, b = operands(kind, args.tokens, n_in, n_out, rng)
            ta, tb = torch.from_numpy(a), torch.from_numpy(b)
            ja, jb = jax.device_put(a), jax.device_put(b)
            jf = jax_product(kind)
            arms = {"jax": lambda jf=jf, ja=ja, jb=jb: jf(ja, jb).block_until_ready(),
                    "torch": torch_product(kind, ta, tb)}
            if kind == "weight_grad":
                for arm, fn in WEIGHT_GRAD_REWRITES.items():
                    arms[arm] = lambda g=jax.jit(fn), ja=ja, jb=jb: g(ja, jb).block_until_ready()
            ref = np.asarray(arms["torch"]().numpy(), np.float64)
            got = np.stack([np.asarray(f(), np.float64) for arm, f in arms.items() if arm != "torch"])
            flops = 2.0 * args.tokens * n_in * n_out
            cases[f"{name}:{kind}"] = {
                "linear": name, "kind": kind, "in": n_in, "out": n_out, "uses_per_layer": uses, "flops": flops,
                "reps": max(1, int(args.flops_per_rep / flops)), "arms": arms, "times": {arm: [] for arm in arms},
                "max_rel_diff": float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30))}
    for c in cases.values():  # warm-up
        for f in c["arms"].values():
            f()
    for _ in range(args.rounds):
        for c in cases.values():
            for arm, f in c["arms"].items():
                t0 = time.perf_counter()
                for _ in range(c["reps"]):
                    f()
                c["times"][arm].append((time.perf_counter() - t0) / c["reps"])

    out_cases, totals = [], {k: {"jax_s": 0.0, "torch_s": 0.0} for k in KINDS}
    for key, c in cases.items():
        med = {arm: statistics.median(v) for arm, v in c["times"].items()}
        per_step = c["uses_per_layer"] * args.layers if c["uses_per_layer"] else 1
        if not (c["linear"] == "lm_head" and c["kind"] == "weight_grad"):  # the tied head is frozen
            totals[c["kind"]]["jax_s"] += per_step * med["jax"]
            totals[c["kind"]]["torch_s"] += per_step * med["torch"]
        out_cases.append({**{k: c[k] for k in ("linear", "kind", "in", "out", "flops", "reps", "max_rel_diff")},
                          "times_s": c["times"], "median_s": med,
                          "gflops": {arm: c["flops"] / s / 1e9 for arm, s in med.items()},
                          "jax_over_torch": med["jax"] / med["torch"]})
        print(f"{key:32s} jax {out_cases[-1]['gflops']['jax']:6.1f}  torch {out_cases[-1]['gflops']['torch']:6.1f} "
              f"GFLOP/s  jax/torch {out_cases[-1]['jax_over_torch']:.3f}", flush=True)
    for t in totals.values():
        t["jax_over_torch"] = t["jax_s"] / t["torch_s"] if t["torch_s"] else float("nan")
    result = {"benchmark": "matrix products of a SmolLM2-135M step, XLA:CPU vs torch, interleaved",
              "tokens": args.tokens, "rounds": args.rounds, "layers": args.layers, "dtype": "float32",
              "versions": {"jax": jax.__version__, "torch": torch.__version__},
              "threads": {"torch_intra_op": torch.get_num_threads()}, "platform": platform.platform(),
              "cpu_count": os.cpu_count(), "loadavg_start": load0, "cases": out_cases,
              "per_step_totals": totals,
              "note": "per_step_totals: median seconds per product times its uses in one step "
                      "(layers x uses per layer; the head once, no head weight gradient: tied and frozen)"}
    result["loadavg_end"] = os.getloadavg()
    print(json.dumps({k: round(v["jax_over_torch"], 3) for k, v in totals.items()}), flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with atomic_open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
