"""Curvature factors for Sylva pre-processing: HODLR, dense and diagonal, one interface.

Implements ``../shared/docs/ALGORITHM.md`` section 2 (the hierarchical factor). A factor
approximates a symmetric PSD ``d x d`` matrix ``F = sum_n a_n a_n^T`` (a Kronecker factor
``A`` or ``G`` of one linear layer) and supports the few operations importance scoring
needs: rank-1 / block updates, products ``F x``, and ``diag((F + lam I)^-1)``.

Kinds (all pytrees; metadata such as ``dim`` is a static field, so every function below
``jit``s with the factor as an ordinary argument):

- ``"hodlr"`` (:class:`HodlrFactor`): ``P = num_partition`` levels. Level ``k = 0..P-1``
  has ``2^k`` nodes of size ``d / 2^k``; node ``j`` stores the lower-left off-diagonal tile
  (rows ``[2hj + h, 2hj + 2h)``, columns ``[2hj, 2hj + h)``, ``h = d / 2^(k+1)``) as a
  rank-1 triple ``tile ~ s u v^T`` with ``u`` over the rows, ``v`` over the columns,
  ``|u| = |v| = 1`` (or ``u = v = 0, s = 0`` for an empty tile). The upper-right tile is
  the transpose ``s v u^T``. The ``2^P`` diagonal leaves of size ``L = d / 2^P`` are dense
  and exact. Arrays: ``leaves [2^P, L, L]``; per level ``u[k] [2^k, h]``, ``s[k] [2^k]``,
  ``v[k] [2^k, h]``.
- ``"dense"`` (:class:`DenseFactor`): the exact ``[d, d]`` matrix (ablations, small models).
- ``"diagonal"`` (:class:`DiagonalFactor`): ``diag(F)`` only, ``[d]``.

Memory (hodlr): the leaves hold ``2^P L^2 = d L`` numbers and the levels
``sum_k 2^k (2 d / 2^(k+1) + 1) = P d + 2^P - 1``, so ``O(d L + d P)`` numbers instead of
``d^2`` (``nbytes`` reports the exact bytes). No function except :func:`to_dense` (and the
dense kind itself) builds a ``d x d`` array (checked on the jaxprs in the tests: no value
has two dims ``>= d/2``); the largest intermediates are ``[d, k]`` per level for products
with ``[d, k]`` operands, ``[P, d]`` inside the update and inverse loops, ``[2^k, h, r + c]``
per level in :func:`update_block`, and ``O(d L)`` for the leaves.

Padding: when ``dim`` is not a multiple of ``2^P`` the factor works on
``padded_dim = ceil(dim / 2^P) * 2^P``. Inputs are zero-padded, so the padded rows and
columns of ``F`` are exactly zero and decoupled from the real ones (every ``u``, ``v`` is
zero there). In :func:`inv_diag` / :func:`solve` the padded diagonal is set to ``1`` (not
``damping``, which may be 0) so the padded block stays invertible; since it is decoupled
this does not change any real entry. Every output is stripped back to ``dim``.
"""
from __future__ import annotations

from functools import lru_cache, partial
from typing import Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax

__all__ = [
    "KINDS",
    "HodlrFactor",
    "DenseFactor",
    "DiagonalFactor",
    "Factor",
    "init",
    "update",
    "update_block",
    "matmat",
    "to_dense",
    "from_dense",
    "inv_diag",
    "solve",
    "diag",
    "nbytes",
    "max_num_partition",
]

KINDS = ("hodlr", "dense", "diagonal")

# Every product in this module runs at full float32 precision: on GPUs the default for
# float32 dots may be TF32 (10-bit mantissa), far too coarse for curvature statistics.
_HI = lax.Precision.HIGHEST


# --------------------------------------------------------------------------- pytrees


@struct.dataclass
class HodlrFactor:
    """HODLR factor. ``leaves [2^P, L, L]``; ``u``, ``s``, ``v``: tuples over levels
    ``k = 0..P-1`` of ``[2^k, h_k]``, ``[2^k]``, ``[2^k, h_k]`` with
    ``h_k = padded_dim / 2^(k+1)``."""

    leaves: jax.Array
    u: tuple
    s: tuple
    v: tuple
    dim: int = struct.field(pytree_node=False)
    num_partition: int = struct.field(pytree_node=False)
    padded_dim: int = struct.field(pytree_node=False)

    kind = "hodlr"

    @property
    def leaf_size(self) -> int:
        return self.padded_dim >> self.num_partition

    @property
    def dtype(self):
        return self.leaves.dtype


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


Factor = Union[HodlrFactor, DenseFactor, DiagonalFactor]


# --------------------------------------------------------------------------- validation


def max_num_partition(dim: int) -> int:
    """Largest ``num_partition`` allowed for ``dim`` (``2^P <= dim``, leaf size >= 1)."""
    return int(dim).bit_length() - 1


def _check_dim(dim) -> int:
    if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1:
        raise ValueError(f"dim must be a positive int, got {dim!r}.")
    return int(dim)


def _check_partition(dim: int, num_partition) -> int:
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


def _check_factor(h) -> None:
    if not isinstance(h, (HodlrFactor, DenseFactor, DiagonalFactor)):
        raise TypeError(
            f"expected a factor made by sylva_jax.hierarchy.init (HodlrFactor, DenseFactor "
            f"or DiagonalFactor), got {type(h).__name__}."
        )


def _as_rows(h: Factor, x, name: str) -> jax.Array:
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


def _as_cols(h: Factor, x, name: str) -> tuple[jax.Array, bool]:
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


# --------------------------------------------------------------------------- init


