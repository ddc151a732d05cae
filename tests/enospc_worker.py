"""Run inside a small tmpfs (see tests/test_inputs.py): a checkpoint that does not fit."""
import json
import sys

import jax
import jax.numpy as jnp

from sylva_jax.checkpoint import CheckpointWriteError, RunCheckpoints

directory = sys.argv[1]
small = {"w": jnp.arange(64 * 64, dtype=jnp.float32).reshape(64, 64)}
ck = RunCheckpoints(directory, keep=3)
ck.save(1, small, {"ok": 1})
ck.wait()
big = {"w": jax.random.normal(jax.random.key(0), (1024, 1024))}  # 4 MiB, incompressible
out = {}
try:
    ck.save(2, big, {"ok": 2})
    ck.wait()
except CheckpointWriteError as e:
    out["error"] = str(e)
fresh = RunCheckpoints(directory)
out["latest"] = fresh.latest_step
state, extra = fresh.restore_latest(small)
out["restored_equal"] = bool(jnp.array_equal(state["w"], small["w"]))
out["extra"] = extra
print("RESULT " + json.dumps(out), flush=True)
