"""Tile scorers (sylva_jax/scorers) and budget allocation (sylva_jax/allocation.py) against
independent float64 NumPy references on small random statistics."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from sylva_jax import allocation, capture, curvature, importance

BS = 4


def _spd(rng, d, n):
    x = rng.normal(size=(n, d)) * rng.uniform(0.5, 2.0, size=d)
    return x.T @ x


def make_layer(rng, o, i, *, n=40, kind="dense", num_partition=2, name="w"):
    """A LayerStats with exact factors (sums over n samples) of the given kind."""
    A, G = _spd(rng, i, n), _spd(rng, o, n)
    if kind == "hodlr":
        fa, fg = (curvature.from_dense(jnp.asarray(F, jnp.float32), num_partition) for F in (A, G))
    else:
        fa, fg = (curvature.init(F.shape[0], kind="dense").replace(mat=jnp.asarray(F, jnp.float32))
                  for F in (A, G))
    gbar = rng.normal(size=(o, i))
    return capture.LayerStats(
        name=name, weight=jnp.asarray(rng.normal(size=(o, i)), jnp.float32), A=fa, G=fg,
        grad_mean=jnp.asarray(gbar, jnp.float32), num_samples=n,
        grad_sq_mean=jnp.asarray(gbar ** 2 + rng.random(size=(o, i)), jnp.float32),
        A_dense=jnp.asarray(A, jnp.float32), G_dense=jnp.asarray(G, jnp.float32))


def stats_of(*layers, relative=False):
    return capture.Stats(layers={s.name: s for s in layers}, num_samples=layers[0].num_samples,
                         relative_damping=relative)


def tiles(x, bs=BS):
    o, i = x.shape
    return x.reshape(o // bs, bs, i // bs, bs).sum(axis=(1, 3))


def f64(x):
    return np.asarray(x, np.float64)


# ----------------------------------------------------------------------------- first order


def test_fisher_grad_sq_adam_gain_match_numpy():
    rng = np.random.default_rng(0)
    s = make_layer(rng, 2 * BS, 3 * BS)
    st = stats_of(s)
    g, f, n = f64(s.grad_mean), f64(s.grad_sq_mean), s.num_samples
    np.testing.assert_allclose(importance.tile_scores(st, block_size=BS, method="fisher")["w"],
                               tiles(f), rtol=1e-6)
    np.testing.assert_allclose(importance.tile_scores(st, block_size=BS, method="grad_sq")["w"],
                               tiles(g ** 2), rtol=1e-6)
    for b, eps in ((4, 1e-12), (1, 1e-3)):
        var = (f - g ** 2) * n / (n - 1)
        ref = tiles(g ** 2 / np.sqrt(g ** 2 + var / b + eps))
        got = importance.tile_scores(st, block_size=BS, method="adam_gain", b=b, eps=eps)["w"]
        np.testing.assert_allclose(got, ref, rtol=1e-5)
    # a noisier gradient (larger per-sample variance) gains less
    noisy = make_layer(np.random.default_rng(0), 2 * BS, 3 * BS)
    noisy.grad_sq_mean = noisy.grad_sq_mean + 10.0
    lo = importance.tile_scores(stats_of(noisy), block_size=BS, method="adam_gain")["w"]
    assert np.all(lo < importance.tile_scores(st, block_size=BS, method="adam_gain")["w"])


def test_per_sample_scorers_need_per_sample_statistics():
    s = make_layer(np.random.default_rng(1), BS, BS)
    s.grad_sq_mean = None
    for m in ("fisher", "adam_gain"):
        with pytest.raises(ValueError, match=r"per_sample=True"):
            importance.tile_scores(stats_of(s), block_size=BS, method=m)
    with pytest.raises(TypeError, match=r"takes no keyword\(s\) \['b'\]"):
        importance.tile_scores(stats_of(s), block_size=BS, method="grad", b=2)


# ----------------------------------------------------------------------------- Newton family


def _damped_means(s, damping):
    n = s.num_samples
    A, G = f64(s.A_dense) / n, f64(s.G_dense) / n
    r = np.sqrt(damping)
    return (A + r * np.mean(np.diag(A)) * np.eye(len(A)),
            G + r * np.mean(np.diag(G)) * np.eye(len(G)))


@pytest.mark.parametrize("kind", ["dense", "hodlr"])
def test_newton_matches_numpy(kind):
    rng = np.random.default_rng(2)
    s = make_layer(rng, 2 * BS, 4 * BS, kind=kind)
    if kind == "hodlr":  # the HODLR matrix is what the solves invert exactly
        s.A_dense, s.G_dense = curvature.to_dense(s.A), curvature.to_dense(s.G)
    for damping in (1e-2, 0.3):
        Ad, Gd = _damped_means(s, damping)
        iA, iG = np.linalg.inv(Ad), np.linalg.inv(Gd)
        D = iG @ f64(s.grad_mean) @ iA
        ref = tiles(D ** 2 / np.outer(np.diag(iG), np.diag(iA)))
        got = importance.tile_scores(stats_of(s), block_size=BS, method="newton",
                                     damping=damping)["w"]
        np.testing.assert_allclose(got, ref, rtol=2e-3)


def test_tile_newton_matches_kronecker_solve():
    rng = np.random.default_rng(3)
    s = make_layer(rng, 2 * BS, 3 * BS)
    damping = 5e-2
    Ad, Gd = _damped_means(s, damping)
    g = f64(s.grad_mean)
    ref = np.zeros((2, 3))
    for r in range(2):
        for c in range(3):
            rows, cols = slice(r * BS, (r + 1) * BS), slice(c * BS, (c + 1) * BS)
            vec = g[rows, cols].ravel(order="F")            # column-major vec
            K = np.kron(Ad[cols, cols], Gd[rows, rows])      # (A_cc (x) G_rr)
            ref[r, c] = 0.5 * vec @ np.linalg.solve(K, vec)
    got = importance.tile_scores(stats_of(s), block_size=BS, method="tile_newton",
                                 damping=damping)["w"]
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    # without kept dense factors the assembled factors' blocks give the same (dense kind)
    s.A_dense = s.G_dense = None
    got2 = importance.tile_scores(stats_of(s), block_size=BS, method="tile_newton",
                                  damping=damping)["w"]
    np.testing.assert_allclose(got2, ref, rtol=1e-4)
    with pytest.raises(ValueError, match="damping > 0"):
        importance.tile_scores(stats_of(s), block_size=BS, method="tile_newton", damping=0.0)


# ----------------------------------------------------------------------------- published numerics


def _published_matmat_ref(h, x):
    """Loop over nodes: stride-h slices, ``s u v^T`` both ways (docs/algorithm.md §2)."""
    d, p = h.padded_dim, h.num_partition
    L = d >> p
    y = np.zeros_like(x)
    leaves = f64(h.leaves)
    for j in range(1 << p):
        y[j * L:(j + 1) * L] += leaves[j] @ x[j * L:(j + 1) * L]
    for k in range(p):
        hk = d >> (k + 1)
        for j in range(1 << k):
            u, v, s = f64(h.u[k][j]), f64(h.v[k][j]), float(h.s[k][j])
            cols, rows = slice(hk * j, hk * j + hk), slice(hk * j + hk, hk * j + 2 * hk)
            y[rows] += s * np.outer(u, v) @ x[cols]
            y[cols] += s * np.outer(u, v) @ x[rows]
    return y


def test_published_matmat_and_leaf_inverse_diagonal():
    rng = np.random.default_rng(4)
    F = _spd(rng, 16, 40)
    h = curvature.from_dense(jnp.asarray(F, jnp.float32), 3)
    x = rng.normal(size=(16, 3))
    got = curvature.published_matmat(h, jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(got, _published_matmat_ref(h, x), rtol=1e-4, atol=1e-3)
    # it is not the product with the assembled matrix (the point of the fidelity arm)
    assert not np.allclose(got, f64(curvature.to_dense(h)) @ x, rtol=1e-2)
    lam = 0.5
    ref = np.concatenate([np.diag(np.linalg.inv(F[j:j + 2, j:j + 2] + lam * np.eye(2)))
                          for j in range(0, 16, 2)])
    np.testing.assert_allclose(curvature.leaf_inv_diag(h, lam), ref, rtol=1e-5)
    with pytest.raises(ValueError, match="HODLR factors only"):
        curvature.leaf_inv_diag(curvature.init(16, kind="dense"), lam)


@pytest.mark.parametrize("published_matvec", [False, True])
def test_sylva_published_matches_numpy(published_matvec):
    rng = np.random.default_rng(5)
    s = make_layer(rng, 2 * BS, 4 * BS, kind="hodlr", num_partition=2)
    lam = 1e-1
    g = f64(s.grad_mean)

    def parts(h, F):
        L = F.shape[0] >> h.num_partition
        inv = np.concatenate([np.diag(np.linalg.inv(F[j:j + L, j:j + L] + lam * np.eye(L)))
                              for j in range(0, F.shape[0], L)])
        return inv, (lambda x: _published_matmat_ref(h, x)) if published_matvec else (
            lambda x: f64(curvature.to_dense(h)) @ x)

    ia, mA = parts(s.A, f64(s.A_dense))
    ig, mG = parts(s.G, f64(s.G_dense))
    in_imp = np.sum(g * mG(g), axis=0) / ia
    out_imp = np.sum(g.T * mA(g.T), axis=0) / ig
    ref = tiles(np.outer(out_imp, in_imp))
    got = importance.tile_scores(stats_of(s), block_size=BS, method="sylva_published",
                                 damping=lam, published_matvec=published_matvec)["w"]
    np.testing.assert_allclose(got, ref, rtol=1e-3)


# ----------------------------------------------------------------------------- allocation


def _scores(rng):
    return {"a": rng.random((2, 3)), "b": rng.random((4, 4)) * 3, "c": rng.random((1, 5))}


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.8, 0.95])
def test_counts_sum_to_budget_and_respect_bounds(sparsity):
    sc = _scores(np.random.default_rng(6))
    budget = sum(allocation.num_kept(sparsity, v.size) for v in sc.values())
    for how in allocation.ALLOCATIONS:
        k = allocation.kept_counts(sc, sparsity, how)
        assert sum(k.values()) == budget, how
        assert all(1 <= k[n] <= sc[n].size for n in sc), (how, k)


def test_global_is_top_k_of_concatenated_scores():
    rng = np.random.default_rng(7)
    sc = {"a": rng.random((3, 3)) + 1, "b": rng.random((2, 4)) + 1, "c": rng.random((2, 2)) + 1}
    k = allocation.kept_counts(sc, 0.5, "global")
    flat = np.concatenate([v.ravel() for v in sc.values()])
    owner = np.concatenate([[n] * v.size for n, v in sc.items()])
    top = owner[np.argsort(-flat)[:sum(k.values())]]
    assert k == {n: int((top == n).sum()) for n in sc}
    st = capture.Stats(layers={n: capture.LayerStats(name=n, weight=jnp.zeros(
        (v.shape[0] * BS, v.shape[1] * BS))) for n, v in sc.items()})
    m = importance.select_blocks(st, sparsity=0.5, block_size=BS, method="random", seed=1,
                                 allocation="global")
    assert sum(int(x.sum()) for x in m.values()) == sum(k.values())
    # a layer with only low scores still keeps its best tile
    low = {"hi": np.full((2, 2), 5.0), "lo": np.array([[0.1, 0.3]])}
    assert allocation.kept_counts(low, 0.5, "global") == {"hi": 2, "lo": 1}


def test_proportional_hand_example():
    sc = {"a": np.array([[1.0, 1.0], [1.0, 2.0]]), "b": np.array([[0.5, 1.0, 1.5, 0.0]]),
          "c": np.array([[1.0, 1.0], [0.0, -3.0]])}          # masses 5, 3, 2 (negatives: 0)
    # budget 2 + 2 + 2 = 6; quotas 3, 1.8, 1.2 -> floors 3, 1, 1; the remainder goes to b
    assert allocation.kept_counts(sc, 0.5, "proportional") == {"a": 3, "b": 2, "c": 1}
    # quotas beyond a layer's tile count are capped and the surplus handed on
    big = {"a": np.array([[100.0]]), "b": np.ones((1, 4))}
    assert allocation.kept_counts(big, 0.5, "proportional") == {"a": 1, "b": 2}
    with pytest.raises(ValueError, match="unknown allocation 'nope'"):
        allocation.kept_counts(sc, 0.5, "nope")


@pytest.mark.parametrize("method", ["newton", "tile_newton"])
def test_newton_scores_do_not_depend_on_how_the_scale_is_split(method):
    """The split damping makes A -> c A, G -> G / c (same Kronecker product) a no-op."""
    s = make_layer(np.random.default_rng(8), 2 * BS, 3 * BS)
    base = importance.tile_scores(stats_of(s), block_size=BS, method=method)["w"]
    c = 7.0
    s.A = s.A.replace(mat=s.A.mat * c)
    s.G = s.G.replace(mat=s.G.mat / c)
    s.A_dense, s.G_dense = s.A_dense * c, s.G_dense / c
    np.testing.assert_allclose(importance.tile_scores(stats_of(s), block_size=BS, method=method)["w"],
                               base, rtol=1e-4)
