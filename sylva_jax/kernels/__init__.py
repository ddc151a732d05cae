"""Backends of the sampled dense-dense (SDD) product and of the fused sparse AdamW step.

docs/algorithm.md, section 4. Every backend works on 2-D operands (tokens flattened):

- :mod:`sylva_jax.kernels.sdd_xla`     plain ``jax.numpy`` (gather + one batched einsum);
- :mod:`sylva_jax.kernels.sdd_pallas`  a Pallas kernel in the Triton style (GPU: compiled
  by Triton with explicit launch parameters; CPU: ``interpret=True``; TPU: refused);
- :mod:`sylva_jax.kernels.sdd_triton`  a kernel in the ``triton`` language, launched with
  jax-triton (GPU only; both are imported lazily, never at package import time);
- :mod:`sylva_jax.kernels.platform`    kernel choice by the platform lowered for;
- the fused in-place AdamW step on the tiles of W lives in :mod:`sylva_jax.optim`.

Use :func:`sylva_jax.ops.sdd` (validation, leading dimensions, backend dispatch) rather
than these functions directly.
"""
from __future__ import annotations

import jax

__all__ = ["default_platform", "on_gpu"]


def default_platform() -> str:
    """Platform of the default JAX backend (the host's view; kernel choice is made at
    lowering by :func:`sylva_jax.kernels.platform.by_platform`): ``"cpu"``, ``"gpu"`` or ``"tpu"``."""
    return jax.default_backend()


def on_gpu() -> bool:
    """True when the default JAX backend is a GPU (CUDA or ROCm)."""
    return default_platform() in ("gpu", "cuda", "rocm")
