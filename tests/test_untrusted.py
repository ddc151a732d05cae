"""Nothing the library reads is unpickled, and the library never imports torch.

Checked on the source (AST), so a new ``import pickle`` or ``np.load(..., allow_pickle=True)``
anywhere in ``sylva_jax/`` fails here.
"""
from __future__ import annotations

import ast
from pathlib import Path

import sylva_jax

PACKAGE = Path(sylva_jax.__file__).parent
FORBIDDEN_MODULES = {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal",
                     "torch"}


def _violations(tree: ast.AST) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        else:
            names = []
        found += [f"line {node.lineno}: imports {n}" for n in names
                  if n.split(".")[0] in FORBIDDEN_MODULES]
        if isinstance(node, ast.Call):
            for kw in node.keywords:
                if (kw.arg == "allow_pickle" and isinstance(kw.value, ast.Constant)
                        and kw.value.value is not False):
                    found.append(f"line {node.lineno}: allow_pickle={kw.value.value!r}")
            func = node.func
            if (isinstance(func, ast.Attribute) and func.attr in ("load", "loads")
                    and isinstance(func.value, ast.Name)
                    and func.value.id in FORBIDDEN_MODULES):
                found.append(f"line {node.lineno}: {func.value.id}.{func.attr}")
    return found


def test_checker_catches_each_form():
    src = "import pickle\nfrom torch import nn\nimport numpy as np\nnp.load('x', allow_pickle=True)\n"
    assert len(_violations(ast.parse(src))) == 3
    assert _violations(ast.parse("np.load('x')\nnp.load('x', allow_pickle=False)\n")) == []


def test_package_never_unpickles_nor_imports_torch():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 10
    bad = {str(f.relative_to(PACKAGE)): v for f in files
           if (v := _violations(ast.parse(f.read_text(), str(f))))}
    assert bad == {}, f"unsafe loading or torch in the library: {bad}"
