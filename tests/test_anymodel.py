"""Sylva for any JAX model (sylva_jax/anymodel.py): capture statistics and sparse tile
gradients obtained by interpreting the traced program of unchanged user models, against
independent references:

- capture: an explicit, hand-written tap version (Linen ``nn.intercept_methods`` around
  ``Dense``/``DenseGeneral``, NNX module surgery-free hooks via a subclass, and a plain
  function written with probe arguments), one sample at a time with ``jax.grad``;
- sparsify: ``jax.grad`` of the dense model, gathered at the tiles with the adapter;
- the gradient jaxpr holds no ``[out, in]``-shaped product for adapted weights;
- parameters that cannot be followed are reported (tied embedding, scanned layers,
  scaled weight), never left dense.

Sizes are tiny (block size 8) so the file runs in well under its 90 s budget on 2 cores.
Tolerances: float32 models compare the same float32 operations executed in differently
fused XLA programs: rounding differences are a few ulps of the largest term, so
``rtol=1e-4`` relative to each array's scale (``atol = 1e-5 * max|ref|``) leaves two orders
of margin; the bfloat16 model's products round to 8 mantissa bits (relative 2^-8 = 4e-3
per rounding), so it gets ``rtol=3e-2``.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sylva_jax import anymodel
from sylva_jax import tree as tree_lib
from sylva_jax.adapter import make_adapter
from sylva_jax.losses import lm_loss
from tiny import tiny_config

BS = 8
V, E, H, D, F, T = 48, 32, 4, 8, 64, 6


def close(actual, ref, rtol=1e-4, what=""):
    actual, ref = np.asarray(actual, np.float64), np.asarray(ref, np.float64)
    assert actual.shape == ref.shape, (what, actual.shape, ref.shape)
    scale = max(np.abs(ref).max(), 1e-30)
    np.testing.assert_allclose(actual, ref, rtol=rtol, atol=rtol * 0.1 * scale, err_msg=what)


def lm_batches(seed, n, bsz, t=T, vocab=V):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, size=(n, t)).astype(np.int32)
    lens = rng.integers(3, t + 1, size=n)
    am = (np.arange(t)[None] < lens[:, None]).astype(np.int32)
    labels = np.where(am == 1, ids, -100).astype(np.int32)
    return [{"input_ids": ids[i:i + bsz], "attention_mask": am[i:i + bsz],
             "labels": labels[i:i + bsz]} for i in range(0, n, bsz)]


# --------------------------------------------------------------------------------------
# Models, defined here
# --------------------------------------------------------------------------------------


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(64, name="fc1")(x))
        x = jnp.tanh(nn.Dense(32, name="fc2")(x))
        return nn.Dense(16, name="fc3")(x)


def mlp_loss(model, params, batch):
    pred = model.apply({"params": params}, batch["x"])
    return jnp.mean((pred - batch["y"]) ** 2)


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, mask):
        h = nn.LayerNorm(name="ln1")(x)
        q = nn.DenseGeneral((H, D), name="query")(h)         # kernel [E, H, D]
        k = nn.DenseGeneral((H, D), name="key")(h)
        v = nn.DenseGeneral((H, D), name="value")(h)
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(D)
        tq = x.shape[1]
        allowed = jnp.tril(jnp.ones((tq, tq), bool))[None, None] & (mask[:, None, None, :] > 0)
        s = jnp.where(allowed, s, -1e9)
        o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v)
        x = x + nn.DenseGeneral(E, axis=(-2, -1), name="out")(o)  # kernel [H, D, E]
        h = nn.LayerNorm(name="ln2")(x)
        return x + nn.Dense(E, name="fc2")(nn.gelu(nn.Dense(F, name="fc1")(h)))


class LinenLM(nn.Module):
    @nn.compact
    def __call__(self, ids, mask):
        x = nn.Embed(V, E, name="embed")(ids)
        x = Block(name="block")(x, mask)
        return nn.Dense(V, name="head")(nn.LayerNorm(name="ln_f")(x))


def lm_fn(model):
    def loss(params, batch):
        logits = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"])
        return lm_loss(logits, batch["labels"])
    return loss


class NNXNet(nnx.Module):
    def __init__(self, rngs):
        self.up = nnx.Linear(16, 32, rngs=rngs)
        self.down = nnx.Linear(32, 32, rngs=rngs)
        self.norm = nnx.LayerNorm(32, rngs=rngs)
        self.head = nnx.Linear(32, 16, use_bias=False, rngs=rngs)

    def __call__(self, x, linear=None):
        lin = linear or (lambda name, layer, h: layer(h))
        h = jax.nn.silu(lin("up", self.up, x))
        h = self.norm(lin("down", self.down, h))
        return lin("head", self.head, h)


def nnx_loss_per_token(graphdef, params, batch):
    out = nnx.merge(graphdef, params)(batch["x"])
    return ((out - batch["y"]) ** 2).mean(-1)                      # [B, T]


def nnx_loss(graphdef, params, batch):
    m = batch["attention_mask"].astype(jnp.float32)
    per_tok = nnx_loss_per_token(graphdef, params, batch)
    return (per_tok * m).sum() / m.sum()


@jax.custom_jvp
def soft_clip(x):
    return 3.0 * jnp.tanh(x / 3.0)


@soft_clip.defjvp
def _soft_clip_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return soft_clip(x), t * (1.0 - jnp.tanh(x / 3.0) ** 2)


def plain_forward(params, x, taps=None):
    """A plain-function model: weights stored [out, in], transposed and cast to bfloat16
    before the product, inside a nested jit, a remat and one branch of a ``lax.cond``
    (taken when ``x[..., 0].sum() > 0``); ``taps`` (reference only) is ``(probes, record)``:
    adds ``probes[name]`` to each product and records its input (zero when the branch is
    not taken: the layer saw nothing)."""
    use = x[..., 0].sum() > 0

    def product(name, h, w_t, gate=True):
        y = h @ w_t
        if taps is not None:
            probes, record = taps
            record[name] = h * gate
            y = y + probes[name].astype(y.dtype)
        return y

    w1 = params["w1"].T.astype(jnp.bfloat16)                     # [in, out] bf16
    h = product("w1", x.astype(jnp.bfloat16), w1)
    h = soft_clip(h.astype(jnp.float32))
    w2 = params["w2"]

    def inner(h, w2, gate=True):
        return product("w2", h.astype(jnp.bfloat16), w2.T.astype(jnp.bfloat16), gate)

    def skip(h):
        return jnp.zeros(h.shape[:-1] + (w2.shape[0],), jnp.bfloat16)

    if taps is not None:   # the reference records by side effect: no remat, no cond
        h = jnp.where(use, inner(h, w2, use), skip(h))
    else:
        h = jax.lax.cond(use, lambda h: jax.jit(jax.checkpoint(inner))(h, w2), skip, h)
    return h.astype(jnp.float32) + params["b2"]


def plain_loss(params, batch):
    return jnp.mean((plain_forward(params, batch["x"]) - batch["y"]) ** 2)


# --------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def linen_lm():
    model = LinenLM()
    b = lm_batches(0, 1, 1)[0]
    params = jax.jit(model.init)(jax.random.key(0), b["input_ids"], b["attention_mask"])["params"]
    return model, params


@pytest.fixture(scope="module")
def nnx_net():
    graphdef, params = nnx.split(NNXNet(nnx.Rngs(1)), nnx.Param)
    rng = np.random.default_rng(3)
    batches = []
    for i in range(2):
        am = np.ones((3, T), np.int32)
        am[:, T - 2 - i:] = 0
        batches.append({"x": rng.normal(size=(3, T, 16)).astype(np.float32),
                        "y": rng.normal(size=(3, T, 16)).astype(np.float32),
                        "attention_mask": am})
    return graphdef, params, batches


def plain_params():
    rng = np.random.default_rng(5)
    return {"w1": jnp.asarray(rng.normal(size=(32, 16)) / 4, jnp.float32),
            "w2": jnp.asarray(rng.normal(size=(16, 32)) / 6, jnp.float32),
            "b2": jnp.asarray(rng.normal(size=(16,)), jnp.float32)}


def plain_batches(n=6, bsz=3):
    rng = np.random.default_rng(6)
    x = rng.normal(size=(n, 4, 16)).astype(np.float32)
    y = rng.normal(size=(n, 4, 16)).astype(np.float32)
    return [{"x": x[i:i + bsz], "y": y[i:i + bsz]} for i in range(0, n, bsz)]


# --------------------------------------------------------------------------------------
# Hand-written tap references (one sample at a time)
# --------------------------------------------------------------------------------------


def reference_stats(sample_grad, samples, masks, shapes):
    """Sum of a a^T, g g^T and mean of dL/dW [out, in] over samples, from
    ``sample_grad(sample) -> (acts {name: x [T, in]}, dprobe {name: [T, out]},
    dW {name: [out, in]})``; a and g are masked token means."""
    A = {n: np.zeros((s[1], s[1])) for n, s in shapes.items()}
    G = {n: np.zeros((s[0], s[0])) for n, s in shapes.items()}
    W = {n: np.zeros(s) for n, s in shapes.items()}
    for sample, m in zip(samples, masks):
        acts, dprobe, dw = sample_grad(sample)
        m = np.ones(next(iter(acts.values())).shape[0]) if m is None else np.asarray(m, np.float64)
        for n in shapes:
            x = np.asarray(acts[n], np.float64).reshape(m.shape[0], -1)
            gy = np.asarray(dprobe[n], np.float64).reshape(m.shape[0], -1)
            a = (m[:, None] * x).sum(0) / m.sum()
            g = (m[:, None] * gy).sum(0) / m.sum()
            A[n] += np.outer(a, a)
            G[n] += np.outer(g, g)
            W[n] += np.asarray(dw[n], np.float64)
    return A, G, {n: w / len(samples) for n, w in W.items()}


def check_stats(stats, ref, rtol=1e-4):
    """Each statistic against the reference, with the absolute tolerance scaled by the
    largest value of that statistic over all layers: a layer whose statistic is zero in
    exact arithmetic (the key projection's G: softmax is invariant to adding one vector to
    every key, so the token sum of dL/dk is 0) holds only rounding noise."""
    assert set(stats) == set(ref[0])
    for what, r, attr in zip("AGW", ref, ("A_dense", "G_dense", "grad_mean")):
        scale = max(np.abs(v).max() for v in r.values())
        for n in r:
            got = np.asarray(getattr(stats[n], attr), np.float64)
            assert got.shape == r[n].shape, (what, n)
            np.testing.assert_allclose(got, r[n], rtol=rtol, atol=rtol * 0.1 * scale,
                                       err_msg=f"{what} {n}")


def linen_matrix(path, kernel):
    """[out, in] view of a Linen kernel (contracted axes lead)."""
    k = np.asarray(kernel)
    if path.endswith("out.kernel"):                      # [H, D, E]
        return k.reshape(H * D, E).T
    return k.reshape(k.shape[0], -1).T                    # [in, out...]


def linen_lm_reference(model, params, names, batches):
    """Per-sample taps with ``nn.intercept_methods`` around Dense / DenseGeneral."""

    def loss(params, probes, b):
        record = {}

        def interceptor(next_fun, args, kwargs, context):
            mod = context.module
            if context.method_name != "__call__" or not isinstance(mod, (nn.Dense,
                                                                          nn.DenseGeneral)):
                return next_fun(*args, **kwargs)
            name = ".".join(mod.scope.path) + ".kernel"
            y = next_fun(*args, **kwargs)
            if name not in probes:
                return y
            x = args[0]
            record[name] = x.reshape(x.shape[1], -1)             # [T, in]
            return y + probes[name].reshape((y.shape[1],) + y.shape[2:])

        with nn.intercept_methods(interceptor):
            logits = model.apply({"params": params}, b["input_ids"], b["attention_mask"])
        return lm_loss(logits, b["labels"]), record

    grad = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))
    flat = tree_lib.flatten(params)
    shapes = {n: linen_matrix(n, flat[n]).shape for n in names}

    def sample_grad(b):
        probes = {n: jnp.zeros((T, shapes[n][0])) for n in names}
        (dp, dprobe), acts = grad(params, probes, b)
        dpf = tree_lib.flatten(dp)
        return acts, dprobe, {n: linen_matrix(n, dpf[n]) for n in names}

    samples = [{k: v[i:i + 1] for k, v in b.items()} for b in batches
               for i in range(b["input_ids"].shape[0])]
    return reference_stats(sample_grad, samples, [s["attention_mask"][0] for s in samples],
                           shapes)


# --------------------------------------------------------------------------------------
# capture
# --------------------------------------------------------------------------------------

LM_SCOPE = "re:(query|key|value|out|fc1|fc2)\\.kernel"


def test_capture_linen_transformer_equals_intercepted_taps(linen_lm):
    """Dense [in, out] and DenseGeneral [E, H, D] / [H, D, E] kernels; padded batches of
    2 (scalar token-mean loss -> per-sample losses by vmap over batches of one)."""
    model, params = linen_lm
    batches = lm_batches(1, 4, 2)
    stats = anymodel.capture(lm_fn(model), params, batches, scope=LM_SCOPE,
                             factor_kind="dense", num_samples=4)
    names = [f"block.{m}.kernel" for m in ("query", "key", "value", "out", "fc1", "fc2")]
    assert sorted(stats) == sorted(names)
    assert stats["block.query.kernel"].shape == (H * D, E)
    assert stats["block.out.kernel"].shape == (E, H * D)
    assert stats.num_samples == 4
    check_stats(stats, linen_lm_reference(model, params, names, batches))
    # the layer's weight in the Stats is the [out, in] view of the stored kernel
    np.testing.assert_array_equal(np.asarray(stats["block.out.kernel"].weight),
                                  linen_matrix("out.kernel", params["block"]["out"]["kernel"]))


def test_capture_linen_mlp_equals_intercepted_taps():
    model = LinenMLP()
    rng = np.random.default_rng(2)
    x = rng.normal(size=(6, 32)).astype(np.float32)
    y = rng.normal(size=(6, 16)).astype(np.float32)
    params = jax.jit(model.init)(jax.random.key(1), x[:1])["params"]
    batches = [{"x": x[:3], "y": y[:3]}, {"x": x[3:], "y": y[3:]}]
    fn = functools.partial(mlp_loss, model)
    stats = anymodel.capture(fn, params, batches, scope="kernel", factor_kind="dense",
                             num_samples=6)
    names = ["fc1.kernel", "fc2.kernel", "fc3.kernel"]

    def loss(params, probes, b):
        record = {}

        def interceptor(next_fun, args, kwargs, context):
            if not isinstance(context.module, nn.Dense) or context.method_name != "__call__":
                return next_fun(*args, **kwargs)
            name = ".".join(context.module.scope.path) + ".kernel"
            record[name] = args[0]
            return next_fun(*args, **kwargs) + probes[name]

        with nn.intercept_methods(interceptor):
            return mlp_loss(model, params, b), record

    grad = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))
    shapes = {n: tree_lib.flatten(params)[n].shape[::-1] for n in names}

    def sample_grad(b):
        (dp, dprobe), acts = grad(params, {n: jnp.zeros((1, s[0])) for n, s in shapes.items()}, b)
        return acts, dprobe, {n: np.asarray(w).T for n, w in tree_lib.flatten(dp).items()
                              if n in names}

    samples = [{"x": x[i:i + 1], "y": y[i:i + 1]} for i in range(6)]
    check_stats(stats, reference_stats(sample_grad, samples, [None] * 6, shapes))


def nnx_reference(graphdef, params, batches, names):
    def loss(params, probes, b):
        record = {}

        def linear(name, layer, h):
            record[name + ".kernel"] = h[0]
            return layer(h) + probes[name + ".kernel"]

        out = nnx.merge(graphdef, params)(b["x"], linear=linear)
        m = b["attention_mask"].astype(jnp.float32)
        per = ((out - b["y"]) ** 2).mean(-1)
        return (per * m).sum() / m.sum(), record

    grad = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))
    flat = tree_lib.flatten(params)
    shapes = {n: flat[n].shape[::-1] for n in names}

    def sample_grad(b):
        (dp, dprobe), acts = grad(params, {n: jnp.zeros((T, s[0])) for n, s in shapes.items()}, b)
        dpf = tree_lib.flatten(dp)
        return acts, dprobe, {n: np.asarray(dpf[n]).T for n in names}

    samples = [{k: v[i:i + 1] for k, v in b.items()} for b in batches for i in range(3)]
    return reference_stats(sample_grad, samples, [s["attention_mask"][0] for s in samples],
                           shapes)


def test_capture_nnx_scalar_and_per_example_losses_equal_reference(nnx_net):
    """NNX model (State params, names without '.value'); the scalar-loss route (vmap over
    samples) and the per-example-loss route ([B] output) both equal the reference."""
    graphdef, params, batches = nnx_net
    names = ["up.kernel", "down.kernel", "head.kernel"]
    ref = nnx_reference(graphdef, params, batches, names)
    scalar = anymodel.capture(functools.partial(nnx_loss, graphdef), params, batches,
                              scope=names, factor_kind="dense", num_samples=6)

    def per_example(params, batch):
        m = batch["attention_mask"].astype(jnp.float32)
        return (nnx_loss_per_token(graphdef, params, batch) * m).sum(1) / m.sum(1)

    vector = anymodel.capture(per_example, params, batches, scope=names, factor_kind="dense",
                              num_samples=6)
    assert sorted(scalar) == sorted(names) and scalar.num_samples == 6
    check_stats(scalar, ref)
    check_stats(vector, ref)


def test_capture_plain_bf16_transposed_weights_equal_hand_taps():
    """W [out, in] transposed and cast to bf16 before the product, inside jit + remat +
    a cond branch taken by some samples only, after a custom_jvp; no token mask."""
    params = plain_params()
    batches = plain_batches()
    stats = anymodel.capture(plain_loss, params, batches, scope=["w1", "w2"],
                             factor_kind="dense", num_samples=6)
    shapes = {"w1": (32, 16), "w2": (16, 32)}

    def loss(params, probes, b):
        record = {}
        out = plain_forward(params, b["x"], taps=(probes, record))
        return jnp.mean((out - b["y"]) ** 2), {n: r[0] for n, r in record.items()}

    grad = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))

    def sample_grad(b):
        (dp, dprobe), acts = grad(params, {n: jnp.zeros((4, s[0])) for n, s in shapes.items()}, b)
        return acts, {n: d for n, d in dprobe.items()}, {n: dp[n] for n in shapes}

    samples = [{k: v[i:i + 1] for k, v in b.items()} for b in batches for i in range(len(b["x"]))]
    taken = [bool(s["x"][..., 0].sum() > 0) for s in samples]
    assert any(taken) and not all(taken)          # both cond branches occur among samples
    check_stats(stats, reference_stats(sample_grad, samples, [None] * 6, shapes), rtol=3e-2)
    assert stats["w1"].shape == (32, 16)


def test_capture_per_sample_is_refused_with_the_alternative():
    with pytest.raises(ValueError, match=r"per_sample=True .* not supported by anymodel\.capture; "
                                         r"use capture\.preprocess"):
        anymodel.capture(plain_loss, plain_params(), plain_batches(), scope=["w1"],
                         per_sample=True)


def test_capture_tokens_factor_and_select_blocks(linen_lm):
    """factor="tokens" sums per-token outer products over real tokens; the Stats feed
    importance.select_blocks unchanged."""
    from sylva_jax.importance import select_blocks

    model, params = linen_lm
    batches = lm_batches(4, 3, 3)
    names = ["block.fc1.kernel", "block.query.kernel"]
    stats = anymodel.capture(lm_fn(model), params, batches, scope=names, factor="tokens",
                             factor_kind="dense", num_samples=3)
    b = batches[0]
    flat = tree_lib.flatten(params)

    @jax.jit
    def inputs(params, b):
        acts = {}

        def interceptor(next_fun, args, kwargs, context):
            name = ".".join(context.module.scope.path) + ".kernel"
            if name in names and context.method_name == "__call__":
                acts[name] = args[0]
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(interceptor):
            model.apply({"params": params}, b["input_ids"], b["attention_mask"])
        return acts

    acts = inputs(params, b)
    for n in names:
        x = np.asarray(acts[n], np.float64).reshape(-1, linen_matrix(n, flat[n]).shape[1])
        x = x * b["attention_mask"].reshape(-1, 1)
        close(stats[n].A_dense, x.T @ x, 1e-4, n)
    masks = select_blocks(stats, sparsity=0.5, block_size=BS)
    assert masks["block.fc1.kernel"].shape == (F // BS, E // BS)
    assert masks["block.query.kernel"].shape == (H * D // BS, E // BS)
    assert masks["block.fc1.kernel"].sum() == round(0.5 * (F // BS) * (E // BS))


# --------------------------------------------------------------------------------------
# sparsify
# --------------------------------------------------------------------------------------


def random_masks(params, names, layout, seed=0, density=0.4):
    rng = np.random.default_rng(seed)
    flat = tree_lib.flatten(params)
    out = {}
    for n in names:
        s = flat[n].shape
        o, i = (s[1], s[0]) if layout == "in_out" else s
        m = rng.random((o // BS, i // BS)) < density
        m.flat[0] = True
        out[n] = m
    return out


def weight_grad_products(jaxpr, shapes):
    """dot_general equations (any nesting) whose output has one of ``shapes``."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general" and tuple(eqn.outvars[0].aval.shape) in shapes:
            found.append(tuple(eqn.outvars[0].aval.shape))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found += weight_grad_products(sub, shapes)
    return found


