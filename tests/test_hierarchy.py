"""Tests for sylva_jax.curvature (HODLR, dense, diagonal factors) against NumPy float64 references.

References are independent of the code under test: the HODLR matrix is assembled in NumPy
straight from the factor's fields (explicit node slices, docs/algorithm.md §2), the
Brand step is recomputed in NumPy from its definition and compared with NumPy SVDs, and
inverse diagonals come from ``numpy.linalg.inv``. float64 runs inside ``jax.enable_x64``
(restored afterwards, so other test files are unaffected).
"""
from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sylva_jax import curvature as H
from sylva_jax.curvature import hodlr


@contextlib.contextmanager
def _x64():
    if hasattr(jax, "enable_x64"):
        with jax.enable_x64(True):
            yield
    else:  # older / newer jax without the context manager: flip and restore the flag
        old = jax.config.jax_enable_x64
        jax.config.update("jax_enable_x64", True)
        try:
            yield
        finally:
            jax.config.update("jax_enable_x64", old)


@pytest.fixture
def x64():
    with _x64():
        yield


# --------------------------------------------------------------------------- helpers


def np_assemble(h) -> np.ndarray:
    """The HODLR matrix from the factor's fields, in NumPy float64 (independent of to_dense)."""
    dd, p, leaf = h.padded_dim, h.num_partition, h.leaf_size
    f = np.zeros((dd, dd))
    leaves = np.asarray(h.leaves, np.float64)
    for j in range(1 << p):
        f[j * leaf:(j + 1) * leaf, j * leaf:(j + 1) * leaf] = leaves[j]
    for k in range(p):
        hk = dd >> (k + 1)
        for j in range(1 << k):
            u = np.asarray(h.u[k][j], np.float64)
            v = np.asarray(h.v[k][j], np.float64)
            tile = float(h.s[k][j]) * np.outer(u, v)       # rows: lower half, cols: upper half
            r0, c0 = 2 * hk * j + hk, 2 * hk * j
            f[r0:r0 + hk, c0:c0 + hk] = tile
            f[c0:c0 + hk, r0:r0 + hk] = tile.T
    return f[: h.dim, : h.dim]


def tile_of(mat: np.ndarray, padded_dim: int, k: int, j: int) -> np.ndarray:
    """Lower-left tile of node j at level k of a (padded) [D, D] matrix."""
    hk = padded_dim >> (k + 1)
    r0, c0 = 2 * hk * j + hk, 2 * hk * j
    return mat[r0:r0 + hk, c0:c0 + hk]


def factor_tile(h, k: int, j: int) -> np.ndarray:
    return float(h.s[k][j]) * np.outer(np.asarray(h.u[k][j]), np.asarray(h.v[k][j]))


def random_factor(dim: int, p: int, rng, dtype=np.float64, zero_frac: float = 0.25):
    """A random HODLR factor (SPD leaves, unit u/v, s >= 0 with some exact zeros), padded
    entries exactly zero, as `update` would leave them."""
    h = H.init(dim, p, dtype)
    dd, leaf = h.padded_dim, h.leaf_size
    real = np.arange(dd) < dim
    b = rng.standard_normal((1 << p, leaf, leaf))
    leaves = b @ np.swapaxes(b, 1, 2) / leaf + np.eye(leaf)
    rmask = real.reshape(1 << p, leaf)
    leaves = leaves * rmask[:, :, None] * rmask[:, None, :]
    us, ss, vs = [], [], []
    for k in range(p):
        hk = dd >> (k + 1)
        m3 = real.reshape(1 << k, 2, hk)
        u = rng.standard_normal((1 << k, hk)) * m3[:, 1]
        v = rng.standard_normal((1 << k, hk)) * m3[:, 0]
        nu = np.linalg.norm(u, axis=1, keepdims=True)
        nv = np.linalg.norm(v, axis=1, keepdims=True)
        u, v = np.where(nu > 0, u / np.where(nu > 0, nu, 1), 0), np.where(nv > 0, v / np.where(nv > 0, nv, 1), 0)
        s = rng.uniform(0.05, 0.6, 1 << k) * (rng.uniform(size=1 << k) >= zero_frac)
        s = s * (nu[:, 0] > 0) * (nv[:, 0] > 0)
        if zero_frac > 0 and k == p - 1 and p >= 2:
            s[0] = 0.0                                   # at least one empty tile
        us.append(jnp.asarray(u, dtype))
        ss.append(jnp.asarray(s, dtype))
        vs.append(jnp.asarray(v, dtype))
    return h.replace(leaves=jnp.asarray(leaves, dtype), u=tuple(us), s=tuple(ss), v=tuple(vs))


