"""Calibration statistics: the per-layer result type and the accumulator that builds it.

``docs/algorithm.md`` §1. For every linear layer ``W [out, in]`` in scope and calibration
sample ``n`` a *route* (the ``linear_fn`` hook of :mod:`sylva_jax.capture`, the jaxpr
interpreter of :mod:`sylva_jax.anymodel`) computes per batch

- ``acts[layer]``: ``a_n [B, in]`` (token means of ``x``) or ``[B, T, in]`` (every real
  token, zero at padding) for ``factor="tokens"``;
- ``grads_y[layer]``: ``g_n [B, out]`` or ``[B, T, out]`` likewise for ``dL_n/dy``;
- ``grads_w[layer]``: ``sum_n dL_n/dW [out, in]`` float32 over the batch,
- ``grads_w_sq[layer]`` (``per_sample=True`` only): ``sum_n (dL_n/dW)^2 [out, in]``, the
  elementwise squares of each sample's own weight gradient,

and feeds them to a :class:`StatsAccumulator`, as kfac-jax feeds its curvature blocks:

``acc = StatsAccumulator.create(shapes, ...)``; ``state = acc.init()``;
``state = acc.update(state, acts, grads_y, grads_w, grads_w_sq)`` per batch (pure, traceable: the
routes jit it together with their forward/backward pass); ``stats = acc.finalize(state,
weights, num_samples=N, ...)`` once. The factors are sums (``A = sum_n a_n a_n^T``, no
``1/N``), ``grad_mean = (1/N) sum_n dL_n/dW``, ``grad_sq_mean = (1/N) sum_n (dL_n/dW)^2``.

Factors of one dimension (e.g. the input factors of every q/k/v/gate/up projection) are
stacked and updated by one batched call, so an update is one XLA program per batch shape
whatever the number of layers.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Iterator, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sylva_jax.progress import track
from sylva_jax import curvature

__all__ = [
    "FACTORS", "FACTOR_KINDS", "TOKEN_UPDATES", "EXACT_TOKEN_BYTES", "TOKEN_SLOT_BATCH",
    "LayerStats", "Stats", "StatsAccumulator", "inv_diags", "check_choice",
]

FACTORS = ("mean", "tokens")
FACTOR_KINDS = curvature.KINDS
# Per-token factor updates run this many layer slots at a time (``lax.map``), not all at
# once (``vmap``): one batch has ``B*T`` vectors per slot, and the update's per-level copies
# of them for every slot of a dimension group (270 slots of width 576 for SmolLM2's
# model.layers) exceeded 20 GB.
TOKEN_SLOT_BATCH = 8
# How per-token HODLR factors are accumulated: "exact" sums the per-token outer products
# into dense [dim, dim] accumulators (one matmul per batch) and compresses them to HODLR once
# at the end (``curvature.from_dense``: the best rank-1 tile of the exact sum); "stream"
# updates the HODLR factors batch by batch (``curvature.update_block``: no dim x dim array,
# but thousands of small QR/SVD steps per batch, far slower on CPUs). "auto": exact when
# the dense accumulators of all layers fit in EXACT_TOKEN_BYTES.
TOKEN_UPDATES = ("auto", "exact", "stream")
EXACT_TOKEN_BYTES = 2 << 30


def check_choice(what: str, value, allowed) -> None:
    """``ValueError`` naming ``what`` and the allowed values unless ``value`` is one."""
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; use one of {', '.join(map(repr, allowed))}")


# --------------------------------------------------------------------------------------
# The result
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class LayerStats:
    """Statistics of one linear layer ``W [out, in]``.

    A, G: factors (:mod:`sylva_jax.curvature`) of dimension ``in`` / ``out``, or ``None``
    in a weights-only ``Stats`` (methods ``magnitude`` / ``random``);
    grad_mean: ``Gbar [out, in]`` float32; weight: the model's ``W [out, in]`` (a reference,
    not a copy); A_dense / G_dense: exact dense ``[in, in]`` / ``[out, out]`` factors when
    requested (``keep_dense=True`` or ``factor_kind="dense"``), for the ``kfac`` baseline;
    grad_sq_mean: ``(1/N) sum_n (dL_n/dW)^2 [out, in]`` float32 (the diagonal empirical
    Fisher) when calibrated with ``per_sample=True``, else ``None``.
    """

    name: str
    weight: jax.Array
    A: Any = None
    G: Any = None
    grad_mean: jax.Array | None = None
    num_samples: int = 0
    A_dense: jax.Array | None = None
    G_dense: jax.Array | None = None
    grad_sq_mean: jax.Array | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)


def inv_diags(factors: Mapping[str, tuple], damping: float, relative: bool) -> dict:
    """``{layer: (diag((A + lam I)^-1) [in], diag((G + lam I)^-1) [out])}`` for
    ``factors = {layer: (A, G)}`` (``docs/algorithm.md`` §3; one compiled call per factor
    shape)."""
    layers = track(factors.items(), "inverse diagonals", total=len(factors), unit="layer",
                   delay_s=5)
    return {n: (curvature.inv_diag(A, damping=damping, relative=relative),
                curvature.inv_diag(G, damping=damping, relative=relative))
            for n, (A, G) in layers}


@dataclasses.dataclass(eq=False)
class Stats(Mapping):
    """Calibration statistics: a read-only mapping ``{weight path: LayerStats}`` plus the
    settings they were computed with. ``inv_diags(damping, relative)`` returns (and caches)
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
            self._inv_cache[key] = inv_diags(
                {n: (s.A, s.G) for n, s in self.layers.items()}, damping, relative)
        return self._inv_cache[key]

    def factor_nbytes(self) -> dict[str, int]:
        """Bytes held by the factors (``curvature.nbytes``) vs dense ``[d, d]`` float32."""
        held = sum(int(curvature.nbytes(s.A)) + int(curvature.nbytes(s.G))
                   for s in self.layers.values())
        dense = sum(4 * (s.shape[0] ** 2 + s.shape[1] ** 2) for s in self.layers.values())
        return {"factors": held, "dense_equivalent": dense}