def init(dim: int, num_partition: int = 8, dtype=jnp.float32, kind: str = "hodlr") -> Factor:
    """An empty (all-zero) factor for a ``dim x dim`` matrix.

    ``num_partition`` (``P``) is used by ``kind="hodlr"`` only; ``2^P`` must not exceed
    ``dim`` (see :func:`max_num_partition`). A ``dim`` that is not a multiple of ``2^P`` is
    zero-padded to the next multiple (module docstring). Plain Python (allocation only).
    """
    dim = _check_dim(dim)
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"dtype must be a floating dtype, got {dtype}.")
    if kind == "dense":
        return DenseFactor(mat=jnp.zeros((dim, dim), dtype), dim=dim)
    if kind == "diagonal":
        return DiagonalFactor(d=jnp.zeros((dim,), dtype), dim=dim)
    if kind != "hodlr":
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}.")
    p = _check_partition(dim, num_partition)
    nb = 1 << p
    padded = -(-dim // nb) * nb
    leaf = padded // nb
    u = tuple(jnp.zeros((1 << k, padded >> (k + 1)), dtype) for k in range(p))
    s = tuple(jnp.zeros((1 << k,), dtype) for k in range(p))
    v = tuple(jnp.zeros((1 << k, padded >> (k + 1)), dtype) for k in range(p))
    return HodlrFactor(
        leaves=jnp.zeros((nb, leaf, leaf), dtype), u=u, s=s, v=v,
        dim=dim, num_partition=p, padded_dim=padded,
    )


# --------------------------------------------------------------------------- packed levels
#
# All off-diagonal levels hold the same number of entries (u and v of level k are
# ``2^k x h_k = D/2`` numbers), so inside the two loops (``lax.scan`` over vectors in
# ``update``, over levels in the Woodbury build) the levels are processed together:
# ``u``/``v`` are packed into ``[P, D/2]`` arrays (level-major), the ``T = 2^P - 1`` tiles
# are numbered in heap order (level k, node j -> ``2^k - 1 + j``), per-tile reductions are
# one ``segment_sum`` and per-tile scalar work (the Brand 2x2 core, the Woodbury 2x2 ``C``)
# is one ``vmap`` over all tiles of all levels. This is the arithmetic of a ``vmap`` over
# the nodes of each level, but the loop bodies do not grow with ``P`` (fast compiles) and
# hold ``O(P D)`` numbers. Products with wide ``[D, k]`` operands (``_lowrank_apply``)
# instead visit the levels through free reshapes, ``O(D k)`` memory.


@lru_cache(maxsize=None)
def _tables(padded_dim: int, num_partition: int):
    """Static index tables for ``D = padded_dim``, ``P = num_partition`` (NumPy int32).

    ``col [P, D/2]``: position in ``[0, D)`` of packed entry ``i`` of level ``k``'s column
    (upper-half, ``v``) slices; ``row [P, D/2]``: same for the row (lower-half, ``u``)
    slices; ``tid [P, D/2]``: heap index of the tile entry ``i`` belongs to;
    ``perm [P, D]``: for every position ``p``, its index in ``concat(col-part, row-part)``
    (the inverse permutation, so gathers replace scatters); ``level [T]``: each tile's level.
    """
    dd, p, half = padded_dim, num_partition, padded_dim // 2
    col = np.empty((p, half), np.int32)
    row = np.empty((p, half), np.int32)
    tid = np.empty((p, half), np.int32)
    perm = np.empty((p, dd), np.int32)
    i = np.arange(half)
    for k in range(p):
        hk = dd >> (k + 1)
        j, o = i // hk, i % hk
        col[k] = 2 * hk * j + o
        row[k] = 2 * hk * j + hk + o
        tid[k] = (1 << k) - 1 + j
        perm[k, col[k]] = i
        perm[k, row[k]] = half + i
    level = np.repeat(np.arange(p, dtype=np.int32), [1 << k for k in range(p)])
    return col, row, tid, perm, level


def _pack(h: HodlrFactor):
    """Per-level ``u, s, v`` -> ``u [P, D/2]``, ``s [T]``, ``v [P, D/2]``."""
    u = jnp.stack([x.reshape(-1) for x in h.u])
    v = jnp.stack([x.reshape(-1) for x in h.v])
    return u, jnp.concatenate(h.s), v


def _unpack(h: HodlrFactor, u, s, v) -> HodlrFactor:
    p = h.num_partition
    us = tuple(u[k].reshape(1 << k, -1) for k in range(p))
    vs = tuple(v[k].reshape(1 << k, -1) for k in range(p))
    ss = tuple(s[(1 << k) - 1:(1 << (k + 1)) - 1] for k in range(p))
    return h.replace(u=us, s=ss, v=vs)


def _segsum(x: jax.Array, tid, num_tiles: int) -> jax.Array:
    """Per-tile sums: ``x [P, D/2, ...]`` -> ``[T, ...]``."""
    flat = x.reshape((-1,) + x.shape[2:])
    return jax.ops.segment_sum(flat, jnp.asarray(tid).reshape(-1), num_segments=num_tiles,
                               indices_are_sorted=True)


def _lowrank_apply(h: HodlrFactor, z0, z1, c, y: jax.Array) -> jax.Array:
    """``sum over all tiles of Z C Z^T y`` for ``y [D, k]``; returns ``[D, k]``.

    ``z0`` (column/upper part) and ``z1`` (row/lower part) are ``[P, D/2]``, ``c [T, 2, 2]``;
    tile ``t`` contributes ``Z_t C_t Z_t^T`` with ``Z_t = [[z0_t, 0], [0, z1_t]]``. With
    ``z0 = v``, ``z1 = u``, ``C = [[0, s], [s, 0]]`` this is the off-diagonal part of ``F``;
    with the Woodbury ``Z, C`` it is the correction in ``M^-1 = D^-1 - Z C Z^T``.
    Narrow ``y`` (``k <= 2``: the solves inside the Woodbury build, vector products) use the
    packed form, all levels at once (``O(P D k)`` memory, a loop body that does not grow
    with ``P``). Wider ``y`` (importance scoring multiplies by ``[d, out]`` gradients) visits
    the levels in turn through free reshapes ``[2^k, 2, h, k]``, ``O(D k)`` memory; every
    node of a level is handled by the same batched einsum.
    """
    dd, kk = h.padded_dim, y.shape[-1]
    if kk <= 2:
        return _lowrank_apply_packed(h, z0, z1, c, y)
    out = jnp.zeros_like(y)
    for level in range(h.num_partition):
        nodes, hk = 1 << level, dd >> (level + 1)
        a0, a1 = z0[level].reshape(nodes, hk), z1[level].reshape(nodes, hk)
        cl = c[nodes - 1:2 * nodes - 1]                                   # [2^k, 2, 2]
        y3 = y.reshape(nodes, 2, hk, kk)
        t = jnp.stack([jnp.einsum("jh,jhk->jk", a0, y3[:, 0], precision=_HI),
                       jnp.einsum("jh,jhk->jk", a1, y3[:, 1], precision=_HI)], axis=1)
        w = jnp.einsum("jab,jbk->jak", cl, t, precision=_HI)              # [2^k, 2, k]
        corr = jnp.stack([a0[:, :, None] * w[:, 0, None, :], a1[:, :, None] * w[:, 1, None, :]],
                         axis=1)
        out = out + corr.reshape(dd, kk)
    return out


def _lowrank_apply_packed(h: HodlrFactor, z0, z1, c, y: jax.Array) -> jax.Array:
    """:func:`_lowrank_apply` with all levels at once (gathers + one ``segment_sum``)."""
    col, row, tid, perm, _ = _tables(h.padded_dim, h.num_partition)
    num_tiles = (1 << h.num_partition) - 1
    tid_j = jnp.asarray(tid)
    yc, yr = y[jnp.asarray(col)], y[jnp.asarray(row)]                 # [P, D/2, k]
    t0 = _segsum(z0[..., None] * yc, tid, num_tiles)                  # [T, k]
    t1 = _segsum(z1[..., None] * yr, tid, num_tiles)
    w0 = c[:, 0, 0, None] * t0 + c[:, 0, 1, None] * t1
    w1 = c[:, 1, 0, None] * t0 + c[:, 1, 1, None] * t1
    vals = jnp.concatenate([z0[..., None] * w0[tid_j], z1[..., None] * w1[tid_j]], axis=1)
    vals = jnp.take_along_axis(vals, jnp.asarray(perm)[..., None], axis=1)  # [P, D, k]
    return jnp.sum(vals, axis=0)


def _per_level_sum(h: HodlrFactor, upper: jax.Array, lower: jax.Array) -> jax.Array:
    """Scatter per-level values at column (``upper [P, D/2]``) and row (``lower``)
    positions back to ``[D]`` and sum over levels."""
    perm = jnp.asarray(_tables(h.padded_dim, h.num_partition)[3])
    vals = jnp.take_along_axis(jnp.concatenate([upper, lower], axis=1), perm, axis=1)
    return jnp.sum(vals, axis=0)


# --------------------------------------------------------------------------- Brand steps


def _top_triple_2x2(k: jax.Array):
    """Top singular triple of a real 2x2 matrix ``k`` in closed form.

    Writes ``k = R(phi) diag(q + r, q - r) R(theta)`` with ``R`` a rotation; the largest
    singular value is ``q + r`` (``q, r >= 0``), the left vector ``[cos phi, sin phi]`` and
    the right vector ``[cos theta, -sin theta]``. Returns ``(sigma, x [2], y [2])`` with
    ``k ~ sigma x y^T + (second term)``. Exact for ``k = 0`` (``sigma = 0``).
    """
    a, b, c, d = k[0, 0], k[0, 1], k[1, 0], k[1, 1]
    e, f = (a + d) / 2, (a - d) / 2
    g, hh = (c + b) / 2, (c - b) / 2
    q, r = jnp.hypot(e, hh), jnp.hypot(f, g)
    a1, a2 = jnp.arctan2(g, f), jnp.arctan2(hh, e)
    theta, phi = (a2 - a1) / 2, (a2 + a1) / 2
    x = jnp.stack([jnp.cos(phi), jnp.sin(phi)])
    y = jnp.stack([jnp.cos(theta), -jnp.sin(theta)])
    return q + r, x, y


def _brand_core(s, m, ra, n, rb):
    """Top triple of the Brand core ``K = [[s, 0], [0, 0]] + [m, ra]^T [n, rb]`` (one tile)."""
    core = jnp.stack([jnp.stack([s + m * n, m * rb]), jnp.stack([ra * n, ra * rb])])
    return _top_triple_2x2(core)


def _split_off(basis, a, tid, num_tiles: int):
    """Per tile: ``a = basis * m + p`` with ``p`` orthogonal to ``basis`` (unit or zero).

    ``basis, a: [P, D/2]`` (packed). Returns ``(m [T], p_hat [P, D/2], rho [T])`` with
    ``p = rho * p_hat``, ``|p_hat| = 1`` per tile, or ``p_hat = 0`` and ``rho = 0`` when
    ``p`` is at rounding level (``rho <= 16 eps |a|``): the update is then carried by ``m``
    alone and nothing is divided by zero. Gram-Schmidt runs twice so ``p`` stays
    orthogonal to ``basis`` in float32.
    """
    tid_j = jnp.asarray(tid)
    m = _segsum(basis * a, tid, num_tiles)
    p = a - basis * m[tid_j]
    dm = _segsum(basis * p, tid, num_tiles)
    p, m = p - basis * dm[tid_j], m + dm
    rho = jnp.sqrt(_segsum(p * p, tid, num_tiles))
    tol = 16 * jnp.finfo(a.dtype).eps * jnp.sqrt(_segsum(a * a, tid, num_tiles))
    ok = rho > tol
    p_hat = jnp.where(ok[tid_j], p / jnp.where(ok, rho, 1)[tid_j], 0)
    return m, p_hat, jnp.where(ok, rho, 0)


def _renormalise_packed(vec, scale, tid, num_tiles: int):
    """Unit-normalise every tile's slice of ``vec [P, D/2]``, folding the norm into
    ``scale [T]``; tiles with zero scale or zero vector become all-zero."""
    tid_j = jnp.asarray(tid)
    nrm = jnp.sqrt(_segsum(vec * vec, tid, num_tiles))
    live = (nrm > 0) & (scale > 0)
    vec = jnp.where(live[tid_j], vec / jnp.where(live, nrm, 1)[tid_j], 0)
    return vec, jnp.where(live, scale * nrm, 0)


def _brand_step(h: HodlrFactor, u, s, v, a):
    """One Brand incremental-SVD step truncated to rank 1 on every tile (ALGORITHM.md s.2).

    ``u, v: [P, D/2]`` packed, ``s: [T]``, ``a: [D]``. Tile ``t`` becomes the top singular
    triple of ``s u v^T + a_row a_col^T``: with ``m = u^T a_row``, ``p = a_row - u m``,
    ``ra = |p|``, ``n = v^T a_col``, ``q = a_col - v n``, ``rb = |q|``, the 2x2 core
    ``K = [[s, 0], [0, 0]] + [m, ra]^T [n, rb]`` gives ``(s', x, y)`` and
    ``u' = [u, p/ra] x``, ``v' = [v, q/rb] y``. An empty tile (``s = 0``) is treated as
    ``u = v = 0``, which yields the first-sample initialisation ``u = a_row/|a_row|``,
    ``v = a_col/|a_col|``, ``s = |a_row||a_col|``; ``ra, rb ~ 0`` are never divided by.
    """
    col, row, tid, _, _ = _tables(h.padded_dim, h.num_partition)
    num_tiles = (1 << h.num_partition) - 1
    tid_j = jnp.asarray(tid)
    a_col, a_row = a[jnp.asarray(col)], a[jnp.asarray(row)]
    live = s > 0
    u = jnp.where(live[tid_j], u, 0)
    v = jnp.where(live[tid_j], v, 0)
    s = jnp.where(live, s, 0)
    m, p_hat, ra = _split_off(u, a_row, tid, num_tiles)
    n, q_hat, rb = _split_off(v, a_col, tid, num_tiles)
    sigma, x, y = jax.vmap(_brand_core)(s, m, ra, n, rb)                # [T], [T, 2]
    u_new = u * x[tid_j, 0] + p_hat * x[tid_j, 1]
    v_new = v * y[tid_j, 0] + q_hat * y[tid_j, 1]
    # [u, p_hat], [v, q_hat] are orthonormal up to rounding (or have zero columns);
    # renormalising keeps |u'| = |v'| = 1 exactly and folds any drift into s'.
    u_new, s_new = _renormalise_packed(u_new, sigma, tid, num_tiles)
    v_new, s_new = _renormalise_packed(v_new, s_new, tid, num_tiles)
    u_new = jnp.where((s_new > 0)[tid_j], u_new, 0)
    return u_new, s_new, v_new


def _serial_vmap(fn):
    """``fn`` whose ``vmap`` is a sequential loop (``lax.map``) of unbatched calls.

    For the LAPACK decompositions of the per-token update on the CPU. jaxlib 0.10.x runs a
    *batched* LAPACK call by fanning the batch out onto XLA:CPU's intra-op thread pool and
    blocking on it; when as many such calls as the pool has threads run at once (the
    independent levels and dimension groups of one calibration step do), every pool thread
    waits on work that no thread is free to run and the program hangs (seen on the 2-core
    CPU: all threads in futex wait inside ``QrFactorization`` / ``ParallelBatchMap``).
    Unbatched calls run inline and cannot hang.
    """
    f = jax.custom_batching.custom_vmap(fn)

    @f.def_vmap
    def _rule(axis_size, in_batched, *args):
        args = tuple(a if b else jnp.broadcast_to(a, (axis_size,) + jnp.shape(a))
                     for a, b in zip(args, in_batched))
        out = lax.map(lambda xs: f(*xs), args)
        return out, jax.tree.map(lambda _: True, out)

    return f


_qr_serial = _serial_vmap(lambda a: tuple(jnp.linalg.qr(a)))
_svd_serial = _serial_vmap(lambda a: tuple(jnp.linalg.svd(a, full_matrices=False)))


def _on_cpu() -> bool:
    return jax.default_backend() == "cpu"


def _qr(a: jax.Array):
    """Reduced QR of ``a [m, n]`` (``vmap``-safe on the CPU, see :func:`_serial_vmap`)."""
    return _qr_serial(a) if _on_cpu() else tuple(jnp.linalg.qr(a))


def _svd(a: jax.Array):
    """Thin SVD ``(u, s, vt)`` of ``a [m, n]`` (``vmap``-safe on the CPU)."""
    return _svd_serial(a) if _on_cpu() else tuple(jnp.linalg.svd(a, full_matrices=False))


def _renormalise(vec: jax.Array, scale: jax.Array):
    """Make ``vec`` unit norm, folding its norm into ``scale``; all-zero when empty."""
    nrm = jnp.linalg.norm(vec)
    live = (nrm > 0) & (scale > 0)
    return jnp.where(live, vec / jnp.where(live, nrm, 1), 0), jnp.where(live, scale * nrm, 0)


def _orth_block(basis: jax.Array, a: jax.Array):
    """``a = basis @ m + q @ r`` with ``q`` orthonormal columns orthogonal to ``basis``.

    ``basis: [h, r]`` (orthonormal or zero columns), ``a: [h, c]`` with ``c <= h``. Returns
    ``(m [r, c], q [h, c], r [c, c])``.
    """
    m = jnp.matmul(basis.T, a, precision=_HI)
    p = a - jnp.matmul(basis, m, precision=_HI)
    dm = jnp.matmul(basis.T, p, precision=_HI)
    p, m = p - jnp.matmul(basis, dm, precision=_HI), m + dm
    q, r = _qr(p)
    return m, q, r


def _brand_block(us, ss, vs, a, b):
    """Rank-c Brand step keeping rank ``r``: top-``r`` SVD of ``U diag(S) V^T + a b^T``.

    ``us, vs: [h, r]`` (orthonormal or zero columns), ``ss: [r]`` (descending),
    ``a, b: [h, c]`` (``a`` row slices, ``b`` column slices, one column per vector).
    The core is ``K = [[diag(S), 0], [0, 0]] + [Ma; Ra] [Mb; Rb]^T``, ``(r+c) x (r+c)``.
    """
    r = ss.shape[0]
    ma, qa, ra = _orth_block(us, a)
    mb, qb, rb = _orth_block(vs, b)
    left = jnp.concatenate([ma, ra], axis=0)
    right = jnp.concatenate([mb, rb], axis=0)
    core = jnp.matmul(left, right.T, precision=_HI)
    core = core.at[:r, :r].add(jnp.diag(ss))
    ku, ks, kvt = _svd(core)
    us_new = jnp.matmul(jnp.concatenate([us, qa], axis=1), ku[:, :r], precision=_HI)
    vs_new = jnp.matmul(jnp.concatenate([vs, qb], axis=1), kvt[:r].T, precision=_HI)
    ss_new = ks[:r]
    # Columns at rounding level are dropped (zeroed) so they can never pollute the basis
    # of the next step (``_orth_block`` assumes orthonormal-or-zero columns).
    live = ss_new > (r + a.shape[1]) * jnp.finfo(ss.dtype).eps * ks[0]
    return us_new * live, jnp.where(live, ss_new, 0), vs_new * live


# --------------------------------------------------------------------------- updates


def _level_slices(x: jax.Array, level: int):
    """``x [..., D]`` -> (column/upper slices, row/lower slices), each ``[..., 2^k, h]``."""
    shape = x.shape[:-1] + (1 << level, 2, x.shape[-1] >> (level + 1))
    x3 = x.reshape(shape)
    return x3[..., 0, :], x3[..., 1, :]


def _leaf_gram(h: HodlrFactor, x: jax.Array) -> jax.Array:
    """Exact ``sum_n x_j x_j^T`` for every leaf ``j``: ``x [n, D]`` -> ``[2^P, L, L]``."""
    xr = x.reshape(x.shape[0], 1 << h.num_partition, h.leaf_size)
    return jnp.einsum("nja,njb->jab", xr, xr, precision=_HI)


@jax.jit
def update(h: Factor, vectors) -> Factor:
    """Add ``sum_n a_n a_n^T`` for ``vectors [dim]`` or ``[n, dim]`` (ALGORITHM.md section 2).

    hodlr: leaves get the exact outer products (one batched einsum over all vectors); the
    off-diagonal tiles get the vectors one at a time, in order (``lax.scan``), as Brand
    rank-1 steps truncated to rank 1 (:func:`_brand_step`), every tile of every level in one
    batched step (the per-tile 2x2 core SVD is one ``vmap`` over the tiles).
    dense / diagonal: exact.
    """
    _check_factor(h)
    x = _as_rows(h, vectors, "vectors")
    if isinstance(h, DenseFactor):
        return h.replace(mat=h.mat + jnp.matmul(x.T, x, precision=_HI))
    if isinstance(h, DiagonalFactor):
        return h.replace(d=h.d + jnp.sum(x * x, axis=0))
    leaves = h.leaves + _leaf_gram(h, x)
    if h.num_partition == 0:
        return h.replace(leaves=leaves)

    def step(carry, a):
        return _brand_step(h, *carry, a), None

    (u, s, v), _ = lax.scan(step, _pack(h), x)
    return _unpack(h.replace(leaves=leaves), u, s, v)


def _block_level_small(u, s, v, rows, cols):
    """Exact tile sum then top triple, for small tiles.

    ``u, v: [T, h]``, ``s: [T]``, ``rows, cols: [n, T, h]``. Builds ``[T, h, h]`` tiles
    (``T h^2 = D h / 2`` numbers, small because this path is used for ``h <= chunk``).
    """
    live = s > 0
    tiles = jnp.einsum("tji,tjk->jik", rows, cols, precision=_HI)
    tiles = tiles + jnp.where(live, s, 0)[:, None, None] * u[:, :, None] * v[:, None, :]
    uu, ss, vvt = jax.vmap(_svd)(tiles)
    return _finish_triple(uu[:, :, 0], ss[:, 0], vvt[:, 0, :])


def _finish_triple(u, s, v):
    """Renormalise a batch of triples ``u, v [T, h]``, ``s [T]`` (empty tiles -> zeros)."""
    def one(ui, si, vi):
        ui, si = _renormalise(ui, si)
        vi, si = _renormalise(vi, si)
        return jnp.where(si > 0, ui, 0), si, jnp.where(si > 0, vi, 0)
    return jax.vmap(one)(u, s, v)


def _block_level_brand(u, s, v, rows, cols, chunk: int, rank: int):
    """Streaming rank-``chunk`` Brand steps with a rank-``rank`` working state.

    ``u, v: [T, h]``, ``s: [T]``, ``rows, cols: [n, T, h]`` with ``n`` a multiple of
    ``chunk`` and ``chunk < h``. The working state is ``U [T, h, r]``, ``S [T, r]``,
    ``V [T, h, r]``; the result is its top triple.
    """
    t, hk = u.shape
    r = min(rank, hk)
    live = s > 0
    us = jnp.zeros((t, hk, r), u.dtype).at[:, :, 0].set(jnp.where(live[:, None], u, 0))
    vs = jnp.zeros((t, hk, r), v.dtype).at[:, :, 0].set(jnp.where(live[:, None], v, 0))
    ss = jnp.zeros((t, r), s.dtype).at[:, 0].set(jnp.where(live, s, 0))
    n = rows.shape[0]
    # [n, T, h] -> [n/chunk, T, h, chunk]: one Brand step per chunk of vectors
    rows = rows.reshape(n // chunk, chunk, t, hk).transpose(0, 2, 3, 1)
    cols = cols.reshape(n // chunk, chunk, t, hk).transpose(0, 2, 3, 1)
    step_tiles = jax.vmap(_brand_block)

    def step(carry, rc):
        return step_tiles(*carry, *rc), None

    (us, ss, vs), _ = lax.scan(step, (us, ss, vs), (rows, cols))
    return _finish_triple(us[:, :, 0], ss[:, 0], vs[:, :, 0])


@partial(jax.jit, static_argnames=("chunk", "rank"))
def update_block(h: Factor, x, *, chunk: int = 64, rank: int = 32) -> Factor:
    """Add ``X^T X`` for many vectors at once: ``x [n, dim]`` (or ``[dim]``).

    For per-token K-FAC statistics (thousands of vectors per sample). dense / diagonal and
    the hodlr leaves: exact. Each hodlr off-diagonal tile becomes a rank-1 approximation of
    ``(current tile) + R^T C`` (``R``, ``C`` the row / column slices of ``x``):

    - tiles with ``h <= chunk``: the ``h x h`` sum is formed and its top singular triple
      kept (exact truncation);
    - larger tiles: rank-``c`` Brand steps over chunks of ``c = min(chunk, n)`` vectors
      (``n`` is zero-padded to a multiple of ``c``; zero vectors add nothing). Each step
      orthogonalises the chunk's row / column slices against the working basis (QR), takes
      the SVD of the ``(r + c) x (r + c)`` core and keeps the top ``r = min(rank, h)``
      triples; after the last chunk the top triple is kept. This replaces the "compress the
      new block with a thin SVD of its ``[h, n]`` slices" variant: it never builds an
      ``[h, min(h, n)]`` or ``h x h`` array (``h = d/2`` at level 0) and costs
      ``O(n h (r + c))`` per tile.

    Exactness: when ``n <= chunk`` (one Brand step), or whenever every prefix of the
    accumulated tile has rank ``<= r``, the result is the best rank-1 approximation (top
    singular triple) of ``current tile + R^T C``. It therefore equals the sequential
    rank-1 updates of :func:`update` only approximately (sequential truncation discards
    information after every vector; this truncates once), is exact for input whose tile is
    exactly rank 1, and, started from an empty tile, is never further from the exact tile
    (Frobenius) than sequential updates when ``n <= chunk`` (Eckart-Young).
    """
    _check_factor(h)
    if int(chunk) < 1 or int(rank) < 1:
        raise ValueError(f"chunk and rank must be >= 1, got chunk={chunk}, rank={rank}.")
    x = _as_rows(h, x, "x")
    if isinstance(h, (DenseFactor, DiagonalFactor)):
        return update(h, x[:, : h.dim])
    leaves = h.leaves + _leaf_gram(h, x)
    n = x.shape[0]
    c = max(1, min(int(chunk), n))
    n_pad = -(-n // c) * c
    xp = jnp.pad(x, ((0, n_pad - n), (0, 0))) if n_pad != n else x
    us, ss, vs = [], [], []
    for k in range(h.num_partition):
        hk = h.padded_dim >> (k + 1)
        if hk <= int(chunk):
            cols, rows = _level_slices(x, k)
            uk, sk, vk = _block_level_small(h.u[k], h.s[k], h.v[k], rows, cols)
        else:
            cols, rows = _level_slices(xp, k)
            uk, sk, vk = _block_level_brand(h.u[k], h.s[k], h.v[k], rows, cols, c, int(rank))
        us.append(uk)
        ss.append(sk)
        vs.append(vk)
    return h.replace(leaves=leaves, u=tuple(us), s=tuple(ss), v=tuple(vs))


# --------------------------------------------------------------------------- products


def _leaf_apply(h: HodlrFactor, blocks: jax.Array, x: jax.Array) -> jax.Array:
    """Block-diagonal product: ``blocks [2^P, L, L]`` with ``x [D, k]`` -> ``[D, k]``."""
    nb, leaf, kk = 1 << h.num_partition, h.leaf_size, x.shape[1]
    y = jnp.einsum("jab,jbk->jak", blocks, x.reshape(nb, leaf, kk), precision=_HI)
    return y.reshape(x.shape)


def _hodlr_matmat(h: HodlrFactor, x: jax.Array) -> jax.Array:
    """``F x`` for ``x [D, k]`` (padded): leaves, plus for every tile ``s u (v^T x_upper)``
    into the lower half and ``s v (u^T x_lower)`` into the upper half (the upper-right tile
    is the transpose of the lower-left one)."""
    y = _leaf_apply(h, h.leaves, x)
    if h.num_partition == 0:
        return y
    u, s, v = _pack(h)
    zero = jnp.zeros_like(s)
    c = jnp.stack([jnp.stack([zero, s], -1), jnp.stack([s, zero], -1)], -2)  # S per tile
    return y + _lowrank_apply(h, v, u, c, x)


@jax.jit
def matmat(h: Factor, x) -> jax.Array:
    """``F x`` for ``x [dim]`` or ``[dim, k]``; same shape out. Never forms ``F`` (hodlr)."""
    _check_factor(h)
    xp, vec = _as_cols(h, x, "x")
    if isinstance(h, DenseFactor):
        y = jnp.matmul(h.mat, xp, precision=_HI)
    elif isinstance(h, DiagonalFactor):
        y = h.d[:, None] * xp
    else:
        y = _hodlr_matmat(h, xp)[: h.dim]
    return y[:, 0] if vec else y


@jax.jit
def to_dense(h: Factor) -> jax.Array:
    """The assembled ``[dim, dim]`` matrix (tests and small examples only)."""
    _check_factor(h)
    if isinstance(h, DenseFactor):
        return h.mat
    if isinstance(h, DiagonalFactor):
        return jnp.diag(h.d)
    dd, nb, leaf = h.padded_dim, 1 << h.num_partition, h.leaf_size
    idx = jnp.arange(nb)
    f = jnp.zeros((nb, leaf, nb, leaf), h.dtype).at[idx, :, idx, :].set(h.leaves)
    f = f.reshape(dd, dd)
    for k in range(h.num_partition):
        t, hk = 1 << k, dd >> (k + 1)
        tiles = h.s[k][:, None, None] * h.u[k][:, :, None] * h.v[k][:, None, :]
        j = jnp.arange(t)
        f6 = f.reshape(t, 2, hk, t, 2, hk)
        f6 = f6.at[j, 1, :, j, 0, :].set(tiles)
        f6 = f6.at[j, 0, :, j, 1, :].set(jnp.swapaxes(tiles, 1, 2))
        f = f6.reshape(dd, dd)
    return f[: h.dim, : h.dim]


@partial(jax.jit, static_argnames=("num_partition",))
def from_dense(mat, num_partition: int = 8) -> HodlrFactor:
    """The HODLR factor of a symmetric ``mat [dim, dim]``: exact leaves, and every
    off-diagonal tile its best rank-1 approximation (top singular triple).

    This is what :func:`update_block` gives when all vectors come in one block (and so
    never less accurate than streaming them); it costs ``4 dim^2`` bytes, so capture uses
    it for per-token statistics only when the dense accumulators fit
    (``capture.preprocess(token_update=...)``). ``num_partition`` is clamped as in
    :func:`init`.
    """
    mat = jnp.asarray(mat)
    if mat.ndim != 2 or mat.shape[0] != mat.shape[1]:
        raise ValueError(f"from_dense needs a square [dim, dim] matrix, got shape {mat.shape}.")
    h = init(mat.shape[0], num_partition, dtype=mat.dtype)
    dd, nb, leaf, p = h.padded_dim, 1 << h.num_partition, h.leaf_size, h.num_partition
    f = jnp.zeros((dd, dd), mat.dtype).at[: h.dim, : h.dim].set(mat)
    idx = jnp.arange(nb)
    leaves = f.reshape(nb, leaf, nb, leaf)[idx, :, idx, :]
    us, ss, vs = [], [], []
    for k in range(p):
        t, hk = 1 << k, dd >> (k + 1)
        j = jnp.arange(t)
        tiles = f.reshape(t, 2, hk, t, 2, hk)[j, 1, :, j, 0, :]  # lower-left tile of node j
        uu, sv, vt = jax.vmap(_svd)(tiles)
        u, s_, v = _finish_triple(uu[:, :, 0], sv[:, 0], vt[:, 0, :])
        us.append(u)
        ss.append(s_)
        vs.append(v)
    return h.replace(leaves=leaves, u=tuple(us), s=tuple(ss), v=tuple(vs))


@jax.jit
def diag(h: Factor) -> jax.Array:
    """``diag(F)``, ``[dim]`` (exact for every kind: the leaves are exact)."""
    _check_factor(h)
    if isinstance(h, DenseFactor):
        return jnp.diagonal(h.mat)
    if isinstance(h, DiagonalFactor):
        return h.d
    return jnp.diagonal(h.leaves, axis1=1, axis2=2).reshape(-1)[: h.dim]


def nbytes(h: Factor) -> int:
    """Bytes held by the factor's arrays (``O(d L + d P)`` numbers for hodlr)."""
    _check_factor(h)
    return int(sum(a.size * a.dtype.itemsize for a in jax.tree_util.tree_leaves(h)))


# --------------------------------------------------------------------------- inverse


def _damping(h: Factor, damping, relative: bool):
    lam = jnp.asarray(damping, h.dtype)
    if relative:
        lam = lam * jnp.sum(diag(h)) / h.dim
    return lam


@struct.dataclass
class _HodlrInverse:
    """Bottom-up Woodbury form of ``(F + lam I)^-1`` (ALGORITHM.md section 2).

    ``leaf_inv [2^P, L, L]``: inverses of the damped leaves. Packed over levels (see
    :func:`_tables`): ``z0, z1 [P, D/2]`` (per node ``Z = D^-1 W = [[z0, 0], [0, z1]]``
    with ``z0 = M1^-1 v``, ``z1 = M2^-1 u``) and ``c [T, 2, 2]``
    (``C = (I + S W^T Z)^-1 S``). At every node ``M^-1 = blockdiag(M1^-1, M2^-1) - Z C Z^T``,
    so ``(F + lam I)^-1 = blockdiag(leaf_inv) - sum over all nodes of Z C Z^T``.
    """

    leaf_inv: jax.Array
    z0: jax.Array
    z1: jax.Array
    c: jax.Array


def _woodbury_core(s, alpha, beta):
    """``C = (I + S W^T Z)^-1 S`` for ``S = [[0, s], [s, 0]]``, ``W^T Z = diag(alpha, beta)``.

    ``I + S W^T Z = [[1, s beta], [s alpha, 1]]``; no ``S^-1`` is needed, so ``s = 0``
    gives ``C = 0``.
    """
    det = 1 - s * s * alpha * beta
    return jnp.stack([
        jnp.stack([-s * s * beta, s]),
        jnp.stack([s, -s * s * alpha]),
    ]) / det


def _apply_inverse(h: HodlrFactor, inv: _HodlrInverse, y: jax.Array) -> jax.Array:
    """``blockdiag(leaf_inv) y - sum over nodes of Z C Z^T y`` for ``y [D, k]``.

    Nodes whose ``Z, C`` are still zero (levels not built yet) contribute nothing, so during
    the bottom-up build this is exactly the solve with the children of the current level.
    """
    r = _leaf_apply(h, inv.leaf_inv, y)
    if h.num_partition == 0:
        return r
    return r - _lowrank_apply(h, inv.z0, inv.z1, inv.c, y)


def _spd_inverse(a: jax.Array) -> jax.Array:
    """Inverses of a batch of symmetric positive definite blocks ``a [B, L, L]``.

    In-place Gauss-Jordan without pivoting (a ``fori_loop`` over the ``L`` pivots, each a
    batched rank-1 update): for SPD input the pivots are the positive diagonals of the
    successive Schur complements, so no pivoting is needed and it is as stable as a
    Cholesky-based inverse. The damped leaves are SPD: exact sums of outer products plus
    ``lam > 0`` (padding rows get 1). Used instead of ``jnp.linalg.inv`` because XLA's CPU
    batched LU / triangular solve is pathologically slow for odd ``L`` (measured 0.5 s vs
    25 ms for 256 blocks of 43 x 43); on GPU both are fast.
    """
    def pivot(k, m):
        piv = m[:, k, k]
        row = m[:, k, :] / piv[:, None]
        col = m[:, :, k]
        m = m - col[:, :, None] * row[:, None, :]
        m = m.at[:, k, :].set(row)
        m = m.at[:, :, k].set(-col / piv[:, None])
        return m.at[:, k, k].set(1 / piv)

    return lax.fori_loop(0, a.shape[-1], pivot, a)


def _hodlr_inverse(h: HodlrFactor, lam) -> _HodlrInverse:
    """Build the Woodbury form bottom-up: a ``lax.scan`` over levels ``P-1 .. 0``; the nodes
    of one level are handled together (their ``C`` by one ``vmap``)."""
    nb, leaf, dd, p = 1 << h.num_partition, h.leaf_size, h.padded_dim, h.num_partition
    real = jnp.arange(dd) < h.dim
    shift = jnp.where(real, lam, jnp.ones((), h.dtype)).reshape(nb, leaf)
    damped = h.leaves + shift[:, :, None] * jnp.eye(leaf, dtype=h.dtype)
    leaf_inv = _spd_inverse(damped)
    num_tiles = nb - 1
    zeros = jnp.zeros((p, dd // 2), h.dtype)
    inv = _HodlrInverse(leaf_inv=leaf_inv, z0=zeros, z1=zeros,
                        c=jnp.zeros((num_tiles, 2, 2), h.dtype))
    if p == 0:
        return inv
    col, row, tid, perm, tile_level = (jnp.asarray(t) for t in _tables(dd, p))
    u, s, v = _pack(h)

    def build_level(inv, level):
        # W's two columns for every node of this level at once: [v; 0] and [0; u] share no
        # rows, so one D-vector (v at column positions, u at row positions) carries both.
        w = jnp.take_along_axis(jnp.concatenate([v[level], u[level]]), perm[level], axis=0)
        r = _apply_inverse(h, inv, w[:, None])[:, 0]       # children solves (levels > level)
        z0, z1 = r[col[level]], r[row[level]]
        seg = dict(num_segments=num_tiles, indices_are_sorted=True)
        alpha = jax.ops.segment_sum(v[level] * z0, tid[level], **seg)   # v^T M1^-1 v
        beta = jax.ops.segment_sum(u[level] * z1, tid[level], **seg)    # u^T M2^-1 u
        c = jax.vmap(_woodbury_core)(s, alpha, beta)
        mine = (tile_level == level)[:, None, None]
        inv = inv.replace(z0=inv.z0.at[level].set(z0), z1=inv.z1.at[level].set(z1),
                          c=jnp.where(mine, c, inv.c))
        return inv, None

    inv, _ = lax.scan(build_level, inv, jnp.arange(p - 1, -1, -1))
    return inv


def _hodlr_inv_diag(h: HodlrFactor, lam) -> jax.Array:
    inv = _hodlr_inverse(h, lam)
    out = jnp.diagonal(inv.leaf_inv, axis1=1, axis2=2).reshape(-1)
    if h.num_partition:
        tid = jnp.asarray(_tables(h.padded_dim, h.num_partition)[2])
        # rowsum((Z C) * Z): Z's rows are [z0_i, 0] (upper half) or [0, z1_i] (lower half)
        out = out - _per_level_sum(h, inv.c[tid, 0, 0] * inv.z0 ** 2,
                                   inv.c[tid, 1, 1] * inv.z1 ** 2)
    return out[: h.dim]


def _dense_damped(h: DenseFactor, lam):
    return h.mat + lam * jnp.eye(h.dim, dtype=h.dtype)


@partial(jax.jit, static_argnames=("relative",))
def inv_diag(h: Factor, damping=1e-6, relative: bool = False) -> jax.Array:
    """``diag((F + lam I)^-1)``, ``[dim]``; ``lam = damping`` or ``damping * mean(diag F)``.

    hodlr: bottom-up Woodbury (ALGORITHM.md section 2). At a node with children ``M1, M2``:
    ``M = D + W S W^T``, ``D = blockdiag(M1, M2)``, ``W = [[v, 0], [0, u]]``,
    ``S = [[0, s], [s, 0]]``; ``M^-1 = D^-1 - Z C Z^T`` with ``Z = D^-1 W`` and
    ``C = (I + S W^T Z)^-1 S`` (safe for ``s = 0``), so
    ``diag(M^-1) = [diag(M1^-1); diag(M2^-1)] - rowsum((Z C) * Z)``. ``Z`` needs solves
    with the children, which reuse the ``Z, C`` of the deeper levels; the damped ``L x L``
    leaves are inverted densely (batched Gauss-Jordan, SPD; so ``damping`` must be > 0
    unless every leaf is already positive definite). Cost ``O(P (d L + P d))``, memory ``O(d L)``.
    It matches ``numpy.linalg.inv`` of the assembled HODLR matrix (not of the exact ``F``).

    Caveat: the HODLR matrix of a rank-deficient ``F`` (e.g. 128 calibration vectors) is in
    general indefinite (exact leaves, rank-1-truncated tiles), so a tiny damping can give
    negative or huge entries: with 128 vectors at ``d = 576``, ``P = 8`` and
    ``damping = 1e-6`` about 5-16 % of the entries came out negative; relative damping
    ``0.1`` gave none. Prefer ``relative=True`` with ``damping ~ 0.1``.
    dense: Cholesky (falls back to LU if ``F + lam I`` is not positive definite);
    diagonal: ``1 / (d + lam)``.
    """
    _check_factor(h)
    lam = _damping(h, damping, relative)
    if isinstance(h, DiagonalFactor):
        return 1.0 / (h.d + lam)
    if isinstance(h, DenseFactor):
        m = _dense_damped(h, lam)
        chol = jnp.linalg.cholesky(m)
        eye = jnp.eye(h.dim, dtype=h.dtype)

        def by_cholesky(_):
            li = jax.scipy.linalg.solve_triangular(chol, eye, lower=True)
            return jnp.sum(li * li, axis=0)

        def by_lu(_):
            return jnp.diagonal(jnp.linalg.solve(m, eye))

        return lax.cond(jnp.all(jnp.isfinite(chol)), by_cholesky, by_lu, None)
    return _hodlr_inv_diag(h, lam)


@partial(jax.jit, static_argnames=("relative",))
def solve(h: Factor, x, damping=1e-6, relative: bool = False) -> jax.Array:
    """``(F + lam I)^-1 x`` for ``x [dim]`` or ``[dim, k]`` (same damping as :func:`inv_diag`).

    hodlr: the same bottom-up Woodbury form, applied top-down as a sum of per-level
    rank-2 corrections; never forms a ``d x d`` matrix.
    """
    _check_factor(h)
    lam = _damping(h, damping, relative)
    xp, vec = _as_cols(h, x, "x")
    if isinstance(h, DiagonalFactor):
        y = xp / (h.d + lam)[:, None]
    elif isinstance(h, DenseFactor):
        y = jnp.linalg.solve(_dense_damped(h, lam), xp)
    else:
        y = _apply_inverse(h, _hodlr_inverse(h, lam), xp)[: h.dim]
    return y[:, 0] if vec else y
