"""JAX's persistent compilation cache, on by default for the experiment and the benchmarks.

``enable(cache_dir)`` points ``jax_compilation_cache_dir`` at a directory (default
:func:`default_dir`: ``$SYLVA_JAX_CACHE`` or ``${XDG_CACHE_HOME:-~/.cache}/sylva_jax/jax``) and
caches every compiled program, however fast it compiled, so a relaunch or a repeated run
loads its executables from disk instead of compiling them again. A program's cache key
covers its HLO, the compile options, the backend and the jax/jaxlib versions, so a change to
any of them compiles anew; the cache is never wrong, only cold.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

import jax

__all__ = ["default_dir", "enable", "disable", "enabled"]

_OPTIONS = ("jax_compilation_cache_dir", "jax_enable_compilation_cache",
            "jax_persistent_cache_min_compile_time_secs", "jax_persistent_cache_min_entry_size_bytes")


def default_dir() -> Path:
    if os.environ.get("SYLVA_JAX_CACHE"):
        return Path(os.environ["SYLVA_JAX_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sylva_jax" / "jax"


def enable(cache_dir: str | os.PathLike | None = None) -> Path:
    """Turn the persistent cache on at ``cache_dir`` (created if missing); returns the path."""
    path = Path(cache_dir).expanduser() if cache_dir else default_dir()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"cannot create the compilation cache directory {path}: {e.strerror}. "
                      "Pass another --compile_cache_dir, or --no_compile_cache.") from None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


def disable() -> None:
    jax.config.update("jax_enable_compilation_cache", False)


@contextlib.contextmanager
def enabled(cache_dir: str | os.PathLike | None = None) -> Iterator[Path]:
    """:func:`enable` for the ``with`` block; jax's previous cache settings come back after."""
    before = {k: jax.config.values[k] for k in _OPTIONS}
    try:
        yield enable(cache_dir)
    finally:
        for k, v in before.items():
            jax.config.update(k, v)


def add_argument(parser) -> None:
    """``--no_compile_cache`` on a script's ``argparse`` parser (see :func:`from_args`)."""
    parser.add_argument("--no_compile_cache", action="store_true",
                        help="do not use JAX's persistent compilation cache "
                             f"(default directory: $SYLVA_JAX_CACHE, else ~/.cache/sylva_jax/jax)")


def from_args(args) -> Path | None:
    """:func:`enable` unless ``args.no_compile_cache``; the directory, or None."""
    return None if getattr(args, "no_compile_cache", False) else enable()