# --------------------------------------------------------------------------------------
# The accumulator
# --------------------------------------------------------------------------------------


class _Group(NamedTuple):
    """Factors of one dimension, stacked: slot ``k`` is ``(layer, "A" | "G")``."""

    dim: int
    num_partition: int
    slots: tuple


def _groups(shapes: Mapping[str, tuple], num_partition: int) -> tuple[_Group, ...]:
    """Slots grouped by dimension, in layer order. ``num_partition`` is clamped per dimension
    to ``curvature.max_num_partition(dim)`` (leaves of at least one entry), so e.g. the
    192-dim k/v-projection outputs of SmolLM2 get 7 levels when 8 are asked for."""
    by_dim: dict[int, list] = {}
    for n, (out, inn) in shapes.items():
        by_dim.setdefault(inn, []).append((n, "A"))
        by_dim.setdefault(out, []).append((n, "G"))
    return tuple(_Group(d, min(int(num_partition), curvature.max_num_partition(d)), tuple(s))
                 for d, s in by_dim.items())


def _accumulation_kind(groups, factor: str, factor_kind: str, token_update: str) -> str:
    """The factor kind accumulated during the passes: ``factor_kind``, except ``"dense"``
    for per-token HODLR factors accumulated exactly (see :data:`TOKEN_UPDATES`)."""
    check_choice("token_update", token_update, TOKEN_UPDATES)
    if factor != "tokens" or factor_kind != "hodlr":
        return factor_kind
    if token_update == "auto":
        nbytes = sum(4 * len(g.slots) * g.dim ** 2 for g in groups)
        token_update = "exact" if nbytes <= EXACT_TOKEN_BYTES else "stream"
    return "dense" if token_update == "exact" else "hodlr"


def _stacked_init(g: _Group, kind: str):
    """``len(g.slots)`` copies of ``curvature.init(...)`` stacked on a leading axis (built
    on the host: no per-shape compilation)."""
    h = curvature.init(g.dim, num_partition=g.num_partition, dtype=jnp.float32, kind=kind)
    n = len(g.slots)
    return jax.tree.map(lambda x: jnp.asarray(np.broadcast_to(np.asarray(x), (n,) + x.shape)), h)


