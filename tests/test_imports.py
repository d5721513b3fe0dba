"""The internal import graph of ``src/bora``: no cycle between modules, and subpackages import only downward.

Every import counts: module level, inside functions and under ``TYPE_CHECKING``. A module may import its
own subpackage's modules and any lower layer's; ``LAYERS`` is the declared order (ARCHITECTURE.md).
"""

import ast
import re
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "src" / "bora"
# bottom to top; ARCHITECTURE.md draws the same order
LAYERS = ("core", "lora", "data", "model", "evaluation", "fit", "posterior", "io", "diagnostics", "api", "cli",
          "__main__", "__init__")


def module_name(path: Path, pkg: Path = PKG) -> str:
    """``fit.loop`` for ``src/bora/fit/loop.py``; a subpackage's ``__init__`` is the subpackage itself."""
    parts = list(path.relative_to(pkg).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p) for p in PKG.rglob("*.py")}


def resolve(importer: str, is_package: bool, level: int, module) -> str:
    """The absolute dotted name (below ``bora``) of a ``from <level dots><module> import`` in ``importer``."""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    if level > 1:
        base = base[:len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def internal_imports(path: Path, pkg_root: Path = PKG, modules: frozenset = frozenset(MODULES)) -> set[str]:
    """Modules of ``bora`` (dotted, below ``bora``) that ``path`` imports anywhere."""
    me = module_name(path, pkg_root)
    pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                target = resolve(me, pkg, node.level, node.module)
            elif node.module and (node.module == "bora" or node.module.startswith("bora.")):
                target = node.module[len("bora."):] if node.module != "bora" else ""
            else:
                continue
            for a in node.names:  # "from . import x" imports the module x when there is one
                sub = f"{target}.{a.name}" if target else a.name
                out.add(sub if sub in modules else target)
        elif isinstance(node, ast.Import):
            out.update(a.name[len("bora."):] for a in node.names if a.name.startswith("bora."))
    return {m for m in out if m in modules} - {me}


def import_graph() -> dict[str, set[str]]:
    return {module_name(p): internal_imports(p) for p in PKG.rglob("*.py")}


def layer(module: str) -> int:
    return LAYERS.index(module.split(".")[0])


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


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """``"a -> b"`` for every import of a higher layer (a subpackage's ``__init__`` re-exporting is allowed)."""
    return sorted(f"{m} -> {d}" for m, deps in graph.items() for d in deps
                  if m != "__init__" and layer(d) > layer(m))


def test_finder_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_parser_sees_function_level_and_relative_imports(tmp_path):
    pkg = tmp_path / "bora"
    (pkg / "fit").mkdir(parents=True)
    p = pkg / "fit" / "loop.py"
    p.write_text("from ..core.files import x\nfrom . import step\n\ndef f():\n    from ..diagnostics.report import y\n"
                 "    from bora.diagnostics.plots import z\n    import bora.api\n")
    modules = frozenset({"core.files", "fit.step", "fit.loop", "diagnostics.report", "diagnostics.plots", "api"})
    found = internal_imports(p, pkg, modules)
    assert found == {"core.files", "fit.step", "diagnostics.report", "diagnostics.plots", "api"}
    assert upward_imports({"fit.loop": found}) == [
        "fit.loop -> api", "fit.loop -> diagnostics.plots", "fit.loop -> diagnostics.report"]


def test_every_module_sits_in_a_declared_layer():
    assert {m.split(".")[0] for m in MODULES} <= set(LAYERS), sorted({m.split(".")[0] for m in MODULES} - set(LAYERS))


def test_no_import_cycle():
    graph = import_graph()
    assert "api" in graph and graph["api"], "the graph is empty: wrong package path?"
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_subpackages_import_only_downward():
    assert upward_imports(import_graph()) == []


def test_importing_bora_changes_no_pyro_setting():
    import subprocess
    import sys

    code = ("import pyro; before = pyro.settings.get('module_local_params'); "
            "import bora, bora.api, bora.cli.main, bora.diagnostics.report, bora.model.guides, bora.fit.loop; "
            "assert pyro.settings.get('module_local_params') == before is False, 'changed'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


def test_architecture_lists_every_module():
    text = (PKG.parents[1] / "ARCHITECTURE.md").read_text(encoding="utf-8")
    # a named member (`bora.fit.loop.FitLoop`) lists its module
    listed = {next((".".join(parts[:i]) for i in range(len(parts), 0, -1) if ".".join(parts[:i]) in MODULES),
                   ".".join(parts))
              for parts in (name.split(".") for name in re.findall(r"`bora\.([\w.]+)`", text))}
    modules = MODULES - {"__init__"}
    assert modules <= listed, sorted(modules - listed)
    # every other reference names something in a module (e.g. `bora.fit.loop.FitLoop`)
    assert all(ref.rpartition(".")[0] in modules for ref in listed - modules), sorted(listed - modules)
