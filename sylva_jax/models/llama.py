"""LLaMA-architecture causal language model in Flax NNX.

Layout decision (stated once, relied on everywhere): every linear weight is stored in the
Hugging Face layout ``[out, in]`` and applied as ``x @ W.T``, written as a ``dot_general``
that contracts the last axis of ``x`` with the last axis of ``W`` (no transposed copy).
Module and parameter names mirror Hugging Face's ``LlamaForCausalLM``, so that
``sylva_jax.tree.flatten(nnx.state(model, nnx.Param).to_pure_dict())`` yields exactly the
keys of the PyTorch ``state_dict`` (``model.layers.0.self_attn.q_proj.weight``, ...;
``lm_head.weight`` only when the head is untied).

The only state of a model is its parameters: rotary tables are computed on the fly and the
KV cache used by :func:`generate` is a plain pytree passed in and out of the forward pass.

The linear hook (docs/ARCHITECTURE.md): every linear layer -- q, k, v, o, gate, up, down
and the LM head -- calls ``linear_fn(name, x, w, b)`` with ``name`` its weight path,
``x: [..., in]`` in the compute dtype, ``w: [out, in]`` as stored (parameter dtype) and
``b: [out]`` or ``None``; the result ``[..., out]`` is cast to the compute dtype (float32
for the head). For a tied head the name is ``"lm_head.weight"`` and ``w`` is the
embedding matrix ``[vocab, hidden]``. This is the notation of `docs/algorithm.md` (``y = x W^T + b``,
``W [out, in]``); the embedded sparse linear of its section 4 plugs in through this hook.

Position ids: by default ``position = clip(cumsum(attention_mask) - 1, 0)`` per row, so a
left-padded row starts at position 0 on its first real token (right padding leaves the
real tokens at ``0..n-1``). Hugging Face uses ``arange(T)`` when no ``position_ids`` are
given; both agree when there is no left padding, and the parity tests hand HF our
position ids explicitly.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from functools import partial
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sylva_jax import ops
from sylva_jax.losses import HEAD_CHUNK, lm_head_loss, lm_loss

__all__ = [
    "LlamaConfig",
    "LlamaForCausalLM",
    "KVCache",
    "dense_linear",
    "init_model",
    "split",
    "merge",
    "apply",
    "loss",
    "init_cache",
    "forward_with_cache",
    "generate",
    "rope_inv_freq",
    "causal_attention",
    "default_position_ids",
    "pure_dict",
    "LinearFn",
]

LinearFn = Callable[[str, jax.Array, jax.Array, "jax.Array | None"], jax.Array]

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_ROPE_TYPES = ("default", "linear", "llama3")
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _dtype_name(value: Any, field: str) -> str:
    """Normalise a dtype given as a string, numpy or jax dtype to one of ``_DTYPES``."""
    try:
        name = jnp.dtype(value).name
    except TypeError:
        name = str(value)
    if name not in _DTYPES:
        raise ValueError(
            f"LlamaConfig.{field}={value!r} is not supported; use one of {sorted(_DTYPES)}"
        )
    return name


def _freeze(value: Any) -> Any:
    """Dicts/lists -> sorted tuples so that the config stays hashable (it is static in jit)."""
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture and numerics of a LLaMA model (Hugging Face ``config.json`` fields).

    ``rope_scaling`` is ``None`` (plain RoPE) or a mapping with ``rope_type`` in
    ``{"linear", "llama3"}`` and that type's parameters; it is stored as a sorted tuple of
    ``(key, value)`` pairs so that the config is hashable (use :attr:`rope_scaling_dict`).
    ``param_dtype`` is the storage dtype of the parameters, ``dtype`` the compute dtype
    (``float32`` or ``bfloat16``); logits are always float32. ``remat`` recomputes each
    decoder block in the backward pass (``nnx.remat``) to save activation memory.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Any = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    bos_token_id: int | None = 1
    eos_token_id: Any = 2
    pad_token_id: int | None = None
    param_dtype: str = "float32"
    dtype: str = "float32"
    remat: bool = False

    def __post_init__(self):
        set_ = partial(object.__setattr__, self)
        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                      "num_attention_heads", "max_position_embeddings"):
            _check_pos_int(field, getattr(self, field))
        if self.num_key_value_heads is None:
            set_("num_key_value_heads", self.num_attention_heads)
        _check_pos_int("num_key_value_heads", self.num_key_value_heads)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"LlamaConfig: hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}; pick a head count that divides it"
            )
        if self.head_dim is None:
            set_("head_dim", self.hidden_size // self.num_attention_heads)
        _check_pos_int("head_dim", self.head_dim)
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig: head_dim={self.head_dim} must be even for rotary embeddings")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"LlamaConfig: num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads} (grouped-query attention needs it)"
            )
        for field in ("rms_norm_eps", "rope_theta", "initializer_range"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"LlamaConfig.{field} must be a positive number, got {value!r}")
            set_(field, float(value))
        for field in ("tie_word_embeddings", "attention_bias", "mlp_bias", "remat"):
            if not isinstance(getattr(self, field), (bool, np.bool_)):
                raise TypeError(f"LlamaConfig.{field} must be a bool, got {getattr(self, field)!r}")
            set_(field, bool(getattr(self, field)))
        if self.hidden_act != "silu":
            raise ValueError(
                f"LlamaConfig.hidden_act={self.hidden_act!r} is not supported; LLaMA uses 'silu'"
            )
        set_("param_dtype", _dtype_name(self.param_dtype, "param_dtype"))
        set_("dtype", _dtype_name(self.dtype, "dtype"))
        set_("rope_scaling", _normalise_rope_scaling(self.rope_scaling, self.max_position_embeddings))
        if isinstance(self.eos_token_id, (list, tuple)):
            set_("eos_token_id", tuple(int(i) for i in self.eos_token_id))

    # ------------------------------------------------------------------ derived
    @property
    def rope_scaling_dict(self) -> dict | None:
        return None if self.rope_scaling is None else dict(self.rope_scaling)

    @property
    def rope_type(self) -> str:
        return "default" if self.rope_scaling is None else dict(self.rope_scaling)["rope_type"]

    @property
    def compute_dtype(self):
        return _DTYPES[self.dtype]

    @property
    def params_dtype(self):
        return _DTYPES[self.param_dtype]

    def replace(self, **changes) -> "LlamaConfig":
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ HF I/O
    @classmethod
    def from_hf(cls, config: Mapping[str, Any], **overrides) -> "LlamaConfig":
        """Build from a Hugging Face ``config.json`` dict (transformers v4 or v5 keys).

        Rope settings are read from ``rope_parameters`` (v5: ``rope_type``, ``rope_theta``
        and the scaling fields together) or from ``rope_theta`` + ``rope_scaling`` (v4).
        ``overrides`` set our own fields (``dtype``, ``param_dtype``, ``remat``) or replace
        HF ones.
        """
        if not isinstance(config, Mapping):
            raise TypeError(f"LlamaConfig.from_hf expects a dict (config.json), got {type(config).__name__}")
        model_type = config.get("model_type", "llama")
        if model_type != "llama":
            raise ValueError(
                f"config has model_type={model_type!r}; only LLaMA-architecture ('llama') models are supported"
            )
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        missing = [k for k in required if k not in config and k not in overrides]
        if missing:
            raise ValueError(
                f"config.json is missing required key(s) {missing}; a LLaMA config needs {list(required)}"
            )
        kw: dict[str, Any] = {}
        ours = {"rope_scaling", "rope_theta", "dtype", "param_dtype", "remat"}  # HF "dtype" = storage
        nullable = {"bos_token_id", "eos_token_id", "pad_token_id", "num_key_value_heads", "head_dim"}
        for f in dataclasses.fields(cls):
            if f.name in config and f.name not in ours and (config[f.name] is not None or f.name in nullable):
                kw[f.name] = config[f.name]
        rope_params = config.get("rope_parameters")
        rope_theta = config.get("rope_theta")
        scaling: dict | None = None
        if rope_params is not None and not isinstance(rope_params, Mapping):
            raise TypeError(f"config rope_parameters must be a dict, got {rope_params!r}")
        if rope_params:
            rp = dict(rope_params)
            rope_theta = rp.pop("rope_theta", rope_theta)
            rtype = rp.pop("rope_type", rp.pop("type", "default"))
            if rp.pop("partial_rotary_factor", 1.0) != 1.0:
                raise ValueError("partial_rotary_factor != 1 is not supported by this LLaMA implementation")
            scaling = None if rtype in (None, "default") else {"rope_type": rtype, **rp}
        rs = config.get("rope_scaling")
        if rs is not None:
            if not isinstance(rs, Mapping):
                raise TypeError(f"config rope_scaling must be a dict or null, got {rs!r}")
            rs = dict(rs)
            rtype = rs.pop("rope_type", rs.pop("type", "default"))
            rs.pop("rope_theta", None)
            scaling = None if rtype in (None, "default") else {"rope_type": rtype, **rs}
        if rope_theta is not None:
            kw["rope_theta"] = rope_theta
        kw["rope_scaling"] = scaling
        kw.update(overrides)
        for name in required + ("num_key_value_heads", "head_dim", "max_position_embeddings"):
            if name in kw and kw[name] is not None and (isinstance(kw[name], bool) or not isinstance(kw[name], int)):
                raise TypeError(f"config {name} must be an integer, got {kw[name]!r}")
        return cls(**kw)

    @classmethod
    def from_json(cls, path: str | os.PathLike, **overrides) -> "LlamaConfig":
        """Read a Hugging Face ``config.json`` file (or a directory holding one)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no config file at {path!r}; pass a config.json or a model directory")
        with open(path) as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} is not valid JSON: {e}") from None
        return cls.from_hf(data, **overrides)

    def to_hf(self) -> dict[str, Any]:
        """A ``config.json`` dict that transformers' ``LlamaConfig`` (v4 and v5) reads."""
        rope_parameters = {"rope_type": self.rope_type, "rope_theta": self.rope_theta}
        scaling = self.rope_scaling_dict
        if scaling is not None:
            rope_parameters.update(scaling)
        out = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": self.hidden_act,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": scaling,
            "rope_parameters": rope_parameters,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "attention_dropout": 0.0,
            "mlp_bias": self.mlp_bias,
            "initializer_range": self.initializer_range,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": self.param_dtype,
            "use_cache": True,
        }
        return out


