"""Calibration passes through a model's ``linear_fn`` hook (``docs/algorithm.md`` §1).

For every linear layer in scope (weight ``W [out, in]``, ``y = x W^T + b``) and every
calibration sample ``n``:

- ``a_n = mean over the sample's real tokens of x``          (``[in]``),
- ``g_n = mean over the sample's real tokens of dL_n/dy``    (``[out]``),

where ``L_n`` is that sample's own mean token loss (``lm_loss(..., reduction="sample_sum")``
makes the gradient w.r.t. anything per-sample exactly that sample's gradient, whatever the
batch size). ``factor="tokens"`` replaces the token means by every real token's ``x_t`` and
``dL_n/dy_t`` (the K-FAC definition). The vectors and ``sum_n dL_n/dW`` of each batch go to a
:class:`sylva_jax.statistics.StatsAccumulator` (the factor updates, gradient sums and the
final :class:`~sylva_jax.statistics.Stats`), inside the same jitted step as the
forward/backward pass, so a step is one XLA program per batch shape.

How it is captured (no change to the model): a ``linear_fn`` hook computes the plain
product and, for layers in scope, (1) returns the masked token mean of ``x`` as an auxiliary
output and (2) adds a zero *probe* ``e [B, out]`` (``[B, T, out]`` for ``"tokens"``),
broadcast over tokens and multiplied by the attention mask, to the layer output. The
derivative of the loss w.r.t. the probe is then the per-sample sum of ``dL/dy`` over real
tokens. Only the weights in scope and the probes are differentiated; the other parameters are
plain (non-differentiated) arguments. Nothing per-sample is kept across batches.

:func:`sylva_jax.anymodel.capture` (``sylva_jax.capture_stats``) gathers the same
statistics for any JAX loss function.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Iterator, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sylva_jax import tree as tree_lib
from sylva_jax.losses import lm_loss
from sylva_jax.models import llama
from sylva_jax.ops import dense_linear
from sylva_jax.progress import Progress
from sylva_jax.scope import match_scope
from sylva_jax.statistics import (  # noqa: F401  (re-exported: the results and constants)
    EXACT_TOKEN_BYTES,
    FACTOR_KINDS,
    FACTORS,
    TOKEN_SLOT_BATCH,
    TOKEN_UPDATES,
    LayerStats,
    Stats,
    StatsAccumulator,
    check_choice,
)

__all__ = [
    "FunctionalModel",
    "LayerStats",
    "Stats",
    "functional_model",
    "preprocess",
    "linear_layers",
    "match_scope",
    "sample_statistics",
    "scoped_weights",
]


# --------------------------------------------------------------------------------------
# The model in functional form
# --------------------------------------------------------------------------------------


class FunctionalModel(NamedTuple):
    """``apply(params, extra, input_ids, attention_mask, linear_fn) -> logits [B, T, V]``.

    ``params``: the parameter pytree whose leaves are named by ``tree.flatten``;
    ``extra``: any other state the model needs (non-differentiated).
    """

    apply: Callable
    params: Any
    extra: Any


def functional_model(model) -> FunctionalModel:
    """The model as ``apply(params, extra, ids, mask, linear_fn)`` plus its state.

    Accepts a Flax NNX module, ``(graphdef, params)`` from ``models.llama.split`` or
    ``(apply_fn, params)`` with ``apply_fn(params, input_ids, attention_mask, *, linear_fn)``.

    The returned ``apply`` is the same object for the same graph (or the same user
    function), so jitted steps built from it are reused across calls."""
    if isinstance(model, FunctionalModel):
        return model
    if isinstance(model, nnx.Module):
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        return FunctionalModel(_cached_apply("nnx", graphdef), params, rest)
    if isinstance(model, tuple) and len(model) == 2:
        head, params = model
        if isinstance(head, nnx.GraphDef):
            return FunctionalModel(_cached_apply("llama", head), params, None)
        if callable(head):
            return FunctionalModel(_cached_apply("fn", head), params, None)
    raise TypeError(
        f"cannot run calibration passes on a {type(model).__name__}: pass a Flax NNX module "
        "(e.g. LlamaForCausalLM), the (graphdef, params) pair from sylva_jax.models.llama.split, "
        "or (apply_fn, params) with apply_fn(params, input_ids, attention_mask, *, linear_fn)"
    )


@functools.lru_cache(maxsize=64)
def _cached_apply(form: str, head) -> Callable:
    """``apply(params, extra, ids, mask, linear_fn) -> logits`` for one model graph."""
    if form == "nnx":
        def apply(p, extra, ids, am, linear_fn):
            return nnx.merge(head, p, extra)(ids, am, linear_fn=linear_fn)
    elif form == "llama":
        def apply(p, extra, ids, am, linear_fn):
            return llama.apply(head, p, ids, am, linear_fn=linear_fn)
    else:
        def apply(p, extra, ids, am, linear_fn):
            return head(p, ids, am, linear_fn=linear_fn)
    return apply


_functional = functional_model  # the former private name (kept for scripts)


class _LinearInfo(NamedTuple):
    shape: tuple  # weight [out, in]
    x_ndim: int
    calls: int


def _discover(fn: FunctionalModel, seq_len: int = 8) -> dict[str, _LinearInfo]:
    """Every 2-D weight the model passes to ``linear_fn``, found by an abstract trace."""
    seen: dict[str, list] = {}

    def hook(name, x, w, b):
        if getattr(w, "ndim", 0) == 2:
            entry = seen.setdefault(name, [tuple(w.shape), x.ndim, 0])
            entry[2] += 1
        return dense_linear(x, w, b)

    ids = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
    jax.eval_shape(lambda p, e, i: fn.apply(p, e, i, jnp.ones(i.shape, jnp.int32), hook),
                   fn.params, fn.extra, ids)
    return {k: _LinearInfo(*v) for k, v in seen.items()}


def linear_layers(model) -> dict[str, tuple[int, int]]:
    """``{weight path: (out, in)}`` of every linear layer the model routes through
    ``linear_fn`` (embeddings and norms never appear), in call order."""
    return {k: v.shape for k, v in _discover(functional_model(model)).items()}


def _resolve_scope(fn: FunctionalModel, scope) -> dict[str, _LinearInfo]:
    infos = _discover(fn)
    chosen = match_scope(scope, infos.keys())
    for n in chosen:
        if infos[n].calls != 1:
            raise ValueError(
                f"linear layer {n!r} is applied {infos[n].calls} times per forward pass (a shared "
                "or tied weight); its per-sample statistics are not defined. Narrow the scope "
                "to exclude it."
            )
        if infos[n].x_ndim != 3:
            raise ValueError(
                f"linear layer {n!r} receives inputs of rank {infos[n].x_ndim}; capture needs "
                "x [B, T, in]"
            )
    return {n: infos[n] for n in chosen}


def scoped_weights(model, scope) -> dict[str, jax.Array]:
    """``{weight path: W [out, in]}`` for the linear layers in ``scope``."""
    fn = functional_model(model)
    names = _resolve_scope(fn, scope)
    return _lookup_weights(fn, names)


def _lookup_weights(fn: FunctionalModel, names) -> dict[str, jax.Array]:
    flat = tree_lib.flatten(fn.params)
    missing = [n for n in names if n not in flat]
    if missing:
        raise ValueError(
            f"linear layer(s) {missing} are in scope but are not parameters of their own (a "
            "tied weight, e.g. lm_head tied to the embedding); narrow the scope to exclude them"
        )
    return {n: flat[n] for n in names}


# --------------------------------------------------------------------------------------
# Per-batch statistics (docs/algorithm.md §1)
# --------------------------------------------------------------------------------------


def _merge(params, scoped: Mapping[str, jax.Array]):
    return tree_lib.map_flat(lambda n, x: scoped[n] if n in scoped else x, params)


def _batch_statistics(fn: FunctionalModel, scoped, params, extra, input_ids, attention_mask,
                      labels, *, factor: str, per_sample: bool = False):
    """Traceable core of :func:`sample_statistics`.

    Returns ``(acts, grads_y, grads_w, grads_w_sq)`` dicts keyed by layer:
    ``factor="mean"``:   ``acts [B, in]`` token means, ``grads_y [B, out]`` token means of
                         ``dL_n/dy``;
    ``factor="tokens"``: ``acts [B, T, in]`` and ``grads_y [B, T, out]``, zero at padding;
    ``grads_w [out, in]`` float32 = ``sum_n dL_n/dW`` over the batch;
    ``grads_w_sq [out, in]`` float32 = ``sum_n (dL_n/dW)^2`` (``per_sample=True``; else
    ``None``): each sample's exact weight gradient ``dL_n/dW = sum_t g_{n,t} x_{n,t}^T``
    from per-token probes (``g_{n,t} = dL_n/dy_t``), squared, summed over the batch (a
    transient ``[B, out, in]`` per layer).
    """
    B, T = input_ids.shape
    m = attention_mask.astype(jnp.float32)
    inv_count = 1.0 / jnp.maximum(m.sum(axis=1), 1.0)  # [B]
    token_probes = factor == "tokens" or per_sample
    shape = (lambda w: (B, T, w.shape[0])) if token_probes else (lambda w: (B, w.shape[0]))
    probes = {n: jnp.zeros(shape(w), jnp.float32) for n, w in scoped.items()}

    def loss_fn(diff):
        ws, ps = diff
        acts = {}

        def hook(name, x, w, b):
            y = dense_linear(x, w, b)
            if name in ps:
                xt = x.astype(jnp.float32) * m[:, :, None]
                acts[name] = xt if token_probes else jnp.einsum("bti->bi", xt) * inv_count[:, None]
                p = ps[name] if token_probes else ps[name][:, None, :]
                y = y + (p * m[:, :, None]).astype(y.dtype)
            return y

        logits = fn.apply(_merge(params, ws), extra, input_ids, attention_mask, hook)
        return lm_loss(logits, labels, reduction="sample_sum"), acts

    (gw, gp), acts = jax.grad(loss_fn, has_aux=True)((scoped, probes))
    gw = {n: g.astype(jnp.float32) for n, g in gw.items()}
    gw_sq = None
    if per_sample:
        gw_sq = {n: jnp.sum(jnp.square(jnp.einsum("bto,bti->boi", gp[n], acts[n],
                                                  precision=jax.lax.Precision.HIGHEST)), axis=0)
                 for n in gp}
    if factor == "mean" and token_probes:
        acts = {n: a.sum(axis=1) * inv_count[:, None] for n, a in acts.items()}
        gp = {n: g.sum(axis=1) for n, g in gp.items()}
    gy = {n: g * inv_count[:, None] for n, g in gp.items()} if factor == "mean" else gp
    return acts, gy, gw, gw_sq


def sample_statistics(model, batch: Mapping[str, Any], *, scope, factor: str = "mean",
                      per_sample: bool = False):
    """Per-sample statistics of one batch (``docs/algorithm.md`` §1), without accumulation.

    Returns ``(a, g, grad_w)``: dicts keyed by weight path with ``a [B, in]``,
    ``g [B, out]`` (``[B, T, in]`` / ``[B, T, out]`` for ``factor="tokens"``, zero at
    padding) and ``grad_w [out, in] = sum_n dL_n/dW``; with ``per_sample=True`` also
    ``grad_w_sq [out, in] = sum_n (dL_n/dW)^2`` (a 4-tuple). Meant for inspection and tests;
    :func:`preprocess` fuses the same computation with the factor updates.
    """
    check_choice("factor", factor, FACTORS)
    fn = functional_model(model)
    names = _resolve_scope(fn, scope)
    scoped = {n: w for n, w in tree_lib.flatten(fn.params).items() if n in names}
    ids, am, labels = _check_batch(batch, 0)
    out = _sample_statistics_fn(fn.apply, factor, bool(per_sample))(
        scoped, fn.params, fn.extra, ids, am, labels)
    return out if per_sample else out[:3]


@functools.lru_cache(maxsize=32)
def _sample_statistics_fn(apply: Callable, factor: str, per_sample: bool):
    fn = FunctionalModel(apply, None, None)
    return jax.jit(lambda s, p, e, i, a, l: _batch_statistics(
        fn, s, p, e, i, a, l, factor=factor, per_sample=per_sample))


# --------------------------------------------------------------------------------------
# preprocess
# --------------------------------------------------------------------------------------


def _check_batch(batch, index):
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise ValueError(
            f"calibration batch {index} must be a dict with 'input_ids', 'attention_mask' and "
            f"'labels' (see sylva_jax/losses.py); got {type(batch).__name__}"
        )
    ids = np.asarray(batch["input_ids"])
    if ids.ndim != 2:
        raise ValueError(f"batch {index}: input_ids must be [B, T], got shape {ids.shape}")
    if "labels" not in batch:
        raise ValueError(
            f"batch {index} has no 'labels'; give labels [B, T] aligned with input_ids "
            "(-100 where no loss is taken), e.g. labels = input_ids with padding set to -100"
        )
    am = np.asarray(batch.get("attention_mask", np.ones_like(ids)))
    labels = np.asarray(batch["labels"])
    for key, arr in (("attention_mask", am), ("labels", labels)):
        if arr.shape != ids.shape:
            raise ValueError(f"batch {index}: {key} has shape {arr.shape}, input_ids {ids.shape}")
    empty = np.nonzero(am.sum(axis=1) == 0)[0]
    if empty.size:
        raise ValueError(
            f"batch {index}: sample(s) {empty.tolist()} have no real token (attention_mask all "
            "zero); drop empty samples from the calibration data"
        )
    return ids.astype(np.int32), am.astype(np.int32), labels.astype(np.int32)


def _take_samples(batches, num_samples: int) -> Iterator[tuple]:
    """Yields checked ``(ids, am, labels)`` until ``num_samples`` samples, slicing the last."""
    seen = 0
    for index, batch in enumerate(batches):
        if seen >= num_samples:
            break
        ids, am, labels = _check_batch(batch, index)
        take = min(ids.shape[0], num_samples - seen)
        if take < ids.shape[0]:
            ids, am, labels = ids[:take], am[:take], labels[:take]
        seen += take
        yield ids, am, labels


@functools.lru_cache(maxsize=32)
def _make_step(apply: Callable, acc: StatsAccumulator):
    """One jitted program per batch shape: forward/backward with probes, then
    ``acc.update`` (every factor update and the gradient sums)."""
    fn = FunctionalModel(apply, None, None)

    def step(state, scoped, params, extra, ids, am, labels):
        acts, gy, gw, gw_sq = _batch_statistics(fn, scoped, params, extra, ids, am, labels,
                                                factor=acc.factor, per_sample=acc.per_sample)
        return acc.update(state, acts, gy, gw, gw_sq)

    return jax.jit(step, donate_argnums=0)


def preprocess(
    model,
    batches: Iterable[Mapping[str, Any]],
    *,
    scope,
    num_samples: int = 128,
    num_partition: int = 8,
    factor: str = "mean",
    factor_kind: str = "hodlr",
    damping: float = 1e-6,
    relative_damping: bool = False,
    keep_dense: bool = False,
    token_update: str = "auto",
    per_sample: bool = False,
) -> Stats:
    """Calibration forward/backward passes (``docs/algorithm.md`` §1).

    model: a Flax NNX module whose ``__call__(input_ids, attention_mask, *, linear_fn)``
        routes every linear layer through ``linear_fn`` (e.g. ``LlamaForCausalLM``; without
        ``remat``), or ``(graphdef, params)`` from ``models.llama.split``, or
        ``(apply_fn, params)``.
    batches: iterable of dicts ``input_ids``/``attention_mask``/``labels`` ``[B, T]``, any
        ``B``; consumed until ``num_samples`` samples (the last batch is sliced). Fewer
        available: uses them and warns; none: ``ValueError``.
    scope: which linear weights (see :func:`match_scope`).
    num_partition: HODLR levels ``P``, clamped per dimension to
        ``curvature.max_num_partition(dim)``; the values used are in ``Stats.partitions``.
    factor: ``"mean"`` (one rank-1 update per sample with token means, the published choice)
        or ``"tokens"`` (per-token outer products over real tokens, K-FAC).
    factor_kind: ``"hodlr"`` | ``"dense"`` | ``"diagonal"`` (``curvature.init(kind=...)``).
    damping, relative_damping: for the inverse diagonals ``diag((F + l I)^-1)``, computed
        here for all layers (one ``vmap``-ed call per dimension) and cached in the result.
    keep_dense: also accumulate exact dense ``A_dense [in, in]`` and ``G_dense [out, out]``
        in the same pass (for the ``kfac`` baseline; ``4 (in^2 + out^2)`` bytes per layer,
        fine for small models). With ``factor_kind="dense"`` the factors are exact already
        and ``A_dense``/``G_dense`` are their matrices.
    token_update: ``factor="tokens"`` with HODLR factors only: ``"exact"`` (dense
        accumulators, compressed once at the end; exact leaves and the best rank-1 tile of
        the exact sum; ``4 dim^2`` bytes per factor), ``"stream"`` (``update_block`` per
        batch; no ``dim x dim`` array, much slower) or ``"auto"`` (exact when all dense
        accumulators fit in ``EXACT_TOKEN_BYTES``, 2 GiB).
    per_sample: also accumulate ``grad_sq_mean = (1/N) sum_n (dL_n/dW)^2`` (exact
        per-sample gradients from per-token probes; for the ``fisher`` and ``adam_gain``
        scorers). Costs a transient ``[B, out, in]`` per layer and per-token probes.

    Factors are sums over samples (no ``1/N``); ``grad_mean`` is the mean over samples.
    Raises ``ValueError`` naming the layer(s) if any statistic or inverse diagonal is
    NaN/inf.
    """
    check_choice("factor", factor, FACTORS)
    check_choice("factor_kind", factor_kind, FACTOR_KINDS)
    if int(num_samples) < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    fn = functional_model(model)
    scoped = _lookup_weights(fn, _resolve_scope(fn, scope))
    acc = StatsAccumulator.create(
        {n: w.shape for n, w in scoped.items()}, num_partition=num_partition, factor=factor,
        factor_kind=factor_kind, keep_dense=keep_dense, token_update=token_update,
        per_sample=per_sample)
    step = _make_step(fn.apply, acc)
    state, seen = acc.init(), 0
    bar = Progress(int(num_samples), "calibration", unit="sample", delay_s=5)
    for ids, am, labels in _take_samples(batches, int(num_samples)):
        try:
            state = step(state, scoped, fn.params, fn.extra, ids, am, labels)
        except jax.errors.UnexpectedTracerError as e:
            raise ValueError(
                "the linear_fn hook ran inside a jax transformation of the model (remat / "
                "scan over layers?); calibration capture needs a model built with "
                "remat=False") from e
        seen += ids.shape[0]
        bar.update(ids.shape[0])
    bar.close()
    return acc.finalize(
        state, scoped, num_samples=seen, requested=num_samples, scope=scope,
        damping=damping, relative_damping=relative_damping,
        total_params=sum(np.size(x) for x in tree_lib.flatten(fn.params).values()))
