"""sylva_jax.adapter: static coordinates, gather / scatter, linear_fn hook (`docs/algorithm.md` §5).

Reference: NumPy slicing of the [out, in] weights, and dense JAX autodiff for the hook.
"""
import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sylva_jax.adapter import Adapter, make_adapter

BS = 16


def _params(seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.standard_normal(s), dtype)  # noqa: E731
    return {
        "model": {
            "layers": [
                {"q_proj": {"weight": f(64, 48)}, "norm": {"weight": f(48)}},
                {"q_proj": {"weight": f(32, 48)}, "norm": {"weight": f(48)}},
            ],
            "lm_head": {"weight": f(80, 48), "bias": f(80)},
        }
    }


def _masks(seed=0):
    rng = np.random.default_rng(seed + 100)
    m0 = rng.random((4, 3)) < 0.5
    m0[3, 0] = True
    m2 = np.zeros((5, 3), bool)
    m2[4, 2] = True
    return {
        "model.layers.0.q_proj.weight": m0,
        "model.layers.1.q_proj.weight": np.zeros((2, 3), bool),   # all False: not adapted
        "model.lm_head.weight": m2,
    }


def _np_tile(w, r, c, bs=BS):
    return np.asarray(w)[r * bs:(r + 1) * bs, c * bs:(c + 1) * bs]


def test_coords_are_the_mask_in_row_major_order():
    params, masks = _params(), _masks()
    ad = make_adapter(params, masks, block_size=BS)
    assert ad.paths == ("model.layers.0.q_proj.weight", "model.lm_head.weight")
    for p in ad.paths:
        r, c = np.nonzero(masks[p])
        np.testing.assert_array_equal(ad.coords[p][0], r)
        np.testing.assert_array_equal(ad.coords[p][1], c)
        assert ad.coords[p][0].dtype == np.int32
    n = int(masks["model.layers.0.q_proj.weight"].sum()) + 1
    assert ad.num_tiles == n and ad.num_trainable == n * BS * BS
    assert ad.block_size == BS and ad.layout == "out_in"


def test_tiles_gather_equals_numpy_slicing():
    params, masks = _params(), _masks()
    ad = make_adapter(params, masks, block_size=BS)
    tiles = ad.tiles(params)
    assert set(tiles) == set(ad.paths)
    for p in ad.paths:
        w = {"model.layers.0.q_proj.weight": params["model"]["layers"][0]["q_proj"]["weight"],
             "model.lm_head.weight": params["model"]["lm_head"]["weight"]}[p]
        want = np.stack([_np_tile(w, r, c) for r, c in zip(*ad.coords[p])])
        np.testing.assert_array_equal(np.asarray(tiles[p]), want)


def _apply_numpy(params, ad, updates):
    out = jax.tree_util.tree_map(lambda a: np.array(a), params)
    flat = {"model.layers.0.q_proj.weight": out["model"]["layers"][0]["q_proj"]["weight"],
            "model.lm_head.weight": out["model"]["lm_head"]["weight"]}
    for p in ad.paths:
        for n, (r, c) in enumerate(zip(*ad.coords[p])):
            flat[p][r * BS:(r + 1) * BS, c * BS:(c + 1) * BS] += np.asarray(updates[p][n])
    return out