def _check_pos_int(field: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"LlamaConfig.{field} must be an integer, got {value!r}")
    if value <= 0:
        raise ValueError(f"LlamaConfig.{field} must be positive, got {value}")


def _normalise_rope_scaling(scaling: Any, max_position_embeddings: int):
    if scaling is None:
        return None
    if isinstance(scaling, tuple):
        scaling = dict(scaling)
    if not isinstance(scaling, Mapping):
        raise TypeError(f"LlamaConfig.rope_scaling must be None or a dict, got {scaling!r}")
    sc = dict(scaling)
    rtype = sc.pop("rope_type", sc.pop("type", "default"))
    if rtype in (None, "default"):
        return None
    if rtype not in _ROPE_TYPES:
        raise ValueError(
            f"unknown RoPE type {rtype!r}; supported types are {list(_ROPE_TYPES)} "
            "(set rope_scaling / rope_parameters.rope_type accordingly)"
        )
    if "factor" not in sc:
        raise ValueError(f"rope_scaling of type {rtype!r} needs a 'factor'")
    if rtype == "llama3":
        sc.setdefault("original_max_position_embeddings", max_position_embeddings)
        missing = [k for k in _LLAMA3_KEYS if k not in sc]
        if missing:
            raise ValueError(f"rope_scaling of type 'llama3' is missing {missing}")
        if sc["high_freq_factor"] == sc["low_freq_factor"]:
            raise ValueError("rope_scaling 'llama3' needs high_freq_factor != low_freq_factor")
        sc = {k: sc[k] for k in _LLAMA3_KEYS}
    else:
        sc = {"factor": sc["factor"]}
    for k, v in sc.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            raise ValueError(f"rope_scaling[{k!r}] must be a positive number, got {v!r}")
    return _freeze({"rope_type": rtype, **sc})


