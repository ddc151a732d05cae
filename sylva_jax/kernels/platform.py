"""Kernel choice by the platform a program is *compiled for* (docs/algorithm.md, section 4).

``jax.lax.platform_dependent`` stages every branch out and lowering keeps only the branch
of the target platform, so a program lowered on a CPU host for a GPU (``jax.export``,
deviceless AOT compilation) gets the GPU kernel, not the host's choice.

- :func:`by_platform` picks among ``gpu`` (CUDA and ROCm), ``tpu`` and ``cpu`` branches;
- :func:`refused` is a value that lowers everywhere except on the named platform, where
  lowering stops with the given message (a kernel that has no lowering there is refused
  loudly instead of falling back to an interpreter or failing deep inside a compiler).
"""
from __future__ import annotations

from typing import Callable

import jax
from jax.extend import core as jex_core
from jax.interpreters import mlir

__all__ = ["by_platform", "refused", "KernelRefused"]


class KernelRefused(ValueError):
    """A kernel was asked for on a platform it has no correct lowering for."""


def by_platform(*args, gpu: Callable, tpu: Callable, cpu: Callable):
    """``branch(*args)`` for the platform being lowered for (the current backend when run
    eagerly). The branches must return the same shapes and dtypes."""
    return jax.lax.platform_dependent(*args, cuda=gpu, rocm=gpu, tpu=tpu, default=cpu)


_refuse_p = jex_core.Primitive("sylva_refused")


def _refuse_impl(x, *, platform, message):
    if jax.default_backend() == platform:
        raise KernelRefused(message)
    return x


def _refuse_lowering_target(ctx, x, *, platform, message):
    raise KernelRefused(message)


_refuse_p.def_impl(_refuse_impl)
_refuse_p.def_abstract_eval(lambda x, *, platform, message: x)
mlir.register_lowering(_refuse_p, lambda ctx, x, *, platform, message: [x])
for _p in ("tpu",):
    mlir.register_lowering(_refuse_p, _refuse_lowering_target, platform=_p)


def refused(x: jax.Array, *, platform: str, message: str) -> jax.Array:
    """``x`` unchanged, except that lowering for ``platform`` (only ``"tpu"`` is wired)
    raises :class:`KernelRefused` with ``message``."""
    if platform != "tpu":
        raise ValueError(f"refused() is wired for platform 'tpu' only; got {platform!r}")
    return _refuse_p.bind(x, platform=platform, message=message)
