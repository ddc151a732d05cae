"""sylva_jax.kernels on the CPU: the GPU kernels in Pallas' interpreter against XLA and
NumPy, their launch choices, and the kernel chosen for each lowering platform (checked by
lowering for CUDA and TPU from this CPU host; compiling for real targets is
experiments/accel_check.py, ``make accel-check``)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sylva_jax import ops, optim
from sylva_jax.kernels.platform import KernelRefused
from sylva_jax.kernels.sdd_pallas import (SMEM_BUDGET, gpu_launch, sdd_pallas, smem_bytes,
                                          token_splits, triton_params)
from sylva_jax.kernels.sdd_xla import sdd_xla

BS = 64


def _operands(n, d_out, d_in, dtype, seed=0):
    rng = np.random.default_rng(seed)
    dy = jnp.asarray(rng.standard_normal((n, d_out)), dtype)
    x = jnp.asarray(rng.standard_normal((n, d_in)), dtype)
    return dy, x


def _np_tiles(dy, x, rows, cols, bs=BS, absolute=False):
    dy = np.asarray(dy.astype(jnp.float32), np.float64)
    x = np.asarray(x.astype(jnp.float32), np.float64)
    if absolute:
        dy, x = np.abs(dy), np.abs(x)
    return np.stack([dy[:, r * bs:(r + 1) * bs].T @ x[:, c * bs:(c + 1) * bs]
                     for r, c in zip(rows, cols)])


ROWS = np.array([0, 1, 1, 2], np.int32)
COLS = np.array([1, 0, 1, 0], np.int32)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("n,splits", [(300, 1), (300, 3), (64, 1)])
def test_pallas_kernel_interpreted_equals_xla_and_numpy(dtype, n, splits):
    """300 tokens: padded to 3 chunks of 128 (bf16) or 5 of 64 (f32); splits=3 sums 3
    float32 partial tiles per tile (f32: 5 chunks, so the test uses splits dividing 5)."""
    dy, x = _operands(n, 3 * BS, 2 * BS, dtype)
    bk = gpu_launch(n, BS, jnp.dtype(dtype).itemsize).block_k
    n_chunks = -(-n // bk)
    s = splits if n_chunks % splits == 0 else n_chunks
    got = sdd_pallas(dy, x, jnp.asarray(ROWS), jnp.asarray(COLS), block_size=BS,
                     interpret=True, splits=s)
    ref = sdd_xla(dy, x, jnp.asarray(ROWS), jnp.asarray(COLS), block_size=BS)
    want = _np_tiles(dy, x, ROWS, COLS)
    scale = _np_tiles(dy, x, ROWS, COLS, absolute=True)
    assert got.shape == (4, BS, BS) and got.dtype == jnp.float32
    # products of bf16 (or f32 -> exact in f64) inputs, float32 sums over <= 300 terms in
    # different orders: |err| <= 300 * 2^-24 * sum|dy||x| ~ 1.8e-5 * scale
    for tiles in (got, ref):
        assert np.all(np.abs(np.asarray(tiles, np.float64) - want) <= 2e-5 * scale)


def test_sdd_pallas_splits_over_tokens_when_tiles_are_few():
    """Two tiles, 1024 bf16 tokens = 8 chunks of 128: token_splits gives 2 ranges."""
    assert token_splits(2, 8) == 2
    dy, x = _operands(1024, 2 * BS, 2 * BS, jnp.bfloat16, seed=3)
    r, c = np.array([1, 0], np.int32), np.array([0, 1], np.int32)
    jaxpr = str(jax.make_jaxpr(lambda a, b: sdd_pallas(
        a, b, jnp.asarray(r), jnp.asarray(c), block_size=BS, interpret=True))(dy, x))
    assert "f32[2,2,64,64]" in jaxpr                 # [splits, nnz, bs, bs] float32 partials
    got = ops.sdd(dy, x, r, c, block_size=BS, backend="pallas", interpret=True)
    want = _np_tiles(dy, x, r, c)
    scale = _np_tiles(dy, x, r, c, absolute=True)
    assert np.all(np.abs(np.asarray(got, np.float64) - want) <= 1e-5 * scale)


@pytest.mark.parametrize("itemsize", [2, 4])
@pytest.mark.parametrize("n", [16, 100, 4096, 2 ** 20])
def test_gpu_launch_fits_the_smallest_shared_memory(itemsize, n):
    bk, stages, warps = gpu_launch(n, BS, itemsize)
    assert 16 <= bk <= 128 and bk & (bk - 1) == 0
    assert 1 <= stages <= 3 and warps == 4
    assert stages >= 2                  # software pipelining is kept (bk shrinks instead)
    # L4 (sm_89) allows 99 KiB per block, the least of sm_80 / sm_89 / sm_90
    assert smem_bytes(bk, BS, itemsize, stages) <= SMEM_BUDGET <= 101376


def test_token_splits_divide_and_fill():
    for nnz, chunks in ((1, 64), (16, 32), (205, 16), (3, 7), (1000, 64), (5, 1)):
        s = token_splits(nnz, chunks)
        assert s >= 1 and chunks % s == 0 and chunks // s >= min(4, chunks)
        assert s == 1 or nnz * s < 264 + nnz        # no more programs than fill the GPU
    assert token_splits(1000, 64) == 1          # the tiles alone fill the GPU
    assert token_splits(1, 64) == 16            # 64 chunks, at least 4 per range


def test_triton_params_are_explicit():
    p = triton_params(num_warps=4, num_stages=2)
    assert (p.num_warps, p.num_stages) == (4, 2)


def test_f32_products_ask_for_ieee_unless_tf32():
    dy, x = _operands(64, BS, BS, jnp.float32)
    r = jnp.zeros((1,), jnp.int32)
    def kernel_jaxpr(prec):
        return str(jax.make_jaxpr(lambda a, b: sdd_pallas(
            a, b, r, r, block_size=BS, precision=prec))(dy, x))

    assert "HIGHEST" in kernel_jaxpr("ieee")          # Triton: IEEE f32 dot, not TF32
    assert "HIGHEST" not in kernel_jaxpr("tf32")
    with pytest.raises(ValueError, match="precision"):
        ops.sdd(dy, x, r, r, block_size=BS, precision="fast")


# --------------------------------------------------------------------------------------
# the kernel chosen for the platform lowered for (not the host's)
# --------------------------------------------------------------------------------------

def _lower(f, args, platform):
    return jax.jit(f).trace(*args).lower(lowering_platforms=(platform,)).as_text(
        debug_info=True)


def _has_triton(text, kernel):
    return "__gpu$xla.gpu.triton" in text and f'name = "{kernel}"' in text


SDD_ARGS = (jax.ShapeDtypeStruct((256, 128), jnp.bfloat16),
            jax.ShapeDtypeStruct((256, 128), jnp.bfloat16),
            jax.ShapeDtypeStruct((3,), jnp.int32), jax.ShapeDtypeStruct((3,), jnp.int32))


def test_sdd_auto_is_decided_at_lowering():
    auto = lambda *a: ops.sdd(*a, block_size=BS)  # noqa: E731
    assert _has_triton(_lower(auto, SDD_ARGS, "cuda"), "sylva_sdd")
    for platform in ("cpu", "tpu"):             # XLA: no kernel, no interpreter
        text = _lower(auto, SDD_ARGS, platform)
        assert "pallas_call" not in text and "triton" not in text
    # interpret=None: compiled on a GPU, interpreted on a CPU, refused on a TPU
    pallas = lambda *a: ops.sdd(*a, block_size=BS, backend="pallas")  # noqa: E731
    assert _has_triton(_lower(pallas, SDD_ARGS, "cuda"), "sylva_sdd")
    assert "pallas_call" in _lower(pallas, SDD_ARGS, "cpu")
    with pytest.raises(KernelRefused, match="backend='auto' or 'xla'"):
        _lower(pallas, SDD_ARGS, "tpu")
    interp = lambda *a: ops.sdd(*a, block_size=BS, backend="pallas", interpret=True)  # noqa: E731
    assert "pallas_call" in _lower(interp, SDD_ARGS, "tpu")   # asked for explicitly


def test_embedded_linear_vjp_uses_the_kernel_of_the_platform():
    rows, cols = np.array([0, 1]), np.array([1, 0])
    w = jnp.zeros((128, 128), jnp.bfloat16)

    def vjp(x, tiles, dy):
        _, pull = jax.vjp(lambda x, t: ops.embedded_linear(x, w, t, rows, cols, block_size=BS),
                          x, tiles)
        return pull(dy)

    args = (jax.ShapeDtypeStruct((64, 128), jnp.bfloat16),
            jax.ShapeDtypeStruct((2, BS, BS), jnp.bfloat16),
            jax.ShapeDtypeStruct((64, 128), jnp.bfloat16))
    assert _has_triton(_lower(vjp, args, "cuda"), "sylva_sdd")
    assert "pallas_call" not in _lower(vjp, args, "tpu")


FUSED_ARGS = (jax.ShapeDtypeStruct((128, 192), jnp.bfloat16),
              *[jax.ShapeDtypeStruct((2, BS, BS), jnp.float32)] * 3)


def _fused(interpret):
    return lambda w, g, m, v: optim.fused_sparse_adamw_step(
        w, g, m, v, 0, np.array([0, 1]), np.array([2, 0]), learning_rate=1e-3,
        block_size=BS, interpret=interpret)


def test_fused_adamw_kernel_per_platform():
    assert _has_triton(_lower(_fused(None), FUSED_ARGS, "cuda"), "sylva_fused_adamw")
    for platform in ("cpu", "tpu"):             # XLA tile loop: writes only the tiles
        assert "pallas_call" not in _lower(_fused(None), FUSED_ARGS, platform)
    with pytest.raises(KernelRefused, match="no TPU kernel"):
        _lower(_fused(False), FUSED_ARGS, "tpu")


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_fused_adamw_xla_path_equals_the_kernel_and_keeps_other_weights(weight_decay):
    rng = np.random.default_rng(5)
    w = jnp.asarray(rng.standard_normal((128, 192)), jnp.float32)
    g = jnp.asarray(rng.standard_normal((2, BS, BS)), jnp.float32)
    mu = jnp.asarray(rng.standard_normal((2, BS, BS)) * 0.1, jnp.float32)
    nu = jnp.asarray(rng.random((2, BS, BS)) * 0.01, jnp.float32)
    rows, cols = np.array([0, 1]), np.array([2, 0])

    def run(interpret):
        return jax.jit(lambda *a: optim.fused_sparse_adamw_step(
            *a, 3, rows, cols, learning_rate=1e-2, weight_decay=weight_decay, block_size=BS,
            interpret=interpret))(w, g, mu, nu)

    (w_x, m_x, v_x), (w_k, m_k, v_k) = run(None), run(True)   # XLA loop, Pallas interpreted
    # the same float32 formula; the two compile it separately (fusion may reassociate)
    for a, b in ((w_x, w_k), (m_x, m_k), (v_x, v_k)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    outside = np.ones((2, 3), bool)
    outside[rows, cols] = False
    outside = np.kron(outside, np.ones((BS, BS), bool))
    for w_new in (w_x, w_k):
        assert np.array_equal(np.asarray(w_new)[outside], np.asarray(w)[outside])
        assert np.all(np.asarray(w_new)[~outside] != np.asarray(w)[~outside])