def check_sparse_grads(fn, params, batch, adapter, rtol=1e-4):
    g = anymodel.sparsify(fn, adapter)
    tiles = jax.jit(adapter.tiles)(params)        # one compile instead of eager gathers
    value, gt = jax.jit(jax.value_and_grad(g))(tiles, params, batch)
    ref_value, dense = jax.jit(lambda p, b: (lambda v, d: (v, adapter.tiles(d)))(
        *jax.value_and_grad(fn)(p, b)))(params, batch)
    close(value, ref_value, rtol, "value")
    assert set(gt) == set(adapter.paths)
    for p in adapter.paths:
        close(gt[p], dense[p], rtol, f"tile grad {p}")
    # no [out, in] (or stored [in, out]) weight-gradient product for adapted weights,
    # while the dense gradient program has them (so the check can fail)
    shapes = {s for p in adapter.paths
              for s in (adapter.shapes[p], adapter.shapes[p][::-1],
                        tuple(adapter.out_in_shape(p)), tuple(adapter.out_in_shape(p))[::-1])}
    assert weight_grad_products(jax.make_jaxpr(jax.grad(g))(tiles, params, batch).jaxpr,
                                shapes) == []
    assert weight_grad_products(jax.make_jaxpr(jax.grad(fn))(params, batch).jaxpr, shapes)
    return g, tiles


