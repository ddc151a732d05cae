"""What one arm of the tile-selection study is, and how one run of it trains.

An arm is a value (:class:`Arm`): a tile scorer with a budget allocation (the masks of
docs/algorithm.md §4), LoRA at the tiles' trainable count, or full fine-tuning. A run is
an arm at one scope, sparsity, learning rate and seed, trained for ``steps`` updates on
the seed's batches (:class:`Runner.train`).

One compiled step per shape: where the library has traced tile coordinates and a traced
peak rate (``methods.sylva_traced``, ``make_train_step(traced_lr=True)``), every tile arm
with the same per-layer tile counts, and every rate, reuses one compiled step; without
them each (arm, rate) compiles its own step (the static path, same numbers).
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sylva_jax import adapter as adapter_lib
from sylva_jax import capture, evaluation, importance, methods
from sylva_jax import tree as tree_lib
from sylva_jax.lora import merge_lora, rank_for_budget
from sylva_jax.train import make_train_step

FAMILIES = ("tiles", "lora", "full")
ALLOCATIONS = ("layer", "global", "proportional")


@dataclasses.dataclass(frozen=True)
class Arm:
    """``family`` "tiles" (``scorer``, ``allocation``), "lora" or "full"."""
    family: str
    scorer: str | None = None
    allocation: str = "layer"

    @property
    def name(self) -> str:
        if self.family != "tiles":
            return self.family
        return self.scorer if self.allocation == "layer" else f"{self.scorer}+{self.allocation}"

    @classmethod
    def parse(cls, name: str) -> "Arm":
        """The inverse of :attr:`name`: ``"lora"``, ``"full"``, ``"grad"``, ``"grad+global"``."""
        if name in ("lora", "full"):
            return cls(name)
        scorer, _, alloc = name.partition("+")
        alloc = alloc or "layer"
        if scorer not in importance.METHODS or alloc not in ALLOCATIONS:
            raise ValueError(f"unknown arm {name!r}: use lora, full, or a scorer of importance.METHODS "
                             f"{importance.METHODS} with an optional '+global' / '+proportional'")
        return cls("tiles", scorer, alloc)


def supports(fn: Callable, arg: str) -> bool:
    """Whether the library function ``fn`` takes the keyword ``arg`` (an API that other
    branches add: allocation, per-sample statistics, traced rates)."""
    return arg in inspect.signature(fn).parameters


def traced_api() -> bool:
    """Traced tile coordinates and a traced peak rate are both available."""
    return (hasattr(adapter_lib, "TileLayout") and hasattr(methods, "sylva_traced")
            and supports(make_train_step, "traced_lr"))


def screen_arms(scorers: Sequence[str], alloc_scorers: Sequence[str]) -> list[Arm]:
    """Every scorer with per-layer top-k, the allocation variants of ``alloc_scorers``
    (those in ``scorers``; only where the library has ``select_blocks(allocation=)``),
    then LoRA."""
    arms = [Arm("tiles", s) for s in scorers]
    if supports(importance.select_blocks, "allocation"):
        arms += [Arm("tiles", s, a) for s in alloc_scorers if s in scorers for a in ALLOCATIONS[1:]]
    return arms + [Arm("lora")]


# ------------------------------------------------------------------ calibration and masks
def calibrate(fn, batches, *, scope: str, num_samples: int, num_partition: int) -> tuple[Any, float]:
    """ONE calibration pass of ``scope`` giving every scorer's statistics: HODLR factors,
    exact dense factors (``kfac``), mean gradients and, where supported, per-sample squared
    gradients (true Fisher, ``adam_gain``). Returns ``(stats, seconds)``."""
    kw = {"per_sample": True} if supports(capture.preprocess, "per_sample") else {}
    t0 = time.perf_counter()
    st = capture.preprocess(fn, batches, scope=scope, num_samples=num_samples, num_partition=num_partition,
                            keep_dense=True, damping=1e-6, **kw)
    return st, time.perf_counter() - t0


def weights_stats(fn, scope: str):
    """Weights-only statistics of ``scope`` (``magnitude``, ``random``)."""
    return capture.Stats(layers={n: capture.LayerStats(name=n, weight=w)
                                 for n, w in capture.scoped_weights(fn, scope).items()}, scope=scope)


def arm_masks(stats, arm: Arm, *, sparsity: float, block_size: int, seed: int, batch: int) -> dict[str, np.ndarray]:
    """The arm's masks ``{path: bool [out/bs, in/bs]}``; ``seed`` draws ``random``'s tiles;
    ``batch`` (sequences per update) is ``adam_gain``'s ``b``."""
    kw = {"allocation": arm.allocation} if arm.allocation != "layer" else {}
    if arm.scorer == "adam_gain":
        kw["b"] = int(batch)
    return importance.select_blocks(stats, sparsity=sparsity, block_size=block_size, method=arm.scorer,
                                    seed=seed, **kw)


def kept_counts(masks: Mapping[str, np.ndarray]) -> dict[str, int]:
    return {n: int(m.sum()) for n, m in masks.items()}


