"""sylva_jax.export against peft's own loader and transformers' LLaMA.

A tiny random LLaMA is saved with our ``save_pretrained`` (float32 and bfloat16); the
Sylva and LoRA runs on it are exported as PEFT adapters, loaded with
``PeftModel.from_pretrained`` onto transformers' model of that base, and their logits are
compared with our JAX model's and with our merged export's. Every test also checks that
the fine-tuning moves the logits by far more than its tolerance, so a dropped or
misplaced delta cannot pass.
"""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tiny import tiny_config

from sylva_jax import recipes, tree
from sylva_jax.adapter import make_adapter
from sylva_jax.export import (ShiraBudgetError, export_merged, export_peft, export_run, load_peft_lora,
                              load_peft_shira, lora_target_modules, merged_params, save_peft_lora,
                              save_peft_shira, shira_rank)
from sylva_jax.interop import merged as merged_lib
from sylva_jax.lora import LoraParams, init_lora, lora_linear_fn
from sylva_jax.models.llama import LlamaConfig, apply, init_model, merge, split
from sylva_jax.models.loading import save_pretrained

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

BS = 16  # tile side for the tiny model (64-wide weights: 4x4 tiles)
IDS = np.array([[1, 17, 42, 99, 5, 230, 7, 64, 128, 3, 11, 200],
                [2, 250, 8, 33, 91, 4, 160, 19, 77, 6, 144, 9]], np.int32)


def _config(dtype: str) -> LlamaConfig:
    return tiny_config(head_dim=16, dtype=dtype, param_dtype=dtype)


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def base(request, tmp_path_factory):
    """``(dtype, model, params, hf_dir)``: a random tiny LLaMA and its HF export."""
    model = init_model(_config(request.param), seed=0)
    d = tmp_path_factory.mktemp(f"base_{request.param}")
    save_pretrained(model, d)
    return request.param, model, split(model)[1], d


def _torch_dtype(dtype):
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]


def _hf(d, dtype):
    return transformers.LlamaForCausalLM.from_pretrained(d, dtype=_torch_dtype(dtype)).eval()


def _torch_logits(m) -> np.ndarray:
    with torch.no_grad():
        return m(input_ids=torch.tensor(IDS, dtype=torch.long)).logits.float().numpy()


def _ours(model, params, linear_fn=None) -> np.ndarray:
    return np.asarray(apply(split(model)[0], params, jnp.asarray(IDS), linear_fn=linear_fn), np.float32)


def _peft_logits(hf_dir, adapter_dir, dtype) -> np.ndarray:
    m = peft.PeftModel.from_pretrained(_hf(hf_dir, dtype), str(adapter_dir)).eval()
    return _torch_logits(m)


# Tolerances (max |logit difference|; the tiny model's logits are O(1), the fine-tuning
# moves them by ~0.6, asserted > 10x the tolerance). float32: two implementations of the
# same float32 network agree to ~3e-7 here (measured); 1e-4 leaves room for summation
# order on other machines. bfloat16: every matmul output and activation is rounded to 8
# mantissa bits on both sides, in different orders; the base model's own JAX-vs-torch gap
# (measured in the test, ~0.004) sets the scale, and the adapter adds its own rounding
# (PEFT runs LoRA's x A^T B^T unmerged in bf16, and rounds W + delta itself): 3x the gap
# plus 0.005 (measured: 0.005 for both methods). Between two torch models with equal
# float32 weights (PEFT vs our merged export) the bound is 1e-5.
def _tolerance(dtype, base_gap=0.0):
    return 1e-4 if dtype == "float32" else 3 * base_gap + 0.005


