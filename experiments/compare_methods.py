"""The tile-selection study (issue 18): which tile scorer, at which budget allocation,
beats `grad` and matches LoRA? (docs/quality.md, "Tile-selection study").

Fine-tunes SmolLM2-135M (embedded, offline) on the Alpaca demo file in stages, deciding on
a validation slice only: ``pilot`` (learning curve, picks the run length), ``screen``
(every scorer of importance.METHODS, allocation variants, LoRA at the tiles' trainable
count, full fine-tuning; one seed; both scopes and sparsities), ``confirm`` (leaders and
baselines, 3 seeds, held-out loss, paired verdicts). Arms: experiments/quality_arms.py;
stages, budget and resume: quality_study.py; tables and verdicts: quality_report.py.

Usage:
  python experiments/compare_methods.py --estimate              # the cost plan, per stage
  python experiments/compare_methods.py --stage pilot           # then screen, confirm (or all)
  python experiments/compare_methods.py --report                # tables of what is finished
  python experiments/compare_methods.py --quick                 # a small smoke study (minutes)
  python experiments/compare_methods.py --report --out experiments/results/quality_full.json
                                                                # the old study (issue 6), history
Resumes run by run: rerun the same command after an interruption.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from quality_report import legacy_markdown, markdown
from quality_study import STAGES, Study, estimate_seconds, settings_for, UNIT_COSTS
from sylva_jax import compile_cache

RESULTS = Path(__file__).resolve().parent / "results"


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", choices=STAGES + ("all",), default="all")
    ap.add_argument("--quick", action="store_true", help="a small smoke study: one scope and sparsity, 3 scorers")
    ap.add_argument("--estimate", action="store_true", help="print the cost plan per stage and exit")
    ap.add_argument("--report", action="store_true", help="print the tables of the results file and exit")
    ap.add_argument("--out", help="results JSON (default experiments/results/tile_selection.json; "
                                  "tile_selection_quick.json with --quick)")
    ap.add_argument("--cache_dir", help="where finished runs' trained weights are kept")
    ap.add_argument("--fresh", action="store_true", help="ignore an existing results file (start over)")
    ap.add_argument("--data")
    ap.add_argument("--model")
    ap.add_argument("--scopes", nargs="+")
    ap.add_argument("--sparsities", nargs="+", type=float)
    ap.add_argument("--scorers", nargs="+", help="tile scorers (default: every one of importance.METHODS)")
    ap.add_argument("--steps", type=int, help="run length of screen and confirm (default: the pilot's choice)")
    ap.add_argument("--batch", type=int)
    ap.add_argument("--seeds", type=int)
    ap.add_argument("--screen_cells", nargs="+", metavar="SCOPE@SPARSITY",
                    help="cells the screen runs in (default: every cell); confirm runs in every cell")
    ap.add_argument("--alloc_scorers", nargs="+", help="scorers also screened with global and proportional allocation")
    ap.add_argument("--leaders", type=int, help="how many screen leaders the confirm stage takes (default 3)")
    ap.add_argument("--no_full", action="store_true", help="skip full fine-tuning's sweep in the screen")
    compile_cache.add_argument(ap)
    return ap


def main(argv=None) -> dict:
    a = parser().parse_args(argv)
    out = Path(a.out) if a.out else RESULTS / ("tile_selection_quick.json" if a.quick else "tile_selection.json")
    if a.report:
        res = json.loads(out.read_text())
        print(markdown(res) if res.get("study") == "tile_selection" else legacy_markdown(res))
        return res
    s = settings_for(a.quick, data=a.data, model=a.model, scopes=a.scopes, sparsities=a.sparsities,
                     scorers=a.scorers, steps=a.steps, batch=a.batch, seeds=a.seeds,
                     screen_cells=a.screen_cells, alloc_scorers=a.alloc_scorers, leaders=a.leaders,
                     full=False if a.no_full else None)
    if a.estimate and not out.exists():
        est = estimate_seconds(s, UNIT_COSTS, set(), None, None, traced=None)
        print("\n".join(f"{k}: {v / 3600:.2f} h" for k, v in est.items()))
        return est
    compile_cache.from_args(a)
    study = Study(s, out, cache_dir=Path(a.cache_dir) if a.cache_dir else None, fresh=a.fresh)
    est = study.estimate()
    print("\n".join(f"{k}: {v / 3600:.2f} h still to run" for k, v in est.items()))
    if a.estimate:
        return est
    res = study.run_stages(STAGES if a.stage == "all" else (a.stage,))
    print(markdown(res))
    return res


if __name__ == "__main__":
    main()