@pytest.mark.parametrize("jit", [False, True])
def test_apply_updates_touches_only_the_tiles(jit):
    params, masks = _params(), _masks()
    ad = make_adapter(params, masks, block_size=BS)
    rng = np.random.default_rng(5)
    upd = {p: jnp.asarray(rng.standard_normal(t.shape), jnp.float32)
           for p, t in ad.tiles(params).items()}
    want = _apply_numpy(params, ad, upd)
    if jit:
        keep = jax.tree_util.tree_map(lambda a: np.array(a), params)
        ptr = params["model"]["lm_head"]["weight"].unsafe_buffer_pointer()
        new = jax.jit(lambda p, u: ad.apply_updates(p, u), donate_argnums=0)(params, upd)
        # donated: the scatter wrote into the weight's own buffer (in place, no copy)
        assert new["model"]["lm_head"]["weight"].unsafe_buffer_pointer() == ptr
        params = keep
    else:
        new = ad.apply_updates(params, upd)
    # float32 add of the same two float32 numbers: bit-identical to numpy, and every
    # element outside the tiles is untouched
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), new, want)
    w0_old = np.asarray(params["model"]["layers"][0]["q_proj"]["weight"])
    w0_new = np.asarray(new["model"]["layers"][0]["q_proj"]["weight"])
    changed = w0_old != w0_new
    tile_mask = np.kron(masks["model.layers.0.q_proj.weight"], np.ones((BS, BS), bool))
    assert changed.any() and not (changed & ~tile_mask).any()
    if not jit:   # untouched leaves are the very same objects
        assert new["model"]["layers"][1]["q_proj"]["weight"] is params["model"]["layers"][1]["q_proj"]["weight"]
        assert new["model"]["lm_head"]["bias"] is params["model"]["lm_head"]["bias"]
        assert new["model"]["layers"][0]["norm"]["weight"] is params["model"]["layers"][0]["norm"]["weight"]


def test_apply_updates_bf16_rounds_once():
    params = _params(dtype=jnp.bfloat16)
    ad = make_adapter(params, _masks(), block_size=BS)
    upd = {p: jnp.full(t.shape, 1e-3, jnp.float32) for p, t in ad.tiles(params).items()}
    new = ad.apply_updates(params, upd)
    for p in ad.paths:
        old = np.asarray(ad.tiles(params)[p], np.float32)
        want = (old + np.float32(1e-3)).astype(jnp.bfloat16)
        np.testing.assert_array_equal(np.asarray(ad.tiles(new)[p]), want)
        assert ad.tiles(new)[p].dtype == jnp.bfloat16


def test_set_tiles_and_unmerge_round_trip():
    params, masks = _params(), _masks()
    ad = make_adapter(params, masks, block_size=BS)
    base = ad.tiles(params)
    rng = np.random.default_rng(1)
    trained = ad.apply_updates(params, {p: jnp.asarray(rng.standard_normal(t.shape), jnp.float32)
                                        for p, t in base.items()})
    assert any(not np.array_equal(ad.tiles(trained)[p], base[p]) for p in base)
    restored = ad.unmerge(trained, base)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a, b), restored, params)
    new_tiles = {p: t * 0 + 7.0 for p, t in base.items()}
    set_ = ad.set_tiles(params, new_tiles)
    for p in ad.paths:
        np.testing.assert_array_equal(ad.tiles(set_)[p], new_tiles[p])


def test_trainable_mask():
    params = _params()
    ad = make_adapter(params, _masks(), block_size=BS)
    m = ad.trainable_mask(params)
    assert jax.tree_util.tree_structure(m) == jax.tree_util.tree_structure(params)
    assert m["model"]["layers"][0]["q_proj"]["weight"] is True
    assert m["model"]["lm_head"]["weight"] is True
    assert m["model"]["layers"][1]["q_proj"]["weight"] is False   # all-False mask
    assert m["model"]["lm_head"]["bias"] is False


def test_in_out_layout_matches_out_in():
    params, masks = _params(), _masks()
    ad = make_adapter(params, masks, block_size=BS)
    # Linen-style: every 2-D kernel stored transposed [in, out]; masks still [out, in]
    params_t = jax.tree_util.tree_map(lambda a: a.T if a.ndim == 2 else a, params)
    ad_t = make_adapter(params_t, masks, block_size=BS, layout="in_out")
    assert ad_t.layout == "in_out" and ad_t.paths == ad.paths
    tiles, tiles_t = ad.tiles(params), ad_t.tiles(params_t)
    for p in ad.paths:
        np.testing.assert_array_equal(tiles[p], tiles_t[p])
        np.testing.assert_array_equal(ad.coords[p][0], ad_t.coords[p][0])
    rng = np.random.default_rng(2)
    upd = {p: jnp.asarray(rng.standard_normal(t.shape), jnp.float32) for p, t in tiles.items()}
    new = ad.apply_updates(params, upd)
    new_t = ad_t.apply_updates(params_t, upd)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_array_equal(np.asarray(a).T if a.ndim == 2 else a, b),
        new, new_t)


