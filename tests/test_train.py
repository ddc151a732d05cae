"""Training steps (sylva / lora / full) on a tiny random LLaMA.

References are independent of the code under test: dense ``jax.grad`` of the plain model,
``optax.adamw`` on dense weights restricted to the tiles, and the explicit LoRA formula
``W + (alpha/r) B A`` differentiated by autodiff. Everything is float32.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sylva_jax import tree as tree_lib
from sylva_jax.adapter import make_adapter
from sylva_jax.lora import dropout_keep_mask, init_lora, lora_linear_fn, merge_lora
from sylva_jax.losses import IGNORE_INDEX, lm_loss
from sylva_jax.models import llama
from sylva_jax.train import make_schedule, make_train_step
from tiny import tiny_config, tiny_split

BS = 32
CFG = tiny_config(vocab_size=128, hidden_size=128, intermediate_size=256)


_norm = getattr(getattr(optax, "tree", None), "norm", None) or optax.global_norm  # optax.global_norm is deprecated


def copy(tree):
    return jax.tree.map(jnp.copy, tree)


def tiny_llama(seed=0, cfg=CFG):
    """(graphdef, params) of a random tiny LLaMA of ``cfg`` (:func:`tiny.tiny_split`)."""
    return tiny_split(seed, cfg)


def make_batch(seed, b, t=16, lead=()):
    """Random ids; labels ignore a random prefix per row (different token counts per row)
    and one row is right-padded, so token-mean and mean-of-means differ."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, CFG.vocab_size, lead + (b, t)).astype(np.int32)
    mask = np.ones_like(ids)
    labels = ids.copy()
    flat_l, flat_m = labels.reshape(-1, t), mask.reshape(-1, t)
    for r in range(flat_l.shape[0]):
        flat_l[r, : rng.integers(0, t // 2)] = IGNORE_INDEX
    flat_m[0, -3:] = 0
    flat_l[0, -3:] = IGNORE_INDEX
    return {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask), "labels": jnp.asarray(labels)}


def tile_mask(adapter, path, shape):
    m = np.zeros((shape[0] // BS, shape[1] // BS), bool)
    rows, cols = adapter.coords[path]
    m[rows, cols] = True
    return np.kron(m, np.ones((BS, BS), bool))


@pytest.fixture(scope="module")
def dense(base):
    """Jitted references on the plain model: loss, gradient w.r.t. all params, logits."""
    graphdef, _ = base

    def loss(params, batch):
        return lm_loss(llama.apply(graphdef, params, batch["input_ids"], batch["attention_mask"]), batch["labels"])

    return {"loss": jax.jit(loss), "grad": jax.jit(jax.grad(loss)),
            "logits": jax.jit(lambda p, b: llama.apply(graphdef, p, b["input_ids"], b["attention_mask"]))}


# Trainers are shared between tests (and with tests/test_checkpoint.py): one compilation
# per trainer and batch shape. eps is 1e-4 rather than the published 1e-6 so that Adam's
# g / (|g| + eps) is well conditioned and comparisons with references can be tight (the
# equivalences tested do not depend on eps).
SYLVA_KW = dict(learning_rate=1e-2, schedule="linear", warmup_steps=1, total_steps=40, weight_decay=0.05,
                eps=1e-4)
LORA_KW = dict(scope="self_attn", lora_rank=4, lora_alpha=8.0, learning_rate=1e-2, schedule="constant",
               warmup_steps=0, eps=1e-4)


@functools.lru_cache(maxsize=None)
def shared():
    """``(graphdef, params, adapter, trainers)``, built once per process. Tests must never
    donate ``params`` itself: ``trainer.init(copy(params))`` before stepping."""
    graphdef, params = tiny_llama()
    rng = np.random.default_rng(1)
    masks = {}
    for path, w in tree_lib.flatten(params).items():
        if ".layers." in path and w.ndim == 2:
            m = rng.random((w.shape[0] // BS, w.shape[1] // BS)) < 0.2
            m[rng.integers(m.shape[0]), rng.integers(m.shape[1])] = True
            masks[path] = m
    adapter = make_adapter(params, masks, block_size=BS)
    trainers = {
        "sylva": make_train_step(graphdef, method="sylva", adapter=adapter, **SYLVA_KW),
        "lora": make_train_step(graphdef, method="lora", **LORA_KW),
        "lora_dropout": make_train_step(graphdef, method="lora", scope=["self_attn", "mlp.up"], lora_rank=8,
                                        lora_alpha=16, lora_dropout=0.1, learning_rate=2e-2,
                                        schedule="constant", warmup_steps=0),
        "full": make_train_step(graphdef, method="full", learning_rate=3e-3, schedule="constant",
                                warmup_steps=0, max_grad_norm=0.5),
    }
    return graphdef, params, adapter, trainers


@pytest.fixture(scope="module")
def base():
    return shared()[:2]


@pytest.fixture(scope="module")
def adapter():
    return shared()[2]


@pytest.fixture(scope="module")
def trainers():
    return shared()[3]


# ------------------------------------------------------------------------------ sylva
def test_sylva_touches_only_tiles_and_equals_masked_dense_adamw(base, adapter, trainers, dense):
    """3 sylva steps (sparse_adamw, weight decay, warm-up + linear schedule):
    (a) W differs from the base only inside its tiles; every other element and every
        other parameter (norms, embeddings, lm_head) is bit-identical;
    (b) the result equals optax.adamw on dense W with gradients and updates masked to the
        tiles (optax.masked leaves every non-adapted weight alone)."""
    _, params = base
    trainer = trainers["sylva"]
    state = trainer.init(copy(params))
    assert trainer.num_trainable == adapter.num_trainable > 0
    batches = [make_batch(10 + i, 2) for i in range(3)]
    for b in batches:
        state, metrics = trainer.step(state, b)
    assert int(state.step) == 3 and int(state.data_pos) == 6
    assert set(metrics) >= {"loss", "lr", "grad_norm", "tokens"}
    new, old = tree_lib.flatten(state.params), tree_lib.flatten(params)
    for path, w0 in old.items():
        w1 = np.asarray(new[path])
        if path in adapter.coords:
            inside = tile_mask(adapter, path, w0.shape)
            changed = w1 != np.asarray(w0)
            assert not changed[~inside].any(), f"{path}: elements outside the tiles changed"
            assert changed[inside].mean() > 0.9, f"{path}: tiles did not train"
        else:
            np.testing.assert_array_equal(w1, np.asarray(w0), err_msg=path)

    sched = make_schedule("linear", SYLVA_KW["learning_rate"], warmup_steps=1, total_steps=40)
    elem = {p: jnp.asarray(tile_mask(adapter, p, w.shape)) for p, w in old.items() if p in adapter.coords}
    elem_mask = tree_lib.map_flat(lambda p, w: elem.get(p, jnp.zeros((), bool)), params)
    opt = optax.masked(optax.adamw(sched, b1=0.9, b2=0.999, eps=1e-4, weight_decay=0.05),
                       adapter.trainable_mask(params))
    @jax.jit
    def ref_step(ref, opt_state, b):
        g = jax.tree.map(lambda gi, m: jnp.where(m, gi, 0.0), dense["grad"](ref, b), elem_mask)
        upd, opt_state = opt.update(g, opt_state, ref)
        return optax.apply_updates(ref, jax.tree.map(lambda u, m: jnp.where(m, u, 0.0), upd, elem_mask)), opt_state

    ref = copy(params)
    opt_state = opt.init(ref)
    for b in batches:
        ref, opt_state = ref_step(ref, opt_state, b)
    want = tree_lib.flatten(ref)
    for path in want:
        # each Adam update is ~lr = 1e-2 per entry; gradient rounding differences (~1e-6
        # relative, SDD vs dense dW) move it by < 1e-6 * lr / eps-conditioning -> 2e-6
        np.testing.assert_allclose(new[path], want[path], rtol=0, atol=2e-6, err_msg=path)


def test_sylva_step_has_no_dense_weight_gradient_or_weight_copy(base, adapter, trainers):
    """In the compiled sylva step no value has the shape of a 2-D weight except the weights
    themselves (parameters and free reshapes): no dense dW, no copy of any W (the tile
    update is a scatter into the donated buffer), and params in == params out (aliased)."""
    import re

    _, params = base
    trainer = trainers["sylva"]
    state = trainer.init(copy(params))
    compiled = trainer.step_fn.lower(state, make_batch(0, 2)).compile()
    shapes = {f"f32[{a},{b}]" for a, b in (w.shape for w in jax.tree.leaves(params) if w.ndim == 2)}
    offenders = []
    for line in compiled.as_text().splitlines():
        m = re.match(r"\s*(?:ROOT )?%\S+ = (f32\[\d+,\d+\])\S* ([\w-]+)\(", line)
        if m and m.group(1) in shapes and m.group(2) not in ("parameter", "bitcast"):
            offenders.append(line.strip()[:160])
    assert not offenders, offenders
    mem = compiled.memory_analysis()
    if mem is not None:  # every parameter buffer is donated and reused for the output
        assert mem.alias_size_in_bytes >= sum(x.nbytes for x in jax.tree.leaves(params))


def test_sylva_grad_equals_dense_grad_at_tiles(base, adapter, trainers, dense):
    _, params = base
    batch = make_batch(1, 2)
    loss, grads = trainers["sylva"].grads(trainers["sylva"].init(params), batch)
    want = adapter.tiles(dense["grad"](params, batch))
    np.testing.assert_allclose(float(loss), float(dense["loss"](params, batch)), rtol=1e-6)
    assert set(grads) == set(adapter.coords)
    for path in adapter.coords:
        # same products summed in a different order (SDD vs dense dW): float32 rounding of
        # sums over 2*16 tokens, far below 1e-5 relative to the largest gradient entry
        scale = float(jnp.abs(want[path]).max())
        assert scale > 0
        np.testing.assert_allclose(grads[path], want[path], rtol=1e-5, atol=1e-5 * scale, err_msg=path)


def _tol(tree):
    """float32 sums over the tokens split in two halves vs one: the rounding error of a sum
    of N terms is ~N * 6e-8 times the sum of |terms|, and the terms are of the order of
    the largest gradient entry, so 1e-5 of that bounds it for N = 64 tokens."""
    return dict(rtol=1e-5, atol=1e-5 * max(float(jnp.abs(x).max()) for x in jax.tree.leaves(tree)))


def test_accumulation_semantics(base, adapter, trainers):
    """accum_reduction='tokens' (default): k micro-batches == one batch of k*b (token mean
    over the union); 'mean': the mean of the micro-batch losses and gradients; the loop
    mode (jitted micro-steps + one update) equals the scan mode."""
    graphdef, params = base
    one = trainers["sylva"]
    acc = make_train_step(graphdef, method="sylva", adapter=adapter, accum_steps=2, **SYLVA_KW)
    acc_mean = make_train_step(graphdef, method="sylva", adapter=adapter, accum_steps=2,
                               accum_reduction="mean", **SYLVA_KW)
    loop_mean = make_train_step(graphdef, method="sylva", adapter=adapter, accum_steps=2,
                                accum_reduction="mean", accum_mode="loop", **SYLVA_KW)
    big = make_batch(3, 4)
    micro = {k: v.reshape(2, 2, -1) for k, v in big.items()}
    state = one.init(params)
    l1, g1 = one.grads(state, big)
    l2, g2 = acc.grads(state, micro)
    np.testing.assert_allclose(float(l2), float(l1), rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **_tol(g1)), g2, g1)

    halves = [one.grads(state, {k: v[i] for k, v in micro.items()}) for i in range(2)]
    g_mean = jax.tree.map(lambda b, c: (b + c) / 2, halves[0][1], halves[1][1])
    l_mean = (float(halves[0][0]) + float(halves[1][0])) / 2
    assert abs(l_mean - float(l1)) > 1e-4  # the two definitions really differ on this batch
    s_scan, m_scan = acc_mean.step(copy(state), micro)
    s_loop, m_loop = loop_mean.step(copy(state), micro)
    for m in (m_scan, m_loop):
        np.testing.assert_allclose(float(m["loss"]), l_mean, rtol=1e-6)
        np.testing.assert_allclose(float(m["grad_norm"]), float(_norm(g_mean)), rtol=1e-5)
        assert float(m["tokens"]) == float((big["labels"][:, 1:] != IGNORE_INDEX).sum())
    # one Adam step moves entries by ~lr; rounding of the accumulated gradient by ~1e-7
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=0, atol=1e-6), s_scan.params, s_loop.params)
    assert int(s_scan.data_pos) == int(s_loop.data_pos) == 4 and int(s_scan.step) == int(s_loop.step) == 1
    with pytest.raises(ValueError, match=r"\[2, b, T\]"):
        acc.step(state, big)


# ------------------------------------------------------------------------------ lora
def test_lora_init_is_identity_and_w_frozen(base, trainers, dense):
    graphdef, params = base
    trainer = trainers["lora_dropout"]
    state = trainer.init(copy(params))
    lora = state.extras
    want = [p for p in tree_lib.flatten(params) if "self_attn" in p or "mlp.up_proj" in p]
    assert list(lora.factors) == want and len(want) == 10
    assert trainer.num_trainable == sum(8 * (f["a"].shape[1] + f["b"].shape[0]) for f in lora.factors.values())
    for path, f in lora.factors.items():
        w = tree_lib.flatten(params)[path]
        assert f["a"].shape == (8, w.shape[1]) and f["b"].shape == (w.shape[0], 8)
        assert not np.any(np.asarray(f["b"]))
        bound = 1 / math.sqrt(w.shape[1])  # PEFT: kaiming_uniform(a=sqrt(5)) -> U(-1/sqrt(in), 1/sqrt(in))
        assert 0.9 * bound < float(jnp.abs(f["a"]).max()) <= bound
    batch = make_batch(6, 2)
    np.testing.assert_array_equal(trainer.logits(state, batch["input_ids"], batch["attention_mask"]),
                                  dense["logits"](params, batch))
    # dropout acts on the LoRA branch only: with B = 0 the training loss is the base loss
    state, metrics = trainer.step(state, batch)
    np.testing.assert_allclose(float(metrics["loss"]), float(dense["loss"](params, batch)), rtol=1e-6)
    state, _ = trainer.step(state, batch)
    jax.tree.map(np.testing.assert_array_equal, state.params, params)  # W frozen, bitwise
    assert all(float(jnp.abs(f["b"]).max()) > 0 for f in state.extras.factors.values())


def test_lora_grads_match_explicit_formula_and_merge(base, trainers, dense):
    graphdef, params = base
    trainer = trainers["lora"]
    lora = init_lora(params, scope="self_attn", rank=4, alpha=8.0, rng=0)
    lora = lora.replace(factors=jax.tree.map(lambda x: x + 0.03, lora.factors))  # B != 0
    state = trainer.init(params, lora=lora)
    batch = make_batch(5, 2)

    @jax.jit
    def explicit(factors):  # W_eff = W + (alpha/r) B A in the plain model
        eff = tree_lib.map_flat(
            lambda p, w: w + 2.0 * factors[p]["b"] @ factors[p]["a"] if p in factors else w, params)
        return dense["loss"](eff, batch)

    want_loss, want = jax.value_and_grad(explicit)(lora.factors)
    loss, got = trainer.grads(state, batch)
    # x (W + s B A)^T vs x W^T + s (x A^T) B^T: same math, different float32 rounding
    # (relative ~1e-6 per product, through two layers): 1e-4 relative to the largest entry
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-5)
    for path in want:
        for name in ("a", "b"):
            g, w = got.factors[path][name], want[path][name]
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * float(jnp.abs(w).max()), err_msg=path)

    merged = merge_lora(params, lora)
    # same rounding argument; logits are O(1)
    np.testing.assert_allclose(dense["logits"](merged, batch),
                               trainer.logits(state, batch["input_ids"], batch["attention_mask"]),
                               rtol=1e-4, atol=1e-4)
    for path, w in tree_lib.flatten(merged).items():  # only the adapted weights moved
        same = np.array_equal(np.asarray(w), np.asarray(tree_lib.flatten(params)[path]))
        assert same == (path not in lora.factors), path