# ---------------------------------------------------------------------------- numerics
def dense_linear(name: str, x: jax.Array, w: jax.Array, b: jax.Array | None = None,
                 *, out_dtype=None) -> jax.Array:
    """Default linear: ``x @ w.T (+ b)``; x ``[..., in]``, w ``[out, in]`` -> ``[..., out]``.

    :func:`sylva_jax.ops.dense_linear` in the hook signature: computed in ``x.dtype`` with
    float32 accumulation, the result in ``out_dtype`` (default ``x.dtype``). ``name`` is unused.
    """
    del name
    return ops.dense_linear(x, w, b, out_dtype=out_dtype)


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
    """Inverse frequencies ``[head_dim // 2]`` float32 for the configured RoPE type.

    default: ``theta ** (-2i / d)``; linear: divided by ``factor``; llama3: the Llama 3.1
    frequency-dependent rescaling (long wavelengths / factor, short kept, smooth between).
    Computed in float64, returned in float32.
    """
    d = config.head_dim
    inv = 1.0 / (config.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    sc = config.rope_scaling_dict
    if sc is None:
        return inv.astype(np.float32)
    if sc["rope_type"] == "linear":
        return (inv / sc["factor"]).astype(np.float32)
    # llama3
    factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
    old_len = sc["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > old_len / lo, inv / factor, inv)
    smooth = (old_len / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def _rope_cos_sin(config: LlamaConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """positions ``[B, T]`` int -> cos, sin ``[B, T, 1, head_dim]`` float32 (HF half-split)."""
    inv = jnp.asarray(rope_inv_freq(config))
    freqs = positions.astype(jnp.float32)[..., None] * inv
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    return jnp.cos(emb), jnp.sin(emb)


def _apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x ``[B, T, H, D]``: ``x * cos + rotate_half(x) * sin`` (HF's non-interleaved RoPE)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos.astype(x.dtype) + rotated * sin.astype(x.dtype)


def default_position_ids(attention_mask: jax.Array) -> jax.Array:
    """``clip(cumsum(mask) - 1, 0)`` per row: ``[B, T]`` int32 (left/right padding aware)."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


# ---------------------------------------------------------------------------- attention
ATTN_BLOCK = 128


def _prefix_scores(q, k, real, start: int, scale: float):
    """Scores of query rows ``start..start+bq`` against key prefix ``0..start+bq`` (masked).

    q ``[B, K, G, bq, D]``, k ``[B, K, S, D]`` (S = start + bq), real ``[B, S]`` bool ->
    ``[B, K, G, bq, S]`` float32, ``finfo.min`` where the key is later than the query or padding.
    """
    bq, S = q.shape[-2], k.shape[-2]
    s = jnp.einsum("bkgtd,bksd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    causal = jnp.arange(S)[None, :] <= (start + jnp.arange(bq))[:, None]
    keep = causal[None] & real[:, None, :]
    return jnp.where(keep[:, None, None], s, jnp.finfo(jnp.float32).min)


def _blocks(T: int, block: int):
    """Static query blocks ``(start, stop)`` covering ``0..T`` (the last one may be shorter)."""
    return [(i, min(i + block, T)) for i in range(0, T, block)]


def _causal_fwd_blocks(q, k, v, real, block):
    """Forward of :func:`causal_attention` plus the softmax statistics ``(max, sum)`` per block."""
    scale = q.shape[-1] ** -0.5
    outs, stats = [], []
    for start, stop in _blocks(q.shape[-2], block):
        s = _prefix_scores(q[..., start:stop, :], k[..., :stop, :].astype(q.dtype), real[:, :stop], start, scale)
        m = jnp.max(s, axis=-1, keepdims=True)
        e = jnp.exp(s - m)
        l = jnp.sum(e, axis=-1, keepdims=True)
        p = (e / l).astype(q.dtype)
        o = jnp.einsum("bkgts,bksd->bkgtd", p, v[..., :stop, :].astype(q.dtype), preferred_element_type=jnp.float32)
        outs.append(o.astype(q.dtype))
        stats.append((m, l))
    return jnp.concatenate(outs, axis=-2), stats


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def _head_major_attention(q, k, v, real, block):
    """:func:`causal_attention` on q ``[B, K, G, T, D]``, k, v ``[B, K, T, D]`` (the dots' layout)."""
    return _causal_fwd_blocks(q, k, v, real, block)[0]


def _causal_vjp_fwd(q, k, v, real, block):
    out, stats = _causal_fwd_blocks(q, k, v, real, block)
    return out, (q, k, v, real, stats)


def _causal_vjp_bwd(block, res, dout):
    """``dq = dS k``, ``dk = dS^T q``, ``dv = P^T dout`` with ``dS = P (dP - rowsum(P dP)) / sqrt(D)``."""
    q, k, v, real, stats = res
    scale = q.shape[-1] ** -0.5
    dt = q.dtype
    dout = dout.astype(dt)
    dqs, dk, dv = [], jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)
    for (start, stop), (m, l) in zip(_blocks(q.shape[-2], block), stats):
        qi, do = q[..., start:stop, :], dout[..., start:stop, :]
        kp, vp = k[..., :stop, :].astype(dt), v[..., :stop, :].astype(dt)
        p = jnp.exp(_prefix_scores(qi, kp, real[:, :stop], start, scale) - m) / l
        dp = jnp.einsum("bkgtd,bksd->bkgts", do, vp, preferred_element_type=jnp.float32)
        ds = (p * (dp - jnp.sum(p * dp, axis=-1, keepdims=True)) * scale).astype(dt)
        dv = dv.at[..., :stop, :].add(jnp.einsum("bkgts,bkgtd->bksd", p.astype(dt), do,
                                                 preferred_element_type=jnp.float32))
        dk = dk.at[..., :stop, :].add(jnp.einsum("bkgts,bkgtd->bksd", ds, qi, preferred_element_type=jnp.float32))
        dqs.append(jnp.einsum("bkgts,bksd->bkgtd", ds, kp, preferred_element_type=jnp.float32))
    dq = jnp.concatenate(dqs, axis=-2).astype(q.dtype)
    return dq, dk.astype(k.dtype), dv.astype(v.dtype), None


_head_major_attention.defvjp(_causal_vjp_fwd, _causal_vjp_bwd)


def causal_attention(q, k, v, real, block: int = ATTN_BLOCK):
    """Causal grouped-query attention, exact softmax, computed one query block at a time.

    q ``[B, T, K, G, D]`` (query head ``k * G + g`` uses kv head ``k``), k, v ``[B, T, K, D]``,
    real ``[B, T]`` bool (False = padding key) -> ``[B, T, K, G, D]`` in ``q.dtype``:
    ``softmax(q k^T / sqrt(D) + mask) v`` with the mask ``s <= t and real[s]``. Query block
    ``[t0, t1)`` (``block`` rows) is scored only against keys ``[0, t1)``: the fully masked
    upper blocks are never computed and no ``[T, T]`` array is held. Masked keys have weight
    exactly 0, so each row equals the plain softmax over all ``T`` keys to float32 rounding;
    a row with no visible key (a padding query before any real token) averages the values of
    its key prefix instead of all ``T``. Scores and softmax are float32; ``p`` is cast to
    ``q.dtype`` for the product with ``v`` (float32 accumulation). The backward pass keeps
    only the row max and sum of each block and recomputes the probabilities. The inputs are
    transposed once to the head-major layout of the dots (not once per block).
    """
    out = _head_major_attention(q.transpose(0, 2, 3, 1, 4), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3),
                                real, block)
    return out.transpose(0, 3, 1, 2, 4)


# ---------------------------------------------------------------------------- modules
def _normal(rngs: nnx.Rngs | None, shape, std: float, dtype) -> jax.Array:
    if rngs is None:  # abstract model: shapes only (see LlamaForCausalLM)
        return jax.ShapeDtypeStruct(shape, dtype)
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


def _const(shape, value: float, dtype, abstract: bool):
    return jax.ShapeDtypeStruct(shape, dtype) if abstract else jnp.full(shape, value, dtype)


class Linear(nnx.Module):
    """HF-layout linear layer: ``weight [out, in]``, optional ``bias [out]``.

    ``weight_name`` (static) is the weight's path, handed to the ``linear_fn`` hook.
    """

    def __init__(self, in_features: int, out_features: int, *, weight_name: str, use_bias: bool,
                 config: LlamaConfig, rngs: nnx.Rngs):
        self.weight = nnx.Param(_normal(rngs, (out_features, in_features), config.initializer_range,
                                        config.params_dtype))
        self.bias = nnx.Param(_const((out_features,), 0.0, config.params_dtype, rngs is None)) if use_bias else None
        self.weight_name = weight_name

    def __call__(self, x: jax.Array, linear_fn: LinearFn | None) -> jax.Array:
        """x ``[..., in]`` (compute dtype) -> ``[..., out]`` (same dtype)."""
        b = None if self.bias is None else self.bias[...]
        fn = dense_linear if linear_fn is None else linear_fn
        return fn(self.weight_name, x, self.weight[...], b).astype(x.dtype)


class Embedding(nnx.Module):
    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.weight = nnx.Param(_normal(rngs, (config.vocab_size, config.hidden_size),
                                        config.initializer_range, config.params_dtype))

    def __call__(self, ids: jax.Array, dtype) -> jax.Array:
        return jnp.take(self.weight[...], ids, axis=0).astype(dtype)


class RMSNorm(nnx.Module):
    """``weight * x / sqrt(mean(x^2) + eps)``, the statistics in float32 (as HF)."""

    def __init__(self, size: int, eps: float, config: LlamaConfig, abstract: bool = False):
        self.weight = nnx.Param(_const((size,), 1.0, config.params_dtype, abstract))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(x.dtype) * y.astype(x.dtype)


class LlamaAttention(nnx.Module):
    def __init__(self, config: LlamaConfig, layer: int, *, rngs: nnx.Rngs):
        c = config
        p = f"model.layers.{layer}.self_attn"
        hd = c.head_dim
        kw = dict(use_bias=c.attention_bias, config=c, rngs=rngs)
        self.q_proj = Linear(c.hidden_size, c.num_attention_heads * hd, weight_name=f"{p}.q_proj.weight", **kw)
        self.k_proj = Linear(c.hidden_size, c.num_key_value_heads * hd, weight_name=f"{p}.k_proj.weight", **kw)
        self.v_proj = Linear(c.hidden_size, c.num_key_value_heads * hd, weight_name=f"{p}.v_proj.weight", **kw)
        self.o_proj = Linear(c.num_attention_heads * hd, c.hidden_size, weight_name=f"{p}.o_proj.weight", **kw)
        self.num_heads = c.num_attention_heads
        self.num_kv_heads = c.num_key_value_heads
        self.head_dim = hd

    def __call__(self, h, cos, sin, mask, linear_fn, kv=None, index=None):
        """h ``[B, T, hidden]``; cos/sin ``[B, T, 1, D]``; mask bool (True = real / attend).

        Without ``kv``, mask is ``[B, T]`` (the real tokens) and the keys are this call's
        tokens, attended causally by :func:`causal_attention`. With ``kv = (k, v)`` of shape
        ``[B, S, Hkv, D]``, mask is ``[B, T, S]``, this call's keys/values are written at
        ``index`` and all S slots are attended. Returns ``(out [B, T, hidden], new kv or None)``.
        """
        B, T, _ = h.shape
        K, D = self.num_kv_heads, self.head_dim
        G = self.num_heads // K
        q = self.q_proj(h, linear_fn).reshape(B, T, self.num_heads, D)
        k = self.k_proj(h, linear_fn).reshape(B, T, K, D)
        v = self.v_proj(h, linear_fn).reshape(B, T, K, D)
        q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
        new_kv = None
        if kv is not None:
            ck, cv = kv
            k = jax.lax.dynamic_update_slice(ck, k.astype(ck.dtype), (0, index, 0, 0))
            v = jax.lax.dynamic_update_slice(cv, v.astype(cv.dtype), (0, index, 0, 0))
            new_kv = (k, v)
        # query head h uses kv head h // G (HF repeat_kv order)
        q = q.reshape(B, T, K, G, D)
        if kv is None:
            out = causal_attention(q, k, v, mask)
            return self.o_proj(out.reshape(B, T, self.num_heads * D), linear_fn), None
        scores = jnp.einsum("btkgd,bskd->bkgts", q, k.astype(q.dtype), preferred_element_type=jnp.float32)
        scores = scores * (D ** -0.5)
        scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(h.dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, v.astype(h.dtype), preferred_element_type=jnp.float32)
        out = out.astype(h.dtype).reshape(B, T, self.num_heads * D)
        return self.o_proj(out, linear_fn), new_kv


class LlamaMLP(nnx.Module):
    def __init__(self, config: LlamaConfig, layer: int, *, rngs: nnx.Rngs):
        c = config
        p = f"model.layers.{layer}.mlp"
        kw = dict(use_bias=c.mlp_bias, config=c, rngs=rngs)
        self.gate_proj = Linear(c.hidden_size, c.intermediate_size, weight_name=f"{p}.gate_proj.weight", **kw)
        self.up_proj = Linear(c.hidden_size, c.intermediate_size, weight_name=f"{p}.up_proj.weight", **kw)
        self.down_proj = Linear(c.intermediate_size, c.hidden_size, weight_name=f"{p}.down_proj.weight", **kw)

    def __call__(self, x, linear_fn):
        """SwiGLU: ``down(silu(gate(x)) * up(x))``; x ``[..., hidden]``."""
        return self.down_proj(jax.nn.silu(self.gate_proj(x, linear_fn)) * self.up_proj(x, linear_fn), linear_fn)


class LlamaDecoderLayer(nnx.Module):
    def __init__(self, config: LlamaConfig, layer: int, *, rngs: nnx.Rngs):
        self.self_attn = LlamaAttention(config, layer, rngs=rngs)
        self.mlp = LlamaMLP(config, layer, rngs=rngs)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, config, rngs is None)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, config, rngs is None)

    def __call__(self, h, cos, sin, mask, linear_fn, kv=None, index=None):
        a, new_kv = self.self_attn(self.input_layernorm(h), cos, sin, mask, linear_fn, kv, index)
        h = h + a
        h = h + self.mlp(self.post_attention_layernorm(h), linear_fn)
        return h, new_kv


class LlamaModel(nnx.Module):
    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
        self.embed_tokens = Embedding(config, rngs=rngs)
        self.layers = nnx.List([LlamaDecoderLayer(config, i, rngs=rngs) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config, rngs is None)


class KVCache(NamedTuple):
    """Decoding state for :func:`forward_with_cache` (a plain pytree).

    keys/values: per layer ``[B, S, Hkv, D]`` (compute dtype); valid ``[B, S]`` bool, slots
    holding a real token; index: int32 scalar, next slot to write; offset ``[B]`` int32,
    number of real tokens seen per row (the next position id).
    """

    keys: tuple
    values: tuple
    valid: jax.Array
    index: jax.Array
    offset: jax.Array


class LlamaForCausalLM(nnx.Module):
    """LLaMA causal LM with HF parameter names; see the module docstring for the layout.

    ``rngs=None`` builds an *abstract* model whose parameters are ``jax.ShapeDtypeStruct``
    placeholders (instant, no memory): only for loaders, which ``split`` it and ``merge``
    real arrays into its graphdef. Random init: ``normal(0, initializer_range)`` weights,
    unit norm weights, zero biases (as HF).
    """

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs | None):
        if not isinstance(config, LlamaConfig):
            raise TypeError(f"LlamaForCausalLM needs a LlamaConfig, got {type(config).__name__}; "
                            "use LlamaConfig.from_hf(dict) for a config.json dict")
        self.config = config
        self.model = LlamaModel(config, rngs=rngs)
        if config.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, weight_name="lm_head.weight",
                                  use_bias=False, config=config, rngs=rngs)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                 linear_fn: LinearFn | None = None, position_ids: jax.Array | None = None,
                 logits_at: jax.Array | None = None) -> jax.Array:
        """input_ids ``[B, T]`` int; attention_mask ``[B, T]`` (1 = real) -> logits ``[B, T, V]`` float32.

        ``position_ids`` ``[B, T]`` defaults to :func:`default_position_ids` of the mask.
        ``logits_at`` ``[B]`` int: return only each row's logits at that position, ``[B, V]``;
        the LM head then runs on ``B`` hidden states instead of ``B x T`` (scoring a
        multiple-choice answer needs one position, and the full ``[B, T, V]`` float32
        logits of a 5-shot batch run to gigabytes).
        """
        logits, _ = self._forward(input_ids, attention_mask, linear_fn, position_ids, None, logits_at)
        return logits

    def hidden_states(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                      linear_fn: LinearFn | None = None, position_ids: jax.Array | None = None):
        """The final normed hidden states ``[B, T, hidden]`` (compute dtype) and the LM head.

        Returns ``(h, w, name)``: ``w [vocab, hidden]`` is the head weight (the embedding
        matrix when tied) and ``name`` its hook name, so that ``linear_fn(name, h, w, None)``
        (or ``h @ w.T``) gives the logits of :meth:`__call__`.
        """
        h, _ = self._forward(input_ids, attention_mask, linear_fn, position_ids, None, head=False)
        w, name = self._head_weight()
        return h, w, name

    def _head_weight(self):
        if self.lm_head is None:
            return self.model.embed_tokens.weight[...], "lm_head.weight"
        return self.lm_head.weight[...], self.lm_head.weight_name

    def _forward(self, input_ids, attention_mask, linear_fn, position_ids, cache: KVCache | None,
                 logits_at: jax.Array | None = None, head: bool = True):
        c = self.config
        input_ids = jnp.asarray(input_ids)
        if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(f"input_ids must be an integer array [batch, seq], got {input_ids.dtype} "
                             f"{input_ids.shape}; add a batch axis with ids[None] for one sequence")
        B, T = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((B, T), jnp.int32)
        attention_mask = jnp.asarray(attention_mask)
        if attention_mask.shape != (B, T):
            raise ValueError(f"attention_mask has shape {attention_mask.shape}, expected {(B, T)} like input_ids")
        real = attention_mask.astype(bool)
        if cache is None:
            if position_ids is None:
                position_ids = default_position_ids(attention_mask)
            mask = real  # causal_attention applies the causal part block by block
            index = None
        else:
            if position_ids is None:
                position_ids = cache.offset[:, None] + default_position_ids(attention_mask)
            S = cache.valid.shape[1]
            index = cache.index
            valid = jax.lax.dynamic_update_slice(cache.valid, real, (0, index))
            slots = jnp.arange(S)
            causal = slots[None, :] <= (index + jnp.arange(T))[:, None]  # [T, S]
            mask = causal[None] & valid[:, None, :]
        position_ids = jnp.asarray(position_ids)
        if position_ids.shape != (B, T):
            raise ValueError(f"position_ids has shape {position_ids.shape}, expected {(B, T)}")
        dtype = c.compute_dtype
        h = self.model.embed_tokens(input_ids, dtype)
        cos, sin = _rope_cos_sin(c, position_ids)

        new_keys, new_values = [], []
        for i, layer in enumerate(self.model.layers):
            if cache is not None:
                h, (k, v) = layer(h, cos, sin, mask, linear_fn, (cache.keys[i], cache.values[i]), index)
                new_keys.append(k)
                new_values.append(v)
            elif c.remat:
                def block(lyr, h, cos, sin, mask):
                    return lyr(h, cos, sin, mask, linear_fn)[0]
                h = nnx.remat(block)(layer, h, cos, sin, mask)
            else:
                h = layer(h, cos, sin, mask, linear_fn)[0]
        if logits_at is not None:
            logits_at = jnp.asarray(logits_at)
            if logits_at.shape != (B,) or not jnp.issubdtype(logits_at.dtype, jnp.integer):
                raise ValueError(f"logits_at must be one integer position per row, shape {(B,)}; "
                                 f"got {logits_at.dtype} {logits_at.shape}")
            h = h[jnp.arange(B), logits_at][:, None]  # [B, 1, D]: the norm and head are per token
        h = self.model.norm(h)
        if not head:
            return h, None
        w, name = self._head_weight()
        if linear_fn is None:
            logits = dense_linear(name, h, w, None, out_dtype=jnp.float32)
        else:
            logits = linear_fn(name, h, w, None).astype(jnp.float32)
        if logits_at is not None:
            logits = logits[:, 0]
        new_cache = None
        if cache is not None:
            new_cache = KVCache(tuple(new_keys), tuple(new_values), valid, index + T,
                                cache.offset + attention_mask.astype(jnp.int32).sum(-1))
        return logits, new_cache


