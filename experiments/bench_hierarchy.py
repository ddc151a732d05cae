"""Benchmark: HODLR ``inv_diag`` vs the dense inverse, and factor memory.

For each dim (default 576, 1536, 4096, 11008; ``P = 8``, dims zero-padded to a multiple of
2^P where needed) a float32 HODLR factor is filled with 64 random rank-1 updates, then

- ``hodlr``: ``curvature.inv_diag(h, lam)`` (jitted; bottom-up Woodbury, docs/algorithm.md §3),
- ``dense``: ``diag(jnp.linalg.inv(to_dense(h) + lam I))`` (jitted; the assembled matrix is
  built outside the timed region),

are compiled, warmed up, and timed in interleaved repetitions (hodlr, dense, hodlr, ...);
medians and the ratio are reported. The largest dense case is compiled ahead of time and
run ``--dense-reps-large`` times only (it is ~1.3 TFLOP on a CPU). Also reported: bytes
held by the hodlr factor vs a dense ``[d, d]`` matrix, and the max relative difference
between the two inverse diagonals (both float32; a sanity check, not a test).

Writes ``experiments/results/hierarchy.json``.

    python experiments/bench_hierarchy.py [--dims 576 1536] [--reps 5]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from sylva_jax import curvature as H

ROOT = Path(__file__).resolve().parents[1]


def _time(fn, *args):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0, out


def bench_dim(dim: int, p: int, reps: int, dense_reps: int, damping: float, relative: bool,
              seed: int) -> dict:
    rng = np.random.default_rng(seed)
    h = H.init(dim, p, jnp.float32)
    # vectors with a decaying spectrum (like activations), so the matrix is well-conditioned
    # after damping and the float32 comparison is meaningful
    xs = rng.standard_normal((64, dim)).astype(np.float32)
    xs *= (1.0 + 4.0 * rng.random(dim)).astype(np.float32)
    h = H.update(h, jnp.asarray(xs))
    jax.block_until_ready(h)

    lam = float(damping * np.mean(np.asarray(H.diag(h)))) if relative else damping
    hodlr_fn = jax.jit(lambda f: H.inv_diag(f, lam))

    @jax.jit
    def dense_fn(m):
        return jnp.diagonal(jnp.linalg.inv(m))

    m = H.to_dense(h) + lam * jnp.eye(dim, dtype=jnp.float32)
    jax.block_until_ready(m)

    t0 = time.perf_counter()
    hodlr_c = hodlr_fn.lower(h).compile()
    compile_hodlr = time.perf_counter() - t0
    t0 = time.perf_counter()
    dense_c = dense_fn.lower(m).compile()
    compile_dense = time.perf_counter() - t0

    d_hodlr = np.asarray(hodlr_c(h))                   # warm-up (and result)
    if dense_reps > 1:
        _time(dense_c, m)                              # warm-up run for the small dims
    th, td = [], []
    for i in range(max(reps, dense_reps)):
        th.append(_time(hodlr_c, h)[0])
        if i < dense_reps:
            sec, d_dense = _time(dense_c, m)
            td.append(sec)
    d_dense = np.asarray(d_dense)
    rel = float(np.max(np.abs(d_hodlr - d_dense) / np.abs(d_dense)))
    med_h, med_d = statistics.median(th), statistics.median(td)
    row = {
        "dim": dim,
        "lambda": lam,
        "num_partition": p,
        "padded_dim": h.padded_dim,
        "leaf_size": h.leaf_size,
        "hodlr_inv_diag_s": med_h,
        "dense_inv_s": med_d,
        "speedup_dense_over_hodlr": med_d / med_h,
        "hodlr_times_s": th,
        "dense_times_s": td,
        "compile_hodlr_s": compile_hodlr,
        "compile_dense_s": compile_dense,
        "hodlr_bytes": H.nbytes(h),
        "dense_bytes": dim * dim * 4,
        "memory_ratio_dense_over_hodlr": dim * dim * 4 / H.nbytes(h),
        "max_rel_diff_inv_diag_f32": rel,
    }
    print(f"dim {dim:6d} (D={h.padded_dim}, L={h.leaf_size}): hodlr {med_h * 1e3:9.2f} ms  "
          f"dense {med_d * 1e3:10.1f} ms  x{med_d / med_h:8.0f}   bytes hodlr "
          f"{H.nbytes(h) / 2**20:7.2f} MiB dense {dim * dim * 4 / 2**20:8.1f} MiB  "
          f"rel diff {rel:.1e}", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dims", type=int, nargs="+", default=[576, 1536, 4096, 11008])
    ap.add_argument("--num-partition", type=int, default=8)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dense-reps-large", type=int, default=1,
                    help="dense repetitions for dims >= 8192 (no warm-up run, AOT compiled)")
    ap.add_argument("--damping", type=float, default=0.1)
    ap.add_argument("--relative", action=argparse.BooleanOptionalAction, default=True,
                    help="damping relative to mean(diag F) (default; the HODLR matrix of a "
                         "low-rank F is indefinite, so a tiny absolute damping is ill-conditioned)")
    ap.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / "hierarchy.json")
    args = ap.parse_args()

    rows = []
    t_all = time.perf_counter()
    for i, dim in enumerate(args.dims):
        dense_reps = args.reps if dim < 8192 else args.dense_reps_large
        rows.append(bench_dim(dim, args.num_partition, args.reps, dense_reps, args.damping,
                              args.relative, i))
    result = {
        "benchmark": "curvature.inv_diag (HODLR, bottom-up Woodbury) vs diag(jnp.linalg.inv(dense))",
        "dtype": "float32",
        "damping": args.damping,
        "relative_damping": args.relative,
        "timing": "jitted, compiled ahead, warmed up, interleaved repetitions, median",
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "cpu_count": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
        "machine": platform.platform(),
        "total_s": time.perf_counter() - t_all,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out} ({result['total_s']:.0f} s)")


if __name__ == "__main__":
    main()
