"""sylva_jax.ops: the SDD product and embedded_linear (`docs/algorithm.md` §5).

Reference: NumPy float64 for sdd, dense JAX autodiff (the weight rebuilt from the tiles)
for embedded_linear.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sylva_jax.ops import embedded_linear, resolve_backend, sdd


def np_sdd(dy, x, rows, cols, bs):
    """float64 reference: tile n = dy[..., r-block]^T x[..., c-block] summed over tokens."""
    dy = np.asarray(dy, np.float64).reshape(-1, dy.shape[-1])
    x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
    return np.stack([dy[:, r * bs:(r + 1) * bs].T @ x[:, c * bs:(c + 1) * bs]
                     for r, c in zip(rows, cols)])


def np_sdd_abs(dy, x, rows, cols, bs):
    """sum of |dy||x| per tile entry: the scale of the float32 rounding error."""
    return np_sdd(np.abs(np.asarray(dy, np.float64)), np.abs(np.asarray(x, np.float64)),
                  rows, cols, bs)


# (lead dims, out, in, bs, which tiles, dtype)
SDD_CASES = [
    ((37,), 48, 64, 16, "one", jnp.float32),
    ((2, 9), 64, 96, 32, "all", jnp.bfloat16),
    ((20,), 128, 64, 64, "some", jnp.float32),
    ((3, 5), 48, 32, 16, "some", jnp.bfloat16),
]


def _coords(kind, n_r, n_c, rng):
    if kind == "one":
        return np.array([n_r - 1], np.int32), np.array([n_c // 2], np.int32)
    mask = np.ones((n_r, n_c), bool) if kind == "all" else rng.random((n_r, n_c)) < 0.4
    mask[0, -1] = True
    r, c = np.nonzero(mask)
    return r.astype(np.int32), c.astype(np.int32)


@pytest.mark.parametrize("backend", ["xla", "pallas"])
@pytest.mark.parametrize("case", range(len(SDD_CASES)))
def test_sdd_matches_numpy_float64(backend, case):
    lead, d_out, d_in, bs, kind, dtype = SDD_CASES[case]
    rng = np.random.default_rng(case)
    dy = jnp.asarray(rng.standard_normal(lead + (d_out,)), dtype)
    x = jnp.asarray(rng.standard_normal(lead + (d_in,)), dtype)
    rows, cols = _coords(kind, d_out // bs, d_in // bs, rng)
    got = sdd(dy, x, jnp.asarray(rows), jnp.asarray(cols), block_size=bs, backend=backend)
    assert got.shape == (len(rows), bs, bs) and got.dtype == jnp.float32
    # bf16 inputs are exactly representable in float32 and the product of two bf16 numbers
    # is exact in float32, so the only error is the float32 accumulation over K <= 40
    # tokens: |err| <= K * 2^-24 * sum|dy||x| ~ 2.4e-6 * sum|dy||x|. The reference uses the
    # same (upcast) inputs in float64; 1e-5 of the absolute-value sum leaves a 4x margin.
    dy64, x64 = np.asarray(dy.astype(jnp.float32)), np.asarray(x.astype(jnp.float32))
    want = np_sdd(dy64, x64, rows, cols, bs)
    scale = np_sdd_abs(dy64, x64, rows, cols, bs)
    assert np.all(np.abs(np.asarray(got, np.float64) - want) <= 1e-5 * scale + 1e-30)


@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_sdd_traced_coordinates_under_jit(backend):
    rng = np.random.default_rng(7)
    dy = jnp.asarray(rng.standard_normal((24, 64)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((24, 32)), jnp.float32)
    f = jax.jit(lambda dy, x, r, c: sdd(dy, x, r, c, block_size=16, backend=backend))
    for rows, cols in (([3, 0], [1, 1]), ([2, 1], [0, 1])):
        r, c = np.array(rows, np.int32), np.array(cols, np.int32)
        got = f(dy, x, jnp.asarray(r), jnp.asarray(c))
        np.testing.assert_allclose(got, np_sdd(dy, x, r, c, 16), rtol=1e-5, atol=1e-4)


def test_sdd_out_dtype_and_empty():
    dy = jnp.ones((4, 32), jnp.bfloat16)
    x = jnp.ones((4, 32), jnp.bfloat16)
    out = sdd(dy, x, jnp.array([1]), jnp.array([0]), block_size=16, out_dtype=jnp.bfloat16)
    assert out.dtype == jnp.bfloat16 and np.all(np.asarray(out, np.float32) == 4.0)
    empty = sdd(dy, x, jnp.zeros((0,), jnp.int32), jnp.zeros((0,), jnp.int32), block_size=16)
    assert empty.shape == (0, 16, 16)


def test_sdd_errors():
    dy = jnp.ones((4, 32))
    x = jnp.ones((4, 48))
    r, c = jnp.array([0]), jnp.array([0])
    with pytest.raises(ValueError, match="same leading"):
        sdd(dy, jnp.ones((5, 48)), r, c, block_size=16)
    with pytest.raises(ValueError, match="divide"):
        sdd(dy, x, r, c, block_size=20)
    with pytest.raises(ValueError, match="out of range"):
        sdd(dy, x, jnp.array([2]), c, block_size=16)
    with pytest.raises(ValueError, match="same length"):
        sdd(dy, x, jnp.array([0, 1]), c, block_size=16)
    with pytest.raises(TypeError, match="integer"):
        sdd(dy, x, jnp.array([0.0]), c, block_size=16)
    with pytest.raises(ValueError, match="unknown sdd backend"):
        sdd(dy, x, r, c, block_size=16, backend="cuda")


def test_auto_backend_and_triton_on_cpu():
    assert jax.default_backend() == "cpu"
    assert resolve_backend("auto") == "auto"      # resolved at lowering, per platform
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        sdd(jnp.ones((4, 32)), jnp.ones((4, 32)), jnp.array([0]), jnp.array([1]),
            block_size=16, backend="triton")


def test_triton_module_imports_without_triton():
    import importlib
    import sys

    mod = importlib.import_module("sylva_jax.kernels.sdd_triton")
    assert not mod.triton_available()
    assert "jax_triton" not in sys.modules


# --------------------------------------------------------------------------------------
# embedded_linear
# --------------------------------------------------------------------------------------

O, I, BS = 64, 96, 16          # out != in so [out, in] and [in, out] are distinguishable
ROWS = np.array([0, 1, 3, 3], np.int32)
COLS = np.array([5, 2, 0, 4], np.int32)


def _setup(seed=0, lead=(3, 5), dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    w = jnp.asarray(rng.standard_normal((O, I)) / np.sqrt(I), dtype)
    x = jnp.asarray(rng.standard_normal(lead + (I,)), dtype)
    b = jnp.asarray(rng.standard_normal(O), dtype)
    tiles = w.reshape(O // BS, BS, I // BS, BS)[ROWS, :, COLS, :]
    return w, x, b, tiles


def _dense_with_tiles(w, tiles):
    """The weight rebuilt from the tiles: a differentiable function of the tiles."""
    w4 = w.reshape(O // BS, BS, I // BS, BS)
    return w4.at[ROWS, :, COLS, :].set(tiles).reshape(O, I)


def _loss_embedded(x, tiles, w, b, backend="xla"):
    y = embedded_linear(x, w, tiles, ROWS, COLS, b, block_size=BS, backend=backend)
    return jnp.sum(jnp.sin(y) * jnp.arange(O, dtype=y.dtype) / O)


def _loss_dense(x, tiles, w, b):
    y = x @ _dense_with_tiles(w, tiles).T + b
    return jnp.sum(jnp.sin(y) * jnp.arange(O, dtype=y.dtype) / O)


@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_embedded_linear_forward_and_grads_match_dense(backend):
    w, x, b, tiles = _setup()
    y = embedded_linear(x, w, tiles, ROWS, COLS, b, block_size=BS, backend=backend)
    np.testing.assert_allclose(y, x @ w.T + b, rtol=1e-5, atol=1e-5)
    gx, gt = jax.grad(_loss_embedded, (0, 1))(x, tiles, w, b, backend)
    rx, rt = jax.grad(_loss_dense, (0, 1))(x, tiles, w, b)
    # both sides are float32 sums of <= 96 terms of size O(1): 1e-5 absolute is ~100 ulp
    np.testing.assert_allclose(gx, rx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gt, rt, rtol=1e-5, atol=1e-5)
    assert gt.shape == tiles.shape and np.abs(np.asarray(gt)).max() > 1e-3


def test_embedded_linear_no_weight_or_bias_cotangent():
    w, x, b, tiles = _setup()
    gw, gb = jax.grad(_loss_embedded, (2, 3))(x, tiles, w, b)
    assert not np.any(np.asarray(gw)) and not np.any(np.asarray(gb))


def _walk(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for p in eqn.params.values():
            for sub in (p if isinstance(p, (tuple, list)) else (p,)):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    yield from _walk(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    yield from _walk(sub)


def _big_products(fn, *args):
    jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
    return [e for e in _walk(jaxpr) if e.primitive.name == "dot_general"
            and any(tuple(v.aval.shape) in ((O, I), (I, O)) for v in e.outvars)]


def test_grad_jaxpr_has_no_dense_weight_gradient():
    w, x, b, tiles = _setup()
    # the detector finds the [out, in] product in the dense model's weight gradient ...
    assert _big_products(jax.grad(lambda w: _loss_dense(x, tiles, w, b)), w)
    # ... and none in the embedded layer's gradient for the tiles (nor for x and tiles)
    assert not _big_products(jax.grad(_loss_embedded, 1), x, tiles, w, b)
    assert not _big_products(jax.grad(_loss_embedded, (0, 1)), x, tiles, w, b)
    jaxpr = jax.make_jaxpr(jax.grad(_loss_embedded, 1))(x, tiles, w, b).jaxpr
    shapes = {tuple(v.aval.shape) for e in _walk(jaxpr) for v in e.outvars}
    assert (O, I) not in shapes and (I, O) not in shapes


def test_embedded_linear_jit_and_vmap():
    w, x, b, tiles = _setup(seed=1)
    g = jax.jit(jax.grad(_loss_embedded, 1))(x, tiles, w, b)
    np.testing.assert_allclose(g, jax.grad(_loss_dense, 1)(x, tiles, w, b), rtol=1e-5, atol=1e-5)
    # per-example tile gradients: vmap over the leading axis of x
    per = jax.vmap(jax.grad(_loss_embedded, 1), in_axes=(0, None, None, None))(x, tiles, w, b)
    ref = jax.vmap(jax.grad(_loss_dense, 1), in_axes=(0, None, None, None))(x, tiles, w, b)
    assert per.shape == (x.shape[0],) + tiles.shape
    np.testing.assert_allclose(per, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(per.sum(0), g, rtol=1e-5, atol=1e-5)


def test_embedded_linear_bf16_accumulates_in_f32():
    w, x, b, tiles = _setup(seed=2, lead=(40,), dtype=jnp.bfloat16)
    c = np.random.default_rng(3).standard_normal((40, O)).astype(np.float32)
    cb = jnp.asarray(c, jnp.bfloat16)

    def loss(x, tiles):  # linear in y, so dy = c (in bf16) exactly
        y = embedded_linear(x, w, tiles, ROWS, COLS, b, block_size=BS)
        assert y.dtype == jnp.bfloat16
        return jnp.sum(y.astype(jnp.float32) * cb.astype(jnp.float32))

    gx, gt = jax.grad(loss, (0, 1))(x, tiles)
    assert gx.dtype == jnp.bfloat16 and gt.dtype == jnp.bfloat16
    f = lambda a: np.asarray(a, np.float64)  # noqa: E731  (bf16 -> f64 is exact)
    want_t = np_sdd(f(cb), f(x), ROWS, COLS, BS)
    want_x = f(cb) @ f(w)
    # accumulation in f32 (error ~1e-6 relative), then ONE rounding to bf16 (2^-9 relative);
    # a bf16 accumulation over 40 (tiles) or 64 (dx) terms would be off by ~1e-2.
    np.testing.assert_allclose(f(gt), want_t, rtol=2 ** -8, atol=1e-2 * 2 ** -8)
    np.testing.assert_allclose(f(gx), want_x, rtol=2 ** -8, atol=1e-2 * 2 ** -8)


def test_embedded_linear_errors():
    w, x, b, tiles = _setup()
    with pytest.raises(ValueError, match=r"\[out, in\]"):
        embedded_linear(x, w.T, tiles, ROWS, COLS, b, block_size=BS)
    with pytest.raises(ValueError, match="tiles must be"):
        embedded_linear(x, w, tiles[:, :8], ROWS, COLS, b, block_size=BS)
    with pytest.raises(ValueError, match="coordinates"):
        embedded_linear(x, w, tiles[:2], ROWS, COLS, b, block_size=BS)


def test_embedded_linear_mixed_dtypes_compute_in_x_dtype():
    # float32 master weights, bfloat16 activations: computed as the model's dense product
    # (w cast to the compute dtype, f32 accumulation, result in x.dtype)
    w, _, b, tiles = _setup(seed=4)
    x = jnp.asarray(np.random.default_rng(5).standard_normal((6, I)), jnp.bfloat16)
    y = embedded_linear(x, w, tiles, ROWS, COLS, b, block_size=BS)
    assert y.dtype == jnp.bfloat16
    want = (np.asarray(x, np.float64) @ np.asarray(w.astype(jnp.bfloat16), np.float64).T
            + np.asarray(b, np.float64))
    # one bf16 rounding of the f32-accumulated result: 2^-8 relative
    np.testing.assert_allclose(np.asarray(y, np.float64), want, rtol=2 ** -8, atol=2 ** -8)
    gt = jax.grad(lambda t: jnp.sum(embedded_linear(x, w, t, ROWS, COLS, b, block_size=BS)
                                    .astype(jnp.float32)))(tiles)
    assert gt.dtype == jnp.float32   # the tiles' own dtype
    want_t = np_sdd(np.ones((6, O)), np.asarray(x, np.float64), ROWS, COLS, BS)
    np.testing.assert_allclose(gt, want_t, rtol=1e-5, atol=1e-5)
