"""Pre-processing and training on a device mesh equal the single-device run.

The multi-device checks run in subprocesses (tests/sharding_worker.py): this pytest process
already started jax with one CPU device, and the device count cannot change afterwards.

Tolerances (float32; the mesh changes only the order of the cross-device sums):
- factors, mean gradients: relative 1e-5. Sums of 16 rank-1 terms and the Brand updates in a
  different order: float32 rounding 6e-8 per operation over a few dozen operations (measured
  2e-6);
- tile scores: relative 5e-3: they pass through diag((F + 1e-2 * mean diag I)^-1), condition
  number up to ~1e2, which amplifies the 2e-6 factor differences (measured 4e-4); and the
  score error must be below the relative gap at each layer's top-k boundary, so that mask
  equality is implied by the scores and not luck;
- losses: relative 1e-6 (sums over 8x16 tokens, measured 1e-7);
- weights after two AdamW steps at lr = 1e-3: absolute 2e-2 * lr. AdamW's step
  lr * m / (sqrt(v) + eps) has slope up to lr / eps in g where |g| ~ eps = 1e-6, so float32
  rounding of small gradients moves single entries by a small fraction of lr (measured
  6e-3 * lr for full fine-tuning); any real fault (a shard's gradient missing, rows fed
  twice, a tile updated on the wrong shard) moves them by O(lr).
"""
from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import numpy as np
import procs
import pytest

from sylva_jax import sharding

WORKER = Path(__file__).with_name("sharding_worker.py")
LR = 1e-3


