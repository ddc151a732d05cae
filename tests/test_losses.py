"""The fused LM head + cross-entropy (``lm_head_loss``) against the plain path.

Reference: ``lm_loss(h @ W^T, labels)`` differentiated by JAX autodiff, and that loss
written out in NumPy (float64) for the value; the fused path must agree in value and in
both gradients, with padding, ignored labels and a position count that the chunk size
does not divide.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sylva_jax.losses import IGNORE_INDEX, lm_head_loss, lm_loss

V, D = 61, 16


def _case(B=3, T=11, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    h = rng.standard_normal((B, T, D)).astype(np.float32)
    w = (0.5 * rng.standard_normal((V, D))).astype(np.float32)
    labels = rng.integers(0, V, (B, T)).astype(np.int32)
    labels[0, :4] = IGNORE_INDEX          # a prompt without loss
    labels[1, 7:] = IGNORE_INDEX          # right padding
    return jnp.asarray(h, dtype), jnp.asarray(w, dtype), jnp.asarray(labels)


def _numpy_loss(h, w, labels):
    z = np.asarray(h, np.float64) @ np.asarray(w, np.float64).T
    z, t = z[:, :-1], np.asarray(labels)[:, 1:]
    m = z.max(-1, keepdims=True)
    lse = np.log(np.exp(z - m).sum(-1)) + m[..., 0]
    valid = t != IGNORE_INDEX
    picked = np.take_along_axis(z, np.where(valid, t, 0)[..., None], -1)[..., 0]
    return ((lse - picked) * valid).sum() / valid.sum()


def _ref(h, w, labels):
    return lm_loss(jnp.einsum("btd,vd->btv", h, w, preferred_element_type=jnp.float32), labels)


@pytest.mark.parametrize("chunk", [1, 4, 7, 64])
def test_value_and_gradients_match_autodiff_of_the_plain_loss(chunk):
    h, w, labels = _case()
    got, (gh, gw) = jax.value_and_grad(lambda h, w: lm_head_loss(h, w, labels, chunk_size=chunk),
                                       argnums=(0, 1))(h, w)
    want, (rh, rw) = jax.value_and_grad(_ref, argnums=(0, 1))(h, w, labels)
    # float32, O(1) values: only the summation order differs (chunks of positions)
    np.testing.assert_allclose(float(got), _numpy_loss(h, w, labels), rtol=1e-5)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(gh), np.asarray(rh), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(gw), np.asarray(rw), rtol=1e-5, atol=1e-7)
    # ignored positions (the last one of every row, padding, prompts) get no gradient
    assert not np.any(np.asarray(gh)[:, -1]) and not np.any(np.asarray(gh)[1, 7:])


def test_jit_forward_only_and_a_scaled_cotangent():
    h, w, labels = _case(B=2, T=9, seed=1)
    f = jax.jit(lambda h, w: lm_head_loss(h, w, labels, chunk_size=5))
    np.testing.assert_allclose(float(f(h, w)), float(_ref(h, w, labels)), rtol=1e-6)
    g = jax.grad(lambda h: 3.0 * f(h, w))(h)
    np.testing.assert_allclose(np.asarray(g), 3.0 * np.asarray(jax.grad(_ref)(h, w, labels)), rtol=1e-5, atol=1e-7)


def test_bfloat16_hidden_states_close_to_float32():
    h, w, labels = _case(seed=2)
    got = lm_head_loss(h.astype(jnp.bfloat16), w.astype(jnp.bfloat16), labels)
    gh = jax.grad(lambda h: lm_head_loss(h, w.astype(jnp.bfloat16), labels))(h.astype(jnp.bfloat16))
    assert got.dtype == jnp.float32 and gh.dtype == jnp.bfloat16
    # bf16 operands carry ~3 significant digits; the loss is ~5, a 1% band
    np.testing.assert_allclose(float(got), _numpy_loss(h, w, labels), rtol=1e-2)
    rh = np.asarray(jax.grad(_ref)(h, w, labels))
    assert np.abs(np.asarray(gh, np.float32) - rh).max() < 0.05 * np.abs(rh).max()


def test_all_labels_ignored_is_zero_and_bad_shapes_are_clear_errors():
    h, w, labels = _case()
    assert float(lm_head_loss(h, w, jnp.full_like(labels, IGNORE_INDEX))) == 0.0
    with pytest.raises(ValueError, match=r"hidden \[B, T, D\] and labels \[B, T\]"):
        lm_head_loss(h[0], w, labels)
    with pytest.raises(ValueError, match=r"\[vocab, hidden\]"):
        lm_head_loss(h, w.T, labels)
    with pytest.raises(ValueError, match="chunk_size"):
        lm_head_loss(h, w, labels, chunk_size=0)
