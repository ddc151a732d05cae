"""The tile-selection study (issue 18): stages, budget and resume.

Stages, each deciding on the VALIDATION slice only (the held-out set is evaluated for the
confirm stage's reports and chooses nothing):

``pilot``    ``pilot_arms`` at one cell, ``pilot_steps`` updates at a constant rate after
             warm-up, validation loss at ``pilot_points``: the length is the first point
             >= ``min_steps`` where the gap between the masks reached ``gap_frac`` of its
             largest value on the curve (:func:`choose_length`).
``screen``   every arm (:func:`quality_arms.screen_arms`) in every (scope, sparsity) cell,
             one seed. Rates: ``grad`` sweeps per cell and every other tile arm takes its
             rate (tuned for the baseline to beat: the conservative choice); LoRA sweeps
             its own; full fine-tuning sweeps once (scope-independent).
``confirm``  the ``leaders`` best scorers by mean screen validation gap to ``grad`` over
             the cells, plus the baselines, ``seeds`` seeds in every cell; held-out loss
             mean +- std, paired per-seed differences and verdicts (quality_report).

A run's result depends only on the settings and its :class:`quality_arms.RunSpec`; each
finished run is recorded in the results JSON (rewritten atomically after every run), and
its trained weights (tiles, LoRA factors) kept in a run cache, so a stopped study resumes
at its next run with the same results, and the confirm stage's seed 0 is the screen's run.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from quality_arms import Arm, RunSpec, Runner, arm_masks, calibrate, kept_counts, mask_overlap, screen_arms, \
    weights_stats
from sylva_jax import atomic, importance
from sylva_jax.run_cache import RunCache

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = str(REPO.parent / "shared" / "data" / "instruct" / "alpaca_en_demo.json")
BASELINES = ("grad", "random", "sylva", "lora")
# unit costs measured on the shared 2-core CPU (SmolLM2-135M, 256 tokens), used by the
# estimate until the study has measured its own: s per training sequence, s per compile,
# s per evaluated example
UNIT_COSTS = {"tiles": 2.28, "lora": 3.0, "full": 3.4, "compile_s": 30.0, "eval_s_per_example": 0.69,
              "calib_s_per_sample": 4.7}

SETTINGS: dict[str, Any] = dict(
    model="smollm2-135m", data=DEFAULT_DATA, max_len=256, template="plain", split_seed=0,
    n_heldout=150, n_val=32, block_size=64, num_partition=8, calib_samples=32, eval_batch=8,
    lora_dropout=0.0, warmup_frac=0.2, batch=2,
    scopes=["model.layers", "self_attn"], sparsities=[0.99, 0.95],
    pilot_arms=["random", "grad"], pilot_scope="model.layers", pilot_sparsity=0.95, pilot_lr=3.16e-3,
    pilot_steps=128, pilot_points=[16, 32, 64, 128], min_steps=64, gap_frac=0.75, steps=None,
    lr_grid={"tiles": [1e-3, 3.16e-3, 1e-2], "lora": [1e-3, 3.16e-3, 1e-2], "full": [3.16e-5, 1e-4, 3.16e-4]},
    scorers=None, alloc_scorers=["grad", "grad_sq"], leaders=3, seeds=3, screen_cells=None,
    full=True,
)
# the plan: which runs a stage asks for. A run's result depends only on the other settings
# (and its RunSpec), so the plan may grow between sessions of one study (more cells, seeds,
# scorers) without invalidating a finished run; the fingerprint leaves it out.
PLAN = ("scopes", "sparsities", "scorers", "alloc_scorers", "leaders", "seeds", "lr_grid", "steps",
        "screen_cells", "full", "pilot_arms", "pilot_scope", "pilot_sparsity", "pilot_lr", "pilot_steps",
        "pilot_points", "min_steps", "gap_frac")
QUICK = dict(n_val=12, n_heldout=24, calib_samples=8, scopes=["self_attn"], sparsities=[0.95],
             pilot_scope="self_attn", pilot_steps=8, pilot_points=[2, 4, 8], min_steps=4, batch=1,
             lr_grid={"tiles": [3.16e-3], "lora": [3.16e-3], "full": [1e-4]},
             scorers=["grad", "random", "sylva", "magnitude"], alloc_scorers=[], leaders=1, seeds=2)
STAGES = ("pilot", "screen", "confirm")


def settings_for(quick: bool = False, **overrides) -> dict:
    s = {**copy.deepcopy(SETTINGS), **(copy.deepcopy(QUICK) if quick else {})}
    s.update({k: v for k, v in overrides.items() if v is not None})
    if s["scorers"] is None:
        s["scorers"] = list(importance.METHODS)
    screen_cells_of(s)  # a malformed cell fails now rather than after hours of runs
    return s


def cells_of(s: dict) -> list[tuple[str, float]]:
    """Every (scope, sparsity) cell of the plan."""
    return [(scope, sp) for scope in s["scopes"] for sp in s["sparsities"]]


def screen_cells_of(s: dict) -> list[tuple[str, float]]:
    """The cells the screen runs in: ``screen_cells`` (``["scope@sparsity", ...]``), else every cell."""
    return [parse_cell(c) for c in s["screen_cells"]] if s["screen_cells"] else cells_of(s)


def fingerprint(settings: dict) -> str:
    """A hash of the settings that a run's result depends on (everything but :data:`PLAN`)."""
    fixed = {k: v for k, v in settings.items() if k not in PLAN}
    return hashlib.sha256(json.dumps(fixed, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cell_key(scope: str, sparsity: float) -> str:
    return f"{scope}@{sparsity:g}"


def parse_cell(text: str) -> tuple[str, float]:
    """``"model.layers@0.99"`` -> ``("model.layers", 0.99)``."""
    scope, at, sp = text.rpartition("@")
    try:
        if not (scope and at):
            raise ValueError
        return scope, float(sp)
    except ValueError:
        raise ValueError(f"cell {text!r} is not SCOPE@SPARSITY, e.g. model.layers@0.99") from None


def split_indices(n: int, *, seed: int, n_heldout: int, n_val: int) -> dict[str, list[int]]:
    """Fixed split of ``n`` conversations: held-out, validation (carved from the training
    split) and fit (the rest). Disjoint, deterministic in ``seed``."""
    if n_heldout + n_val >= n:
        raise ValueError(f"{n} conversations cannot give {n_heldout} held-out + {n_val} validation + training; "
                         "lower n_heldout / n_val or give a larger data file")
    perm = np.random.default_rng([int(seed), 6]).permutation(n)
    heldout, train = perm[:n_heldout], perm[n_heldout:]
    return {"heldout": sorted(int(i) for i in heldout), "val": sorted(int(i) for i in train[:n_val]),
            "fit": sorted(int(i) for i in train[n_val:])}


def choose_length(curves: dict[str, list], *, min_steps: int, gap_frac: float) -> dict:
    """The run length from the pilot's validation curves ``{arm: [[step, loss], ...]}``
    (same steps): the gap at a step is the largest minus the smallest loss of the arms;
    the length is the first step >= ``min_steps`` whose gap is >= ``gap_frac`` x the
    largest gap at steps >= ``min_steps`` (the last point if none)."""
    steps = [p[0] for p in next(iter(curves.values()))]
    gaps = [float(np.ptp([c[i][1] for c in curves.values()])) for i in range(len(steps))]
    cand = [(st, g) for st, g in zip(steps, gaps) if st >= min_steps] or [(steps[-1], gaps[-1])]
    top = max(g for _, g in cand)
    length = next(st for st, g in cand if g >= gap_frac * top)
    return {"steps": steps, "gaps": gaps, "length": int(length), "rule":
            f"first step >= {min_steps} with gap >= {gap_frac} x the largest gap from there"}


def log(msg: str) -> None:
    print(f"[tile_selection {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Study:
    """The study of ``settings`` writing ``out`` (JSON). ``load_model() -> (graphdef,
    params, tokenizer)`` replaces ``load_pretrained`` (tests: a tiny model)."""

    def __init__(self, settings: dict, out: Path, *, cache_dir: Path | None = None,
                 load_model: Callable[[], tuple] | None = None, fresh: bool = False):
        self.s, self.out, self.fp = settings, Path(out), fingerprint(settings)
        self.res = self._load(fresh)
        root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sylva_jax" / "tile_selection"
        self.cache = RunCache((Path(cache_dir) if cache_dir else root) / self.fp)
        self._load_model, self._stats, self._masks, self._batches = load_model, {}, {}, {}
        self.ran: list[str] = []  # run keys trained by this process (tests check resume)
        self.ready = False

    def _load(self, fresh: bool) -> dict:
        if self.out.exists() and not fresh:
            old = json.loads(self.out.read_text())
            if old.get("fingerprint") != self.fp:
                raise SystemExit(f"{self.out} holds a study with other settings (fingerprint {old.get('fingerprint')} "
                                 f"!= {self.fp}); pass --fresh to start over or --out to write elsewhere")
            log(f"resuming {self.out}: {len(old['runs'])} finished runs")
            old["settings"] = self.s  # the plan may have grown; the runs' settings are the same
            return old
        return {"study": "tile_selection", "fingerprint": self.fp, "settings": self.s, "runs": {}, "cells": {},
                "calibration": {}, "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                               "python": sys.version.split()[0]}}

    def save(self) -> None:
        atomic.write_json(self.out, self.res, indent=1, default=atomic.json_default)

    # ------------------------------------------------------------------ model, data, evaluation
    def setup(self) -> None:
        if self.ready:
            return
        from sylva_jax import evaluation
        from sylva_jax.data.batching import pad_id_of
        from sylva_jax.data.instruct import load_instruct, tokenize_dataset
        from sylva_jax.models import llama

        s = self.s
        if self._load_model is not None:
            self.graphdef, self.params, self.tok = self._load_model()
        else:
            import sylva_jax

            model, self.tok = sylva_jax.load_pretrained(s["model"])
            self.graphdef, self.params = llama.split(model)
        self.pad = pad_id_of(self.tok)
        convs = load_instruct(s["data"])
        split = split_indices(len(convs), seed=s["split_seed"], n_heldout=s["n_heldout"], n_val=s["n_val"])
        self.ex = {part: tokenize_dataset(self.tok, [convs[i] for i in idx], s["max_len"], s["template"])[0]
                   for part, idx in split.items()}
        self.res["data"] = {"source": s["data"], "n_conversations": len(convs), "split": split}
        graphdef = self.graphdef
        self._sums = evaluation.token_sums(lambda p, ids, am: llama.apply(graphdef, p, ids, am))
        self.eval_sets = {k: evaluation.eval_batches(self.ex[k], s["eval_batch"], pad_id=self.pad,
                                                     max_len=s["max_len"]) for k in ("val", "heldout")}
        self.runner = Runner(self.graphdef, self.params, block_size=s["block_size"], evaluate=self.evaluate,
                             lora_dropout=s["lora_dropout"])
        self.res["machine"]["traced_api"] = self.runner.traced
        self.ready = True
        if "base" not in self.res:
            t0 = time.perf_counter()
            self.res["base"] = {k: self.evaluate(self.params, k)["loss"] for k in ("val", "heldout")}
            n = len(self.ex["val"]) + len(self.ex["heldout"])
            self.res["base"]["eval_s_per_example"] = (time.perf_counter() - t0) / n
            self.save()
        log(f"data: fit {len(self.ex['fit'])}, val {len(self.ex['val'])}, held-out {len(self.ex['heldout'])}; "
            f"untuned val {self.res['base']['val']:.4f}; traced API: {self.runner.traced}")

    def evaluate(self, params, which: str) -> dict:
        from sylva_jax.evaluation import heldout_loss

        return heldout_loss(self._sums, params, self.eval_sets[which])

    def batches(self, seed: int, steps: int) -> list:
        """The same batches for every arm of a seed: ``steps`` x ``batch`` fit examples in
        ``epoch_order(seed)``, padded to max_len (one shape); a prefix of a longer run's."""
        from sylva_jax.data.batching import collate, epoch_order

        s, fit, b = self.s, self.ex["fit"], self.s["batch"]
        if len(self._batches.get(seed, ())) < steps:
            order = np.concatenate([epoch_order(len(fit), seed=1000 + seed, epoch=e)
                                    for e in range(-(-steps * b // len(fit)))])
            self._batches[seed] = [collate([fit[int(i)] for i in order[j * b:(j + 1) * b]], pad_id=self.pad,
                                           pad_to=s["max_len"]) for j in range(steps)]
        return self._batches[seed][:steps]

    # ------------------------------------------------------------------ statistics and masks
    def stats(self, scope: str):
        """ONE calibration pass per scope; every scorer's statistics (its seconds recorded)."""
        from sylva_jax import capture
        from sylva_jax.data.batching import batches

        if scope not in self._stats:
            self.setup()
            s = self.s
            calib = batches(self.ex["fit"], min(8, s["calib_samples"]), seed=s["split_seed"] + 1,
                            pad_id=self.pad, pad_to=s["max_len"])
            fn = capture.functional_model((self.graphdef, self.params))
            st, sec = calibrate(fn, calib, scope=scope, num_samples=s["calib_samples"],
                                num_partition=s["num_partition"])
            self._stats[scope] = (st, weights_stats(fn, scope))
            self.res["calibration"][scope] = {"seconds": sec, "num_samples": st.num_samples, "layers": len(st)}
            log(f"calibration {scope}: {st.num_samples} samples, {len(st)} layers, {sec:.0f} s")
        return self._stats[scope]

    def masks(self, scope: str, arm: Arm, sparsity: float, seed: int) -> dict:
        seed = seed if arm.scorer == "random" else 0
        key = (scope, arm.name, sparsity, seed)
        if key not in self._masks:
            full, weights_only = self.stats(scope)
            st = full if arm.scorer in importance.NEEDS_STATS else weights_only
            self._masks[key] = arm_masks(st, arm, sparsity=sparsity, block_size=self.s["block_size"], seed=seed,
                                         batch=self.s["batch"])
        return self._masks[key]

    def tile_budget(self, scope: str, sparsity: float) -> int:
        """Trainable weights of the tile arms at ``sparsity`` (per-layer top-k counts)."""
        bs = self.s["block_size"]
        return sum(self.masks(scope, Arm("tiles", "magnitude"), sparsity, 0)[n].sum() for n in
                   self.masks(scope, Arm("tiles", "magnitude"), sparsity, 0)) * bs * bs

    # ------------------------------------------------------------------ one run
    def run(self, spec: RunSpec, *, eval_at: dict | None = None, heldout: bool = False) -> dict:
        """The record of ``spec``: from the results file if finished, else trained (and
        stored: record in the JSON, weights in the run cache). The validation loss of the
        end is always taken; the held-out loss only with ``heldout`` (reported runs)."""
        rec = self.res["runs"].get(spec.key)
        if rec is None:
            self.setup()
            arm = spec.arm
            masks = self.masks(spec.scope, arm, spec.sparsity, spec.seed) if arm.family == "tiles" else None
            rank = (self.runner.lora_rank(spec.scope, self.tile_budget(spec.scope, spec.sparsity))
                    if arm.family == "lora" else None)
            evals = {**(eval_at or {}), spec.steps: "val"}
            rec, params, kept = self.runner.train(spec, self.batches(spec.seed, spec.steps), masks=masks,
                                                  rank=rank, eval_at=evals)
            rec["val_loss"] = rec["curve"][-1][1]
            if heldout or arm.family == "full":  # full keeps no weights: evaluate it now if ever
                rec["heldout_loss"] = self.evaluate(params, "heldout")["loss"]
            if kept is not None:
                self.cache.save(_stem(spec.key), {"key": spec.key}, kept)
            self.res["runs"][spec.key] = rec
            self.ran.append(spec.key)
            self.save()
            log(f"  {spec.key}: train {rec['train_losses'][0]:.4f} -> {rec['train_losses'][-1]:.4f}, "
                f"val {rec['val_loss']:.4f} ({rec['train_s']:.0f} s)")
        if heldout and "heldout_loss" not in rec:
            rec["heldout_loss"] = self.evaluate(self.kept_params(spec, rec), "heldout")["loss"]
            self.save()
        return rec

    def retrain(self, spec: RunSpec, rec: dict) -> None:
        """Train a finished run again whose kept weights are gone (the run cache lives on
        one machine, the results file in the repository), into the cache; its validation
        loss must be the recorded one (a run is a function of its settings and spec)."""
        arm = spec.arm
        masks = self.masks(spec.scope, arm, spec.sparsity, spec.seed) if arm.family == "tiles" else None
        rank = rec.get("lora_rank") if arm.family == "lora" else None
        log(f"  {spec.key}: kept weights not in the run cache, training it again")
        again, _, kept = self.runner.train(spec, self.batches(spec.seed, spec.steps), masks=masks, rank=rank,
                                           eval_at={spec.steps: "val"})
        val = again["curve"][-1][1]
        if abs(val - rec["val_loss"]) > 1e-4 * abs(rec["val_loss"]):
            raise RuntimeError(f"run {spec.key} trained again reached validation loss {val:.6f}, the record says "
                               f"{rec['val_loss']:.6f}: the code or the machine changed what a run computes; "
                               "start a fresh study (--fresh) rather than mix the two")
        self.cache.save(_stem(spec.key), {"key": spec.key}, kept)

    def kept_params(self, spec: RunSpec, rec: dict):
        """The parameters of a finished run, rebuilt from its kept weights."""
        import jax

        self.setup()
        fam = spec.arm.family
        if self.cache.record(_stem(spec.key)) is None:
            self.retrain(spec, rec)
        if fam == "tiles":
            masks = self.masks(spec.scope, spec.arm, spec.sparsity, spec.seed)
            treedef = jax.tree.structure({n: 0 for n in masks})
            _, kept, _ = self.cache.load(_stem(spec.key), treedef, snapshots=False)
            return self.runner.params_from(fam, kept, masks=masks)
        _, kept, _ = self.cache.load(_stem(spec.key), self.runner.lora_treedef(spec.scope, rec["lora_rank"]),
                                     snapshots=False)
        return self.runner.params_from(fam, kept)

    def spec(self, arm: Arm, scope: str, sparsity: float, lr: float, seed: int = 0, **kw) -> RunSpec:
        return RunSpec(arm, scope, sparsity, lr, seed, kw.pop("steps", self.length()),
                       warmup_frac=self.s["warmup_frac"], **kw)

    def sweep(self, arm: Arm, scope: str, sparsity: float) -> dict:
        """The rate of ``arm`` in a cell: its grid on the validation slice (seed 0)."""
        grid = self.s["lr_grid"][arm.family]
        recs = [self.run(self.spec(arm, scope, sparsity, lr)) for lr in grid]
        best = min(recs, key=lambda r: r["val_loss"])
        return {"arm": arm.name, "grid": grid, "val": [r["val_loss"] for r in recs], "lr": best["lr"],
                "at_grid_edge": len(grid) > 1 and best["lr"] in (grid[0], grid[-1])}

    # ------------------------------------------------------------------ stages
    def pilot(self) -> dict:
        """The learning curve of the pilot arms; chooses the run length (recorded)."""
        s = self.s
        points = sorted(p for p in s["pilot_points"] if p <= s["pilot_steps"])
        curves = {}
        for name in s["pilot_arms"]:
            spec = RunSpec(Arm.parse(name), s["pilot_scope"], s["pilot_sparsity"], s["pilot_lr"], 0,
                           s["pilot_steps"], schedule="constant", warmup_frac=s["warmup_frac"] * points[0] / s["pilot_steps"])
            rec = self.run(spec, eval_at={p: "val" for p in points})
            curves[name] = [[st, v] for st, v in rec["curve"] if st in points]
        choice = choose_length(curves, min_steps=s["min_steps"], gap_frac=s["gap_frac"])
        self.res["pilot"] = {"curves": curves, **choice, "lr": s["pilot_lr"], "scope": s["pilot_scope"],
                             "sparsity": s["pilot_sparsity"]}
        self.save()
        log(f"pilot: gaps " + ", ".join(f"{st}: {g:.4f}" for st, g in zip(choice["steps"], choice["gaps"]))
            + f" -> length {choice['length']}")
        return self.res["pilot"]

    def length(self) -> int:
        """The run length of screen and confirm: ``steps`` if given, else the pilot's choice."""
        if self.s["steps"]:
            return int(self.s["steps"])
        if "pilot" not in self.res:
            raise RuntimeError("the run length comes from the pilot: run --stage pilot first (or give --steps)")
        return int(self.res["pilot"]["length"])

    def cells(self):
        return cells_of(self.s)

    def screen_cells(self):
        return screen_cells_of(self.s)

    def _ref(self) -> Arm:
        return Arm("tiles", "grad") if "grad" in self.s["scorers"] else Arm("tiles", self.s["scorers"][0])

    def rates(self, scope: str, sparsity: float) -> dict:
        """The cell's rates, swept once on validation (seed 0): the reference tile arm's
        (``grad``; every other tile arm takes it) and LoRA's."""
        cell = self.res["cells"].setdefault(cell_key(scope, sparsity), {"scope": scope, "sparsity": sparsity})
        if "rates" not in cell:
            cell["rates"] = {"tiles": self.sweep(self._ref(), scope, sparsity),
                             "lora": self.sweep(Arm("lora"), scope, sparsity)}
            self.save()
        return cell["rates"]

    def screen(self) -> dict:
        """Every arm in every screen cell, one seed; rates chosen on validation (module doc)."""
        s = self.s
        arms = screen_arms(s["scorers"], s["alloc_scorers"])
        for scope, sp in self.screen_cells():
            rates = self.rates(scope, sp)
            cell = self.res["cells"][cell_key(scope, sp)]
            ref = self._ref()
            screen = {}
            for arm in arms:
                lr = rates[arm.family]["lr"]
                screen[arm.name] = {"lr": lr, "val_loss": self.run(self.spec(arm, scope, sp, lr))["val_loss"]}
            cell["screen"] = screen
            if "kept_counts" not in cell:  # a resumed study recorded them already
                self.mask_diagnostics(cell, [a for a in arms if a.family == "tiles"], ref)
            self.save()
        if s["full"] and "full" not in self.res:
            scope, sp = self.cells()[0]
            self.res["full"] = self.sweep(Arm("full"), scope, sp)
            self.save()
        return self.res["cells"]

    def mask_diagnostics(self, cell: dict, arms: list, ref: Arm) -> None:
        """Per tile arm of a cell (seed 0): per-layer kept counts (allocation arms) and the
        fraction of its tiles that ``ref`` (grad) keeps too."""
        scope, sp = cell["scope"], cell["sparsity"]
        refm = self.masks(scope, ref, sp, 0)
        cell["overlap_with_" + ref.name] = {a.name: mask_overlap(self.masks(scope, a, sp, 0), refm) for a in arms}
        cell["kept_counts"] = {a.name: kept_counts(self.masks(scope, a, sp, 0)) for a in arms
                               if a.allocation != "layer" or a == ref}

    def leaders(self) -> list[str]:
        """The ``leaders`` best non-baseline tile arms by the mean, over the cells, of
        (screen validation loss - grad's); decided on validation only."""
        gaps: dict[str, list] = {}
        for cell in self.res["cells"].values():
            if "screen" not in cell:
                continue
            g = cell["screen"]["grad"]["val_loss"]
            for name, r in cell["screen"].items():
                if name not in BASELINES and Arm.parse(name).family == "tiles":
                    gaps.setdefault(name, []).append(r["val_loss"] - g)
        ranked = sorted(gaps, key=lambda n: float(np.mean(gaps[n])))
        return ranked[: self.s["leaders"]]

    def confirm(self) -> dict:
        """Leaders and baselines, ``seeds`` seeds in every cell, at the cell's rates (swept
        here for a cell the screen did not cover); held-out loss per seed."""
        if any("screen" not in self.res["cells"].get(cell_key(*c), {}) for c in self.screen_cells()):
            raise RuntimeError("confirm needs a finished screen: run --stage screen first")
        leaders = self.leaders()
        names = leaders + [b for b in BASELINES if b in self.s["scorers"] or b == "lora"]
        out = {"leaders": leaders, "arms": names, "cells": {}}
        for scope, sp in self.cells():
            key, rates = cell_key(scope, sp), self.rates(scope, sp)
            rows = {}
            for name in names:
                arm = Arm.parse(name)
                lr = rates["lora" if arm.family == "lora" else "tiles"]["lr"]
                recs = [self.run(self.spec(arm, scope, sp, lr, seed), heldout=True)
                        for seed in range(self.s["seeds"])]
                rows[name] = {"lr": lr, "heldout": [r["heldout_loss"] for r in recs],
                              "val_seed0": recs[0]["val_loss"], "trainable_params": recs[0]["trainable_params"]}
            out["cells"][key] = rows
            self.res["confirm"] = out
            self.save()
        return out

    def run_stages(self, stages) -> dict:
        for st in stages:
            log(f"stage {st}: estimated {self.estimate()[st] / 3600:.2f} h")
            getattr(self, st)()
        self.res["unit_costs"] = self.unit_costs()
        self.save()
        return self.res

    # ------------------------------------------------------------------ budget
    def unit_costs(self) -> dict:
        """Unit costs measured by this study's finished runs, else :data:`UNIT_COSTS`."""
        u = dict(UNIT_COSTS)
        runs = list(self.res["runs"].values())
        for fam in ("tiles", "lora", "full"):
            per_seq = [r["step_s_median"] * r["steps"] / r["sequences"] for r in runs if r["family"] == fam]
            if per_seq:
                u[fam] = float(np.median(per_seq))
        comp = [r["first_step_s"] - r["step_s_median"] for r in runs if not r["reused_compiled_step"]]
        if comp:
            u["compile_s"] = float(np.median(comp))
        if "base" in self.res:
            u["eval_s_per_example"] = self.res["base"]["eval_s_per_example"]
        cal = [c["seconds"] / c["num_samples"] for c in self.res["calibration"].values()]
        if cal:
            u["calib_s_per_sample"] = float(np.mean(cal))
        return u

    def estimate(self) -> dict[str, float]:
        """Seconds of each stage still to run at the unit costs (finished runs cost 0;
        the run length before the pilot is ``min_steps``)."""
        return estimate_seconds(self.s, self.unit_costs(), set(self.res["runs"]),
                                self.res.get("pilot", {}).get("length"), self.res.get("confirm", {}).get("leaders"),
                                traced=self.res["machine"].get("traced_api", None))


def _stem(key: str) -> str:
    """A run key as a file-name stem."""
    return key.replace("|", "__").replace("/", "_")


def estimate_seconds(s: dict, u: dict, done: set, length: int | None, leaders: list | None,
                     traced: bool | None) -> dict[str, float]:
    """Per stage, the cost of the runs not in ``done``: training sequences, the evaluated
    examples, a compile per new shape (traced API) or per run (static), calibrations."""
    from quality_arms import traced_api

    traced = traced_api() if traced is None else traced
    L, b, ev = int(s["steps"] or length or s["min_steps"]), s["batch"], u["eval_s_per_example"]
    calib = u["calib_s_per_sample"] * s["calib_samples"]

    def cost(spec: RunSpec, n_eval: int, compile_: bool) -> float:
        if spec.key in done:
            return 0.0
        return spec.steps * b * u[spec.arm.family] + n_eval * ev + (u["compile_s"] if compile_ or not traced else 0)

    pts = [p for p in s["pilot_points"] if p <= s["pilot_steps"]]
    pilot = calib + sum(cost(RunSpec(Arm.parse(a), s["pilot_scope"], s["pilot_sparsity"], s["pilot_lr"], 0,
                                     s["pilot_steps"], schedule="constant"), len(pts) * s["n_val"], True)
                        for a in s["pilot_arms"])
    arms = screen_arms(s["scorers"], s["alloc_scorers"])
    cells, scells = cells_of(s), screen_cells_of(s)
    g = s["lr_grid"]

    def sweeps(scope, sp):
        return ([RunSpec(Arm("tiles", "grad"), scope, sp, lr, 0, L) for lr in g["tiles"]]
                + [RunSpec(Arm("lora"), scope, sp, lr, 0, L) for lr in g["lora"]])

    screen = calib * len({scope for scope, _ in scells})
    for scope, sp in scells:
        specs = sweeps(scope, sp) + [RunSpec(a, scope, sp, -1.0, 0, L) for a in arms if a.name not in ("grad", "lora")]
        shapes = 2 + sum(a.allocation != "layer" for a in arms)
        screen += sum(cost(x, s["n_val"], False) for x in specs) + (shapes * u["compile_s"] if traced else 0)
    if s["full"]:
        screen += sum(cost(RunSpec(Arm("full"), "", 0.0, lr, 0, L), s["n_val"] + s["n_heldout"], True)
                      for lr in s["lr_grid"]["full"])
    n_conf = (len(leaders) if leaders else s["leaders"]) + len(BASELINES)
    confirm = len(cells) * n_conf * ((s["seeds"] - 1) * (L * b * u["tiles"] + s["n_val"] * ev)
                                     + s["seeds"] * s["n_heldout"] * ev)
    for scope, sp in cells:  # a cell the screen did not cover: its sweeps, and the seed-0 runs of the others
        if (scope, sp) not in scells:
            confirm += (calib if scope not in {c for c, _ in scells} else 0) + sum(
                cost(x, s["n_val"], False) for x in sweeps(scope, sp)) + (n_conf - 2) * (L * b * u["tiles"])
    return {"pilot": pilot, "screen": screen, "confirm": confirm}
