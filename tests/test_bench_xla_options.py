"""experiments/bench_xla_options.py runs end to end on a 1-layer model: every option set
compiles the same step, the ratios are the medians' ratios, and a set that only changes
the schedule gives the default's losses."""
from __future__ import annotations

import json
import os
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_xla_options_smoke(tmp_path):
    out = tmp_path / "xla.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, "experiments", "bench_xla_options.py"), "--layers", "1",
         "--tokens", "64", "--arms", "sylva", "--sets", "default", "sequential_scheduler", "no_ynn",
         "--rounds", "1", "--warmup", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=os.path.join(REPO_ROOT, "experiments"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    sets = json.loads(out.read_text())["arms"]["sylva"]
    assert set(sets) == {"default", "sequential_scheduler", "no_ynn"}
    base = sets["default"]["median_s"]
    for name, r in sets.items():
        assert r["median_s"] > 0
        assert abs(r["over_default"] - r["median_s"] / base) < 1e-9
    # the scheduler reorders, it does not change the arithmetic
    assert sets["sequential_scheduler"]["max_abs_loss_diff_vs_default"] < 1e-5
    # Eigen's dots instead of YNNPACK's: the same loss within float32 rounding
    assert sets["no_ynn"]["max_abs_loss_diff_vs_default"] < 1e-3
