"""Calibration statistics (sylva_jax/capture.py) against an explicit dense-JAX reference."""
from __future__ import annotations

import importlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sylva_jax import capture
from sylva_jax.losses import lm_loss

import _toy_stack as toy


@pytest.fixture(autouse=True)
def factor_backend(monkeypatch):
    try:
        importlib.import_module("sylva_jax.hierarchy")
    except ImportError:
        monkeypatch.setattr(capture, "_hierarchy", lambda: toy.toy_hierarchy)


@pytest.fixture(scope="module")
def model():
    return (toy.toy_apply, toy.toy_params(jax.random.PRNGKey(0)))


def _dense(h):
    return np.asarray(capture._hierarchy().to_dense(h), np.float64)


def reference(model, batches, names, factor="mean"):
    """Per-sample loop on the *trimmed* sample (no padding at all), jax.grad, explicit means.

    Returns {name: (A, G, Gbar)} in float64."""
    apply_fn, params = model
    flat = capture.tree_lib.flatten(params)
    out = {n: [0.0, 0.0, 0.0] for n in names}
    count = 0
    for b in batches:
        for s in range(b["input_ids"].shape[0]):
            L = int(b["attention_mask"][s].sum())
            ids = jnp.asarray(b["input_ids"][s:s + 1, :L])
            labels = jnp.asarray(b["labels"][s:s + 1, :L])
            deltas = {n: jnp.zeros((1, L, flat[n].shape[0])) for n in names}

            def loss(p, d):
                xs = {}

                def hook(name, x, w, bias):
                    y = x @ w.T + (0 if bias is None else bias)
                    if name in d:
                        xs[name] = x
                        y = y + d[name]
                    return y

                logits = apply_fn(p, ids, None, linear_fn=hook)
                return lm_loss(logits, labels, reduction="token_mean"), xs

            (gp, gd), xs = jax.grad(loss, argnums=(0, 1), has_aux=True)(params, deltas)
            gp = capture.tree_lib.flatten(gp)
            for n in names:
                x = np.asarray(xs[n][0], np.float64)      # [L, in]
                dy = np.asarray(gd[n][0], np.float64)     # [L, out]
                if factor == "mean":
                    a, g = x.mean(0)[None], dy.mean(0)[None]
                else:
                    a, g = x, dy
                out[n][0] = out[n][0] + a.T @ a
                out[n][1] = out[n][1] + g.T @ g
                out[n][2] = out[n][2] + np.asarray(gp[n], np.float64)
            count += 1
    return {n: (A, G, Gs / count) for n, (A, G, Gs) in out.items()}


# float32 forward/backward of a 2-layer net with O(1) activations: relative errors of the
# individual statistics are ~1e-6; 1e-4 relative to the largest entry leaves a wide margin
# while still catching any missing/extra token, a wrong normaliser or a padding leak (those
# change entries by >1e-2 relative).
def assert_close(actual, expected, rtol=1e-4):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    scale = np.abs(expected).max()
    assert scale > 0
    np.testing.assert_allclose(actual, expected, rtol=0, atol=rtol * scale)


SCOPE = "model.layers"


@pytest.mark.parametrize("factor", ["mean", "tokens"])
def test_statistics_match_dense_reference(model, factor):
    rng = np.random.default_rng(0)
    batches = toy.toy_batches(rng, 6, 7, batch_size=3)
    stats = capture.preprocess(model, batches, scope=SCOPE, num_samples=6, factor=factor,
                               factor_kind="dense")
    names = list(stats)
    assert names == [f"model.layers.{i}.{m}" for i in range(2)
                     for m in ("self_attn.q_proj.weight", "self_attn.o_proj.weight",
                               "mlp.up_proj.weight", "mlp.down_proj.weight")]
    ref = reference(model, batches, names, factor)
    for n in names:
        A, G, Gbar = ref[n]
        s = stats[n]
        assert s.num_samples == 6 and stats.num_samples == 6
        assert_close(_dense(s.A), A)
        assert_close(_dense(s.G), G)
        assert_close(s.grad_mean, Gbar)
        assert s.weight is capture.tree_lib.flatten(model[1])[n]


def test_batch_size_invariance_and_padding(model):
    rng = np.random.default_rng(1)
    b1 = toy.toy_batches(rng, 8, 9, batch_size=1)
    # the same samples in batches of 4, with 3 extra padding columns on the right
    cat = {k: np.concatenate([b[k] for b in b1]) for k in b1[0]}
    pad = {"input_ids": 5, "attention_mask": 0, "labels": -100}
    cat = {k: np.pad(v, ((0, 0), (0, 3)), constant_values=pad[k]) for k, v in cat.items()}
    b4 = [{k: v[i:i + 4] for k, v in cat.items()} for i in (0, 4)]
    s1 = capture.preprocess(model, b1, scope=SCOPE, num_samples=8, factor_kind="dense",
                            keep_dense=True)
    s4 = capture.preprocess(model, b4, scope=SCOPE, num_samples=8, factor_kind="dense",
                            keep_dense=True)
    for n in s1:
        assert_close(_dense(s4[n].A), _dense(s1[n].A))
        assert_close(_dense(s4[n].G), _dense(s1[n].G))
        assert_close(s4[n].grad_mean, s1[n].grad_mean)
        assert_close(s4[n].A_dense, _dense(s1[n].A))


