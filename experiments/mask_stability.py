"""Diagnostic: do the tile masks change with the number of calibration samples?

Uses the tile-selection study's own setup (``quality_study.settings_for()``: SmolLM2-135M,
the Alpaca demo split, block 64) and its mask code (``Study.masks``, one calibration pass
per scope and size). The calibration batches come in one fixed order, so the smaller sets
are prefixes of the larger. For each scorer it reports, against the masks from the largest
size:

  overlap     the fraction of kept tiles also kept at the largest size (1.0: same mask);
  spread      distinct tile rows / columns touched per layer (:func:`mask_spread`).

No training: if a scorer's mask barely moves between 32 and 128 samples, more samples
cannot change its training result. (The recorded results/mask_stability.json predates the
scorer registry: its ``fisher`` is today's ``grad_sq`` and ``sylva_reldamp`` was Sylva at
relative damping 0.1.)

Writes experiments/results/mask_stability.json. Usage:
python experiments/mask_stability.py [--samples 32 128] [--scope model.layers] [--sparsity 0.95]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from quality_arms import Arm, mask_overlap
from quality_study import Study, log, settings_for
from sylva_jax import atomic, compile_cache, importance

OUT = os.path.join(os.path.dirname(__file__), "results", "mask_stability.json")
SCORERS = ("sylva", "sylva_published", "kfac", "newton", "tile_newton", "fisher", "grad")


def mask_spread(masks: dict) -> dict:
    """Mean over layers of (distinct rows of tiles kept) / min(k, rows), and the same for
    columns: 1.0 when the ``k`` kept tiles never share a row (column) where they need not."""
    rows = [m.any(1).sum() / min(m.sum(), m.shape[0]) for m in masks.values() if m.sum()]
    cols = [m.any(0).sum() / min(m.sum(), m.shape[1]) for m in masks.values() if m.sum()]
    return {"rows": float(np.mean(rows)), "cols": float(np.mean(cols))}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--scope", default="model.layers")
    ap.add_argument("--sparsity", type=float, default=0.95)
    ap.add_argument("--scorers", nargs="+", default=list(SCORERS), choices=importance.METHODS)
    ap.add_argument("--out", default=OUT)
    compile_cache.add_argument(ap)
    args = ap.parse_args(argv)
    compile_cache.from_args(args)
    sizes = sorted(set(args.samples))
    masks, calib = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            st = Study(settings_for(calib_samples=n), Path(tmp) / f"probe_{n}.json",
                       cache_dir=Path(tmp) / f"cache_{n}", fresh=True)
            t0 = time.perf_counter()
            for name in args.scorers:
                masks[(n, name)] = st.masks(args.scope, Arm.parse(name), args.sparsity, 0)
            calib[str(n)] = dict(st.res["calibration"][args.scope], masks_s=time.perf_counter() - t0)
            log(f"{n} samples: {calib[str(n)]}")
            del st
    top = sizes[-1]
    rows = {name: {str(n): {"overlap_with_largest": mask_overlap(masks[(n, name)], masks[(top, name)]),
                            "spread": mask_spread(masks[(n, name)])} for n in sizes}
            for name in args.scorers}
    for name, r in rows.items():
        log(f"{name}: overlap with {top} samples " +
            ", ".join(f"{n}: {r[n]['overlap_with_largest']:.2f}" for n in r))
    result = {"scope": args.scope, "sparsity": args.sparsity, "block_size": settings_for()["block_size"],
              "samples": sizes, "calibration": calib, "masks": rows}
    atomic.write_json(args.out, result)
    log(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