def test_make_adapter_errors():
    params, masks = _params(), _masks()
    with pytest.raises(KeyError, match=r"model\.layers\.0\.q_proj\.weigth.*did you mean"):
        make_adapter(params, {"model.layers.0.q_proj.weigth": masks["model.layers.0.q_proj.weight"]},
                     block_size=BS)
    with pytest.raises(ValueError, match=r"shape \(48,\); only 2-D"):
        make_adapter(params, {"model.layers.0.norm.weight": np.ones((3,), bool)}, block_size=BS)
    with pytest.raises(ValueError, match=r"\(64, 48\).*needs a mask of shape \(4, 3\)"):
        make_adapter(params, {"model.layers.0.q_proj.weight": np.ones((3, 4), bool)}, block_size=BS)
    with pytest.raises(ValueError, match=r"block_size 20 does not divide.*\(64, 48\)"):
        make_adapter(params, {"model.layers.0.q_proj.weight": np.ones((3, 2), bool)}, block_size=20)
    with pytest.raises(ValueError, match="layout"):
        make_adapter(params, masks, block_size=BS, layout="kernel")
    with pytest.raises(TypeError, match="boolean"):
        make_adapter(params, {"model.layers.0.q_proj.weight": np.ones((4, 3))}, block_size=BS)


def test_adapter_is_a_static_pytree():
    params, masks = _params(), _masks()
    ad = make_adapter(params, masks, block_size=BS)
    assert jax.tree_util.tree_leaves(ad) == []
    ad2 = make_adapter(params, {k: np.array(v) for k, v in masks.items()}, block_size=BS)
    assert ad2 == ad and hash(ad2) == hash(ad)
    other = dict(masks)
    other["model.lm_head.weight"] = np.roll(masks["model.lm_head.weight"], 1, axis=0)
    assert make_adapter(params, other, block_size=BS) != ad
    with pytest.raises(ValueError):            # coordinates are read-only
        ad.coords["model.lm_head.weight"][0][0] = 1
    # passes through jit as an argument (no leaves) and as a static argument
    f = jax.jit(lambda a, p: a.tiles(p))
    np.testing.assert_array_equal(f(ad, params)["model.lm_head.weight"],
                                  ad.tiles(params)["model.lm_head.weight"])
    g = jax.jit(lambda p, a: a.tiles(p), static_argnums=1)
    assert g(params, ad2)["model.lm_head.weight"].shape == (1, BS, BS)


def test_state_dict_round_trip():
    params = _params()
    ad = make_adapter(params, _masks(), block_size=BS)
    sd = ad.state_dict()
    assert all(isinstance(v, np.ndarray) for v in sd.values())
    assert int(sd["block_size"]) == BS and str(sd["layout"]) == "out_in"
    back = Adapter.from_state_dict(sd)
    assert back == ad and back.paths == ad.paths
    ad_t = make_adapter(jax.tree_util.tree_map(lambda a: a.T if a.ndim == 2 else a, params),
                        _masks(), block_size=BS, layout="in_out")
    assert Adapter.from_state_dict(ad_t.state_dict()) == ad_t
    with pytest.raises(KeyError, match="block_size"):
        Adapter.from_state_dict({"layout": np.asarray("out_in")})


