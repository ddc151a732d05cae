"""sylva_jax.runlock: one writer per run directory, stale locks of dead processes taken over."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from sylva_jax.runlock import LOCK_NAME, RunLock, RunLockError

_HOLDER = textwrap.dedent("""
    import sys, time
    from sylva_jax.runlock import RunLock
    lock = RunLock(sys.argv[1]).acquire()
    print("held", flush=True)
    time.sleep(120)
""")


def _spawn_holder(run_dir):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))] + sys.path))
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run_dir)], env=env,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_writer_refused_with_holder_then_free_after_release(tmp_path):
    first = RunLock(tmp_path).acquire()
    assert first.held and first.took_over is None
    holder = json.loads((tmp_path / LOCK_NAME).read_text())
    assert holder["pid"] == os.getpid() and holder["host"]
    with pytest.raises(RunLockError, match=rf"pid {os.getpid()} on host .*--output_dir"):
        RunLock(tmp_path).acquire()
    first.release()
    assert (tmp_path / LOCK_NAME).read_text() == ""        # a clean release leaves no holder
    with RunLock(tmp_path) as again:
        assert again.held and again.took_over is None        # not reported as stale


def test_lock_of_killed_process_is_stale_and_taken_over(tmp_path):
    proc = _spawn_holder(tmp_path)
    try:
        with pytest.raises(RunLockError, match=rf"pid {proc.pid} "):
            RunLock(tmp_path).acquire()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with RunLock(tmp_path) as lock:
        assert lock.took_over is not None and lock.took_over["pid"] == proc.pid
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()


def test_disabled_lock_is_a_noop_for_non_writing_processes(tmp_path):
    with RunLock(tmp_path):
        with RunLock(tmp_path, enabled=False) as other:
            assert not other.held
