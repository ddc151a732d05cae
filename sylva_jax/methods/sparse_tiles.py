"""Sylva: train the adapter's ``bs x bs`` tiles inside the weights (docs/algorithm.md,
training).

``trainable`` is ``adapter.tiles(params)`` (``{path: [nnz, bs, bs]}``); the training
forward runs the dense product through ``adapter.linear_fn(tiles)``, whose backward gives
``dx`` dense and the tile gradients by SDD (no dense weight gradient anywhere). Updates are
scatter-added into the weights (``adapter.apply_updates``, in place under jit with the state
donated), so ``params`` are the merged model at all times and ``merge`` is the identity.
"""
from __future__ import annotations

from sylva_jax.methods.base import Method
from sylva_jax.optim import sparse_adamw

__all__ = ["sylva"]


def sylva(adapter, *, backend: str | None = None) -> Method:
    """The Sylva method of ``adapter`` (``make_adapter(params, masks, ...)``); ``backend``
    is the SDD backend of ``adapter.linear_fn`` (``None``: the adapter's default)."""
    if adapter is None:
        raise ValueError("method='sylva' needs adapter=make_adapter(params, masks, ...)")
    lin_kwargs = {} if backend is None else {"backend": backend}

    def forward(params, extras, tiles, rng):
        return params, adapter.linear_fn(tiles, **lin_kwargs)

    def apply_updates(params, extras, updates):
        return adapter.apply_updates(params, updates), extras

    return Method(
        name="sylva",
        init=lambda params, rng: {},
        trainable=lambda params, extras: adapter.tiles(params),
        forward=forward,
        eval_forward=lambda params, extras: (params, None),
        apply_updates=apply_updates,
        merge=lambda params, extras: params,
        num_trainable=lambda params, extras: int(adapter.num_trainable),
        adamw=sparse_adamw,
        in_place=True,
        adapts=lambda name: name in adapter.paths,
    )
