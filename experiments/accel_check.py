"""Deviceless compile check: Sylva's kernels compiled for GPUs and TPUs from a CPU host.

For every target (H100 sm_90, A100 sm_80, L4 sm_89 through XLA's GPU compiler and ptxas;
TPU v5e and v6e through libtpu) and dtype (bf16, f32) this *compiles* (not only lowers):

  sdd                 ops.sdd(backend="auto"), 2048 tokens, 4096 x 4096, 5% of 64x64 tiles
  sdd_split           the same with 16 tiles (fewer than SMs: the grid splits the tokens)
  embedded_linear_vjp the VJP of ops.embedded_linear (dense dx, SDD tile gradients)
  fused_adamw         optim.fused_sparse_adamw_step on a donated 4096 x 4096 weight
  train_step          make_train_step(method="sylva") of a 2-layer LLaMA (hidden 128)

and asserts the kernel chosen for that platform is in the compiled module: on a GPU the
Triton custom call of the named Pallas kernel (``sylva_sdd``, ``sylva_fused_adamw``), on
a TPU plain XLA with no Mosaic kernel and no interpreter loop. GPU cells report registers
(``ptxas -v`` on XLA's PTX dump) and shared memory (XLA's thunk sequence); TPU cells the
compiled temporary memory. Extra cells: ``sdd`` over 2^19 tokens (operands over 2^32
bytes: 64-bit offsets) on H100; ``backend="pallas"`` on a TPU must be refused
(``KernelRefused``); and a negative control, an SDD kernel asking for 384 KiB of shared
memory on an L4, must fail to compile. Any other outcome exits non-zero.

Run it with the project's python and the accelerator plugins on ``PYTHONPATH`` only
(``make accel-check`` builds that directory once, outside the clone); the platform stays
``cpu``. Writes ``experiments/results/accel_compile.json``.

Usage: python experiments/accel_check.py [--targets h100 a100 l4 v5e v6e] [--out PATH]
       python experiments/accel_check.py --markdown experiments/results/accel_compile.json
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

DUMP = tempfile.mkdtemp(prefix="sylva_accel_dump_")
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + f" --xla_dump_to={DUMP} --xla_dump_hlo_module_re=cell_gpu_.*")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

from sylva_jax import ops, optim  # noqa: E402
from sylva_jax.atomic import write_json  # noqa: E402
from sylva_jax.kernels.platform import KernelRefused  # noqa: E402
from sylva_jax.kernels.sdd_pallas import roofline, sdd_pallas  # noqa: E402

BS = 64

# GpuTargetConfigProto fields of each GPU, from the vendors' published specifications.
GPUS = {
    "h100": dict(name="NVIDIA H100 80GB HBM3", cc=(9, 0), arch="sm_90a", sms=132, fpus=128,
                 smem_core=233472, smem_optin=232448, threads_core=2048, bw=3352e9,
                 l2=50 * 2**20, ghz=1.98, mem=80 * 2**30, peak_bf16=989e12, peak_f32=67e12),
    "a100": dict(name="NVIDIA A100-SXM4-80GB", cc=(8, 0), arch="sm_80", sms=108, fpus=64,
                 smem_core=167936, smem_optin=166912, threads_core=2048, bw=2039e9,
                 l2=40 * 2**20, ghz=1.41, mem=80 * 2**30, peak_bf16=312e12, peak_f32=19.5e12),
    "l4": dict(name="NVIDIA L4", cc=(8, 9), arch="sm_89", sms=58, fpus=128,
               smem_core=102400, smem_optin=101376, threads_core=1536, bw=300e9,
               l2=48 * 2**20, ghz=2.04, mem=24 * 2**30, peak_bf16=121e12, peak_f32=30e12),
}
TPUS = {
    "v5e": dict(topology="v5e:1x1", bw=819e9, peak_bf16=197e12, peak_f32=197e12 / 6),
    "v6e": dict(topology="v6e:1x1", bw=1640e9, peak_bf16=918e12, peak_f32=918e12 / 6),
}
KERNEL = {"sdd": "sylva_sdd", "sdd_split": "sylva_sdd", "embedded_linear_vjp": "sylva_sdd",
          "fused_adamw": "sylva_fused_adamw", "train_step": "sylva_sdd",
          "sdd_4gib": "sylva_sdd"}


def gpu_target_config(g: dict) -> str:
    """GpuTargetConfigProto in text form for ``get_topology_desc(target_config=...)``."""
    major, minor = g["cc"]
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {g['smem_core']}
  threads_per_core_limit: {g['threads_core']}
  core_count: {g['sms']}
  fpus_per_core: {g['fpus']}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(g['bw'])}
  l2_cache_size: {g['l2']}
  clock_rate_ghz: {g['ghz']}
  device_memory_size: {g['mem']}
  shared_memory_per_block_optin: {g['smem_optin']}
  cuda_compute_capability {{ major: {major} minor: {minor} }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
device_description_str: "{g['name']}"
"""


