"""experiments/gpu_check.py's correctness checks, run on the CPU with its --dry-run
shapes (Pallas interpreted), so the GPU script is exercised before a GPU is at hand; and
the roofline counts behind experiments/accel_check.py's estimate."""
import importlib.util
import os

import jax.numpy as jnp
import pytest

from sylva_jax.kernels.sdd_pallas import roofline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location(
        "gpu_check", os.path.join(ROOT, "experiments", "gpu_check.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_gpu_check_correctness_parts_pass_on_cpu(gpu_check, dtype):
    cfg = gpu_check.DRY
    for check in (gpu_check.check_sdd(cfg, dtype), gpu_check.check_sdd(cfg, dtype, nnz=2),
                  gpu_check.check_vjp(cfg, dtype), gpu_check.check_fused(cfg, dtype)):
        assert check["ok"], check


def test_gpu_check_refuses_to_run_for_real_on_cpu(gpu_check, capsys):
    assert gpu_check.main([]) == 2
    assert "--dry-run" in capsys.readouterr().err


def test_roofline_counts():
    # 4096 tokens, one 64x64 tile of a 128 x 128 weight, bf16
    r = roofline(4096, 128, 128, 1, 64, 2)
    assert r["sdd_flops"] == 2 * 4096 * 64 * 64
    assert r["sdd_bytes"] == 2 * 4096 * 64 * 2 + 64 * 64 * 4
    assert r["dense_flops"] == 2 * 4096 * 128 * 128
    assert r["dense_bytes"] == 4096 * 256 * 2 + 128 * 128 * 2
    assert r["density"] == 0.25
    # two tiles in the same block row and column: reuse halves the operand reads
    r2 = roofline(4096, 128, 128, 2, 64, 2, unique_rows=1, unique_cols=1)
    assert r2["sdd_bytes_min"] == 2 * 4096 * 64 * 2 + 2 * 64 * 64 * 4 < r2["sdd_bytes"]
