"""The training step fuses the LM head with the cross-entropy exactly when the method leaves
the head alone, and the gradients equal those of the plain logits path."""
from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

from sylva_jax import train
from sylva_jax.methods import full, lora, sylva
from sylva_jax.models import llama
from test_train import copy, make_batch, shared


def _grads(graphdef, params, method, loss_fn):
    trainer = train.make_train_step(graphdef, method=method, learning_rate=1e-3,
                                    schedule="constant", warmup_steps=0, loss_fn=loss_fn)
    state = trainer.init(copy(params), seed=0)
    return trainer.grads(state, make_batch(3, 2))


@pytest.mark.parametrize("name", ["sylva", "lora", "lora_head", "full"])
def test_default_loss_equals_the_logits_path(name):
    graphdef, params, adapter, _ = shared()
    method = {"sylva": lambda: sylva(adapter), "lora": lambda: lora(scope="self_attn", rank=4),
              "lora_head": lambda: lora(scope=["self_attn", "lm_head"], rank=4),
              "full": full}[name]()
    assert method.adapts is not None
    assert method.adapts("lm_head.weight") is (name == "lora_head")
    plain = train.lm_loss_fn(functools.partial(llama.apply, graphdef))
    got, want = _grads(graphdef, params, method, None), _grads(graphdef, params, method, plain)
    (loss_g, g_g), (loss_w, g_w) = got[:2], want[:2]
    np.testing.assert_allclose(float(loss_g), float(loss_w), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_g), jax.tree.leaves(g_w)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