def test_sparsify_linen_transformer_tile_grads(linen_lm):
    model, params = linen_lm
    fn = lm_fn(model)
    names = ["block.fc1.kernel", "block.fc2.kernel", "head.kernel"]
    adapter = make_adapter(params, random_masks(params, names, "in_out"), block_size=BS,
                           layout="in_out")
    check_sparse_grads(fn, params, lm_batches(7, 3, 3)[0], adapter)


def test_sparsify_linen_dense_general_multihead_kernels(linen_lm):
    """N-D kernels ([E, H, D] query/value, [H, D, E] out) train through their 2-D view."""
    model, params = linen_lm
    fn = lm_fn(model)
    names = ["block.query.kernel", "block.value.kernel", "block.out.kernel"]
    flat = tree_lib.flatten(params)
    rng = np.random.default_rng(3)
    masks = {}
    for n in names:
        s = flat[n].shape
        # [out, in] view: query/value [H*D, E] (contracted E leads); out [E, H*D]
        o, i = (s[1] * s[2], s[0]) if n != "block.out.kernel" else (s[2], s[0] * s[1])
        m = rng.random((o // BS, i // BS)) < 0.4
        m.flat[0] = True
        masks[n] = m
    adapter = make_adapter(params, masks, block_size=BS, layout="in_out")
    check_sparse_grads(fn, params, lm_batches(7, 3, 3)[0], adapter)


def test_sparsify_linen_mlp_under_vmap_of_the_batch():
    model = LinenMLP()
    rng = np.random.default_rng(8)
    batch = {"x": rng.normal(size=(5, 32)).astype(np.float32),
             "y": rng.normal(size=(5, 16)).astype(np.float32)}
    params = jax.jit(model.init)(jax.random.key(2), batch["x"])["params"]
    fn = functools.partial(mlp_loss, model)
    adapter = make_adapter(params, random_masks(params, ["fc1.kernel", "fc2.kernel"],
                                                "in_out", seed=1), block_size=BS,
                           layout="in_out")
    g, tiles = check_sparse_grads(fn, params, batch, adapter)
    # per-example values and tile gradients with vmap over the batch axis
    one = jax.tree.map(lambda a: a[:, None], batch)
    vals, per = jax.jit(jax.vmap(jax.value_and_grad(g), in_axes=(None, None, 0)))(
        tiles, params, one)
    ref_vals, dense = jax.jit(jax.vmap(
        lambda p, b: (lambda v, d: (v, adapter.tiles(d)))(*jax.value_and_grad(fn)(p, b)),
        in_axes=(None, 0)))(params, one)
    close(vals, ref_vals, 1e-4, "vmap values")
    for p in adapter.paths:
        close(per[p], dense[p], 1e-4, f"vmap tile grad {p}")


def test_sparsify_nnx_model(nnx_net):
    graphdef, params, batches = nnx_net
    fn = functools.partial(nnx_loss, graphdef)
    adapter = make_adapter(params, random_masks(params, ["up.kernel", "down.kernel"], "in_out",
                                                seed=2), block_size=BS, layout="in_out")
    check_sparse_grads(fn, params, batches[0], adapter)


def test_sparsify_plain_bf16_transposed_out_in():
    params = plain_params()
    adapter = make_adapter(params, random_masks(params, ["w1", "w2"], "out_in", seed=3),
                           block_size=BS, layout="out_in")
    check_sparse_grads(plain_loss, params, plain_batches()[0], adapter, rtol=3e-2)
    # a layout mismatch is a clear error naming the weight and the fix
    wrong = make_adapter(params, {"w1": np.ones((2, 4), bool)}, block_size=BS, layout="in_out")
    with pytest.raises(ValueError, match=r"'w1'.*layout='out_in'"):
        anymodel.sparsify(plain_loss, wrong)(wrong.tiles(params), params, plain_batches()[0])


def test_sparsify_cond_branch_and_static_args():
    """A weight used inside one branch of lax.cond; a Python bool argument stays static."""
    rng = np.random.default_rng(9)
    params = {"a": jnp.asarray(rng.normal(size=(16, 8)), jnp.float32),
              "b": jnp.asarray(rng.normal(size=(16, 16)), jnp.float32)}
    x = jnp.asarray(rng.normal(size=(3, 8)), jnp.float32)

    def fn(params, x, flip):
        h = x @ params["a"].T
        h = jax.lax.cond(h.sum() > -1e9, lambda h: jnp.sin(h @ params["b"].T), lambda h: h, h)
        return (h ** 2).sum() * (-1.0 if flip else 1.0)

    adapter = make_adapter(params, {"a": np.array([[True], [False]]),
                                    "b": np.array([[False, True], [True, True]])},
                           block_size=BS)
    g = anymodel.sparsify(fn, adapter)
    tiles = adapter.tiles(params)
    for flip in (False, True):
        gt = jax.jit(jax.grad(g), static_argnums=3)(tiles, params, x, flip)
        dense = adapter.tiles(jax.jit(jax.grad(fn), static_argnums=2)(params, x, flip))
        for p in adapter.paths:
            close(gt[p], dense[p], 1e-4, p)


def test_llama_through_the_interpreter_equals_the_explicit_hook_route():
    """Our LLaMA traced with linear_fn=None: sparsify's tile gradients equal those of the
    explicit ``adapter.linear_fn`` route (both routes exist; they must agree)."""
    from sylva_jax.models import llama

    cfg = tiny_config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      initializer_range=0.2)
    graphdef, params = llama.split(llama.LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)))
    batch = lm_batches(11, 3, 3)[0]

    def fn(params, batch):
        logits = llama.apply(graphdef, params, batch["input_ids"], batch["attention_mask"])
        return lm_loss(logits, batch["labels"])

    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight"]
    adapter = make_adapter(params, random_masks(params, names, "out_in", seed=4), block_size=BS)
    tiles = adapter.tiles(params)
    gt = jax.jit(jax.grad(anymodel.sparsify(fn, adapter)))(tiles, params, batch)

    def explicit(tiles, params, batch):
        logits = llama.apply(graphdef, params, batch["input_ids"], batch["attention_mask"],
                             linear_fn=adapter.linear_fn(tiles))
        return lm_loss(logits, batch["labels"])

    ref = jax.jit(jax.grad(explicit))(tiles, params, batch)
    for p in names:
        close(gt[p], ref[p], 1e-4, p)