# ---------------------------------------------------------------------------- functional form
def pure_dict(state) -> dict:
    """Nested dict of arrays from an NNX state (``nnx.to_pure_dict`` where it exists)."""
    fn = getattr(nnx, "to_pure_dict", None)
    return fn(state) if fn is not None else state.to_pure_dict()


def init_model(config: LlamaConfig, seed: int = 0) -> LlamaForCausalLM:
    """A randomly initialised model (normal(0, initializer_range) weights, unit norms)."""
    return LlamaForCausalLM(config, rngs=nnx.Rngs(seed))


def split(model: LlamaForCausalLM):
    """``(graphdef, params)``: params is the nested pure dict of arrays (HF names as keys)."""
    graphdef, state = nnx.split(model)
    params = pure_dict(state)
    n_all = len(jax.tree_util.tree_leaves(params))
    n_par = len(jax.tree_util.tree_leaves(pure_dict(nnx.state(model, nnx.Param))))
    if n_all != n_par:
        raise ValueError("model holds non-parameter state; split expects parameters only")
    return graphdef, params


def _int_keys(tree):
    """``tree`` with every all-digit string key of its dicts made an ``int``.

    :func:`split` keys the decoder layers ``0, 1, ...`` (ints). A params dict that went
    through names (``tree.unflatten``, JSON, a checkpoint's string keys) has ``"0", "1",
    ...`` instead, and NNX would pair its leaves with the graph in *string* order
    (``"10"`` before ``"2"``): layer 10's weights in layer 2, silently. Made ints again the
    keys sort by number and such a tree merges into the right layers."""
    if isinstance(tree, Mapping):
        return {(int(k) if isinstance(k, str) and k.isdigit() else k): _int_keys(v) for k, v in tree.items()}
    return tree


