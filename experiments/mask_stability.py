"""Diagnostic for issue 6: do the tile masks change with the number of calibration samples?

Uses the quality study's own setup (``compare_methods.settings_for("full")``: SmolLM2-135M,
the Alpaca demo split, block 64, sparsity 0.95) and its mask code (``Study.masks``), once
per calibration size. The calibration batches come in one fixed order, so the smaller
sets are prefixes of the larger. For each mask method it reports, against the masks from
the largest size:

  overlap     the fraction of kept tiles also kept at the largest size (1.0: same mask);
  spread      distinct tile columns / rows touched per layer (``compare_methods.mask_spread``);

and the fraction of negative HODLR inverse-diagonal entries per size. No training: if a
method's mask barely moves between 32 and 128 samples, more samples cannot change its
training result.

Writes experiments/results/mask_stability.json. Usage:
python experiments/mask_stability.py [--samples 32 128] [--scope model.layers]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import compare_methods as cm  # noqa: E402

from sylva_jax import compile_cache
from sylva_jax import atomic  # noqa: E402

OUT = os.path.join(os.path.dirname(__file__), "results", "mask_stability.json")
METHODS = ("sylva", "sylva_reldamp", "kfac", "fisher", "grad")


def main() -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--scope", default="model.layers")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=sorted(cm.TILE_SPEC))
    ap.add_argument("--out", default=OUT)
    compile_cache.add_argument(ap)
    args = ap.parse_args()
    compile_cache.from_args(args)
    sizes = sorted(set(args.samples))
    base = cm.settings_for("full")
    masks, calib = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            s = dict(base, calib_samples=n)
            st = cm.Study(s, Path(tmp) / f"probe_{n}.json", cache_dir=Path(tmp) / f"cache_{n}", fresh=True)
            st.setup()
            t0 = time.perf_counter()
            for arm in args.methods:
                masks[(n, arm)] = st.masks(args.scope, arm, s["sparsity"], 0)
            calib[str(n)] = dict(st.res["calibration"][args.scope], masks_s=time.perf_counter() - t0)
            cm.log(f"{n} samples: {calib[str(n)]}")
            del st
    top = sizes[-1]
    rows = {}
    for arm in args.methods:
        ref = masks[(top, arm)]
        rows[arm] = {}
        for n in sizes:
            m = masks[(n, arm)]
            rows[arm][str(n)] = {"overlap_with_largest": cm.mask_overlap(m, ref), "spread": cm.mask_spread(m)}
        cm.log(f"{arm}: overlap with {top} samples " +
               ", ".join(f"{n}: {rows[arm][str(n)]['overlap_with_largest']:.2f}" for n in sizes))
    result = {"scope": args.scope, "sparsity": base["sparsity"], "block_size": base["block_size"],
              "samples": sizes, "calibration": calib, "masks": rows}
    atomic.write_json(args.out, result)
    cm.log(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
