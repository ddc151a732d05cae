"""Runs several processes at once (multi-process jobs, workers) for tests.

``run_together(commands, log_dir, timeout)`` starts every ``(argv, env)`` at once, each
writing stdout and stderr to its own file under ``log_dir`` (a pipe read one process
after another could fill and stall the other process), waits for all of them within one
shared ``timeout`` in seconds, kills what is left, and returns ``(returncodes, logs)``.
``report(returncodes, logs)`` is a failure message with every process's tail, since in a
multi-process job the process that failed first is often not the one that exits non-zero.
"""
from __future__ import annotations

import subprocess
import time
from pathlib import Path


def run_together(commands, log_dir, timeout: float) -> tuple[list, list[str]]:
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    paths = [log_dir / f"proc{i}.log" for i in range(len(commands))]
    files = [open(p, "w") for p in paths]
    procs = []
    try:
        for (argv, env), f in zip(commands, files):
            procs.append(subprocess.Popen(argv, env=env, stdout=f, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + timeout
        for p in procs:
            try:
                p.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                break
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for f in files:
            f.close()
    return [p.returncode for p in procs], [p.read_text(errors="replace") for p in paths]


def report(returncodes, logs, tail: int = 3000) -> str:
    return "\n".join(f"--- process {i} (exit {rc}) ---\n{log[-tail:]}"
                     for i, (rc, log) in enumerate(zip(returncodes, logs)))