def mask_overlap(masks: Mapping[str, np.ndarray], ref: Mapping[str, np.ndarray]) -> float:
    """The fraction of the tiles kept by ``masks`` that ``ref`` keeps too."""
    both = sum(int((masks[n] & ref[n]).sum()) for n in ref)
    return both / max(sum(int(m.sum()) for m in masks.values()), 1)


# ------------------------------------------------------------------ trained weights on the host
def tiles_of(params, masks: Mapping[str, np.ndarray], bs: int) -> dict[str, np.ndarray]:
    """``{path: [k, bs, bs]}``: the kept tiles of ``params`` (``[out, in]`` weights), in
    row-major tile order: a run's trained tiles, whatever method trained them."""
    flat = tree_lib.flatten(params)
    out = {}
    for n, m in masks.items():
        w = np.asarray(flat[n])
        out[n] = np.stack([w[r * bs:(r + 1) * bs, c * bs:(c + 1) * bs] for r, c in zip(*np.nonzero(m))])
    return out


def with_tiles(params, masks: Mapping[str, np.ndarray], tiles: Mapping[str, np.ndarray], bs: int):
    """``params`` (its tree structure kept exactly) with the tiles of :func:`tiles_of`
    written back, as host copies."""
    def put(name, w):
        w = np.array(w)
        if name in masks:
            for t, (r, c) in zip(tiles[name], zip(*np.nonzero(masks[name]))):
                w[r * bs:(r + 1) * bs, c * bs:(c + 1) * bs] = t
        return w

    return tree_lib.map_flat(put, params)


# ------------------------------------------------------------------ training
@dataclasses.dataclass
class RunSpec:
    """One run: an arm at a scope, sparsity, rate and seed, ``steps`` updates long, with
    the rate's ``schedule`` ("linear": 20% warm-up then linear decay to 0; "constant":
    warm-up then flat, the pilot's learning curve)."""
    arm: Arm
    scope: str
    sparsity: float
    lr: float
    seed: int
    steps: int
    schedule: str = "linear"
    warmup_frac: float = 0.2

    @property
    def key(self) -> str:
        scope = "any" if self.arm.family == "full" else self.scope
        sp = "-" if self.arm.family == "full" else f"{self.sparsity:g}"
        return (f"{scope}|{sp}|{self.arm.name}|lr{self.lr:.4g}|seed{self.seed}|{self.steps}"
                + ("" if self.schedule == "linear" else f"|{self.schedule}"))

    @property
    def warmup(self) -> int:
        return min(int(round(self.warmup_frac * self.steps)), self.steps - 1)


