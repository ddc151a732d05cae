"""experiments/bench_dots.py runs end to end at a few tokens: every arm computes the same
product (the weight-gradient rewrites included), the ratios are the medians' ratios, and the step totals add up the products."""
from __future__ import annotations

import json
import os
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_dots_smoke(tmp_path):
    out = tmp_path / "dots.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, "experiments", "bench_dots.py"), "--tokens", "16",
         "--rounds", "1", "--layers", "2", "--flops_per_rep", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=os.path.join(REPO_ROOT, "experiments"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    res = json.loads(out.read_text())
    assert len(res["cases"]) == 15 and {c["kind"] for c in res["cases"]} == {"forward", "input_grad", "weight_grad"}
    for c in res["cases"]:
        assert c["max_rel_diff"] < 1e-4, c  # float32 products of the same operands
        want_arms = {"jax", "torch"} | ({"jax_dyT", "jax_xTdy"} if c["kind"] == "weight_grad" else set())
        assert set(c["median_s"]) == want_arms
        assert abs(c["jax_over_torch"] - c["median_s"]["jax"] / c["median_s"]["torch"]) < 1e-12
    fwd = [c for c in res["cases"] if c["kind"] == "forward"]
    uses = {"q_proj/o_proj": 2, "k_proj/v_proj": 2, "gate_proj/up_proj": 2, "down_proj": 1, "lm_head": 0}
    want = sum(c["median_s"]["jax"] * (2 * uses[c["linear"]] if uses[c["linear"]] else 1) for c in fwd)
    assert abs(res["per_step_totals"]["forward"]["jax_s"] - want) < 1e-12
