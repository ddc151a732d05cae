"""experiments/bench_peer.py runs end to end on a 1-layer model: every arm of both libraries
trains the same model on the same tokens, so their first losses agree (float32), and the
record holds the medians the ratios are made of."""
from __future__ import annotations

import json
import os
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_peer_smoke_same_loss_on_both_sides(tmp_path):
    out = tmp_path / "peer.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO_ROOT, "experiments", "bench_peer.py"), "--layers", "1",
         "--cases", "self_attn:1x64", "--rounds", "1", "--warmup", "1", "--score", "",
         "--out", str(out), "--model_dir", str(tmp_path / "model")],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (case,) = json.loads(out.read_text())["cases"]
    arms = case["arms"]
    assert set(arms) == {"peft_lora", "peft_lora_do", "hf_full", "sylva", "lora", "full", "floor"}
    losses = [a["warmup_loss"] for a in arms.values()]
    assert max(losses) - min(losses) < 1e-4, losses       # transformers vs our LLaMA, float32
    assert all(a["median_s"] > 0 for a in arms.values())
    assert abs(case["ratios"]["sylva_over_peft_lora"]
               - arms["sylva"]["median_s"] / arms["peft_lora"]["median_s"]) < 1e-2
