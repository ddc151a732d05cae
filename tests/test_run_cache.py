"""sylva_jax.run_cache: stored runs come back with their structure, record and snapshots."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from sylva_jax.lora import LoraParams
from sylva_jax.run_cache import RunCache


def _tree(x):
    return LoraParams(factors={"l0": {"a": np.full((2, 3), x, np.float32), "b": np.arange(4.0).reshape(2, 2) * x}},
                      rank=2, alpha=4.0)


def test_save_load_update_drop(tmp_path):
    cache = RunCache(tmp_path / "runs")
    assert cache.record("k__lr0.1__seed0") is None and cache.drop("k") == 0  # nothing stored yet
    treedef = jax.tree.structure(_tree(0.0))
    cache.save("k__lr0.1__seed0", {"val_loss": np.float32(1.5), "lr": 0.1}, _tree(1.0),
               snapshots=[(2, _tree(0.5)), (np.int64(4), _tree(0.75))])
    cache.save("k__lr0.3__seed0", {"lr": 0.3}, _tree(2.0))
    cache.save("other__lr0.1__seed0", {"lr": 0.1}, _tree(3.0))
    rec, tr, snaps = cache.load("k__lr0.1__seed0", treedef)
    assert rec == {"val_loss": 1.5, "lr": 0.1}
    assert jax.tree.structure(tr) == treedef and tr.rank == 2 and tr.alpha == 4.0
    jax.tree.map(np.testing.assert_array_equal, tr, _tree(1.0))
    assert [s for s, _ in snaps] == [2, 4]
    jax.tree.map(np.testing.assert_array_equal, snaps[1][1], _tree(0.75))
    assert cache.load("k__lr0.1__seed0", treedef, snapshots=False)[2] == []

    cache.update_record("k__lr0.1__seed0", {**rec, "heldout_loss": 1.25}, [2, 4])
    assert cache.record("k__lr0.1__seed0") == ({"val_loss": 1.5, "lr": 0.1, "heldout_loss": 1.25}, [2, 4])
    # a process stopped after the arrays but before the record left no stored run
    np.savez(tmp_path / "runs" / "half__lr0.1__seed0.npz", t0=np.zeros(2))
    assert cache.record("half__lr0.1__seed0") is None and cache.load("half__lr0.1__seed0", treedef) is None

    assert cache.drop("k__lr") == 4 and cache.drop("half") == 1
    assert cache.record("k__lr0.3__seed0") is None and cache.record("other__lr0.1__seed0") is not None
    with pytest.raises(ValueError, match="different method"):
        cache.load("other__lr0.1__seed0", jax.tree.structure({"a": 0}))
    with pytest.raises(ValueError, match="without '/'"):
        cache.save("a/b", {}, {})