def device_of(target: str):
    if target in GPUS:
        topo = topologies.get_topology_desc(platform="cuda", topology_name=target,
                                            target_config=gpu_target_config(GPUS[target]),
                                            topology="1x1x1")
    else:
        topo = topologies.get_topology_desc(topology_name=TPUS[target]["topology"],
                                            platform="tpu", chips_per_host_bounds=(1, 1, 1))
    return topo.devices[0]


def tile_coords(n_r: int, n_c: int, nnz: int, seed: int = 0):
    flat = np.sort(np.random.default_rng(seed).choice(n_r * n_c, nnz, replace=False))
    return (flat // n_c).astype(np.int32), (flat % n_c).astype(np.int32)


# ----------------------------------------------------------------------------------------
# the compiled programs: (function, abstract args, donate_argnums)
# ----------------------------------------------------------------------------------------

def prog_sdd(dtype, n=2048, d=4096, nnz=205):
    f = lambda dy, x, r, c: ops.sdd(dy, x, r, c, block_size=BS)  # noqa: E731
    return f, [((n, d), dtype), ((n, d), dtype), ((nnz,), jnp.int32), ((nnz,), jnp.int32)], ()


def prog_vjp(dtype, n=2048, d=4096, nnz=205):
    rows, cols = tile_coords(d // BS, d // BS, nnz)

    def f(x, w, tiles, dy):
        y, pull = jax.vjp(lambda x, t: ops.embedded_linear(x, w, t, rows, cols, block_size=BS),
                          x, tiles)
        return y, pull(dy)

    return f, [((n, d), dtype), ((d, d), dtype), ((nnz, BS, BS), dtype), ((n, d), dtype)], ()


def prog_adamw(dtype, d=4096, nnz=205):
    rows, cols = tile_coords(d // BS, d // BS, nnz)

    def f(w, g, mu, nu, count):
        return optim.fused_sparse_adamw_step(w, g, mu, nu, count, rows, cols,
                                             learning_rate=2e-4, block_size=BS)

    t = ((nnz, BS, BS), jnp.float32)
    return f, [((d, d), dtype), t, t, t, ((), jnp.int32)], (0, 2, 3)


def prog_train(dtype):
    from flax import nnx

    import sylva_jax
    from sylva_jax.models import llama
    from sylva_jax.train import make_train_step

    name = "bfloat16" if dtype == jnp.bfloat16 else "float32"
    cfg = llama.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256,
                            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                            max_position_embeddings=128, param_dtype=name, dtype=name)
    graphdef, abstract = llama.split(
        nnx.eval_shape(lambda: llama.LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))))
    params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), abstract)
    masks = {p: np.eye(*np.array(np.shape(w)) // BS, dtype=bool)
             for p, w in sylva_jax.tree.flatten(params).items() if "self_attn" in p}
    adapter = sylva_jax.make_adapter(params, masks, block_size=BS)
    trainer = make_train_step(graphdef, method="sylva", adapter=adapter, warmup_steps=1,
                              total_steps=10)
    state = jax.eval_shape(trainer.init, params)
    batch = {k: jax.ShapeDtypeStruct((2, 64), jnp.int32)
             for k in ("input_ids", "attention_mask", "labels")}
    return trainer.step_fn, (state, batch), "pytree"    # donation: step_fn's own


PROGRAMS = {"sdd": prog_sdd, "sdd_split": lambda dt: prog_sdd(dt, n=4096, nnz=16),
            "embedded_linear_vjp": prog_vjp, "fused_adamw": prog_adamw,
            "train_step": prog_train}


def _abstract(spec, sharding):
    if spec == "pytree":
        return None
    return [jax.ShapeDtypeStruct(s, dt, sharding=sharding) for s, dt in spec]


def compile_cell(fname: str, prog, device):
    """Lower and compile ``prog`` for ``device``; returns (compiled, lowered_text)."""
    f, spec, donate = prog
    mesh = Mesh(np.array([device]), ("d",))
    sharding = NamedSharding(mesh, PartitionSpec())
    if donate == "pytree":       # a jitted step from make_train_step, pytree arguments
        args = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                            spec)
        donate = ()
    else:
        args = _abstract(spec, sharding)
    g = lambda *a: f(*a)  # noqa: E731
    g.__name__ = fname       # names the XLA module, hence the dump files
    jitted = jax.jit(g, donate_argnums=donate)
    ctx = jax.set_mesh(mesh) if hasattr(jax, "set_mesh") else mesh
    with ctx:
        lowered = jitted.lower(*args)
        return lowered.compile(), lowered.as_text(debug_info=True)


