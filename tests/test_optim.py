"""sylva_jax.optim: sparse AdamW (optax path and fused Pallas step), `docs/algorithm.md` §6.

Reference: ``optax.adamw`` applied to the gathered tiles as ordinary parameters.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sylva_jax.adapter import make_adapter
from sylva_jax.optim import (SparseAdamWState, fused_sparse_adamw_step,
                             fused_sparse_adamw_update, sparse_adamw)

BS = 16
HP = dict(b1=0.9, b2=0.99, eps=1e-6, weight_decay=0.05)


def _setup(seed=0, layout="out_in"):
    rng = np.random.default_rng(seed)
    params = {"a": {"weight": jnp.asarray(rng.standard_normal((64, 48)), jnp.float32),
                    "bias": jnp.asarray(rng.standard_normal(64), jnp.float32)},
              "b": {"weight": jnp.asarray(rng.standard_normal((32, 32)), jnp.float32)}}
    masks = {"a.weight": rng.random((4, 3)) < 0.4, "b.weight": np.eye(2, dtype=bool)}
    masks["a.weight"][0, 0] = True
    if layout == "in_out":
        params = jax.tree_util.tree_map(lambda a: a.T if a.ndim == 2 else a, params)
    return params, make_adapter(params, masks, block_size=BS, layout=layout)


def _grads(ad, step, scale=1.0):
    rng = np.random.default_rng(1000 + step)
    return {p: jnp.asarray(scale * rng.standard_normal((len(r), BS, BS)), jnp.float32)
            for p, (r, _) in ad.coords.items()}


# Tolerance: both sides evaluate the same float32 formula per element (a handful of
# roundings each, in slightly different orders); the per-step update is lr * O(1), so the
# parameters agree to ~1e-7 * lr * steps. 1e-6 absolute on O(1) parameters is ~10 ulp.
TOL = dict(rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["constant", "schedule", "clipped"])
def test_sparse_adamw_equals_optax_adamw_on_tiles(kind):
    params, ad = _setup()
    lr = 1e-2
    if kind == "schedule":
        lr = optax.linear_schedule(0.0, 2e-2, transition_steps=3)
    ours = sparse_adamw(lr, **HP)
    ref = optax.adamw(lr, HP["b1"], HP["b2"], HP["eps"], weight_decay=HP["weight_decay"])
    if kind == "clipped":   # global norm of the raw gradients is ~50: the clip is active
        ours = optax.chain(optax.clip_by_global_norm(1.0), ours)
        ref = optax.chain(optax.clip_by_global_norm(1.0), ref)
    tiles = ad.tiles(params)
    s_ours, s_ref, ref_tiles = ours.init(tiles), ref.init(tiles), tiles
    step = jax.jit(lambda p, s, g: _ours_step(ours, ad, p, s, g))

    @jax.jit
    def ref_step(t, s, g):
        u, s = ref.update(g, s, t)
        return optax.apply_updates(t, u), s

    gather = jax.jit(ad.tiles)
    for t in range(4):
        g = _grads(ad, t)
        params, s_ours = step(params, s_ours, g)
        ref_tiles, s_ref = ref_step(ref_tiles, s_ref, g)
        got = gather(params)
        for p in ad.paths:
            np.testing.assert_allclose(got[p], ref_tiles[p], **TOL)
    moved = max(float(jnp.abs(got[p] - tiles[p]).max()) for p in ad.paths)
    assert moved > 1e-3   # the updates are not trivially zero


def _ours_step(opt, ad, params, state, grads):
    u, state = opt.update(grads, state, ad.tiles(params))
    return ad.apply_updates(params, u), state


def test_sparse_adamw_state_shapes_and_dtypes():
    params, ad = _setup()
    tiles = ad.tiles(params)
    st = sparse_adamw(1e-3).init(tiles)
    assert isinstance(st, SparseAdamWState) and int(st.count) == 0
    for p in ad.paths:
        assert st.mu[p].shape == tiles[p].shape == st.nu[p].shape
        assert st.mu[p].dtype == jnp.float32 and st.nu[p].dtype == jnp.float32
    st16 = sparse_adamw(1e-3, mu_dtype=jnp.bfloat16).init(tiles)
    assert all(st16.mu[p].dtype == jnp.bfloat16 for p in ad.paths)
    _, st16 = sparse_adamw(1e-3, mu_dtype=jnp.bfloat16).update(_grads(ad, 0), st16)
    assert all(st16.mu[p].dtype == jnp.bfloat16 for p in ad.paths) and int(st16.count) == 1


def test_sparse_adamw_first_step_rule():
    # step 1 with bias correction: m_hat = g, v_hat = g^2, so the update is
    # -lr * (g / (|g| + eps) + wd * p): about -lr * sign(g) - lr * wd * p
    g = {"w": jnp.asarray([[[2.0, -0.5], [1e-3, -4.0]]])}
    p = {"w": jnp.asarray([[[1.0, 1.0], [-2.0, 0.0]]])}
    opt = sparse_adamw(0.1, eps=1e-6, weight_decay=0.5)
    u, _ = opt.update(g, opt.init(p), p)
    gn, pn = np.asarray(g["w"], np.float64), np.asarray(p["w"], np.float64)
    # float32 bias correction 1 - b2 (b2 = 0.999 is inexact in f32) is off by ~1.3e-5
    # relative, so each term of size <= lr = 0.1 carries <~ 1e-6 absolute error (the
    # entry with g = 1e-3 cancels two terms of size 0.1 down to 1e-4, hence atol not rtol)
    np.testing.assert_allclose(u["w"], -0.1 * (gn / (np.abs(gn) + 1e-6) + 0.5 * pn),
                               rtol=0, atol=1e-6)


def test_sparse_adamw_errors():
    opt = sparse_adamw(1e-3, weight_decay=0.1)
    g = {"w": jnp.ones((1, 2, 2))}
    with pytest.raises(ValueError, match="needs params"):
        opt.update(g, opt.init(g))
    with pytest.raises(ValueError, match="betas"):
        sparse_adamw(1e-3, b1=1.0)


@pytest.mark.parametrize("layout", ["out_in", "in_out"])
def test_fused_step_equals_optax_path_and_writes_only_tiles(layout):
    params, ad = _setup(seed=3, layout=layout)
    lr = optax.linear_schedule(1e-2, 2e-3, transition_steps=3)
    opt = sparse_adamw(lr, **HP)
    state_ref = state_fused = opt.init(ad.tiles(params))
    p_ref = p_fused = params
    fused = jax.jit(lambda p, g, s: fused_sparse_adamw_update(
        ad, p, g, s, learning_rate=lr, **HP, interpret=True))
    for t in range(3):
        g = _grads(ad, t)
        p_ref, state_ref = _ours_step(opt, ad, p_ref, state_ref, g)
        p_fused, state_fused = fused(p_fused, g, state_fused)
    # same float32 formula; see TOL
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, **TOL), p_fused, p_ref)
    # moments are O(1) float32 values (m ~ g, v ~ g^2) from the same few roundings in a
    # different order (fused multiply-adds): 1e-7 absolute is ~2 ulp at 1
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                           state_fused, state_ref)
    assert int(state_fused.count) == 3
    # only the tiles moved: everything else bit-identical to the initial parameters
    w0, w1 = np.asarray(params["a"]["weight"]), np.asarray(p_fused["a"]["weight"])
    m = np.kron(np.asarray(ad_mask(ad, "a.weight")), np.ones((BS, BS), bool))
    m = m if layout == "out_in" else m.T
    assert np.any(w0[m] != w1[m]) and np.array_equal(w0[~m], w1[~m])
    np.testing.assert_array_equal(p_fused["a"]["bias"], params["a"]["bias"])


def ad_mask(ad, path):
    out, inn = ad.out_in_shape(path)
    m = np.zeros((out // BS, inn // BS), bool)
    m[ad.coords[path]] = True
    return m


def test_fused_step_in_place_under_donation_and_bf16():
    rng = np.random.default_rng(9)
    w = jnp.asarray(rng.standard_normal((48, 32)), jnp.bfloat16)
    rows, cols = np.array([0, 2], np.int32), np.array([1, 0], np.int32)
    g = jnp.asarray(rng.standard_normal((2, BS, BS)), jnp.float32)
    mu = jnp.zeros((2, BS, BS), jnp.float32)
    nu = jnp.zeros((2, BS, BS), jnp.float32)
    w_np = np.asarray(w, np.float32)
    step = jax.jit(lambda w, g, mu, nu: fused_sparse_adamw_step(
        w, g, mu, nu, 0, rows, cols, learning_rate=0.01, block_size=BS, interpret=True),
        donate_argnums=(0, 2, 3))
    ptr = w.unsafe_buffer_pointer()
    w2, mu2, nu2 = step(w, g, mu, nu)
    assert w2.dtype == jnp.bfloat16 and w.is_deleted()       # the input buffer was donated
    assert w2.unsafe_buffer_pointer() == ptr                 # ... and written in place
    # step 1: update = -lr * g/(|g| + eps), computed in f32, added in f32, rounded once
    gn = np.asarray(g)
    want = w_np.copy()
    for n, (r, c) in enumerate(zip(rows, cols)):
        blk = (slice(r * BS, (r + 1) * BS), slice(c * BS, (c + 1) * BS))
        want[blk] = (w_np[blk] - 0.01 * gn[n] / (np.abs(gn[n]) + 1e-6)).astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(w2, np.float32), want)
    np.testing.assert_allclose(mu2, 0.1 * gn, rtol=1e-6)
    np.testing.assert_allclose(nu2, 0.001 * gn ** 2, rtol=1e-5)


def test_fused_step_errors():
    w = jnp.zeros((32, 32))
    with pytest.raises(ValueError, match="grads must be"):
        fused_sparse_adamw_step(w, jnp.zeros((1, 8, 8)), jnp.zeros((1, 16, 16)),
                                jnp.zeros((1, 16, 16)), 0, [0], [1], learning_rate=1e-3,
                                block_size=16)
