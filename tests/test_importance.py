"""Tile scores and top-k masks (sylva_jax/importance.py)."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sylva_jax import capture, importance
from sylva_jax import curvature as hierarchy
from sylva_jax.models import llama
from tiny import tiny_config

# Tiles of 4x4 and layer dimensions from {4, 8, 12, 20} only: every distinct dimension or
# shape costs a compilation of the factor / scoring functions.
BS = 4


def _factor(X, kind):
    h = hierarchy.init(X.shape[1], num_partition=1, dtype=jnp.float32, kind=kind)
    return hierarchy.update(h, jnp.asarray(X, jnp.float32))


def make_stats(shapes, *, seed=0, n=48, kind="hodlr", plant=None, keep_dense=True,
               damping=1e-6):
    """Stats from random calibration vectors; ``plant={name: (r, c)}`` makes tile (r, c) of
    that layer important: larger gradient, curvature and weight there."""
    rng = np.random.default_rng(seed)
    layers = {}
    for name, (o, i) in shapes.items():
        a = rng.normal(size=(n, i))
        g = rng.normal(size=(n, o))
        gbar = 0.1 * rng.normal(size=(o, i))
        w = 0.1 * rng.normal(size=(o, i))
        noise = 0.01 * rng.random(size=(o, i))  # per-sample variance of the gradient
        if plant and name in plant:
            r, c = plant[name]
            rows, cols = slice(r * BS, (r + 1) * BS), slice(c * BS, (c + 1) * BS)
            a[:, cols] *= 3.0
            g[:, rows] *= 3.0
            gbar[rows, cols] += 2.0
            w[rows, cols] += 2.0
        layers[name] = capture.LayerStats(
            name=name, weight=jnp.asarray(w, jnp.float32), A=_factor(a, kind), G=_factor(g, kind),
            grad_mean=jnp.asarray(gbar, jnp.float32), num_samples=n,
            grad_sq_mean=jnp.asarray(gbar ** 2 + noise, jnp.float32),
            A_dense=jnp.asarray(a.T @ a, jnp.float32) if keep_dense else None,
            G_dense=jnp.asarray(g.T @ g, jnp.float32) if keep_dense else None)
    return capture.Stats(layers=layers, num_samples=n, damping=damping)


SHAPES = {"l.one": (BS, BS), "l.odd": (BS, 5 * BS), "l.six": (2 * BS, 3 * BS),
          "l.nine": (3 * BS, 3 * BS)}
# k = round_half_up((1 - s) * n), at least 1
EXPECTED = {0.0: {"l.one": 1, "l.odd": 5, "l.six": 6, "l.nine": 9},
            0.5: {"l.one": 1, "l.odd": 3, "l.six": 3, "l.nine": 5},
            0.7: {"l.one": 1, "l.odd": 2, "l.six": 2, "l.nine": 3},
            0.95: {"l.one": 1, "l.odd": 1, "l.six": 1, "l.nine": 1},
            0.999: {"l.one": 1, "l.odd": 1, "l.six": 1, "l.nine": 1}}


@pytest.fixture(scope="module")
def stats():
    return make_stats(SHAPES)


@pytest.mark.parametrize("method", importance.METHODS)
def test_exact_tile_counts(stats, method):
    for sparsity, counts in EXPECTED.items():
        masks = importance.select_blocks(stats, sparsity=sparsity, block_size=BS, method=method)
        assert set(masks) == set(SHAPES)
        for n, m in masks.items():
            o, i = SHAPES[n]
            assert m.dtype == bool and m.shape == (o // BS, i // BS)
            assert int(m.sum()) == counts[n], (method, sparsity, n)


def test_num_kept_rounding():
    assert importance.num_kept(0.5, 5) == 3            # half rounds up
    assert importance.num_kept(0.7, 10) == 3           # (1-0.7)*10 = 2.9999999999999996
    assert importance.num_kept(0.95, 1000) == 50
    assert importance.num_kept(0.999, 7) == 1


def test_determinism_and_ties(stats):
    for method in importance.METHODS:
        m1 = importance.select_blocks(stats, sparsity=0.5, block_size=BS, method=method, seed=3)
        m2 = importance.select_blocks(stats, sparsity=0.5, block_size=BS, method=method, seed=3)
        assert all(np.array_equal(m1[n], m2[n]) for n in m1)
    big = make_stats({"big": (5 * BS, 5 * BS)}, keep_dense=False)
    r = [importance.select_blocks(big, sparsity=0.5, block_size=BS, method="random", seed=s)["big"]
         for s in (0, 1)]
    assert not np.array_equal(r[0], r[1])
    # equal scores: the lowest flat indices win
    m = importance.topk_mask(np.zeros((3, 3)), 4)
    assert m.ravel().tolist() == [True] * 4 + [False] * 5
    m = importance.topk_mask(np.array([[1.0, 2.0], [2.0, 0.0]]), 2)
    assert m.tolist() == [[False, True], [True, False]]


@pytest.mark.parametrize("method", [m for m in importance.METHODS if m != "random"])
def test_planted_block_is_found(method):
    plant = {"p.a": (2, 1), "p.b": (0, 4)}
    st = make_stats({"p.a": (3 * BS, 2 * BS), "p.b": (2 * BS, 5 * BS)}, plant=plant, seed=7)
    masks = importance.select_blocks(st, sparsity=0.99, block_size=BS, method=method)
    for n, (r, c) in plant.items():
        assert masks[n].sum() == 1 and masks[n][r, c], (method, n, np.argwhere(masks[n]))


def _numpy_scores(gbar, A, G, damping, bs):
    """Independent float64 reference: the full [out, in] importance matrix, tile-summed."""
    gbar, A, G = (np.asarray(x, np.float64) for x in (gbar, A, G))
    ia = np.diag(np.linalg.inv(A + damping * np.eye(len(A))))
    ig = np.diag(np.linalg.inv(G + damping * np.eye(len(G))))
    in_imp = np.array([gbar[:, i] @ G @ gbar[:, i] for i in range(gbar.shape[1])]) / ia
    out_imp = np.array([gbar[o] @ A @ gbar[o] for o in range(gbar.shape[0])]) / ig
    imp = np.outer(out_imp, in_imp)
    o, i = imp.shape
    return imp.reshape(o // bs, bs, i // bs, bs).sum(axis=(1, 3))


# Scores are products of float32 quantities (matmat, inverse diagonal of a well conditioned
# 8..20-dim factor built from 48 samples, condition number < 1e2): relative error ~1e-5; a
# wrong orientation (G vs A, row vs column sums) changes scores by O(1).
@pytest.mark.parametrize("kind", ["hodlr", "dense"])
def test_sylva_scores_match_numpy_reference(kind):
    st = make_stats({"x": (2 * BS, 5 * BS), "y": (3 * BS, 2 * BS)}, kind=kind, damping=1e-3)
    hier = hierarchy
    got = importance.tile_scores(st, block_size=BS, method="sylva", damping=1e-3)
    for n, s in st.items():
        ref = _numpy_scores(s.grad_mean, hier.to_dense(s.A), hier.to_dense(s.G), 1e-3, BS)
        np.testing.assert_allclose(got[n], ref, rtol=2e-4)


def test_sylva_dense_factor_equals_kfac():
    st = make_stats({"x": (2 * BS, 3 * BS), "y": (BS, 5 * BS)}, kind="dense")
    s_sylva = importance.tile_scores(st, block_size=BS, method="sylva")
    s_kfac = importance.tile_scores(st, block_size=BS, method="kfac")
    for n in st:
        np.testing.assert_allclose(s_sylva[n], s_kfac[n], rtol=2e-4)
        for sp in (0.3, 0.6, 0.9):
            assert np.array_equal(
                importance.select_blocks(st, sparsity=sp, block_size=BS, method="sylva")[n],
                importance.select_blocks(st, sparsity=sp, block_size=BS, method="kfac")[n])


def test_baseline_scores(stats):
    n = "l.six"
    s = stats[n]
    g, w = np.asarray(s.grad_mean, np.float64), np.asarray(s.weight, np.float64)
    tile = lambda x: x.reshape(2, BS, 3, BS).sum(axis=(1, 3))  # noqa: E731
    np.testing.assert_allclose(importance.tile_scores(stats, block_size=BS, method="grad_sq")[n],
                               tile(g ** 2), rtol=1e-5)
    np.testing.assert_allclose(importance.tile_scores(stats, block_size=BS, method="fisher")[n],
                               tile(np.asarray(s.grad_sq_mean, np.float64)), rtol=1e-6)
    np.testing.assert_allclose(importance.tile_scores(stats, block_size=BS, method="grad")[n],
                               tile(np.abs(g)), rtol=1e-5)
    np.testing.assert_allclose(importance.tile_scores(stats, block_size=BS, method="magnitude")[n],
                               tile(np.abs(w)), rtol=1e-5)


def test_errors(stats):
    for bad in (-0.1, 1.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
            importance.select_blocks(stats, sparsity=bad, block_size=BS)
    with pytest.raises(ValueError, match=r"block_size 8 does not divide.*l\.one \(4, 4\)"):
        importance.select_blocks(stats, sparsity=0.5, block_size=8)
    with pytest.raises(ValueError, match="unknown method 'obs'"):
        importance.select_blocks(stats, sparsity=0.5, block_size=BS, method="obs")
    nodense = make_stats({"z": (BS, BS)}, keep_dense=False)
    with pytest.raises(ValueError, match="keep_dense=True"):
        importance.select_blocks(nodense, sparsity=0.5, block_size=BS, method="kfac")


def test_compute_masks_end_to_end():
    cfg = tiny_config(vocab_size=64, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                      num_key_value_heads=2, initializer_range=0.2)
    model = llama.LlamaForCausalLM(cfg, rngs=nnx.Rngs(1))
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 64, size=(4, 6)).astype(np.int32)
    batches = [{"input_ids": ids[i:i + 2], "attention_mask": np.ones((2, 6), np.int32),
                "labels": ids[i:i + 2]} for i in (0, 2)]
    # relative damping: 4 samples give rank-4 factors of dimension 16/32
    kw = dict(scope="mlp", sparsity=0.75, block_size=BS, num_samples=4, factor_kind="dense",
              damping=1e-2, relative_damping=True)
    md, rep = importance.compute_masks(model, batches, method="sylva", **kw)
    names = {f"model.layers.{i}.mlp.{p}_proj.weight" for i in (0, 1) for p in ("gate", "up", "down")}
    assert set(md) == names
    assert all(m.shape in ((8, 4), (4, 8)) and int(m.sum()) == 8 for m in md.values())  # 0.25 * 32
    assert rep["num_samples"] == 4 and rep["method"] == "sylva" and rep["factor_kind"] == "dense"
    assert rep["kept_tiles"] == 48 and rep["sparsity_in_scope"] == pytest.approx(0.75)
    assert rep["sparsity_overall"] > rep["sparsity_in_scope"]
    # kfac (float64 NumPy on the same dense statistics) agrees with sylva on dense factors
    mk, _ = importance.compute_masks(model, batches, method="kfac", **kw)
    assert all(np.array_equal(mk[n], md[n]) for n in mk)
    # fisher turns per-sample gradients on; a global budget keeps the same total
    mf, rep = importance.compute_masks(model, batches, method="fisher", allocation="global", **kw)
    assert rep["kept_tiles"] == 48 and sum(rep["kept"].values()) == 48
    assert rep["kept"] == {n: int(m.sum()) for n, m in mf.items()} and min(rep["kept"].values()) >= 1
    # methods without statistics run no calibration pass
    mm, rep = importance.compute_masks(model, None, scope="mlp", sparsity=0.5, block_size=BS,
                                       method="magnitude")
    assert rep["num_samples"] == 0 and all(int(m.sum()) == 16 for m in mm.values())
    with pytest.raises(ValueError, match=r"block_size 5 does not divide"):
        importance.compute_masks(model, batches, scope="mlp", sparsity=0.5, block_size=5)


def test_spread_topk_caps_rows_and_columns_and_keeps_the_ranking():
    # an outer product (Sylva's score structure): plain top-k is a corner of the matrix
    a, b = np.array([5.0, 4.0, 3.0, 2.0]), np.array([9.0, 8.0, 1.0, 0.5, 0.25, 0.1])
    s = np.outer(a, b)
    plain = importance.topk_mask(s, 6)
    assert plain[:, :2].sum() == 6 and plain.any(0).sum() == 2  # every tile in 2 columns
    m = importance.spread_topk_mask(s, 6)
    assert m.sum() == 6 and m.sum(0).max() <= 1 and m.sum(1).max() <= 2  # caps ceil(6/6), ceil(6/4)
    # greedy in score order under the caps, checked against a direct enumeration
    want, nr, nc = np.zeros_like(m), np.zeros(4, int), np.zeros(6, int)
    for f in sorted(range(s.size), key=lambda f: (-s.ravel()[f], f)):
        r, c = divmod(f, 6)
        if nr[r] < 2 and nc[c] < 1 and want.sum() < 6:
            want[r, c], nr[r], nc[c] = True, nr[r] + 1, nc[c] + 1
    assert (m == want).all()
    # no cap binds: the same as top-k; caps that block everything still give k tiles
    assert (importance.spread_topk_mask(s, 1) == importance.topk_mask(s, 1)).all()
    one_row = np.array([[3.0, 2.0, 1.0]])
    assert (importance.spread_topk_mask(one_row, 2) == importance.topk_mask(one_row, 2)).all()
    assert importance.spread_topk_mask(np.arange(12.0).reshape(3, 4), 12).all()
    with pytest.raises(ValueError, match="non-finite"):
        importance.spread_topk_mask(np.array([[np.nan, 1.0]]), 1)