def test_logits_at_positions_with_lora_and_with_a_custom_apply_fn(base, trainers):
    """``trainer.logits(..., positions=p)`` is the full logits gathered at ``p``: through
    ``logits_at`` for our model (LoRA's hooked head included), and by gathering for an
    ``apply_fn`` that does not take ``logits_at``."""
    graphdef, params = base
    lora = init_lora(params, scope="self_attn", rank=4, alpha=8.0, rng=0)
    lora = lora.replace(factors=jax.tree.map(lambda x: x + 0.03, lora.factors))  # B != 0
    batch = make_batch(5, 2)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    pos = jnp.sum(mask, axis=-1) - 1
    state = trainers["lora"].init(params, lora=lora)
    full = np.asarray(trainers["lora"].logits(state, ids, mask))
    want = full[np.arange(ids.shape[0]), np.asarray(pos)]
    got = trainers["lora"].logits(state, ids, mask, positions=pos)
    assert got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)  # one head row vs T: blocking only

    def plain(gd, p, i, m, *, linear_fn=None):  # a custom model function without logits_at
        return llama.apply(gd, p, i, m, linear_fn=linear_fn)

    from sylva_jax.train import _takes_logits_at

    assert _takes_logits_at(llama.apply) and not _takes_logits_at(plain)
    custom = make_train_step(graphdef, method="full", learning_rate=1e-3, schedule="constant", warmup_steps=0,
                             apply_fn=plain)
    cstate = custom.init(copy(params))
    np.testing.assert_array_equal(
        np.asarray(custom.logits(cstate, ids, mask, positions=pos)),
        np.asarray(custom.logits(cstate, ids, mask))[np.arange(ids.shape[0]), np.asarray(pos)])