def brand_reference(u, s, v, a_row, a_col):
    """One Brand step in NumPy from its definition in docs/algorithm.md §2: returns (s', tile')."""
    m = u @ a_row
    p = a_row - u * m
    ra = np.linalg.norm(p)
    n = v @ a_col
    q = a_col - v * n
    rb = np.linalg.norm(q)
    core = np.array([[s, 0.0], [0.0, 0.0]]) + np.outer([m, ra], [n, rb])
    cu, cs, cvt = np.linalg.svd(core)
    ub = np.stack([u, p / ra], 1) @ cu[:, 0]
    vb = np.stack([v, q / rb], 1) @ cvt[0]
    return cs[0], cs[0] * np.outer(ub, vb)


def top_rank1(mat: np.ndarray) -> np.ndarray:
    uu, ss, vvt = np.linalg.svd(mat)
    return ss[0] * np.outer(uu[:, 0], vvt[0])


# --------------------------------------------------------------------------- structure


def test_top_triple_2x2_matches_numpy_svd(x64):
    rng = np.random.default_rng(0)
    mats = [rng.standard_normal((2, 2)) for _ in range(20)]
    mats += [np.zeros((2, 2)), np.eye(2), np.diag([0.0, 3.0]), np.outer([1.0, -2.0], [0.5, 4.0]),
             np.array([[0.0, 2.0], [-2.0, 0.0]])]
    for k in mats:
        sigma, x, y = jax.jit(hodlr._top_triple_2x2)(jnp.asarray(k))
        sigma, x, y = float(sigma), np.asarray(x), np.asarray(y)
        assert sigma == pytest.approx(np.linalg.svd(k, compute_uv=False)[0], abs=1e-12)
        assert np.linalg.norm(x) == pytest.approx(1.0, abs=1e-12)
        assert np.linalg.norm(y) == pytest.approx(1.0, abs=1e-12)
        # a singular pair of the top value (valid even when sigma1 == sigma2, e.g. eye)
        np.testing.assert_allclose(k @ y, sigma * x, atol=1e-12)
        np.testing.assert_allclose(k.T @ x, sigma * y, atol=1e-12)


def test_update_leaves_exact_and_tiles_match_numpy_assembly(x64):
    rng = np.random.default_rng(1)
    dim, p = 100, 3                                   # padded to 104, leaves of 13
    xs = rng.standard_normal((9, dim))
    h = H.update(H.init(dim, p, jnp.float64), xs)
    assert h.padded_dim == 104 and h.leaf_size == 13 and h.dim == dim and h.num_partition == p
    dense = np.asarray(H.to_dense(h))
    assert dense.shape == (dim, dim)
    np.testing.assert_allclose(dense, np_assemble(h), atol=1e-12)   # to_dense == fields
    exact = xs.T @ xs
    for j in range(1 << p):                           # leaves: exact sums of outer products
        sl = slice(13 * j, min(13 * (j + 1), dim))
        np.testing.assert_allclose(dense[sl, sl], exact[sl, sl], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.asarray(H.diag(h)), np.diag(exact), rtol=1e-12)
    for k in range(p):                                # tiles rank-1 with unit u, v
        for j in range(1 << k):
            assert np.linalg.norm(h.u[k][j]) == pytest.approx(1.0, abs=1e-12)
            assert np.linalg.norm(h.v[k][j]) == pytest.approx(1.0, abs=1e-12)
            assert float(h.s[k][j]) > 0
    # the padded entries of every u, v stay exactly zero
    assert np.all(np.asarray(h.u[0])[0, 52 - 4:] == 0)
    assert H.nbytes(h) == 8 * (104 * 13 + p * 104 + (1 << p) - 1)


