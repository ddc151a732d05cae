"""Sylva: train ``bs x bs`` tiles inside the weights (docs/algorithm.md, training).

``trainable`` is the tiles ``{path: [nnz, bs, bs]}`` gathered from the weights; the
training forward runs the dense product through the tile hook, whose backward gives ``dx``
dense and the tile gradients by SDD (no dense weight gradient anywhere). Updates are
scatter-added into the weights (in place under jit with the state donated), so ``params``
are the merged model at all times and ``merge`` is the identity.

Two forms with the same numbers:

- :func:`sylva` ``(adapter)``: the coordinates are static (``Adapter``), constants of the
  compiled step; ``extras`` is ``{}``.
- :func:`sylva_traced` ``(layout)``: the coordinates are ``extras`` (int32 arrays
  ``{path: (rows [k], cols [k])}``, :data:`sylva_jax.adapter.Coords`), arguments of the
  compiled step: one compilation serves every choice of tiles with the same per-weight
  counts ``k``. They are not trainable and the optimizer never sees them.
"""
from __future__ import annotations

from sylva_jax.adapter import Adapter, TileLayout
from sylva_jax.methods.base import Method
from sylva_jax.optim import sparse_adamw

__all__ = ["sylva", "sylva_traced"]


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


def sylva_traced(layout: TileLayout | Adapter, *, backend: str | None = None) -> Method:
    """Sylva with the tile coordinates in ``extras`` (traced by ``jit``).

    Args:
      layout: a :class:`~sylva_jax.adapter.TileLayout` (``TileLayout.of(adapter)``), or
        an ``Adapter``, whose coordinates then are the default ``extras`` of ``init``.
      backend: SDD backend of the tile hook (``None``: ``"auto"``); every backend takes
        the coordinates as arrays.

    ``extras`` = ``layout.coords(masks)``: give them to ``TrainStep.init(params,
    extras=...)`` (``Trainer.init(params, extras=...)``); ``init`` without them builds the
    adapter's coordinates, or refuses for a bare layout. Numbers equal :func:`sylva` of
    the adapter with the same tiles.
    """
    if isinstance(layout, Adapter):
        adapter, layout = layout, layout.tile_layout
    elif isinstance(layout, TileLayout):
        adapter = None
    else:
        raise TypeError(f"sylva_traced needs a TileLayout (TileLayout.of(adapter)) or an Adapter; "
                        f"got {type(layout).__name__}")
    lin_kwargs = {} if backend is None else {"backend": backend}

    def init(params, rng):
        if adapter is None:
            raise ValueError("sylva_traced(layout) has no default tile coordinates: initialise "
                             "with extras=layout.coords(masks), e.g. trainer.init(params, "
                             "extras=layout.coords(masks)), or build it from an Adapter")
        return layout.coords_of(adapter)

    def forward(params, coords, tiles, rng):
        return params, layout.linear_fn(coords, tiles, **lin_kwargs)

    def apply_updates(params, coords, updates):
        return layout.apply_updates(params, coords, updates), coords

    return Method(
        name="sylva",
        init=init,
        trainable=layout.tiles,
        forward=forward,
        eval_forward=lambda params, coords: (params, None),
        apply_updates=apply_updates,
        merge=lambda params, coords: params,
        num_trainable=lambda params, coords: int(layout.num_trainable),
        adamw=sparse_adamw,
        in_place=True,
        adapts=lambda name: name in layout.paths,
    )
