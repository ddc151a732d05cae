"""Fine-tuning methods as values (sylva_jax.methods) and the pure step (train.make_step).

References are independent of the code under test: dense ``jax.grad`` of the plain model
with hand-written optimizer updates, and the plain forward of merged weights.
"""
from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sylva_jax import methods
from sylva_jax import tree as tree_lib
from sylva_jax.lora import init_lora, num_lora_params, rank_for_budget
from sylva_jax.losses import IGNORE_INDEX
from sylva_jax.methods import Method
from sylva_jax.models import llama
from sylva_jax.ops import dense_linear
from sylva_jax.optim import sparse_adamw
from sylva_jax.train import (TrainStep, accumulate, make_step, make_train_step, micro_weights,
                             zero_accumulator)
from test_train import _norm, copy, make_batch, shared


def _apply(graphdef):
    return functools.partial(llama.apply, graphdef)


def _dense_loss(graphdef):
    from sylva_jax.losses import lm_loss

    def loss(params, batch):
        return lm_loss(llama.apply(graphdef, params, batch["input_ids"], batch["attention_mask"]), batch["labels"])

    return loss


def probe_method(probe: str = r"(^|\.)layers\.0\.") -> Method:
    """A method written outside the library (benchmarks' "floor"): one scalar ``p = 0``
    scales the inputs of the matching layers, weights frozen, nothing updated."""
    probe_re = re.compile(probe)

    def forward(params, extras, p, rng):
        def linear_fn(name, x, w, b=None):
            if probe_re.search(name):
                x = x * (1.0 + p).astype(x.dtype)
            return dense_linear(x, jax.lax.stop_gradient(w), None if b is None else jax.lax.stop_gradient(b))

        return params, linear_fn

    return Method(name="probe", init=lambda params, rng: {},
                  trainable=lambda params, extras: jnp.zeros((), jnp.float32), forward=forward,
                  eval_forward=lambda params, extras: (params, None),
                  apply_updates=lambda params, extras, updates: (params, extras),
                  merge=lambda params, extras: params, num_trainable=lambda params, extras: 0,
                  adamw=lambda *a, **k: optax.set_to_zero())


def test_a_method_from_outside_the_library_runs_through_make_train_step():
    """The former built-in ``floor``: params unchanged, the loss is the plain model's, the
    probe's gradient is the backward down to the first layer's inputs (nonzero)."""
    graphdef, params, _, _ = shared()
    trainer = make_train_step(graphdef, method=probe_method(), schedule="constant", warmup_steps=0)
    state = trainer.init(copy(params))
    batch = make_batch(7, 2)
    state, metrics = trainer.step(state, batch)
    jax.tree.map(np.testing.assert_array_equal, state.params, params)
    np.testing.assert_allclose(float(metrics["loss"]), float(jax.jit(_dense_loss(graphdef))(params, batch)),
                               rtol=1e-6)
    assert float(metrics["grad_norm"]) > 0 and trainer.num_trainable == 0 and int(state.step) == 1
    assert trainer.method == "probe"


def test_make_step_takes_any_optax_transformation():
    """full() with a caller's optax chain (clip + SGD with momentum), jitted by the caller,
    for 2 steps equals the same updates written out by hand on dense jax.grad."""
    graphdef, params, _, _ = shared()
    lr, mom, clip = 0.05, 0.9, 0.3
    opt = optax.chain(optax.clip_by_global_norm(clip), optax.sgd(lr, momentum=mom))
    core = make_step(_apply(graphdef), methods.full(), opt)
    assert isinstance(core, TrainStep) and core.accum_steps == 1
    step = jax.jit(core.step)
    state = core.init(copy(params))
    batches = [make_batch(20 + i, 2) for i in range(2)]
    grad = jax.jit(jax.grad(_dense_loss(graphdef)))
    ref, trace = params, jax.tree.map(jnp.zeros_like, params)
    for b in batches:
        state, metrics = step(state, b)
        g = grad(ref, b)
        norm = float(_norm(g))
        np.testing.assert_allclose(float(metrics["grad_norm"]), norm, rtol=1e-5)
        g = jax.tree.map(lambda x: x * min(1.0, clip / norm), g)
        trace = jax.tree.map(lambda t, x: mom * t + x, trace, g)  # optax.trace (heavy-ball)
        ref = jax.tree.map(lambda p, t: p - lr * t, ref, trace)
    assert "lr" not in metrics  # the step was not told the schedule
    # two SGD steps of ~lr * |g| <= 1.5e-2; float32 rounding of the gradients (~1e-6 relative)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=2e-6), state.params, ref)


def test_make_step_sylva_equals_the_trainer_and_keeps_params_outside_tiles():
    """The pure sylva step (caller's chain of clipping and sparse_adamw) and the
    Trainer's (max_grad_norm + its own sparse_adamw) give the same state."""
    graphdef, params, adapter, _ = shared()
    kw = dict(b1=0.9, b2=0.999, eps=1e-4, weight_decay=0.05)
    core = make_step(_apply(graphdef), methods.sylva(adapter),
                     optax.chain(optax.clip_by_global_norm(0.1), sparse_adamw(1e-2, **kw)))
    trainer = make_train_step(graphdef, method="sylva", adapter=adapter, learning_rate=1e-2, schedule="constant",
                              warmup_steps=0, max_grad_norm=0.1, **kw)
    a, b = core.init(copy(params)), trainer.init(copy(params))
    step = jax.jit(core.step)
    for i in range(2):
        a, ma = step(a, make_batch(30 + i, 2))
        b, mb = trainer.step(b, make_batch(30 + i, 2))
    np.testing.assert_allclose(float(ma["loss"]), float(mb["loss"]), rtol=1e-6)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=0, atol=1e-6), a.params, b.params)
    assert trainer.num_trainable == adapter.num_trainable