def merge(graphdef, params) -> LlamaForCausalLM:
    """Inverse of :func:`split` (no copy of the arrays). ``params`` may key the layers by
    ``int`` (as :func:`split` returns) or by digit strings (``"0"``, as
    :func:`sylva_jax.tree.unflatten` returns); both give the same model."""
    return nnx.merge(graphdef, _int_keys(params))


def apply(graphdef, params, input_ids, attention_mask=None, *, linear_fn: LinearFn | None = None,
          position_ids=None, logits_at=None) -> jax.Array:
    """Pure forward pass: logits ``[B, T, V]`` float32 (``[B, V]`` at ``logits_at`` ``[B]``,
    see :meth:`LlamaForCausalLM.__call__`); jittable, differentiable in ``params``."""
    return merge(graphdef, params)(input_ids, attention_mask, linear_fn=linear_fn,
                                   position_ids=position_ids, logits_at=logits_at)


def loss(graphdef, params, input_ids, attention_mask=None, labels=None, *,
         linear_fn: LinearFn | None = None, position_ids=None, hook_head: bool | None = None,
         chunk_size: int = HEAD_CHUNK) -> jax.Array:
    """Token-mean causal LM loss (float32 scalar): ``lm_loss(apply(...), labels)``.

    ``labels [B, T]`` follow :mod:`sylva_jax.losses` (shift inside, ``-100`` ignored). The
    decoder layers call ``linear_fn`` as in :func:`apply`. The LM head goes through the hook
    too when ``hook_head`` is true (default: whenever a ``linear_fn`` is given); otherwise
    the head is the plain product fused with the cross-entropy
    (:func:`sylva_jax.losses.lm_head_loss`, ``chunk_size`` positions at a time), which never
    holds ``[B, T, vocab]`` logits. Pass ``hook_head=False`` when the hook leaves the head
    unchanged (it does not adapt ``"lm_head.weight"``).
    """
    if labels is None:
        raise ValueError("llama.loss needs labels [B, T] (input_ids shifted inside; -100 = no loss)")
    model = merge(graphdef, params)
    if hook_head is None:
        hook_head = linear_fn is not None
    if hook_head:
        logits = model(input_ids, attention_mask, linear_fn=linear_fn, position_ids=position_ids)
        return lm_loss(logits, labels)
    h, w, _ = model.hidden_states(input_ids, attention_mask, linear_fn=linear_fn, position_ids=position_ids)
    return lm_head_loss(h, w, labels, chunk_size=chunk_size)


