"""The SDD product and the embedded linear layer (`docs/algorithm.md` §5).

- :func:`sdd` computes only the ``nnz`` kept ``bs x bs`` tiles of ``dW = dy^T x``
  (a "sampled dense-dense" product), summed over every leading (token) dimension;
- :func:`embedded_linear` is the linear layer whose trainable tiles live inside the frozen
  weight ``W``: forward ``y = x W^T + b`` (dense), backward ``dx = dy W`` (dense) and
  ``dTiles = sdd(dy, x)``; no cotangent for ``W`` or ``b`` is ever formed.

Layout is Hugging Face ``[out, in]``; tile ``(r, c)`` is ``W[r*bs:(r+1)*bs, c*bs:(c+1)*bs]``.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["BACKENDS", "resolve_backend", "sdd", "embedded_linear", "dense_linear"]

BACKENDS = ("auto", "xla", "pallas", "triton")

# What "auto" lowers to on a GPU (CUDA or ROCm): the Pallas kernel, compiled by Triton.
# On a TPU and on a CPU "auto" lowers to "xla". The choice is made per lowering platform
# (sylva_jax.kernels.platform.by_platform), not from the host: experiments/accel_check.py
# compiles it for H100, A100, L4, TPU v5e and v6e from a CPU host.
GPU_AUTO_BACKEND = "pallas"

PRECISIONS = ("ieee", "tf32")


def resolve_backend(backend: str) -> str:
    """Validate an sdd backend name and return it.

    ``"auto"`` is returned as ``"auto"``: it is resolved when the program is lowered, for
    the platform it is compiled for (``pallas`` on a GPU, ``xla`` on a TPU or CPU).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown sdd backend {backend!r}; choose one of {BACKENDS}")
    return backend


_Tracer = getattr(getattr(jax, "core", None), "Tracer", None)


def _is_concrete(a) -> bool:
    """True for NumPy / committed arrays whose values can be read now (not under trace)."""
    if isinstance(a, np.ndarray):
        return True
    if _Tracer is not None:
        return not isinstance(a, _Tracer)
    try:                                   # jax without a public Tracer class
        np.asarray(a)
        return True
    except Exception:
        return False


def _check_coords(rows, cols, n_row_blocks: int, n_col_blocks: int):
    rows = jnp.asarray(rows) if not hasattr(rows, "dtype") else rows
    cols = jnp.asarray(cols) if not hasattr(cols, "dtype") else cols
    if rows.ndim != 1 or cols.ndim != 1 or rows.shape != cols.shape:
        raise ValueError(
            f"rows and cols must be 1-D arrays of the same length (one entry per tile); got "
            f"shapes {tuple(rows.shape)} and {tuple(cols.shape)}")
    if not (jnp.issubdtype(rows.dtype, jnp.integer) and jnp.issubdtype(cols.dtype, jnp.integer)):
        raise TypeError(
            f"rows and cols must be integer tile coordinates (block units); got dtypes "
            f"{rows.dtype} and {cols.dtype}")
    if _is_concrete(rows) and _is_concrete(cols) and rows.shape[0]:
        r, c = np.asarray(rows), np.asarray(cols)
        if r.min() < 0 or r.max() >= n_row_blocks or c.min() < 0 or c.max() >= n_col_blocks:
            raise ValueError(
                f"tile coordinates out of range: rows must lie in [0, {n_row_blocks}) and cols "
                f"in [0, {n_col_blocks}) (out // bs and in // bs); got rows in "
                f"[{r.min()}, {r.max()}], cols in [{c.min()}, {c.max()}]")
    return rows.astype(jnp.int32), cols.astype(jnp.int32)


