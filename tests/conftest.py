"""Shared fixtures. ``smollm2`` loads the real SmolLM2-135M-Instruct GGUF once per session."""
from __future__ import annotations

import os

import pytest

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
