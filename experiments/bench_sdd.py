"""Benchmark: the SDD product (only the kept tiles of dW = dy^T x) against the dense dy^T x.

`docs/algorithm.md` §5. Float32, SmolLM2-135M-like shapes (hidden 576, MLP 1536), block 64,
densities 1%, 5%, 20%, tokens 512 and 2048. Arms are compiled and warmed up first, then
timed interleaved (round-robin, so machine-load drift hits every arm alike); medians and
ratios to the dense product are written to experiments/results/sdd.json.

Arms:
  dense         jnp.dot(dy.T, x) -> [out, in]
  xla           sylva_jax.ops.sdd(backend="xla") (the library path: gather [N, nnz, bs]
                along the block axis, one dot_general with batch nnz)
  xla_T         variant: transpose the operands to [blocks, bs, N] first, gather along
                axis 0, then a batched dot contracting the last axis of both
  xla_rowseg    variant (static coordinates): one [bs, N] x [N, k*bs] product per distinct
                row block, with the k column blocks of that row gathered once
  pallas        (GPU only) the Pallas kernel

Usage: python experiments/bench_sdd.py [--rounds 15] [--tokens 512 2048] [--quick]
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

from sylva_jax import compile_cache
from sylva_jax.ops import sdd  # noqa: E402

BS = 64
SHAPES = [(576, 576), (1536, 576), (576, 1536)]     # (out, in)
DENSITIES = [0.01, 0.05, 0.20]


def coords_for(out_dim, in_dim, density, rng):
    n_r, n_c = out_dim // BS, in_dim // BS
    nnz = max(1, int(round(density * n_r * n_c)))
    flat = np.sort(rng.choice(n_r * n_c, size=nnz, replace=False))
    return (flat // n_c).astype(np.int32), (flat % n_c).astype(np.int32)


def sdd_transposed(dy, x, rows, cols):
    n, d_out = dy.shape
    d_in = x.shape[1]
    dyt = dy.T.reshape(d_out // BS, BS, n)[rows]          # [nnz, bs, N]
    xt = x.T.reshape(d_in // BS, BS, n)[cols]             # [nnz, bs, N]
    return jax.lax.dot_general(dyt, xt, (((2,), (2,)), ((0,), (0,))),
                               preferred_element_type=jnp.float32)


def make_rowseg(rows_np, cols_np):
    groups = []
    for r in np.unique(rows_np):
        idx = np.nonzero(rows_np == r)[0]
        groups.append((int(r), cols_np[idx], idx))
    order = np.argsort(np.concatenate([g[2] for g in groups]))

    def f(dy, x, rows, cols):
        n = dy.shape[0]
        x3 = x.reshape(n, -1, BS)
        outs = []
        for r, cs, _ in groups:
            dyr = jax.lax.dynamic_slice_in_dim(dy, r * BS, BS, axis=1)      # [N, bs]
            xc = x3[:, cs].reshape(n, len(cs) * BS)                        # [N, k*bs]
            prod = jnp.dot(dyr.T, xc, preferred_element_type=jnp.float32)  # [bs, k*bs]
            outs.append(prod.reshape(BS, len(cs), BS).transpose(1, 0, 2))
        return jnp.concatenate(outs, axis=0)[order]

    return f


def time_once(fn, *args):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--tokens", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "sdd.json"))
    compile_cache.add_argument(ap)
    args = ap.parse_args()
    compile_cache.from_args(args)

    load_start = list(os.getloadavg())
    rng = np.random.default_rng(0)
    on_gpu = jax.default_backend() == "gpu"
    dense = jax.jit(lambda dy, x: jnp.dot(dy.T, x, preferred_element_type=jnp.float32))
    xla = jax.jit(lambda dy, x, r, c: sdd(dy, x, r, c, block_size=BS, backend="xla"))
    xla_t = jax.jit(sdd_transposed)
    pallas = jax.jit(lambda dy, x, r, c: sdd(dy, x, r, c, block_size=BS, backend="pallas"))
    records = []
    for n in args.tokens:
        for d_out, d_in in SHAPES:
            dy = jnp.asarray(rng.standard_normal((n, d_out)), jnp.float32)
            x = jnp.asarray(rng.standard_normal((n, d_in)), jnp.float32)
            for density in DENSITIES:
                rows_np, cols_np = coords_for(d_out, d_in, density, rng)
                rows, cols = jnp.asarray(rows_np), jnp.asarray(cols_np)
                arms = {
                    "dense": (dense, (dy, x)),
                    "xla": (xla, (dy, x, rows, cols)),
                    "xla_T": (xla_t, (dy, x, rows, cols)),
                    "xla_rowseg": (jax.jit(make_rowseg(rows_np, cols_np)), (dy, x, rows, cols)),
                }
                if on_gpu:
                    arms["pallas"] = (pallas, (dy, x, rows, cols))
                ref = np.asarray(xla(dy, x, rows, cols))
                for name, (fn, a) in arms.items():        # compile + warm up + check
                    out = np.asarray(fn(*a))
                    if name != "dense":
                        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-3)
                    for _ in range(2):
                        time_once(fn, *a)
                times = {k: [] for k in arms}
                for _ in range(args.rounds):              # interleaved
                    for name, (fn, a) in arms.items():
                        times[name].append(time_once(fn, *a))
                med = {k: statistics.median(v) for k, v in times.items()}
                best = {k: min(v) for k, v in times.items()}
                rec = {
                    "tokens": n, "out": d_out, "in": d_in, "block_size": BS,
                    "density": density, "nnz": int(len(rows_np)),
                    "n_tiles": (d_out // BS) * (d_in // BS),
                    "median_s": med,
                    "min_s": best,
                    "ratio_to_dense": {k: med[k] / med["dense"] for k in med if k != "dense"},
                    "ratio_of_mins": {k: best[k] / best["dense"] for k in best if k != "dense"},
                }
                records.append(rec)
                print(f"T={n:5d} {d_out}x{d_in} d={density:.2f} nnz={rec['nnz']:3d} "
                      f"dense={med['dense'] * 1e3:7.3f}ms "
                      + " ".join(f"{k}={v:.3f}x" for k, v in rec["ratio_to_dense"].items()),
                      flush=True)
    summary = {}
    for arm in records[0]["ratio_to_dense"]:
        for dens in DENSITIES:
            vals = [r["ratio_to_dense"][arm] for r in records if r["density"] == dens]
            mins = [r["ratio_of_mins"][arm] for r in records if r["density"] == dens]
            summary[f"{arm}@{dens:.2f}"] = {"median_ratio": statistics.median(vals),
                                            "max_ratio": max(vals),
                                            "median_ratio_of_mins": statistics.median(mins)}
    result = {
        "what": "sdd (only kept tiles of dy^T x) vs dense dy^T x, float32, medians of "
                f"{args.rounds} interleaved rounds after warm-up",
        "backend": jax.default_backend(), "device": str(jax.devices()[0]),
        "jax": jax.__version__, "machine": platform.machine(),
        "cpu_count": os.cpu_count(), "load_avg_start": load_start,
        "load_avg_end": list(os.getloadavg()),
        "target": "sdd at 5% density <= 0.15x dense",
        "summary": summary, "records": records,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(summary, indent=1))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
