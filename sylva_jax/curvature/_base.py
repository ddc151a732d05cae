"""Validation and padding shared by every factor kind (``docs/algorithm.md`` §2).

A factor of any kind carries ``dim`` (the matrix size), ``padded_dim`` (``>= dim``; HODLR
pads to a multiple of ``2^P``) and ``dtype``. Inputs are zero-padded to ``padded_dim``, so
padded rows and columns of ``F`` are exactly zero.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# Every product of this package runs at full float32 precision: on GPUs the default for
# float32 dots may be TF32 (10-bit mantissa), far too coarse for curvature statistics.
HI = lax.Precision.HIGHEST


def max_num_partition(dim: int) -> int:
    """Largest ``num_partition`` allowed for ``dim`` (``2^P <= dim``, leaf size >= 1)."""
    return int(dim).bit_length() - 1


def check_dim(dim) -> int:
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
        raise ValueError(f"dim must be a positive int, got {dim!r}.")
    return int(dim)


def check_partition(dim: int, num_partition) -> int:
    if isinstance(num_partition, bool) or not isinstance(num_partition, (int, np.integer)):
        raise ValueError(f"num_partition must be an int >= 0, got {num_partition!r}.")
    p = int(num_partition)
    if p < 0:
        raise ValueError(f"num_partition must be >= 0, got {p}.")
    if (1 << p) > dim:
        raise ValueError(
            f"num_partition={p} asks for 2^{p} = {1 << p} leaves but dim={dim} has fewer "
            f"entries (leaf size < 1); the largest num_partition allowed for dim={dim} is "
            f"{max_num_partition(dim)}."
        )
    return p


def as_rows(h, x, name: str) -> jax.Array:
    """``x [dim]`` or ``[n, dim]`` -> ``[n, padded_dim]`` in the factor dtype."""
    x = jnp.asarray(x)
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2 or x.shape[-1] != h.dim:
        raise ValueError(
            f"{name} must have shape [{h.dim}] or [n, {h.dim}] (the factor's dim is "
            f"{h.dim}), got shape {tuple(jnp.shape(x))}; reshape to [n, {h.dim}]."
        )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} must be a floating array, got dtype {x.dtype}.")
    x = x.astype(h.dtype)
    pad = h.padded_dim - h.dim
    return jnp.pad(x, ((0, 0), (0, pad))) if pad else x


def as_cols(h, x, name: str) -> tuple[jax.Array, bool]:
    """``x [dim]`` or ``[dim, k]`` -> (``[padded_dim, k]``, was_vector)."""
    x = jnp.asarray(x)
    vec = x.ndim == 1
    if vec:
        x = x[:, None]
    if x.ndim != 2 or x.shape[0] != h.dim:
        raise ValueError(
            f"{name} must have shape [{h.dim}] or [{h.dim}, k] (the factor's dim is "
            f"{h.dim}), got shape {tuple(jnp.shape(x))}."
        )
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} must be a floating array, got dtype {x.dtype}.")
    x = x.astype(h.dtype)
    pad = h.padded_dim - h.dim
    return (jnp.pad(x, ((0, pad), (0, 0))) if pad else x), vec
