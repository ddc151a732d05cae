"""sylva_jax.atomic: a failed write leaves the old file and no temporary file behind."""
import json

import numpy as np
import pytest

from sylva_jax import atomic


def test_write_replaces_and_failure_keeps_the_old_file(tmp_path):
    p = tmp_path / "sub" / "r.json"
    atomic.write_json(p, {"b": 1, "a": [1, 2]})
    assert json.loads(p.read_text()) == {"a": [1, 2], "b": 1}
    with pytest.raises(RuntimeError, match="boom"):
        with atomic.atomic_open(p) as f:
            f.write('{"half": ')
            raise RuntimeError("boom")
    assert json.loads(p.read_text()) == {"a": [1, 2], "b": 1}
    with pytest.raises(TypeError):  # not JSON-serialisable: raised mid-dump
        atomic.write_json(p, {"x": object()})
    assert json.loads(p.read_text()) == {"a": [1, 2], "b": 1}
    assert sorted(x.name for x in p.parent.iterdir()) == ["r.json"]  # no temp files left

    q = tmp_path / "w.npz"
    with atomic.atomic_open(q, "wb") as f:
        np.savez(f, w=np.arange(3))
    with np.load(q) as z:
        np.testing.assert_array_equal(z["w"], np.arange(3))
    atomic.write_text(tmp_path / "t.txt", "line\n")
    assert (tmp_path / "t.txt").read_text() == "line\n"
    with pytest.raises(ValueError, match="mode"):
        with atomic.atomic_open(q, "a"):
            pass


def test_atomic_dir_replaces_whole_or_not_at_all(tmp_path):
    import pytest

    from sylva_jax.atomic import atomic_dir

    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("one")
    assert (target / "a.txt").read_text() == "one"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "a.txt").write_text("two")
            raise RuntimeError("crash while writing")
    assert (target / "a.txt").read_text() == "one"            # the old directory is intact
    with atomic_dir(target) as tmp:
        (tmp / "b.txt").write_text("three")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]   # no temporary left behind
