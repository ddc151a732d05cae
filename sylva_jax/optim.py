"""Sparse AdamW over the trainable tiles (docs/algorithm.md, section 4).

Two interchangeable paths with the same state (:class:`SparseAdamWState`):

- :func:`sparse_adamw`: an optax ``GradientTransformation`` over the tiles pytree
  ``{path: [nnz, bs, bs]}``; its updates go into the weights with
  :meth:`sylva_jax.adapter.Adapter.apply_updates` (an XLA scatter, in place under jit with
  donation). Composable with ``optax.chain`` (clipping, ...). Works everywhere.
- :func:`fused_sparse_adamw_step` / :func:`fused_sparse_adamw_update`: one step that
  reads the tiles of ``W``, updates ``m`` and ``v`` and writes the tiles back into ``W``
  in place, chosen for the platform lowered for: on a GPU a Pallas kernel compiled by
  Triton (one program per tile, ``W`` aliased to the output, only the tiles stored); on
  a TPU and a CPU the XLA gather / scatter of the same formula. The Pallas kernel has no
  TPU form (its whole-``W`` block would be a VMEM buffer written back in full, garbage
  outside the tiles): ``interpret=False`` on a TPU is refused at lowering.

:func:`traced_learning_rate` makes the (peak) learning rate of any optimizer a value of its
state (:func:`learning_rate_of`, :func:`with_learning_rate`): one compiled step, any rate.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import pallas as pl

from sylva_jax import tree as tree_lib
from sylva_jax.kernels.platform import by_platform, refused
from sylva_jax.kernels.sdd_pallas import triton_params

__all__ = ["SparseAdamWState", "sparse_adamw", "fused_sparse_adamw_step",
           "fused_sparse_adamw_update", "traced_learning_rate", "learning_rate_of",
           "with_learning_rate"]

ScalarOrSchedule = Union[float, jax.Array, Callable[[jax.Array], jax.Array]]


class SparseAdamWState(NamedTuple):
    """``count``: int32 scalar, updates done so far; ``mu``, ``nu``: pytrees like the tiles
    (``[nnz, bs, bs]`` per weight), float32 unless ``mu_dtype`` is given for ``mu``."""

    count: jax.Array
    mu: Any
    nu: Any


def _lr_at(learning_rate: ScalarOrSchedule, count):
    return learning_rate(count) if callable(learning_rate) else learning_rate


def _check_hparams(b1, b2, eps, weight_decay):
    if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
        raise ValueError(f"betas must lie in [0, 1); got b1={b1}, b2={b2}")
    if eps < 0 or weight_decay < 0:
        raise ValueError(f"eps and weight_decay must be >= 0; got eps={eps}, "
                         f"weight_decay={weight_decay}")


def sparse_adamw(learning_rate: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999,
                 eps: float = 1e-6, weight_decay: float = 0.0, *,
                 mu_dtype=None) -> optax.GradientTransformation:
    """AdamW with decoupled weight decay (Loshchilov & Hutter, "Decoupled Weight Decay
    Regularization", ICLR 2019) over the tiles pytree.

    With ``g`` the tile gradient, ``p`` the current tile and ``t`` the 1-based step:
    ``m <- b1 m + (1 - b1) g``, ``v <- b2 v + (1 - b2) g^2``,
    ``m_hat = m / (1 - b1^t)``, ``v_hat = v / (1 - b2^t)``, and the returned update is
    ``-lr_t * (m_hat / (sqrt(v_hat) + eps) + weight_decay * p)`` (add it with
    ``adapter.apply_updates``). Equal to ``optax.adamw(lr, b1, b2, eps, weight_decay)`` on
    the tiles. Defaults are the published Sylva ones (eps 1e-6, no weight decay).

    Args:
      learning_rate: a float or an optax schedule ``count -> lr`` (evaluated at the
        number of updates done before this one, as optax does).
      mu_dtype: dtype of ``m`` (default float32). ``v`` and all arithmetic are float32:
        the state covers only the ``nnz`` tiles, so full precision is cheap.

    ``update(grads, state, params)`` needs ``params`` (the current tiles,
    ``adapter.tiles(params)``) when ``weight_decay > 0``. Updates come back in the
    gradients' dtype.
    """
    _check_hparams(b1, b2, eps, weight_decay)
    mdt = jnp.dtype(mu_dtype) if mu_dtype is not None else jnp.float32

    def init_fn(params):
        return SparseAdamWState(
            count=jnp.zeros([], jnp.int32),
            mu=jax.tree_util.tree_map(lambda t: jnp.zeros(t.shape, mdt), params),
            nu=jax.tree_util.tree_map(lambda t: jnp.zeros(t.shape, jnp.float32), params),
        )

    def update_fn(updates, state, params=None):
        if weight_decay and params is None:
            raise ValueError("sparse_adamw with weight_decay > 0 needs params (the current "
                             "tiles, adapter.tiles(params)) in update(grads, state, params)")
        count_inc = optax.safe_int32_increment(state.count)
        t = count_inc.astype(jnp.float32)
        bc1 = 1.0 - jnp.float32(b1) ** t
        bc2 = 1.0 - jnp.float32(b2) ** t
        lr = jnp.asarray(_lr_at(learning_rate, state.count), jnp.float32)
        f32 = lambda a: a.astype(jnp.float32)  # noqa: E731
        mu = jax.tree_util.tree_map(lambda g, m: b1 * f32(m) + (1.0 - b1) * f32(g),
                                    updates, state.mu)
        nu = jax.tree_util.tree_map(lambda g, v: b2 * v + (1.0 - b2) * jnp.square(f32(g)),
                                    updates, state.nu)
        def step(g, m, v, p=None):
            u = (m / bc1) / (jnp.sqrt(v / bc2) + eps)
            if weight_decay:
                u = u + weight_decay * f32(p)
            return (-lr * u).astype(g.dtype)

        if weight_decay:
            new_updates = jax.tree_util.tree_map(step, updates, mu, nu, params)
        else:
            new_updates = jax.tree_util.tree_map(step, updates, mu, nu)
        mu = jax.tree_util.tree_map(lambda m: m.astype(mdt), mu)
        return new_updates, SparseAdamWState(count=count_inc, mu=mu, nu=nu)

    return optax.GradientTransformation(init_fn, update_fn)


# ---------------------------------------------------------------------------------------
# the learning rate as optimizer state
# ---------------------------------------------------------------------------------------

_INJECTED = tuple({optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState})


def traced_learning_rate(factory: Callable[[jax.Array], optax.GradientTransformation],
                         learning_rate) -> optax.GradientTransformation:
    """``factory(learning_rate)`` with ``learning_rate`` a float32 scalar of the optimizer
    STATE (``optax.inject_hyperparams``), so that a compiled step serves every rate.

    ``factory`` builds the optimizer from the rate, e.g. ``lambda learning_rate:
    sparse_adamw(make_schedule("linear", learning_rate, ...))`` (the rate is then the
    schedule's peak); it is called again inside every update with the state's value, so
    the update is the formula of ``factory(float)`` evaluated on that value. Read the rate
    with :func:`learning_rate_of`, change it with :func:`with_learning_rate`.
    """
    if not callable(factory):
        raise TypeError(f"factory must be a callable learning_rate -> GradientTransformation; "
                        f"got {type(factory).__name__}")
    return optax.inject_hyperparams(factory, hyperparam_dtype=jnp.float32)(
        learning_rate=learning_rate)


def _is_injected(node) -> bool:
    return isinstance(node, _INJECTED) and "learning_rate" in node.hyperparams


def learning_rate_of(opt_state) -> jax.Array | None:
    """The traced learning rate of ``opt_state`` (from :func:`traced_learning_rate`, also
    inside ``optax.chain``), or ``None`` when the rate is not part of the state. Decided
    from the state's structure, so it works under ``jit``."""
    found = [n for n in jax.tree_util.tree_leaves(opt_state, is_leaf=_is_injected)
             if _is_injected(n)]
    if len(found) > 1:
        raise ValueError(f"the optimizer state holds {len(found)} injected learning rates; "
                         "use one traced_learning_rate per optimizer")
    return found[0].hyperparams["learning_rate"] if found else None


def with_learning_rate(opt_state, learning_rate):
    """``opt_state`` with its traced learning rate set to ``learning_rate`` (a scalar;
    float32). Raises if the state has none (build the optimizer with
    :func:`traced_learning_rate`)."""
    if learning_rate_of(opt_state) is None:
        raise ValueError("this optimizer state has no traced learning rate; build the optimizer "
                         "with optim.traced_learning_rate (make_train_step(..., traced_lr=True))")
    lr = jnp.asarray(learning_rate, jnp.float32)
    if lr.shape != ():
        raise ValueError(f"learning_rate must be a scalar; got shape {lr.shape}")

    def put(node):
        if not _is_injected(node):
            return node
        return node._replace(hyperparams={**node.hyperparams, "learning_rate": lr})

    return jax.tree_util.tree_map(put, opt_state, is_leaf=_is_injected)


# ---------------------------------------------------------------------------------------
# fused Pallas step
# ---------------------------------------------------------------------------------------

def _adamw_tile(g, m, v, tile, lr, bc1, bc2, *, b1, b2, eps, wd):
    """The AdamW rule of :func:`sparse_adamw` on float32 arrays: ``(new tile, m, v)``."""
    m = b1 * m + (1.0 - b1) * g
    v = b2 * v + (1.0 - b2) * g * g
    u = (m / bc1) / (jnp.sqrt(v / bc2) + eps)
    if wd:
        u = u + wd * tile
    return tile - lr * u, m, v


def _adamw_kernel(rows_ref, cols_ref, hyper_ref, g_ref, mu_ref, nu_ref, w_ref,
                  w_out, mu_out, nu_out, *, bs: int, **hp):
    n = pl.program_id(0)
    r0 = pl.multiple_of(rows_ref[n] * bs, bs)
    c0 = pl.multiple_of(cols_ref[n] * bs, bs)
    f32 = lambda ref: ref[0, :, :].astype(jnp.float32)  # noqa: E731
    tile = w_ref[pl.ds(r0, bs), pl.ds(c0, bs)].astype(jnp.float32)
    new, m, v = _adamw_tile(f32(g_ref), f32(mu_ref), f32(nu_ref), tile,
                            hyper_ref[0], hyper_ref[1], hyper_ref[2], **hp)
    w_out[pl.ds(r0, bs), pl.ds(c0, bs)] = new.astype(w_out.dtype)
    mu_out[0, :, :] = m.astype(mu_out.dtype)
    nu_out[0, :, :] = v.astype(nu_out.dtype)


def _adamw_pallas(rows, cols, hyper, grads, mu, nu, w, *, bs: int, interpret: bool, **hp):
    """The Pallas kernel: grid ``(nnz,)``, ``W`` aliased in and out (Triton stores only
    the tile each program computes)."""
    nnz = rows.shape[0]
    full = lambda a: pl.BlockSpec(a.shape, lambda i: (0,) * a.ndim)  # noqa: E731
    tile_spec = pl.BlockSpec((1, bs, bs), lambda i: (i, 0, 0))
    return pl.pallas_call(
        functools.partial(_adamw_kernel, bs=bs, **hp),
        out_shape=(jax.ShapeDtypeStruct(w.shape, w.dtype),
                   jax.ShapeDtypeStruct(mu.shape, mu.dtype),
                   jax.ShapeDtypeStruct(nu.shape, nu.dtype)),
        grid=(nnz,),
        in_specs=[full(rows), full(cols), full(hyper), tile_spec, tile_spec, tile_spec, full(w)],
        out_specs=(full(w), tile_spec, tile_spec),
        input_output_aliases={6: 0, 4: 1, 5: 2},
        interpret=interpret,
        compiler_params=None if interpret else triton_params(num_warps=4, num_stages=1),
        name="sylva_fused_adamw",
    )(rows, cols, hyper, grads, mu, nu, w)


def _adamw_xla(rows, cols, hyper, grads, mu, nu, w, *, bs: int, **hp):
    """The same rule in XLA: moments for all tiles at once, then a loop over the tiles
    that reads each tile of ``W`` (``dynamic_slice``) and writes it back
    (``dynamic_update_slice``), in place in the loop-carried ``W`` (a gather / scatter
    through a block-major view costs XLA:TPU several padded copies of ``W``)."""
    g = grads.astype(jnp.float32)
    m = hp["b1"] * mu.astype(jnp.float32) + (1.0 - hp["b1"]) * g
    v = hp["b2"] * nu.astype(jnp.float32) + (1.0 - hp["b2"]) * g * g
    lr, bc1, bc2 = hyper[0], hyper[1], hyper[2]
    step = (m / bc1) / (jnp.sqrt(v / bc2) + hp["eps"])

    def body(n, w):
        r0, c0 = rows[n] * bs, cols[n] * bs
        tile = jax.lax.dynamic_slice(w, (r0, c0), (bs, bs)).astype(jnp.float32)
        u = step[n] + hp["wd"] * tile if hp["wd"] else step[n]
        return jax.lax.dynamic_update_slice(w, (tile - lr * u).astype(w.dtype), (r0, c0))

    w = jax.lax.fori_loop(0, rows.shape[0], body, w)
    return w, m.astype(mu.dtype), v.astype(nu.dtype)


def fused_sparse_adamw_step(w: jax.Array, grads: jax.Array, mu: jax.Array, nu: jax.Array,
                            count, rows, cols, *, learning_rate: ScalarOrSchedule,
                            b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6,
                            weight_decay: float = 0.0, block_size: int,
                            interpret: bool | None = None):
    """One AdamW step on the tiles of one ``[out, in]`` weight, written into ``w`` in place.

    Args:
      w: ``[out, in]`` weight (aliased to the first output: under ``jit`` with ``w``
        donated, only the ``nnz`` tiles are written, nothing else is touched or copied).
      grads, mu, nu: ``[nnz, bs, bs]`` tile gradients and AdamW moments.
      count: int scalar, updates done before this one (``state.count``).
      rows, cols: ``int32[nnz]`` tile coordinates (block units), distinct tiles.
      learning_rate: float or schedule evaluated at ``count``.
      interpret: ``None`` (default): decided for the platform lowered for, the Pallas
        kernel compiled by Triton on a GPU, the XLA gather / scatter on a TPU or CPU.
        ``True``: the Pallas kernel in Pallas' interpreter (any platform). ``False``:
        the compiled Pallas kernel (refused at lowering on a TPU,
        :class:`sylva_jax.kernels.platform.KernelRefused`).

    Returns:
      ``(w, mu, nu)`` updated; the rule is the one of :func:`sparse_adamw`; entries of
      ``w`` outside the tiles are unchanged, bit for bit.
    """
    _check_hparams(b1, b2, eps, weight_decay)
    bs = int(block_size)
    if w.ndim != 2 or w.shape[0] % bs or w.shape[1] % bs:
        raise ValueError(f"w must be a 2-D [out, in] weight divisible by block_size {bs}; "
                         f"got {tuple(w.shape)}")
    nnz = int(np.shape(rows)[0])
    for name, a in (("grads", grads), ("mu", mu), ("nu", nu)):
        if tuple(a.shape) != (nnz, bs, bs):
            raise ValueError(f"{name} must be [nnz, bs, bs] = {(nnz, bs, bs)}; got {tuple(a.shape)}")
    if nnz == 0:
        return w, mu, nu
    count = jnp.asarray(count, jnp.int32)
    t = (count + 1).astype(jnp.float32)
    hyper = jnp.stack([
        jnp.asarray(_lr_at(learning_rate, count), jnp.float32),
        1.0 - jnp.float32(b1) ** t,
        1.0 - jnp.float32(b2) ** t,
        jnp.float32(0.0),                      # padding: a power-of-two sized vector
    ])
    hp = dict(bs=bs, b1=float(b1), b2=float(b2), eps=float(eps), wd=float(weight_decay))
    compiled = functools.partial(_adamw_pallas, interpret=False, **hp)
    interpreted = functools.partial(_adamw_pallas, interpret=True, **hp)
    xla = functools.partial(_adamw_xla, **hp)

    def tpu_refused(*args):
        w_out = refused(args[-1], platform="tpu", message=(
            "fused_sparse_adamw_step(interpret=False) has no TPU kernel: its Pallas form "
            "writes the whole W block back from VMEM; on a TPU use interpret=None (the "
            "XLA gather / scatter, which writes only the tiles)"))
        return w_out, args[4], args[5]

    args = (jnp.asarray(rows, jnp.int32), jnp.asarray(cols, jnp.int32), hyper, grads, mu, nu, w)
    if interpret:
        return interpreted(*args)
    if interpret is False:
        return by_platform(*args, gpu=compiled, tpu=tpu_refused, cpu=compiled)
    return by_platform(*args, gpu=compiled, tpu=xla, cpu=xla)


def fused_sparse_adamw_update(adapter, params, grads: Mapping[str, jax.Array],
                              state: SparseAdamWState, *,
                              learning_rate: ScalarOrSchedule, b1: float = 0.9,
                              b2: float = 0.999, eps: float = 1e-6,
                              weight_decay: float = 0.0, interpret: bool | None = None):
    """The fused counterpart of ``sparse_adamw`` + ``adapter.apply_updates``.

    params: the model parameters (merged); grads: ``{path: [nnz, bs, bs]}`` tile gradients;
    state: a :class:`SparseAdamWState` (from ``sparse_adamw(...).init(adapter.tiles(params))``,
    so the two paths can be swapped mid-run). Returns ``(params, state)``; every
    non-adapted leaf is returned as the same object. Use under ``jit`` with ``params`` and
    ``state`` donated for the in-place update.
    """
    bs = adapter.block_size
    flat = tree_lib.flatten(params)
    new_w, new_mu, new_nu = {}, dict(state.mu), dict(state.nu)
    for path, (rows, cols) in adapter.coords.items():
        if path not in flat or path not in grads:
            raise KeyError(f"fused_sparse_adamw_update: no parameter or gradient for {path!r}")
        w, g, m, v = flat[path], grads[path], state.mu[path], state.nu[path]
        if adapter.layout == "in_out":   # stored [in, out]: swap coordinates, transpose tiles
            rows, cols = cols, rows
            g, m, v = (jnp.swapaxes(a, 1, 2) for a in (g, m, v))
        w, m, v = fused_sparse_adamw_step(
            jnp.asarray(w), g, m, v, state.count, rows, cols, learning_rate=learning_rate,
            b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, block_size=bs,
            interpret=interpret)
        if adapter.layout == "in_out":
            m, v = jnp.swapaxes(m, 1, 2), jnp.swapaxes(v, 1, 2)
        new_w[path], new_mu[path], new_nu[path] = w, m, v
    params = tree_lib.map_flat(lambda p, leaf: new_w.get(p, leaf), params)
    return params, SparseAdamWState(count=optax.safe_int32_increment(state.count),
                                    mu=new_mu, nu=new_nu)
