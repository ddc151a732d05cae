"""Calibration passes: per-layer curvature factors and mean weight gradients.

Implements ``../shared/docs/ALGORITHM.md`` section 0 step 1 and section 1. For every linear
layer in scope (weight ``W [out, in]``, ``y = x W^T + b``) and every calibration sample ``n``:

- ``a_n = mean over the sample's real tokens of x``          (``[in]``),
- ``g_n = mean over the sample's real tokens of dL_n/dy``    (``[out]``),

where ``L_n`` is that sample's own mean token loss (``lm_loss(..., reduction="sample_sum")``
makes the gradient w.r.t. anything per-sample exactly that sample's gradient, whatever the
batch size). The factors receive one rank-1 update per sample, ``A += a_n a_n^T`` and
``G += g_n g_n^T`` (sums, as in section 1; no ``1/N``), in sample order, and the mean weight
gradient is ``Gbar = (1/N) sum_n dL_n/dW`` (dense ``[out, in]``).

``factor="tokens"`` replaces the token means by per-token outer products (the K-FAC
definition): ``A += sum_t x_t x_t^T`` and ``G += sum_t g_t g_t^T`` with ``g_t = dL_n/dy_t``,
over real tokens only.

How it is captured (no change to the model): a ``linear_fn`` hook computes the plain
product and, for layers in scope, (1) returns the masked token mean of ``x`` as an auxiliary
output and (2) adds a zero *probe* ``e [B, out]`` (``[B, T, out]`` for ``"tokens"``),
broadcast over tokens and multiplied by the attention mask, to the layer output. The
derivative of the loss w.r.t. the probe is then the per-sample sum of ``dL/dy`` over real
tokens. Only the weights in scope and the probes are differentiated; the other parameters are
plain (non-differentiated) arguments.

Factors of the same dimension (for example the input factors of every q/k/v/gate/up
projection) are stacked and updated with one ``vmap``-ed call inside the same jitted step as
the forward/backward pass, so a step is one XLA program per batch shape whatever the number of
layers. Nothing per-sample is kept across batches.
"""
from __future__ import annotations

import sys as _sys
import types as _types

import dataclasses
import functools
import importlib
import math
import re
import warnings
from typing import Any, Callable, Iterable, Iterator, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sylva_jax import tree as tree_lib
from sylva_jax.losses import lm_loss

__all__ = [
    "LayerStats",
    "Stats",
    "preprocess",
    "linear_layers",
    "match_scope",
    "sample_statistics",
    "scoped_weights",
]

FACTORS = ("mean", "tokens")
FACTOR_KINDS = ("hodlr", "dense", "diagonal")
# per-token factor updates run this many layer slots at a time (``lax.map``), not all at
# once (``vmap``): one batch has ``B*T`` vectors per slot, and the update's per-level copies
# of them for every slot of a dimension group (270 slots of width 576 for SmolLM2's
# model.layers) exceeded 20 GB.
TOKEN_SLOT_BATCH = 8
# How per-token HODLR factors are accumulated (``token_update``): "exact" sums the per-token
# outer products into dense [dim, dim] accumulators (one matmul per batch) and compresses
# them to HODLR once at the end (hierarchy.from_dense: the best rank-1 tile of the exact
# sum); "stream" updates the HODLR factors batch by batch (hierarchy.update_block: no
# dim x dim array, but thousands of small QR/SVD steps per batch; for SmolLM2's
# model.layers one batch of 8 sequences took over 27 min on 2 CPU cores). "auto": exact
# when the dense accumulators of all layers fit in EXACT_TOKEN_BYTES.
TOKEN_UPDATES = ("auto", "exact", "stream")
EXACT_TOKEN_BYTES = 2 << 30


def _hierarchy():
    """The factor module (``sylva_jax.hierarchy``); imported lazily."""
    return importlib.import_module("sylva_jax.hierarchy")


# --------------------------------------------------------------------------------------
# The model in functional form
# --------------------------------------------------------------------------------------


class _Functional(NamedTuple):
    """``apply(params, extra, input_ids, attention_mask, linear_fn) -> logits [B, T, V]``.

    ``params``: the parameter pytree whose leaves are named by ``tree.flatten``;
    ``extra``: any other state the model needs (non-differentiated).
    """

    apply: Callable
    params: Any
    extra: Any


