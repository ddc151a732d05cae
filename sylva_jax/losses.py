"""Causal language-model losses.

Batch convention used everywhere in sylva_jax (the Hugging Face one): a batch is a dict
with ``input_ids`` ``[B, T]`` int32, ``attention_mask`` ``[B, T]`` (1 = real token,
0 = padding) and ``labels`` ``[B, T]`` int32, aligned with ``input_ids`` (``labels[b, t]``
is the token at position t, or ``IGNORE_INDEX`` where no loss is taken). The loss at
position t compares ``logits[b, t - 1]`` with ``labels[b, t]`` (the shift happens here).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

IGNORE_INDEX = -100

__all__ = ["IGNORE_INDEX", "token_nll", "lm_loss", "lm_head_loss", "HEAD_CHUNK"]


def token_nll(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-position negative log-likelihood after the causal shift.

    logits: ``[B, T, V]``; labels: ``[B, T]``. Returns ``(nll [B, T-1] float32,
    valid [B, T-1] float32)`` where ``valid`` is 1 where a loss is taken.
    """
    logits = logits[:, :-1].astype(jnp.float32)
    targets = labels[:, 1:]
    valid = targets != IGNORE_INDEX
    safe = jnp.where(valid, targets, 0)
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, safe[..., None], axis=-1)[..., 0]
    nll = (logz - picked) * valid
    return nll, valid.astype(jnp.float32)


def lm_loss(logits: jax.Array, labels: jax.Array, *, reduction: str = "token_mean") -> jax.Array:
    """Causal LM loss.

    reduction:
      ``"token_mean"``  mean NLL over all valid tokens of the batch (training default, as
                        Hugging Face's ``LlamaForCausalLM``);
      ``"sample_sum"``  sum over samples of each sample's mean NLL (pre-processing: the
                        gradient w.r.t. anything per-sample is that sample's own gradient);
      ``"per_sample"``  ``[B]`` vector of each sample's mean NLL.
    A sample with no valid token contributes 0.
    """
    nll, valid = token_nll(logits, labels)
    if reduction == "token_mean":
        return nll.sum() / jnp.maximum(valid.sum(), 1.0)
    per = nll.sum(axis=1) / jnp.maximum(valid.sum(axis=1), 1.0)
    if reduction == "per_sample":
        return per
    if reduction == "sample_sum":
        return per.sum()
    raise ValueError(f"unknown reduction {reduction!r}; use 'token_mean', 'sample_sum' or 'per_sample'")


# ---------------------------------------------------------------------------- fused LM head + loss
HEAD_CHUNK = 128  # tokens per chunk of the fused head: [128, V] float32 logits at a time