def test_lora_dropout_is_on_the_branch_and_seeded(base):
    _, params = base
    lora = init_lora(params, scope="self_attn", rank=4, alpha=8.0, rng=0)
    lora = lora.replace(factors=jax.tree.map(lambda x: x + 0.03, lora.factors))
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, CFG.hidden_size))
    flat = tree_lib.flatten(params)
    name, other = "model.layers.1.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight"
    key = jax.random.PRNGKey(3)
    y0 = lora_linear_fn(lora, dropout=0.0)(name, x, flat[name], None)
    y1 = lora_linear_fn(lora, dropout=0.5, rng=key)(name, x, flat[name], None)
    np.testing.assert_array_equal(y1, lora_linear_fn(lora, dropout=0.5, rng=key)(name, x, flat[name], None))
    assert float(jnp.abs(y1 - y0).max()) > 1e-3
    # an un-adapted weight is a plain frozen product, unaffected by dropout
    np.testing.assert_array_equal(lora_linear_fn(lora, dropout=0.5, rng=key)(other, x, flat[other], None),
                                  x @ flat[other].T)
    with pytest.raises(ValueError, match="rng"):
        lora_linear_fn(lora, dropout=0.1)
    # the counter-based masks: keep rate 1 - p, independent across weights and keys
    n, p = 200_000, 0.05
    m0, m1 = (np.asarray(dropout_keep_mask(key, i, (n,), p)) for i in (0, 1))
    m2 = np.asarray(dropout_keep_mask(jax.random.PRNGKey(4), 0, (n,), p))
    sigma = math.sqrt(p * (1 - p) / n)  # binomial standard deviation of a keep fraction
    for m in (m0, m1, m2):
        assert abs(m.mean() - (1 - p)) < 5 * sigma
    for a, b in ((m0, m1), (m0, m2)):  # both dropped: p^2 if independent
        assert abs((~a & ~b).mean() - p * p) < 5 * math.sqrt(p * p / n)
    tf = np.asarray(dropout_keep_mask(key, 0, (n,), p, impl="threefry"))
    assert abs(tf.mean() - (1 - p)) < 5 * sigma
    with pytest.raises(ValueError, match="matches no"):
        init_lora(params, scope="attn_typo")


