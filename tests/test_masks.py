"""Mask files (safetensors + JSON metadata, atomic writes) and mask reports."""
from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest

from sylva_jax import masks as M


def example_masks():
    rng = np.random.default_rng(0)
    return {"model.layers.0.self_attn.q_proj.weight": rng.random((2, 3)) < 0.5,
            "model.layers.0.self_attn.o_proj.weight": np.array([[True]]),
            "model.layers.1.mlp.down_proj.weight": np.zeros((1, 5), bool)}


def example_meta(**kw):
    base = dict(model="smollm2-135m@sha256:abc", scope="self_attn", sparsity=0.95, block_size=64,
                method="sylva", num_partition=8, num_samples=128, factor="mean", seed=0)
    return M.mask_metadata(**{**base, **kw})


def test_round_trip(tmp_path):
    masks, meta = example_masks(), example_meta(created="today")
    path = M.save_masks(masks, tmp_path / "sub" / "masks.safetensors", meta)
    assert os.path.exists(path) and os.listdir(tmp_path / "sub") == ["masks.safetensors"]
    got, md = M.load_masks(path)
    assert set(got) == set(masks)
    for n in masks:
        assert got[n].dtype == bool and np.array_equal(got[n], masks[n])
    assert md == meta and md["created"] == "today" and len(md["hash"]) == 64
    assert M.masks_match(md, example_meta()) == (True, "metadata matches")


def test_metadata_mismatch_reasons(tmp_path):
    meta = example_meta()
    ok, why = M.masks_match(meta, example_meta(sparsity=0.9, method="kfac"))
    assert not ok
    assert "sparsity: cached 0.95, wanted 0.9" in why and "method: cached 'sylva', wanted 'kfac'" in why
    assert "block_size" not in why
    ok, why = M.masks_match(meta, example_meta(scope=re.compile("q_proj")))
    assert not ok and "scope: cached 'self_attn', wanted 're:q_proj'" in why
    assert M.masks_match(None, meta) == (False, "no cached metadata")
    tampered = dict(meta, sparsity=0.5)  # fields edited, stored hash kept
    ok, why = M.masks_match(tampered, dict(meta, sparsity=0.5))
    assert not ok and "hash" in why
    # informational fields do not change the hash; identity fields do
    assert example_meta(created="x")["hash"] == meta["hash"]
    assert example_meta(seed=1)["hash"] != meta["hash"]
    # tuples vs lists and numpy scalars compare like their JSON form
    assert M.masks_match(example_meta(scope=["q_proj", "v_proj"]),
                         example_meta(scope=("q_proj", "v_proj")))[0]
    assert M.masks_match(meta, dict(example_meta(), sparsity=np.float64(0.95)))[0]


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "m.safetensors"
    M.save_masks(example_masks(), path, example_meta())
    before = path.read_bytes()
    import sylva_jax.atomic

    def boom(fd):  # the new bytes are in the temporary file; the disk then fails
        raise OSError("disk full")

    monkeypatch.setattr(sylva_jax.atomic.os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        M.save_masks({"x": np.ones((1, 1), bool)}, path, example_meta(sparsity=0.5))
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.safetensors"]  # no temporary left behind
    monkeypatch.undo()
    M.save_masks({"x": np.ones((1, 1), bool)}, path, example_meta(sparsity=0.5))
    masks, meta = M.load_masks(path)
    assert list(masks) == ["x"] and meta["sparsity"] == 0.5


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no mask file"):
        M.load_masks(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        M.load_masks(bad)
    from safetensors.numpy import save_file

    other = tmp_path / "other.safetensors"
    save_file({"w": np.zeros((2, 2), np.float32)}, str(other))
    with pytest.raises(ValueError, match="not a sylva_jax mask file"):
        M.load_masks(other)
    with pytest.raises(ValueError, match="must be 2-D"):
        M.save_masks({"w": np.ones(3, bool)}, tmp_path / "x.safetensors", example_meta())
    with pytest.raises(ValueError, match="boolean"):
        M.save_masks({"w": np.full((1, 1), 2)}, tmp_path / "x.safetensors", example_meta())


def test_mask_report_counts_and_sparsity():
    bs = 4
    params = {"model": {"embed_tokens": {"weight": np.zeros((10, 8))},
                        "layers": {"0": {"self_attn": {"q_proj": {"weight": np.zeros((8, 12))},
                                                       "o_proj": {"weight": np.zeros((4, 4))}},
                                         "input_layernorm": {"weight": np.zeros(8)}}}}}
    masks = {"model.layers.0.self_attn.q_proj.weight": np.array([[1, 0, 0], [0, 1, 1]], bool),
             "model.layers.0.self_attn.o_proj.weight": np.array([[True]])}
    rep = M.mask_report(masks, params)
    assert rep["layers"]["model.layers.0.self_attn.q_proj.weight"] == {
        "shape": [8, 12], "block_size": bs, "tiles": 6, "kept": 3}
    assert rep["kept_tiles"] == 4 and rep["total_tiles"] == 7
    assert rep["trainable_params"] == 4 * bs * bs                    # 64
    assert rep["scope_params"] == 8 * 12 + 16                         # 112
    assert rep["total_params"] == 80 + 96 + 16 + 8                    # 200
    assert rep["sparsity_in_scope"] == pytest.approx(1 - 64 / 112)
    assert rep["sparsity_overall"] == pytest.approx(1 - 64 / 200)
    assert "4/7 tiles kept in 2 layers" in rep["summary"] and "68.0% sparsity overall" in rep["summary"]
    assert "42.9% in scope" in rep["summary"]
    table = M.format_mask_report(rep, per_layer=True)
    assert "o_proj.weight: 1/1 tiles of 4x4 (weight 4x4)" in table
    json.dumps(rep)  # plain JSON-serialisable
    with pytest.raises(ValueError, match="names no parameter"):
        M.mask_report({"nope.weight": np.ones((1, 1), bool)}, params)
    with pytest.raises(ValueError, match="does not tile"):
        M.mask_report({"model.layers.0.self_attn.q_proj.weight": np.ones((2, 2), bool)}, params)