# ----------------------------------------------------------------------------------------
# what the compiled module holds
# ----------------------------------------------------------------------------------------

_THUNK = re.compile(r"kCustomKernel.*?(sylva_\w+) grid: \[([^\]]*)\] threads: \[([^\]]*)\]"
                    r"\s+shared_memory: (\d+)")


def gpu_kernel_info(fname: str, arch: str) -> dict:
    """Per Pallas kernel of module ``jit_<fname>``: grid, threads, shared memory (XLA's
    thunk sequence) and registers / spills (``ptxas -v`` on the dumped PTX)."""
    info: dict[str, dict] = {}
    for path in glob.glob(os.path.join(DUMP, f"*jit_{fname}.*thunk_sequence.txt")):
        for m in _THUNK.finditer(open(path).read()):
            info.setdefault(m.group(1), {}).update(
                grid=m.group(2), threads=m.group(3), shared_memory_bytes=int(m.group(4)))
    ptxas = shutil.which("ptxas")
    for path in glob.glob(os.path.join(DUMP, f"*jit_{fname}.*.ptx")) if ptxas else []:
        res = subprocess.run([ptxas, "-v", "--gpu-name", arch, path, "-o", os.devnull],
                             capture_output=True, text=True)
        current = None
        for line in res.stderr.splitlines():
            m = re.search(r"entry function '(\w+)'", line)
            if m:
                current = m.group(1)
            m = re.search(r"Used (\d+) registers", line)
            if m and current in info:
                info[current]["registers"] = int(m.group(1))
            m = re.search(r"(\d+) bytes spill stores", line)
            if m and current in info:
                info[current]["spill_store_bytes"] = int(m.group(1))
    return info


def has_triton_call(hlo: str, kernel: str) -> bool:
    return any("custom-call" in ln and "triton" in ln and f'name = "{kernel}"' in ln
               for ln in hlo.splitlines())


def tpu_mosaic_calls(hlo: str) -> int:
    return sum("tpu_custom_call" in ln for ln in hlo.splitlines() if "custom-call" in ln)


def run_cell(target: str, kernel: str, dtype, device) -> dict:
    dname = "bf16" if dtype == jnp.bfloat16 else "f32"
    gpu = target in GPUS
    fname = f"cell_{'gpu' if gpu else 'tpu'}_{target}_{kernel}_{dname}"
    cell = {"target": target, "kernel": kernel, "dtype": dname}
    t0 = time.perf_counter()
    try:
        prog = (prog_sdd(dtype, n=2**19) if kernel == "sdd_4gib" else PROGRAMS[kernel](dtype))
        compiled, lowered = compile_cell(fname, prog, device)
    except Exception as e:  # noqa: BLE001 - every failure is a failed cell, reported
        cell.update(compiled=False, ok=False, error=f"{type(e).__name__}: {str(e)[:400]}")
        return cell
    hlo = compiled.as_text()
    cell["compile_s"] = round(time.perf_counter() - t0, 2)
    cell["compiled"] = True
    mem = compiled.memory_analysis()
    if mem is not None:
        cell["temp_bytes"] = int(getattr(mem, "temp_size_in_bytes", 0))
    if gpu:
        want = KERNEL[kernel]
        cell["backend"] = "pallas/triton"
        cell["custom_call"] = has_triton_call(hlo, want)
        kinfo = gpu_kernel_info(fname, GPUS[target]["arch"])
        cell["kernels"] = kinfo
        smem = [k.get("shared_memory_bytes", 0) for k in kinfo.values()]
        cell["ok"] = bool(cell["custom_call"] and want in kinfo
                          and max(smem, default=0) <= GPUS[target]["smem_optin"])
    else:
        cell["backend"] = "xla"
        cell["mosaic_calls"] = tpu_mosaic_calls(hlo)
        # "auto" / interpret=None choose XLA on a TPU: no Mosaic kernel, no interpreter
        # (an interpreted pallas_call leaves its name in the locations of the program)
        cell["custom_call"] = False
        cell["interpreter"] = "pallas_call" in lowered
        cell["ok"] = cell["mosaic_calls"] == 0 and not cell["interpreter"]
    return cell