# ------------------------------------------------------------------------------ all methods
@pytest.mark.parametrize("method", ["sylva", "lora_dropout", "full"])
def test_loss_falls_on_memorisation(base, trainers, method):
    _, params = base
    trainer = trainers[method]
    state = trainer.init(copy(params))
    batch = make_batch(6, 2)
    first = float(trainer.eval_loss(state, batch))
    for _ in range(25):
        state, metrics = trainer.step(state, batch)
    last = float(trainer.eval_loss(state, batch))
    assert np.isfinite(float(metrics["grad_norm"])) and float(metrics["lr"]) > 0
    assert last < 0.5 * first, (method, first, last)


def test_full_step_is_clipped_adamw(base, trainers, dense):
    _, params = base
    trainer = trainers["full"]
    batch = make_batch(6, 2)
    state, metrics = trainer.step(trainer.init(copy(params)), batch)
    g = dense["grad"](params, batch)
    np.testing.assert_allclose(float(metrics["grad_norm"]), float(_norm(g)), rtol=1e-5)
    opt = optax.chain(optax.clip_by_global_norm(0.5), optax.adamw(3e-3, eps=1e-6, weight_decay=0.0))
    want = jax.jit(lambda p, g: optax.apply_updates(p, opt.update(g, opt.init(p), p)[0]))(params, g)
    # Adam's first step is lr * g / (|g| + eps): entries with |g| ~ eps are sensitive to
    # the gradient's rounding; 1e-5 absolute is a third of a percent of the step
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5), state.params, want)
    assert trainer.num_trainable == sum(x.size for x in jax.tree.leaves(params))