def _all_finite(*trees) -> jax.Array:
    leaves = [x for t in trees for x in jax.tree.leaves(t)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _factor_update(factor: str, fs, x):
    """Every slot's factor plus its vectors' outer products (``x [slots, n, dim]``). Token
    means: all slots at once (``vmap``); per-token vectors: :data:`TOKEN_SLOT_BATCH` slots
    at a time (bounded memory, same result)."""
    if factor == "mean":
        return jax.vmap(curvature.update)(fs, x)
    return jax.lax.map(lambda fx: curvature.update_block(*fx), (fs, x),
                       batch_size=TOKEN_SLOT_BATCH)


@dataclasses.dataclass(frozen=True)
class StatsAccumulator:
    """The static plan of one calibration run (hashable: a cache key for jitted steps).

    shapes: ``((layer, (out, in)), ...)`` in scope order; groups: the stacked factor slots
    per dimension; factor: ``"mean"`` | ``"tokens"``; factor_kind: the kind returned;
    accumulate_kind: the kind updated batch by batch (``"dense"`` for per-token HODLR
    factors accumulated exactly); num_partition: the HODLR levels asked for; keep_dense:
    also accumulate exact dense factors; per_sample: also accumulate ``sum_n (dL_n/dW)^2``.
    """

    shapes: tuple
    groups: tuple
    factor: str
    factor_kind: str
    accumulate_kind: str
    num_partition: int
    keep_dense: bool
    per_sample: bool = False

    @classmethod
    def create(cls, shapes: Mapping[str, tuple], *, num_partition: int = 8,
               factor: str = "mean", factor_kind: str = "hodlr", keep_dense: bool = False,
               token_update: str = "auto", per_sample: bool = False) -> "StatsAccumulator":
        """The plan for layers ``shapes = {layer: (out, in)}`` (arguments as
        :func:`sylva_jax.capture.preprocess`); ``ValueError`` for an unknown choice."""
        check_choice("factor", factor, FACTORS)
        check_choice("factor_kind", factor_kind, FACTOR_KINDS)
        shapes = {n: tuple(int(d) for d in s) for n, s in shapes.items()}
        groups = _groups(shapes, num_partition)
        return cls(shapes=tuple(shapes.items()), groups=groups, factor=factor,
                   factor_kind=factor_kind,
                   accumulate_kind=_accumulation_kind(groups, factor, factor_kind, token_update),
                   num_partition=int(num_partition), keep_dense=bool(keep_dense),
                   per_sample=bool(per_sample))

    @property
    def partitions(self) -> dict[int, int]:
        """``{dim: HODLR levels used}``."""
        return {g.dim: g.num_partition for g in self.groups}

    def init(self) -> dict:
        """Empty state: stacked factors per dimension group, optional dense factors, weight
        gradient sums (and squared per-sample gradient sums) and finiteness flags per layer."""
        return {
            "factors": [_stacked_init(g, self.accumulate_kind) for g in self.groups],
            "dense": [jnp.zeros((len(g.slots), g.dim, g.dim), jnp.float32) for g in self.groups]
            if self.keep_dense else None,
            "grad_sum": {n: jnp.zeros(shape, jnp.float32) for n, shape in self.shapes},
            "grad_sq_sum": {n: jnp.zeros(shape, jnp.float32) for n, shape in self.shapes}
            if self.per_sample else None,
            "finite": {n: jnp.ones((), bool) for n, _ in self.shapes},
        }

    def update(self, state: dict, acts, grads_y, grads_w, grads_w_sq=None) -> dict:
        """``state`` plus one batch's statistics (module docstring for the shapes): one
        factor update per dimension group, the gradient sums, and the finiteness flags.
        ``grads_w_sq`` is required exactly when the plan has ``per_sample=True``."""
        if self.per_sample != (grads_w_sq is not None):
            raise ValueError("grads_w_sq (sum_n (dL_n/dW)^2) must be given exactly when the "
                             "accumulator was created with per_sample=True")
        vecs = {"A": acts, "G": grads_y}
        new_f, new_d = [], []
        for k, g in enumerate(self.groups):
            # [slots, B, dim] (mean) or [slots, B*T, dim] (tokens)
            x = jnp.stack([vecs[which][n].reshape(-1, g.dim) for n, which in g.slots])
            new_f.append(_factor_update(self.factor, state["factors"][k], x))
            if self.keep_dense:
                new_d.append(state["dense"][k] + jnp.einsum(
                    "lbi,lbj->lij", x, x, precision=jax.lax.Precision.HIGHEST))
        finite = {n: state["finite"][n] & _all_finite(acts[n], grads_y[n], grads_w[n])
                  for n in grads_w}
        grad_sum = {n: state["grad_sum"][n] + grads_w[n] for n in grads_w}
        sq_sum = None
        if self.per_sample:
            finite = {n: f & jnp.all(jnp.isfinite(grads_w_sq[n])) for n, f in finite.items()}
            sq_sum = {n: state["grad_sq_sum"][n] + grads_w_sq[n] for n in grads_w}
        return {"factors": new_f, "dense": new_d if self.keep_dense else None,
                "grad_sum": grad_sum, "grad_sq_sum": sq_sum, "finite": finite}

    def finalize(self, state: dict, weights: Mapping[str, jax.Array], *, num_samples: int,
                 requested: int | None = None, scope=None, damping: float = 1e-6,
                 relative_damping: bool = False, total_params: int = 0) -> Stats:
        """The :class:`Stats` of ``num_samples`` accumulated samples, with the inverse
        diagonals for ``(damping, relative_damping)`` computed and cached.

        ``weights``: ``{layer: W [out, in]}`` (the matrix each statistic refers to).
        Warns when fewer than ``requested`` samples were seen; ``ValueError`` when none
        were, or naming the layers whose statistics, factors or inverse diagonals hold
        NaN/inf.
        """
        _check_samples(num_samples, requested)
        bad = [n for n, ok in jax.device_get(state["finite"]).items() if not ok]
        if bad:
            raise ValueError(
                f"non-finite (NaN/inf) calibration statistics in layer(s) {bad}; check the "
                "model (overflow in low precision?) and the calibration data (labels, masks)")
        stats = Stats(
            layers=self._layers(state, weights, num_samples),
            scope=scope, num_samples=int(num_samples), factor=self.factor,
            factor_kind=self.factor_kind, num_partition=self.num_partition,
            damping=float(damping), relative_damping=bool(relative_damping),
            total_params=int(total_params), partitions=self.partitions)
        bad = _nonfinite_layers(stats, stats.inv_diags())
        if bad:
            raise ValueError(
                f"non-finite (NaN/inf) factors or inverse-curvature diagonals in layer(s) {bad}; "
                "increase `damping` or use relative_damping=True")
        return stats

    def _finish_factors(self, state: dict) -> list:
        """The stacked factors in ``factor_kind``: dense accumulators compressed to HODLR
        (``curvature.from_dense``, a few slots at a time) when accumulated exactly."""
        if self.accumulate_kind == self.factor_kind:
            return state["factors"]
        return [jax.jit(lambda fs, p=g.num_partition: jax.lax.map(
            lambda f: curvature.from_dense(f.mat, p), fs, batch_size=TOKEN_SLOT_BATCH))(fs)
            for g, fs in zip(self.groups, state["factors"])]

    def _layers(self, state: dict, weights, num_samples: int) -> dict[str, LayerStats]:
        """One :class:`LayerStats` per layer: its factor slots unstacked, dense factors when
        kept, ``grad_mean = grad_sum / N`` (and ``grad_sq_mean = grad_sq_sum / N``)."""
        factors = self._finish_factors(state)
        layers = {n: LayerStats(name=n, weight=weights[n], num_samples=num_samples)
                  for n, _ in self.shapes}
        for k, g in enumerate(self.groups):
            for j, (n, which) in enumerate(g.slots):
                h = jax.tree.map(lambda x: x[j], factors[k])
                setattr(layers[n], which, h)
                if self.keep_dense:
                    setattr(layers[n], which + "_dense", state["dense"][k][j])
                elif self.factor_kind == "dense":
                    setattr(layers[n], which + "_dense", curvature.to_dense(h))
        inv_n = 1.0 / num_samples
        for n, s in layers.items():
            s.grad_mean = state["grad_sum"][n] * inv_n
            if self.per_sample:
                s.grad_sq_mean = state["grad_sq_sum"][n] * inv_n
        return layers


def _check_samples(seen: int, requested: int | None) -> None:
    if seen == 0:
        raise ValueError("no calibration samples: `batches` yielded nothing")
    if requested is not None and seen < requested:
        warnings.warn(
            f"only {seen} calibration samples were available ({requested} requested); "
            "the statistics use those", stacklevel=4)


def _nonfinite_layers(layers: Mapping[str, LayerStats], invs: Mapping[str, Any]) -> list[str]:
    """Layers whose factors or inverse diagonals hold NaN/inf (checked on the host: a few MB
    for a 135M model, and no compilation per layer shape)."""
    return [n for n, s in layers.items()
            if not all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves((s.A, s.G, invs[n])))]
