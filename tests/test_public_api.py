"""The public API: the names ``bora`` exports (lazily), and the API reference that documents them.

``bora.__all__`` lists them; each loads from its module on first use (PEP 562), so ``import bora`` stays cheap.
"""

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

import bora

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "src" / "bora"
DOCS = ROOT / "docs" / "api"


def test_all_is_sorted_unique_and_matches_the_lazy_table():
    assert bora.__all__ == sorted(set(bora.__all__))
    assert set(bora.__all__) == set(bora._EXPORTS)
    assert set(bora.__all__) <= set(dir(bora))


@pytest.mark.parametrize("name", bora.__all__)
def test_every_public_name_resolves_to_its_module(name):
    module = bora._EXPORTS[name]
    obj = getattr(bora, name)
    assert obj is getattr(importlib.import_module(module), name)
    assert obj.__module__ == module, f"bora.{name} is defined in {obj.__module__}, not {module}"


def test_star_import_and_unknown_names():
    ns = {}
    exec("from bora import *", ns)
    assert set(bora.__all__) <= set(ns)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        bora.nope
    with pytest.raises(ImportError):
        exec("from bora import nope", {})


def test_import_bora_is_lazy():
    """``import bora`` imports none of its submodules, nor torch or Pyro; a config needs no torch either."""
    code = ("import sys, bora; before = sorted(m for m in sys.modules if m.split('.')[0] in HEAVY or "
            "m.startswith('bora.')); bora.BoraConfig(); bora.ConfigError; "
            "after = sorted(m for m in sys.modules if m.split('.')[0] in HEAVY); "
            "print(before, after, bora.__version__)")
    heavy = "{'torch', 'pyro', 'transformers', 'numpy', 'datasets', 'arviz', 'matplotlib', 'safetensors'}"
    r = subprocess.run([sys.executable, "-c", f"HEAVY = {heavy}; {code}"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["[]", "[]", bora.__version__], r.stdout


def test_package_docstring_links_every_public_name_at_its_home():
    """The API reference's front page is ``bora``'s docstring: each public name is cross-referenced there."""
    missing = [n for n in bora.__all__ if f"`~{bora._EXPORTS[n]}.{n}`" not in bora.__doc__]
    assert missing == []


def _modules() -> set[str]:
    out = set()
    for p in PKG.rglob("*.py"):
        parts = p.relative_to(PKG.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts[-1] != "__main__" and len(parts) > 1:
            out.add(".".join(parts))
    return out


def test_api_reference_documents_every_module():
    """docs/api has one page per subpackage (and bora.api), each module under ``automodule``; the index lists them."""
    pages = {p.stem: p.read_text(encoding="utf-8") for p in DOCS.glob("*.rst")}
    listed = [m for text in pages.values() for m in re.findall(r"^\.\. automodule:: (\S+)", text, re.M)]
    documented = set(listed)
    assert documented == _modules() | {"bora"}, sorted(documented ^ (_modules() | {"bora"}))
    assert len(listed) == len(documented), sorted(m for m in documented if listed.count(m) > 1)  # once each
    toctree = pages["index"].split(":maxdepth:")[1].split()[1:]
    subpackages = [p.name for p in sorted(PKG.iterdir()) if (p / "__init__.py").exists()] + ["api"]
    assert sorted(toctree) == sorted(subpackages)
    for name in toctree:
        assert f".. automodule:: bora.{name}\n" in pages[name]
