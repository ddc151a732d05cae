"""Stand-ins used until the real modules land (then tests switch to them).

- ``toy_model``: a 2-layer functional network whose linear layers call
  ``linear_fn(name, x, w, b)`` exactly per docs/ARCHITECTURE.md, with a causal, padding-aware
  token mixer so that tokens interact but samples do not.
- ``DenseFactor``: a dense factor with the ``sylva_jax.hierarchy`` interface.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class DenseFactor(NamedTuple):
    mat: jax.Array


class toy_hierarchy:  # noqa: N801  (module-like namespace)
    @staticmethod
    def init(dim, num_partition=8, dtype=jnp.float32, kind="hodlr"):
        return DenseFactor(jnp.zeros((dim, dim), dtype))

    @staticmethod
    def update(h, vectors):
        v = jnp.atleast_2d(vectors)
        return DenseFactor(h.mat + v.T @ v)

    update_block = update

    @staticmethod
    def matmat(h, x):
        return h.mat @ x

    @staticmethod
    def to_dense(h):
        return h.mat

    @staticmethod
    def diag(h):
        return jnp.diag(h.mat)

    @staticmethod
    def inv_diag(h, damping=1e-6, relative=False):
        lam = damping * jnp.mean(jnp.diag(h.mat)) if relative else damping
        return jnp.diag(jnp.linalg.inv(h.mat + lam * jnp.eye(h.mat.shape[0])))

    @staticmethod
    def nbytes(h):
        return h.mat.size * h.mat.dtype.itemsize


def _rms(x, w):
    return x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * w


def toy_params(key, vocab=32, hidden=16, inter=32, layers=2):
    ks = iter(jax.random.split(key, 64))
    n = lambda *s: 0.3 * jax.random.normal(next(ks), s)  # noqa: E731
    p = {"model": {"embed_tokens": {"weight": n(vocab, hidden)}, "layers": {},
                   "norm": {"weight": 1.0 + 0.1 * n(hidden)}},
         "lm_head": {"weight": n(vocab, hidden)}}
    for i in range(layers):
        p["model"]["layers"][str(i)] = {
            "input_layernorm": {"weight": 1.0 + 0.1 * n(hidden)},
            "self_attn": {"q_proj": {"weight": n(hidden, hidden)},
                          "o_proj": {"weight": n(hidden, hidden)}},
            "mlp": {"up_proj": {"weight": n(inter, hidden), "bias": n(inter)},
                    "down_proj": {"weight": n(hidden, inter)}},
        }
    return p


def toy_apply(params, input_ids, attention_mask=None, *, linear_fn=None):
    """logits [B, T, V]; every linear goes through linear_fn(name, x, w, b)."""
    if linear_fn is None:
        linear_fn = lambda name, x, w, b: x @ w.T + (0 if b is None else b)  # noqa: E731
    if attention_mask is None:
        attention_mask = jnp.ones_like(input_ids)
    m = attention_mask.astype(jnp.float32)
    T = input_ids.shape[1]
    causal = jnp.tril(jnp.ones((T, T)))
    mix = causal[None] * m[:, None, :]  # query t sees real keys s <= t
    mix = mix / jnp.maximum(mix.sum(-1, keepdims=True), 1.0)
    h = params["model"]["embed_tokens"]["weight"][input_ids]
    for i, lp in params["model"]["layers"].items():
        pre = f"model.layers.{i}."
        x = _rms(h, lp["input_layernorm"]["weight"])
        q = linear_fn(pre + "self_attn.q_proj.weight", x, lp["self_attn"]["q_proj"]["weight"], None)
        ctx = jnp.einsum("bts,bsd->btd", mix, jnp.tanh(q))
        h = h + linear_fn(pre + "self_attn.o_proj.weight", ctx, lp["self_attn"]["o_proj"]["weight"], None)
        u = linear_fn(pre + "mlp.up_proj.weight", h, lp["mlp"]["up_proj"]["weight"], lp["mlp"]["up_proj"]["bias"])
        h = h + linear_fn(pre + "mlp.down_proj.weight", jax.nn.gelu(u), lp["mlp"]["down_proj"]["weight"], None)
    h = _rms(h, params["model"]["norm"]["weight"])
    return linear_fn("lm_head.weight", h, params["lm_head"]["weight"], None)


def toy_batches(rng: np.random.Generator, n, T, vocab=32, batch_size=1, min_len=3):
    """Right-padded samples of random lengths, split into batches; labels = ids, -100 at pad."""
    ids = rng.integers(0, vocab, size=(n, T)).astype(np.int32)
    lens = rng.integers(min_len, T + 1, size=n)
    am = (np.arange(T)[None] < lens[:, None]).astype(np.int32)
    ids = np.where(am == 1, ids, 0)
    labels = np.where(am == 1, ids, -100).astype(np.int32)
    return [{"input_ids": ids[i:i + batch_size], "attention_mask": am[i:i + batch_size],
             "labels": labels[i:i + batch_size]} for i in range(0, n, batch_size)]
