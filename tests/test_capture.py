"""Calibration statistics (sylva_jax/capture.py) against an explicit dense-JAX reference,
on a tiny random LLaMA (sylva_jax/models/llama.py)."""
from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sylva_jax import capture
from sylva_jax import curvature as hierarchy
from sylva_jax import tree as tree_lib
from sylva_jax.losses import lm_loss
from sylva_jax.models import llama
import tiny

VOCAB, T = 128, 8


def tiny_config(**kw):
    return tiny.tiny_config(**{"vocab_size": VOCAB, "initializer_range": 0.1, "mlp_bias": True, **kw})


@pytest.fixture(scope="module")
def model():
    return llama.LlamaForCausalLM(tiny_config(), rngs=nnx.Rngs(0))


def make_batches(seed, n, batch_size, lengths=(5, 8), t=T):
    """Right-padded samples (lengths drawn from ``lengths``), labels = ids, -100 at padding."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, VOCAB, size=(n, t)).astype(np.int32)
    lens = rng.choice(lengths, size=n)
    am = (np.arange(t)[None] < lens[:, None]).astype(np.int32)
    ids = np.where(am == 1, ids, 0)
    labels = np.where(am == 1, ids, -100).astype(np.int32)
    return [{"input_ids": ids[i:i + batch_size], "attention_mask": am[i:i + batch_size],
             "labels": labels[i:i + batch_size]} for i in range(0, n, batch_size)]


LAYERS = [f"model.layers.{i}.{m}" for i in range(2)
          for m in ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                    "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                    "mlp.down_proj.weight")]


@functools.lru_cache(maxsize=None)
def _ref_grad(graphdef):
    """jax.grad of ONE unpadded sample's mean loss w.r.t. (params, additive output deltas)."""

    def loss(params, deltas, ids, labels):
        xs = {}

        def hook(name, x, w, b):
            y = llama.dense_linear(name, x, w, b)
            if name in deltas:
                xs[name] = x
                y = y + deltas[name]
            return y

        logits = llama.apply(graphdef, params, ids, None, linear_fn=hook)
        return lm_loss(logits, labels, reduction="token_mean"), xs

    return jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))


def reference(model, batches):
    """Per-sample loop on the *trimmed* sample (no padding at all) for every layer in
    LAYERS: ``{name: [(x [L, in], dy [L, out], dL_n/dW [out, in]) per sample]}``, float64."""
    graphdef, params = llama.split(model)
    flat = tree_lib.flatten(params)
    grad = _ref_grad(graphdef)
    out = {n: [] for n in LAYERS}
    for b in batches:
        for s in range(b["input_ids"].shape[0]):
            L = int(b["attention_mask"][s].sum())
            ids, labels = b["input_ids"][s:s + 1, :L], b["labels"][s:s + 1, :L]
            deltas = {n: jnp.zeros((1, L, flat[n].shape[0])) for n in LAYERS}
            (gp, gd), xs = grad(params, deltas, ids, labels)
            gp = tree_lib.flatten(gp)
            for n in LAYERS:
                out[n].append((np.asarray(xs[n][0], np.float64), np.asarray(gd[n][0], np.float64),
                               np.asarray(gp[n], np.float64)))
    return out


def ref_stats(per_sample, factor="mean", count=None):
    """Explicit statistics from the per-sample reference: (a rows, g rows, A, G, Gbar)."""
    per_sample = per_sample[:count]
    if factor == "mean":   # token means of x and of dL_n/dy_t
        a = np.stack([x.mean(0) for x, _, _ in per_sample])
        g = np.stack([dy.mean(0) for _, dy, _ in per_sample])
    else:                  # every real token
        a = np.concatenate([x for x, _, _ in per_sample])
        g = np.concatenate([dy for _, dy, _ in per_sample])
    gbar = np.mean([gw for _, _, gw in per_sample], axis=0)
    return a, g, a.T @ a, g.T @ g, gbar


def dense(h):
    return np.asarray(hierarchy.to_dense(h), np.float64)


