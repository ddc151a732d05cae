"""Bad files are errors that name the file and the fix, never a parser's traceback."""
from __future__ import annotations

import json

import pytest

from tiny import tiny_llama_dir

from sylva_jax.inputs import InputFileError, reading
from sylva_jax.models.loading import load_pretrained


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
    out = tmp_path_factory.mktemp("tiny")
    tiny_llama_dir(out, vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
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


def _tiny_params_and_masks():
    import jax.numpy as jnp
    import numpy as np
    params = {"layer": {"w": jnp.asarray(np.random.default_rng(0).normal(size=(128, 128)),
                                         jnp.float32)}}
    return params, {"layer.w": np.array([[True, False], [False, True]])}


def test_damaged_adapter_files_name_the_file(tmp_path):
    from sylva_jax.adapter import make_adapter
    from sylva_jax.checkpoint import load_adapter, save_adapter
    params, masks = _tiny_params_and_masks()
    adapter = make_adapter(params, masks, block_size=64)
    path = save_adapter(tmp_path / "ad", adapter, params)
    load_adapter(path, params)                                     # intact: loads
    tiles = next(p for p in path.iterdir() if p.suffix == ".safetensors")
    good = tiles.read_bytes()
    tiles.write_bytes(good[: len(good) // 2])
    with pytest.raises(InputFileError, match=rf"adapter tiles .*{tiles.name}: .*save it again"):
        load_adapter(path, params)
    tiles.write_bytes(good)
    meta = next(p for p in path.iterdir() if p.suffix == ".json")
    meta.write_text("[1, 2")
    with pytest.raises(InputFileError, match=rf"adapter metadata .*{meta.name}"):
        load_adapter(path, params)


def test_damaged_checkpoint_is_named_with_the_way_out(tmp_path):
    import jax.numpy as jnp
    from sylva_jax.checkpoint import RunCheckpoints
    ck = RunCheckpoints(tmp_path / "ck")
    ck.save(3, {"w": jnp.ones((8, 8))}, {})
    ck.wait()
    for f in (tmp_path / "ck" / "latest" / "3").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "ocdbt" in str(f):
            f.write_bytes(b"\x00" * 7)
    with pytest.raises(InputFileError, match=r"checkpoint .*latest/3: .*delete that step's directory"):
        RunCheckpoints(tmp_path / "ck").restore_latest({"w": jnp.zeros((8, 8))})


def test_full_disk_during_a_checkpoint_is_a_clear_error_and_keeps_the_last_one(tmp_path):
    """A real 1 MiB tmpfs (mounted in a private user+mount namespace, so it needs no
    privilege): the second checkpoint does not fit."""
    import os
    import shutil
    import subprocess
    import sys
    assert shutil.which("unshare"), "util-linux's unshare is needed for the tmpfs test"
    mnt = tmp_path / "small"
    mnt.mkdir()
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([os.path.dirname(here)] + sys.path))
    script = (f"mount -t tmpfs -o size=1m tmpfs {mnt} && "
              f"exec {sys.executable} {os.path.join(here, 'enospc_worker.py')} {mnt / 'ck'}")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], env=env, capture_output=True,
                          text=True, timeout=300)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    assert line, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = json.loads(line[len("RESULT "):])
    assert "no space left on device (ENOSPC)" in out["error"]
    assert "step 1) is intact" in out["error"]
    assert out["latest"] == 1 and out["restored_equal"] and out["extra"] == {"ok": 1}