def test_brand_step_matches_numpy_core_svd(x64):
    rng = np.random.default_rng(2)
    dim, p = 32, 2
    h = random_factor(dim, p, rng, zero_frac=0.0)
    a = rng.standard_normal(dim)
    h2 = H.update(h, a)
    for k in range(p):
        hk = dim >> (k + 1)
        for j in range(1 << k):
            u, v, s = np.asarray(h.u[k][j]), np.asarray(h.v[k][j]), float(h.s[k][j])
            a_col = a[2 * hk * j: 2 * hk * j + hk]
            a_row = a[2 * hk * j + hk: 2 * hk * j + 2 * hk]
            s_ref, tile_ref = brand_reference(u, s, v, a_row, a_col)
            assert float(h2.s[k][j]) == pytest.approx(s_ref, rel=1e-12)
            np.testing.assert_allclose(factor_tile(h2, k, j), tile_ref, atol=1e-12)
            # the previous state was exactly rank 1, so this is also the top triple of the
            # exact updated tile
            exact = s * np.outer(u, v) + np.outer(a_row, a_col)
            np.testing.assert_allclose(factor_tile(h2, k, j), top_rank1(exact), atol=1e-12)
            assert np.linalg.norm(h2.u[k][j]) == pytest.approx(1.0, abs=1e-12)


def test_brand_first_sample_and_zero_guards(x64):
    dim, p = 16, 1
    rng = np.random.default_rng(3)
    a = rng.standard_normal(dim)
    h = H.update(H.init(dim, p, jnp.float64), a)
    # first sample: u = a_row/|a_row|, v = a_col/|a_col|, s = |a_row||a_col|
    a_col, a_row = a[:8], a[8:]
    assert float(h.s[0][0]) == pytest.approx(np.linalg.norm(a_row) * np.linalg.norm(a_col), rel=1e-13)
    np.testing.assert_allclose(factor_tile(h, 0, 0), np.outer(a_row, a_col), atol=1e-13)
    # a vector in the span of (u, v): ra = rb = 0 must not produce NaN nor drop the update
    b = np.concatenate([-2.0 * a_col, 3.0 * a_row])
    h2 = H.update(h, b)
    np.testing.assert_allclose(factor_tile(h2, 0, 0), np.outer(a_row, a_col) + np.outer(3 * a_row, -2 * a_col),
                               atol=1e-12)
    # a zero vector changes nothing; a zero half keeps the tile and only moves the leaf
    h3 = H.update(h2, np.zeros(dim))
    np.testing.assert_allclose(np_assemble(h3), np_assemble(h2), atol=1e-14)
    c = np.concatenate([np.zeros(8), rng.standard_normal(8)])
    h4 = H.update(h2, c)
    np.testing.assert_allclose(factor_tile(h4, 0, 0), factor_tile(h2, 0, 0), atol=1e-13)
    assert np.all(np.isfinite(np_assemble(h4)))
    # from empty, a vector with one zero half leaves the tile empty (u = v = 0, s = 0)
    h5 = H.update(H.init(dim, p, jnp.float64), c)
    assert float(h5.s[0][0]) == 0 and not np.any(np.asarray(h5.u[0])) and not np.any(np.asarray(h5.v[0]))


# One shape for every update / update_block call below, so each compiles once:
# dim 128, P = 4 (tiles h = 64, 32, 16 take the streaming Brand path with chunk 8,
# h = 8 the small exact path), 40 vectors (5 chunks).
BLK_DIM, BLK_P, BLK_N, BLK_CHUNK, BLK_RANK = 128, 4, 40, 8, 4


def _seq_and_block(xs):
    seq = H.update(H.init(BLK_DIM, BLK_P, jnp.float64), xs)
    blk = H.update_block(H.init(BLK_DIM, BLK_P, jnp.float64), xs, chunk=BLK_CHUNK, rank=BLK_RANK)
    return seq, blk


