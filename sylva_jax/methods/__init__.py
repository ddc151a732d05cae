"""Fine-tuning methods as values of one type, :class:`Method` (see :mod:`.base`).

``sylva(adapter)`` (or ``sylva_traced(layout)``: the tile coordinates traced),
``lora(scope=..., rank=...)`` and ``full()`` side by side, one module each; :func:`sylva_jax.train.make_step` runs any of them (or a new one: write a function
returning a :class:`Method`) with any optax transformation.
"""
from sylva_jax.methods.base import LinearFn, Method, decay_mask, masked_adamw
from sylva_jax.methods.dense import full
from sylva_jax.methods.low_rank import lora
from sylva_jax.methods.sparse_tiles import sylva, sylva_traced

__all__ = ["Method", "LinearFn", "sylva", "sylva_traced", "lora", "full", "decay_mask", "masked_adamw"]
