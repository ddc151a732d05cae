"""GPU check: kernel correctness, SDD throughput and step-time ratios on one GPU.

Written for one H200 / H100 within 8 minutes (``--budget_s``, default 420: the step
arms are skipped, and recorded as skipped, when time runs out). Three parts:

1. correctness: ``sdd`` with the compiled Pallas (Triton) kernel against ``xla``, bf16
   and f32, 5% of the tiles and 8 tiles (the token-split grid); the VJP of
   ``embedded_linear`` with both backends; ``fused_sparse_adamw_step`` (Triton) against
   ``sparse_adamw``'s rule, with every weight outside the tiles bit-identical.
   Tolerance: ``1e-5 * (|dy|^T |x|)`` per tile entry (float32 sums over <= 4096 products
   that are exact for bf16 and IEEE for f32: 4096 * 2^-24 = 2.4e-4 would be the worst
   case, real sums stay far below it; TF32 would miss it by 100x).
2. SDD throughput, bf16, LLaMA-7B shapes (4096 x 4096 and 11008 x 4096), 512 to 4096
   tokens, 5% of the 64x64 tiles: ``sdd`` (auto: Pallas) and ``sdd`` (xla) against the
   dense ``dy^T x`` (cuBLAS through XLA); medians over interleaved rounds after warm-up,
   TFLOP/s and time ratios.
3. one training step, bf16, a LLaMA-7B-shaped model cut to 4 decoder layers (vocab
   32000, hidden 4096, MLP 11008, 32 heads), 1 x 512 tokens, scope ``model.layers``:
   sylva (95% sparse, random masks), LoRA (rank giving the same trainable count), full
   fine-tuning and the floor (no weight gradient); medians and ratios.

``--dry-run`` runs every part on the CPU with tiny shapes (Pallas interpreted), so the
script is exercised without a GPU; it writes to a temporary file unless ``--out`` is given.

Writes experiments/results/gpu.json. Usage:
  python experiments/gpu_check.py            # on a GPU machine
  python experiments/gpu_check.py --dry-run  # anywhere, ~1 minute
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from sylva_jax import ops, optim  # noqa: E402
from sylva_jax.atomic import write_json  # noqa: E402

BS = 64
FULL = dict(shapes=[(4096, 4096), (11008, 4096)], tokens=[512, 1024, 2048, 4096],
            corr_shape=(4096, 4096), corr_tokens=2048, rounds=10,
            model=dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                       num_hidden_layers=4, num_attention_heads=32, num_key_value_heads=32),
            batch=(1, 512))
DRY = dict(shapes=[(256, 256), (512, 256)], tokens=[64, 128], corr_shape=(256, 256),
           corr_tokens=300, rounds=2,
           model=dict(vocab_size=512, hidden_size=256, intermediate_size=512,
                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4),
           batch=(1, 64))


def tiles_at(n_r, n_c, density=None, nnz=None, seed=0):
    k = nnz if nnz is not None else max(1, round(density * n_r * n_c))
    flat = np.sort(np.random.default_rng(seed).choice(n_r * n_c, k, replace=False))
    return jnp.asarray(flat // n_c, jnp.int32), jnp.asarray(flat % n_c, jnp.int32)


def timed(fns: dict, args: dict, rounds: int, warmup: int = 2) -> dict:
    """Median seconds per call of each jitted fn, rounds interleaved after a warm-up."""
    for name, f in fns.items():
        for _ in range(warmup):
            jax.block_until_ready(f(*args[name]))
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, f in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(*args[name]))
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


# ----------------------------------------------------------------------------------------
# 1. correctness
# ----------------------------------------------------------------------------------------

def check_sdd(cfg, dtype, nnz=None) -> dict:
    d_out, d_in = cfg["corr_shape"]
    n = cfg["corr_tokens"]
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    dy = jax.random.normal(k1, (n, d_out), jnp.float32).astype(dtype)
    x = jax.random.normal(k2, (n, d_in), jnp.float32).astype(dtype)
    rows, cols = tiles_at(d_out // BS, d_in // BS, density=0.05, nnz=nnz)
    run = jax.jit(lambda a, b, backend: ops.sdd(a, b, rows, cols, block_size=BS,
                                                backend=backend), static_argnums=2)
    got = run(dy, x, "pallas")
    ref = run(dy, x, "xla")
    scale = run(jnp.abs(dy), jnp.abs(x), "xla")
    err = float(jnp.max(jnp.abs(got - ref) / (scale + 1e-30)))
    return {"what": "sdd pallas vs xla", "dtype": jnp.dtype(dtype).name, "nnz": int(rows.size),
            "tokens": n, "max_err_over_abs_scale": err, "ok": err <= 1e-5}


def check_vjp(cfg, dtype) -> dict:
    d_out, d_in = cfg["corr_shape"]
    n = cfg["corr_tokens"]
    ks = jax.random.split(jax.random.PRNGKey(1), 3)
    w = (jax.random.normal(ks[0], (d_out, d_in)) / np.sqrt(d_in)).astype(dtype)
    x = jax.random.normal(ks[1], (n, d_in)).astype(dtype)
    dy = jax.random.normal(ks[2], (n, d_out)).astype(dtype)
    rows, cols = tiles_at(d_out // BS, d_in // BS, density=0.05)
    tiles = w.reshape(d_out // BS, BS, d_in // BS, BS)[rows, :, cols, :]

    def grads(backend):
        f = lambda x, t: ops.embedded_linear(x, w, t, rows, cols, block_size=BS,  # noqa: E731
                                             backend=backend)
        return jax.jit(lambda x, t, dy: jax.vjp(f, x, t)[1](dy))(x, tiles, dy)

    (dx_p, dt_p), (dx_x, dt_x) = grads("pallas"), grads("xla")
    scale = ops.sdd(jnp.abs(dy), jnp.abs(x), rows, cols, block_size=BS, backend="xla")
    err_t = float(jnp.max(jnp.abs(dt_p.astype(jnp.float32) - dt_x.astype(jnp.float32))
                          / (scale + 1e-30)))
    same_dx = bool(jnp.array_equal(dx_p, dx_x))       # the same dense XLA product
    tol = 1e-5 if dtype == jnp.float32 else 2 ** -8   # bf16 tiles: one rounding each
    return {"what": "embedded_linear vjp pallas vs xla", "dtype": jnp.dtype(dtype).name,
            "max_tile_err_over_abs_scale": err_t, "dx_identical": same_dx,
            "ok": err_t <= tol and same_dx}


def check_fused(cfg, dtype) -> dict:
    d_out, d_in = cfg["corr_shape"]
    ks = jax.random.split(jax.random.PRNGKey(2), 2)
    w = jax.random.normal(ks[0], (d_out, d_in)).astype(dtype)
    rows, cols = tiles_at(d_out // BS, d_in // BS, density=0.05)
    nnz = int(rows.size)
    g = jax.random.normal(ks[1], (nnz, BS, BS), jnp.float32)
    opt = optim.sparse_adamw(1e-2, weight_decay=0.1)
    tiles = w.reshape(d_out // BS, BS, d_in // BS, BS)[rows, :, cols, :]
    state = opt.init(tiles)
    upd, _ = jax.jit(opt.update)(g, state, tiles)          # lr 1e-2, weight decay 0.1
    want = (tiles.astype(jnp.float32) + upd.astype(jnp.float32)).astype(dtype)
    w_new, _, _ = jax.jit(lambda w, g, m, v: optim.fused_sparse_adamw_step(
        w, g, m, v, 0, rows, cols, learning_rate=1e-2, weight_decay=0.1, block_size=BS))(
        w, g, state.mu, state.nu)
    got = w_new.reshape(d_out // BS, BS, d_in // BS, BS)[rows, :, cols, :]
    outside = np.ones((d_out // BS, d_in // BS), bool)
    outside[np.asarray(rows), np.asarray(cols)] = False
    outside = np.kron(outside, np.ones((BS, BS), bool))
    kept = bool(np.array_equal(np.asarray(w_new)[outside], np.asarray(w)[outside]))
    # the same float32 formula up to FMA contraction (a few ulp of |tile| and of the
    # step lr * |u| ~ lr), then one rounding to the weight dtype (one ulp of |want|)
    ulp = float(jnp.finfo(dtype).eps)
    lr = 1e-2
    err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - want.astype(jnp.float32))
                        / (jnp.abs(want.astype(jnp.float32)) + lr)))
    return {"what": "fused adamw vs sparse_adamw", "dtype": jnp.dtype(dtype).name,
            "max_rel_err": err, "outside_tiles_identical": kept,
            "ok": kept and err <= 2 * ulp}


# ----------------------------------------------------------------------------------------
# 2. SDD throughput
# ----------------------------------------------------------------------------------------

def bench_sdd(cfg, dry: bool) -> list:
    out = []
    for d_out, d_in in cfg["shapes"]:
        for n in cfg["tokens"]:
            k1, k2 = jax.random.split(jax.random.PRNGKey(n))
            dy = jax.random.normal(k1, (n, d_out)).astype(jnp.bfloat16)
            x = jax.random.normal(k2, (n, d_in)).astype(jnp.bfloat16)
            rows, cols = tiles_at(d_out // BS, d_in // BS, density=0.05)
            fns = {
                "dense": jax.jit(lambda a, b: jax.lax.dot_general(
                    a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)),
                "sdd_auto": jax.jit(lambda a, b: ops.sdd(
                    a, b, rows, cols, block_size=BS, backend="pallas" if dry else "auto")),
                "sdd_xla": jax.jit(lambda a, b: ops.sdd(a, b, rows, cols, block_size=BS,
                                                        backend="xla")),
            }
            med = timed(fns, {k: (dy, x) for k in fns}, cfg["rounds"])
            flops = {"dense": 2 * n * d_out * d_in}
            flops["sdd_auto"] = flops["sdd_xla"] = 2 * n * BS * BS * int(rows.size)
            out.append({"shape": [d_out, d_in], "tokens": n, "nnz": int(rows.size),
                        "median_s": med,
                        "tflops": {k: flops[k] / med[k] / 1e12 for k in med},
                        "time_ratio_to_dense": {k: med[k] / med["dense"]
                                                for k in ("sdd_auto", "sdd_xla")}})
            print(f"sdd {d_out}x{d_in} N={n}: " + ", ".join(
                f"{k} {v * 1e3:.3f} ms" for k, v in med.items()), flush=True)
    return out


# ----------------------------------------------------------------------------------------
# 3. training step
# ----------------------------------------------------------------------------------------

def bench_step(cfg) -> dict:
    from flax import nnx

    from sylva_jax import tree as tree_lib
    from sylva_jax.adapter import make_adapter
    from sylva_jax.lora import lora_paths
    from sylva_jax.models import llama
    from sylva_jax.train import make_train_step

    mc = llama.LlamaConfig(**cfg["model"], max_position_embeddings=4096,
                           param_dtype="bfloat16", dtype="bfloat16")
    graphdef, abstract = llama.split(
        nnx.eval_shape(lambda: llama.LlamaForCausalLM(mc, rngs=nnx.Rngs(0))))
    leaves, treedef = jax.tree.flatten(abstract)
    keys = jax.random.split(jax.random.PRNGKey(0), len(leaves))
    params = jax.tree.unflatten(treedef, [
        (0.02 * jax.random.normal(k, s.shape, jnp.float32)).astype(s.dtype) if len(s.shape) == 2
        else jnp.ones(s.shape, s.dtype) for k, s in zip(keys, leaves)])
    scope = "model.layers"
    rng = np.random.default_rng(0)
    masks = {}
    flat = tree_lib.flatten(params)
    for p in lora_paths(params, scope):
        n_r, n_c = flat[p].shape[0] // BS, flat[p].shape[1] // BS
        m = np.zeros(n_r * n_c, bool)
        m[rng.choice(n_r * n_c, max(1, round(0.05 * n_r * n_c)), replace=False)] = True
        masks[p] = m.reshape(n_r, n_c)
    adapter = make_adapter(params, masks, block_size=BS)
    per_rank = sum(sum(flat[p].shape) for p in lora_paths(params, scope))
    rank = max(1, round(adapter.num_trainable / per_rank))
    common = dict(learning_rate=1e-4, schedule="constant", warmup_steps=0)
    arms = {"floor": dict(method="floor"), "sylva": dict(method="sylva", adapter=adapter, **common),
            "lora": dict(method="lora", scope=scope, lora_rank=rank, lora_alpha=2 * rank, **common),
            "full": dict(method="full", **common)}
    b, t = cfg["batch"]
    ids = jnp.asarray(rng.integers(0, mc.vocab_size, (b, t)), jnp.int32)
    batch = {"input_ids": ids, "attention_mask": jnp.ones_like(ids), "labels": ids}
    trainers = {k: make_train_step(graphdef, **v) for k, v in arms.items()}
    states = {k: tr.init(jax.tree.map(jnp.copy, params)) for k, tr in trainers.items()}
    times = {k: [] for k in trainers}
    for _ in range(2):                       # warm-up (compiles)
        for k, tr in trainers.items():
            states[k], m = tr.step(states[k], batch)
            jax.block_until_ready(m)
    for _ in range(cfg["rounds"]):
        for k, tr in trainers.items():
            t0 = time.perf_counter()
            states[k], m = tr.step(states[k], batch)
            jax.block_until_ready((states[k], m))
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print("step: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in med.items()), flush=True)
    return {"model": cfg["model"], "batch": [b, t], "scope": scope, "lora_rank": rank,
            "sylva_tiles": adapter.num_tiles, "num_trainable": {k: tr.num_trainable
                                                                for k, tr in trainers.items()},
            "median_s": med, "sylva_over": {k: med["sylva"] / med[k]
                                            for k in ("floor", "lora", "full")}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true",
                    help="tiny shapes on the CPU (Pallas interpreted): exercises every part")
    ap.add_argument("--out", default=None)
    ap.add_argument("--budget_s", type=float, default=420.0)
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    platform = jax.default_backend()
    if not args.dry_run and platform not in ("gpu", "cuda"):
        print(f"gpu_check needs a GPU (default backend: {platform!r}); use --dry-run on a "
              "CPU", file=sys.stderr)
        return 2
    cfg = DRY if args.dry_run else FULL
    out = args.out or (os.path.join(tempfile.mkdtemp(), "gpu.json") if args.dry_run else
                       os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                    "gpu.json"))
    result = {"what": "experiments/gpu_check.py", "dry_run": args.dry_run,
              "device": str(jax.devices()[0].device_kind), "jax": jax.__version__}

    def save():
        result["wall_s"] = round(time.perf_counter() - t_start, 1)
        write_json(out, result)

    checks = []
    for dtype in (jnp.bfloat16, jnp.float32):
        checks += [check_sdd(cfg, dtype), check_sdd(cfg, dtype, nnz=8),
                   check_vjp(cfg, dtype), check_fused(cfg, dtype)]
    for c in checks:
        print(("ok   " if c["ok"] else "FAIL ") + str(c), flush=True)
    result["correctness"] = checks
    save()
    result["sdd"] = bench_sdd(cfg, args.dry_run)
    save()
    if time.perf_counter() - t_start < args.budget_s:
        result["step"] = bench_step(cfg)
    else:
        result["step"] = {"skipped": f"time budget {args.budget_s} s spent"}
    save()
    print(f"wrote {out} in {result['wall_s']} s")
    return 0 if all(c["ok"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
