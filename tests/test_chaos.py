"""Kill the experiment at random moments, relaunch the same command: bit-identical result.

Runs ``experiments/chaos.py`` (one trial, two SIGKILLs at seeded random moments over the run,
each followed by the same command line) on a tiny random LLaMA, and checks its record.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_killed_runs_relaunched_unchanged_end_bit_identical(tmp_path):
    out = tmp_path / "chaos.json"
    proc = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "experiments", "chaos.py"),
                           "--trials", "1", "--kills", "2", "--seed", "3", "--no_timing",
                           "--window", "training",
                           "--json", str(out), "--workdir", str(tmp_path / "w")],
                          capture_output=True, text=True, timeout=900)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    (t,) = result["trials"]
    # the first kill lands in the first launch's training phase; the second only if the
    # resumed run is still training when its moment comes (a finished run is not killed)
    assert 1 <= t["kills"] <= 2 and t["launches"] == t["kills"] + 1 and t["failed_launches"] == 0
    assert t["finished"] and t["identical_weights"] and t["identical_losses"]
    # a relaunch that found a run to continue (or restart) is in the summary; one killed
    # before the run wrote its settings starts it as new
    assert len(t["restarts_recorded"]) <= 2
    assert set(t["restarts_recorded"]) <= {"resume", "restart"}
    assert proc.returncode == 0