# float32 forward/backward of a 2-layer model with O(1) activations: the statistics carry
# relative errors ~1e-6 (different reduction orders between batched and per-sample runs);
# 1e-4 of the largest entry leaves a wide margin while a missing/extra token, a padding leak
# or a wrong normaliser changes entries by > 1e-2 relative.
def assert_close(actual, expected, tol=1e-4):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    scale = np.abs(expected).max()
    assert scale > 0
    np.testing.assert_allclose(actual, expected, rtol=0, atol=tol * scale)


@pytest.fixture(scope="module")
def batches():
    """8 samples of lengths 5 or 8 in batches of 4, right-padded to T=8."""
    return make_batches(0, 8, 4)


@pytest.fixture(scope="module")
def ref(model, batches):
    return reference(model, batches)


@pytest.fixture(scope="module")
def hodlr_stats(model, batches):
    """The default path (hodlr factors, token means) plus exact dense factors, batch 4.
    One compiled step serves most tests (each new step costs a compilation)."""
    return capture.preprocess(model, batches, scope="model.layers", num_samples=8,
                              num_partition=1, keep_dense=True)


def test_statistics_match_dense_reference(model, hodlr_stats, ref):
    stats = hodlr_stats
    assert list(stats) == LAYERS and stats.num_samples == 8 and stats.factor == "mean"
    flat = tree_lib.flatten(nnx.state(model, nnx.Param))
    for n in LAYERS:
        s = stats[n]
        _, _, A, G, gbar = ref_stats(ref[n])
        assert s.num_samples == 8 and s.shape == flat[n].shape
        assert_close(s.A_dense, A)
        assert_close(s.G_dense, G)
        assert_close(s.grad_mean, gbar)
        assert s.weight is flat[n]


def _vmap_grad_sq(model, batches):
    """``sum_n (dL_n/dW)^2`` from ``jax.vmap(jax.grad)`` of each padded sample's own mean
    token loss (a batch of one with its attention mask): independent of the probes."""
    graphdef, params = llama.split(model)

    def loss(p, ids, am, labels):
        logits = llama.apply(graphdef, p, ids[None], am[None])
        return lm_loss(logits, labels[None], reduction="token_mean")

    per = jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0, 0, 0)))
    total = {n: 0.0 for n in LAYERS}
    for b in batches:
        flat = tree_lib.flatten(per(params, b["input_ids"], b["attention_mask"], b["labels"]))
        for n in LAYERS:
            total[n] = total[n] + np.sum(np.asarray(flat[n], np.float64) ** 2, axis=0)
    return total


def test_per_sample_squared_gradients_match_vmap_grad(model, batches, hodlr_stats):
    st = capture.preprocess(model, batches, scope="model.layers", num_samples=8,
                            num_partition=1, keep_dense=True, per_sample=True)
    ref = _vmap_grad_sq(model, batches)
    for n in LAYERS:
        assert_close(st[n].grad_sq_mean * 8, ref[n])
        # the other statistics are those of the default pass
        assert_close(st[n].grad_mean, hodlr_stats[n].grad_mean)
        assert_close(st[n].A_dense, hodlr_stats[n].A_dense)
        assert_close(st[n].G_dense, hodlr_stats[n].G_dense)
        assert hodlr_stats[n].grad_sq_mean is None
        # the mean of squares exceeds the square of the mean (per-sample variance > 0)
        assert np.all(np.asarray(st[n].grad_sq_mean) >= np.asarray(st[n].grad_mean) ** 2 - 1e-9)


def test_tokens_factor_is_the_sum_of_per_token_outer_products(model, batches, ref):
    stats = capture.preprocess(model, batches, scope="model.layers", num_samples=8,
                               factor="tokens", factor_kind="dense")
    assert stats.factor == "tokens"
    for n in LAYERS:
        _, _, A, G, gbar = ref_stats(ref[n], "tokens")
        assert_close(dense(stats[n].A), A)
        assert_close(dense(stats[n].G), G)
        assert_close(stats[n].A_dense, A)
        assert_close(stats[n].grad_mean, gbar)


