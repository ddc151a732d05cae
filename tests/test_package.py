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


# --- the import graph (issue 20: no import cycle inside sylva_jax/) ---------------------

# function-local imports of sylva_jax modules that are deliberate: loading the heavy half
# only when used (the experiment's --help, the models package without transformers)
_LAZY_INTERNAL = {
    ("sylva_jax.experiment", "sylva_jax.experiment_run"),
    ("sylva_jax.experiment", "sylva_jax.checkpoint"),
    ("sylva_jax.models", "sylva_jax.models.loading"),
}


def _modules() -> dict[str, str]:
    """``{dotted module name: file}`` of every module in sylva_jax/."""
    import pathlib

    root = pathlib.Path(REPO_ROOT) / "sylva_jax"
    out = {}
    for f in root.rglob("*.py"):
        name = ".".join(f.relative_to(REPO_ROOT).with_suffix("").parts).removesuffix(".__init__")
        out[name] = str(f)
    return out


def _is_type_checking(node) -> bool:
    import ast

    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imported(node, module: str, is_package: bool, modules) -> set[str]:
    """sylva_jax modules named by one import statement (``from pkg import sub`` names ``sub``)."""
    import ast

    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name in modules}
    base = node.module or ""
    if node.level:
        parts = module.split(".")[: len(module.split(".")) - node.level + int(is_package)]
        base = ".".join(parts + ([base] if base else []))
    subs = {f"{base}.{a.name}" for a in node.names} & set(modules)
    names_a_value = len(subs) < len(node.names)  # not only submodules: the package itself
    return subs | ({base} if base in modules and names_a_value else set())


def _imports(path: str, module: str, modules) -> tuple[set[str], set[str]]:
    """``(module-level, function-local)`` sylva_jax imports of one file (``TYPE_CHECKING``
    blocks skipped: they never run)."""
    import ast

    top, local = set(), set()
    is_package = path.endswith("__init__.py")

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            if _is_type_checking(child):
                continue
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                (local if inner else top).update(_imported(child, module, is_package, modules))
            visit(child, inner)

    visit(ast.parse(open(path).read()), False)
    return top, local


def _with_packages(target: str, importer: str) -> set[str]:
    """Importing ``target`` first runs each enclosing package's ``__init__`` (those enclosing
    the importer itself are already running, so they add no edge)."""
    parts = target.split(".")
    chain = {".".join(parts[:i]) for i in range(2, len(parts) + 1)}
    return {m for m in chain if m != importer and not importer.startswith(m + ".")}


def import_graph() -> dict[str, set[str]]:
    """``{module: modules its module-level imports run}`` over sylva_jax/."""
    modules = _modules()
    graph = {}
    for mod, path in modules.items():
        top, _ = _imports(path, mod, modules)
        graph[mod] = set().union(*(_with_packages(t, mod) for t in top)) if top else set()
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or ``None`` (depth-first search)."""
    state, stack = {}, []

    def dfs(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := dfs(nxt)):
                return found
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := dfs(node)):
            return found
    return None


def test_the_module_import_graph_of_sylva_jax_is_acyclic():
    graph = import_graph()
    assert len(graph) >= 40 and "sylva_jax.interop.merged" in graph
    assert graph["sylva_jax.interop.merged"] >= {"sylva_jax.lora", "sylva_jax.models.loading",
                                                 "sylva_jax.models"}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_check_catches_an_introduced_cycle():
    graph = import_graph()
    graph["sylva_jax.tree"] = graph["sylva_jax.tree"] | {"sylva_jax.interop.merged"}  # merged -> ... -> tree
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1] and "sylva_jax.tree" in cycle
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_function_local_imports_of_sylva_jax_modules_are_the_deliberate_lazy_ones():
    modules = _modules()
    local = {(mod, t) for mod, path in modules.items() for t in _imports(path, mod, modules)[1]}
    # ops.py and train.py are being reworked separately (issue 20); everything else is listed
    hidden = {(m, t) for m, t in local if m not in ("sylva_jax.ops", "sylva_jax.train")} - _LAZY_INTERNAL
    assert not hidden, f"move these imports to module level (or justify them as lazy): {sorted(hidden)}"


def test_the_light_names_are_the_registries_names():
    """sylva_jax.names (jax-free, for command lines) cannot drift from the registries."""
    from sylva_jax import importance, methods, names, recipes
    from sylva_jax.interop.merged import MERGES

    assert names.MASK_SCORERS == tuple(importance.METHODS)
    assert set(names.TRAIN_METHODS) == set(MERGES)
    assert all(callable(getattr(methods, m)) for m in names.TRAIN_METHODS)
    assert tuple(recipes.RECIPES) == names.TRAIN_METHODS
    assert all(r.name == name for name, r in recipes.RECIPES.items())
    # a method without a PEFT writer says what to write instead
    assert all(r.peft is not None or "export_merged" in r.no_peft for r in recipes.RECIPES.values())