def negative_control(device) -> dict:
    """An SDD kernel with 256-token f32 chunks and 4 pipeline stages (Triton asks for
    384 KiB of shared memory), compiled for an L4 (99 KiB per block): it must be rejected."""
    f = lambda dy, x, r, c: sdd_pallas(dy, x, r, c, block_size=BS, block_k=256,  # noqa: E731
                                       num_stages=4, splits=1)
    prog = (f, [((4096, 4096), jnp.float32)] * 2 + [((205,), jnp.int32)] * 2, ())
    cell = {"target": "l4", "kernel": "negative_control_smem_overflow", "dtype": "f32"}
    try:
        compile_cell("cell_gpu_l4_negative_control_f32", prog, device)
        cell.update(compiled=True, ok=False, error="compiled, but it must not fit an L4")
    except Exception as e:  # noqa: BLE001
        cell.update(compiled=False, ok=True, rejected_with=f"{type(e).__name__}: {str(e)[:300]}")
    return cell


def tpu_pallas_refused(target: str, device) -> dict:
    """``sdd(backend="pallas")`` lowered for a TPU must stop with KernelRefused."""
    f = lambda dy, x, r, c: ops.sdd(dy, x, r, c, block_size=BS, backend="pallas")  # noqa: E731
    cell = {"target": target, "kernel": "sdd_backend_pallas_refused", "dtype": "bf16"}
    try:
        compile_cell(f"cell_tpu_{target}_refused", (f, prog_sdd(jnp.bfloat16)[1], ()), device)
        cell.update(compiled=True, ok=False, error="backend='pallas' compiled on a TPU")
    except KernelRefused as e:
        cell.update(compiled=False, ok=True, refused_with=str(e)[:200])
    except Exception as e:  # noqa: BLE001
        cell.update(compiled=False, ok=False, error=f"{type(e).__name__}: {str(e)[:300]}")
    return cell


def roofline_table() -> dict:
    """SDD at 5% density (205 of the 4096 tiles of a 4096 x 4096 weight, at random) against
    the dense ``dy^T x``, bf16, per target: each time is max(FLOPs / peak, bytes /
    bandwidth); the SDD bytes between no L2 reuse (every tile reads its blocks) and full
    reuse (each distinct block read once)."""
    rows, cols = tile_coords(64, 64, 205)
    out = {}
    for n in (512, 4096):
        r = roofline(n, 4096, 4096, 205, BS, 2, unique_rows=len(set(rows.tolist())),
                     unique_cols=len(set(cols.tolist())))
        for name, hw in {**GPUS, **TPUS}.items():
            peak, bw = hw["peak_bf16"], hw["bw"]
            t_dense = max(r["dense_flops"] / peak, r["dense_bytes"] / bw)
            t_hi = max(r["sdd_flops"] / peak, r["sdd_bytes"] / bw)
            t_lo = max(r["sdd_flops"] / peak, r["sdd_bytes_min"] / bw)
            out[f"{name}_N{n}"] = {
                **{k: r[k] for k in ("sdd_flops", "sdd_bytes", "sdd_bytes_min",
                                     "dense_flops", "dense_bytes")},
                "dense_us": round(t_dense * 1e6, 2),
                "sdd_us_no_reuse": round(t_hi * 1e6, 2), "sdd_us_full_reuse": round(t_lo * 1e6, 2),
                "expected_ratio": [round(t_lo / t_dense, 3), round(t_hi / t_dense, 3)],
                "flop_ratio": round(r["sdd_flops"] / r["dense_flops"], 4)}
    return out