def test_tokens_hodlr_factors_per_slot(model, batches, ref):
    """factor="tokens", hodlr kind: the per-token updates run TOKEN_SLOT_BATCH slots at a
    time (lax.map); each slot's factor equals hierarchy.update_block applied to that
    layer's reference per-token vectors, batch by batch. The 64-wide group has 18 slots
    (2 full map batches of 8 and a remainder of 2), so a mixed-up or dropped slot fails."""
    assert capture.TOKEN_SLOT_BATCH == 8
    stats = capture.preprocess(model, batches, scope="model.layers", num_samples=8,
                               factor="tokens", num_partition=2, token_update="stream")
    lens = [int(b["attention_mask"][i].sum()) for b in batches for i in range(4)]
    for n in LAYERS:
        s = stats[n]
        for which, col in (("A", 0), ("G", 1)):
            h = getattr(s, which)
            assert h.kind == "hodlr" and h.num_partition == 2
            seq = hierarchy.init(h.dim, num_partition=2)
            for b in range(2):  # one update_block per calibration batch of 4 samples
                vecs = np.concatenate([ref[n][i][col] for i in range(4 * b, 4 * b + 4)])
                assert vecs.shape[0] == sum(lens[4 * b:4 * b + 4])
                seq = hierarchy.update_block(seq, jnp.asarray(vecs, jnp.float32))
            assert_close(dense(h), dense(seq))


def test_tokens_exact_route_is_the_hodlr_of_the_exact_factor(model, batches, ref):
    """token_update="exact" (what "auto" picks when the dense sums fit): exact leaves and,
    for every tile, the best rank-1 approximation of the exact per-token sum, i.e.
    hierarchy.from_dense of the reference A = sum_t x_t x_t^T (and G likewise)."""
    stats = capture.preprocess(model, batches, scope="model.layers", num_samples=8,
                               factor="tokens", num_partition=2)  # auto -> exact at this size
    for n in LAYERS:
        _, _, A, G, _ = ref_stats(ref[n], "tokens")
        for which, M in (("A", A), ("G", G)):
            h = getattr(stats[n], which)
            assert h.kind == "hodlr" and h.num_partition == 2
            assert_close(dense(h), dense(hierarchy.from_dense(jnp.asarray(M, jnp.float32), 2)))
    with pytest.raises(ValueError, match="token_update"):
        capture.preprocess(model, batches, scope="q_proj", num_samples=4, factor="tokens",
                           token_update="fast")