def sdd(dy: jax.Array, x: jax.Array, rows, cols, *, block_size: int,
        backend: str = "auto", out_dtype=jnp.float32,
        interpret: bool | None = None, precision: str = "ieee") -> jax.Array:
    """Sampled dense-dense product: the kept tiles of ``dW = dy^T x`` (`docs/algorithm.md` §5).

    Args:
      dy: ``[..., out]`` output gradients.
      x: ``[..., in]`` layer inputs, same leading (token) dimensions as ``dy``.
      rows, cols: ``int[nnz]`` tile coordinates in block units (may be traced).
      block_size: tile side ``bs``; must divide ``out`` and ``in``.
      backend: ``"xla"``, ``"pallas"``, ``"triton"`` (jax-triton, GPU only) or ``"auto"``
        (decided at lowering: ``pallas`` compiled by Triton on a GPU, ``xla`` on a TPU
        or CPU).
      out_dtype: dtype of the result; accumulation is float32 whatever the inputs.
      interpret: Pallas only. ``None``: compiled on a GPU, interpreted on a CPU,
        refused on a TPU (:class:`sylva_jax.kernels.platform.KernelRefused` at lowering:
        the kernel has no Mosaic TPU lowering; use ``xla`` or ``auto`` there), decided
        for the platform lowered for. ``True``: Pallas' interpreter on any platform.
        ``False``: always the compiled kernel.
      precision: ``"ieee"`` (default: float32 operands are multiplied in IEEE float32
        on every backend) or ``"tf32"`` (allow TF32 tensor cores for float32 operands on
        a GPU). bf16 / f16 products are exact in float32 either way.

    Returns:
      ``[nnz, bs, bs]``; tile ``n`` is
      ``sum over leading dims of dy[..., rows[n]*bs:(rows[n]+1)*bs]^T x[..., cols[n]*bs:...]``.
    """
    dy = jnp.asarray(dy)
    x = jnp.asarray(x)
    if dy.ndim < 2 or x.ndim < 2 or dy.shape[:-1] != x.shape[:-1]:
        raise ValueError(
            f"sdd needs dy [..., out] and x [..., in] with the same leading (token) "
            f"dimensions and at least one of them; got dy {tuple(dy.shape)} and x "
            f"{tuple(x.shape)}")
    bs = int(block_size)
    d_out, d_in = dy.shape[-1], x.shape[-1]
    if bs <= 0 or d_out % bs or d_in % bs:
        raise ValueError(
            f"block_size {block_size} must be positive and divide out={d_out} and in={d_in}; "
            "pick a block size that divides both weight dimensions")
    rows, cols = _check_coords(rows, cols, d_out // bs, d_in // bs)
    backend = resolve_backend(backend)
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}; got {precision!r}")
    nnz = rows.shape[0]
    dy2 = dy.reshape(-1, d_out)
    x2 = x.reshape(-1, d_in)
    if nnz == 0:
        return jnp.zeros((0, bs, bs), out_dtype)
    if dy2.shape[0] == 0:
        return jnp.zeros((nnz, bs, bs), out_dtype)
    kw = dict(block_size=bs, out_dtype=out_dtype, precision=precision)
    if backend == "triton":
        from sylva_jax.kernels.sdd_triton import sdd_triton

        return sdd_triton(dy2, x2, rows, cols, **kw)
    from sylva_jax.kernels.platform import by_platform
    from sylva_jax.kernels.sdd_xla import sdd_xla

    xla = functools.partial(sdd_xla, **kw)
    if backend == "xla":
        return xla(dy2, x2, rows, cols)
    pallas = _pallas_branches(rows.shape[0], bs, out_dtype, interpret, kw)
    if backend == "auto":
        return by_platform(dy2, x2, rows, cols, gpu=pallas["gpu"], tpu=xla, cpu=xla)
    return by_platform(dy2, x2, rows, cols, **pallas)


def _pallas_branches(nnz: int, bs: int, out_dtype, interpret: bool | None, kw: dict):
    """The Pallas SDD kernel per platform (see :func:`sdd`, ``interpret``)."""
    from sylva_jax.kernels.platform import refused
    from sylva_jax.kernels.sdd_pallas import sdd_pallas

    compiled = functools.partial(sdd_pallas, interpret=False, **kw)
    interpreted = functools.partial(sdd_pallas, interpret=True, **kw)
    if interpret:
        return dict(gpu=interpreted, tpu=interpreted, cpu=interpreted)

    def tpu(*args):
        return refused(jnp.zeros((nnz, bs, bs), out_dtype), platform="tpu", message=(
            "sdd backend 'pallas' has no TPU kernel (it is written for Triton); on a TPU "
            "use backend='auto' or 'xla' (XLA's gather + batched dot), or interpret=True "
            "to run the kernel in Pallas' interpreter"))

    return dict(gpu=compiled, tpu=tpu, cpu=compiled if interpret is False else interpreted)


