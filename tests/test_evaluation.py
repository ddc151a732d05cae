"""sylva_jax.evaluation: bucketed batches, token-mean held-out loss, moved weights.

The loss is checked against a NumPy log-softmax of a toy bigram model (logits are a table
row per input token), independent of ``losses.token_nll``.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from sylva_jax.adapter import make_adapter
from sylva_jax.evaluation import (bucket_length, eval_batches, everywhere, heldout_loss, inside_tiles,
                                  moved_weights, nowhere, token_sums)

V = 11


def _examples(lengths, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        ids = rng.integers(0, V, n).astype(np.int32)
        labels = ids.copy()
        labels[: rng.integers(1, n)] = -100  # a prompt without loss
        out.append({"input_ids": ids, "labels": labels})
    return out


def test_bucket_length():
    assert [bucket_length(n, 256) for n in (1, 64, 65, 128, 129, 256)] == [64, 64, 128, 128, 256, 256]
    assert bucket_length(140, 150) == 150  # capped at max_len
    assert bucket_length(300, 256) == 300  # a row longer than max_len keeps its length
    assert bucket_length(5, 100, first=4) == 8
    with pytest.raises(ValueError, match="first"):
        bucket_length(5, 100, first=0)


def test_eval_batches_and_token_mean_loss_against_numpy():
    lengths = [5, 70, 9, 33, 12, 65, 3]
    ex = _examples(lengths)
    batches = eval_batches(ex, 3, pad_id=0, max_len=100)
    assert sorted(i for idx, _ in batches for i in idx) == list(range(len(ex)))
    order = [i for idx, _ in batches for i in idx]
    assert [lengths[i] for i in order] == sorted(lengths, reverse=True)
    for idx, b in batches:
        assert b["input_ids"].shape == (3, bucket_length(max(lengths[i] for i in idx), 100))
        assert (b["labels"][len(idx):] == -100).all()  # filler rows add no loss

    table = np.random.default_rng(1).normal(size=(V, V)).astype(np.float32)
    sums = token_sums(lambda params, ids, mask: params[ids])
    got = heldout_loss(sums, jnp.asarray(table), batches)

    logp = table - np.log(np.exp(table).sum(-1, keepdims=True))
    nll, cnt = np.zeros(len(ex)), np.zeros(len(ex))
    for e, x in enumerate(ex):
        for t in range(1, len(x["input_ids"])):
            if x["labels"][t] != -100:
                nll[e] -= logp[x["input_ids"][t - 1], x["labels"][t]]
                cnt[e] += 1
    np.testing.assert_array_equal(got["count"], cnt)
    np.testing.assert_allclose(got["nll"], nll, rtol=1e-5)  # float32 log-softmax vs NumPy's
    np.testing.assert_allclose(got["loss"], nll.sum() / cnt.sum(), rtol=1e-5)
    assert got["n"] == len(ex)
    assert abs(got["loss"] - np.mean(nll / cnt)) > 1e-3  # token mean, not the mean of example means


@pytest.mark.parametrize("layout", ["out_in", "in_out"])
def test_moved_weights(layout):
    bs = 4
    shape = (8, 12) if layout == "out_in" else (12, 8)
    base = {"w": np.zeros(shape, np.float32), "norm": np.ones(3, np.float32)}
    mask = np.zeros((2, 3), bool)
    mask[1, 2] = True  # tile (1, 2) of the [out, in] = [8, 12] weight
    adapter = make_adapter(base, {"w": mask}, block_size=bs, layout=layout)
    moved = {"w": base["w"].copy(), "norm": base["norm"].copy()}
    view = moved["w"] if layout == "out_in" else moved["w"].T
    view[4:8, 8:12] = 0.5
    view[5, 9] = 0.0  # one tile element unchanged
    rec = moved_weights(base, moved, inside_tiles(adapter))
    assert rec == {"max_change_outside_trainable": 0.0, "changed_trainable_fraction": 15 / 16}
    view[0, 0] = -0.25  # outside the tile
    assert moved_weights(base, moved, inside_tiles(adapter))["max_change_outside_trainable"] == 0.25
    assert moved_weights(base, moved, nowhere)["max_change_outside_trainable"] == 0.5
    full = moved_weights(base, moved, everywhere)
    assert full["max_change_outside_trainable"] == 0.0
    assert full["changed_trainable_fraction"] == 16 / (8 * 12 + 3)
    with pytest.raises(KeyError, match="same model"):
        moved_weights({"w": base["w"]}, moved, everywhere)