def lm_head_loss(hidden: jax.Array, weight: jax.Array, labels: jax.Array, *,
                 chunk_size: int = HEAD_CHUNK) -> jax.Array:
    """Token-mean causal LM loss of a linear head, without ``[B, T, V]`` logits.

    Equals ``lm_loss(hidden @ weight.T, labels)`` (docs/algorithm.md, the training loss):
    hidden ``[B, T, D]`` (the final normed hidden states, compute dtype), weight ``[V, D]``
    (the LM head, or the tied embedding), labels ``[B, T]`` as in the module doc. Returns a
    float32 scalar.

    The ``B * T`` positions are processed ``chunk_size`` at a time; per chunk ``c`` the
    logits ``z = h_c W^T`` (float32 accumulation) give ``logsumexp(z) - z[label]``, and, when
    differentiated, the gradient of the loss w.r.t. ``z`` is known in the same pass:
    ``g = (softmax(z) - onehot(label)) * valid / n_valid``. So the forward of the
    differentiated loss also forms ``dh_c = g W`` and accumulates ``dW += g^T h_c``; the
    backward only scales them by the incoming cotangent. Nothing ``[T, V]`` outlives a
    chunk, the logits are never recomputed, and an unused ``dW`` (frozen head) is removed
    by XLA as dead code.
    """
    hidden = jnp.asarray(hidden)
    weight = jnp.asarray(weight)
    labels = jnp.asarray(labels)
    if hidden.ndim != 3 or labels.shape != hidden.shape[:2]:
        raise ValueError(f"lm_head_loss needs hidden [B, T, D] and labels [B, T]; got hidden "
                         f"{tuple(hidden.shape)} and labels {tuple(labels.shape)}")
    if weight.ndim != 2 or weight.shape[1] != hidden.shape[2]:
        raise ValueError(f"lm_head_loss needs the head weight as [vocab, hidden] = [V, {hidden.shape[2]}]; "
                         f"got {tuple(weight.shape)}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    B, T, D = hidden.shape
    # the causal shift on the labels (the last position of a row predicts nothing)
    targets = jnp.concatenate([labels[:, 1:], jnp.full((B, 1), IGNORE_INDEX, labels.dtype)], axis=1)
    n = B * T
    c = min(chunk_size, n)
    pad = -n % c
    h2 = hidden.reshape(n, D)
    t2 = targets.reshape(n)
    if pad:
        h2 = jnp.concatenate([h2, jnp.zeros((pad, D), h2.dtype)])
        t2 = jnp.concatenate([t2, jnp.full((pad,), IGNORE_INDEX, t2.dtype)])
    valid = (t2 != IGNORE_INDEX).astype(jnp.float32)
    scale = 1.0 / jnp.maximum(valid.sum(), 1.0)
    return _fused_head_loss(h2.reshape(-1, c, D), weight, jnp.where(t2 == IGNORE_INDEX, 0, t2).reshape(-1, c),
                            (valid * scale).reshape(-1, c))


def _chunk_logits(h, w):
    """h ``[c, D]``, w ``[V, D]`` -> float32 logits ``[c, V]``."""
    return jax.lax.dot_general(h, w.astype(h.dtype), (((1,), (1,)), ((), ())),
                               preferred_element_type=jnp.float32)


def _chunk_nll(z, t):
    """Per-row ``logsumexp(z) - z[t]`` and the softmax pieces: z ``[c, V]``, t ``[c]``."""
    m = jax.lax.stop_gradient(z.max(axis=-1, keepdims=True))
    e = jnp.exp(z - m)
    s = e.sum(axis=-1)
    picked = jnp.take_along_axis(z, t[:, None], axis=-1)[:, 0]
    return jnp.log(s) + m[:, 0] - picked, e, s


@jax.custom_vjp
def _fused_head_loss(h, w, t, wt):
    """h ``[k, c, D]``, w ``[V, D]``, t ``[k, c]`` targets, wt ``[k, c]`` float32 weights."""
    def body(total, xs):
        hc, tc, wc = xs
        nll, _, _ = _chunk_nll(_chunk_logits(hc, w), tc)
        return total + (nll * wc).sum(), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (h, t, wt))
    return total


def _fused_head_loss_fwd(h, w, t, wt):
    V = w.shape[0]

    def body(carry, xs):
        total, dw = carry
        hc, tc, wc = xs
        z = _chunk_logits(hc, w)
        nll, e, s = _chunk_nll(z, tc)
        onehot = jnp.arange(V, dtype=tc.dtype)[None, :] == tc[:, None]
        g = ((e / s[:, None] - onehot) * wc[:, None]).astype(hc.dtype)          # d loss / d z
        dh = jax.lax.dot_general(g, w.astype(hc.dtype), (((1,), (0,)), ((), ())),
                                 preferred_element_type=jnp.float32)            # [c, D]
        # g^T materialised (the barrier keeps XLA from folding the transpose into the dot,
        # which XLA:CPU then runs outside its fast YNNPACK path): dW += g^T h as [V, c] @ [c, D]
        gt = jax.lax.optimization_barrier(g.T)
        dw = dw + jax.lax.dot_general(gt, hc, (((1,), (0,)), ((), ())),
                                      preferred_element_type=jnp.float32)       # [V, D]
        return (total + (nll * wc).sum(), dw), dh.astype(hc.dtype)

    init = (jnp.zeros((), jnp.float32), jnp.zeros(w.shape, jnp.float32))
    (total, dw), dh = jax.lax.scan(body, init, (h, t, wt))
    return total, (dh, dw.astype(w.dtype), t, wt)


def _fused_head_loss_bwd(res, ct):
    dh, dw, t, wt = res
    zeros_t = np.zeros(t.shape, jax.dtypes.float0)
    return (dh * ct.astype(dh.dtype), dw * ct.astype(dw.dtype), zeros_t, jnp.zeros_like(wt))


_fused_head_loss.defvjp(_fused_head_loss_fwd, _fused_head_loss_bwd)
