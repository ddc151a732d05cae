"""SDD product in plain XLA: gather the needed column blocks, one batched einsum.

docs/algorithm.md, section 4: ``dTile_n = dy[:, r_n-block]^T x[:, c_n-block]``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from sylva_jax.kernels.platform import by_platform

__all__ = ["sdd_xla"]


def sdd_xla(dy: jax.Array, x: jax.Array, rows: jax.Array, cols: jax.Array, *,
            block_size: int, out_dtype=jnp.float32, precision: str = "ieee") -> jax.Array:
    """Sampled dense-dense product on 2-D operands.

    dy: ``[N, out]``, x: ``[N, in]``, rows/cols: ``int32[nnz]`` tile coordinates (block
    units; may be traced). Returns ``[nnz, bs, bs]`` with tile ``n`` equal to
    ``dy[:, rows[n]*bs:(rows[n]+1)*bs]^T @ x[:, cols[n]*bs:(cols[n]+1)*bs]``, accumulated
    in float32 and cast to ``out_dtype``.

    The operands are viewed as ``[N, blocks, bs]`` (a free reshape), the ``nnz`` needed
    blocks are gathered along the block axis (``N * nnz * bs`` elements each, i.e. the
    density times the operand) and one batched ``dot_general`` with batch ``nnz`` and
    contraction over tokens computes every tile. Measured on CPU against alternatives in
    ``experiments/bench_sdd.py``. ``precision="ieee"`` asks XLA for ``HIGHEST`` (no TF32
    for float32 operands on a GPU); ``"tf32"`` leaves XLA's default.
    """
    n, d_out = dy.shape
    d_in = x.shape[1]
    bs = block_size
    dy3 = dy.reshape(n, d_out // bs, bs)
    x3 = x.reshape(n, d_in // bs, bs)
    # mode="clip" avoids the NaN-filling out-of-bounds path; coordinates are validated
    # by the caller when concrete.
    dyg = jnp.take(dy3, rows, axis=1, mode="clip")          # [N, nnz, bs]
    xg = jnp.take(x3, cols, axis=1, mode="clip")            # [N, nnz, bs]
    prec = jax.lax.Precision.HIGHEST if precision == "ieee" else None

    def product(a, b):
        return jax.lax.dot_general(
            a, b, dimension_numbers=(((0,), (0,)), ((1,), (1,))),  # contract N, batch nnz
            precision=prec, preferred_element_type=jnp.float32)  # [nnz, bs, bs]

    if dyg.dtype in (jnp.bfloat16, jnp.float16):
        # XLA:CPU (jax 0.10) has no batched BF16 x BF16 = F32 dot: under jit with nnz >= 2
        # it fails at run time (UNIMPLEMENTED ... DotThunk). Low-precision products are
        # exact in float32, so float32 operands give the same float32-accumulated tiles.
        # Only the CPU lowering upcasts; GPU and TPU multiply the bf16 operands directly.
        upcast = lambda a, b: product(a.astype(jnp.float32), b.astype(jnp.float32))  # noqa: E731
        out = by_platform(dyg, xg, gpu=product, tpu=product, cpu=upcast)
    else:
        out = product(dyg, xg)
    return out.astype(out_dtype)