def test_merge_gives_plain_weights_of_the_evaluation_forward():
    """merge(params, extras) under the plain forward equals each method's evaluation
    forward; merge reads its arguments only (they are unchanged)."""
    graphdef, params, adapter, _ = shared()
    batch = make_batch(8, 2)
    plain = jax.jit(lambda p: llama.apply(graphdef, p, batch["input_ids"], batch["attention_mask"]))
    lora = init_lora(params, scope="self_attn", rank=4, alpha=8.0, rng=0)
    lora = lora.replace(factors=jax.tree.map(lambda x: x + 0.03, lora.factors))  # B != 0
    cases = [(methods.sylva(adapter), {}), (methods.lora(scope="self_attn", rank=4, alpha=8.0), lora),
             (methods.full(), {})]
    for method, extras in cases:
        before = jax.tree.map(np.asarray, (params, extras))
        merged = method.merge(params, extras)
        assert jax.tree.structure(merged) == jax.tree.structure(params)
        p, fn = method.eval_forward(params, extras)
        want = jax.jit(lambda p: llama.apply(graphdef, p, batch["input_ids"], batch["attention_mask"],
                                             linear_fn=fn))(p)
        # LoRA: x (W + s B A)^T vs x W^T + s (x A^T) B^T, float32 rounding through two layers
        np.testing.assert_allclose(plain(merged), want, rtol=1e-4, atol=1e-4, err_msg=method.name)
        jax.tree.map(np.testing.assert_array_equal, (params, extras), before)
    assert methods.lora(scope="self_attn", rank=4).num_trainable(params, lora) == num_lora_params(lora)


def test_accumulate_is_the_weighted_sum_of_micro_gradients():
    """accumulate (lax.scan) == sum_i w_i (l_i, g_i) computed one by one; micro_weights:
    token shares for 'tokens', 1/k for 'mean'."""
    graphdef, params, _, _ = shared()
    loss = _dense_loss(graphdef)
    big = make_batch(9, 6)
    micro = {k: v.reshape(3, 2, -1) for k, v in big.items()}
    w, total = micro_weights(micro["labels"], "tokens")
    n = np.array([(np.asarray(micro["labels"][i])[:, 1:] != IGNORE_INDEX).sum() for i in range(3)], np.float64)
    np.testing.assert_allclose(np.asarray(w), n / n.sum(), rtol=1e-6)
    assert float(total) == n.sum()
    np.testing.assert_allclose(np.asarray(micro_weights(micro["labels"], "mean")[0]), np.full(3, 1 / 3), rtol=1e-6)
    vg = jax.jit(jax.value_and_grad(loss))
    grads, got_loss = jax.jit(lambda p, b, w: accumulate(lambda mb, i: jax.value_and_grad(loss)(p, mb),
                                                         zero_accumulator(p), b, w))(params, micro, w)
    parts = [vg(params, {k: v[i] for k, v in micro.items()}) for i in range(3)]
    want_loss = sum(float(w[i]) * float(parts[i][0]) for i in range(3))
    want = jax.tree.map(lambda *g: sum(float(w[i]) * g[i] for i in range(3)), *[g for _, g in parts])
    np.testing.assert_allclose(float(got_loss), want_loss, rtol=1e-6)
    scale = max(float(jnp.abs(x).max()) for x in jax.tree.leaves(want))
    # the same three float32 terms summed in the same order: rounding only
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * scale), grads, want)


def test_rank_for_budget():
    _, params, _, _ = shared()
    flat = tree_lib.flatten(params)
    per_rank = sum(sum(w.shape) for p, w in flat.items() if "self_attn" in p)
    assert rank_for_budget(params, "self_attn", 3 * per_rank) == 3
    assert rank_for_budget(params, "self_attn", int(3.4 * per_rank)) == 3
    assert rank_for_budget(params, "self_attn", 1) == 1  # at least rank 1
    rank = rank_for_budget(params, "self_attn", 5 * per_rank)
    assert num_lora_params(init_lora(params, scope="self_attn", rank=rank)) == 5 * per_rank
    with pytest.raises(ValueError, match="matches no"):
        rank_for_budget(params, "attn_typo", 100)


def test_bad_arguments_name_the_fix():
    graphdef, _, _, _ = shared()
    with pytest.raises(TypeError, match="sylva_jax.methods.Method"):
        make_step(_apply(graphdef), "full", optax.sgd(0.1))
    with pytest.raises(TypeError, match="GradientTransformation"):
        make_step(_apply(graphdef), methods.full(), 0.1)
    with pytest.raises(ValueError, match="accum_steps"):
        make_step(_apply(graphdef), methods.full(), optax.sgd(0.1), accum_steps=0)
    with pytest.raises(ValueError, match="dropout"):
        methods.lora(dropout=1.0)
    with pytest.raises(ValueError, match="needs adapter"):
        methods.sylva(None)
