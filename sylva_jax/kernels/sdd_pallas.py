"""SDD product as a Pallas kernel in the Triton style (docs/algorithm.md, section 4).

Grid ``(nnz, splits)``: program ``(n, s)`` reads the coordinates of tile ``n`` from the
``rows`` / ``cols`` refs and walks its share of the tokens, chunks ``s*cps .. (s+1)*cps``
of ``block_k`` tokens each, accumulating ``dy_chunk^T @ x_chunk`` (``[bs, bk] @ [bk, bs]``)
in float32. With ``splits > 1`` each program writes a float32 partial tile and the
partials are summed afterwards (``[splits, nnz, bs, bs] -> [nnz, bs, bs]``): this fills
the GPU when there are fewer tiles than streaming multiprocessors.

On a GPU ``pl.pallas_call`` lowers this through Triton: :func:`gpu_launch` gives the
explicit compiler parameters (without them jax 0.10 picks Mosaic GPU, which copies the
whole operands into shared memory and fails). Coordinates are plain refs (no scalar
prefetch on Triton) and every block is a power of two. Pointer offsets are computed by
Pallas' Triton lowering, in 64 bits whenever an operand exceeds 2^32 bytes. On the CPU
the same kernel runs with ``interpret=True``. There is no TPU lowering of this kernel
(:func:`sylva_jax.ops.sdd` refuses it there).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

__all__ = ["sdd_pallas", "choose_block_k", "gpu_launch", "token_splits", "triton_params",
           "dot_precision", "roofline", "smem_bytes", "GpuLaunch", "SMEM_BUDGET",
           "FILL_PROGRAMS"]

# Shared memory a kernel may ask for on every supported NVIDIA target: the smallest
# per-block opt-in limit among sm_80 (A100, 163 KiB), sm_89 (L4, 99 KiB) and sm_90
# (H100, 227 KiB) is 99 KiB = 101376 bytes; 96 KiB leaves room for Triton's bookkeeping.
# The target is only known when XLA compiles, so one choice must fit them all.
SMEM_BUDGET = 96 * 1024

# Programs wanted in flight to fill a GPU: 2 per SM on an H100/H200 (132 SMs).
FILL_PROGRAMS = 264


class GpuLaunch(NamedTuple):
    """Triton launch choice: token chunk, software-pipeline stages, warps."""

    block_k: int
    num_stages: int
    num_warps: int


def choose_block_k(n_tokens: int, cap: int = 128) -> int:
    """Token chunk: a power of two >= 16 (Triton's ``dot`` minimum), at most ``cap``."""
    bk = 16
    while bk < cap and bk < n_tokens:
        bk *= 2
    return bk


def smem_bytes(block_k: int, bs: int, itemsize: int, num_stages: int) -> int:
    """Upper bound on the shared memory of the pipelined loop: ``num_stages`` buffers of a
    ``[block_k, bs]`` block of ``dy`` and of ``x``."""
    return num_stages * 2 * block_k * bs * itemsize


def gpu_launch(n_tokens: int, bs: int, itemsize: int, budget: int = SMEM_BUDGET) -> GpuLaunch:
    """Token chunk and pipeline depth whose :func:`smem_bytes` fits ``budget``: the
    largest chunk (<= 128, >= 16) with 2 or 3 stages (3 preferred), else one stage.
    bf16 at bs 64 gets (128, 3) = 96 KiB, f32 gets (64, 3) = 96 KiB. 4 warps (128
    threads) compute one 64x64 tile."""
    top = choose_block_k(n_tokens)
    chunks = [top >> i for i in range(8) if top >> i >= 16]
    for bk in chunks:
        for stages in (3, 2):
            if smem_bytes(bk, bs, itemsize, stages) <= budget:
                return GpuLaunch(bk, stages, 4)
    for bk in chunks:
        if smem_bytes(bk, bs, itemsize, 1) <= budget:
            return GpuLaunch(bk, 1, 4)
    return GpuLaunch(16, 1, 4)


def token_splits(nnz: int, n_chunks: int, fill: int = FILL_PROGRAMS,
                 min_chunks: int = 4) -> int:
    """Number of token ranges per tile: the largest divisor ``s`` of ``n_chunks`` with
    ``s <= ceil(fill / nnz)`` and at least ``min_chunks`` chunks per range (1 when the
    tiles alone fill the GPU). A divisor, so splitting never pads the operands."""
    want = min(-(-fill // max(nnz, 1)), n_chunks // min_chunks)
    for s in range(max(want, 1), 0, -1):
        if n_chunks % s == 0:
            return s
    return 1


def triton_params(num_warps: int, num_stages: int):
    """Triton compiler parameters under their current name (``pallas.triton.CompilerParams``
    from jax 0.6 on, ``pallas.gpu.TritonCompilerParams`` before)."""
    try:
        from jax.experimental.pallas import triton as pltriton  # lazy: GPU lowering only

        cls = getattr(pltriton, "CompilerParams", None) or getattr(
            pltriton, "TritonCompilerParams")
    except (ImportError, AttributeError):  # pragma: no cover - older jax
        from jax.experimental.pallas import gpu as plgpu  # lazy: GPU lowering only, older jax

        cls = plgpu.TritonCompilerParams
    return cls(num_warps=num_warps, num_stages=num_stages)


def dot_precision(dtype, precision: str):
    """``lax`` precision for the tile products: ``"ieee"`` -> ``HIGHEST`` (Triton: IEEE f32
    for f32 operands, never TF32), ``"tf32"`` -> ``DEFAULT`` (TF32 allowed for f32).
    Low-precision operands are multiplied exactly either way (float32 accumulation)."""
    if precision not in ("ieee", "tf32"):
        raise ValueError(f"precision must be 'ieee' or 'tf32'; got {precision!r}")
    del dtype
    p = jax.lax.Precision.HIGHEST if precision == "ieee" else jax.lax.Precision.DEFAULT
    return (p, p)


def _sdd_kernel(rows_ref, cols_ref, dy_ref, x_ref, o_ref, *, bs: int, block_k: int,
                chunks: int, precision):
    n = pl.program_id(0)
    s = pl.program_id(1)
    r0 = pl.multiple_of(rows_ref[n] * bs, bs)
    c0 = pl.multiple_of(cols_ref[n] * bs, bs)
    k_first = s * chunks

    def body(k, acc):
        t0 = pl.multiple_of((k_first + k) * block_k, block_k)
        dyb = dy_ref[pl.ds(t0, block_k), pl.ds(r0, bs)]    # [bk, bs]
        xb = x_ref[pl.ds(t0, block_k), pl.ds(c0, bs)]      # [bk, bs]
        return acc + jax.lax.dot_general(
            dyb, xb, (((0,), (0,)), ((), ())), precision=precision,
            preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, chunks, body, jnp.zeros((bs, bs), jnp.float32))
    o_ref[0, 0, :, :] = acc.astype(o_ref.dtype)


def sdd_pallas(dy: jax.Array, x: jax.Array, rows: jax.Array, cols: jax.Array, *,
               block_size: int, out_dtype=jnp.float32, block_k: int | None = None,
               interpret: bool = False, num_warps: int | None = None,
               num_stages: int | None = None, splits: int | None = None,
               precision: str = "ieee") -> jax.Array:
    """Sampled dense-dense product, Pallas kernel.

    dy: ``[N, out]``, x: ``[N, in]``, rows/cols: ``int32[nnz]`` (block units, may be
    traced). Returns ``[nnz, bs, bs]`` in ``out_dtype``: tile ``n`` is
    ``dy[:, rows[n]-block]^T x[:, cols[n]-block]``, accumulated in float32.

    ``block_k`` / ``num_stages`` / ``num_warps`` default to :func:`gpu_launch` (fits the
    shared memory of sm_80, sm_89 and sm_90); ``splits`` (token ranges per tile) to
    :func:`token_splits`. Tokens are zero-padded to a multiple of ``block_k`` when needed
    (zero rows add nothing). ``precision``: ``"ieee"`` (default) or ``"tf32"``, see
    :func:`dot_precision`. ``interpret=True`` runs the kernel in Pallas' interpreter.
    """
    n, _ = dy.shape
    bs = block_size
    nnz = rows.shape[0]
    auto = gpu_launch(n, bs, jnp.dtype(dy.dtype).itemsize)
    bk = block_k or auto.block_k
    stages = num_stages or auto.num_stages
    warps = num_warps or auto.num_warps
    pad = (-n) % bk
    if pad:
        dy = jnp.pad(dy, ((0, pad), (0, 0)))
        x = jnp.pad(x, ((0, pad), (0, 0)))
    n_chunks = (n + pad) // bk
    ns = splits or token_splits(nnz, n_chunks)
    if n_chunks % ns:
        raise ValueError(f"splits={ns} must divide the {n_chunks} token chunks of {bk}")
    part_dtype = out_dtype if ns == 1 else jnp.float32
    kernel = functools.partial(_sdd_kernel, bs=bs, block_k=bk, chunks=n_chunks // ns,
                               precision=dot_precision(dy.dtype, precision))
    full = lambda a: pl.BlockSpec(a.shape, lambda i, s: (0,) * a.ndim)  # noqa: E731
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((ns, nnz, bs, bs), part_dtype),
        grid=(nnz, ns),
        in_specs=[full(rows), full(cols), full(dy), full(x)],
        out_specs=pl.BlockSpec((1, 1, bs, bs), lambda i, s: (s, i, 0, 0)),
        interpret=interpret,
        compiler_params=None if interpret else triton_params(warps, stages),
        name="sylva_sdd",
    )(rows.astype(jnp.int32), cols.astype(jnp.int32), dy, x)
    if ns == 1:
        return out[0]
    return out.sum(axis=0).astype(out_dtype)


def roofline(n_tokens: int, d_out: int, d_in: int, nnz: int, bs: int, itemsize: int, *,
             unique_rows: int | None = None, unique_cols: int | None = None) -> dict:
    """FLOPs and HBM bytes of the SDD kernel and of the dense ``dy^T x`` it replaces.

    SDD: ``2 N bs^2`` FLOPs per tile. Bytes, two bounds: ``sdd_bytes`` has every tile read
    its ``N x bs`` column blocks of ``dy`` and ``x`` from HBM (no reuse in L2),
    ``sdd_bytes_min`` reads each distinct block once (``unique_rows`` row blocks of ``dy``,
    ``unique_cols`` column blocks of ``x``; default: no reuse); both write ``nnz bs^2``
    float32 values. Dense: ``2 N out in`` FLOPs, reads ``N (out + in)`` elements, writes
    ``out in`` (in the operand dtype).
    """
    ur = nnz if unique_rows is None else unique_rows
    uc = nnz if unique_cols is None else unique_cols
    out_bytes = nnz * bs * bs * 4
    sdd_flops = 2 * n_tokens * bs * bs * nnz
    sdd_bytes = nnz * 2 * n_tokens * bs * itemsize + out_bytes
    sdd_bytes_min = (ur + uc) * n_tokens * bs * itemsize + out_bytes
    dense_flops = 2 * n_tokens * d_out * d_in
    dense_bytes = n_tokens * (d_out + d_in) * itemsize + d_out * d_in * itemsize
    return {"sdd_flops": sdd_flops, "sdd_bytes": sdd_bytes, "sdd_bytes_min": sdd_bytes_min,
            "dense_flops": dense_flops, "dense_bytes": dense_bytes,
            "density": nnz * bs * bs / (d_out * d_in)}
