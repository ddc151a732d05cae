"""The diagonal factor ``diag(F) [dim]`` (``docs/algorithm.md`` §2-§3).

Functions take inputs already validated by :mod:`sylva_jax.curvature`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class DiagonalFactor:
    """Diagonal factor ``d [dim]`` (the diagonal of the sum of outer products)."""

    d: jax.Array
    dim: int = struct.field(pytree_node=False)

    kind = "diagonal"
    num_partition = 0

    @property
    def padded_dim(self) -> int:
        return self.dim

    @property
    def dtype(self):
        return self.d.dtype


def empty(dim: int, num_partition: int, dtype) -> DiagonalFactor:
    del num_partition
    return DiagonalFactor(d=jnp.zeros((dim,), dtype), dim=dim)


def update(h: DiagonalFactor, x: jax.Array) -> DiagonalFactor:
    """``d + sum_n x_n^2`` for ``x [n, dim]`` (exact)."""
    return h.replace(d=h.d + jnp.sum(x * x, axis=0))


def update_block(h: DiagonalFactor, x: jax.Array, *, chunk: int, rank: int) -> DiagonalFactor:
    del chunk, rank
    return update(h, x)


def matmat(h: DiagonalFactor, x: jax.Array) -> jax.Array:
    return h.d[:, None] * x


def to_dense(h: DiagonalFactor) -> jax.Array:
    return jnp.diag(h.d)


def diag(h: DiagonalFactor) -> jax.Array:
    return h.d


def inv_diag(h: DiagonalFactor, lam) -> jax.Array:
    """``1 / (d + lam)``."""
    return 1.0 / (h.d + lam)


def solve(h: DiagonalFactor, x: jax.Array, lam) -> jax.Array:
    return x / (h.d + lam)[:, None]
