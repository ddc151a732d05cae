"""One interface over the factor kinds: ``"hodlr"``, ``"dense"``, ``"diagonal"``.

A factor approximates a symmetric PSD ``d x d`` matrix ``F = sum_n a_n a_n^T`` (a Kronecker
factor ``A`` or ``G`` of one linear layer, ``docs/algorithm.md`` §1) and supports what tile
scoring needs: updates, products ``F x``, ``diag(F)`` and ``diag((F + lam I)^-1)`` (§2, §3).
Every factor is a pytree whose metadata (``dim``, ...) is static, so each function below
``jit``s with the factor as an ordinary argument. The functions validate and zero-pad the
inputs (``_base``) and hand them to the kind's module (:mod:`.hodlr`, :mod:`.dense`,
:mod:`.diagonal`), which all define ``empty``, ``update``, ``update_block``, ``matmat``,
``to_dense``, ``diag``, ``inv_diag`` and ``solve`` with the same contracts.
"""
from __future__ import annotations

from functools import partial
from typing import Union

import jax
import jax.numpy as jnp

from sylva_jax.curvature import dense, diagonal, hodlr
from sylva_jax.curvature._base import as_cols, as_rows, check_dim, max_num_partition
from sylva_jax.curvature.dense import DenseFactor
from sylva_jax.curvature.diagonal import DiagonalFactor
from sylva_jax.curvature.hodlr import HodlrFactor

__all__ = [
    "KINDS", "HodlrFactor", "DenseFactor", "DiagonalFactor", "Factor", "init", "update",
    "update_block", "matmat", "to_dense", "from_dense", "inv_diag", "solve", "diag", "nbytes",
    "max_num_partition", "leaf_inv_diag", "published_matmat",
]

KINDS = ("hodlr", "dense", "diagonal")
_MODULES = {"hodlr": hodlr, "dense": dense, "diagonal": diagonal}

Factor = Union[HodlrFactor, DenseFactor, DiagonalFactor]


def _kind(h):
    """The module implementing ``h``'s kind (``TypeError`` for anything but a factor)."""
    if not isinstance(h, (HodlrFactor, DenseFactor, DiagonalFactor)):
        raise TypeError(
            f"expected a factor made by sylva_jax.hierarchy.init (HodlrFactor, DenseFactor "
            f"or DiagonalFactor), got {type(h).__name__}."
        )
    return _MODULES[h.kind]


def init(dim: int, num_partition: int = 8, dtype=jnp.float32, kind: str = "hodlr") -> Factor:
    """An empty (all-zero) factor for a ``dim x dim`` matrix.

    ``num_partition`` (``P``) is used by ``kind="hodlr"`` only; ``2^P`` must not exceed
    ``dim`` (see :func:`max_num_partition`). A ``dim`` that is not a multiple of ``2^P`` is
    zero-padded to the next multiple (:mod:`.hodlr`). Plain Python (allocation only).
    """
    dim = check_dim(dim)
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"dtype must be a floating dtype, got {dtype}.")
    if kind not in _MODULES:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}.")
    return _MODULES[kind].empty(dim, num_partition, dtype)


@jax.jit
def update(h: Factor, vectors) -> Factor:
    """Add ``sum_n a_n a_n^T`` for ``vectors [dim]`` or ``[n, dim]`` (``docs/algorithm.md`` §2).

    hodlr: leaves get the exact outer products (one batched einsum over all vectors); the
    off-diagonal tiles get the vectors one at a time, in order (``lax.scan``), as Brand
    rank-1 steps truncated to rank 1, every tile of every level in one batched step.
    dense / diagonal: exact.
    """
    impl = _kind(h)
    return impl.update(h, as_rows(h, vectors, "vectors"))