def markdown(result: dict) -> str:
    """The README tables from a result file: compile cells, then the roofline."""
    lines = ["| target | kernel | bf16 | f32 |", "|---|---|---|---|"]
    by = {}
    for c in result["cells"]:
        by.setdefault((c["target"], c["kernel"]), {})[c.get("dtype")] = c

    def fmt(c):
        if c is None:
            return "-"
        if not c.get("compiled"):
            word = "rejected (expected)" if c.get("ok") else "FAILED"
            return "refused (expected)" if "refused_with" in c else word
        if c.get("backend") == "xla":
            return f"XLA, temp {c.get('temp_bytes', 0) / 2**20:.1f} MiB"
        k = next(iter(c.get("kernels", {}).values()), {})
        return (f"Triton call, {k.get('registers', '?')} regs, "
                f"{k.get('shared_memory_bytes', 0) // 1024} KiB smem")

    for (target, kernel), d in by.items():
        lines.append(f"| {target} | {kernel} | {fmt(d.get('bf16'))} | {fmt(d.get('f32'))} |")
    lines += ["", "| target, tokens | dense dy^T x | SDD 5% (full L2 reuse .. none) | "
              "expected SDD / dense |", "|---|---|---|---|"]
    for key, r in result["roofline_sdd_5pct_bf16"].items():
        lo, hi = r["expected_ratio"]
        lines.append(f"| {key.replace('_N', ', N=')} | {r['dense_us']} us | "
                     f"{r['sdd_us_full_reuse']} .. {r['sdd_us_no_reuse']} us | {lo} .. {hi} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--targets", nargs="+", default=[*GPUS, *TPUS])
    ap.add_argument("--kernels", nargs="+", default=list(PROGRAMS))
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  "results", "accel_compile.json"))
    ap.add_argument("--markdown", metavar="RESULT_JSON",
                    help="print the README tables of an earlier result file and exit")
    args = ap.parse_args(argv)
    if args.markdown:
        import json

        with open(args.markdown) as f:
            print(markdown(json.load(f)))
        return 0
    cells = []
    t_start = time.perf_counter()
    for target in args.targets:
        try:
            device = device_of(target)
        except Exception as e:  # noqa: BLE001
            cells.append({"target": target, "kernel": "topology", "ok": False,
                          "error": f"{type(e).__name__}: {str(e)[:300]}"})
            continue
        todo = [(k, dt) for k in args.kernels for dt in (jnp.bfloat16, jnp.float32)]
        if target == "h100":
            todo.append(("sdd_4gib", jnp.bfloat16))
        for kernel, dtype in todo:
            cells.append(run_cell(target, kernel, dtype, device))
            _print(cells[-1])
        if target == "l4":
            cells.append(negative_control(device))
            _print(cells[-1])
        if target in TPUS:
            cells.append(tpu_pallas_refused(target, device))
            _print(cells[-1])
    failed = [c for c in cells if not c.get("ok")]
    result = {
        "what": "deviceless compile of Sylva's kernels (experiments/accel_check.py)",
        "jax": jax.__version__, "jaxlib": jax.lib.__version__ if hasattr(jax, "lib") else None,
        "ptxas": _ptxas_version(), "wall_s": round(time.perf_counter() - t_start, 1),
        "ok": not failed, "failed": [f"{c['target']}/{c['kernel']}/{c.get('dtype')}" for c in failed],
        "cells": cells, "roofline_sdd_5pct_bf16": roofline_table()}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    write_json(args.out, result)
    shutil.rmtree(DUMP, ignore_errors=True)
    print(f"wrote {args.out}: {len(cells) - len(failed)}/{len(cells)} cells ok "
          f"in {result['wall_s']} s")
    if failed:
        print("FAILED: " + ", ".join(result["failed"]), file=sys.stderr)
        return 1
    return 0


def _print(c: dict) -> None:
    k = next(iter(c.get("kernels", {}).values()), {})
    extra = (f"regs {k.get('registers')} smem {k.get('shared_memory_bytes')}" if k
             else f"temp {c.get('temp_bytes')}" if c.get("compiled") else
             (c.get("rejected_with") or c.get("refused_with") or c.get("error", ""))[:120])
    print(f"{'ok  ' if c.get('ok') else 'FAIL'} {c['target']:5s} {c['kernel']:28s} "
          f"{c.get('dtype', ''):4s} compiled={c.get('compiled')} {c.get('backend', '')} {extra}",
          flush=True)


def _ptxas_version():
    p = shutil.which("ptxas")
    if not p:
        return None
    out = subprocess.run([p, "--version"], capture_output=True, text=True).stdout
    return out.strip().splitlines()[-1] if out else None


if __name__ == "__main__":
    sys.exit(main())
