"""SDD product as a Pallas kernel written in the Triton style.

ALGORITHM.md section 4. One program per tile (grid ``(nnz,)``); each program reads its
tile coordinates from the ``rows`` / ``cols`` refs, then loops over the tokens in chunks
of ``block_k``, loading a ``[block_k, bs]`` slice of ``dy`` and of ``x`` and accumulating
``dy_chunk^T @ x_chunk`` in float32. On a GPU ``pl.pallas_call`` lowers this through
Triton (no scalar prefetch there, hence coordinates as plain refs; every load is a
power-of-two sized block); on a CPU it runs with ``interpret=True``.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

__all__ = ["sdd_pallas", "choose_block_k"]


def choose_block_k(n_tokens: int, cap: int = 128) -> int:
    """Token chunk: a power of two >= 16 (Triton's ``dot`` minimum), at most ``cap``."""
    bk = 16
    while bk < cap and bk < n_tokens:
        bk *= 2
    return bk


def _sdd_kernel(rows_ref, cols_ref, dy_ref, x_ref, o_ref, *, bs: int, block_k: int,
                n_chunks: int):
    n = pl.program_id(0)
    r0 = pl.multiple_of(rows_ref[n] * bs, bs)
    c0 = pl.multiple_of(cols_ref[n] * bs, bs)

    def body(k, acc):
        t0 = pl.multiple_of(k * block_k, block_k)
        dyb = dy_ref[pl.ds(t0, block_k), pl.ds(r0, bs)]    # [bk, bs]
        xb = x_ref[pl.ds(t0, block_k), pl.ds(c0, bs)]      # [bk, bs]
        return acc + jax.lax.dot_general(
            dyb, xb, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, n_chunks, body, jnp.zeros((bs, bs), jnp.float32))
    o_ref[0, :, :] = acc.astype(o_ref.dtype)


def sdd_pallas(dy: jax.Array, x: jax.Array, rows: jax.Array, cols: jax.Array, *,
               block_size: int, out_dtype=jnp.float32, block_k: int | None = None,
               interpret: bool = False, num_warps: int | None = None,
               num_stages: int | None = None) -> jax.Array:
    """Sampled dense-dense product, Pallas kernel.

    dy: ``[N, out]``, x: ``[N, in]``, rows/cols: ``int32[nnz]`` (block units, may be
    traced). Returns ``[nnz, bs, bs]`` in ``out_dtype`` (float32 accumulation). Tokens are
    zero-padded to a multiple of ``block_k`` (zero rows add nothing to the sums).
    ``num_warps`` / ``num_stages`` are Triton launch options (GPU only).
    """
    n, _ = dy.shape
    bs = block_size
    nnz = rows.shape[0]
    bk = block_k or choose_block_k(n)
    pad = (-n) % bk
    if pad:
        dy = jnp.pad(dy, ((0, pad), (0, 0)))
        x = jnp.pad(x, ((0, pad), (0, 0)))
    n_chunks = (n + pad) // bk
    kernel = functools.partial(_sdd_kernel, bs=bs, block_k=bk, n_chunks=n_chunks)
    compiler_params = None
    if not interpret and (num_warps or num_stages):
        from jax.experimental.pallas import triton as plgpu  # GPU-only options

        compiler_params = plgpu.CompilerParams(
            **({"num_warps": num_warps} if num_warps else {}),
            **({"num_stages": num_stages} if num_stages else {}))
    full = lambda a: pl.BlockSpec(a.shape, lambda i: (0,) * a.ndim)  # noqa: E731
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((nnz, bs, bs), out_dtype),
        grid=(nnz,),
        in_specs=[full(rows), full(cols), full(dy), full(x)],
        out_specs=pl.BlockSpec((1, bs, bs), lambda i: (i, 0, 0)),
        interpret=interpret,
        compiler_params=compiler_params,
        name="sylva_sdd",
    )(rows.astype(jnp.int32), cols.astype(jnp.int32), dy, x)
