"""Bad files are errors that name the file and the fix, never a parser's traceback."""
from __future__ import annotations

import json

import pytest

from sylva_jax.inputs import InputFileError, reading
from sylva_jax.models.llama import LlamaConfig, init_model
from sylva_jax.models.loading import load_pretrained, save_pretrained


def test_reading_wraps_parse_errors_and_passes_missing_files(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text("{not json")
    with pytest.raises(InputFileError, match=r"cannot read data file .*x\.json: JSONDecodeError.*\. fix it"):
        with reading(bad, "data file", "fix it"):
            json.loads(bad.read_text())
    with pytest.raises(FileNotFoundError):
        with reading(tmp_path / "none", "data file"):
            open(tmp_path / "none")
    assert issubclass(InputFileError, ValueError)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    out = tmp_path_factory.mktemp("tiny")
    save_pretrained(init_model(cfg, seed=0), out)
    return out


def test_truncated_safetensors_names_the_file(tiny_dir, tmp_path):
    import shutil
    d = tmp_path / "m"
    shutil.copytree(tiny_dir, d)
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[:20])
    with pytest.raises(InputFileError, match=r"model weights .*model\.safetensors: .*download the model again"):
        load_pretrained(str(d))


def test_corrupt_shard_index(tiny_dir, tmp_path):
    import shutil
    d = tmp_path / "m"
    shutil.copytree(tiny_dir, d)
    (d / "model.safetensors").rename(d / "model-00001.safetensors")
    (d / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(InputFileError, match=r"shard index .*KeyError"):
        load_pretrained(str(d))


def test_truncated_gguf_names_the_file(tmp_path):
    from sylva_jax.models.loading import smollm2_gguf_path
    src = smollm2_gguf_path()
    bad = tmp_path / "cut.gguf"
    with open(src, "rb") as f:
        bad.write_bytes(f.read(1 << 20))          # the header and part of the metadata/tensors
    with pytest.raises(InputFileError, match=r"GGUF .*cut\.gguf: .*truncated or not a GGUF"):
        load_pretrained(str(bad))
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"\x00" * 4096)
    with pytest.raises(InputFileError, match=r"GGUF file .*garbage\.gguf"):
        load_pretrained(str(garbage))
