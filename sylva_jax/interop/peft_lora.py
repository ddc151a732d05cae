"""LoRA factors <-> a PEFT LoRA adapter directory (docs/algorithm.md, LoRA baseline).

Our :class:`sylva_jax.lora.LoraParams` and PEFT's LoRA layer compute the same update,
``y = x W^T + b + (alpha / r) (x A^T) B^T``, with the same factor shapes, so the mapping
is a renaming: for a weight ``M.weight [out, in]``

    factors[M.weight]["a"] [r, in]   <->  base_model.model.M.lora_A.weight
    factors[M.weight]["b"] [out, r]  <->  base_model.model.M.lora_B.weight

and ``adapter_config.json`` carries ``r``, ``lora_alpha`` (scaling ``lora_alpha / r``,
``use_rslora: false``) and ``target_modules``. Factors are written in their dtype
(bfloat16 as real BF16). ``target_modules`` is the list of leaf names (``["k_proj",
"q_proj"]``) when the adapter covers every linear layer of those names, which vLLM and
llama.cpp's ``convert_lora_to_gguf.py`` expect, and the full module names otherwise.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from sylva_jax import tree as tree_lib
from sylva_jax.checkpoint import fingerprint
from sylva_jax.interop import _files
from sylva_jax.lora import LoraParams
from sylva_jax.progress import track

__all__ = ["save_peft_lora", "load_peft_lora", "lora_target_modules"]


def _linear_paths(params: Any) -> list[str]:
    return [p for p, leaf in tree_lib.flatten(params).items()
            if p.endswith(".weight") and getattr(leaf, "ndim", 0) == 2 and "embed_tokens" not in p]


def lora_target_modules(params: Any, paths) -> list[str]:
    """PEFT ``target_modules`` selecting exactly the modules of ``paths`` in ``params``:
    sorted leaf names when they select nothing else, else sorted full module names."""
    modules = {_files.module_name(p) for p in paths}
    leaves = {m.rsplit(".", 1)[-1] for m in modules}
    same_leaf = {_files.module_name(p) for p in _linear_paths(params)
                 if _files.module_name(p).rsplit(".", 1)[-1] in leaves}
    return sorted(leaves) if same_leaf == modules else sorted(modules)


def save_peft_lora(out_dir: str | os.PathLike, lora: LoraParams, base_params: Any, *,
                   dropout: float = 0.0, base_name_or_path: str | None = None,
                   base_fingerprint: str | None = None) -> Path:
    """Write ``lora`` as a PEFT LoRA adapter directory that ``PeftModel.from_pretrained``
    loads onto transformers' model of ``base_params``.

    Args:
      out_dir: the directory (written atomically; an existing export is replaced).
      lora: the trained factors (``TrainState.extras`` of a lora run).
      base_params: the frozen base parameters (``TrainState.params`` of a lora run); their
        names check the factors and their :func:`sylva_jax.checkpoint.fingerprint` is
        stored so :func:`load_peft_lora` refuses another base.
      dropout: ``lora_dropout`` recorded in the config (inactive at inference).
      base_name_or_path: ``base_model_name_or_path`` in the config (informational for
        ``PeftModel``, used by ``AutoPeftModelForCausalLM``).
      base_fingerprint: precomputed fingerprint of ``base_params`` (computed if ``None``).
    Returns the directory.
    """
    flat = tree_lib.flatten(base_params)
    tensors = {}
    for path in track(lora.factors, "LoRA factors", unit="weight", every_s=10, delay_s=2):
        f = lora.factors[path]
        if path not in flat:
            raise KeyError(f"LoRA factors for {path!r} have no weight in base_params; pass the base model the "
                           "factors were trained on")
        out_dim, in_dim = flat[path].shape
        a, b = jnp.asarray(f["a"]), jnp.asarray(f["b"])
        if a.shape != (lora.rank, in_dim) or b.shape != (out_dim, lora.rank):
            raise ValueError(f"LoRA factors of {path!r} have shapes A {a.shape}, B {b.shape}; weight "
                             f"[{out_dim}, {in_dim}] with rank {lora.rank} needs A [{lora.rank}, {in_dim}], "
                             f"B [{out_dim}, {lora.rank}]")
        tensors[_files.peft_key(path, "lora_A.weight")] = a
        tensors[_files.peft_key(path, "lora_B.weight")] = b
    if not tensors:
        raise ValueError("the LoRA parameters adapt no weight; nothing to export")
    config = {
        **_files.base_config(base_name_or_path),
        "peft_type": "LORA",
        "r": int(lora.rank),
        "lora_alpha": float(lora.alpha),
        "lora_dropout": float(dropout),
        "target_modules": lora_target_modules(base_params, lora.factors),
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    fp = base_fingerprint or fingerprint(base_params)
    with _files.atomic_dir(out_dir) as tmp:
        _files.write_adapter(tmp, config, tensors, fingerprint=fp)
    return Path(out_dir)


def load_peft_lora(path: str | os.PathLike, params: Any, *, check_base: bool = True,
                   dtype: Any = None) -> LoraParams:
    """A PEFT LoRA adapter directory as :class:`LoraParams` for ``params`` (our model).

    Use the result with :func:`sylva_jax.lora.lora_linear_fn` to evaluate, with
    :func:`sylva_jax.lora.merge_lora` to merge, or as a lora run's starting ``extras`` to
    continue training. ``use_rslora`` (scaling ``alpha / sqrt(r)``) is folded into
    ``alpha``. Refused with a ``ValueError``: DoRA, per-module ``rank_pattern`` /
    ``alpha_pattern``, trained biases, factors naming a weight ``params`` does not have or
    of the wrong shape, and (``check_base``) an adapter exported by :func:`save_peft_lora`
    from another base model. ``dtype`` casts the factors (default: as stored).
    """
    config, tensors, saved_fp = _files.read_adapter(path, "LORA")
    for key, ok in (("use_dora", False), ("bias", "none"), ("lora_bias", False)):
        if config.get(key, ok) != ok:
            raise ValueError(f"{path}: {key}={config[key]!r} is not supported (our LoRA has no "
                             f"{'magnitude vector' if key == 'use_dora' else 'trained bias'})")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise ValueError(f"{path}: per-module {key} {config[key]} is not supported; our LoraParams has one "
                             "rank and one alpha for every weight")
    rank = int(config["r"])
    alpha = float(config.get("lora_alpha", 8))
    if config.get("use_rslora"):
        alpha = alpha * rank / math.sqrt(rank)  # scale alpha / sqrt(r) == alpha' / r
    flat = tree_lib.flatten(params)
    factors: dict[str, dict] = {}
    for key, value in tensors.items():
        if not key.startswith(_files.PEFT_PREFIX):
            raise ValueError(f"{path}: tensor {key!r} is not a PEFT causal-LM key (expected the prefix "
                             f"{_files.PEFT_PREFIX!r})")
        module, _, tensor = key[len(_files.PEFT_PREFIX):].rpartition(".lora_")
        if tensor not in ("A.weight", "B.weight"):
            raise ValueError(f"{path}: tensor {key!r} is not a LoRA factor (lora_A.weight / lora_B.weight)")
        w = f"{module}.weight"
        if w not in flat:
            raise ValueError(f"{path}: the adapter adapts {module!r}, which this model does not have; load the "
                             "base model the adapter was trained on")
        factors.setdefault(w, {})["a" if tensor == "A.weight" else "b"] = jnp.asarray(value, dtype)
    for w, f in factors.items():
        out_dim, in_dim = flat[w].shape
        want = {"a": (rank, in_dim), "b": (out_dim, rank)}
        for name, shape in want.items():
            if name not in f:
                raise ValueError(f"{path}: {w!r} has no lora_{name.upper()}.weight")
            if tuple(f[name].shape) != shape:
                raise ValueError(f"{path}: lora_{name.upper()}.weight of {w!r} has shape {tuple(f[name].shape)}; "
                                 f"rank {rank} on a [{out_dim}, {in_dim}] weight needs {shape}")
    _files.check_fingerprint(path, saved_fp, params, check_base=check_base)
    order = {p: i for i, p in enumerate(flat)}
    factors = dict(sorted(factors.items(), key=lambda kv: order[kv[0]]))
    return LoraParams(factors=factors, rank=rank, alpha=alpha)
