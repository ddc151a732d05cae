"""Tile coordinates and the peak learning rate as traced step arguments (issue 18).

References: the static-coordinate ``methods.sylva(adapter)`` and the static-rate optimizers
(independently compiled programs with the values as constants), dense ``jax.grad`` for the
embedded linear layer, and NumPy for which weight entries may move. Everything is float32.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sylva_jax import methods
from sylva_jax import tree as tree_lib
from sylva_jax.adapter import TileLayout, make_adapter
from sylva_jax.ops import embedded_linear
from sylva_jax.optim import learning_rate_of, sparse_adamw, traced_learning_rate, with_learning_rate
from sylva_jax.train import make_schedule, make_train_step
from test_train import BS, LORA_KW, SYLVA_KW, copy, make_batch, tiny_llama

STEPS = 3


def _masks(params, seed: int, counts: dict | None = None):
    """Random tile masks of the tiny model's layer weights; with ``counts`` given, exactly
    ``counts[path]`` tiles per weight (so two seeds give two arms of one layout)."""
    rng = np.random.default_rng(seed)
    masks = {}
    for path, w in tree_lib.flatten(params).items():
        if ".layers." in path and w.ndim == 2:
            grid = (w.shape[0] // BS, w.shape[1] // BS)
            k = counts[path] if counts else int(rng.integers(1, 4))
            m = np.zeros(grid[0] * grid[1], bool)
            m[rng.choice(m.size, k, replace=False)] = True
            masks[path] = m.reshape(grid)
    return masks


@pytest.fixture(scope="module")
def model():
    graphdef, params = tiny_llama()
    masks_a = _masks(params, 1)
    masks_b = _masks(params, 2, counts={p: int(m.sum()) for p, m in masks_a.items()})
    return graphdef, params, masks_a, masks_b


def _run(trainer, params, batches, **init):
    state = trainer.init(copy(params), **init)
    losses, lrs = [], []
    for batch in batches:
        state, metrics = trainer.step(state, batch)
        losses.append(float(metrics["loss"]))
        lrs.append(float(metrics["lr"]))
    return state, np.array(losses), np.array(lrs)


def _assert_trees_equal(a, b, rtol=0.0, atol=0.0):
    fa, fb = tree_lib.flatten(a), tree_lib.flatten(b)
    assert fa.keys() == fb.keys()
    for path in fa:
        np.testing.assert_allclose(np.asarray(fa[path]), np.asarray(fb[path]), rtol=rtol, atol=atol,
                                   err_msg=path)


def test_traced_coordinates_give_the_static_methods_numbers(model):
    """sylva_traced(layout) with coords of masks A == sylva(make_adapter(masks A)), bit for
    bit: losses and weights after a few steps (weight decay, warm-up and decay included)."""
    graphdef, params, masks_a, _ = model
    adapter = make_adapter(params, masks_a, block_size=BS)
    layout = TileLayout.of(adapter)
    batches = [make_batch(10 + i, 2) for i in range(STEPS)]
    static = make_train_step(graphdef, method="sylva", adapter=adapter, **SYLVA_KW)
    traced = make_train_step(graphdef, method=methods.sylva_traced(layout), **SYLVA_KW)
    s_state, s_loss, _ = _run(static, params, batches)
    t_state, t_loss, _ = _run(traced, params, batches, extras=layout.coords(masks_a))
    np.testing.assert_array_equal(t_loss, s_loss)
    _assert_trees_equal(t_state.params, s_state.params)         # bitwise: same gathers, same SDD
    assert traced.num_trainable == static.num_trainable == adapter.num_trainable
    # the adapter's own coordinates are the default extras when built from an Adapter
    np.testing.assert_array_equal(
        _run(make_train_step(graphdef, method=methods.sylva_traced(adapter), **SYLVA_KW),
             params, batches[:1])[1], s_loss[:1])


def test_one_compilation_serves_two_masks_and_two_rates(model):
    """Arms A and B (same counts, different tiles) and two peak rates through ONE jitted
    step; each arm moves exactly its own tiles, and the rate is the state's."""
    graphdef, params, masks_a, masks_b = model
    layout = TileLayout.of(make_adapter(params, masks_a, block_size=BS))
    trainer = make_train_step(graphdef, method=methods.sylva_traced(layout), traced_lr=True, **SYLVA_KW)
    batches = [make_batch(20 + i, 2) for i in range(3)]   # update 0 has rate 0 (warm-up)
    arms = {}
    for name, masks, lr in (("a", masks_a, 1e-2), ("b", masks_b, 3e-3)):
        arms[name] = _run(trainer, params, batches, extras=layout.coords(masks), learning_rate=lr)
        state, _, lrs = arms[name]
        np.testing.assert_allclose(lrs, [float(make_schedule("linear", lr, warmup_steps=1, total_steps=40)(i))
                                         for i in range(3)], rtol=1e-6)
        for path, w in tree_lib.flatten(state.params).items():
            moved = np.asarray(w) != np.asarray(tree_lib.flatten(params)[path])
            allowed = (np.kron(masks[path], np.ones((BS, BS), bool)) if path in masks
                       else np.zeros(w.shape, bool))
            assert not (moved & ~allowed).any(), path          # nothing outside the arm's tiles
            if path in masks:
                assert moved.any(), path
    assert trainer.step_fn._cache_size() == 1
    assert arms["a"][1][0] == arms["b"][1][0] and arms["a"][1][2] != arms["b"][1][2]


