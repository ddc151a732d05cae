"""``llama.causal_attention`` (block-wise causal attention, custom VJP) against the plain
softmax attention: a NumPy float64 reference for the values and dense JAX autodiff of
the ``[T, T]`` formulation for the gradients."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sylva_jax.models.llama import causal_attention

# float32 against float64 with O(1) scores over <= 37 keys: rounding is ~1e-7 per op, so
# 1e-5 leaves a wide margin while a wrong mask, block edge or GQA grouping moves outputs
# by >1e-2.
ATOL = 1e-5


def inputs(B=3, T=37, K=2, G=3, D=8, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(ks[0], (B, T, K, G, D), jnp.float32)
    k = jax.random.normal(ks[1], (B, T, K, D), jnp.float32)
    v = jax.random.normal(ks[2], (B, T, K, D), jnp.float32)
    real = np.ones((B, T), bool)
    real[1, T - 9:] = False  # right padding
    real[2, :5] = False      # left padding
    return q, k, v, jnp.asarray(real)


def numpy_attention(q, k, v, real):
    """Plain masked softmax attention in float64, one row at a time (rows with a visible key)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    real = np.asarray(real)
    B, T, K, G, D = q.shape
    out = np.full(q.shape, np.nan)
    for b in range(B):
        for t in range(T):
            keep = real[b, : t + 1]
            if not keep.any():
                continue
            for h in range(K):
                s = q[b, t, h] @ k[b, : t + 1, h][keep].T / np.sqrt(D)  # [G, n]
                p = np.exp(s - s.max(-1, keepdims=True))
                p /= p.sum(-1, keepdims=True)
                out[b, t, h] = p @ v[b, : t + 1, h][keep]
    return out


def plain_attention(q, k, v, real):
    """The ``[T, T]`` formulation (what the model computed before block-wise attention)."""
    T, D = q.shape[1], q.shape[-1]
    mask = jnp.tril(jnp.ones((T, T), bool))[None] & real[:, None, :]
    s = jnp.einsum("btkgd,bskd->bkgts", q, k) * D ** -0.5
    s = jnp.where(mask[:, None, None], s, jnp.finfo(jnp.float32).min)
    return jnp.einsum("bkgts,bskd->btkgd", jax.nn.softmax(s, axis=-1), v)


def visible(real):
    """[B, T] bool: queries with at least one visible key (the rest is padding before any token)."""
    return np.cumsum(np.asarray(real), axis=1) > 0


@pytest.mark.parametrize("block", [5, 16, 37, 64])
def test_matches_numpy_softmax(block):
    q, k, v, real = inputs()
    got = np.asarray(jax.jit(causal_attention, static_argnums=4)(q, k, v, real, block))
    ref = numpy_attention(q, k, v, real)
    rows = visible(real)
    np.testing.assert_allclose(got[rows], ref[rows], atol=ATOL, rtol=0)
    assert np.isfinite(got).all()  # the fully masked rows are defined too


@pytest.mark.parametrize("block", [8, 16])
def test_gradients_match_dense_autodiff(block):
    q, k, v, real = inputs(seed=1)
    rows = jnp.asarray(visible(real), jnp.float32)[:, :, None, None, None]
    w = jax.random.normal(jax.random.key(7), q.shape, jnp.float32) * rows  # no loss on masked rows

    def objective(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * w)

    ours = jax.grad(objective(lambda q, k, v: causal_attention(q, k, v, real, block)), argnums=(0, 1, 2))
    dense = jax.grad(objective(lambda q, k, v: plain_attention(q, k, v, real)), argnums=(0, 1, 2))
    for name, a, b in zip("qkv", jax.jit(ours)(q, k, v), jax.jit(dense)(q, k, v)):
        scale = float(jnp.max(jnp.abs(b)))
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5 * scale, rtol=0, err_msg=f"d{name}")


def test_padding_keys_get_no_gradient():
    q, k, v, real = inputs(seed=2)
    rows = jnp.asarray(visible(real))[:, :, None, None, None]

    @jax.jit
    def grads(k, v):  # loss on the rows that see a real token, as a masked LM loss
        return jax.grad(lambda k, v: jnp.sum(jnp.where(rows, causal_attention(q, k, v, real, 16), 0) ** 2),
                        argnums=(0, 1))(k, v)

    dk, dv = grads(k, v)
    pad = ~np.asarray(real)
    assert np.all(np.asarray(dk)[pad] == 0) and np.all(np.asarray(dv)[pad] == 0)
    assert np.abs(np.asarray(dv)[~pad]).min() > 0


def test_bfloat16_close_to_float32():
    q, k, v, real = inputs(seed=3)
    lo = causal_attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), real, 16)
    assert lo.dtype == jnp.bfloat16
    rows = visible(real)
    ref = numpy_attention(q, k, v, real)
    # bfloat16 keeps 8 bits of mantissa: ~4e-3 relative per rounding, O(1) outputs
    np.testing.assert_allclose(np.asarray(lo, np.float32)[rows], ref[rows], atol=5e-2, rtol=0)
