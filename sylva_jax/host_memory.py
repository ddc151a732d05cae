"""Hand the host heap that XLA's compiler freed back to the OS before the first step runs.

Compiling a training step allocates a few hundred MB of short-lived host heap (the LLVM
pipeline of XLA:CPU, the GPU compiler's passes on the host). glibc keeps those freed pages
in the compiling thread's malloc arena, where the step's buffers, allocated by XLA's worker
threads in their own arenas, cannot reuse them; the resident set then carries the
compiler's garbage and the step's temporaries side by side. On the 30-layer SmolLM2 step at
1 x 512 tokens that is about 600 MB of a 2.9 GB peak (``experiments/bench_peer.py
--memory``).

- :func:`release` ``() -> bool``: glibc's ``malloc_trim(0)`` (free pages of every arena go
  back to the OS); ``False`` and nothing done where the C library has none (macOS, musl).
- :func:`compile_then_release` ``(jitted) -> call``: ``call(*args)`` is ``jitted(*args)``;
  the first time an argument signature (tree structure, shapes, dtypes, shardings) is
  seen, the function is compiled ahead of the call (``jitted.lower(*args).compile()``,
  which fills ``jitted``'s own cache, so the call does not compile again) and
  :func:`release` runs between the compile and the execution.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Any, Callable

import jax

__all__ = ["release", "compile_then_release"]


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else ctypes.CDLL(None)
        fn = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


def release() -> bool:
    """Return the free pages of the host heap to the OS; ``True`` where that was possible."""
    fn = _malloc_trim()
    if fn is None:
        return False
    fn(0)
    return True


def _signature(args: tuple) -> tuple:
    leaves, treedef = jax.tree.flatten(args)

    def one(x):
        if isinstance(x, jax.Array):
            return (x.shape, x.dtype, x.weak_type, x.sharding)
        if hasattr(x, "shape") and hasattr(x, "dtype"):
            return (tuple(x.shape), x.dtype)
        return (type(x), x) if isinstance(x, (bool, int, float, str, type(None))) else (type(x),)

    return treedef, tuple(one(x) for x in leaves)


def compile_then_release(jitted: Any) -> Callable:
    """``jitted(*args)``, with :func:`release` between each new signature's compile and its
    first execution (module doc). ``jitted``: a ``jax.jit`` function."""
    seen: set = set()

    def call(*args):
        key = _signature(args)
        if key not in seen:
            jitted.lower(*args).compile()
            release()
            seen.add(key)
        return jitted(*args)

    return call