def test_rank1_consistent_input_is_exact_for_update_and_update_block(x64):
    rng = np.random.default_rng(4)
    dim, n = BLK_DIM, BLK_N
    # (a) every vector proportional to one w: every tile of every level is exactly rank 1
    w = rng.standard_normal(dim)
    xs = rng.standard_normal(n)[:, None] * w[None, :]
    exact = xs.T @ xs
    for h in _seq_and_block(xs):
        np.testing.assert_allclose(np_assemble(h), exact, rtol=1e-11, atol=1e-11)
    # (b) only the level-0 tile is rank 1: row/col halves proportional with random weights
    a, b = rng.standard_normal(dim // 2), rng.standard_normal(dim // 2)
    alpha, beta = rng.standard_normal(n), rng.standard_normal(n)
    xs = np.concatenate([alpha[:, None] * a, beta[:, None] * b], axis=1)
    tile0 = np.outer(b, a) * np.sum(alpha * beta)
    for h in _seq_and_block(xs):
        np.testing.assert_allclose(factor_tile(h, 0, 0), tile0, rtol=1e-11, atol=1e-11)


def test_update_block_vs_sequential_and_optimal(x64):
    rng = np.random.default_rng(5)
    dim, p, chunk = BLK_DIM, BLK_P, BLK_CHUNK
    # decaying spectrum, like activations: a few dominant directions plus noise
    basis = np.linalg.qr(rng.standard_normal((dim, dim)))[0]
    xs = (rng.standard_normal((BLK_N, dim)) * 0.6 ** np.arange(dim)) @ basis.T
    exact = xs.T @ xs
    seq, blk = _seq_and_block(xs)
    # only the first chunk non-zero (zero vectors add nothing): a single Brand step
    xs_one = np.where(np.arange(BLK_N)[:, None] < chunk, xs, 0.0)
    one = _seq_and_block(xs_one)[1]
    np.testing.assert_allclose(np.asarray(blk.leaves), np.asarray(seq.leaves), rtol=1e-12)
    exact_one = xs_one.T @ xs_one
    for k in range(p):
        for j in range(1 << k):
            t_exact = tile_of(exact, dim, k, j)
            e_opt = np.linalg.norm(t_exact - top_rank1(t_exact))
            e_seq = np.linalg.norm(t_exact - factor_tile(seq, k, j))
            e_blk = np.linalg.norm(t_exact - factor_tile(blk, k, j))
            assert e_blk <= e_seq * (1 + 1e-12) + 1e-12
            # streaming with a rank-4 working state on a fast-decaying spectrum: within 1 %
            # of the Eckart-Young optimum (sequential rank-1 truncation is not)
            assert e_blk <= e_opt * 1.01 + 1e-12
            # one chunk (n <= chunk) is a single Brand step: exactly the optimum
            t1 = tile_of(exact_one, dim, k, j)
            np.testing.assert_allclose(factor_tile(one, k, j), top_rank1(t1), atol=1e-10)
    assert max(np.linalg.norm(tile_of(exact, dim, 0, 0) - factor_tile(seq, 0, 0))
               - np.linalg.norm(tile_of(exact, dim, 0, 0) - factor_tile(blk, 0, 0)), 0) > 0


# --------------------------------------------------------------------------- products


def test_matmat_matches_dense(x64):
    rng = np.random.default_rng(6)
    dim, p = 100, 3
    h = random_factor(dim, p, rng)
    dense = np_assemble(h)
    x = rng.standard_normal((dim, 5))
    np.testing.assert_allclose(np.asarray(H.matmat(h, x)), dense @ x, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.asarray(H.matmat(h, x[:, 0])), dense @ x[:, 0], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.asarray(H.to_dense(h)), dense, atol=1e-14)


# (dim, P): P = 1 .. 6, leaf size 1 (64, 6), odd leaves (96, 5 -> L = 3), padding (1000, 4)
GRID = [(64, 1), (64, 6), (96, 5), (512, 3), (1000, 4), (2048, 6)]


@pytest.mark.parametrize("dim,p", GRID)
def test_inv_diag_matches_numpy_inverse(x64, dim, p):
    rng = np.random.default_rng(dim + p)
    h = random_factor(dim, p, rng, zero_frac=0.25)                  # includes s = 0 tiles
    if p >= 2:
        assert any(float(s) == 0 for lev in h.s for s in np.asarray(lev))
    dense = np_assemble(h)
    lam = 1e-3
    ref = np.diag(np.linalg.inv(dense + lam * np.eye(dim)))
    got = np.asarray(H.inv_diag(h, lam))
    assert got.shape == (dim,)
    np.testing.assert_allclose(got, ref, rtol=1e-4)
    # float64 end to end, so in fact far tighter than the 1e-4 asked for
    np.testing.assert_allclose(got, ref, rtol=1e-9)


def test_inv_diag_relative_damping_and_solve(x64):
    rng = np.random.default_rng(7)
    dim, p = 96, 5
    h = random_factor(dim, p, rng)
    dense = np_assemble(h)
    lam = 0.05 * np.mean(np.diag(dense))
    m = dense + lam * np.eye(dim)
    got = np.asarray(H.inv_diag(h, 0.05, relative=True))
    np.testing.assert_allclose(got, np.diag(np.linalg.inv(m)), rtol=1e-10)
    x = rng.standard_normal((dim, 3))
    np.testing.assert_allclose(np.asarray(H.solve(h, x, 0.05, relative=True)), np.linalg.solve(m, x),
                               rtol=1e-9, atol=1e-10)


def test_inv_diag_all_tiles_zero_is_leaf_inverse(x64):
    rng = np.random.default_rng(8)
    h = random_factor(64, 3, rng, zero_frac=1.0)                    # every s = 0
    dense = np_assemble(h)
    got = np.asarray(H.inv_diag(h, 0.0))                            # no damping at all
    np.testing.assert_allclose(got, np.diag(np.linalg.inv(dense)), rtol=1e-12)


def test_inv_diag_float32(x64):
    rng = np.random.default_rng(9)
    dim, p = 1000, 4
    h64 = random_factor(dim, p, rng)
    h32 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), h64)
    # reference: float64 inverse of the float32-rounded factor (same matrix as computed on)
    dense = np_assemble(h32)
    lam = 1e-3
    m = dense + lam * np.eye(dim)
    ref = np.diag(np.linalg.inv(m))
    got = np.asarray(H.inv_diag(h32, lam))
    assert got.dtype == np.float32
    # Bound: each leaf inverse and each rank-2 Woodbury correction is a backward-stable
    # small solve, so the relative error of a diagonal entry is about cond(M) * eps32 per
    # level, amplified by at most the P levels it accumulates over. Allow 10x that.
    eig = np.abs(np.linalg.eigvalsh(m))                         # m is symmetric
    cond = eig.max() / eig.min()
    tol = 10 * p * cond * np.finfo(np.float32).eps
    assert tol < 1e-2, "test matrix too ill-conditioned for a meaningful float32 bound"
    err = np.max(np.abs(got - ref) / np.abs(ref))
    assert err <= tol, (err, tol, cond)
    print(f"float32 inv_diag: max rel err {err:.2e}, bound {tol:.2e}, cond {cond:.3g}")


