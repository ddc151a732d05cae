"""Sylva for any JAX model: statistics capture and sparse training by interpreting the
traced program, without touching the model's code.

A loss ``fn(params, *args)`` (Flax Linen ``model.apply``, Flax NNX ``nnx.merge``, Equinox,
Haiku, a plain function) is traced once to a jaxpr (``jax.make_jaxpr``) with ``params`` as
a pytree argument, so every parameter leaf is a jaxpr input named by its '.'-joined key
path (``sylva_jax.tree``). Each *tracked* leaf ``W`` is followed through size-preserving
structural operations (``transpose``, ``reshape``, ``squeeze``, ``expand_dims``,
``broadcast_in_dim`` without broadcasting, ``copy``) and dtype casts
(``convert_element_type``), into nested programs (``jit``/``pjit``, ``closed_call``,
``remat``/``checkpoint``, ``custom_jvp_call``/``custom_vjp_call`` bodies, ``cond``
branches), to the ``dot_general`` that consumes it. While following, we keep for the
derived value ``V`` an integer array ``idx`` of ``V``'s shape holding, per element, its flat
position in ``W`` (NumPy, at trace time); so the product's weight in ``[out, in]`` terms
(``docs/algorithm.md`` notation ``y = x W^T``) is ``M = W.ravel()[idx_M]`` with ``out`` = the weight
operand's free axes and ``in`` = its contracted axes. ``M`` is a free view of the stored
leaf in one of the adapter layouts:

- ``"out_in"``: ``M = W.reshape(out, in)`` (Hugging Face, ``x @ W.T``);
- ``"in_out"``: ``M = W.reshape(in, out).T`` (Linen ``Dense`` ``[in, out]`` kernels, and
  ``DenseGeneral`` multi-head kernels ``[in, heads, head_dim]`` / ``[heads, head_dim, out]``,
  whose contracted axes lead).

The jaxpr is then evaluated by our own interpreter (an ``eval_jaxpr`` variant) that, at the
tracked products, rewrites ``dot_general(X, V)`` as ``x @ M^T`` with ``x = X`` transposed to
``[*free, in]`` and

- for :func:`capture`: taps the product (token mean of ``x`` per sample, a zero probe added
  to ``y`` whose gradient is the per-sample sum of ``dL/dy``; ``docs/algorithm.md`` §1);
- for :func:`sparsify`: computes it with :func:`sylva_jax.ops.embedded_linear` through the
  adapter's ``linear_fn`` hook (dense forward, ``sdd`` tile gradients; §5).

Every other equation is re-bound unchanged; nested programs that no tracked weight enters
are re-bound as they are (their custom derivative rules kept). A tracked leaf that the
interpreter cannot follow (used by any other operation: a ``gather`` for a tied embedding,
an elementwise scale, a slice of a fused weight, a ``scan``/``while`` body for stacked
layers, a batched ``dot_general``) is *reported* with the reason: :func:`capture` and
:func:`sparsify` raise :class:`UnfollowedParameterError` naming it; :func:`find_products`
returns the list. Nothing in scope is ever silently left dense.

Limits: parameters used inside ``scan``/``while`` (layers stacked and scanned, e.g. Linen
``nn.scan``) are rejected (unroll the layers or exclude them from the scope). A custom
derivative (``custom_jvp``/``custom_vjp``) whose body contains a tracked product is inlined,
so that body is differentiated by JAX's own rules (its forward value is unchanged).
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import math
from typing import Any, Callable, Iterable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from sylva_jax import tree as tree_lib
from sylva_jax.scope import match_scope
from sylva_jax.statistics import FACTOR_KINDS, FACTORS, Stats, StatsAccumulator, check_choice

try:  # public home of the jaxpr types (jax >= 0.4.30); jax.core kept them before
    from jax.extend import core as _jcore
except ImportError:  # pragma: no cover - very old jax
    from jax import core as _jcore

__all__ = [
    "Product",
    "UnfollowedParameterError",
    "find_products",
    "capture",
    "capture_stats",
    "sparsify",
]

_Literal = _jcore.Literal
_ClosedJaxpr = _jcore.ClosedJaxpr

# Primitive names across jax versions (0.4.x used "pjit", "checkpoint", "custom_vjp_call_jaxpr").
_CALLS = frozenset({"pjit", "jit", "closed_call", "core_call"})
_REMATS = frozenset({"remat2", "checkpoint", "remat"})   # + "call_hi_primitive" (remat3)
_CUSTOM = frozenset({"custom_jvp_call", "custom_jvp_call_jaxpr", "custom_vjp_call",
                     "custom_vjp_call_jaxpr"})
_LOOPS = frozenset({"scan", "while"})
_RESHAPES = frozenset({"reshape", "squeeze", "expand_dims", "broadcast_in_dim"})
_IDENTITY = frozenset({"copy", "copy_p", "optimization_barrier"})

_TRACKED_MSG = {
    "scan": "used inside a `scan` body (layers stacked and scanned): not supported; unroll "
            "the layers (a Python loop instead of nn.scan / lax.scan) or leave it out of scope",
    "while": "used inside a `while`/`fori_loop` body: not supported; unroll the loop or leave "
             "it out of scope",
}


class Product(NamedTuple):
    """One matrix product whose weight operand is a tracked parameter leaf.

    path: the leaf's '.'-joined key path; shape: ``(out, in)`` of its matrix view ``M``;
    layout: ``"out_in"`` / ``"in_out"`` (how ``M`` sits in the stored leaf) or ``None``
    (an axis order no adapter layout can tile); x_shape: the leading (token) shape of the
    other operand as ``[*lead, in]`` in the traced program; where: the nesting
    (``"jit/remat2"``, ``""`` at top level).
    """

    path: str
    shape: tuple
    layout: str | None
    x_shape: tuple
    where: str


class UnfollowedParameterError(ValueError):
    """A parameter in scope reaches an operation the interpreter cannot rewrite.

    ``unfollowed``: ``{path: [reason, ...]}``.
    """

    def __init__(self, unfollowed: Mapping[str, list], what: str):
        self.unfollowed = dict(unfollowed)
        lines = "\n  ".join(f"{p}: {'; '.join(dict.fromkeys(r))}" for p, r in self.unfollowed.items())
        super().__init__(
            f"{what}: these parameters in scope cannot be followed to a matrix product, so "
            f"they would silently stay dense:\n  {lines}\nNarrow the scope (or the adapter's "
            "masks) to exclude them, or change how the model uses them.")


class _Tag(NamedTuple):
    """A value derived from a tracked leaf: ``value = casts(W.ravel()[idx])``."""

    path: str
    idx: np.ndarray       # int64, the value's shape
    casts: tuple          # dtypes applied in order


def _sub_jaxpr(eqn):
    """``(Jaxpr, consts)`` of a call-like equation (pjit, closed_call, remat, custom_*)."""
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        if key in eqn.params:
            j = eqn.params[key]
            if isinstance(j, _ClosedJaxpr):
                return j.jaxpr, list(j.consts)
            return j, []
    raise KeyError(f"no sub-program found in {eqn.primitive.name} (params {list(eqn.params)})")


def _bind(eqn, invals):
    got = eqn.primitive.get_bind_params(eqn.params)
    # jax >= 0.7 returns the bind params; older jax returned (subfuns, params)
    subfuns, params = got if isinstance(got, tuple) else ((), got)
    ctx = getattr(eqn, "ctx", None)
    with (ctx.manager if ctx is not None else contextlib.nullcontext()):
        out = eqn.primitive.bind(*subfuns, *invals, **params)
    return out if eqn.primitive.multiple_results else [out]


def _matrix_layout(idx_m: np.ndarray) -> str | None:
    out, inn = idx_m.shape
    ar = np.arange(out * inn)
    if np.array_equal(idx_m.reshape(-1), ar):
        return "out_in"
    if np.array_equal(idx_m.T.reshape(-1), ar):
        return "in_out"
    return None


def _matrix(leaf, idx_m: np.ndarray, layout: str | None):
    """``M [out, in] = leaf.ravel()[idx_m]`` (a reshape / transpose when ``layout`` is set)."""
    out, inn = idx_m.shape
    if layout == "out_in":
        return leaf.reshape(out, inn)
    if layout == "in_out":
        return leaf.reshape(inn, out).T
    return jnp.take(leaf.reshape(-1), jnp.asarray(idx_m))


class _Interpreter:
    """Evaluates a jaxpr, following tracked leaves to their products.

    mode: ``"analyse"`` (record products and unfollowed uses; every nested program
    inlined, every ``cond`` branch visited), ``"capture"`` (same inlining; ``tap(path, x, y,
    gate) -> y`` at each tracked product, ``y`` the original product in ``[*lead, out]``),
    ``"train"`` (``hook(path, x, M, None) -> y`` replaces each tracked product; ``remat``
    kept as ``jax.checkpoint`` and ``cond`` as ``lax.switch``).
    """

    def __init__(self, roots: Mapping[str, Any], *, mode: str, tap=None, hook=None):
        self.roots = roots          # {path: leaf value} of tracked leaves
        self.mode = mode
        self.tap = tap
        self.hook = hook
        self.products: dict[str, list[Product]] = {}
        self.unfollowed: dict[str, list[str]] = {}
        self._where: list[str] = []
        self._gate = None           # capture: 1.0 on the taken cond branch, 0.0 elsewhere

    def _bad(self, tag: _Tag, reason: str):
        where = "/".join(self._where)
        self.unfollowed.setdefault(tag.path, []).append(
            reason + (f" (inside {where})" if where else ""))

    # -- the evaluator --------------------------------------------------------------------
    def run(self, jaxpr, consts, args, arg_tags):
        """Returns ``(outs, out_tags)``; ``arg_tags[i]`` is a :class:`_Tag` or ``None``."""
        env: dict = {}
        tags: dict = {}

        def read(v):
            return v.val if isinstance(v, _Literal) else env[v]

        for v, c in zip(jaxpr.constvars, consts):
            env[v] = c
        for v, a, t in zip(jaxpr.invars, args, arg_tags):
            env[v] = a
            if t is not None:
                tags[v] = t
        for eqn in jaxpr.eqns:
            in_tags = [None if isinstance(v, _Literal) else tags.get(v) for v in eqn.invars]
            invals = [read(v) for v in eqn.invars]
            if not any(t is not None for t in in_tags):
                outs, out_tags = _bind(eqn, invals), None
            else:
                outs, out_tags = self._tracked(eqn, invals, in_tags)
            for i, (v, o) in enumerate(zip(eqn.outvars, outs)):
                env[v] = o
                if out_tags is not None and out_tags[i] is not None:
                    tags[v] = out_tags[i]
        outs = [read(v) for v in jaxpr.outvars]
        out_tags = [None if isinstance(v, _Literal) else tags.get(v) for v in jaxpr.outvars]
        return outs, out_tags

    def _tracked(self, eqn, invals, in_tags):
        name = eqn.primitive.name
        if name == "dot_general":
            return self._dot(eqn, invals, in_tags), None
        if name in _IDENTITY:
            return _bind(eqn, invals), list(in_tags)
        if name == "convert_element_type" or name in _RESHAPES:
            outs = _bind(eqn, invals)
            return outs, [self._follow(eqn, in_tags[0], outs[0])]
        if name == "transpose":
            t = in_tags[0]
            outs = _bind(eqn, invals)
            return outs, [t._replace(idx=np.transpose(t.idx, eqn.params["permutation"]))]
        if name in _CALLS or name in _CUSTOM:
            sub, consts = _sub_jaxpr(eqn)
            return self._nested(name, sub, consts, invals, in_tags)
        if name in _REMATS:
            sub, consts = _sub_jaxpr(eqn)
            kw = {k: eqn.params[k] for k in ("prevent_cse", "policy") if k in eqn.params}
            return self._remat(name, sub, consts, invals, in_tags, kw)
        prim = eqn.params.get("_prim") if name == "call_hi_primitive" else None
        if prim is not None and "remat" in type(prim).__name__.lower() and \
                hasattr(prim, "jaxpr"):
            # jax_remat3 (jax >= 0.10 option): remat staged as a "hi" primitive holding
            # the body jaxpr and the policy
            j = prim.jaxpr
            sub, consts = (j.jaxpr, list(j.consts)) if isinstance(j, _ClosedJaxpr) else (j, [])
            return self._remat("remat3", sub, consts, invals, in_tags,
                               {"policy": getattr(prim, "policy", None)})
        if name == "cond":
            return self._cond(eqn, invals, in_tags)
        for t in in_tags:
            if t is not None:
                self._bad(t, _TRACKED_MSG.get(name, f"used by `{name}`, which is not a "
                                                    "matrix product"))
        return _bind(eqn, invals), None

    def _follow(self, eqn, tag, out):
        """Tag of a reshape-like or cast output (None and reported if it changes size)."""
        if tag is None:
            return None
        if eqn.primitive.name == "convert_element_type":
            return tag._replace(casts=tag.casts + (eqn.params["new_dtype"],))
        if math.prod(out.shape) != tag.idx.size:
            self._bad(tag, f"broadcast by `{eqn.primitive.name}` (the weight would be repeated)")
            return None
        idx = tag.idx
        dims = eqn.params.get("dimensions") if eqn.primitive.name == "reshape" else None
        if dims is not None:
            idx = np.transpose(idx, dims)
        return tag._replace(idx=idx.reshape(out.shape))

    def _nested(self, name, sub, consts, invals, in_tags):
        self._where.append(name)
        try:
            return self.run(sub, consts, invals, in_tags)
        finally:
            self._where.pop()

    def _remat(self, name, sub, consts, invals, in_tags, kw):
        """Inlined for analysis/capture; kept as ``jax.checkpoint`` when training."""
        if self.mode != "train":
            return self._nested(name, sub, consts, invals, in_tags)
        holder = {}

        def body(*args):
            outs, out_tags = self._nested(name, sub, consts, args, in_tags)
            holder["tags"] = out_tags
            return outs

        outs = jax.checkpoint(body, **kw)(*invals)
        return list(outs), holder.get("tags")

    def _cond(self, eqn, invals, in_tags):
        index, ops, op_tags = invals[0], invals[1:], in_tags[1:]
        if in_tags[0] is not None:
            self._bad(in_tags[0], "used as a `cond` predicate")
        branches = eqn.params["branches"]
        self._where.append("cond")
        try:
            if self.mode == "train":
                def branch(k, *args):
                    outs, out_tags = self.run(branches[k].jaxpr, branches[k].consts, args,
                                              op_tags)
                    for t in out_tags:
                        if t is not None:
                            self._bad(t, "returned from a `cond` branch")
                    return outs

                fns = [functools.partial(branch, k) for k in range(len(branches))]
                return list(jax.lax.switch(index, fns, *ops)), None
            # analyse / capture: every branch, outputs selected by the index, taps gated
            outer, results = self._gate, []
            index = jnp.asarray(index).astype(jnp.int32)
            for k, br in enumerate(branches):
                on = (index == k).astype(jnp.float32)
                self._gate = on if outer is None else outer * on
                outs, out_tags = self.run(br.jaxpr, br.consts, ops, op_tags)
                for t in out_tags:
                    if t is not None:
                        self._bad(t, "returned from a `cond` branch")
                results.append(outs)
            self._gate = outer
            return [jax.lax.select_n(index, *cases) for cases in zip(*results)], None
        finally:
            self._where.pop()

    # -- the tracked product --------------------------------------------------------------
    def _dot(self, eqn, invals, in_tags):
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        lt, rt = in_tags
        if lt is not None and rt is not None:
            for t in (lt, rt):
                self._bad(t, "multiplied by another tracked parameter")
            return _bind(eqn, invals)
        if lb or rb:
            self._bad(lt or rt, "a batched `dot_general` (weight with batch axes)")
            return _bind(eqn, invals)
        side = 0 if lt is not None else 1
        tag = lt if side == 0 else rt
        X, V = invals[1 - side], invals[side]
        wc, xc = (lc, rc) if side == 0 else (rc, lc)
        wc, xc = tuple(int(a) for a in wc), tuple(int(a) for a in xc)
        wf = tuple(a for a in range(V.ndim) if a not in wc)
        xf = tuple(a for a in range(X.ndim) if a not in xc)
        w_free = tuple(V.shape[a] for a in wf)
        x_free = tuple(X.shape[a] for a in xf)
        out, inn = math.prod(w_free), math.prod(V.shape[a] for a in wc)
        idx_m = np.transpose(tag.idx, wf + wc).reshape(out, inn)
        layout = _matrix_layout(idx_m)
        self.products.setdefault(tag.path, []).append(
            Product(tag.path, (out, inn), layout, x_free, "/".join(self._where)))
        out_aval = eqn.outvars[0].aval

        def x2d():
            x = X if xf + xc == tuple(range(X.ndim)) else jnp.transpose(X, xf + xc)
            return x.reshape(x_free + (inn,))

        def to_2d(y):       # dot_general output -> [*x_free, out]
            if side == 0:   # output axes (w_free, x_free)
                nw = len(w_free)
                y = jnp.transpose(y, tuple(range(nw, y.ndim)) + tuple(range(nw)))
            return y.reshape(x_free + (out,))

        def from_2d(y):
            y = y.reshape(x_free + w_free)
            if side == 0:
                nx = len(x_free)
                y = jnp.transpose(y, tuple(range(nx, y.ndim)) + tuple(range(nx)))
            return y

        if self.mode == "capture":
            (y,) = _bind(eqn, invals)
            return [from_2d(self.tap(tag.path, x2d(), to_2d(y), self._gate)).astype(y.dtype)]
        if self.mode == "train":
            m = _matrix(self.roots[tag.path], idx_m, layout)
            for dt in tag.casts:
                m = m.astype(dt)
            x = x2d()
            if jnp.issubdtype(out_aval.dtype, jnp.inexact) and x.dtype != out_aval.dtype:
                # the product was asked in a wider type (preferred_element_type): compute in it
                x = x.astype(out_aval.dtype)
            return [from_2d(self.hook(tag.path, x, m, None)).astype(out_aval.dtype)]
        return _bind(eqn, invals)


# --------------------------------------------------------------------------------------
# Tracing
# --------------------------------------------------------------------------------------


def _is_array(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray, np.generic))


class _Traced(NamedTuple):
    jaxpr: Any                 # ClosedJaxpr
    dyn: list                  # dynamic leaf values, in jaxpr invar order
    names: dict                # {param path: invar position}
    out_tree: Any


def _trace(fn, params, args) -> _Traced:
    """``fn(params, *args)`` as a jaxpr whose inputs are the array leaves of
    ``(params, args)``; non-array leaves (Python scalars, strings) stay static."""
    leaves, treedef = jax.tree.flatten((params, tuple(args)))
    is_dyn = [_is_array(x) for x in leaves]

    def flat_fn(*dyn):
        it = iter(dyn)
        full = [next(it) if d else x for x, d in zip(leaves, is_dyn)]
        p, a = jax.tree.unflatten(treedef, full)
        return fn(p, *a)

    dyn = [x for x, d in zip(leaves, is_dyn) if d]
    closed, shape = jax.make_jaxpr(flat_fn, return_shape=True)(*dyn)
    names, pos = {}, 0
    flat_params = tree_lib.flatten(params)
    for (name, leaf) in flat_params.items():
        if _is_array(leaf):
            names[name] = pos
            pos += 1
    return _Traced(closed, dyn, names, jax.tree.structure(shape))


def _arg_tags(traced: _Traced, tracked: Iterable[str]) -> list:
    tags = [None] * len(traced.dyn)
    for path in tracked:
        i = traced.names[path]
        shape = np.shape(traced.dyn[i])
        tags[i] = _Tag(path, np.arange(math.prod(shape), dtype=np.int64).reshape(shape), ())
    return tags


def _analyse(traced: _Traced, tracked) -> _Interpreter:
    interp = _Interpreter({}, mode="analyse")
    tags = _arg_tags(traced, tracked)
    avals = [jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x)) for x in traced.dyn]
    jax.eval_shape(lambda *d: interp.run(traced.jaxpr.jaxpr, traced.jaxpr.consts, d, tags)[0],
                   *avals)
    for path in tracked:
        if path not in interp.products and path not in interp.unfollowed:
            interp.unfollowed[path] = ["never reaches a matrix product (not a linear-layer "
                                       "weight, or unused by fn)"]
    return interp


def _candidates(params) -> dict[str, Any]:
    """Parameter leaves that can be weight matrices (arrays with at least 2 dimensions)."""
    return {n: x for n, x in tree_lib.flatten(params).items() if _is_array(x) and np.ndim(x) >= 2}


def find_products(fn: Callable, params, *args, scope=None):
    """Which parameter leaves ``fn(params, *args)`` uses as matrix-product weights.

    Args:
      fn: any function of a parameter pytree (and arrays ``args``).
      params: the parameter pytree; leaves are named by ``sylva_jax.tree.flatten``.
      scope: which leaves to follow (``sylva_jax.scope.match_scope`` syntax); ``None``: every leaf
        with at least two dimensions.

    Returns:
      ``(products, unfollowed)``: ``{path: [Product, ...]}`` for the leaves followed to
      their products, ``{path: [reason, ...]}`` for the leaves in scope that are used some
      other way too (or only); a leaf can be in both.
    """
    names = list(_candidates(params))
    tracked = names if scope is None else match_scope(scope, names)
    interp = _analyse(_trace(fn, params, args), tracked)
    return interp.products, interp.unfollowed


# --------------------------------------------------------------------------------------
# sparsify (docs/algorithm.md §5)
# --------------------------------------------------------------------------------------


def sparsify(fn: Callable, adapter, *, backend: str = "auto") -> Callable:
    """``g(tiles, params, *args)``: ``fn(params, *args)`` whose products with adapted
    weights run through :func:`sylva_jax.ops.embedded_linear`.

    Args:
      fn: ``fn(params, *args) -> any pytree`` (typically the scalar loss), unchanged user
        code; ``args`` are arrays (pytrees of arrays); Python scalars among them are static.
      adapter: a :class:`sylva_jax.adapter.Adapter` built from the same parameters
        (``layout="in_out"`` for Linen/NNX ``[in, out]`` kernels, ``"out_in"`` for
        ``[out, in]`` weights used as ``x @ W.T``).
      backend: SDD backend for the tile gradients (``sylva_jax.ops.sdd``).

    Returns:
      ``g(tiles, params, *args)`` with ``tiles = {path: [nnz, bs, bs]}`` (as
      ``adapter.tiles(params)``). Its value equals ``fn(params, *args)`` (the forward is the
      dense product; ``tiles`` must be the tiles of ``params`` for gradients to be the true
      ones); ``jax.grad`` w.r.t. ``tiles`` gives exactly the tile gradients, computed as
      ``sdd`` products with no dense ``[out, in]`` weight gradient. Adapted weights get no
      gradient through ``params`` (they are frozen there); other leaves differentiate as in
      ``fn``. Works under ``jax.jit``, ``jax.grad`` and ``jax.vmap`` (of the batch).

    Raises:
      UnfollowedParameterError: an adapted weight is used by something other than matrix
        products (tied embedding, scaled weight, scanned layers, ...) or never used.
      ValueError: an adapted weight is used in an axis order that the adapter's layout does
        not describe, or with a shape other than the adapter's.
    """
    paths = tuple(adapter.paths)
    if not paths:
        raise ValueError("the adapter has no trainable tiles (all masks empty); nothing to "
                         "sparsify")

    def g(tiles, params, *args):
        traced = _trace(fn, params, args)
        flat = tree_lib.flatten(params)
        missing = [p for p in paths if p not in traced.names]
        if missing:
            raise KeyError(f"params lack adapted weight(s) {missing}; pass the parameter tree "
                           "the adapter was built from")
        _check_adapted(traced, paths, adapter, flat)
        interp = _Interpreter({p: flat[p] for p in paths}, mode="train",
                              hook=adapter.linear_fn(tiles, backend=backend))
        outs, _ = interp.run(traced.jaxpr.jaxpr, traced.jaxpr.consts, traced.dyn,
                             _arg_tags(traced, paths))
        if interp.unfollowed:  # cannot happen after _check_adapted; kept as a guard
            raise UnfollowedParameterError(interp.unfollowed, "sparsify")
        return jax.tree.unflatten(traced.out_tree, outs)

    g.__name__ = f"sparsified_{getattr(fn, '__name__', 'fn')}"
    g.__doc__ = f"sparsify({getattr(fn, '__name__', 'fn')}, adapter): g(tiles, params, *args)"
    return g


def _check_adapted(traced, paths, adapter, flat):
    interp = _analyse(traced, paths)
    if interp.unfollowed:
        raise UnfollowedParameterError(interp.unfollowed, "sparsify")
    for p in paths:
        stored = tuple(np.shape(flat[p]))
        if stored != tuple(adapter.shapes[p]):
            raise ValueError(f"weight {p!r} has shape {stored} but the adapter was built for "
                             f"{tuple(adapter.shapes[p])}; build the adapter from these params")
        for prod in interp.products[p]:
            if prod.layout != adapter.layout:
                how = ("an axis order that no adapter layout can tile" if prod.layout is None
                       else f"layout {prod.layout!r}")
                raise ValueError(
                    f"weight {p!r} (stored {stored}) is used by fn as [out, in] = {prod.shape} "
                    f"in {how}, but the adapter has layout {adapter.layout!r}; build the "
                    f"adapter with make_adapter(..., layout={prod.layout!r})"
                    if prod.layout else
                    f"weight {p!r} (stored {stored}) is used by fn as [out, in] = {prod.shape} "
                    f"in {how}; its contracted axes must be the leading (in_out) or trailing "
                    "(out_in) axes of the stored weight")


# --------------------------------------------------------------------------------------
# capture (docs/algorithm.md §1)
# --------------------------------------------------------------------------------------


def _leading_dim(batch, index) -> int:
    sizes = {int(np.shape(x)[0]) for x in jax.tree.leaves(batch) if np.ndim(x) >= 1}
    if len(sizes) != 1:
        raise ValueError(
            f"calibration batch {index}: every array leaf must have the same leading (sample) "
            f"dimension B; got leading sizes {sorted(sizes)}")
    return sizes.pop()


def _token_mask(token_mask, batch, B):
    """``[B, T]`` float32 mask of real tokens, or ``None`` (every position is real)."""
    if token_mask is None:
        return None
    if callable(token_mask):
        m = token_mask(batch)
    elif isinstance(token_mask, str):
        if not isinstance(batch, Mapping) or token_mask not in batch:
            return None
        m = batch[token_mask]
    else:
        raise TypeError(f"token_mask must be None, a batch key or a callable batch -> [B, T]; "
                        f"got {token_mask!r}")
    m = np.asarray(m)
    if m.ndim != 2 or m.shape[0] != B:
        raise ValueError(f"the token mask must be [B, T] with B = {B}; got shape {m.shape}")
    empty = np.nonzero(m.sum(axis=1) == 0)[0]
    if empty.size:
        raise ValueError(f"sample(s) {empty.tolist()} have no real token (token mask all zero); "
                         "drop empty samples from the calibration data")
    return m.astype(np.float32)


def _take(batches, num_samples, token_mask):
    """Yields ``(batch, mask)`` sliced to ``num_samples`` samples in total."""
    seen = 0
    for index, batch in enumerate(batches):
        if seen >= num_samples:
            break
        B = _leading_dim(batch, index)
        take = min(B, num_samples - seen)
        if take < B:
            batch = jax.tree.map(lambda x: x[:take], batch)
        batch = jax.tree.map(lambda x: np.asarray(x) if not _is_array(x) else x, batch)
        seen += take
        yield batch, _token_mask(token_mask, batch, take)


def _make_tap(factor, probes, mask, nb, acts, counts):
    """The capture tap for a traced program seeing ``nb`` samples (1 per-sample, else B).

    At a product ``x [*lead, in]``, ``y [*lead, out]`` with ``prod(lead) = nb * P``
    (sample-major: ``[B, T, ...]`` or ``[B*T, ...]``): records the masked token mean of
    ``x`` (``[nb, in]``; ``[nb, P, in]`` zero at padding for ``"tokens"``) and adds the probe
    ``e [nb, out]`` times the mask to ``y``, so ``dL/de`` is the per-sample sum of ``dL/dy``
    over real tokens (``docs/algorithm.md`` §1)."""

    def tap(path, x, y, gate):
        inn, out = x.shape[-1], y.shape[-1]
        n = math.prod(x.shape[:-1])
        if n % nb:
            raise ValueError(f"product of {path!r}: input leading shape {x.shape[:-1]} does not "
                             f"split into {nb} samples")
        per = n // nb
        if mask is None or per == 1:
            m = jnp.ones((nb, per), jnp.float32)
        elif mask.shape[1] == per:
            m = mask
        else:
            raise ValueError(
                f"product of {path!r} sees {per} positions per sample but the token mask has "
                f"{mask.shape[1]}; pass token_mask=None (all positions real) or a callable "
                "giving the mask that matches this layer's positions")
        g = 1.0 if gate is None else gate
        xf = x.reshape(nb, per, inn).astype(jnp.float32)
        cnt = jnp.maximum(m.sum(axis=1), 1.0)
        if factor == "mean":
            acts[path] = jnp.einsum("bpi,bp->bi", xf, m) / cnt[:, None] * g
            e = probes[path][:, None, :] * m[:, :, None]
        else:
            acts[path] = xf * m[:, :, None] * g
            e = probes[path] * m[:, :, None]
        counts[path] = cnt
        return y + (e * g).reshape(y.shape).astype(y.dtype)

    return tap


def _batch_statistics(traced, products, mode, factor, scoped, dyn, batch_pos, mask):
    """``(acts, grads_y, grads_w)`` for a generic loss, with the shapes and meaning of
    :mod:`sylva_jax.statistics` (what a ``StatsAccumulator`` takes); traceable. ``dyn``: the jaxpr inputs with the batch leaves
    at ``batch_pos``; ``scoped``: {path: leaf} differentiated."""
    B = int(np.shape(dyn[batch_pos[0]])[0])
    per = {p: math.prod(pr[0].x_shape) // (1 if mode == "sample" else B)
           for p, pr in products.items()}
    if factor == "mean":
        probes = {p: jnp.zeros((B, pr[0].shape[0]), jnp.float32) for p, pr in products.items()}
    else:
        probes = {p: jnp.zeros((B, per[p], pr[0].shape[0]), jnp.float32)
                  for p, pr in products.items()}
    tags = _arg_tags(traced, scoped)

    def run_program(ws, ps, batch_leaves, m, nb):
        acts, counts = {}, {}
        interp = _Interpreter(ws, mode="capture",
                              tap=_make_tap(factor, ps, m, nb, acts, counts))
        args = list(dyn)
        for p in ws:
            args[traced.names[p]] = ws[p]
        for i, leaf in zip(batch_pos, batch_leaves):
            args[i] = leaf
        (out,), _ = interp.run(traced.jaxpr.jaxpr, traced.jaxpr.consts, args, tags)
        return out, (acts, counts)

    batch_leaves = [dyn[i] for i in batch_pos]

    def loss_fn(diff):
        ws, ps = diff
        if mode == "per_example":
            out, aux = run_program(ws, ps, batch_leaves, mask, B)
            return out.sum(), aux

        def one(p1, leaves1, m1):  # one sample as a batch of one
            return run_program(ws, jax.tree.map(lambda a: a[None], p1),
                               [a[None] for a in leaves1], None if m1 is None else m1[None], 1)

        outs, (acts, counts) = jax.vmap(one)(ps, batch_leaves, mask)
        acts = {p: a[:, 0] for p, a in acts.items()}
        counts = {p: c[:, 0] for p, c in counts.items()}
        return outs.sum(), (acts, counts)

    (gw, gp), (acts, counts) = jax.grad(loss_fn, has_aux=True)((scoped, probes))
    if factor == "mean":
        gy = {p: g * (1.0 / counts[p])[:, None] for p, g in gp.items()}
    else:
        gy = gp
    gw = {p: _matrix(g, _idx_m(products[p][0], g.shape), products[p][0].layout)
          .astype(jnp.float32) for p, g in gw.items()}
    return acts, gy, gw


def _idx_m(prod: Product, stored_shape) -> np.ndarray:
    out, inn = prod.shape
    ar = np.arange(out * inn)
    return ar.reshape(out, inn) if prod.layout == "out_in" else ar.reshape(inn, out).T


def _check_scope_products(products, unfollowed, chosen):
    bad = {p: list(r) for p, r in unfollowed.items() if p in chosen}
    for p in chosen:
        prods = products.get(p, [])
        if len(prods) > 1:
            bad.setdefault(p, []).append(
                f"used by {len(prods)} matrix products per call (a shared or tied weight): its "
                "per-sample statistics are not defined")
        for pr in prods:
            if pr.layout is None:
                bad.setdefault(p, []).append(
                    f"used as [out, in] = {pr.shape} in an axis order no adapter layout can "
                    "tile (contracted axes neither leading nor trailing)")
    if bad:
        raise UnfollowedParameterError(bad, "capture")


def capture(
    fn: Callable,
    params,
    batches: Iterable[Any],
    *,
    scope,
    num_samples: int = 128,
    token_mask="attention_mask",
    num_partition: int = 8,
    factor: str = "mean",
    factor_kind: str = "hodlr",
    damping: float = 1e-6,
    relative_damping: bool = False,
    keep_dense: bool = False,
    token_update: str = "auto",
    per_sample: bool = False,
) -> Stats:
    """Calibration statistics for any model (``docs/algorithm.md`` §1).

    The same :class:`sylva_jax.statistics.Stats` as :func:`sylva_jax.capture.preprocess`
    (``select_blocks`` / ``compute_masks`` consume it unchanged), for the products found by
    interpreting ``fn`` (see the module docstring), with layer names = parameter paths and
    every statistic in ``[out, in]`` terms of the product's matrix view.

    Args:
      fn: ``fn(params, batch)`` returning either
        - a scalar loss: the per-sample loss is then ``L_n = fn(params, sample n as a batch of
          one)`` (evaluated with ``jax.vmap`` over the samples of each batch, so batches of any
          size give the same statistics as batches of one); or
        - a vector ``[B]`` of per-sample losses (faster: no ``vmap``; the samples must not
          interact, e.g. no batch norm). ``L_n`` is its entry ``n``.
      params: parameter pytree (nested dict, NNX ``State``, ...).
      batches: iterable of batch pytrees whose array leaves share the leading sample axis
        ``B``; consumed until ``num_samples`` samples (the last batch is sliced).
      scope: which parameter leaves (``sylva_jax.scope.match_scope`` syntax, matched against the
        paths of leaves with at least 2 dimensions).
      token_mask: which positions are real tokens for the token means: a batch key (default
        ``"attention_mask"``; a batch without it has every position real), a callable
        ``batch -> [B, T]``, or ``None`` (every position real). A product whose input has
        ``P`` positions per sample uses the mask when ``P == T``, and no mask when ``P == 1``.
      num_partition, factor, factor_kind, damping, relative_damping, keep_dense,
        token_update: as :func:`sylva_jax.capture.preprocess`.
      per_sample: not supported here (``ValueError``): per-sample squared gradients (for
        the ``fisher`` / ``adam_gain`` scorers) come from ``capture.preprocess`` only.

    Per sample ``n`` and tracked product ``y = x M^T`` (``x [*lead, in]``, leading axes
    sample-major): ``a_n`` = mean of ``x`` over the sample's real positions, ``g_n`` = mean of
    ``dL_n/dy`` over them, ``grad_mean = (1/N) sum_n dL_n/dM``; factors get one rank-1
    update per sample (``factor="mean"``) or per real token (``"tokens"``).

    Raises:
      UnfollowedParameterError: a leaf in scope is used other than by exactly one matrix
        product (tied/shared, gather, scan, scaled, ...), or never.
      ValueError: no samples, bad batches or masks, non-finite statistics.
    """
    _check_args(factor, factor_kind, num_samples, per_sample)
    chosen = match_scope(scope, list(_candidates(params)))
    it = _take(batches, int(num_samples), token_mask)
    first = next(it, None)
    if first is None:
        raise ValueError("no calibration samples: `batches` yielded nothing")
    programs = _Programs(fn, params, chosen, _loss_mode(fn, params, first[0]))
    products0 = programs.program(first[0])[1]
    flat = tree_lib.flatten(params)
    scoped = {p: flat[p] for p in chosen}
    acc = StatsAccumulator.create(
        {p: products0[p][0].shape for p in chosen}, num_partition=num_partition, factor=factor,
        factor_kind=factor_kind, keep_dense=keep_dense, token_update=token_update)
    state, seen = _accumulate(programs, acc, scoped, itertools.chain([first], it))
    matrices = {p: _matrix(scoped[p], _idx_m(products0[p][0], None), products0[p][0].layout)
                for p in chosen}
    return acc.finalize(
        state, matrices, num_samples=seen, requested=num_samples, scope=scope,
        damping=damping, relative_damping=relative_damping,
        total_params=sum(np.size(x) for x in flat.values() if _is_array(x)))


def _check_args(factor, factor_kind, num_samples, per_sample) -> None:
    check_choice("factor", factor, FACTORS)
    check_choice("factor_kind", factor_kind, FACTOR_KINDS)
    if int(num_samples) < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if per_sample:
        raise ValueError(
            "per_sample=True (per-sample squared gradients, for the fisher / adam_gain "
            "scorers) is not supported by anymodel.capture; use capture.preprocess with a "
            "model routing its linear layers through linear_fn, or another scorer")


def _accumulate(programs, acc: StatsAccumulator, scoped, batches) -> tuple[dict, int]:
    """The accumulator state after every ``(batch, mask)`` and the number of samples seen."""
    state, seen = acc.init(), 0
    for batch, mask in batches:
        step, traced, batch_pos = programs.step(acc, batch, mask is not None)
        B = _leading_dim(batch, seen)
        dyn = list(traced.dyn)
        for i, leaf in zip(batch_pos, jax.tree.leaves(batch)):
            dyn[i] = leaf
        state = step(state, scoped, dyn, mask)
        seen += B
    return state, seen


def _loss_mode(fn, params, batch0) -> str:
    """``"sample"`` for a scalar loss (evaluated per sample), ``"per_example"`` for ``[B]``."""
    out = jax.eval_shape(fn, params, batch0)
    B0 = _leading_dim(batch0, 0)
    if not hasattr(out, "shape") or out.shape not in ((), (B0,)):
        raise ValueError(
            f"fn(params, batch) must return a scalar loss or a [B] vector of per-sample losses "
            f"(B = {B0}); got {jax.tree.map(lambda s: s.shape, out)}")
    return "sample" if out.shape == () else "per_example"


class _Programs:
    """The traced program of ``fn`` (and its tracked products) per batch structure and
    shape, and the jitted accumulation step per batch structure, shape and mask presence."""

    def __init__(self, fn, params, chosen, mode: str):
        self.fn, self.params, self.chosen, self.mode = fn, params, chosen, mode
        self._programs: dict = {}
        self._steps: dict = {}

    def program(self, batch):
        """``(traced, products, batch positions)``; checks the scope's products once."""
        ex = jax.tree.map(lambda a: a[:1], batch) if self.mode == "sample" else batch
        key = (jax.tree.structure(batch),
               tuple((np.shape(a), str(jnp.result_type(a))) for a in jax.tree.leaves(batch)))
        if key not in self._programs:
            traced = _trace(self.fn, self.params, (ex,))
            interp = _analyse(traced, self.chosen)
            _check_scope_products(interp.products, interp.unfollowed, self.chosen)
            batch_pos = list(range(len(traced.names), len(traced.dyn)))
            self._programs[key] = (traced, interp.products, batch_pos)
        return self._programs[key]

    def step(self, acc: StatsAccumulator, batch, has_mask: bool):
        """``(jitted step(state, scoped, dyn, mask) -> state, traced, batch positions)``."""
        traced, products, batch_pos = self.program(batch)
        key = (jax.tree.structure(batch), tuple(np.shape(a) for a in jax.tree.leaves(batch)),
               has_mask)
        if key not in self._steps:
            mode = self.mode

            def step(state, scoped, dyn, mask):
                acts, gy, gw = _batch_statistics(traced, products, mode, acc.factor, scoped,
                                                 dyn, batch_pos, mask)
                return acc.update(state, acts, gy, gw)

            self._steps[key] = jax.jit(step, donate_argnums=0)
        return self._steps[key], traced, batch_pos


capture_stats = capture
