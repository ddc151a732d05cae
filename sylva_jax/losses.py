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

IGNORE_INDEX = -100

__all__ = ["IGNORE_INDEX", "token_nll", "lm_loss"]


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
