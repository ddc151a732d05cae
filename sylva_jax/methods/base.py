"""The type of a fine-tuning method: a named tuple of pure functions (as optax's
``GradientTransformation``), so that a training step never asks which method it runs.

A method sees the model through four pytrees:

``params``     the model's parameters (nested dict, ``{path: array}`` after
               :func:`sylva_jax.tree.flatten`); the state owns them;
``extras``     trainable values that are not model weights (LoRA's factors; ``{}`` else);
``trainable``  the pytree that is differentiated and given to the optimizer: a view of
               ``params`` and ``extras`` (Sylva's tiles ``{path: [nnz, bs, bs]}``, LoRA's
               factors, or all of ``params``);
``updates``    the optimizer's output, shaped like ``trainable``.

and a forward pass is ``apply_fn(params', ids, mask, linear_fn=hook)`` where
``(params', hook)`` come from :attr:`Method.forward` (training) or
:attr:`Method.eval_forward` (evaluation). The loss is differentiated w.r.t. ``trainable``
only, through whatever ``params'`` and ``hook`` make of it (docs/algorithm.md, training).

Contract of :attr:`Method.merge`: ``merge(params, extras) -> params`` returns plain
weights of the structure of ``params`` such that ``apply_fn(merge(params, extras), ...,
linear_fn=None)`` equals the evaluation forward (up to the rounding of adding a delta into
``W`` once); it never modifies its arguments. It is what evaluation and export use.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import optax

__all__ = ["Method", "LinearFn", "decay_mask", "masked_adamw"]

LinearFn = Callable[..., jax.Array]  # (name, x [..., in], w [out, in], b [out] | None) -> [..., out]


class Method(NamedTuple):
    """A fine-tuning method (see the module doc for the four pytrees).

    name: a short label (metrics, logs, ``Trainer.method``).
    init: ``(params, rng) -> extras``: fresh trainable extras (``{}`` when there are none).
    trainable: ``(params, extras) -> trainable``: what is differentiated and optimised.
    forward: ``(params, extras, trainable, rng) -> (params', linear_fn | None)``: the
      training forward's inputs; ``trainable`` is the differentiated value, ``rng`` a key
      for stochastic hooks (dropout) that a method may ignore.
    eval_forward: ``(params, extras) -> (params', linear_fn | None)``: the deterministic
      forward for evaluation.
    apply_updates: ``(params, extras, updates) -> (params, extras)``: the optimizer's
      ``updates`` (shaped like ``trainable``) landed in the state.
    merge: ``(params, extras) -> params``: plain weights for evaluation and export.
    num_trainable: ``(params, extras) -> int``: trainable scalars (shapes only, so it also
      works on ``jax.ShapeDtypeStruct`` leaves).
    adamw: ``(learning_rate, *, b1, b2, eps, weight_decay) -> GradientTransformation``:
      the method's AdamW over ``trainable`` (Sylva's runs over tile stacks), used when the
      caller passes no optimizer.
    in_place: True when ``apply_updates`` writes into buffers that the backward also reads
      (Sylva's scatter into the weights): the step then orders every read of the old
      weights before the first write, so XLA needs no copy of any weight.
    adapts: ``name -> bool``: whether the training hook changes the product of the weight
      ``name`` (``None``: unknown). A method that leaves ``"lm_head.weight"`` alone lets
      the step fuse the LM head with the cross-entropy (:func:`sylva_jax.models.llama.loss`).
    """

    name: str
    init: Callable[[Any, jax.Array], Any]
    trainable: Callable[[Any, Any], Any]
    forward: Callable[[Any, Any, Any, jax.Array], tuple[Any, Optional[LinearFn]]]
    eval_forward: Callable[[Any, Any], tuple[Any, Optional[LinearFn]]]
    apply_updates: Callable[[Any, Any, Any], tuple[Any, Any]]
    merge: Callable[[Any, Any], Any]
    num_trainable: Callable[[Any, Any], int]
    adamw: Callable[..., optax.GradientTransformation]
    in_place: bool = False
    adapts: Optional[Callable[[str], bool]] = None


def decay_mask(tree: Any) -> Any:
    """Weight decay on >= 2-D arrays only (no decay for norms and biases, as HF Trainer)."""
    return jax.tree.map(lambda x: x.ndim >= 2, tree)


def masked_adamw(learning_rate, *, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6,
                 weight_decay: float = 0.0) -> optax.GradientTransformation:
    """``optax.adamw`` with :func:`decay_mask`: the AdamW of dense trainable pytrees."""
    return optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask)


def count_leaves(tree: Any) -> int:
    """Number of scalars in the array leaves of ``tree`` (shapes only)."""
    return int(sum(x.size for x in jax.tree_util.tree_leaves(tree)))