def _functional(model) -> _Functional:
    """Accepts a Flax NNX module, ``(graphdef, params)`` from ``models.llama.split`` or
    ``(apply_fn, params)`` with ``apply_fn(params, input_ids, attention_mask, *, linear_fn)``.

    The returned ``apply`` is the same object for the same graph (or the same user
    function), so jitted steps built from it are reused across calls."""
    if isinstance(model, _Functional):
        return model
    from flax import nnx

    if isinstance(model, nnx.Module):
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        return _Functional(_cached_apply("nnx", graphdef), params, rest)
    if isinstance(model, tuple) and len(model) == 2:
        head, params = model
        if isinstance(head, nnx.GraphDef):
            return _Functional(_cached_apply("llama", head), params, None)
        if callable(head):
            return _Functional(_cached_apply("fn", head), params, None)
    raise TypeError(
        f"cannot run calibration passes on a {type(model).__name__}: pass a Flax NNX module "
        "(e.g. LlamaForCausalLM), the (graphdef, params) pair from sylva_jax.models.llama.split, "
        "or (apply_fn, params) with apply_fn(params, input_ids, attention_mask, *, linear_fn)"
    )


@functools.lru_cache(maxsize=64)
def _cached_apply(form: str, head) -> Callable:
    """``apply(params, extra, ids, mask, linear_fn) -> logits`` for one model graph."""
    if form == "nnx":
        from flax import nnx

        def apply(p, extra, ids, am, linear_fn):
            return nnx.merge(head, p, extra)(ids, am, linear_fn=linear_fn)
    elif form == "llama":
        llama = importlib.import_module("sylva_jax.models.llama")

        def apply(p, extra, ids, am, linear_fn):
            return llama.apply(head, p, ids, am, linear_fn=linear_fn)
    else:
        def apply(p, extra, ids, am, linear_fn):
            return head(p, ids, am, linear_fn=linear_fn)
    return apply


