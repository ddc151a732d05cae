"""Compiled per-device memory of the training step on simulated CPU meshes.

For the tiny test LLaMA and a SmolLM2-135M-shaped LLaMA (random weights: only shapes matter,
nothing is executed), for each mesh data x fsdp in {1x1, 8x1, 4x2, 2x4, 1x8} and each method,
lower and compile the sharded step (``sylva_jax.sharding.sharded_step``) on abstract inputs
and record ``memory_analysis()`` (per device: arguments, outputs, temporaries) plus the
per-device bytes of the weights under the sharding rules. Shows per-device weight memory
falling as ``fsdp`` grows.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python experiments/bench_sharding.py

Writes experiments/results/sharding.json.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import time

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


from sylva_jax import sharding  # noqa: E402
from sylva_jax import tree as tree_lib  # noqa: E402
from sylva_jax.adapter import make_adapter  # noqa: E402
from sylva_jax.models import llama  # noqa: E402
from sylva_jax.train import make_train_step  # noqa: E402

MESHES = [(1, 1), (8, 1), (4, 2), (2, 4), (1, 8)]

MODELS = {
    "tiny": dict(cfg=llama.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                       num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, max_position_embeddings=64),
                 bs=16, batch=8, seq=16, methods=("sylva", "lora", "full")),
    # SmolLM2-135M shapes (config.json of HuggingFaceTB/SmolLM2-135M-Instruct) with 4 of its
    # 30 decoder layers: one 30-layer compile takes ~150 s on the shared 2-core CPU, and every
    # per-layer quantity scales linearly (the 30-layer weight bytes are computed from the
    # rules without compiling: "weights_per_device_bytes_30_layers")
    "smollm2-135m-4layers": dict(cfg=llama.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                               num_hidden_layers=4, num_attention_heads=9,
                                               num_key_value_heads=3, max_position_embeddings=2048,
                                               tie_word_embeddings=True, rope_theta=100000.0),
                         bs=64, batch=8, seq=128, methods=("sylva", "lora", "full")),
}


def abstract_params(cfg):
    from flax import nnx

    _, abstract = llama.split(nnx.eval_shape(lambda: llama.LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))))
    return nnx.eval_shape(lambda: llama.LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))), abstract


def weight_bytes_per_device(state_abs) -> int:
    total = 0
    for x in jax.tree.leaves(state_abs.params):
        shard = x.sharding.shard_shape(x.shape)
        total += int(np.prod(shard)) * jnp.dtype(x.dtype).itemsize
    return total


def main():
    assert len(jax.devices()) >= 8, "run with 8 (simulated) devices"
    out = {"device": str(jax.devices()[0].platform), "jax": jax.__version__,
           "host": platform.node(), "note": "per-device bytes from Compiled.memory_analysis(); "
           "weights_per_device from the sharding rules; nothing executed", "models": {}}
    for name, spec in MODELS.items():
        cfg, bs = spec["cfg"], spec["bs"]
        model_abs, params_abs = abstract_params(cfg)
        graphdef, _ = llama.split(model_abs)
        rng = np.random.default_rng(0)
        masks = {k: rng.random((w.shape[0] // bs, w.shape[1] // bs)) < 0.05  # ~5% of tiles
                 for k, w in tree_lib.flatten(params_abs).items()
                 if k.startswith("model.layers") and len(w.shape) == 2}
        adapter = make_adapter(params_abs, masks, block_size=bs)
        b, t = spec["batch"], spec["seq"]
        rows = []
        for method in spec["methods"]:
            tr = make_train_step(graphdef, method=method, adapter=adapter, learning_rate=1e-4,
                                 schedule="constant", warmup_steps=0, scope="self_attn", lora_rank=16)
            state_abs = jax.eval_shape(lambda p: tr.init(p), params_abs)
            for data, fsdp in MESHES:
                mesh = sharding.make_mesh(data, fsdp)
                step, st = sharding.sharded_step(tr, mesh, state_abs, block_size=bs)
                batch = {k: jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=step.batch_sharding)
                         for k in ("input_ids", "attention_mask", "labels")}
                t0 = time.perf_counter()
                compiled = step.jitted.lower(st, batch).compile()
                row = {"method": method, "mesh": f"{data}x{fsdp}", "data": data, "fsdp": fsdp,
                       "weights_per_device_bytes": weight_bytes_per_device(st),
                       "compile_s": round(time.perf_counter() - t0, 2)}
                row.update(sharding.memory_per_device(compiled))
                rows.append(row)
                print(name, row, flush=True)
        extra = {}
        if name.startswith("smollm2"):
            full_cfg = dataclasses.replace(cfg, num_hidden_layers=30)
            _, full_abs = abstract_params(full_cfg)
            extra["weights_per_device_bytes_30_layers"] = {
                f"{d}x{f}": weight_bytes_per_device(type("S", (), {"params": jax.tree.map(
                    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), full_abs,
                    sharding.param_shardings(full_abs, sharding.make_mesh(d, f), block_size=bs))})())
                for d, f in MESHES}
        out["models"][name] = {**extra, "block_size": bs, "batch": [b, t], "tile_density": 0.05,
                               "num_params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(params_abs))),
                               "rows": rows}
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "sharding.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
