"""Kronecker-factored scorers (``docs/algorithm.md`` §4): Sylva's score, its published
numerics, the dense K-FAC version of it, and the K-FAC Newton step.

Sylva family (``sylva``, ``sylva_published``, ``kfac``), with ``lam = damping`` or
``damping * mean(diag F)`` (``Stats.relative_damping``), on the factors as stored (sums):

- ``in_imp[i]  = (Gbar[:, i]^T G Gbar[:, i]) / diag((A + lam I)^-1)[i]``,
- ``out_imp[o] = (Gbar[o, :] A Gbar[o, :]^T) / diag((G + lam I)^-1)[o]``,
- tile score ``= block_sum(out_imp)[r] * block_sum(in_imp)[c]`` (the tile sum of
  ``imp[o, i] = out_imp[o] in_imp[i]``; no ``[out, in]`` array).

Sums rather than means scale every layer's score by the same ``N^3``, so rankings within
and across layers are those of the means.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sylva_jax import curvature
from sylva_jax.scorers._registry import register, tile_sum

SYLVA_DAMPING = 1e-6
NEWTON_DAMPING = 1e-2


def _outer_tiles(out_imp, in_imp, bs: int) -> np.ndarray:
    o = np.asarray(out_imp, np.float64).reshape(-1, bs).sum(axis=1)
    i = np.asarray(in_imp, np.float64).reshape(-1, bs).sum(axis=1)
    return np.outer(o, i)


@jax.jit
def _sylva_vectors(A, G, gbar, inv_a, inv_g):
    """``(out_imp [out], in_imp [in])`` from factors, ``Gbar [out, in]`` and inverse diagonals."""
    in_imp = jnp.sum(gbar * curvature.matmat(G, gbar), axis=0) / inv_a       # G Gbar
    out_imp = jnp.sum(gbar.T * curvature.matmat(A, gbar.T), axis=0) / inv_g  # A Gbar^T
    return out_imp, in_imp


@register("sylva")
def sylva(s, cfg):
    """Sylva's score on the calibrated factors (module docstring; HODLR Woodbury inverse
    diagonals, §3, cached per ``(damping, relative)`` in ``Stats``)."""
    inv_a, inv_g = cfg.stats.inv_diags(cfg.damping_or(SYLVA_DAMPING), cfg.relative_damping)[s.name]
    return _outer_tiles(*_sylva_vectors(s.A, s.G, s.grad_mean, inv_a, inv_g), cfg.block_size)


@jax.jit
def _published_vectors(A, G, gbar, inv_a, inv_g):
    in_imp = jnp.sum(gbar * curvature.published_matmat(G, gbar), axis=0) / inv_a
    out_imp = jnp.sum(gbar.T * curvature.published_matmat(A, gbar.T), axis=0) / inv_g
    return out_imp, in_imp


@register("sylva_published", published_matvec=True)
def sylva_published(s, cfg):
    """Sylva's score with the authors' numerics (a fidelity arm): the inverse diagonals are
    those of the damped HODLR leaves alone (``curvature.leaf_inv_diag``), and with
    ``published_matvec=True`` (default) the products ``G Gbar``, ``A Gbar^T`` are the
    authors' (``curvature.published_matmat``: stride ``h``, upper tile not transposed).
    HODLR factors only."""
    lam, rel = cfg.damping_or(SYLVA_DAMPING), cfg.relative_damping
    inv_a = curvature.leaf_inv_diag(s.A, lam, rel)
    inv_g = curvature.leaf_inv_diag(s.G, lam, rel)
    if cfg.kwargs["published_matvec"]:
        vecs = _published_vectors(s.A, s.G, s.grad_mean, inv_a, inv_g)
    else:
        vecs = _sylva_vectors(s.A, s.G, s.grad_mean, inv_a, inv_g)
    return _outer_tiles(*vecs, cfg.block_size)


def _inv_diag_dense(F: np.ndarray, damping: float, relative: bool) -> np.ndarray:
    lam = damping * float(np.mean(np.diag(F))) if relative else damping
    return np.diag(np.linalg.inv(F + lam * np.eye(F.shape[0])))


def dense_factors(s, method: str):
    """``(A, G)`` float64 exact dense factors (sums) of layer ``s``, or a clear error."""
    if s.A_dense is None or s.G_dense is None:
        raise ValueError(
            f"method {method!r} needs exact dense factors for {s.name}; run preprocess with "
            "keep_dense=True or factor_kind='dense'")
    return np.asarray(s.A_dense, np.float64), np.asarray(s.G_dense, np.float64)


@register("kfac", dense=True)
def kfac(s, cfg):
    """Sylva's formula with exact dense factors and inverses (float64 NumPy; small models)."""
    A, G = dense_factors(s, "kfac")
    lam, rel = cfg.damping_or(SYLVA_DAMPING), cfg.relative_damping
    gbar = np.asarray(s.grad_mean, np.float64)
    in_imp = np.einsum("oi,oi->i", gbar, G @ gbar) / _inv_diag_dense(A, lam, rel)
    out_imp = np.einsum("oi,oi->o", gbar, gbar @ A) / _inv_diag_dense(G, lam, rel)
    return _outer_tiles(out_imp, in_imp, cfg.block_size)