def _env(devices: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env.pop("JAX_NUM_CPU_DEVICES", None)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    """Starts the 8-device worker and the two jax.distributed processes at once (they
    overlap their compile and wait times) and returns ``{"mesh": report, "dist": [r0, r1]}``."""
    tmp = tmp_path_factory.mktemp("sharding")
    coord = f"127.0.0.1:{_free_port()}"
    mesh_out = tmp / "mesh.json"
    dist_out = [tmp / f"p{i}.json" for i in range(2)]
    cmds = [([sys.executable, str(WORKER), "mesh", str(mesh_out)], _env(8))] + [
        ([sys.executable, str(WORKER), "dist", str(dist_out[i]), coord, "2", str(i)], _env(2))
        for i in range(2)]
    rcs, logs = procs.run_together(cmds, tmp / "logs", timeout=900)
    result = {"mesh": None, "dist": None, "logs": logs, "returncodes": rcs}
    if rcs[0] == 0:
        result["mesh"] = json.loads(mesh_out.read_text())
    if all(rc == 0 for rc in rcs[1:]):
        result["dist"] = [json.loads(o.read_text()) for o in dist_out]
    return result


@pytest.fixture(scope="module")
def mesh_report(workers):
    assert workers["mesh"] is not None, procs.report(workers["returncodes"][:1], workers["logs"][:1], 4000)
    return workers["mesh"]


@pytest.mark.parametrize("mesh", ["8x1", "4x2", "1x8"])
def test_preprocess_and_masks_on_mesh(mesh_report, mesh):
    r = mesh_report["meshes"][mesh]
    assert r["factor_rel_err"] < 1e-5
    assert r["grad_mean_rel_err"] < 1e-5
    assert r["score_rel_err"] < 5e-3
    assert r["score_rel_err"] < r["min_topk_gap"]
    assert r["masks_equal"]


@pytest.mark.parametrize("mesh,method", [("8x1", "sylva"), ("4x2", "sylva"), ("1x8", "sylva"),
                                         ("4x2", "lora"), ("1x8", "full")])
def test_training_on_mesh(mesh_report, mesh, method):
    r = mesh_report["meshes"][mesh][method]
    np.testing.assert_allclose(r["losses"], r["ref_losses"], rtol=1e-6)
    assert r["weight_abs_err"] < 2e-2 * LR
    assert r["extras_abs_err"] < 2e-2 * LR
    if method != "lora":  # the weights did train: the comparison is not between two no-ops
        assert r["update_max"] > 0.5 * LR
    else:
        assert r["update_max"] == 0.0  # LoRA leaves W frozen
    if mesh != "8x1":  # FSDP: the weights really are split, tile-aligned (64 rows / 16)
        assert "fsdp" in r["q_proj_spec"]


def test_two_processes_jax_distributed(workers):
    """Two processes x 2 CPU devices (gloo), a data=2 x fsdp=2 mesh across them, each process
    feeding only its own rows: identical final weights on both, equal to one device. Then
    the run's checkpoint pattern on that sharded state: after each of 6 "evaluations" the
    best and the resume checkpoint of the same step, saved asynchronously back to back (two
    Orbax managers with same-step barriers in flight at once), and the best one restored."""
    assert workers["dist"] is not None, procs.report(workers["returncodes"][1:], workers["logs"][1:])
    r0, r1 = workers["dist"]
    assert r0["rows"] == [0, 4] and r1["rows"] == [4, 8]  # each host read its own half
    assert r0["digest"] == r1["digest"]  # bit-identical weights on both processes
    for r in (r0, r1):
        np.testing.assert_allclose(r["losses"], r["ref_losses"], rtol=1e-6)
        assert r["weight_abs_err"] < 2e-2 * LR
        assert r["update_max"] > 0.5 * LR
        assert r["ckpt_best_step"] == 3 and r["ckpt_latest_step"] == 6
        assert r["ckpt_restored_max_err"] == 0.0  # the best step's weights, bit for bit


# ---- rules (in-process, no devices needed) -------------------------------------------


def test_weight_spec_tile_aligned_larger_dim():
    P = sharding.P
    assert sharding.weight_spec((256, 64), 4, 16) == P("fsdp", None)     # larger dim
    assert sharding.weight_spec((64, 256), 4, 16) == P(None, "fsdp")
    # 96 rows: 96 % (4*16) != 0, so the tile-aligned split of the 64 columns wins
    assert sharding.weight_spec((96, 64), 4, 16) == P(None, "fsdp")
    # no tile-aligned split anywhere: a plain split of the larger dim (tiles straddle)
    assert sharding.weight_spec((96, 40), 4, 16) == P("fsdp", None)
    assert sharding.weight_spec((30, 7), 4, 16) == P()                    # nothing divides
    assert sharding.weight_spec((64,), 4, 16) == P()                      # norms replicated
    assert sharding.weight_spec((256, 64), 1, 16) == P()
    assert sharding.tile_spec((8, 16, 16), 4) == P("fsdp")
    assert sharding.tile_spec((6, 16, 16), 4) == P()


def test_mesh_errors_are_clear():
    with pytest.raises(ValueError, match="xla_force_host_platform_device_count"):
        sharding.make_mesh(4, 2)  # one device in this process
    mesh = sharding.make_mesh(1, 1)
    assert mesh.axis_names == ("data", "fsdp")
    with pytest.raises(ValueError, match="multiple of"):
        sharding.process_batch_slice(3, _FakeMesh())  # 2-way batch split, 3 rows


class _FakeMesh:
    axis_names = ("data", "fsdp")
    devices = np.empty((2, 1))


def test_initialize_distributed_needs_all_three(monkeypatch):
    for k in ("SYLVA_COORDINATOR", "SYLVA_NUM_PROCESSES", "SYLVA_PROCESS_ID",
              "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(k, raising=False)
    assert sharding.initialize_distributed() is False  # single host: nothing to do
    with pytest.raises(ValueError, match="--process_id"):
        sharding.initialize_distributed("127.0.0.1:1234", 2)
    monkeypatch.setenv("SYLVA_PROCESS_ID", "5")
    with pytest.raises(ValueError, match="process_id must lie"):
        sharding.initialize_distributed("127.0.0.1:1234", 2)
