"""Package hygiene: every public name resolves, and importing the library never pulls in
torch (only tests use it as a reference) or jax_triton (GPU-only, imported lazily)."""
from __future__ import annotations

import os
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_public_names_resolve_and_no_torch_or_triton_import():
    code = (
        "import sys, pkgutil, importlib, sylva_jax\n"
        "assert 'jax' not in sys.modules, 'import sylva_jax must stay cheap (lazy exports)'\n"
        "for n in sylva_jax.__all__:\n"
        "    getattr(sylva_jax, n)\n"
        "for m in pkgutil.walk_packages(sylva_jax.__path__, 'sylva_jax.'):\n"
        "    importlib.import_module(m.name)\n"
        "bad = [m for m in ('torch', 'jax_triton', 'triton') if m in sys.modules]\n"
        "assert not bad, bad\n"
        "print('ok', len(sylva_jax.__all__))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT,
                       env=dict(os.environ, PYTHONPATH=REPO_ROOT), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("ok")


def test_top_level_files_exist():
    for name in ("sylva_jax", "experiments", "tests", "pyproject.toml", "NOTICE", "LICENSE", "README.md",
                 ".ci/run"):
        assert os.path.exists(os.path.join(REPO_ROOT, name)), name
    with open(os.path.join(REPO_ROOT, "LICENSE")) as f:
        text = f.read()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
    with open(os.path.join(REPO_ROOT, "NOTICE")) as f:
        notice = f.read()
    assert "10.1145/3650200.3656619" in notice and "SmolLM2" in notice and "MMLU" in notice


def test_capture_is_a_plain_module_and_the_any_model_route_has_its_own_name():
    import types

    import sylva_jax
    import sylva_jax.anymodel as anymodel
    from sylva_jax.capture import preprocess  # the module keeps its names

    assert type(sylva_jax.capture) is types.ModuleType and not callable(sylva_jax.capture)
    assert sylva_jax.capture.preprocess is preprocess
    assert sylva_jax.capture_stats is anymodel.capture_stats
    assert sylva_jax.export.export_peft is sylva_jax.export_peft