@pytest.mark.parametrize("method", ["sylva", "lora", "full"])
def test_traced_learning_rate_equals_the_static_rate(model, method):
    """traced_lr=True built at a nominal rate, run at ``lr``: the static optimizer's numbers
    at ``lr`` (the same schedule formula on a float32 value instead of a constant; observed
    bitwise on CPU, asserted to 1e-6 relative). A second rate reuses the compilation."""
    graphdef, params, masks_a, _ = model
    if method == "sylva":
        kw = dict(method=methods.sylva_traced(make_adapter(params, masks_a, block_size=BS)), **SYLVA_KW)
    elif method == "lora":
        kw = dict(method="lora", **LORA_KW)
    else:
        kw = dict(method="full", learning_rate=3e-3, schedule="linear", warmup_steps=1, total_steps=10,
                  max_grad_norm=0.5)
    lr = 0.5 * kw["learning_rate"]
    batches = [make_batch(30 + i, 2) for i in range(2)]
    static = make_train_step(graphdef, **{**kw, "learning_rate": lr})
    traced = make_train_step(graphdef, traced_lr=True, **kw)
    s_state, s_loss, s_lr = _run(static, params, batches)
    t_state, t_loss, t_lr = _run(traced, params, batches, learning_rate=lr)
    np.testing.assert_allclose(t_loss, s_loss, rtol=1e-6)
    np.testing.assert_allclose(t_lr, s_lr, rtol=1e-6)
    _assert_trees_equal(t_state.params, s_state.params, rtol=1e-6, atol=1e-7)
    _assert_trees_equal(t_state.extras, s_state.extras, rtol=1e-6, atol=1e-7)
    assert float(learning_rate_of(t_state.opt_state)) == pytest.approx(lr)
    _run(traced, params, batches[:1], learning_rate=2 * lr)
    assert traced.step_fn._cache_size() == 1


def test_embedded_linear_takes_traced_coordinates_on_every_cpu_backend():
    """Under jit with rows / cols as arguments: the tile gradient is dense autodiff's dW at
    those tiles (xla, and the Pallas kernel in its interpreter, which reads them as arrays)."""
    rng = np.random.default_rng(0)
    bs, out_dim, in_dim = 8, 32, 24
    x = jnp.asarray(rng.normal(size=(2, 5, in_dim)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(out_dim, in_dim)), jnp.float32)
    rows, cols = np.array([0, 3, 1], np.int32), np.array([2, 0, 2], np.int32)
    dw = jax.grad(lambda w: jnp.sum(jnp.sin(x @ w.T)))(w).reshape(4, bs, 3, bs)
    want = np.asarray(dw[rows, :, cols, :])
    for backend in ("xla", "pallas"):
        def loss(tiles, rows, cols):
            return jnp.sum(jnp.sin(embedded_linear(x, w, tiles, rows, cols, block_size=bs, backend=backend)))

        grad = jax.jit(jax.grad(loss))(jnp.zeros((3, bs, bs)), jnp.asarray(rows), jnp.asarray(cols))
        np.testing.assert_allclose(np.asarray(grad), want, rtol=1e-5, atol=1e-5, err_msg=backend)