def split_damping(damping: float) -> float:
    """The per-factor relative damping ``sqrt(damping)``: with ``A_bar = A / N``,
    ``G_bar = G / N``, ``l_A = sqrt(damping) mean(diag A_bar)`` and
    ``l_G = sqrt(damping) mean(diag G_bar)``, so ``l_A l_G = damping * mean(diag(A_bar (x)
    G_bar))``: the Kronecker product is damped by ``damping`` relative to its own scale, and
    the split is the ``pi``-rule of Martens & Grosse (K-FAC, 2015, §6.3: each factor damped in
    proportion to its mean eigenvalue), which makes the score invariant to rescaling ``A``
    against ``G`` and to the number of samples."""
    d = float(damping)
    if not d > 0:
        raise ValueError(f"the Newton scorers need a damping > 0 (relative), got {damping!r}")
    return float(np.sqrt(d))


@jax.jit
def _newton_scores(A, G, gbar, lam, n):
    D = curvature.solve(G, gbar, lam, relative=True)                    # (G + l_G N I)^-1 Gbar
    D = curvature.solve(A, D.T, lam, relative=True).T * n * n          # ... (A_bar + l_A I)^-1
    ia = curvature.inv_diag(A, lam, relative=True) * n                 # diag((A_bar + l_A I)^-1)
    ig = curvature.inv_diag(G, lam, relative=True) * n
    return jnp.square(D) / (ig[:, None] * ia[None, :])


@register("newton")
def newton(s, cfg):
    """OBS-scored K-FAC Newton step. With ``A_bar = A / N``, ``G_bar = G / N`` and the split
    damping of :func:`split_damping` (``damping`` default ``1e-2``, relative):
    ``D = (G_bar + l_G I)^-1 Gbar (A_bar + l_A I)^-1`` (two factor solves, HODLR Woodbury
    for HODLR factors) and
    ``score[o, i] = D[o, i]^2 / (diag((A_bar + l_A I)^-1)[i] diag((G_bar + l_G I)^-1)[o])``:
    the saliency ``w^2 / [H^-1]_ww`` of OBS with the weight replaced by the distance the
    Newton step would move it, and ``H^-1 ~ (A_bar + l_A I)^-1 (x) (G_bar + l_G I)^-1``."""
    lam = split_damping(cfg.damping_or(NEWTON_DAMPING))
    n = float(max(int(s.num_samples), 1))
    return tile_sum(_newton_scores(s.A, s.G, s.grad_mean, lam, n), cfg.block_size)