# ------------------------------------------------------------------------------ schedules, errors
def test_schedules():
    lin = make_schedule("linear", 1.0, warmup_steps=4, total_steps=12)
    # Hugging Face get_linear_schedule_with_warmup: s/w during warm-up, (T-s)/(T-w) after
    for s in range(14):
        want = s / 4 if s < 4 else max(0.0, (12 - s) / 8)
        assert abs(float(lin(s)) - want) < 1e-6, s
    cos = make_schedule("cosine", 2.0, warmup_steps=2, total_steps=10)
    assert abs(float(cos(1)) - 1.0) < 1e-6 and abs(float(cos(6)) - 1.0) < 1e-6 and float(cos(10)) < 1e-6
    const = make_schedule("constant", 0.5, warmup_steps=0)
    assert float(const(0)) == float(const(1000)) == 0.5
    with pytest.raises(ValueError, match="total_steps"):
        make_schedule("linear", 1.0, warmup_steps=4)
    with pytest.raises(ValueError, match="unknown schedule"):
        make_schedule("exp", 1.0)


def test_bad_arguments(base):
    graphdef, _ = base
    with pytest.raises(ValueError, match="unknown method"):
        make_train_step(graphdef, method="adapterx")
    with pytest.raises(ValueError, match="needs adapter"):
        make_train_step(graphdef, method="sylva")
    with pytest.raises(ValueError, match="accum_reduction"):
        make_train_step(graphdef, method="full", accum_reduction="sum")
