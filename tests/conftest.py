"""Shared fixtures. ``smollm2`` loads the real SmolLM2-135M-Instruct GGUF once per session."""
from __future__ import annotations

import os

# XLA's cheap optimisation level for the whole suite and the subprocesses it starts (they
# inherit the environment): compiles dominate most tests (tiny models, many distinct
# programs), and the level changes code generation only, not the HLO the tests inspect.
# Measured on test_capture + test_checkpoint + test_llama: 20% less CPU time. Set before
# jax is imported (jax reads it once); an explicit setting in the environment wins.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

# the experiment's persistent compilation cache: a fresh directory per test session (and its
# subprocesses), never the user's ~/.cache
if "SYLVA_JAX_CACHE" not in os.environ:
    import tempfile

    os.environ["SYLVA_JAX_CACHE"] = tempfile.mkdtemp(prefix="sylva-jax-test-cache-")

import pytest  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(REPO_ROOT, "..", "shared", "data")


@pytest.fixture(scope="session")
def smollm2():
    """``(model, tokenizer)`` for SmolLM2-135M-Instruct (float32), loaded once for the whole suite.

    Treat it as read-only: tests that need different weights should ``split`` it and work on
    their own params copy.
    """
    from sylva_jax.models.loading import load_pretrained

    return load_pretrained("smollm2-135m")


@pytest.fixture(scope="session")
def shared_data_dir():
    """Path of the shared offline data (``../shared/data`` from the repository root)."""
    return SHARED_DATA


@pytest.fixture(scope="module")
def tiny_llama_model():
    """A random tiny LLaMA (``tests/tiny.py``: 2 layers, hidden 64, vocabulary 256), seed 0."""
    from tiny import tiny_llama

    return tiny_llama(seed=0)
