"""sylva_jax.compile_cache: a second process loads the compiled program from disk."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

_PROG = textwrap.dedent("""
    import sys, time, jax, jax.numpy as jnp
    from sylva_jax import compile_cache
    compile_cache.enable(sys.argv[1])
    from jax._src import monitoring
    hits = []
    monitoring.register_event_listener(
        lambda name, **kw: hits.append(name) if "cache_hits" in name else None)
    f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum() * 3.0 + 1.0)
    print(float(f(jnp.ones((64, 64)))), len(hits), flush=True)
""")


def _run(cache_dir):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))] + sys.path))
    out = subprocess.run([sys.executable, "-c", _PROG, str(cache_dir)], env=env,
                         capture_output=True, text=True, check=True).stdout.split()
    return float(out[0]), int(out[1])


def test_second_process_hits_the_persistent_cache(tmp_path):
    value1, hits1 = _run(tmp_path / "cache")
    assert hits1 == 0 and any((tmp_path / "cache").iterdir())
    value2, hits2 = _run(tmp_path / "cache")
    assert hits2 >= 1 and value2 == value1


def test_default_dir_follows_environment(tmp_path, monkeypatch):
    from sylva_jax import compile_cache
    monkeypatch.setenv("SYLVA_JAX_CACHE", str(tmp_path / "c"))
    assert compile_cache.default_dir() == tmp_path / "c"
    monkeypatch.delenv("SYLVA_JAX_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert compile_cache.default_dir() == tmp_path / "sylva_jax" / "jax"


def test_enabled_restores_the_previous_settings(tmp_path):
    import jax
    from sylva_jax import compile_cache
    before = jax.config.values["jax_compilation_cache_dir"], jax.config.values["jax_enable_compilation_cache"]
    with compile_cache.enabled(tmp_path / "c") as path:
        assert jax.config.values["jax_compilation_cache_dir"] == str(path) == str(tmp_path / "c")
        assert jax.config.values["jax_enable_compilation_cache"] is True
    after = jax.config.values["jax_compilation_cache_dir"], jax.config.values["jax_enable_compilation_cache"]
    assert after == before
