"""sylva_jax.host_memory: freed heap goes back to the OS, and the compile-then-release wrapper
compiles each signature once (the jitted function's own cache serves the call)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sylva_jax import host_memory

_COMPILES: list[str] = []
_LISTENING = [False]


def _listener(name, duration, **kw):
    if _LISTENING[0] and name.endswith("backend_compile_duration"):
        _COMPILES.append(name)


jax.monitoring.register_event_duration_secs_listener(_listener)


class count_compiles:
    def __enter__(self):
        _COMPILES.clear()
        _LISTENING[0] = True
        return _COMPILES

    def __exit__(self, *exc):
        _LISTENING[0] = False


_PROG = textwrap.dedent("""
    import gc
    from sylva_jax import host_memory

    def rss_mb():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:")) / 1024

    chunks = [bytearray(64 * 1024) for _ in range(4096)]  # 256 MB in heap-sized pieces
    keep = chunks[-1]  # pins the top of the heap: freeing the rest cannot shrink it by brk
    del chunks
    gc.collect()
    before = rss_mb()
    ok = host_memory.release()
    print(ok, before - rss_mb())
""")


@pytest.mark.skipif(not sys.platform.startswith("linux") or not os.path.exists("/proc/self/status"),
                    reason="resident-set accounting through /proc is Linux's")
def test_release_returns_freed_heap_pages_to_the_os():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))] + sys.path))
    ok, dropped = subprocess.run([sys.executable, "-c", _PROG], env=env, capture_output=True,
                                 text=True, check=True).stdout.split()
    if ok == "False":  # not glibc: nothing to release, and release says so
        assert float(dropped) < 16
        return
    assert float(dropped) > 128, f"malloc_trim gave back only {dropped} MB of 256 MB freed"


def test_compile_then_release_compiles_each_signature_once(monkeypatch):
    releases = []
    monkeypatch.setattr(host_memory, "release", lambda: releases.append(1) or True)

    def f(x, y):
        return jnp.tanh(x @ y) + x, (x * y).sum()

    jitted = jax.jit(f, donate_argnums=(0,))
    call = host_memory.compile_then_release(jitted)
    rng = np.random.default_rng(0)
    y = jnp.asarray(rng.standard_normal((8, 8), np.float32))
    x0 = rng.standard_normal((8, 8), np.float32)
    x2, y2 = (jnp.asarray(np.ones((4, 4), np.float32)) for _ in range(2))
    with count_compiles() as compiles:
        x = jnp.asarray(x0)
        for _ in range(3):
            xn, yn = np.asarray(x), np.asarray(y)  # the NumPy reference, before x is donated
            x, s = call(x, y)
            np.testing.assert_allclose(np.asarray(x), np.tanh(xn @ yn) + xn, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(float(s), float((xn * yn).sum()), rtol=1e-5, atol=1e-5)
        assert len(compiles) == 1 and len(releases) == 1
        call(x2, y2)  # a new shape: one more compile, one more release
        assert len(compiles) == 2 and len(releases) == 2


def test_trainer_step_compiles_once_and_releases_before_running(monkeypatch):
    from sylva_jax.train import make_train_step
    from tiny import tiny_config, tiny_split

    order = []
    monkeypatch.setattr(host_memory, "release", lambda: order.append("release") or True)
    cfg = tiny_config(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1)
    graphdef, params = tiny_split(0, cfg)
    trainer = make_train_step(graphdef, method="full", learning_rate=1e-3, schedule="constant", warmup_steps=0)
    state = trainer.init(jax.tree.map(jnp.copy, params))
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 64, (2, 8)), jnp.int32)
    batch = {"input_ids": ids, "labels": ids}
    with count_compiles() as compiles:
        state, m0 = trainer.step(state, batch)
        n_first = len(compiles)
        state, m1 = trainer.step(state, batch)
        assert len(compiles) == n_first >= 1  # the second step compiles nothing
    assert order == ["release"]
    assert float(m1["loss"]) < float(m0["loss"])