def _sylva_run(params):
    """An adapter over attention and MLP weights (a third of the tiles, seed 0) and
    parameters with its tiles moved by N(0, 0.05) (the init std is 0.02)."""
    flat = tree.flatten(params)
    rng = np.random.default_rng(0)
    masks = {}
    for p, w in flat.items():
        if p.endswith("proj.weight"):
            out_dim, in_dim = w.shape
            masks[p] = rng.random((out_dim // BS, in_dim // BS)) < 0.3
    masks["model.layers.1.mlp.down_proj.weight"][:] = False  # one module without tiles
    adapter = make_adapter(params, masks, block_size=BS)
    key = jax.random.PRNGKey(1)
    updates = {p: 0.05 * jax.random.normal(jax.random.fold_in(key, i), (r.shape[0], BS, BS))
               for i, (p, (r, _)) in enumerate(adapter.coords.items())}
    return adapter, adapter.apply_updates(params, updates)


def _lora_run(params, dtype, scope="self_attn"):
    """LoRA rank 4, alpha 8 on ``scope`` with both factors random (B ~ N(0, 0.1); B = 0 would be a no-op)."""
    lora = init_lora(params, scope=scope, rank=4, alpha=8.0, rng=2)
    key = jax.random.PRNGKey(3)
    factors = {p: {"a": f["a"], "b": (0.1 * jax.random.normal(jax.random.fold_in(key, i), f["b"].shape)).astype(dtype)}
               for i, (p, f) in enumerate(lora.factors.items())}
    return LoraParams(factors=factors, rank=lora.rank, alpha=lora.alpha)


def _gap(base):
    """Max |logit| gap between our JAX model and transformers' on the *base* model."""
    dtype, model, params, d = base
    return float(np.abs(_ours(model, params) - _torch_logits(_hf(d, dtype))).max())


def test_sylva_tiles_as_peft_shira_adapter(base, tmp_path):
    dtype, model, params, hf_dir = base
    adapter, tuned = _sylva_run(params)
    out = export_peft(tmp_path / "peft_adapter", "sylva", tuned, adapter=adapter, base_params=params,
                      base_name_or_path=str(hf_dir))
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "SHIRA" and cfg["r"] == shira_rank(adapter) and cfg["mask_type"] != "random"
    assert sorted(cfg["target_modules"]) == sorted(p[: -len(".weight")] for p in adapter.coords)
    from safetensors import safe_open

    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        for p in adapter.coords:
            out_dim, in_dim = adapter.out_in_shape(p)
            n = cfg["r"] * (in_dim + out_dim)
            key = f"base_model.model.{p[:-len('.weight')]}"
            assert f.get_tensor(f"{key}.shira_weight").shape == (n,)
            assert f.get_tensor(f"{key}.shira_weight").dtype == torch.float32
            assert f.get_tensor(f"{key}.shira_indices").shape == (2, n)

    ours = _ours(model, tuned)
    got = _peft_logits(hf_dir, out, dtype)
    tol = _tolerance(dtype, _gap(base))
    assert np.abs(ours - _ours(model, params)).max() > 10 * tol  # the tiles matter
    assert np.abs(got - ours).max() < tol, np.abs(got - ours).max()
    merged_dir = export_merged(tmp_path / "merged", "sylva", model, tuned)
    merged = _torch_logits(_hf(merged_dir, dtype))
    assert np.abs(got - merged).max() < (1e-5 if dtype == "float32" else tol)

    # the way back: the SHiRA deltas merged into our base give the fine-tuned weights
    # (f32: W_base + (W_tuned - W_base) rounds to W_tuned within an ulp; bf16: exactly,
    # as the difference of two bf16 values is exact in float32)
    back = tree.flatten(load_peft_shira(out, params))
    for p, w in tree.flatten(tuned).items():
        np.testing.assert_allclose(np.asarray(back[p], np.float32), np.asarray(w, np.float32),
                                   rtol=0, atol=1e-7 if dtype == "float32" else 0)


def test_lora_as_peft_lora_adapter(base, tmp_path):
    dtype, model, params, hf_dir = base
    lora = _lora_run(params, dtype)
    out = export_peft(tmp_path / "peft_adapter", "lora", params, lora=lora, base_name_or_path=str(hf_dir))
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8.0
    assert cfg["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]  # every layer: leaf names
    from safetensors import safe_open

    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        a = f.get_tensor("base_model.model.model.layers.1.self_attn.k_proj.lora_A.weight")
        b = f.get_tensor("base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight")
    assert tuple(a.shape) == (4, 64) and tuple(b.shape) == (32, 4) and a.dtype == _torch_dtype(dtype)

    ours = _ours(model, params, lora_linear_fn(lora))
    got = _peft_logits(hf_dir, out, dtype)
    tol = _tolerance(dtype, _gap(base))
    assert np.abs(ours - _ours(model, params)).max() > 10 * tol
    assert np.abs(got - ours).max() < tol, np.abs(got - ours).max()
    merged_dir = export_merged(tmp_path / "merged", "lora", model, params, lora)
    merged = _torch_logits(_hf(merged_dir, dtype))
    assert np.abs(got - merged).max() < (1e-5 if dtype == "float32" else tol)

    back = load_peft_lora(out, params)
    assert back.rank == lora.rank and back.alpha == lora.alpha and list(back.factors) == list(lora.factors)
    for p, f in lora.factors.items():
        for k in ("a", "b"):
            assert back.factors[p][k].dtype == f[k].dtype
            np.testing.assert_array_equal(np.asarray(back.factors[p][k], np.float32), np.asarray(f[k], np.float32))


def test_peft_made_lora_adapter_loads_onto_our_model(tmp_path):
    """The reverse direction against an independent writer: peft's own get_peft_model /
    save_pretrained on transformers' model, loaded with load_peft_lora, gives PEFT's
    logits; the result has the structure of our init_lora (a lora run's extras), so it
    can continue training."""
    model = init_model(_config("float32"), seed=0)
    params = split(model)[1]
    save_pretrained(model, tmp_path / "base")
    hf = _hf(tmp_path / "base", "float32")
    cfg = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                          init_lora_weights=False, use_rslora=True)  # random A and B; scale alpha/sqrt(r)
    torch.manual_seed(0)
    pm = peft.get_peft_model(hf, cfg).eval()
    want = _torch_logits(pm)
    pm.save_pretrained(str(tmp_path / "theirs"))

    lora = load_peft_lora(tmp_path / "theirs", params)  # no fingerprint: names and shapes checked
    got = _ours(model, params, lora_linear_fn(lora))
    assert np.abs(want - _ours(model, params)).max() > 0.01
    assert np.abs(got - want).max() < 1e-4, np.abs(got - want).max()
    fresh = init_lora(params, scope="re:(q_proj|v_proj|down_proj)", rank=4)
    assert jax.tree_util.tree_structure(lora) == jax.tree_util.tree_structure(
        LoraParams(factors=fresh.factors, rank=4, alpha=lora.alpha))


def test_shira_budget_that_does_not_fit_is_a_clear_error(tmp_path):
    model = init_model(_config("float32"), seed=0)
    params = split(model)[1]
    masks = {"model.layers.0.self_attn.q_proj.weight": np.ones((4, 4), bool),  # 4096 entries: r = 32
             "model.layers.0.self_attn.k_proj.weight": np.eye(2, 4, dtype=bool)}  # [32, 64]: 32 * 96 > 2048
    adapter = make_adapter(params, masks, block_size=BS)
    with pytest.raises(ShiraBudgetError, match=r"k_proj.*export_merged"):
        save_peft_shira(tmp_path / "a", adapter, params, params)
    assert not (tmp_path / "a").exists()
    # a finished run keeps its merged checkpoint and says why there is no adapter
    said = []
    paths = export_run(tmp_path / "run", "sylva", model, params, adapter=adapter, base_params=params, log=said.append)
    assert paths["peft_adapter"] is None and (paths["merged"] / "model.safetensors").is_file()
    assert any("no PEFT adapter" in m and "k_proj" in m for m in said)
    with pytest.raises(ShiraBudgetError):
        export_run(tmp_path / "run2", "sylva", model, params, adapter=adapter, base_params=params, merged=False)
    # without the dense weight, q_proj's full tile set fits (r * 128 = 4096 = 64 * 64)
    ok = make_adapter(params, {k: v for k, v in masks.items() if "q_proj" in k}, block_size=BS)
    assert shira_rank(ok) == 32


def test_adapter_of_another_base_model_is_refused(tmp_path):
    model = init_model(_config("float32"), seed=0)
    params = split(model)[1]
    other = split(init_model(_config("float32"), seed=1))[1]
    lora = _lora_run(params, "float32")
    save_peft_lora(tmp_path / "lora", lora, params)
    with pytest.raises(ValueError, match="different base model"):
        load_peft_lora(tmp_path / "lora", other)
    assert load_peft_lora(tmp_path / "lora", other, check_base=False).rank == 4
    adapter, tuned = _sylva_run(params)
    save_peft_shira(tmp_path / "shira", adapter, tuned, params)
    with pytest.raises(ValueError, match="different base model"):
        load_peft_shira(tmp_path / "shira", other)
    with pytest.raises(ValueError, match="different base model"):  # the tuned model is not the base either
        load_peft_shira(tmp_path / "shira", tuned)


def _contents(file):
    """``(metadata, {key: (dtype, shape, bytes)})`` of a safetensors file: what it holds,
    whatever the order of its header (metadata is a hash map in safetensors)."""
    from safetensors import safe_open

    with safe_open(str(file), "np") as f:
        return f.metadata(), {k: (str(f.get_tensor(k).dtype), f.get_tensor(k).shape, f.get_tensor(k).tobytes())
                              for k in f.keys()}


def test_what_the_experiment_keeps_is_enough(tmp_path):
    """After training the experiment holds the tuned parameters, the graphdef and (taken
    before training) the base tiles: they write the same files as the full base model."""
    model = init_model(_config("float32"), seed=0)
    graphdef, params = split(model)
    adapter, tuned = _sylva_run(params)
    a = export_peft(tmp_path / "a", "sylva", tuned, adapter=adapter, base_params=params)
    b = export_peft(tmp_path / "b", "sylva", tuned, adapter=adapter, base_tiles=adapter.tiles(params))
    assert (a / "adapter_config.json").read_text() == (b / "adapter_config.json").read_text()
    assert _contents(a / "adapter_model.safetensors") == _contents(b / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="base_tiles"):
        export_peft(tmp_path / "c", "sylva", tuned, adapter=adapter)
    m1 = export_merged(tmp_path / "m1", "sylva", model, tuned)
    m2 = export_merged(tmp_path / "m2", "sylva", graphdef, tuned)
    assert _contents(m1 / "model.safetensors") == _contents(m2 / "model.safetensors")


def test_export_run_writes_both_directories_per_method(tmp_path):
    model = init_model(_config("float32"), seed=0)
    graphdef, params = split(model)
    lora = _lora_run(params, "float32")
    paths = export_run(tmp_path / "lora", "lora", graphdef, params, extras=lora, lora_dropout=0.05, log=lambda m: None)
    assert json.loads((paths["peft_adapter"] / "adapter_config.json").read_text())["lora_dropout"] == 0.05
    assert (paths["merged"] / "config.json").is_file()
    paths = export_run(tmp_path / "full", "full", graphdef, params, log=lambda m: None)
    assert paths["peft_adapter"] is None and (paths["merged"] / "model.safetensors").is_file()
    paths = export_run(tmp_path / "peft_only", "lora", graphdef, params, extras=lora, merged=False, log=lambda m: None)
    assert paths["merged"] is None and sorted(p.name for p in (tmp_path / "peft_only").iterdir()) == ["peft_adapter"]


def test_target_modules_leaf_names_only_when_every_layer_is_covered():
    params = split(init_model(_config("float32"), seed=0))[1]
    every = init_lora(params, scope="self_attn", rank=2).factors
    assert lora_target_modules(params, every) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    one_layer = init_lora(params, scope="layers.0.self_attn.q_proj", rank=2).factors
    assert lora_target_modules(params, one_layer) == ["model.layers.0.self_attn.q_proj"]


def test_full_method_has_a_merged_export_only(tmp_path):
    model = init_model(_config("float32"), seed=0)
    params = split(model)[1]
    tuned = jax.tree.map(lambda w: w * 1.01, params)
    with pytest.raises(ValueError, match="export_merged"):
        export_peft(tmp_path / "a", "full", tuned)
    d = export_merged(tmp_path / "merged", "full", model, tuned)
    from sylva_jax.models.loading import load_pretrained

    loaded = tree.flatten(split(load_pretrained(str(d))[0])[1])
    for p, w in tree.flatten(tuned).items():
        np.testing.assert_array_equal(np.asarray(loaded[p]), np.asarray(w))
    with pytest.raises(ValueError, match="no merge for method"):
        merged_params("sparse", params)


def test_export_directories_are_atomic(tmp_path, monkeypatch):
    model = init_model(_config("float32"), seed=0)
    params = split(model)[1]
    lora = _lora_run(params, "float32")
    out = save_peft_lora(tmp_path / "peft_adapter", lora, params)
    before = (out / "adapter_model.safetensors").read_bytes()

    # a failure while writing leaves the previous export intact and no temporary directory
    import sylva_jax.interop._files as files

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(files, "write_adapter", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        save_peft_lora(out, lora, params)
    assert (out / "adapter_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["peft_adapter"]
    monkeypatch.undo()

    # a completed export replaces the old one; a folder that is no export is never replaced
    lora2 = LoraParams(factors=jax.tree.map(lambda x: 2 * x, lora.factors), rank=4, alpha=8.0)
    save_peft_lora(out, lora2, params)
    assert (out / "adapter_model.safetensors").read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["peft_adapter"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not an export"):
        save_peft_lora(tmp_path / "mine", lora, params)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_smollm2_sylva_adapter_loads_in_peft(smollm2, tmp_path):
    """The real model at the default run's shape: 5% of the attention tiles (block 64)
    moved by N(0, 0.02), exported as SHiRA, applied by PEFT to transformers' SmolLM2 (our
    HF export of the same weights; transformers' own GGUF reader gives the same base to
    8e-5, but takes ~50 s to dequantise)."""
    model, _ = smollm2
    params = split(model)[1]
    rng = np.random.default_rng(0)
    masks = {p: rng.random((w.shape[0] // 64, w.shape[1] // 64)) < 0.05
             for p, w in tree.flatten(params).items() if "self_attn" in p}
    adapter = make_adapter(params, masks, block_size=64)
    key = jax.random.PRNGKey(0)
    tuned = adapter.apply_updates(params, {p: 0.02 * jax.random.normal(jax.random.fold_in(key, i), (r.shape[0], 64, 64))
                                           for i, (p, (r, _)) in enumerate(adapter.coords.items())})
    out = export_peft(tmp_path / "peft_adapter", "sylva", tuned, adapter=adapter, base_params=params)
    base = _hf(save_pretrained(model, tmp_path / "base"), "float32")
    got = _torch_logits(peft.PeftModel.from_pretrained(base, str(out)).eval())
    ours = _ours(model, tuned)
    # float32 through 30 layers on logits of magnitude ~30: the base models agree to
    # ~1e-4 (test_loading); 2e-3 bounds it, against a fine-tuning effect > 0.5
    assert np.abs(ours - _ours(model, params)).max() > 0.5
    assert np.abs(got - ours).max() < 2e-3, np.abs(got - ours).max()


def test_a_registered_recipe_is_exported_without_touching_export(tmp_path, monkeypatch):
    """export_peft / export_run dispatch on sylva_jax.recipes.RECIPES only: a new method's
    recipe (and merge) is all it takes; a method without a PEFT writer says what instead."""
    model = init_model(_config("float32"), seed=0)
    graphdef, params = split(model)
    tuned = jax.tree.map(lambda w: w * 1.5, params)
    written = []

    def writer(out_dir, p, **kw):
        written.append((out_dir, kw["base_name_or_path"]))
        out_dir.mkdir(parents=True)
        return out_dir

    monkeypatch.setitem(recipes.RECIPES, "mine", recipes.Recipe(
        name="mine", needs_masks=False, adapter=None, train_kwargs=lambda cfg, adapter: {}, peft=writer))
    monkeypatch.setitem(merged_lib.MERGES, "mine", lambda p, extras: p)
    paths = export_run(tmp_path / "run", "mine", graphdef, tuned, base_name_or_path="base", log=lambda m: None)
    assert paths["peft_adapter"] == tmp_path / "run" / "peft_adapter" and paths["peft_adapter"].is_dir()
    assert written == [(paths["peft_adapter"], "base")]
    assert (paths["merged"] / "model.safetensors").is_file()
    monkeypatch.setitem(recipes.RECIPES, "mine", recipes.RECIPES["mine"]._replace(peft=None, no_peft="use X"))
    with pytest.raises(ValueError, match="^use X$"):
        export_peft(tmp_path / "a", "mine", tuned)
    paths = export_run(tmp_path / "run2", "mine", graphdef, tuned, log=lambda m: None)
    assert paths["peft_adapter"] is None and paths["merged"].is_dir()
    with pytest.raises(ValueError, match=r"unknown method 'nope'; export_peft knows 'sylva' and 'lora'"):
        export_peft(tmp_path / "b", "nope", tuned)