def test_hodlr_factors_get_the_reference_vectors_in_order(hodlr_stats, ref):
    """hodlr kind: each factor equals hierarchy.update applied to the reference per-sample
    vectors in sample order (checks the stacking by dimension, vmap and ordering)."""
    stats = hodlr_stats
    assert stats.partitions == {64: 1, 32: 1, 128: 1}
    inv = stats.inv_diags()
    for n in ("model.layers.0.self_attn.k_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        s = stats[n]
        a, g, _, _, _ = ref_stats(ref[n])
        for which, vecs in (("A", a), ("G", g)):
            h = getattr(s, which)
            assert h.kind == "hodlr" and h.num_partition == 1 and h.dim == vecs.shape[1]
            seq = hierarchy.update(hierarchy.init(h.dim, num_partition=1), jnp.asarray(vecs, jnp.float32))
            assert_close(dense(h), dense(seq))
        assert_close(inv[n][0], hierarchy.inv_diag(s.A, damping=1e-6))
        assert_close(inv[n][1], hierarchy.inv_diag(s.G, damping=1e-6))
    nb = stats.factor_nbytes()
    assert 0 < nb["factors"] < nb["dense_equivalent"]


def test_batch_size_one_with_extra_padding_equals_batch_four(model, batches, hodlr_stats):
    """The same samples one per batch, with 3 extra padding columns, give the statistics of
    the batches of 4."""
    pad = {"input_ids": 7, "attention_mask": 0, "labels": -100}
    b1 = [{k: np.pad(b[k][i:i + 1], ((0, 0), (0, 3)), constant_values=pad[k]) for k in b}
          for b in batches for i in range(4)]
    s1 = capture.preprocess(model, b1, scope="model.layers", num_samples=8, num_partition=1)
    for n in s1:
        assert_close(dense(s1[n].A), dense(hodlr_stats[n].A))
        assert_close(dense(s1[n].G), dense(hodlr_stats[n].G))
        assert_close(s1[n].grad_mean, hodlr_stats[n].grad_mean)


def test_sample_statistics_per_token_values(model, batches, ref):
    """sample_statistics, through the (apply_fn, params) form, gives every real token's
    x and dL_n/dy of the reference, and zeros at padding."""
    graphdef, params = llama.split(model)
    apply_fn = lambda p, i, m, *, linear_fn: llama.apply(graphdef, p, i, m, linear_fn=linear_fn)  # noqa: E731
    batch = batches[0]
    a, g, gw = capture.sample_statistics((apply_fn, params), batch, scope="q_proj", factor="tokens")
    n = "model.layers.0.self_attn.q_proj.weight"
    assert set(a) == {n, "model.layers.1.self_attn.q_proj.weight"}
    assert a[n].shape == (4, T, 64) and g[n].shape == (4, T, 64) and gw[n].shape == (64, 64)
    lens = batch["attention_mask"].sum(1)
    assert len(set(lens.tolist())) == 2  # mixed lengths within the batch
    for s, L in enumerate(lens):
        x, dy, _ = ref[n][s]
        assert_close(a[n][s, :L], x)
        assert_close(g[n][s, :L], dy)
        assert np.all(np.asarray(a[n][s, L:]) == 0) and np.all(np.asarray(g[n][s, L:]) == 0)
    assert_close(gw[n], sum(ref[n][s][2] for s in range(4)))
    # (graphdef, params) from llama.split is accepted too (abstract trace only)
    assert capture.linear_layers((graphdef, params)) == capture.linear_layers(model)


def test_num_samples_slicing_and_shortage(model, batches, ref):
    kw = dict(scope="model.layers", num_partition=1, keep_dense=True)
    s6 = capture.preprocess(model, batches, num_samples=6, **kw)  # 4 + 2 of the second batch
    assert s6.num_samples == 6
    for n in ("model.layers.0.self_attn.v_proj.weight", "model.layers.1.mlp.up_proj.weight"):
        _, _, A, G, gbar = ref_stats(ref[n], count=6)
        assert_close(s6[n].A_dense, A)
        assert_close(s6[n].G_dense, G)
        assert_close(s6[n].grad_mean, gbar)
    with pytest.warns(UserWarning, match="only 8 calibration samples"):
        s = capture.preprocess(model, batches, num_samples=10, **kw)
    assert s.num_samples == 8
    with pytest.raises(ValueError, match="no calibration samples"):
        capture.preprocess(model, iter([]), **kw)


def test_scope_substring_regex_and_no_match(model):
    names = list(capture.linear_layers(model))
    assert names == LAYERS + ["lm_head.weight"]
    assert capture.match_scope("self_attn", names) == [n for n in names if "self_attn" in n]
    assert capture.match_scope(r"re:layers\.1\..*(q|up)_proj", names) == [
        "model.layers.1.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight"]
    assert capture.match_scope(re.compile(r"o_proj"), names) == [n for n in names if "o_proj" in n]
    assert capture.match_scope(["q_proj", "re:down"], names) == [
        n for n in names if "q_proj" in n or "down" in n]
    with pytest.raises(ValueError, match=r"matches no linear layer(.|\n)*mlp\.up_proj"):
        capture.preprocess(model, make_batches(0, 1, 1), scope="c_attn")
    # embeddings and norms are not linear layers
    for s in ("embed_tokens", "norm"):
        with pytest.raises(ValueError, match="matches no linear layer"):
            capture.scoped_weights(model, s)
    with pytest.raises(ValueError, match="invalid regular expression"):
        capture.match_scope("re:(", names)


def test_bad_input_errors(model):
    (b,) = make_batches(5, 2, 2)
    with pytest.raises(ValueError, match="unknown factor"):
        capture.preprocess(model, [b], scope="q_proj", factor="token")
    with pytest.raises(ValueError, match="no 'labels'"):
        capture.preprocess(model, [{"input_ids": b["input_ids"]}], scope="q_proj")
    empty = dict(b, attention_mask=np.zeros_like(b["attention_mask"]))
    with pytest.raises(ValueError, match="no real token"):
        capture.preprocess(model, [empty], scope="q_proj")
    tied = llama.LlamaForCausalLM(tiny_config(tie_word_embeddings=True), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="tied weight"):
        capture.preprocess(tied, [b], scope="lm_head")
    remat = llama.LlamaForCausalLM(tiny_config(remat=True), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="remat=False"):
        capture.preprocess(remat, [b], scope="layers.0.mlp.up")


def test_nonfinite_statistics_name_the_layer(model, batches):
    graphdef, params = llama.split(model)
    w = params["model"]["layers"][1]["mlp"]["down_proj"]["weight"]
    params["model"]["layers"][1]["mlp"]["down_proj"]["weight"] = w.at[0, 0].set(jnp.inf)
    bad = llama.merge(graphdef, params)  # same graph: reuses the compiled step of hodlr_stats
    with pytest.raises(ValueError, match=r"non-finite.*'model\.layers\.1\.mlp\.down_proj\.weight'"):
        capture.preprocess(bad, batches, scope="model.layers", num_samples=8, num_partition=1,
                           keep_dense=True)


def _accumulator_batches(rng, shapes, batch_sizes):
    """Random per-sample vectors and weight-gradient sums, as a route would feed them."""
    out = []
    for b in batch_sizes:
        acts = {n: rng.standard_normal((b, i)).astype(np.float32) for n, (o, i) in shapes.items()}
        gy = {n: rng.standard_normal((b, o)).astype(np.float32) for n, (o, i) in shapes.items()}
        gw = {n: rng.standard_normal((o, i)).astype(np.float32) for n, (o, i) in shapes.items()}
        out.append((acts, gy, gw))
    return out


def test_stats_accumulator_init_update_finalize_against_numpy():
    """The public accumulator both routes feed: factors equal curvature.update over the
    vectors in sample order, dense factors equal X^T X and grad_mean the mean of the
    gradient sums (float64 NumPy reference); inverse diagonals come cached in the result."""
    from sylva_jax import curvature
    from sylva_jax.statistics import StatsAccumulator

    shapes = {"l.one": (8, 16), "l.two": (16, 8)}
    acc = StatsAccumulator.create(shapes, num_partition=1, keep_dense=True)
    assert acc == StatsAccumulator.create(shapes, num_partition=1, keep_dense=True)
    assert hash(acc) == hash(StatsAccumulator.create(shapes, num_partition=1, keep_dense=True))
    assert acc.partitions == {16: 1, 8: 1}
    feed = _accumulator_batches(np.random.default_rng(0), shapes, (3, 2))
    state = acc.init()
    for acts, gy, gw in feed:
        state = jax.jit(acc.update)(state, acts, gy, gw)
    weights = {n: jnp.ones(s, jnp.float32) for n, s in shapes.items()}
    stats = acc.finalize(state, weights, num_samples=5, scope="l.", damping=1e-3)
    assert list(stats) == list(shapes) and stats.num_samples == 5 and stats.partitions == {16: 1, 8: 1}
    for n in shapes:
        a = np.concatenate([np.asarray(f[0][n], np.float64) for f in feed])
        g = np.concatenate([np.asarray(f[1][n], np.float64) for f in feed])
        s = stats[n]
        assert s.weight is weights[n] and s.num_samples == 5
        assert_close(s.A_dense, a.T @ a)
        assert_close(s.G_dense, g.T @ g)
        assert_close(s.grad_mean, sum(np.asarray(f[2][n], np.float64) for f in feed) / 5)
        seq = curvature.update(curvature.init(a.shape[1], num_partition=1), jnp.asarray(a, jnp.float32))
        assert_close(dense(s.A), dense(seq))
        inv_a, inv_g = stats.inv_diags()[n]
        assert_close(inv_a, curvature.inv_diag(s.A, damping=1e-3))
        assert_close(inv_g, curvature.inv_diag(s.G, damping=1e-3))
    assert stats._inv_cache.keys() == {(1e-3, False)}


def test_stats_accumulator_checks():
    """Errors and warnings of finalize, the exact/stream choice for per-token HODLR factors,
    and the public homes of the names capture re-exports."""
    import sylva_jax
    from sylva_jax import scope, statistics
    from sylva_jax.statistics import StatsAccumulator

    shapes = {"l.one": (8, 16)}
    acc = StatsAccumulator.create(shapes, num_partition=2)
    (acts, gy, gw), = _accumulator_batches(np.random.default_rng(1), shapes, (2,))
    weights = {"l.one": jnp.zeros((8, 16))}
    with pytest.raises(ValueError, match="no calibration samples"):
        acc.finalize(acc.init(), weights, num_samples=0)
    with pytest.warns(UserWarning, match="only 2 calibration samples"):
        acc.finalize(acc.update(acc.init(), acts, gy, gw), weights, num_samples=2, requested=4)
    nan = {"l.one": acts["l.one"].copy()}
    nan["l.one"][1, 3] = np.nan
    with pytest.raises(ValueError, match=r"non-finite.*'l\.one'"):
        acc.finalize(acc.update(acc.init(), nan, gy, gw), weights, num_samples=2)
    with pytest.raises(ValueError, match="unknown factor_kind"):
        StatsAccumulator.create(shapes, factor_kind="sparse")
    tok = dict(factor="tokens", num_partition=2)
    assert StatsAccumulator.create(shapes, **tok).accumulate_kind == "dense"
    assert StatsAccumulator.create(shapes, token_update="stream", **tok).accumulate_kind == "hodlr"
    assert StatsAccumulator.create(shapes, factor_kind="diagonal", **tok).accumulate_kind == "diagonal"
    assert capture.match_scope is scope.match_scope
    assert capture.Stats is statistics.Stats and capture.LayerStats is statistics.LayerStats
    assert sylva_jax.Stats is statistics.Stats and sylva_jax.match_scope is scope.match_scope


CALIBRATION_MODULES = ("capture", "anymodel", "statistics", "scope", "importance", "masks",
                       "hierarchy", "curvature", "data")


def _sylva_imports(path, module):
    """``(module-level, function-local)`` sylva_jax modules imported by the file at ``path``."""
    import ast

    top, local = set(), set()
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parts = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join(parts + [base] if base else parts)
                names = [base + "." + a.name for a in child.names] + [base]
            else:
                names = []
            for n in names:
                if n.startswith("sylva_jax"):
                    (local if inner else top).add(n)
            visit(child, inner)

    visit(ast.parse(open(path).read()), False)
    return top, local


def test_calibration_and_data_modules_have_no_hidden_or_circular_imports():
    """Issue 20: the calibration core (capture, anymodel, statistics, scope, importance,
    masks, curvature) and the data package import what they need at module level (no
    function-local import of another sylva_jax module hiding a cycle), and those imports
    form no cycle (a package importing its own submodules from ``__init__`` excepted)."""
    import os

    import sylva_jax

    root = os.path.dirname(sylva_jax.__file__)
    files = {}
    for dirpath, _, names in os.walk(root):
        for f in names:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(dirpath, f), os.path.dirname(root))[:-3]
                mod = rel.replace(os.sep, ".").removesuffix(".__init__")
                files[mod] = os.path.join(dirpath, f)

    def owner(name):  # the module a dotted import name refers to
        while name not in files:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for mod, path in files.items():
        if mod.split(".")[1:2] and mod.split(".")[1] in CALIBRATION_MODULES:
            top, local = _sylva_imports(path, mod)
            assert not local, f"{mod} imports {sorted(local)} inside a function"
            graph[mod] = {owner(n) for n in top} - {mod}

    def reaches(start, target, seen):
        for nxt in graph.get(start, ()):
            # a package's __init__ importing its submodules is how packages are built
            if nxt == target and not (start.startswith(target + ".")):
                return True
            if nxt not in seen and nxt in graph and not start.startswith(nxt + "."):
                seen.add(nxt)
                if reaches(nxt, target, seen):
                    return True
        return False

    assert len(graph) >= 14, sorted(graph)
    cyclic = [m for m in graph if reaches(m, m, set())]
    assert not cyclic, cyclic