def test_layout_gathers_and_scatters_at_traced_coordinates_in_both_layouts():
    """TileLayout.tiles / apply_updates under jit == the Adapter's at the same tiles,
    for [out, in] and Linen [in, out] storage."""
    rng = np.random.default_rng(3)
    masks = {"a": rng.random((3, 2)) < 0.5, "b": np.eye(2, dtype=bool)}
    masks["a"][0, 0] = True
    for layout_name, shapes in (("out_in", {"a": (24, 16), "b": (16, 16)}),
                                ("in_out", {"a": (16, 24), "b": (16, 16)})):
        params = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()}
        adapter = make_adapter(params, masks, block_size=8, layout=layout_name)
        layout = adapter.tile_layout
        coords = layout.coords(masks)
        ups = {p: jnp.asarray(rng.normal(size=(int(m.sum()), 8, 8)), jnp.float32) for p, m in masks.items()}
        tiles = jax.jit(layout.tiles)(params, coords)
        moved = jax.jit(layout.apply_updates)(params, coords, ups)
        _assert_trees_equal(tiles, adapter.tiles(params))
        _assert_trees_equal(moved, adapter.apply_updates(params, ups))
        assert layout.adapter(coords) == adapter and TileLayout.of(layout.adapter(coords)) == layout


def test_bad_coordinates_and_rates_are_refused_with_the_fix():
    params = {"a": jnp.zeros((16, 16)), "b": jnp.zeros((16, 8))}
    masks = {"a": np.array([[True, False], [False, True]]), "b": np.array([[True], [False]])}
    layout = make_adapter(params, masks, block_size=8).tile_layout
    assert layout.counts == {"a": 2, "b": 1}
    with pytest.raises(ValueError, match=r"'a'.*selects 1 tiles.*k = 2"):
        layout.coords({**masks, "a": np.array([[True, False], [False, False]])})
    with pytest.raises(ValueError, match="does not adapt"):
        layout.coords({**masks, "c": np.ones((1, 1), bool)})
    with pytest.raises(ValueError, match=r"shape \(1, 1\).*\(2, 1\)"):
        layout.coords({**masks, "b": np.ones((1, 1), bool)})
    with pytest.raises(ValueError, match="out of range"):
        layout.validate({"a": (np.array([0, 2]), np.array([0, 1])), "b": (np.array([0]), np.array([0]))})
    with pytest.raises(ValueError, match="twice"):
        layout.validate({"a": (np.array([1, 1]), np.array([0, 0])), "b": (np.array([0]), np.array([0]))})
    with pytest.raises(ValueError, match=r"expected \(2,\)"):
        layout.tiles(params, {"a": (np.array([0]), np.array([0])), "b": (np.array([0]), np.array([0]))})
    with pytest.raises(ValueError, match="extras=layout.coords"):
        methods.sylva_traced(layout).init(params, jax.random.PRNGKey(0))
    with pytest.raises(TypeError, match="TileLayout"):
        methods.sylva_traced(masks)
    plain = sparse_adamw(1e-3).init({"a": jnp.zeros((2, 8, 8))})
    with pytest.raises(ValueError, match="traced_learning_rate"):
        with_learning_rate(plain, 1e-3)
    assert learning_rate_of(plain) is None
    traced = traced_learning_rate(lambda learning_rate: sparse_adamw(learning_rate), 1e-3)
    state = with_learning_rate(traced.init({"a": jnp.zeros((2, 8, 8))}), 5e-4)
    assert learning_rate_of(state).dtype == jnp.float32 and float(learning_rate_of(state)) == pytest.approx(5e-4)