# --------------------------------------------------------------------------------------
# What cannot be followed is reported
# --------------------------------------------------------------------------------------


def tied_lm(params, ids):
    emb = params["embed"]                                   # [V, E]
    h = jnp.tanh(emb[ids] @ params["w"].T)
    return ((h @ emb.T) ** 2).mean()                        # tied output head


def tied_params():
    rng = np.random.default_rng(10)
    return {"embed": jnp.asarray(rng.normal(size=(V, E)), jnp.float32),
            "w": jnp.asarray(rng.normal(size=(E, E)), jnp.float32)}


def test_unfollowable_parameters_are_reported():
    params = tied_params()
    ids = jnp.arange(6).reshape(2, 3)
    products, unfollowed = anymodel.find_products(tied_lm, params, ids)
    assert [p.layout for p in products["w"]] == ["out_in"]
    assert "embed" in unfollowed and "gather" in " ".join(unfollowed["embed"])
    assert "w" not in unfollowed
    # capture: the tied embedding in scope is an error naming it
    with pytest.raises(anymodel.UnfollowedParameterError, match=r"embed: .*gather") as e:
        anymodel.capture(lambda p, b: tied_lm(p, b["ids"]), params,
                         [{"ids": np.asarray(ids)}], scope=["embed", "w"], num_samples=2)
    assert set(e.value.unfollowed) == {"embed"}
    # sparsify: an adapted tied embedding would get wrong tile gradients -> error
    adapter = make_adapter(params, {"embed": np.eye(V // BS, E // BS, dtype=bool)},
                           block_size=BS)
    with pytest.raises(anymodel.UnfollowedParameterError, match="embed"):
        anymodel.sparsify(tied_lm, adapter)(adapter.tiles(params), params, ids)


def test_scanned_and_scaled_weights_are_reported():
    rng = np.random.default_rng(12)
    params = {"stack": jnp.asarray(rng.normal(size=(3, 16, 16)), jnp.float32),
              "scaled": jnp.asarray(rng.normal(size=(16, 16)), jnp.float32)}

    def fn(params, x):
        x = x @ (2.0 * params["scaled"]).T
        x, _ = jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, params["stack"])
        return x.sum()

    x = jnp.ones((2, 16))
    _, unfollowed = anymodel.find_products(fn, params, x)
    assert "scan" in unfollowed["stack"][0] and "unroll" in unfollowed["stack"][0]
    assert "mul" in unfollowed["scaled"][0]
    with pytest.raises(anymodel.UnfollowedParameterError, match=r"stack: .*scan"):
        anymodel.capture(lambda p, b: fn(p, b["x"]), params,
                         [{"x": np.ones((2, 16), np.float32)}], scope=["stack"], num_samples=2)
    adapter = make_adapter(params, {"scaled": np.ones((2, 2), bool)}, block_size=BS)
    with pytest.raises(anymodel.UnfollowedParameterError, match="scaled"):
        anymodel.sparsify(fn, adapter)(adapter.tiles(params), params, x)


@pytest.mark.parametrize("remat3", [False, True])
def test_remat_forms_are_followed(remat3):
    """jax.checkpoint staged as `remat2` and, with the jax_remat3 option (the newer
    implementation), as a `call_hi_primitive` holding the body: both are followed, and
    sparsify keeps the checkpoint."""
    rng = np.random.default_rng(13)
    params = {"w": jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)}
    x = jnp.asarray(rng.normal(size=(3, 8)), jnp.float32)

    def fn(params, x):
        return jax.checkpoint(lambda x, w: jnp.tanh(x @ w.T))(x, params["w"]).sum()

    old = jax.config.jax_remat3
    jax.config.update("jax_remat3", remat3)
    try:
        products, unfollowed = anymodel.find_products(fn, params, x)
        assert unfollowed == {} and products["w"][0].shape == (16, 8)
        where = products["w"][0].where
        assert where == "remat3" if remat3 else where in ("remat2", "checkpoint", "remat")
        adapter = make_adapter(params, {"w": np.array([[False], [True]])}, block_size=BS)
        tiles = adapter.tiles(params)
        gt = jax.grad(anymodel.sparsify(fn, adapter))(tiles, params, x)
        close(gt["w"], adapter.tiles(jax.grad(fn)(params, x))["w"], 1e-5, "w")
    finally:
        jax.config.update("jax_remat3", old)