def _toy_model(params, x, linear_fn):
    """Two linear layers calling the hook as the model does: linear_fn(name, x, w, b)."""
    h = linear_fn("model.layers.0.q_proj.weight", x,
                  params["model"]["layers"][0]["q_proj"]["weight"], None)      # [..., 64]
    h = jnp.tanh(h[..., :48])
    return linear_fn("model.lm_head.weight", h, params["model"]["lm_head"]["weight"],
                     params["model"]["lm_head"]["bias"])


def _dense_hook(name, x, w, b):
    y = x @ w.T
    return y if b is None else y + b


def test_linear_fn_gradients_match_dense_autodiff():
    params, masks = _params(), _masks()
    ad = make_adapter(params, masks, block_size=BS)
    x = jnp.asarray(np.random.default_rng(4).standard_normal((2, 3, 48)), jnp.float32)
    tiles = ad.tiles(params)

    def loss_sylva(tiles, x):
        return jnp.sum(jnp.sin(_toy_model(params, x, ad.linear_fn(tiles))))

    def loss_dense(tiles, x):   # reference: tiles scattered into the weights, plain autodiff
        return jnp.sum(jnp.sin(_toy_model(ad.set_tiles(params, tiles), x, _dense_hook)))

    # a float32 sum of 480 sin values of size <= 1 (different summation order inside the
    # dots): |err| <~ 480 * 2^-24 * 48 ~ 1.4e-3 worst case, ~1e-5 typical; 1e-4 absolute
    np.testing.assert_allclose(loss_sylva(tiles, x), loss_dense(tiles, x), rtol=0, atol=1e-4)
    gt, gx = jax.grad(loss_sylva, (0, 1))(tiles, x)
    rt, rx = jax.grad(loss_dense, (0, 1))(tiles, x)
    # float32 sums of <= 80 terms through two layers, in different orders on the two sides:
    # error <~ 80 * 2^-24 ~ 5e-6 of the largest magnitude involved; 1e-5 of max|ref| bounds it
    for p in ad.paths:
        np.testing.assert_allclose(gt[p], rt[p], rtol=0, atol=1e-5 * np.abs(rt[p]).max())
    np.testing.assert_allclose(gx, rx, rtol=0, atol=1e-5 * np.abs(rx).max())
    # frozen weights (adapted or not) and biases receive no gradient through the hook
    gp = jax.grad(lambda p: jnp.sum(_toy_model(p, x, ad.linear_fn(tiles))))(params)
    assert all(not np.any(np.asarray(a)) for a in jax.tree_util.tree_leaves(gp))


def test_linear_fn_errors():
    params = _params()
    ad = make_adapter(params, _masks(), block_size=BS)
    with pytest.raises(KeyError, match="no entry"):
        ad.linear_fn({})
    hook = ad.linear_fn(ad.tiles(params))
    with pytest.raises(ValueError, match=r"\[out, in\]"):
        hook("model.lm_head.weight", jnp.ones((2, 80)), params["model"]["lm_head"]["weight"].T, None)


def test_nnx_state_params():
    class Tiny(nnx.Module):
        def __init__(self):
            self.proj = nnx.Linear(32, 48, use_bias=False, rngs=nnx.Rngs(0))   # kernel [in, out]

    state = nnx.state(Tiny(), nnx.Param)
    mask = np.zeros((3, 2), bool)
    mask[1, 0] = mask[2, 1] = True
    ad = make_adapter(state, {"proj.kernel": mask}, block_size=BS, layout="in_out")
    kernel = np.asarray(state["proj"]["kernel"][...])
    tiles = ad.tiles(state)["proj.kernel"]
    np.testing.assert_array_equal(tiles[0], kernel[0:16, 16:32].T)
    np.testing.assert_array_equal(tiles[1], kernel[16:32, 32:48].T)
    new = ad.apply_updates(state, {"proj.kernel": jnp.ones((2, BS, BS))})
    assert type(new) is type(state)
    diff = np.asarray(new["proj"]["kernel"][...]) - kernel
    assert np.count_nonzero(diff) == 2 * BS * BS and np.allclose(diff[0:16, 16:32], 1.0)
