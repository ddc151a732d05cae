"""The exact dense factor ``F [dim, dim]`` (ablations, small models; ``docs/algorithm.md`` §2-§3).

Functions take inputs already validated by :mod:`sylva_jax.curvature` (rows ``[n, dim]``,
columns ``[dim, k]``, the damping ``lam`` as a scalar).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct
from jax import lax

from sylva_jax.curvature._base import HI


@struct.dataclass
class DenseFactor:
    """Exact dense factor ``mat [dim, dim]``."""

    mat: jax.Array
    dim: int = struct.field(pytree_node=False)

    kind = "dense"
    num_partition = 0

    @property
    def padded_dim(self) -> int:
        return self.dim

    @property
    def dtype(self):
        return self.mat.dtype


def empty(dim: int, num_partition: int, dtype) -> DenseFactor:
    del num_partition
    return DenseFactor(mat=jnp.zeros((dim, dim), dtype), dim=dim)


def update(h: DenseFactor, x: jax.Array) -> DenseFactor:
    """``F + x^T x`` for ``x [n, dim]`` (exact)."""
    return h.replace(mat=h.mat + jnp.matmul(x.T, x, precision=HI))


def update_block(h: DenseFactor, x: jax.Array, *, chunk: int, rank: int) -> DenseFactor:
    del chunk, rank
    return update(h, x)


def matmat(h: DenseFactor, x: jax.Array) -> jax.Array:
    return jnp.matmul(h.mat, x, precision=HI)


def to_dense(h: DenseFactor) -> jax.Array:
    return h.mat


def diag(h: DenseFactor) -> jax.Array:
    return jnp.diagonal(h.mat)


def _damped(h: DenseFactor, lam):
    return h.mat + lam * jnp.eye(h.dim, dtype=h.dtype)


def inv_diag(h: DenseFactor, lam) -> jax.Array:
    """``diag((F + lam I)^-1)`` by Cholesky (LU when ``F + lam I`` is not positive definite)."""
    m = _damped(h, lam)
    chol = jnp.linalg.cholesky(m)
    eye = jnp.eye(h.dim, dtype=h.dtype)

    def by_cholesky(_):
        li = jax.scipy.linalg.solve_triangular(chol, eye, lower=True)
        return jnp.sum(li * li, axis=0)

    def by_lu(_):
        return jnp.diagonal(jnp.linalg.solve(m, eye))

    return lax.cond(jnp.all(jnp.isfinite(chol)), by_cholesky, by_lu, None)


def solve(h: DenseFactor, x: jax.Array, lam) -> jax.Array:
    return jnp.linalg.solve(_damped(h, lam), x)