def _dense(x, w, b):
    """The plain linear product ``x W^T + b`` (``x [..., in]``, ``w [out, in]``), in
    ``x.dtype`` with float32 accumulation (as ``models.llama.dense_linear``)."""
    y = jax.lax.dot_general(x, w.astype(x.dtype), (((x.ndim - 1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32)
    if b is not None:
        y = y + b.astype(jnp.float32)
    return y.astype(x.dtype)


class _LinearInfo(NamedTuple):
    shape: tuple  # weight [out, in]
    x_ndim: int
    calls: int


def _discover(fn: _Functional, seq_len: int = 8) -> dict[str, _LinearInfo]:
    """Every 2-D weight the model passes to ``linear_fn``, found by an abstract trace."""
    seen: dict[str, list] = {}

    def hook(name, x, w, b):
        if getattr(w, "ndim", 0) == 2:
            entry = seen.setdefault(name, [tuple(w.shape), x.ndim, 0])
            entry[2] += 1
        return _dense(x, w, b)

    ids = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
    jax.eval_shape(lambda p, e, i: fn.apply(p, e, i, jnp.ones(i.shape, jnp.int32), hook),
                   fn.params, fn.extra, ids)
    return {k: _LinearInfo(*v) for k, v in seen.items()}


def linear_layers(model) -> dict[str, tuple[int, int]]:
    """``{weight path: (out, in)}`` of every linear layer the model routes through
    ``linear_fn`` (embeddings and norms never appear), in call order."""
    return {k: v.shape for k, v in _discover(_functional(model)).items()}


def match_scope(scope, names: Iterable[str]) -> list[str]:
    """The names selected by ``scope``, in the order given.

    ``scope`` is
    - a plain string: a *substring* test (``"self_attn"``, ``"model.layers"``), the seed's
      semantics;
    - a string starting with ``"re:"`` or a compiled ``re.Pattern``: a regular expression
      matched with ``re.search`` (``"re:layers\\.(0|1)\\..*proj"``);
    - a sequence of the above: their union.
    Raises ``ValueError`` listing the available names when nothing matches.
    """
    names = list(names)
    preds = _scope_predicates(scope)
    chosen = [n for n in names if any(p(n) for p in preds)]
    if not chosen:
        listing = "\n  ".join(names) if names else "(none)"
        raise ValueError(
            f"scope {scope!r} matches no linear layer. Use a substring of one of these weight "
            f"names, or 're:<regex>' for a regular expression:\n  {listing}"
        )
    return chosen


def _scope_predicates(scope) -> list[Callable[[str], bool]]:
    if isinstance(scope, re.Pattern):
        return [lambda n, s=scope: s.search(n) is not None]
    if isinstance(scope, str):
        if not scope:
            raise ValueError("scope is empty; give a substring such as 'self_attn' or 'model.layers'")
        if scope.startswith("re:"):
            try:
                pat = re.compile(scope[3:])
            except re.error as e:
                raise ValueError(f"scope {scope!r}: invalid regular expression ({e})") from None
            return [lambda n, s=pat: s.search(n) is not None]
        return [lambda n, s=scope: s in n]
    if isinstance(scope, (list, tuple)) and scope:
        return [p for s in scope for p in _scope_predicates(s)]
    raise TypeError(
        f"scope must be a substring, 're:<regex>', a compiled re.Pattern or a list of those; "
        f"got {scope!r}"
    )


def _resolve_scope(fn: _Functional, scope) -> dict[str, _LinearInfo]:
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
    fn = _functional(model)
    names = _resolve_scope(fn, scope)
    return _lookup_weights(fn, names)


def _lookup_weights(fn: _Functional, names) -> dict[str, jax.Array]:
    flat = tree_lib.flatten(fn.params)
    missing = [n for n in names if n not in flat]
    if missing:
        raise ValueError(
            f"linear layer(s) {missing} are in scope but are not parameters of their own (a "
            "tied weight, e.g. lm_head tied to the embedding); narrow the scope to exclude them"
        )
    return {n: flat[n] for n in names}


# --------------------------------------------------------------------------------------
# Per-batch statistics (section 1)
# --------------------------------------------------------------------------------------


def _merge(params, scoped: Mapping[str, jax.Array]):
    return tree_lib.map_flat(lambda n, x: scoped[n] if n in scoped else x, params)


def _batch_statistics(fn: _Functional, scoped, params, extra, input_ids, attention_mask,
                      labels, *, factor: str):
    """Traceable core of :func:`sample_statistics`.

    Returns ``(acts, grads_y, grads_w)`` dicts keyed by layer:
    ``factor="mean"``:   ``acts [B, in]`` token means, ``grads_y [B, out]`` token means of
                         ``dL_n/dy``;
    ``factor="tokens"``: ``acts [B, T, in]`` and ``grads_y [B, T, out]``, zero at padding;
    ``grads_w [out, in]`` float32 = ``sum_n dL_n/dW`` over the batch.
    """
    B, T = input_ids.shape
    m = attention_mask.astype(jnp.float32)
    inv_count = 1.0 / jnp.maximum(m.sum(axis=1), 1.0)  # [B]
    if factor == "mean":
        probes = {n: jnp.zeros((B, w.shape[0]), jnp.float32) for n, w in scoped.items()}
    else:
        probes = {n: jnp.zeros((B, T, w.shape[0]), jnp.float32) for n, w in scoped.items()}

    def loss_fn(diff):
        ws, ps = diff
        acts = {}

        def hook(name, x, w, b):
            y = _dense(x, w, b)
            if name in ps:
                xf = x.astype(jnp.float32)
                if factor == "mean":
                    acts[name] = jnp.einsum("bti,bt->bi", xf, m) * inv_count[:, None]
                    e = ps[name][:, None, :] * m[:, :, None]
                else:
                    acts[name] = xf * m[:, :, None]
                    e = ps[name] * m[:, :, None]
                y = y + e.astype(y.dtype)
            return y

        logits = fn.apply(_merge(params, ws), extra, input_ids, attention_mask, hook)
        return lm_loss(logits, labels, reduction="sample_sum"), acts

    (gw, gp), acts = jax.grad(loss_fn, has_aux=True)((scoped, probes))
    if factor == "mean":
        gy = {n: g * inv_count[:, None] for n, g in gp.items()}
    else:
        gy = gp
    gw = {n: g.astype(jnp.float32) for n, g in gw.items()}
    return acts, gy, gw


def sample_statistics(model, batch: Mapping[str, Any], *, scope, factor: str = "mean"):
    """Per-sample statistics of one batch (section 1), without accumulation.

    Returns ``(a, g, grad_w)``: dicts keyed by weight path with ``a [B, in]``,
    ``g [B, out]`` (``[B, T, in]`` / ``[B, T, out]`` for ``factor="tokens"``, zero at
    padding) and ``grad_w [out, in] = sum_n dL_n/dW``. Meant for inspection and tests;
    :func:`preprocess` fuses the same computation with the factor updates.
    """
    _check_choice("factor", factor, FACTORS)
    fn = _functional(model)
    names = _resolve_scope(fn, scope)
    scoped = {n: w for n, w in tree_lib.flatten(fn.params).items() if n in names}
    ids, am, labels = _check_batch(batch, 0)
    return _sample_statistics_fn(fn.apply, factor)(scoped, fn.params, fn.extra, ids, am, labels)


@functools.lru_cache(maxsize=32)
def _sample_statistics_fn(apply: Callable, factor: str):
    fn = _Functional(apply, None, None)
    return jax.jit(lambda s, p, e, i, a, l: _batch_statistics(fn, s, p, e, i, a, l, factor=factor))


# --------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class LayerStats:
    """Statistics of one linear layer ``W [out, in]``.

    A, G: factor pytrees (``sylva_jax.hierarchy``) of dimension ``in`` / ``out``, or ``None``
    in a weights-only ``Stats`` (methods ``magnitude`` / ``random``);
    grad_mean: ``Gbar [out, in]`` float32; weight: the model's ``W [out, in]`` (a reference,
    not a copy); A_dense / G_dense: exact dense ``[in, in]`` / ``[out, out]`` factors when
    requested (``keep_dense=True`` or ``factor_kind="dense"``), for the ``kfac`` baseline.
    """

    name: str
    weight: jax.Array
    A: Any = None
    G: Any = None
    grad_mean: jax.Array | None = None
    num_samples: int = 0
    A_dense: jax.Array | None = None
    G_dense: jax.Array | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)


@dataclasses.dataclass(eq=False)
class Stats(Mapping):
    """Result of :func:`preprocess`: a read-only mapping ``{weight path: LayerStats}`` plus
    the settings it was computed with. ``inv_diags(damping, relative)`` returns (and caches)
    ``{name: (diag((A+lI)^-1) [in], diag((G+lI)^-1) [out])}``."""

    layers: dict[str, LayerStats]
    scope: Any = None
    num_samples: int = 0
    factor: str = "mean"
    factor_kind: str = "hodlr"
    num_partition: int = 8
    damping: float = 1e-6
    relative_damping: bool = False
    total_params: int = 0
    partitions: dict = dataclasses.field(default_factory=dict)  # {dim: HODLR levels used}
    _inv_cache: dict = dataclasses.field(default_factory=dict, repr=False)

    def __getitem__(self, name: str) -> LayerStats:
        return self.layers[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def has_factors(self) -> bool:
        return all(s.A is not None for s in self.layers.values())

    def inv_diags(self, damping: float | None = None, relative: bool | None = None):
        damping = self.damping if damping is None else float(damping)
        relative = self.relative_damping if relative is None else bool(relative)
        if not self.has_factors:
            raise ValueError("these Stats hold no curvature factors (weights-only); run preprocess()")
        key = (damping, relative)
        if key not in self._inv_cache:
            self._inv_cache[key] = _inv_diags(
                {n: (s.A, s.G) for n, s in self.layers.items()}, damping, relative)
        return self._inv_cache[key]

    def factor_nbytes(self) -> dict[str, int]:
        """Bytes held by the factors (``hierarchy.nbytes``) vs dense ``[d, d]`` float32."""
        hier = _hierarchy()
        held = sum(int(hier.nbytes(s.A)) + int(hier.nbytes(s.G)) for s in self.layers.values())
        dense = sum(4 * (s.shape[0] ** 2 + s.shape[1] ** 2) for s in self.layers.values())
        return {"factors": held, "dense_equivalent": dense}


def _inv_diags(factors: dict, damping: float, relative: bool) -> dict:
    """Per layer (``hierarchy.inv_diag`` is jitted and compiled once per factor shape)."""
    hier = _hierarchy()
    return {n: (hier.inv_diag(A, damping=damping, relative=relative),
                hier.inv_diag(G, damping=damping, relative=relative))
            for n, (A, G) in factors.items()}


# --------------------------------------------------------------------------------------
# preprocess
# --------------------------------------------------------------------------------------


def _check_choice(what, value, allowed):
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; use one of {', '.join(map(repr, allowed))}")


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


class _Group(NamedTuple):
    """Factors of one dimension, stacked: slot ``k`` is ``(layer, "A" | "G")``."""

    dim: int
    num_partition: int
    slots: tuple


def _groups(infos: Mapping[str, _LinearInfo], num_partition: int, hier) -> tuple[_Group, ...]:
    """Slots grouped by dimension. ``num_partition`` is clamped per dimension to
    ``hierarchy.max_num_partition(dim)`` (leaves of at least one entry), so e.g. the
    192-dim k/v-projection outputs of SmolLM2 get 7 levels when 8 are asked for."""
    by_dim: dict[int, list] = {}
    for n, info in infos.items():
        out, inn = info.shape
        by_dim.setdefault(inn, []).append((n, "A"))
        by_dim.setdefault(out, []).append((n, "G"))
    cap = getattr(hier, "max_num_partition", lambda d: num_partition)
    return tuple(_Group(d, min(int(num_partition), cap(d)), tuple(s)) for d, s in by_dim.items())


def _stacked_init(hier, g: _Group, kind: str):
    """``len(g.slots)`` copies of ``hierarchy.init(...)`` stacked on a leading axis (built on
    the host: no per-shape compilation)."""
    h = hier.init(g.dim, num_partition=g.num_partition, dtype=jnp.float32, kind=kind)
    n = len(g.slots)
    return jax.tree.map(lambda x: jnp.asarray(np.broadcast_to(np.asarray(x), (n,) + x.shape)), h)


def _all_finite(*trees) -> jax.Array:
    leaves = [x for t in trees for x in jax.tree.leaves(t)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


@functools.lru_cache(maxsize=32)
def _make_step(apply: Callable, groups, factor: str, keep_dense: bool, hier):
    """One jitted program per batch shape: forward/backward with probes, then every
    factor update (one call per dimension group, see :func:`_factor_update`) and the gradient sums."""
    upd = _factor_update(hier, factor)

    fn = _Functional(apply, None, None)

    def step(state, scoped, params, extra, ids, am, labels):
        acts, gy, gw = _batch_statistics(fn, scoped, params, extra, ids, am, labels,
                                         factor=factor)
        return _accumulate(state, groups, upd, keep_dense, acts, gy, gw)

    return jax.jit(step, donate_argnums=0)


def _init_state(hier, groups, factor_kind: str, keep_dense: bool, shapes: Mapping[str, tuple]):
    """Empty accumulators: stacked factors per dimension group, optional dense factors,
    gradient sums and finiteness flags per layer (``shapes``: layer -> ``(out, in)``)."""
    return {
        "factors": [_stacked_init(hier, g, factor_kind) for g in groups],
        "dense": [jnp.zeros((len(g.slots), g.dim, g.dim), jnp.float32) for g in groups]
        if keep_dense else None,
        "grad_sum": {n: jnp.zeros(shape, jnp.float32) for n, shape in shapes.items()},
        "finite": {n: jnp.ones((), bool) for n in shapes},
    }


def _factor_update(hier, factor: str):
    """``(stacked factors, x [slots, n, dim]) -> stacked factors``: every slot's factor plus
    its vectors' outer products. Token means: all slots at once (``vmap``); per-token
    vectors: :data:`TOKEN_SLOT_BATCH` slots at a time (bounded memory, same result)."""
    if factor == "mean":
        return jax.vmap(hier.update)
    return lambda fs, x: jax.lax.map(lambda fx: hier.update_block(*fx), (fs, x),
                                     batch_size=TOKEN_SLOT_BATCH)


def _accumulation_kind(groups, factor: str, factor_kind: str, token_update: str) -> str:
    """The factor kind accumulated during the passes: ``factor_kind``, except ``"dense"``
    for per-token HODLR factors accumulated exactly (see :data:`TOKEN_UPDATES`)."""
    _check_choice("token_update", token_update, TOKEN_UPDATES)
    if factor != "tokens" or factor_kind != "hodlr":
        return factor_kind
    if token_update == "auto":
        nbytes = sum(4 * len(g.slots) * g.dim ** 2 for g in groups)
        token_update = "exact" if nbytes <= EXACT_TOKEN_BYTES else "stream"
    return "dense" if token_update == "exact" else "hodlr"


def _finish_factors(state, groups, hier, acc_kind: str, factor_kind: str):
    """Dense accumulators -> HODLR factors (``hierarchy.from_dense``, a few slots at a time)
    when they were accumulated exactly for ``factor_kind="hodlr"``; else unchanged."""
    if acc_kind == factor_kind:
        return state
    factors = [jax.jit(lambda fs, p=g.num_partition: jax.lax.map(
        lambda f: hier.from_dense(f.mat, p), fs, batch_size=TOKEN_SLOT_BATCH))(fs)
        for g, fs in zip(groups, state["factors"])]
    return {**state, "factors": factors}


def _accumulate(state, groups, upd, keep_dense: bool, acts, gy, gw):
    """Add one batch's statistics (per layer: ``acts`` / ``gy`` token-mean or per-token
    vectors, ``gw`` weight-gradient sum) to ``state``: one factor update per dimension
    group (``upd`` from :func:`_factor_update`). Shared by :func:`preprocess` and :func:`sylva_jax.anymodel.capture`."""
    vecs = {"A": acts, "G": gy}
    new_f, new_d = [], []
    for k, g in enumerate(groups):
        # [slots, B, dim] (mean) or [slots, B*T, dim] (tokens)
        x = jnp.stack([vecs[which][n].reshape(-1, g.dim) for n, which in g.slots])
        new_f.append(upd(state["factors"][k], x))
        if keep_dense:
            new_d.append(state["dense"][k] + jnp.einsum(
                "lbi,lbj->lij", x, x, precision=jax.lax.Precision.HIGHEST))
    finite = {n: state["finite"][n] & _all_finite(acts[n], gy[n], gw[n]) for n in gw}
    grad_sum = {n: state["grad_sum"][n] + gw[n] for n in gw}
    return {"factors": new_f, "dense": new_d if keep_dense else None,
            "grad_sum": grad_sum, "finite": finite}


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
) -> Stats:
    """Calibration forward/backward passes (ALGORITHM.md sections 0.1 and 1).

    model: a Flax NNX module whose ``__call__(input_ids, attention_mask, *, linear_fn)``
        routes every linear layer through ``linear_fn`` (e.g. ``LlamaForCausalLM``; without
        ``remat``), or ``(graphdef, params)`` from ``models.llama.split``, or
        ``(apply_fn, params)``.
    batches: iterable of dicts ``input_ids``/``attention_mask``/``labels`` ``[B, T]``, any
        ``B``; consumed until ``num_samples`` samples (the last batch is sliced). Fewer
        available: uses them and warns; none: ``ValueError``.
    scope: which linear weights (see :func:`match_scope`).
    num_partition: HODLR levels ``P``, clamped per dimension to
        ``hierarchy.max_num_partition(dim)``; the values used are in ``Stats.partitions``.
    factor: ``"mean"`` (one rank-1 update per sample with token means, the published choice)
        or ``"tokens"`` (per-token outer products over real tokens, K-FAC).
    factor_kind: ``"hodlr"`` | ``"dense"`` | ``"diagonal"`` (``hierarchy.init(kind=...)``).
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

    Factors are sums over samples (no ``1/N``); ``grad_mean`` is the mean over samples.
    Raises ``ValueError`` naming the layer(s) if any statistic or inverse diagonal is
    NaN/inf.
    """
    _check_choice("factor", factor, FACTORS)
    _check_choice("factor_kind", factor_kind, FACTOR_KINDS)
    if int(num_samples) < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    hier = _hierarchy()
    fn = _functional(model)
    infos = _resolve_scope(fn, scope)
    scoped = _lookup_weights(fn, infos)
    groups = _groups(infos, num_partition, hier)
    acc_kind = _accumulation_kind(groups, factor, factor_kind, token_update)
    state = _init_state(hier, groups, acc_kind, keep_dense, {n: w.shape for n, w in scoped.items()})
    step = _make_step(fn.apply, groups, factor, keep_dense, hier)

    seen = 0
    for ids, am, labels in _take_samples(batches, int(num_samples)):
        try:
            state = step(state, scoped, fn.params, fn.extra, ids, am, labels)
        except jax.errors.UnexpectedTracerError as e:
            raise ValueError(
                "the linear_fn hook ran inside a jax transformation of the model (remat / "
                "scan over layers?); calibration capture needs a model built with "
                "remat=False") from e
        seen += ids.shape[0]
    if seen == 0:
        raise ValueError("no calibration samples: `batches` yielded nothing")
    if seen < num_samples:
        warnings.warn(
            f"only {seen} calibration samples were available ({num_samples} requested); "
            "the statistics use those", stacklevel=2)
    bad = [n for n, ok in jax.device_get(state["finite"]).items() if not ok]
    if bad:
        raise ValueError(
            f"non-finite (NaN/inf) calibration statistics in layer(s) {bad}; check the model "
            "(overflow in low precision?) and the calibration data (labels, masks)")

    state = _finish_factors(state, groups, hier, acc_kind, factor_kind)
    layers = _unstack(state, groups, scoped, seen, keep_dense, factor_kind, hier)
    invs = _inv_diags({n: (s.A, s.G) for n, s in layers.items()}, float(damping),
                      bool(relative_damping))
    bad = _nonfinite_layers(layers, invs)
    if bad:
        raise ValueError(
            f"non-finite (NaN/inf) factors or inverse-curvature diagonals in layer(s) {bad}; "
            "increase `damping` or use relative_damping=True")
    stats = Stats(
        layers=layers, scope=scope, num_samples=seen, factor=factor, factor_kind=factor_kind,
        num_partition=int(num_partition), damping=float(damping),
        relative_damping=bool(relative_damping),
        total_params=int(sum(np.size(x) for x in tree_lib.flatten(fn.params).values())),
        partitions={g.dim: g.num_partition for g in groups},
    )
    stats._inv_cache[(float(damping), bool(relative_damping))] = invs
    return stats


def _nonfinite_layers(layers: Mapping[str, "LayerStats"], invs: Mapping[str, Any]) -> list[str]:
    """Layers whose factors or inverse diagonals hold NaN/inf (checked on the host: a few MB
    for a 135M model, and no compilation per layer shape)."""
    return [n for n, s in layers.items()
            if not all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves((s.A, s.G, invs[n])))]


def _unstack(state, groups, scoped, seen, keep_dense, factor_kind, hier):
    layers = {n: LayerStats(name=n, weight=w, num_samples=seen) for n, w in scoped.items()}
    for k, g in enumerate(groups):
        for j, (n, which) in enumerate(g.slots):
            h = jax.tree.map(lambda x: x[j], state["factors"][k])
            setattr(layers[n], which, h)
            if keep_dense:
                setattr(layers[n], which + "_dense", state["dense"][k][j])
            elif factor_kind == "dense":
                setattr(layers[n], which + "_dense", hier.to_dense(h))
    inv_n = 1.0 / seen
    for n, s in layers.items():
        s.grad_mean = state["grad_sum"][n] * inv_n
    return layers


# ``sylva_jax.capture(fn, params, batches, *, scope, ...)`` (issue 8's spelling) calls
# :func:`sylva_jax.anymodel.capture` on any JAX loss function, while ``sylva_jax.capture``
# stays this module (``from sylva_jax.capture import preprocess`` keeps working).
class _CallableModule(_types.ModuleType):
    def __call__(self, fn, params, batches, **kwargs):
        """Statistics capture for an unchanged JAX model: see :func:`sylva_jax.anymodel.capture`."""
        from sylva_jax.anymodel import capture

        return capture(fn, params, batches, **kwargs)


_sys.modules[__name__].__class__ = _CallableModule