@partial(jax.jit, static_argnames=("chunk", "rank"))
def update_block(h: Factor, x, *, chunk: int = 64, rank: int = 32) -> Factor:
    """Add ``X^T X`` for many vectors at once: ``x [n, dim]`` (or ``[dim]``; §2).

    For per-token K-FAC statistics (thousands of vectors per sample). dense / diagonal and
    the hodlr leaves: exact. Each hodlr off-diagonal tile becomes a rank-1 approximation of
    ``(current tile) + R^T C`` (``R``, ``C`` the row / column slices of ``x``):

    - tiles with ``h <= chunk``: the ``h x h`` sum is formed and its top singular triple
      kept (exact truncation);
    - larger tiles: rank-``c`` Brand steps over chunks of ``c = min(chunk, n)`` vectors
      (``n`` is zero-padded to a multiple of ``c``; zero vectors add nothing). Each step
      orthogonalises the chunk's row / column slices against the working basis (QR), takes
      the SVD of the ``(r + c) x (r + c)`` core and keeps the top ``r = min(rank, h)``
      triples; after the last chunk the top triple is kept. No ``[h, min(h, n)]`` or
      ``h x h`` array is built (``h = d/2`` at level 0); the cost is ``O(n h (r + c))``
      per tile.

    Exactness: when ``n <= chunk`` (one Brand step), or whenever every prefix of the
    accumulated tile has rank ``<= r``, the result is the best rank-1 approximation (top
    singular triple) of ``current tile + R^T C``. It therefore equals the sequential
    rank-1 updates of :func:`update` only approximately (sequential truncation discards
    information after every vector; this truncates once), is exact for input whose tile is
    exactly rank 1, and, started from an empty tile, is never further from the exact tile
    (Frobenius) than sequential updates when ``n <= chunk`` (Eckart-Young).
    """
    impl = _kind(h)
    if int(chunk) < 1 or int(rank) < 1:
        raise ValueError(f"chunk and rank must be >= 1, got chunk={chunk}, rank={rank}.")
    return impl.update_block(h, as_rows(h, x, "x"), chunk=chunk, rank=rank)


@jax.jit
def matmat(h: Factor, x) -> jax.Array:
    """``F x`` for ``x [dim]`` or ``[dim, k]``; same shape out. Never forms ``F`` (hodlr)."""
    impl = _kind(h)
    xp, vec = as_cols(h, x, "x")
    y = impl.matmat(h, xp)
    return y[:, 0] if vec else y


@jax.jit
def to_dense(h: Factor) -> jax.Array:
    """The assembled ``[dim, dim]`` matrix (tests and small examples only)."""
    return _kind(h).to_dense(h)


@partial(jax.jit, static_argnames=("num_partition",))
def from_dense(mat, num_partition: int = 8) -> HodlrFactor:
    """The HODLR factor of a symmetric ``mat [dim, dim]``: exact leaves, and every
    off-diagonal tile its best rank-1 approximation (top singular triple).

    This is what :func:`update_block` gives when all vectors come in one block (and so
    never less accurate than streaming them); it costs ``4 dim^2`` bytes, so calibration
    uses it for per-token statistics only when the dense accumulators fit
    (``preprocess(token_update=...)``). ``num_partition`` must satisfy ``2^P <= dim``.
    """
    mat = jnp.asarray(mat)
    if mat.ndim != 2 or mat.shape[0] != mat.shape[1]:
        raise ValueError(f"from_dense needs a square [dim, dim] matrix, got shape {mat.shape}.")
    if not jnp.issubdtype(mat.dtype, jnp.floating):
        raise ValueError(f"dtype must be a floating dtype, got {mat.dtype}.")
    return hodlr.from_dense(mat, num_partition)


@jax.jit
def diag(h: Factor) -> jax.Array:
    """``diag(F)``, ``[dim]`` (exact for every kind: the hodlr leaves are exact)."""
    return _kind(h).diag(h)


def nbytes(h: Factor) -> int:
    """Bytes held by the factor's arrays (``O(d L + d P)`` numbers for hodlr)."""
    _kind(h)
    return int(sum(a.size * a.dtype.itemsize for a in jax.tree_util.tree_leaves(h)))


def _damping(h: Factor, damping, relative: bool):
    lam = jnp.asarray(damping, h.dtype)
    if relative:
        lam = lam * jnp.sum(diag(h)) / h.dim
    return lam


