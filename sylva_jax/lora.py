"""LoRA (Hu et al., 2021) as a baseline beside Sylva, hooked in through ``linear_fn``.

For a linear weight ``W [out, in]`` in scope, LoRA trains two factors
``A [r, in]`` and ``B [out, r]`` and computes (PEFT semantics)

    y = x W^T + b + (alpha / r) * (drop(x) A^T) B^T

with ``W`` and ``b`` frozen (``stop_gradient``), dropout applied to the LoRA input branch
only, ``A`` drawn Kaiming-uniform with ``a = sqrt(5)`` (PEFT's default:
``U(-1/sqrt(in), 1/sqrt(in))``) and ``B = 0`` so that the adapted model equals the base at
initialisation. The update is applied as two skinny matmuls (``[.., in] -> [.., r] ->
[.., out]``); the dense delta ``B A`` is formed only by :func:`merge_lora`.

Scope semantics are the adapter's (:func:`sylva_jax.capture.match_scope`): a plain string
selects the 2-D linear weights (``*.weight``, embeddings excluded) whose path contains it,
``"re:<regex>"`` uses ``re.search``, a list is the union.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import struct

from sylva_jax import tree as tree_lib
from sylva_jax.ops import dense_linear
from sylva_jax.scope import match_scope

__all__ = ["LoraParams", "lora_paths", "init_lora", "lora_linear_fn", "merge_lora", "num_lora_params",
           "rank_for_budget", "dropout_keep_mask"]


@struct.dataclass
class LoraParams:
    """The trainable LoRA factors (a pytree) and their static hyper-parameters.

    factors: ``{path: {"a": [r, in], "b": [out, r]}}`` keyed by the adapted weight's path.
    rank, alpha: static; the update is scaled by ``alpha / rank``.
    """

    factors: dict
    rank: int = struct.field(pytree_node=False)
    alpha: float = struct.field(pytree_node=False)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def lora_paths(params: Any, scope) -> list[str]:
    """Paths of the 2-D linear weights of ``params`` selected by ``scope``.

    The adapter's scope semantics (:func:`sylva_jax.capture.match_scope`): a plain string is
    a substring test (``"self_attn"``, ``"model.layers"``), ``"re:<regex>"`` or a compiled
    pattern is matched with ``re.search``, a list is the union. Embedding tables
    (``embed_tokens``) are never adapted: they are not linear layers. Raises ``ValueError``
    if nothing matches (a typo in the scope would otherwise train nothing silently).
    """
    names = [path for path, leaf in tree_lib.flatten(params).items()
             if path.endswith(".weight") and getattr(leaf, "ndim", 0) == 2 and "embed_tokens" not in path]
    return match_scope(scope, names)


def init_lora(
    params: Any,
    *,
    scope: Any = "self_attn",
    rank: int = 16,
    alpha: float = 32.0,
    rng: jax.Array | int = 0,
    dtype: Any = None,
) -> LoraParams:
    """Fresh LoRA factors for every weight of ``params`` in ``scope``.

    ``A [r, in] ~ U(-1/sqrt(in), 1/sqrt(in))`` (PEFT's ``kaiming_uniform_(a=sqrt(5))``),
    ``B [out, r] = 0``. ``dtype`` defaults to each weight's dtype.
    """
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be a positive int, got {rank!r}")
    if isinstance(rng, int):
        rng = jax.random.PRNGKey(rng)
    flat = tree_lib.flatten(params)
    factors = {}
    for i, path in enumerate(lora_paths(params, scope)):
        w = flat[path]
        out_dim, in_dim = w.shape
        if rank > min(out_dim, in_dim):
            raise ValueError(f"LoRA rank {rank} exceeds min(out, in) = {min(out_dim, in_dim)} of {path}")
        dt = dtype or w.dtype
        bound = 1.0 / math.sqrt(in_dim)
        a = jax.random.uniform(jax.random.fold_in(rng, i), (rank, in_dim), jnp.float32, -bound, bound)
        factors[path] = {"a": a.astype(dt), "b": jnp.zeros((out_dim, rank), dt)}
    return LoraParams(factors=factors, rank=rank, alpha=float(alpha))


def num_lora_params(lora: LoraParams) -> int:
    """Number of trainable scalars (``r * (in + out)`` per adapted weight)."""
    return int(sum(x.size for x in jax.tree_util.tree_leaves(lora)))


def rank_for_budget(params: Any, scope, num_trainable: int) -> int:
    """The LoRA rank whose trainable count is nearest ``num_trainable`` (at least 1).

    A rank-``r`` LoRA on the weights of ``scope`` trains ``r * sum(in + out)`` scalars
    (:func:`num_lora_params`), so ``r = max(1, round(num_trainable / sum(in + out)))``:
    e.g. the rank that matches a Sylva adapter's ``num_trainable`` on the same scope.
    """
    if int(num_trainable) < 0:
        raise ValueError(f"num_trainable must be >= 0, got {num_trainable}")
    flat = tree_lib.flatten(params)
    per_rank = sum(sum(flat[p].shape) for p in lora_paths(params, scope))
    return max(1, round(int(num_trainable) / per_rank))


def _hash32(v: jax.Array) -> jax.Array:
    """A strong 32-bit integer mixer (bias ~1e-4 "lowbias32": xorshift-multiply rounds)."""
    v = v ^ (v >> 16)
    v = v * jnp.uint32(0x7FEB352D)
    v = v ^ (v >> 15)
    v = v * jnp.uint32(0x846CA68B)
    return v ^ (v >> 16)


def _key_words(rng: jax.Array) -> jax.Array:
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        rng = jax.random.key_data(rng)
    return rng.reshape(-1).astype(jnp.uint32)


def dropout_keep_mask(rng: jax.Array, index: int, shape: tuple[int, ...], rate: float,
                      impl: str = "hash") -> jax.Array:
    """bool ``shape``: True where an element is kept (probability ``1 - rate``).

    ``impl="hash"``: a counter-based generator, ``bits = mix(counter * phi + mix(key, index))``
    with the lowbias32 mixer: a handful of integer ops per element, fused into the consumer,
    and cheap to compile. ``impl="threefry"``: ``jax.random.bernoulli`` (threefry2x32), the
    JAX default: ~5x slower per element on CPU and far slower to compile when a model has
    hundreds of dropout sites. Either way each ``index`` (adapted weight) gets an
    independent mask, as PEFT's one ``nn.Dropout`` per LoRA layer.
    """
    if impl == "threefry":
        return jax.random.bernoulli(jax.random.fold_in(rng, index), 1.0 - rate, shape)
    if impl != "hash":
        raise ValueError(f"dropout impl must be 'hash' or 'threefry', got {impl!r}")
    words = _key_words(rng)
    seed = _hash32(words[0] ^ _hash32(words[-1] + jnp.uint32((index * 0x9E3779B9) & 0xFFFFFFFF)))
    n = math.prod(shape)
    if n >= 2**32:
        raise ValueError(f"dropout over {n} elements exceeds the 2^32 counter of impl='hash'")
    counter = jax.lax.iota(jnp.uint32, n).reshape(shape)
    bits = _hash32(counter * jnp.uint32(0x9E3779B9) + seed)
    threshold = min(int(round(rate * 2.0**32)), 2**32 - 1)
    return bits >= jnp.uint32(threshold)


def lora_linear_fn(
    lora: LoraParams,
    *,
    dropout: float = 0.0,
    rng: jax.Array | None = None,
    dropout_impl: str = "hash",
) -> Callable:
    """The ``linear_fn(name, x, w, b)`` hook for a LoRA-adapted model.

    ``x: [..., in]``, ``w: [out, in]``, ``b: [out] | None`` -> ``[..., out]``. Adapted
    weights add ``scale * (drop(x) A^T) B^T``; every ``w`` and ``b`` is frozen
    (``stop_gradient``), so differentiating through this hook yields gradients for the
    factors only and never a dense weight gradient. Dropout (rate ``dropout``, inverted
    scaling as ``torch.nn.Dropout``) needs ``rng``; each weight draws an independent mask
    keyed by ``rng`` and the index of its path (:func:`dropout_keep_mask`; ``dropout_impl``
    picks the generator).
    """
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
    if dropout > 0.0 and rng is None:
        raise ValueError("LoRA dropout > 0 needs an rng key; pass rng=... (or dropout=0 for evaluation)")
    index = {p: i for i, p in enumerate(lora.factors)}
    scale = lora.scale

    def linear_fn(name, x, w, b=None):
        y = dense_linear(x, jax.lax.stop_gradient(w), None if b is None else jax.lax.stop_gradient(b))
        f = lora.factors.get(name)
        if f is None:
            return y
        xd = x
        if dropout > 0.0:
            keep = dropout_keep_mask(rng, index[name], x.shape, dropout, dropout_impl)
            xd = jnp.where(keep, x / (1.0 - dropout), jnp.zeros((), x.dtype)).astype(x.dtype)
        h = xd @ f["a"].T.astype(x.dtype)  # [..., r]
        return y + (scale * (h @ f["b"].T.astype(x.dtype))).astype(y.dtype)

    return linear_fn


def merge_lora(params: Any, lora: LoraParams) -> Any:
    """``params`` with ``W <- W + (alpha/r) B A`` for every adapted weight (structure kept).

    The merged model's plain forward equals the adapted forward without dropout (up to the
    rounding of adding the delta once into ``W``).
    """
    flat = tree_lib.flatten(params)
    missing = [p for p in lora.factors if p not in flat]
    if missing:
        raise KeyError(f"LoRA factors for {missing[:3]} have no weight in params; wrong base model?")

    def merge(path, w):
        f = lora.factors.get(path)
        if f is None:
            return w
        delta = lora.scale * (f["b"].astype(jnp.float32) @ f["a"].astype(jnp.float32))
        if delta.shape != w.shape:
            raise ValueError(f"LoRA delta {delta.shape} does not match weight {path} {w.shape}")
        return (w.astype(jnp.float32) + delta).astype(w.dtype)

    return tree_lib.map_flat(merge, params)