def test_sample_statistics_shapes_and_padding(model):
    rng = np.random.default_rng(2)
    (batch,) = toy.toy_batches(rng, 3, 6, batch_size=3)
    a, g, gw = capture.sample_statistics(model, batch, scope="q_proj", factor="tokens")
    n = "model.layers.0.self_attn.q_proj.weight"
    assert set(a) == {n, "model.layers.1.self_attn.q_proj.weight"}
    assert a[n].shape == (3, 6, 16) and g[n].shape == (3, 6, 16) and gw[n].shape == (16, 16)
    pad = batch["attention_mask"] == 0
    assert np.all(np.asarray(a[n])[pad] == 0) and np.all(np.asarray(g[n])[pad] == 0)
    # sum over samples and tokens of g_t x_t^T is the weight gradient of the summed losses
    assert_close(jnp.einsum("bto,bti->oi", g[n], a[n]), gw[n])


def test_num_samples_slicing_and_shortage(model):
    rng = np.random.default_rng(3)
    batches = toy.toy_batches(rng, 6, 5, batch_size=4)  # batches of 4 and 2
    s3 = capture.preprocess(model, batches, scope="down_proj", num_samples=3, factor_kind="dense")
    ref = reference(model, [{k: v[:3] for k, v in batches[0].items()}], list(s3))
    assert s3.num_samples == 3
    for n in s3:
        assert_close(_dense(s3[n].A), ref[n][0])
        assert_close(s3[n].grad_mean, ref[n][2])
    with pytest.warns(UserWarning, match="only 6 calibration samples"):
        s = capture.preprocess(model, batches, scope="down_proj", num_samples=10,
                               factor_kind="dense")
    assert s.num_samples == 6
    with pytest.raises(ValueError, match="no calibration samples"):
        capture.preprocess(model, [], scope="down_proj")


def test_scope_substring_regex_and_no_match(model):
    names = list(capture.linear_layers(model))
    assert "lm_head.weight" in names and not any("embed" in n or "norm" in n for n in names)
    assert capture.match_scope("self_attn", names) == [n for n in names if "self_attn" in n]
    assert capture.match_scope(r"re:layers\.1\..*(q|up)_proj", names) == [
        "model.layers.1.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight"]
    assert capture.match_scope(re.compile(r"o_proj"), names) == [n for n in names if "o_proj" in n]
    assert capture.match_scope(["q_proj", "re:down"], names) == [
        n for n in names if "q_proj" in n or "down" in n]
    with pytest.raises(ValueError, match=r"matches no linear layer(.|\n)*mlp.up_proj"):
        capture.preprocess(model, [], scope="k_proj")
    # the embedding is not a linear layer seen by linear_fn
    with pytest.raises(ValueError, match="matches no linear layer"):
        capture.scoped_weights(model, "embed_tokens")
    with pytest.raises(ValueError, match="invalid regular expression"):
        capture.match_scope("re:(", names)


def test_bad_input_errors(model):
    rng = np.random.default_rng(4)
    (b,) = toy.toy_batches(rng, 2, 5, batch_size=2)
    with pytest.raises(ValueError, match="unknown factor"):
        capture.preprocess(model, [b], scope="q_proj", factor="token")
    with pytest.raises(ValueError, match="no 'labels'"):
        capture.preprocess(model, [{"input_ids": b["input_ids"]}], scope="q_proj")
    empty = dict(b, attention_mask=np.zeros_like(b["attention_mask"]))
    with pytest.raises(ValueError, match="no real token"):
        capture.preprocess(model, [empty], scope="q_proj")


def test_nonfinite_statistics_name_the_layer(model):
    apply_fn, params = model
    bad = jax.tree.map(lambda x: x, params)
    bad["model"]["layers"]["1"]["mlp"]["down_proj"]["weight"] = (
        bad["model"]["layers"]["1"]["mlp"]["down_proj"]["weight"].at[0, 0].set(jnp.inf))
    rng = np.random.default_rng(5)
    with pytest.raises(ValueError, match=r"non-finite.*model\.layers\.1\.mlp\.down_proj"):
        capture.preprocess((apply_fn, bad), toy.toy_batches(rng, 2, 5), scope="layers.1.mlp",
                           num_samples=2, factor_kind="dense")