# --------------------------------------------------------------------------- other kinds


def test_dense_and_diagonal_kinds_match_numpy(x64):
    rng = np.random.default_rng(10)
    dim = 24
    xs = rng.standard_normal((30, dim))
    exact = xs.T @ xs
    x = rng.standard_normal((dim, 3))
    lam = 1e-2
    for kind in ("dense", "diagonal"):
        h = H.update(H.init(dim, 8, jnp.float64, kind=kind), xs[:10])
        h = H.update_block(h, xs[10:])
        ref = exact if kind == "dense" else np.diag(np.diag(exact))
        assert h.kind == kind and h.dim == dim and h.num_partition == 0
        np.testing.assert_allclose(np.asarray(H.to_dense(h)), ref, rtol=1e-12)
        np.testing.assert_allclose(np.asarray(H.matmat(h, x)), ref @ x, rtol=1e-12)
        np.testing.assert_allclose(np.asarray(H.diag(h)), np.diag(exact), rtol=1e-12)
        np.testing.assert_allclose(np.asarray(H.inv_diag(h, lam)),
                                   np.diag(np.linalg.inv(ref + lam * np.eye(dim))), rtol=1e-10)
        rel = lam * np.mean(np.diag(exact))
        np.testing.assert_allclose(np.asarray(H.inv_diag(h, lam, relative=True)),
                                   np.diag(np.linalg.inv(ref + rel * np.eye(dim))), rtol=1e-10)
        np.testing.assert_allclose(np.asarray(H.solve(h, x, lam)),
                                   np.linalg.solve(ref + lam * np.eye(dim), x), rtol=1e-9)
    assert H.nbytes(H.init(dim, kind="dense")) == dim * dim * 4
    assert H.nbytes(H.init(dim, kind="diagonal")) == dim * 4