def init_cache(config: LlamaConfig, batch: int, max_len: int, dtype=None) -> KVCache:
    """An empty :class:`KVCache` for ``batch`` rows and ``max_len`` slots."""
    dtype = config.compute_dtype if dtype is None else dtype
    shape = (batch, max_len, config.num_key_value_heads, config.head_dim)
    zeros = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_hidden_layers))
    return KVCache(zeros, tuple(jnp.zeros(shape, dtype) for _ in range(config.num_hidden_layers)),
                   jnp.zeros((batch, max_len), bool), jnp.zeros((), jnp.int32), jnp.zeros((batch,), jnp.int32))


def forward_with_cache(graphdef, params, input_ids, attention_mask, cache: KVCache, *,
                       linear_fn: LinearFn | None = None) -> tuple[jax.Array, KVCache]:
    """Incremental forward: ``input_ids [B, T]`` written at ``cache.index``; logits ``[B, T, V]``.

    Tokens attend to every earlier valid slot of the cache and causally among themselves.
    Position ids continue from ``cache.offset`` (real tokens seen so far per row).
    """
    model = merge(graphdef, params)
    return model._forward(input_ids, attention_mask, linear_fn, None, cache)


@partial(jax.jit, static_argnums=(0,), static_argnames=("linear_fn",), donate_argnames=("cache",))
def _cached_step(graphdef, params, input_ids, attention_mask, cache, linear_fn=None):
    logits, cache = forward_with_cache(graphdef, params, input_ids, attention_mask, cache, linear_fn=linear_fn)
    return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache


