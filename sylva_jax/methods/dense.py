"""Full fine-tuning: every parameter trains (the dense baseline)."""
from __future__ import annotations

import optax

from sylva_jax.methods.base import Method, count_leaves, masked_adamw

__all__ = ["full"]


def full() -> Method:
    """Every parameter is trainable; AdamW with weight decay on >= 2-D weights only."""
    return Method(
        name="full",
        init=lambda params, rng: {},
        trainable=lambda params, extras: params,
        forward=lambda params, extras, trainable, rng: (trainable, None),
        eval_forward=lambda params, extras: (params, None),
        apply_updates=lambda params, extras, updates: (optax.apply_updates(params, updates), extras),
        merge=lambda params, extras: params,
        num_trainable=lambda params, extras: count_leaves(params),
        adamw=masked_adamw,
        adapts=lambda name: False,  # no hook: the trained weights are the forward's params
    )
