"""The measured figures in the docs come from the committed result files, not from typing.

``scripts/results_docs.py`` writes docs/results*.md and README.md's headline block from the JSON under
``analysis/results/`` and ``benchmarks/``; these tests fail when a committed page differs from what it would
write now (a result file changed, or a page was edited by hand), when a table names no source, or when a
link in the README or the docs points at nothing.
"""

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _generator():
    spec = importlib.util.spec_from_file_location("results_docs", ROOT / "scripts" / "results_docs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_generated_pages_are_current(capsys):
    rc = _generator().main(["--check"])
    assert rc == 0, "stale generated docs; run `python scripts/results_docs.py`:\n" + capsys.readouterr().out


def test_check_reports_a_stale_page(tmp_path):
    gen = _generator()
    pages = gen.render(ROOT)
    assert gen.render(ROOT) == pages  # deterministic
    for rel, text in pages.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text, encoding="utf-8")
    assert gen.stale(tmp_path, pages) == []
    page = tmp_path / "docs" / "results.md"
    text = page.read_text(encoding="utf-8")
    figure = re.search(r"\| learned \[offset\] \| (\d+\.\d+) \|", text).group(1)
    page.write_text(text.replace(figure, "1" + figure, 1), encoding="utf-8")
    diffs = gen.stale(tmp_path, pages)
    assert len(diffs) == 1 and "docs/results.md" in diffs[0] and figure in diffs[0]


def test_every_generated_table_names_its_source_and_command():
    for rel, text in _generator().render(ROOT).items():
        if rel == "README.md":
            continue
        for section in re.split(r"\n(?=#{2,3} )", text):
            if any(line.startswith("|") for line in section.splitlines()):
                assert "Source: " in section or "Sources and commands:" in section, (rel, section[:80])
                assert "command" in section, (rel, section[:80])


def test_readme_headline_figures_link_their_files():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = text.split("<!-- results:begin -->")[1].split("<!-- results:end -->")[0]
    bullets = [line for line in block.splitlines() if line.startswith("- ")]
    assert bullets
    for line in bullets:
        files = re.findall(r"\]\(((?:analysis|benchmarks)/[^)]+\.json)\)", line)
        assert files, line
        assert all((ROOT / f).is_file() for f in files), line


def test_links_in_readme_and_docs_resolve():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path = (page.parent / target.split("#")[0]).resolve()
            assert path.exists(), f"{page.relative_to(ROOT)} links to missing {target}"