def _as_batch(prompt, tokenizer, pad_id: int):
    """prompt (text, list of texts, ids, list of id lists, array) -> left-padded ids, mask (numpy)."""
    if isinstance(prompt, str) or (isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], str)):
        if tokenizer is None:
            raise ValueError("generate got text but no tokenizer; pass tokenizer=... or token ids")
        texts = [prompt] if isinstance(prompt, str) else list(prompt)
        rows = [list(tokenizer.encode(t, add_special_tokens=False)) for t in texts]
    else:
        arr = prompt if isinstance(prompt, (np.ndarray, jax.Array)) else None
        if arr is not None:
            arr = np.asarray(arr)
            rows = [arr.tolist()] if arr.ndim == 1 else arr.tolist()
        elif isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], (list, tuple, np.ndarray)):
            rows = [list(r) for r in prompt]
        else:
            rows = [list(prompt)]
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("generate needs a non-empty prompt for every row")
    T = max(len(r) for r in rows)
    ids = np.full((len(rows), T), pad_id, np.int32)
    mask = np.zeros((len(rows), T), np.int32)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = r
        mask[i, T - len(r):] = 1
    return ids, mask


def generate(model: LlamaForCausalLM, prompt, max_new_tokens: int = 32, *, tokenizer=None,
             attention_mask=None, eos_token_id: int | Sequence[int] | None = None,
             pad_token_id: int | None = None, linear_fn: LinearFn | None = None) -> np.ndarray:
    """Greedy decoding with a KV cache: one jitted prefill, then one jitted step per token.

    prompt: text or list of texts (needs ``tokenizer``), a list of ids, a list of id lists
    (left-padded here), or an int array ``[B, T]`` (with ``attention_mask`` when it is
    padded; padding must be on the left). Returns int32 ``[B, T + max_new_tokens]``: the
    (padded) prompt followed by the new tokens; after a row emits an EOS token, the rest of
    that row is ``pad_token_id`` (decoding stops early when every row is done).
    ``linear_fn`` must be hashable (it is a static argument of the jitted step).
    """
    c = model.config
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if eos_token_id is None and tokenizer is not None:
        eos_token_id = getattr(tokenizer, "eos_token_id", None)
    if pad_token_id is None:
        pad_token_id = c.pad_token_id
    if pad_token_id is None and tokenizer is not None:
        pad_token_id = getattr(tokenizer, "pad_token_id", None)
    if pad_token_id is None:
        pad_token_id = eos_token_id if isinstance(eos_token_id, int) else 0
    eos = set() if eos_token_id is None else (
        {int(eos_token_id)} if isinstance(eos_token_id, (int, np.integer)) else {int(e) for e in eos_token_id})
    if attention_mask is not None:
        ids = np.asarray(prompt, np.int32)
        mask = np.asarray(attention_mask, np.int32)
        if ids.ndim != 2 or mask.shape != ids.shape:
            raise ValueError(f"with attention_mask, prompt must be ids [B, T] of the same shape; got "
                             f"{ids.shape} and {mask.shape}")
        if np.any(np.diff(mask, axis=1) < 0) or np.any(mask[:, -1] == 0):
            raise ValueError("generate needs left padding (mask rows like 0..0 1..1); re-pad the prompt on the left")
    else:
        ids, mask = _as_batch(prompt, tokenizer, pad_token_id)
    B, T = ids.shape
    single = B == 1
    if single:
        # XLA:CPU compiles matrix-vector dots (M = B*T = 1) ~20x slower than M = 2 (measured:
        # 60 dots 1.35 s vs 0.04 s; the SmolLM2 decode step 9 s vs 3 s of CPU). Decoding two
        # copies of the row costs nothing measurable (the step is bound by reading weights).
        ids, mask = np.repeat(ids, 2, axis=0), np.repeat(mask, 2, axis=0)
        B = 2
    graphdef, params = split(model)
    cache = init_cache(c, B, T + max_new_tokens)
    nxt, cache = _cached_step(graphdef, params, jnp.asarray(ids), jnp.asarray(mask), cache, linear_fn=linear_fn)
    out = np.full((B, max_new_tokens), pad_token_id, np.int32)
    done = np.zeros(B, bool)
    ones = jnp.ones((B, 1), jnp.int32)
    for i in range(max_new_tokens):
        tok = np.asarray(nxt)
        out[:, i] = np.where(done, pad_token_id, tok)
        done |= np.isin(tok, list(eos))
        if i == max_new_tokens - 1 or done.all():
            break
        nxt, cache = _cached_step(graphdef, params, jnp.asarray(out[:, i:i + 1]), ones, cache, linear_fn=linear_fn)
    result = np.concatenate([ids, out], axis=1)
    return result[:1] if single else result
