"""Shared plumbing of the PEFT and merged exports: atomic directories, PEFT key names, the
adapter file pair (``adapter_config.json`` + ``adapter_model.safetensors``) and the base
fingerprint carried in the safetensors metadata.

PEFT names a tensor of module ``M`` (our weight path ``M + ".weight"``) in a causal LM as
``base_model.model.{M}.{tensor}``: the ``PeftModel`` wraps a tuner whose ``.model`` is the
transformers model, and the adapter name (``default``) is dropped when saved.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterator, Mapping

import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.flax import save_file

from sylva_jax import atomic
from sylva_jax import checkpoint

PEFT_PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
FINGERPRINT_KEY = "sylva_base_fingerprint"
# what a directory we write holds at the top; an existing directory is replaced only if it
# is empty or is one of these (so a typo in out_dir never deletes someone's folder)
_OURS = (CONFIG_FILE, "config.json")


def module_name(path: str) -> str:
    """``model.layers.0.self_attn.q_proj.weight`` -> ``model.layers.0.self_attn.q_proj``."""
    if not path.endswith(".weight"):
        raise ValueError(f"{path!r} is not a linear weight path (expected a name ending in '.weight'); "
                         "only nn.Linear weights have a PEFT counterpart")
    return path[: -len(".weight")]


def peft_key(path: str, tensor: str) -> str:
    """PEFT's safetensors key of ``tensor`` (e.g. ``lora_A.weight``) for our weight ``path``."""
    return f"{PEFT_PREFIX}{module_name(path)}.{tensor}"


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """``with atomic_dir(p) as tmp: write files into tmp``: ``tmp`` is a fresh directory
    beside ``p`` renamed to ``p`` when the block ends without an exception (an existing
    ``p`` is swapped out and deleted only then); on an exception ``tmp`` is deleted and
    ``p`` is left as it was. An existing ``p`` that is neither empty nor an export
    (no ``adapter_config.json`` / ``config.json``) is refused up front."""
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise FileExistsError(f"{path} exists and is not a directory; choose another output directory")
        if any(path.iterdir()) and not any((path / n).is_file() for n in _OURS):
            raise FileExistsError(f"{path} is a non-empty directory that is not an export (no {' or '.join(_OURS)}); "
                                  "refusing to replace it: choose a new or empty output directory")
    with atomic.atomic_dir(path) as tmp:
        yield tmp


def write_adapter(directory: Path, config: Mapping[str, Any], tensors: Mapping[str, Any], *,
                  fingerprint: str | None) -> None:
    """Write PEFT's file pair into ``directory`` (already the temporary one of
    :func:`atomic_dir`). Tensors keep their dtype (bfloat16 stays BF16)."""
    metadata = {"format": "pt"}
    if fingerprint:
        metadata[FINGERPRINT_KEY] = fingerprint
    save_file({k: jnp.asarray(v) for k, v in tensors.items()}, str(directory / WEIGHTS_FILE), metadata=metadata)
    (directory / CONFIG_FILE).write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n")


def read_adapter(path: str | os.PathLike, peft_type: str) -> tuple[dict, dict[str, np.ndarray], str | None]:
    """``(config, {key: numpy array}, base fingerprint or None)`` of a PEFT adapter directory
    of ``peft_type`` (``"LORA"``, ``"SHIRA"``)."""
    path = Path(path)
    if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        bin_only = (path / "adapter_model.bin").is_file()
        raise FileNotFoundError(
            f"{path} is not a PEFT adapter directory with {CONFIG_FILE} and {WEIGHTS_FILE}"
            + ("; it holds a PyTorch adapter_model.bin: re-save it with PeftModel.save_pretrained("
               "..., safe_serialization=True)" if bin_only else ""))
    config = json.loads((path / CONFIG_FILE).read_text())
    if config.get("peft_type") != peft_type:
        raise ValueError(f"{path} holds a {config.get('peft_type')!r} adapter, not {peft_type!r}")
    with safe_open(str(path / WEIGHTS_FILE), framework="flax") as f:
        metadata = f.metadata() or {}
        tensors = {k: np.asarray(f.get_tensor(k)) for k in f.keys()}
    return config, tensors, metadata.get(FINGERPRINT_KEY)


def check_fingerprint(path, saved: str | None, params: Any, *, check_base: bool) -> None:
    """Refuse ``params`` when the adapter at ``path`` records another base model.

    Adapters written by PEFT itself carry no fingerprint; for them only names and shapes
    are checked (by the caller)."""
    if not check_base or saved is None:
        return
    got = checkpoint.fingerprint(params)
    if got != saved:
        raise ValueError(
            f"the adapter in {path} was exported from a different base model (base fingerprint "
            f"{saved[:16]}..., this model {got[:16]}...); load the base model it was trained on "
            "(check_base=False applies it anyway)")


def base_config(base_name_or_path: str | None) -> dict:
    """The keys every PEFT config we write shares."""
    return {
        "base_model_name_or_path": None if base_name_or_path is None else os.fspath(base_name_or_path),
        "revision": None,
        "inference_mode": True,
        "task_type": "CAUSAL_LM",
        "modules_to_save": None,
        "fan_in_fan_out": False,
    }