class Runner:
    """Trains runs of one model: ``graphdef`` and base ``params`` (never modified; every
    run starts from a copy), with ``evaluate(params, which) -> {"loss": ...}`` on the
    study's evaluation sets. Compiled steps are kept per shape (:meth:`trainer`)."""

    def __init__(self, graphdef, params, *, block_size: int, evaluate: Callable, lora_dropout: float = 0.0,
                 traced: bool | None = None, keep_compiled: int = 4):
        self.graphdef, self.params, self.bs = graphdef, params, int(block_size)
        self.evaluate, self.lora_dropout = evaluate, lora_dropout
        self.traced = traced_api() if traced is None else traced
        self.base_flat = {k: np.asarray(v) for k, v in tree_lib.flatten(params).items()}
        self._trainers: dict[tuple, Any] = {}
        self._keep = keep_compiled
        self.compiles = 0

    def lora_rank(self, scope: str, n_trainable: int) -> int:
        return rank_for_budget(self.params, scope, n_trainable)

    def method(self, spec: RunSpec, masks, rank):
        """``(Method, extras or None, adapter or None)`` of a run."""
        if spec.arm.family == "tiles":
            ad = adapter_lib.make_adapter(self.params, masks, block_size=self.bs)
            if self.traced:
                layout = adapter_lib.TileLayout.of(ad)
                return methods.sylva_traced(layout), layout.coords(masks), ad
            return methods.sylva(ad), None, ad
        if spec.arm.family == "lora":
            return methods.lora(scope=spec.scope, rank=rank, alpha=2.0 * rank, dropout=self.lora_dropout), None, None
        return methods.full(), None, None

    def _shape_key(self, spec: RunSpec, masks, rank) -> tuple:
        shape = (spec.arm.family, spec.steps, spec.schedule, spec.warmup)
        if spec.arm.family == "tiles":
            shape += (spec.scope, tuple(sorted(kept_counts(masks).items())))
        elif spec.arm.family == "lora":
            shape += (spec.scope, rank)
        if not self.traced:  # static coordinates and rate: one compile per arm, mask and rate
            shape += (spec.arm.name, spec.lr, spec.sparsity, spec.seed if spec.arm.scorer == "random" else 0)
        return shape

    def trainer(self, spec: RunSpec, masks, rank):
        """``(trainer, extras, adapter, reused)`` for ``spec``: a compiled step of the same
        shape is reused (traced: any arm with the same tile counts, any rate)."""
        method, extras, ad = self.method(spec, masks, rank)
        key = self._shape_key(spec, masks, rank)
        reused = key in self._trainers
        if not reused:
            kw = {"traced_lr": True} if self.traced else {}
            self._trainers[key] = make_train_step(
                self.graphdef, method=method, learning_rate=spec.lr, schedule=spec.schedule,
                warmup_steps=spec.warmup, total_steps=spec.steps, **kw)
            self.compiles += 1
            while len(self._trainers) > self._keep:
                self._trainers.pop(next(iter(self._trainers)))
        return self._trainers[key], extras, ad, reused

    def init(self, trainer, spec: RunSpec, extras):
        params = jax.tree.map(jnp.copy, self.params)  # the step donates its input
        kw = {"learning_rate": spec.lr} if self.traced else {}
        if extras is not None:
            kw["extras"] = extras
        return trainer.init(params, seed=spec.seed, **kw)

    def train(self, spec: RunSpec, batches: Sequence[Mapping], *, masks=None, rank=None,
              eval_at: Mapping[int, str] | None = None) -> tuple[dict, Any, Any]:
        """Train ``spec`` on ``batches`` (``spec.steps`` of them). ``eval_at``: ``{step:
        eval set}`` losses taken during training (``curve``), the last step's included.
        Returns ``(record, merged params, kept)``; the record holds the train losses,
        timings, trainable count, optimizer-state bytes, the curve and which weights moved;
        ``kept`` is the run's trained weights on the host (tiles: :func:`tiles_of`; LoRA:
        its factors; full: ``None``), which :meth:`params_from` turns back into params."""
        if len(batches) != spec.steps:
            raise ValueError(f"{spec.key}: {len(batches)} batches for {spec.steps} steps")
        trainer, extras, ad, reused = self.trainer(spec, masks, rank)
        state = self.init(trainer, spec, extras)
        rec: dict[str, Any] = {"key": spec.key, "arm": spec.arm.name, "family": spec.arm.family, "scope": spec.scope,
                               "sparsity": spec.sparsity, "lr": spec.lr, "seed": spec.seed, "steps": spec.steps,
                               "schedule": spec.schedule, "reused_compiled_step": reused, "lora_rank": rank,
                               "trainable_params": int(trainer.num_trainable),
                               "opt_state_bytes": int(sum(x.nbytes for x in jax.tree.leaves(state.opt_state)))}
        losses, times, curve = [], [], []
        t0 = time.perf_counter()
        for i, batch in enumerate(batches):
            ts = time.perf_counter()
            state, m = trainer.step(state, batch)
            losses.append(float(m["loss"]))
            times.append(time.perf_counter() - ts)
            if not math.isfinite(losses[-1]):
                raise FloatingPointError(f"{spec.key}: loss {losses[-1]} at step {i + 1}")
            if eval_at and i + 1 in eval_at:
                curve.append([i + 1, self.evaluate(trainer.merge(state), eval_at[i + 1])["loss"]])
        rec.update(train_losses=losses, train_s=time.perf_counter() - t0, first_step_s=times[0],
                   step_s_median=float(np.median(times[1:] or times)), curve=curve,
                   sequences=int(sum(len(b["input_ids"]) for b in batches)))
        rec["integrity"] = self.integrity(spec.arm.family, state.params, ad)
        params = trainer.merge(state)
        kept = {"tiles": lambda: tiles_of(params, masks, self.bs),
                "lora": lambda: jax.tree.map(np.asarray, state.extras)}.get(spec.arm.family, lambda: None)()
        if spec.arm.family == "lora":
            rec["integrity"]["lora_b_abs_sum"] = float(sum(np.abs(np.asarray(f["b"])).sum()
                                                           for f in state.extras.factors.values()))
        del state
        return rec, params, kept

    def integrity(self, family: str, params, ad) -> dict:
        """Which weights moved (before merging): tiles only inside the kept tiles, LoRA's
        base weights nowhere, full fine-tuning anywhere."""
        region = {"tiles": lambda: evaluation.inside_tiles(ad), "lora": lambda: evaluation.nowhere,
                  "full": lambda: evaluation.everywhere}[family]()
        return evaluation.moved_weights(self.base_flat, params, region)

    def lora_treedef(self, scope: str, rank: int):
        """The tree structure of a LoRA run's factors (what :meth:`train` keeps)."""
        m = methods.lora(scope=scope, rank=rank, alpha=2.0 * rank)
        return jax.tree.structure(m.init(self.params, jax.random.PRNGKey(0)))

    def params_from(self, family: str, kept, *, masks=None):
        """The model parameters of a run from its kept weights (:meth:`train`)."""
        if family == "tiles":
            return jax.device_put(with_tiles(self.params, masks, kept, self.bs))
        if family == "lora":
            return merge_lora(self.params, jax.device_put(kept))
        raise ValueError("full fine-tuning runs keep no weights (134 M parameters); evaluate them when trained")