def test_dense_inv_diag_falls_back_when_not_positive_definite(x64):
    m = np.array([[1.0, 2.0], [2.0, 1.0]])                         # eigenvalues 3, -1
    h = H.init(2, kind="dense", dtype=jnp.float64).replace(mat=jnp.asarray(m))
    np.testing.assert_allclose(np.asarray(H.inv_diag(h, 0.0)), np.diag(np.linalg.inv(m)), rtol=1e-12)


# --------------------------------------------------------------------------- errors


def test_errors_are_clear():
    with pytest.raises(ValueError, match=r"largest num_partition allowed for dim=100 is 6"):
        H.init(100, 7)
    with pytest.raises(ValueError, match="kind must be one of"):
        H.init(16, 2, kind="lowrank")
    h = H.init(16, 2)
    with pytest.raises(ValueError, match=r"shape \[16\] or \[n, 16\].*got shape \(3, 15\)"):
        H.update(h, np.zeros((3, 15), np.float32))
    with pytest.raises(ValueError, match=r"shape \[16\] or \[n, 16\]"):
        H.update_block(h, np.zeros((2, 3, 16), np.float32))
    with pytest.raises(ValueError, match=r"shape \[16\] or \[16, k\]"):
        H.matmat(h, np.zeros((15,), np.float32))
    with pytest.raises(ValueError, match="floating"):
        H.update(h, np.zeros((2, 16), np.int32))
    with pytest.raises(TypeError, match="expected a factor"):
        H.inv_diag(np.eye(3))
    assert H.max_num_partition(100) == 6 and H.max_num_partition(64) == 6
    H.init(100, 6)                                                 # the largest allowed works


# --------------------------------------------------------------------------- no d x d arrays


def _big_vars(jaxpr, limit: int) -> list:
    """Every var (inputs, outputs, constants of every equation, recursing into sub-jaxprs of
    pjit / scan / cond / custom calls) whose shape has >= 2 dims of size >= limit."""
    found = []

    def big(v):
        shape = getattr(getattr(v, "aval", None), "shape", ())
        return sum(int(d) >= limit for d in shape) >= 2

    def subjaxprs(val):
        if hasattr(val, "eqns"):
            yield val
        elif hasattr(val, "jaxpr") and hasattr(val.jaxpr, "eqns"):
            yield val.jaxpr
        elif isinstance(val, (list, tuple)):
            for item in val:
                yield from subjaxprs(item)

    def walk(jx):
        for v in list(jx.invars) + list(jx.outvars) + list(jx.constvars):
            if big(v):
                found.append(("jaxpr io", v.aval.shape))
        for eqn in jx.eqns:
            for v in list(eqn.invars) + list(eqn.outvars):
                if big(v):
                    found.append((eqn.primitive.name, v.aval.shape))
            for val in eqn.params.values():
                for sub in subjaxprs(val):
                    walk(sub)

    walk(jaxpr.jaxpr)
    return found


def test_no_dim_by_dim_intermediates():
    # Criterion: no var anywhere in the jaxpr has two or more dims of size >= dim/2
    # (a d x d array, or even one d/2 x d/2 tile, would be flagged).
    dim, p = 4096, 8
    h = H.init(dim, p)
    x = jnp.zeros((dim, 8))
    xs = jnp.zeros((16, dim))
    limit = dim // 2
    assert _big_vars(jax.make_jaxpr(lambda f: H.inv_diag(f, 1e-6))(h), limit) == []
    assert _big_vars(jax.make_jaxpr(lambda f: H.inv_diag(f, 1e-2, relative=True))(h), limit) == []
    assert _big_vars(jax.make_jaxpr(H.matmat)(h, x), limit) == []
    assert _big_vars(jax.make_jaxpr(H.solve)(h, x), limit) == []
    assert _big_vars(jax.make_jaxpr(H.update)(h, xs), limit) == []
    assert _big_vars(jax.make_jaxpr(H.update_block)(h, xs), limit) == []
    # the checker does see a d x d array (inside the pjit of to_dense)
    assert _big_vars(jax.make_jaxpr(H.to_dense)(h), limit) != []


