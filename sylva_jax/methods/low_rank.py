"""LoRA: train low-rank factors beside frozen weights (:mod:`sylva_jax.lora`).

``extras`` and ``trainable`` are the :class:`~sylva_jax.lora.LoraParams`; the forward adds
``(alpha / r) (drop(x) A^T) B^T`` to every adapted product through
``lora.lora_linear_fn`` (``W`` and ``b`` frozen); ``merge`` is ``W + (alpha / r) B A``.
"""
from __future__ import annotations

import optax

from sylva_jax import lora as lora_lib
from sylva_jax.methods.base import Method, masked_adamw
from sylva_jax.scope import match_scope

__all__ = ["lora"]


def lora(*, scope="self_attn", rank: int = 16, alpha: float = 32.0, dropout: float = 0.0,
         dropout_impl: str = "hash") -> Method:
    """LoRA on the 2-D weights in ``scope`` (:func:`sylva_jax.lora.lora_paths`), rank
    ``rank``, scale ``alpha / rank``, dropout ``dropout`` on the LoRA branch during training
    (``dropout_impl``: ``"hash"`` or ``"threefry"``, see :func:`lora.dropout_keep_mask`)."""
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")

    def init(params, rng):
        return lora_lib.init_lora(params, scope=scope, rank=rank, alpha=alpha, rng=rng)

    def forward(params, factors, trainable, rng):
        return params, lora_lib.lora_linear_fn(trainable, dropout=dropout, rng=rng if dropout > 0 else None,
                                               dropout_impl=dropout_impl)

    def apply_updates(params, factors, updates):
        return params, optax.apply_updates(factors, updates)

    return Method(
        name="lora",
        init=init,
        trainable=lambda params, factors: factors,
        forward=forward,
        eval_forward=lambda params, factors: (params, lora_lib.lora_linear_fn(factors, dropout=0.0)),
        apply_updates=apply_updates,
        merge=lora_lib.merge_lora,
        num_trainable=lambda params, factors: lora_lib.num_lora_params(factors),
        adamw=masked_adamw,
        adapts=lambda name: _in_scope(scope, name),
    )


def _in_scope(scope, name: str) -> bool:
    try:
        return bool(match_scope(scope, [name]))
    except ValueError:  # match_scope refuses a scope that selects nothing
        return False


