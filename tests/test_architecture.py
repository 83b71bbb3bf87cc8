"""The package's shape, enforced: subpackages, no private names across modules, no import cycle, size
limits, and the old flat module paths still importable (with a warning naming the new one)."""

import ast
import importlib
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import refdir

SRC = Path(refdir.__file__).resolve().parent
SUBPACKAGES = {"core", "method", "evaluation", "analyses", "outputs", "run", "cli"}
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, ast.Module]:
    return {str(p.relative_to(SRC)): ast.parse(p.read_text()) for p in sorted(SRC.rglob("*.py"))}


def _module_name(rel: str) -> str:
    parts = rel.removesuffix(".py").split("/")
    return ".".join(["refdir", *(parts[:-1] if parts[-1] == "__init__" else parts)])


def _imports(tree: ast.Module, top_level_only: bool):
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("refdir"):
            yield node


def test_every_module_lives_in_a_subpackage():
    loose = {p.name for p in SRC.glob("*.py")} - {"__init__.py"}
    assert loose == set()
    assert {p.name for p in SRC.iterdir() if (p / "__init__.py").is_file()} == SUBPACKAGES


def test_no_private_name_is_imported_across_modules():
    bad = [
        f"{rel}: {node.module}.{a.name}"
        for rel, tree in _modules().items()
        for node in _imports(tree, top_level_only=False)
        for a in node.names
        if a.name.startswith("_") and not a.name.startswith("__")
    ]
    assert bad == []


def test_no_import_cycle_at_module_level():
    """Module-level imports between refdir's modules form a DAG (imports inside functions are lazy on
    purpose: torch-free paths for ``--help``)."""
    mods = _modules()
    known = {_module_name(rel) for rel in mods}
    graph: dict[str, set[str]] = {}
    for rel, tree in mods.items():
        deps = set()
        for node in _imports(tree, top_level_only=True):
            deps.add(node.module)
            deps.update(f"{node.module}.{a.name}" for a in node.names)
        graph[_module_name(rel)] = {d for d in deps if d in known and d != _module_name(rel)}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in graph[m]:
            assert state.get(d) != 1, "import cycle: " + " -> ".join([*path, m, d])
            if d not in state:
                visit(d, [*path, m])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])


def test_no_module_over_500_lines_and_no_function_over_80():
    long_modules, long_functions = set(), set()
    for rel, tree in _modules().items():
        if len((SRC / rel).read_text().splitlines()) > MAX_MODULE_LINES:
            long_modules.add(rel)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES:
                    long_functions.add(node.name)
    assert long_modules == set()
    assert long_functions == set()


@pytest.mark.parametrize("old", sorted(refdir.MOVED))
def test_old_flat_paths_import_the_same_module_with_a_warning(old):
    new = importlib.import_module(f"refdir.{refdir.MOVED[old]}")
    sys.modules.pop(f"refdir.{old}", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mod = importlib.import_module(f"refdir.{old}")
    assert mod is new and mod.__spec__.name == new.__name__
    assert any(f"refdir.{refdir.MOVED[old]}" in str(w.message) for w in caught)


def test_the_old_evaluation_module_names_resolve():
    from refdir.evaluation import conditions

    with pytest.warns(DeprecationWarning, match="refdir.evaluation.conditions"):
        from refdir.evaluation import kl_and_ce
    assert kl_and_ce is conditions.kl_and_ce


def test_public_names_resolve_and_help_stays_torch_free():
    for name in refdir.__all__:
        assert getattr(refdir, name) is not None
    code = (
        "import sys\nfrom refdir.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n"
        "    pass\nprint('torch' in sys.modules, 'transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "False False"
