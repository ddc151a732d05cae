"""Tables and verdicts of the tile-selection study (and the old quality study's tables).

Verdict of an arm against a reference in one cell, from the held-out losses of the same
seeds (a seed fixes the data order, so differences are paired): ``d_s = arm_s - ref_s``
(negative: the arm is better), ``spread = max(std(arm), std(ref))`` (sample std over
seeds). ``win`` if ``mean(d) < -spread``, ``loss`` if ``mean(d) > spread``, else ``tie``
(within the seed spread). With one seed there is no spread and no verdict.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np


def verdict(arm: Sequence[float], ref: Sequence[float]) -> dict:
    """Paired comparison of two arms' per-seed held-out losses (module doc)."""
    a, r = np.asarray(arm, float), np.asarray(ref, float)
    if a.shape != r.shape or a.size == 0:
        raise ValueError(f"verdict needs the same seeds for both arms, got {a.size} and {r.size} losses")
    d = a - r
    spread = max(a.std(ddof=1), r.std(ddof=1)) if a.size > 1 else None
    if spread is None:
        word = None
    else:
        word = "win" if d.mean() < -spread else "loss" if d.mean() > spread else "tie"
    return {"diff_per_seed": d.tolist(), "diff_mean": float(d.mean()), "spread": spread, "verdict": word,
            "better_every_seed": bool((d < 0).all())}


def confirm_table(res: dict, refs: Sequence[str] = ("grad", "lora")) -> dict:
    """Per cell and arm: held-out mean +- std and the verdicts against ``refs``."""
    out = {}
    for key, rows in res.get("confirm", {}).get("cells", {}).items():
        cell = {}
        for name, r in rows.items():
            h = np.asarray(r["heldout"])
            cell[name] = {"mean": float(h.mean()), "std": float(h.std(ddof=1)) if h.size > 1 else None,
                          "lr": r["lr"], "trainable_params": r["trainable_params"],
                          "vs": {ref: verdict(h, rows[ref]["heldout"]) for ref in refs if ref in rows and ref != name}}
        out[key] = cell
    return out


def _fmt(x, spec=".4f"):
    return "-" if x is None else format(x, spec)


def markdown(res: dict) -> str:
    """Markdown tables of whatever stages of a tile-selection results file are finished."""
    lines = [f"tile-selection study {res['fingerprint']}: {len(res['runs'])} runs finished; untuned val "
             f"{_fmt(res.get('base', {}).get('val'))}, held-out {_fmt(res.get('base', {}).get('heldout'))}", ""]
    if "pilot" in res:
        p = res["pilot"]
        lines += [f"pilot ({p['scope']} @ {p['sparsity']:g}, lr {p['lr']:.3g}, constant rate): validation loss",
                  "", "| step | " + " | ".join(p["curves"]) + " | gap |",
                  "|---|" + "---|" * (len(p["curves"]) + 1)]
        for i, st in enumerate(p["steps"]):
            lines.append(f"| {st} | " + " | ".join(f"{c[i][1]:.4f}" for c in p["curves"].values())
                         + f" | {p['gaps'][i]:.4f} |")
        lines += ["", f"chosen length: {p['length']} updates ({p['rule']})", ""]
    for key, cell in res.get("cells", {}).items():
        if "screen" not in cell:
            continue
        ov = cell.get("overlap_with_grad", {})
        lines += [f"screen {key} (one seed; tile rate {cell['rates']['tiles']['lr']:.3g} from grad's sweep, "
                  f"LoRA {cell['rates']['lora']['lr']:.3g})", "",
                  "| arm | val loss | vs grad | tiles shared with grad |", "|---|---|---|---|"]
        g = cell["screen"].get("grad", {}).get("val_loss")
        for name, r in sorted(cell["screen"].items(), key=lambda kv: kv[1]["val_loss"]):
            lines.append(f"| {name} | {r['val_loss']:.4f} | {_fmt(None if g is None else r['val_loss'] - g, '+.4f')} "
                         f"| {_fmt(ov.get(name), '.2f')} |")
        lines.append("")
    if "full" in res:
        lines += [f"full fine-tuning: lr {res['full']['lr']:.3g}, val {min(res['full']['val']):.4f}", ""]
    for key, cell in confirm_table(res).items():
        lines += [f"confirm {key}: held-out loss over seeds; d = arm - ref per seed (negative: arm better)", "",
                  "| arm | lr | held-out mean +- std | vs grad: mean d (spread) | vs lora: mean d (spread) |",
                  "|---|---|---|---|---|"]
        for name, r in sorted(cell.items(), key=lambda kv: kv[1]["mean"]):
            vs = [f"{v['diff_mean']:+.4f} ({_fmt(v['spread'])}) {v['verdict'] or ''}" if v else "-"
                  for v in (r["vs"].get("grad"), r["vs"].get("lora"))]
            lines.append(f"| {name} | {r['lr']:.3g} | {r['mean']:.4f} +- {_fmt(r['std'])} | {vs[0]} | {vs[1]} |")
        lines.append("")
    return "\n".join(lines)


def legacy_markdown(res: dict) -> str:
    """The table of the old quality study's results (quality.json, quality_full.json)."""
    lines = [f"untuned held-out loss {res['base']['heldout_loss']:.4f}; arms finished: {len(res['arms'])}", "",
             "| arm | lr | held-out loss, mean +- std (seeds) | vs untuned | trainable |", "|---|---|---|---|---|"]
    rows = sorted(res["arms"].items(), key=lambda kv: ("@" in kv[0], kv[1]["scope"] or "", kv[1]["heldout_mean"]))
    for key, a in rows:
        std = f" +- {a['heldout_std']:.4f}" if a["heldout_std"] is not None else ""
        lines.append(f"| {key} | {a['best_lr']:.2g} | {a['heldout_mean']:.4f}{std} ({len(a['runs'])}) | "
                     f"{-a['improvement']:+.4f} | {a['trainable_params']:,} |")
    return "\n".join(lines)