def dense_linear(x: jax.Array, w: jax.Array, b: jax.Array | None = None, *, out_dtype=None) -> jax.Array:
    """``y = x @ w.T (+ b)``: x ``[..., in]``, w ``[out, in]``, b ``[out]``.

    The model's plain dense product (``sylva_jax.models.llama.dense_linear`` is this one):
    operands in the compute dtype ``x.dtype`` (``w`` cast to it), a ``dot_general`` that
    contracts the last axes of both (no transposed copy of ``w``), float32 accumulation,
    bias added in float32, result in ``out_dtype`` (default ``x.dtype``).
    """
    y = jax.lax.dot_general(x, w.astype(x.dtype), (((x.ndim - 1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32)
    if b is not None:
        y = y + b.astype(jnp.float32)
    return y.astype(out_dtype or x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _embedded(x, w, tiles, rows, cols, b, block_size, backend):
    del tiles, rows, cols, block_size, backend  # the tile values are already inside w
    return dense_linear(x, w, b)


def _embedded_fwd(x, w, tiles, rows, cols, b, block_size, backend):
    y = dense_linear(x, w, b)
    # residuals: x and w for the backward products; tiles only for its dtype/shape
    return y, (x, w, tiles, rows, cols)


def _embedded_bwd(block_size, backend, res, dy):
    x, w, tiles, rows, cols = res
    dy = dy.astype(x.dtype)
    dx = jax.lax.dot_general(dy, w.astype(x.dtype), (((dy.ndim - 1,), (0,)), ((), ())),
                             preferred_element_type=jnp.float32).astype(x.dtype)
    dtiles = sdd(dy, x, rows, cols, block_size=block_size, backend=backend,
                 out_dtype=jnp.float32).astype(tiles.dtype)
    # None: no cotangent for w, rows, cols or b (a symbolic zero; nothing [out, in] is built)
    return dx, None, dtiles, None, None, None


_embedded.defvjp(_embedded_fwd, _embedded_bwd)


def embedded_linear(x: jax.Array, w: jax.Array, tiles: jax.Array, rows, cols,
                    b: jax.Array | None = None, *, block_size: int,
                    backend: str = "auto") -> jax.Array:
    """Linear layer with trainable tiles embedded in a frozen weight (`docs/algorithm.md` §5).

    Args:
      x: ``[..., in]`` inputs (compute dtype).
      w: ``[out, in]`` weight that already contains the current tile values.
      tiles: ``[nnz, bs, bs]``; only receives the gradient, its forward value is unused
        (it must equal the tiles of ``w`` for the gradient to be the true one).
      rows, cols: ``int32[nnz]`` tile coordinates (block units), distinct tiles; may be
        traced (every backend reads them as arrays). Their range is checked here only
        when they are concrete: validate traced ones on the host where they are built
        (:meth:`sylva_jax.adapter.TileLayout.validate`).
      b: ``[out]`` bias or ``None``.
      block_size: ``bs``; backend: SDD backend (see :func:`sdd`).

    Returns:
      ``y = x @ w.T (+ b)``: ``[..., out]`` in ``x.dtype`` (the compute dtype; ``w`` is
      cast to it, as the model's dense product does), float32 accumulation.

    Gradients: ``dx = dy @ w`` (dense), ``dtiles = sdd(dy, x, rows, cols)`` cast to
    ``tiles.dtype``; ``w`` and ``b`` are frozen (zero cotangent, never materialised).
    """
    if w.ndim != 2:
        raise ValueError(f"embedded_linear needs a 2-D weight [out, in]; got shape {w.shape}")
    if x.shape[-1] != w.shape[1]:
        raise ValueError(
            f"x has {x.shape[-1]} input features but the weight is [out, in] = {tuple(w.shape)}; "
            "the weight must be in [out, in] layout (transpose Linen [in, out] kernels)")
    bs = int(block_size)
    if tiles.ndim != 3 or tiles.shape[1:] != (bs, bs):
        raise ValueError(f"tiles must be [nnz, {bs}, {bs}]; got {tuple(tiles.shape)}")
    rows, cols = _check_coords(rows, cols, w.shape[0] // bs, w.shape[1] // bs)
    if rows.shape[0] != tiles.shape[0]:
        raise ValueError(
            f"{tiles.shape[0]} tiles but {rows.shape[0]} coordinates; they must match")
    if w.shape[0] % bs or w.shape[1] % bs:
        raise ValueError(f"block_size {bs} must divide the weight shape {tuple(w.shape)}")
    if b is not None and b.shape != (w.shape[0],):
        raise ValueError(f"bias must have shape ({w.shape[0]},); got {tuple(b.shape)}")
    return _embedded(x, w, tiles, rows, cols, b, bs, resolve_backend(backend))