def _lapack_operand_ranks(hlo: str) -> dict:
    """``{lapack target: {rank of its first operand}}`` over the custom calls of ``hlo``."""
    import re
    ranks: dict = {}
    for line in hlo.splitlines():
        m = re.search(r"custom_call @(lapack_\w+)\((.*?)\)\s.*?:\s*\(tensor<([^>]*)>", line)
        if m:
            dims = [d for d in m.group(3).split("x")[:-1]]
            ranks.setdefault(m.group(1), set()).add(len(dims))
    return ranks


def test_update_block_lapack_calls_stay_unbatched_under_vmap_on_cpu(monkeypatch):
    """On the CPU, the QR / SVD calls of the per-token update are unbatched even when
    update_block is vmapped over layer slots (as capture does): jaxlib 0.10's batched
    LAPACK kernels fan out onto XLA's thread pool and deadlock it when several run at once
    (observed: per-token calibration of SmolLM2 hung with every thread idle). Numerics are
    covered by the update_block tests above, which run through the same code."""
    dim, p, slots = 256, 2, 3   # level 0: 128-wide tiles (Brand QR + core SVD); level 1: 64 (SVD)
    hs = jax.tree.map(lambda a: jnp.broadcast_to(a, (slots,) + a.shape), H.init(dim, p))
    xs = jnp.ones((slots, 100, dim))
    f = jax.jit(jax.vmap(lambda h, x: H.update_block(h, x, chunk=64, rank=8)))
    ranks = _lapack_operand_ranks(f.lower(hs, xs).as_text())
    qr = [k for k in ranks if "geqrf" in k]
    svd = [k for k in ranks if "gesdd" in k or "gesvd" in k]
    assert qr and svd, ranks
    assert all(r == {2} for r in ranks.values()), ranks
    # and the serial form gives the batched form's result
    out = f(hs, xs + jnp.arange(dim) / dim)
    monkeypatch.setattr(hodlr, "_on_cpu", lambda: False)
    jax.clear_caches()  # update_block's trace depends on _on_cpu
    batched = jax.jit(jax.vmap(lambda h, x: H.update_block(h, x, chunk=64, rank=8)))
    assert any(r != {2} for r in _lapack_operand_ranks(batched.lower(hs, xs).as_text()).values())
    ref = batched(hs, xs + jnp.arange(dim) / dim)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5 * float(jnp.abs(b).max()))
    monkeypatch.undo()
    jax.clear_caches()


def test_from_dense_is_one_block_update_and_round_trips(x64):
    """from_dense(X^T X) = update_block with all vectors in one block (exact leaves, top
    singular triple of each exact tile), and from_dense(to_dense(h)) = h for a HODLR h."""
    rng = np.random.default_rng(3)
    dim, p = 100, 3   # padded to 104: padding rows / columns stay zero
    x = rng.normal(size=(40, dim))
    one_block = H.update_block(H.init(dim, p, dtype=jnp.float64), jnp.asarray(x), chunk=64)
    g = H.from_dense(jnp.asarray(x.T @ x), num_partition=p)
    assert g.num_partition == p and g.padded_dim == one_block.padded_dim
    np.testing.assert_allclose(np.asarray(H.to_dense(g)), np.asarray(H.to_dense(one_block)),
                               atol=1e-10 * np.abs(x.T @ x).max())
    np.testing.assert_allclose(np.asarray(H.diag(g)), np.sum(x * x, axis=0), rtol=1e-12)
    back = H.from_dense(H.to_dense(one_block), num_partition=p)
    np.testing.assert_allclose(np.asarray(H.to_dense(back)), np.asarray(H.to_dense(one_block)),
                               atol=1e-10 * np.abs(x.T @ x).max())
    with pytest.raises(ValueError, match="square"):
        H.from_dense(jnp.zeros((3, 4)))


def test_hierarchy_module_re_exports_the_curvature_interface():
    """``sylva_jax.hierarchy`` (the old home) serves the same objects as ``curvature``."""
    from sylva_jax import hierarchy

    for name in H.__all__:
        assert getattr(hierarchy, name) is getattr(H, name), name
    with pytest.raises(TypeError, match="expected a factor"):
        H.diag(np.ones(3))
    with pytest.raises(ValueError, match="kind must be one of"):
        H.init(8, kind="sparse")
