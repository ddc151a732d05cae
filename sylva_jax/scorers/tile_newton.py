"""``tile_newton``: the exact Newton gain of training one tile alone (``docs/algorithm.md`` §4)."""
from __future__ import annotations

import numpy as np

from sylva_jax import curvature
from sylva_jax.scorers._registry import register
from sylva_jax.scorers.kronecker import NEWTON_DAMPING, split_damping


def diagonal_blocks(F: np.ndarray, bs: int) -> np.ndarray:
    """``[d/bs, bs, bs]``: the tile-aligned diagonal blocks of ``F [d, d]``."""
    nb = F.shape[0] // bs
    return F.reshape(nb, bs, nb, bs)[np.arange(nb), :, np.arange(nb), :]


def _factor_blocks(exact, factor, n: float, bs: int):
    """Diagonal blocks of ``F / N`` (exact dense factor when kept, else the assembled
    factor, ``curvature.to_dense``) and the mean of its diagonal."""
    F = np.asarray(exact if exact is not None else curvature.to_dense(factor), np.float64) / n
    return diagonal_blocks(F, bs), float(np.mean(np.diag(F)))


def _whitened(blocks: np.ndarray, mean_diag: float, root: float):
    """Eigen-decomposition of every damped block ``B + l I``, ``l = root * mean_diag``."""
    evals, evecs = np.linalg.eigh(blocks)
    return evals + root * mean_diag, evecs


@register("tile_newton")
def tile_newton(s, cfg):
    """``gain(r, c) = 1/2 vec(Gbar_T)^T (A_cc (x) G_rr)^-1 vec(Gbar_T)``: the loss decrease of
    a Newton step on tile ``T = (r, c)`` alone, under the K-FAC model restricted to it.

    ``A_cc`` / ``G_rr``: the ``bs x bs`` diagonal blocks of ``A_bar = A / N`` and
    ``G_bar = G / N`` for the tile's columns / rows, each damped by ``l mean(diag)`` of its
    whole factor with ``l = sqrt(damping)`` (:func:`~sylva_jax.scorers.kronecker.split_damping`;
    default ``damping = 1e-2``). With ``A_cc = U_a diag(e_a) U_a^T``, ``G_rr = U_g diag(e_g)
    U_g^T`` and ``Y = U_g^T Gbar_T U_a``: ``gain = 1/2 sum_pq Y[p, q]^2 / (e_g[p] e_a[q])``
    (``(A (x) G)^-1 vec(X) = vec(G^-1 X A^-1)``). Unlike Sylva's score the curvature divides:
    a tile whose gradient lies along stiff directions gains less. Uses the exact dense
    factors when kept, else the assembled factors' blocks (small dimensions)."""
    bs = cfg.block_size
    root = split_damping(cfg.damping_or(NEWTON_DAMPING))
    n = float(max(int(s.num_samples), 1))
    ea, ua = _whitened(*_factor_blocks(s.A_dense, s.A, n, bs), root)
    eg, ug = _whitened(*_factor_blocks(s.G_dense, s.G, n, bs), root)
    o, i = s.shape
    gt = np.asarray(s.grad_mean, np.float64).reshape(o // bs, bs, i // bs, bs)
    y = np.einsum("rop,rocq->rpcq", ug, gt)
    y = np.einsum("rpcq,cqs->rpcs", y, ua)
    denom = eg[:, :, None, None] * ea[None, None, :, :]              # [R, bs, C, bs]
    return 0.5 * np.sum(np.square(y) / denom, axis=(1, 3))
