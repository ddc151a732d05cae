"""The NNX LLaMA against transformers' PyTorch LlamaForCausalLM (the independent reference).

Tiny random configs are exported with ``save_pretrained`` and reloaded by transformers;
logits (and, for one config, parameter gradients) must agree on real positions.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from sylva_jax import tree
from sylva_jax.models.llama import (
    LlamaConfig, LlamaForCausalLM, apply, default_position_ids, dense_linear, generate, init_model, merge,
    rope_inv_freq, split,
)
from sylva_jax.models.loading import save_pretrained

torch.set_num_threads(1)

# one jitted forward for the whole module (graphdef static; compiled once per shape/config)
FWD = jax.jit(apply, static_argnums=0)

# float32 on both sides, O(1-10) logits: the two implementations differ only in summation
# order and transcendental implementations (~1e-7 relative per op), so 1e-4 absolute leaves
# a 100x margin while still catching any real mistake (a wrong RoPE half, mask or GQA
# grouping moves logits by >1e-2).
ATOL = 1e-4


def tiny(**kw) -> LlamaConfig:
    base = dict(vocab_size=97, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5, bos_token_id=1,
                eos_token_id=2, pad_token_id=0)
    base.update(kw)
    return LlamaConfig(**base)


def randomized(config: LlamaConfig, seed: int = 0, scale: float = 0.15) -> LlamaForCausalLM:
    """A model whose every parameter (norm weights included) is random, so no term is trivial."""
    graphdef, params = split(init_model(config, seed))
    flat = tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(flat))
    out = {}
    for k, (name, w) in zip(keys, flat.items()):
        r = jax.random.normal(k, w.shape, jnp.float32)
        out[name] = (1.0 + 0.2 * r if name.endswith("norm.weight") else scale * r).astype(w.dtype)
    params = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), [out[n] for n in flat])
    return merge(graphdef, params)


def to_hf(model, tmp_path):
    save_pretrained(model, tmp_path)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="eager")
    return hf.eval()


def hf_logits(hf, ids, mask):
    pos = np.asarray(default_position_ids(jnp.asarray(mask)))
    with torch.no_grad():
        out = hf(input_ids=torch.tensor(np.asarray(ids), dtype=torch.long),
                 attention_mask=torch.tensor(np.asarray(mask), dtype=torch.long),
                 position_ids=torch.tensor(pos, dtype=torch.long))
    return out.logits.float().numpy()


def batch(vocab, seed=0, B=3, T=9, padding="right"):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, size=(B, T)).astype(np.int32)
    mask = np.ones((B, T), np.int32)
    lengths = [T, T - 3, T - 5][:B]
    for b, n in enumerate(lengths):
        if padding == "right":
            mask[b, n:] = 0
        else:
            mask[b, : T - n] = 0
    ids = np.where(mask == 1, ids, 0)
    return ids, mask


CONFIGS = {
    "gqa_untied_right": (tiny(), "right"),
    "mha_tied_left": (tiny(num_key_value_heads=4, tie_word_embeddings=True), "left"),
    "mqa_llama3_bias_headdim": (tiny(num_key_value_heads=1, head_dim=16, attention_bias=True, mlp_bias=True,
                                     rope_theta=500.0, max_position_embeddings=32,
                                     rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                                   "high_freq_factor": 4.0,
                                                   "original_max_position_embeddings": 16}), "left"),
    "linear_rope": (tiny(rope_scaling={"type": "linear", "factor": 2.0}), "right"),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(name, tmp_path):
    config, padding = CONFIGS[name]
    model = randomized(config)
    hf = to_hf(model, tmp_path)
    ids, mask = batch(config.vocab_size, padding=padding)
    ours = np.asarray(jax.jit(lambda m, i, a: m(i, a))(model, ids, mask))
    ref = hf_logits(hf, ids, mask)
    real = mask.astype(bool)
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    assert np.abs(ref[real]).max() > 1.0  # logits are not trivially small
    np.testing.assert_allclose(ours[real], ref[real], atol=ATOL, rtol=0)
    # names and shapes are exactly the PyTorch state_dict's (a tied head appears there as an alias)
    ours_flat = tree.flatten(split(model)[1])
    hf_sd = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    if config.tie_word_embeddings:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
        hf_sd.pop("lm_head.weight")
        assert "lm_head.weight" not in ours_flat
    assert {k: tuple(v.shape) for k, v in ours_flat.items()} == hf_sd


def test_rope_inv_freq_matches_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    for name in ("mqa_llama3_bias_headdim", "linear_rope"):
        config = CONFIGS[name][0]
        hf_cfg = transformers.LlamaConfig(**config.to_hf())
        inv, _ = ROPE_INIT_FUNCTIONS[config.rope_type](hf_cfg)
        np.testing.assert_allclose(rope_inv_freq(config), inv.numpy(), rtol=1e-6)
    # llama3 must actually rescale in this config: low frequencies by the full factor, the
    # others less (smoothly interpolated)
    c = CONFIGS["mqa_llama3_bias_headdim"][0]
    plain = rope_inv_freq(dataclasses.replace(c, rope_scaling=None))
    ratio = plain / rope_inv_freq(c)
    assert np.isclose(ratio.max(), 4.0) and 1.0 <= ratio.min() < 3.0


def test_gradients_match_torch_autograd(tmp_path):
    config = tiny()
    model = randomized(config, seed=3)
    hf = to_hf(model, tmp_path)
    ids, mask = batch(config.vocab_size, seed=1, padding="left")
    real = mask.astype(np.float32)[..., None]
    probe = np.random.default_rng(0).normal(size=(*ids.shape, config.vocab_size)).astype(np.float32) * real
    graphdef, params = split(model)

    def loss(p):
        return jnp.sum(apply(graphdef, p, ids, mask) * probe)

    grads = tree.flatten(jax.jit(jax.grad(loss))(params))
    pos = torch.tensor(np.asarray(default_position_ids(jnp.asarray(mask))), dtype=torch.long)
    out = hf(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long),
             position_ids=pos).logits
    (out * torch.tensor(probe)).sum().backward()
    hf_grads = {k: v.grad.numpy() for k, v in hf.named_parameters()}
    assert set(grads) == set(hf_grads)
    for k, g in grads.items():
        ref = hf_grads[k]
        # same float32 argument as ATOL, scaled by the gradient's own magnitude
        np.testing.assert_allclose(np.asarray(g), ref, atol=1e-4 * max(1.0, np.abs(ref).max()), rtol=0, err_msg=k)


def test_bf16_compute_close_to_float32():
    config = tiny()
    model32 = randomized(config, seed=5)
    graphdef, params = split(model32)
    ids, mask = batch(config.vocab_size, padding="left")
    ref = np.asarray(FWD(graphdef, params, ids, mask))
    model16 = LlamaForCausalLM(dataclasses.replace(config, dtype="bfloat16"), rngs=__import__("flax").nnx.Rngs(0))
    g16, _ = split(model16)
    logits = np.asarray(FWD(g16, params, ids, mask))
    assert logits.dtype == np.float32
    real = mask.astype(bool)
    err = np.abs(logits - ref)[real].max()
    scale = np.abs(ref[real]).max()
    # bfloat16 keeps 8 mantissa bits (rounding error 2^-9 ~ 0.2% per op); through two blocks
    # and a 32-wide head the observed error is ~1% of the logit scale; 4% bounds it with margin
    # while a float32-vs-bf16 mix-up in attention/RoPE (errors of order 1x) still fails.
    assert 0 < err <= 0.04 * scale, (err, scale)
    assert (logits.argmax(-1) == ref.argmax(-1))[real].mean() > 0.9
    # bf16 parameters store bf16
    m = init_model(dataclasses.replace(config, param_dtype="bfloat16", dtype="bfloat16"))
    assert all(v.dtype == jnp.bfloat16 for v in tree.flatten(split(m)[1]).values())
    assert FWD(*split(m), ids, mask).dtype == jnp.float32


def _linear_names(config):
    names = []
    for i in range(config.num_hidden_layers):
        names += [f"model.layers.{i}.self_attn.{p}_proj.weight" for p in "qkvo"]
        names += [f"model.layers.{i}.mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
    return names + ["lm_head.weight"]


@pytest.mark.parametrize("tied", [False, True])
def test_linear_hook_sees_every_linear(tied):
    config = tiny(tie_word_embeddings=tied)
    model = randomized(config)
    flat = tree.flatten(split(model)[1])
    ids, mask = batch(config.vocab_size)
    calls = []

    def spy(name, x, w, b):
        calls.append((name, x.shape, w.shape, x.dtype))
        return dense_linear(name, x, w, b)

    out = model(ids, mask, linear_fn=spy)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(model(ids, mask)))
    assert [c[0] for c in calls] == _linear_names(config)
    for name, xs, ws, xd in calls:
        stored = flat["model.embed_tokens.weight" if (tied and name == "lm_head.weight") else name]
        assert ws == stored.shape and xs[-1] == ws[1] and xd == jnp.float32


def test_linear_hook_changes_output_like_a_weight_edit():
    """A hook adding delta to one weight equals a model with that weight edited (dense autodiff check too)."""
    config = tiny()
    model = randomized(config)
    graphdef, params = split(model)
    target = "model.layers.1.mlp.up_proj.weight"
    delta = 0.05 * jax.random.normal(jax.random.key(7), tree.flatten(params)[target].shape)
    ids, mask = batch(config.vocab_size)

    def hook(d):
        return lambda name, x, w, b: dense_linear(name, x, w + d if name == target else w, b)

    edited = tree.map_flat(lambda n, w: w + delta if n == target else w, params)

    @jax.jit
    def with_hook(d):
        return apply(graphdef, params, ids, mask, linear_fn=hook(d))

    np.testing.assert_allclose(np.asarray(with_hook(delta)), np.asarray(FWD(graphdef, edited, ids, mask)), atol=1e-5)
    # the hook may close over tracers: its gradient is the weight gradient
    g_hook = jax.jit(jax.grad(lambda d: with_hook(d).sum()))(jnp.zeros_like(delta))
    g_w = tree.flatten(jax.jit(jax.grad(lambda p: FWD(graphdef, p, ids, mask).sum()))(params))[target]
    # same float32 products in a different fusion/summation order: ~1e-6 relative per op
    np.testing.assert_allclose(np.asarray(g_hook), np.asarray(g_w), atol=1e-4 * max(1.0, float(jnp.abs(g_w).max())))
    assert float(jnp.abs(g_w).max()) > 1e-2  # the gradient is not trivially zero


def test_remat_same_values_and_gradients_with_hook():
    config = tiny()
    model = randomized(config)
    graphdef, params = split(model)
    g_remat, _ = split(LlamaForCausalLM(dataclasses.replace(config, remat=True), rngs=__import__("flax").nnx.Rngs(0)))
    ids, mask = batch(config.vocab_size, padding="left")
    seen = []

    def spy(name, x, w, b):
        seen.append(name)
        return dense_linear(name, x, w, b) * 1.01

    def loss(gd, p):
        return jnp.sum(apply(gd, p, ids, mask, linear_fn=spy) ** 2)

    l0, g0 = jax.jit(jax.value_and_grad(lambda p: loss(graphdef, p)))(params)
    seen.clear()
    l1, g1 = jax.jit(jax.value_and_grad(lambda p: loss(g_remat, p)))(params)
    assert set(seen) == set(_linear_names(config))
    np.testing.assert_allclose(float(l1), float(l0), rtol=1e-5)
    for k, a in tree.flatten(g0).items():
        np.testing.assert_allclose(np.asarray(tree.flatten(g1)[k]), np.asarray(a), atol=1e-4, rtol=1e-4, err_msg=k)


def test_padding_invariance_and_position_ids():
    """A left-padded row gives the same logits on its real tokens as the unpadded row."""
    config = tiny()
    model = randomized(config)
    ids, mask = batch(config.vocab_size, padding="left")
    graphdef, params = split(model)
    full = np.asarray(FWD(graphdef, params, ids, mask))
    row = ids[2][mask[2] == 1][None]
    alone = np.asarray(FWD(graphdef, params, row))
    np.testing.assert_allclose(full[2][mask[2] == 1], alone[0], atol=1e-5)
    np.testing.assert_array_equal(np.asarray(default_position_ids(jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]]))),
                                  [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]])


def _greedy_reference(model, ids, mask, n):
    """Greedy decoding by full forward passes (no cache) on one fixed-size buffer.

    Slots after the current step are masked out and, being later in time, cannot affect the
    logits read at the current step (causal mask), so one compiled shape serves every step.
    """
    B, T = ids.shape
    buf = np.concatenate([ids, np.zeros((B, n), np.int32)], 1)
    m = np.concatenate([mask, np.zeros((B, n), np.int32)], 1)
    fwd = jax.jit(lambda i, a: model(i, a))
    for k in range(n):
        buf[:, T + k] = np.asarray(fwd(buf, m))[:, T + k - 1].argmax(-1)
        m[:, T + k] = 1
    return buf


def test_generate_matches_full_forward_greedy():
    config = tiny()
    model = randomized(config, seed=11, scale=0.3)
    prompts = [[5, 9, 13, 7, 22, 8], [40, 41], [3, 60, 61, 62]]
    out = generate(model, prompts, 7, eos_token_id=None, pad_token_id=0)
    ids = np.zeros((3, 6), np.int32)
    mask = np.zeros((3, 6), np.int32)
    for b, p in enumerate(prompts):
        ids[b, 6 - len(p):] = p
        mask[b, 6 - len(p):] = 1
    ref = _greedy_reference(model, ids, mask, 7)
    assert out.shape == (3, 13)
    np.testing.assert_array_equal(out, ref)
    assert len(set(out[:, 6:].ravel().tolist())) > 2  # the decoded tokens are not a constant


def test_generate_stops_at_eos_and_pads():
    config = tiny()
    model = randomized(config, seed=11, scale=0.3)
    ref = generate(model, [[5, 9, 13]], 6)
    eos = int(ref[0, 4])  # the second generated token
    out = generate(model, [[5, 9, 13]], 6, eos_token_id=eos, pad_token_id=0)
    np.testing.assert_array_equal(out[0, :5], ref[0, :5])
    assert (out[0, 5:] == 0).all()


def test_generate_rejects_right_padding():
    model = init_model(tiny())
    with pytest.raises(ValueError, match="left padding"):
        generate(model, np.array([[5, 6, 0]]), 2, attention_mask=np.array([[1, 1, 0]]))


# ---------------------------------------------------------------------------- config
def test_config_from_hf_v4_and_v5_keys_roundtrip():
    v4 = {"model_type": "llama", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
          "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2, "rope_theta": 500000.0,
          "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 8192},
          "max_position_embeddings": 131072, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
          "eos_token_id": [128001, 128009]}
    v5 = {k: v for k, v in v4.items() if k not in ("rope_theta", "rope_scaling")}
    v5["rope_parameters"] = {"rope_theta": 500000.0, **v4["rope_scaling"]}
    a, b = LlamaConfig.from_hf(v4), LlamaConfig.from_hf(v5)
    assert a == b and hash(a) == hash(b)
    assert a.rope_type == "llama3" and a.rope_theta == 500000.0 and a.head_dim == 8
    assert a.dtype == "float32" and a.eos_token_id == (128001, 128009)
    assert LlamaConfig.from_hf(a.to_hf()) == a
    # transformers reads our export back to the same rope parameters
    hf = transformers.LlamaConfig(**a.to_hf())
    assert hf.rope_parameters["rope_type"] == "llama3" and hf.rope_parameters["factor"] == 8.0
    assert hf.rope_parameters["rope_theta"] == 500000.0
    plain = LlamaConfig.from_hf({**v5, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}},
                                dtype="bfloat16")
    assert plain.rope_scaling is None and plain.rope_theta == 1e4 and plain.dtype == "bfloat16"


@pytest.mark.parametrize("change, err, match", [
    ({"hidden_size": None}, ValueError, "missing required key"),
    ({"hidden_size": "64"}, TypeError, "hidden_size must be an integer"),
    ({"num_attention_heads": 6}, ValueError, "not divisible by num_attention_heads"),
    ({"num_key_value_heads": 3}, ValueError, "multiple of num_key_value_heads"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, ValueError, "unknown RoPE type 'yarn'"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, ValueError, "unknown RoPE type"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 2.0}}, ValueError, "llama3"),
    ({"hidden_act": "gelu"}, ValueError, "silu"),
    ({"model_type": "gpt2"}, ValueError, "model_type"),
])
def test_config_errors(change, err, match):
    d = {"vocab_size": 100, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 8}
    d.update(change)
    d = {k: v for k, v in d.items() if v is not None}
    with pytest.raises(err, match=match):
        LlamaConfig.from_hf(d)


def test_bad_inputs_are_clear_errors():
    model = init_model(tiny())
    with pytest.raises(ValueError, match="batch"):
        model(jnp.arange(5))
    with pytest.raises(ValueError, match="attention_mask"):
        model(jnp.ones((2, 5), jnp.int32), jnp.ones((2, 4), jnp.int32))
    with pytest.raises(ValueError, match="dtype"):
        tiny(dtype="int8")


@pytest.mark.parametrize("tied", [False, True])
def test_logits_at_equals_the_full_logits_at_those_positions(tied):
    """``logits_at`` runs the norm and head on one position per row: the same numbers as
    gathering the full ``[B, T, V]`` logits, with or without a linear hook (LoRA's path)."""
    config = tiny(tie_word_embeddings=tied)
    graphdef, params = split(randomized(config))
    ids, mask = batch(config.vocab_size)  # right padding: rows of different lengths
    pos = jnp.asarray(np.asarray(mask).sum(-1) - 1)
    assert len(set(np.asarray(pos).tolist())) > 1
    full = np.asarray(FWD(graphdef, params, ids, mask))
    picked = full[np.arange(ids.shape[0]), np.asarray(pos)]
    heads = []

    def spy(name, x, w, b):
        if name == "lm_head.weight":
            heads.append(x.shape)
        return dense_linear(name, x, w, b)

    at = jax.jit(lambda p, q: apply(graphdef, params, ids, mask, logits_at=q))(params, pos)
    hooked = apply(graphdef, params, ids, mask, logits_at=pos, linear_fn=spy)
    assert at.shape == (ids.shape[0], config.vocab_size)
    # one [B, 1, D] x [D, V] product instead of [B, T, D] x [D, V]: same sums, another blocking
    np.testing.assert_allclose(np.asarray(at), picked, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(hooked), picked, rtol=1e-5, atol=1e-5)
    assert heads == [(ids.shape[0], 1, config.hidden_size)]
    with pytest.raises(ValueError, match="logits_at must be one integer position per row"):
        apply(graphdef, params, ids, mask, logits_at=pos[:1])


@pytest.mark.parametrize("tied", [False, True])
def test_loss_with_fused_head_matches_the_logits_path(tied):
    """``llama.loss`` (head fused with the cross-entropy) = ``lm_loss(apply(...))`` in value
    and in every parameter gradient; with a hook on the layers only, and with the head hooked."""
    from sylva_jax.losses import lm_loss
    from sylva_jax.models.llama import loss

    config = tiny(tie_word_embeddings=tied)
    graphdef, params = split(randomized(config))
    ids, mask = batch(config.vocab_size)
    labels = jnp.where(jnp.asarray(mask) > 0, ids, -100)
    seen = []

    def spy(name, x, w, b):
        seen.append(name)
        return dense_linear(name, x, 1.5 * w, b)  # a hook that changes every layer it sees

    ref_fn = lambda p, fn: lm_loss(apply(graphdef, p, ids, mask, linear_fn=fn), labels)  # noqa: E731
    for fn, hook_head in ((None, None), (spy, False), (spy, True)):
        def ref(p):
            if fn is None or hook_head:
                return ref_fn(p, fn)
            # hook on the decoder layers only, the head plain
            return ref_fn(p, lambda n, x, w, b: dense_linear(n, x, w, b) if n == "lm_head.weight" else fn(n, x, w, b))
        want, g_want = jax.value_and_grad(ref)(params)
        seen.clear()
        got, g_got = jax.value_and_grad(lambda p: loss(graphdef, p, ids, mask, labels, linear_fn=fn,
                                                       hook_head=hook_head, chunk_size=5))(params)
        assert ("lm_head.weight" in seen) == bool(hook_head)
        np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
        for (name, a), b in zip(tree.flatten(g_got).items(), tree.flatten(g_want).values()):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6, err_msg=name)
    with pytest.raises(ValueError, match="needs labels"):
        loss(graphdef, params, ids, mask)


def test_string_keyed_layers_merge_into_the_right_layers():
    """Params that went through names (``tree.unflatten``: layer keys ``"0"``...``"11"``)
    are the same model as :func:`split`'s int-keyed ones: with 12 layers the string order
    ("10" before "2") would otherwise put layer 10's weights into layer 2 without an error."""
    from tiny import tiny_split

    graphdef, params = tiny_split(num_hidden_layers=12)
    named = tree.unflatten(tree.flatten(params))
    assert "10" in named["model"]["layers"] and 10 in params["model"]["layers"]
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 16)))
    want = np.asarray(apply(graphdef, params, ids))
    np.testing.assert_array_equal(np.asarray(apply(graphdef, named, ids)), want)
    # and the scrambling it prevents is real: the same leaves in string order differ
    scrambled = jax.tree.unflatten(jax.tree.structure(params), jax.tree.leaves(named))
    assert np.abs(np.asarray(apply(graphdef, scrambled, ids)) - want).max() > 1e-3
