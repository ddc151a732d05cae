"""SDD product as a kernel in the ``triton`` language, launched with jax-triton.

docs/algorithm.md, section 4. GPU only. Neither ``triton`` nor ``jax_triton`` is imported at
module import time: :func:`sdd_triton` imports them when called on a GPU and raises a
clear error elsewhere.

Kernel: one program per tile; the program loads its coordinates, then walks the tokens
in chunks of ``BK`` rows (masked at the end, so no padding copy is needed), loading a
``[BK, BS]`` block of ``dy`` and of ``x`` and accumulating ``dy_blk^T @ x_blk`` with
``tl.dot`` in float32.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from sylva_jax.kernels import default_platform, on_gpu

__all__ = ["sdd_triton", "triton_available"]


def triton_available() -> bool:
    """True when a GPU is the default backend and jax-triton can be imported."""
    if not on_gpu():
        return False
    try:
        import jax_triton  # noqa: F401  (lazy: optional GPU package, probed here)
    except Exception:  # ImportError, or a jaxlib without the triton custom call
        return False
    return True


@functools.lru_cache(maxsize=None)
def _kernel():
    import triton  # lazy: optional GPU package, needed only to build the kernel
    import triton.language as tl

    @triton.jit
    def sdd_kernel(dy_ptr, x_ptr, rows_ptr, cols_ptr, out_ptr,
                   N: tl.constexpr, STRIDE_DY: tl.constexpr, STRIDE_X: tl.constexpr,
                   BS: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr):
        pid = tl.program_id(0)
        r = tl.load(rows_ptr + pid).to(tl.int64)
        c = tl.load(cols_ptr + pid).to(tl.int64)
        offs_k = tl.arange(0, BK)
        offs_b = tl.arange(0, BS)
        acc = tl.zeros((BS, BS), dtype=tl.float32)
        for k0 in range(0, N, BK):
            tok = k0 + offs_k
            valid = tok[:, None] < N
            dy_blk = tl.load(dy_ptr + tok[:, None] * STRIDE_DY + r * BS + offs_b[None, :],
                             mask=valid, other=0.0)
            x_blk = tl.load(x_ptr + tok[:, None] * STRIDE_X + c * BS + offs_b[None, :],
                            mask=valid, other=0.0)
            acc += tl.dot(tl.trans(dy_blk), x_blk, input_precision=PRECISION)
        out = out_ptr + pid * BS * BS + offs_b[:, None] * BS + offs_b[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty))

    return sdd_kernel


def sdd_triton(dy: jax.Array, x: jax.Array, rows: jax.Array, cols: jax.Array, *,
               block_size: int, out_dtype=jnp.float32, block_k: int = 64,
               num_warps: int = 4, num_stages: int = 3, precision: str = "ieee") -> jax.Array:
    """Sampled dense-dense product with a Triton kernel (GPU only).

    dy: ``[N, out]``, x: ``[N, in]`` (contiguous), rows/cols: ``int32[nnz]``. Returns
    ``[nnz, bs, bs]`` in ``out_dtype`` (float32 accumulation). ``precision``: Triton's
    ``input_precision`` for float32 operands, ``"ieee"`` (default) or ``"tf32"``.
    """
    if not on_gpu():
        raise RuntimeError(
            f"sdd backend 'triton' needs a CUDA GPU, but the default JAX backend is "
            f"{default_platform()!r}; use backend='xla' (or 'pallas', interpreted on CPU) "
            "or backend='auto'.")
    try:
        import jax_triton as jt  # lazy: optional GPU package, loaded when the kernel runs
    except Exception as e:  # pragma: no cover - GPU machines only
        raise RuntimeError(
            "sdd backend 'triton' needs the jax-triton package (pip install jax-triton, "
            "the 'gpu' extra of sylva-jax); or use backend='pallas' / 'xla'.") from e
    n, d_out = dy.shape
    d_in = x.shape[1]
    nnz = rows.shape[0]
    bs = block_size
    return jt.triton_call(
        dy, x, rows.astype(jnp.int32), cols.astype(jnp.int32),
        kernel=_kernel(),
        out_shape=jax.ShapeDtypeStruct((nnz, bs, bs), out_dtype),
        grid=(nnz,),
        num_warps=num_warps,
        num_stages=num_stages,
        N=n, STRIDE_DY=d_out, STRIDE_X=d_in, BS=bs, BK=block_k, PRECISION=precision,
    )
