"""The internal import graph of ``src/bora`` (module-level and function-level imports) has no cycle."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "src" / "bora"
MODULES = {p.stem for p in PKG.glob("*.py")} - {"__init__"}


def internal_imports(path: Path) -> set[str]:
    """Modules of ``bora`` that ``path`` imports anywhere (top level, in functions, under TYPE_CHECKING)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                out.add(node.module.split(".")[0])
            elif node.level == 1 or node.module == "bora":
                out.update(a.name for a in node.names)
            elif node.level == 0 and node.module and node.module.startswith("bora."):
                out.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[1] for a in node.names if a.name.startswith("bora."))
    return (out & MODULES) - {path.stem}


def import_graph() -> dict[str, set[str]]:
    return {p.stem: internal_imports(p) for p in PKG.glob("*.py") if p.stem != "__init__"}


def find_cycle(graph: dict[str, set[str]]):
    """One cycle of ``graph`` as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m):
        state[m] = 1
        path.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                return path[path.index(d):] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_finder_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_parser_sees_function_level_imports(tmp_path):
    p = tmp_path / "api.py"
    p.write_text("from .io import x\n\ndef f():\n    from .report import y\n    from bora.plots import z\n")
    assert internal_imports(p) == {"io", "report", "plots"}


def test_no_import_cycle():
    graph = import_graph()
    assert "api" in graph and graph["api"], "the graph is empty: wrong package path?"
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_lower_layers_do_not_import_the_api():
    graph = import_graph()
    for low in ("io", "fitfolder", "diagnostics", "pooling", "model", "posterior", "coupling"):
        if low in graph:
            assert "api" not in graph[low], f"bora.{low} imports bora.api"


def test_importing_bora_changes_no_pyro_setting():
    import subprocess
    import sys

    code = ("import pyro; before = pyro.settings.get('module_local_params'); "
            "import bora, bora.api, bora.cli, bora.report, bora.guides, bora.infer; "
            "assert pyro.settings.get('module_local_params') == before is False, 'changed'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


def test_readme_layout_table_lists_every_module():
    import re

    readme = (PKG.parents[1] / "README.md").read_text(encoding="utf-8")
    table = readme[readme.index("| module | concept |"):]
    table = table[:table.index("\n\n")]
    listed = set(re.findall(r"`bora\.(\w+)`", table))
    assert listed == MODULES, (sorted(MODULES - listed), sorted(listed - MODULES))
