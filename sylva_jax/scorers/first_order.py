"""First-order and baseline scorers (``docs/algorithm.md`` §4). Per weight, with
``Gbar = (1/N) sum_n dL_n/dW`` and ``F = (1/N) sum_n (dL_n/dW)^2`` (``grad_sq_mean``); the
tile score is the sum over the tile."""
from __future__ import annotations

import zlib

import numpy as np

from sylva_jax.scorers._registry import register, tile_sum


def _grad_sq_mean(s):
    if s.grad_sq_mean is None:
        raise ValueError(
            f"layer {s.name} has no per-sample squared gradients (grad_sq_mean); calibrate "
            "with capture.preprocess(..., per_sample=True)")
    return np.asarray(s.grad_sq_mean, np.float64)


@register("fisher", per_sample=True)
def fisher(s, cfg):
    """Diagonal empirical Fisher (FISH): ``F[o, i] = (1/N) sum_n (dL_n/dW[o, i])^2``."""
    return tile_sum(_grad_sq_mean(s), cfg.block_size)


@register("grad_sq")
def grad_sq(s, cfg):
    """Squared mean gradient ``Gbar[o, i]^2`` (ranks like ``|Gbar|`` within a tile)."""
    return tile_sum(np.square(np.asarray(s.grad_mean, np.float64)), cfg.block_size)


@register("adam_gain", per_sample=True, b=4, eps=1e-12)
def adam_gain(s, cfg):
    """First-order gain of one Adam step on the weight:
    ``Gbar^2 / sqrt(Gbar^2 + s2 / b + eps)``.

    An Adam step moves a weight by ``lr m / sqrt(v)`` with ``m ~ Gbar`` and ``v`` the second
    moment of a minibatch gradient of ``b`` sequences, ``E[g_b^2] = Gbar^2 + s2 / b``, where
    ``s2 = N / (N - 1) (F - Gbar^2)`` is the unbiased per-sample variance (0 when ``N = 1``,
    clipped at 0); the loss falls by ``lr Gbar^2 / sqrt(v)`` to first order. A weight whose
    gradient is mostly noise scores about ``|Gbar| sqrt(b) |Gbar| / s``, one with a steady
    gradient ``|Gbar|``. ``b``: sequences per update (default 4); ``eps`` (default
    ``1e-12`` = Adam's ``1e-6`` squared, since it sits under the root)."""
    b, eps = float(cfg.kwargs["b"]), float(cfg.kwargs["eps"])
    if not b >= 1:
        raise ValueError(f"adam_gain: b (sequences per update) must be >= 1, got {b}")
    n = max(int(s.num_samples), 1)
    g = np.asarray(s.grad_mean, np.float64)
    g2 = np.square(g)
    s2 = np.maximum(_grad_sq_mean(s) - g2, 0.0) * (n / (n - 1) if n > 1 else 0.0)
    return tile_sum(g2 / np.sqrt(g2 + s2 / b + eps), cfg.block_size)


@register("grad")
def grad(s, cfg):
    """Gradient magnitude ``|Gbar[o, i]|``."""
    return tile_sum(np.abs(np.asarray(s.grad_mean, np.float64)), cfg.block_size)


@register("magnitude", stats=False)
def magnitude(s, cfg):
    """Weight magnitude ``|W[o, i]|`` (needs no calibration)."""
    return tile_sum(np.abs(np.asarray(s.weight, np.float64)), cfg.block_size)


@register("random", stats=False)
def random(s, cfg):
    """Uniform scores from a generator seeded by ``(seed, crc32(layer name))``."""
    o, i = s.shape
    bs = cfg.block_size
    rng = np.random.default_rng([int(cfg.seed), zlib.crc32(s.name.encode())])
    return rng.random((o // bs, i // bs))