@partial(jax.jit, static_argnames=("relative",))
def inv_diag(h: Factor, damping=1e-6, relative: bool = False) -> jax.Array:
    """``diag((F + lam I)^-1)``, ``[dim]``; ``lam = damping`` or ``damping * mean(diag F)``
    (``docs/algorithm.md`` §3).

    hodlr: bottom-up Woodbury. At a node with children ``M1, M2``:
    ``M = D + W S W^T``, ``D = blockdiag(M1, M2)``, ``W = [[v, 0], [0, u]]``,
    ``S = [[0, s], [s, 0]]``; ``M^-1 = D^-1 - Z C Z^T`` with ``Z = D^-1 W`` and
    ``C = (I + S W^T Z)^-1 S`` (safe for ``s = 0``), so
    ``diag(M^-1) = [diag(M1^-1); diag(M2^-1)] - rowsum((Z C) * Z)``. ``Z`` needs solves
    with the children, which reuse the ``Z, C`` of the deeper levels; the damped ``L x L``
    leaves are inverted densely (batched Gauss-Jordan, SPD; so ``damping`` must be > 0
    unless every leaf is already positive definite). Cost ``O(P (d L + P d))``, memory
    ``O(d L)``. It matches ``numpy.linalg.inv`` of the assembled HODLR matrix (not of the
    exact ``F``).

    Caveat: the HODLR matrix of a rank-deficient ``F`` (e.g. 128 calibration vectors) is in
    general indefinite (exact leaves, rank-1-truncated tiles), so a tiny damping can give
    negative or huge entries (§3); prefer ``relative=True`` with ``damping ~ 0.1``.
    dense: Cholesky (falls back to LU if ``F + lam I`` is not positive definite);
    diagonal: ``1 / (d + lam)``.
    """
    impl = _kind(h)
    return impl.inv_diag(h, _damping(h, damping, relative))


@partial(jax.jit, static_argnames=("relative",))
def solve(h: Factor, x, damping=1e-6, relative: bool = False) -> jax.Array:
    """``(F + lam I)^-1 x`` for ``x [dim]`` or ``[dim, k]`` (same damping as :func:`inv_diag`).

    hodlr: the same bottom-up Woodbury form, applied as a sum of per-node rank-2
    corrections; never forms a ``d x d`` matrix.
    """
    impl = _kind(h)
    lam = _damping(h, damping, relative)
    xp, vec = as_cols(h, x, "x")
    y = impl.solve(h, xp, lam)
    return y[:, 0] if vec else y


def _check_hodlr(h, what: str) -> None:
    if not isinstance(h, HodlrFactor):
        raise ValueError(f"{what} is defined on HODLR factors only, got a "
                         f"{type(h).__name__}; calibrate with factor_kind='hodlr'.")


@partial(jax.jit, static_argnames=("relative",))
def leaf_inv_diag(h: HodlrFactor, damping=1e-6, relative: bool = False) -> jax.Array:
    """``diag((leaves + lam I)^-1)``, ``[dim]``: the damped leaf blocks inverted alone, the
    off-diagonal tiles ignored (the authors' inverse diagonal in effect; ``docs/algorithm.md``
    §3). Same damping as :func:`inv_diag`; HODLR factors only."""
    _check_hodlr(h, "leaf_inv_diag")
    return hodlr.leaf_inv_diag(h, _damping(h, damping, relative))


@jax.jit
def published_matmat(h: HodlrFactor, x) -> jax.Array:
    """The authors' product ``F x`` (``docs/algorithm.md`` §2): tile slices read with stride
    ``h`` instead of ``2h`` and the upper tile not transposed. ``x [dim]`` or ``[dim, k]``;
    HODLR factors only. Not a product with ``F``: a fidelity arm."""
    _check_hodlr(h, "published_matmat")
    xp, vec = as_cols(h, x, "x")
    y = hodlr.published_matmat(h, xp)[: h.dim]
    return y[:, 0] if vec else y
