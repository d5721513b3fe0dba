"""Tests of bora.shakespeare and bora.data (offline, fast: a whitespace fake tokenizer)."""

from __future__ import annotations

from collections import Counter
import csv
import json

import pytest
import torch

from bora.data import shakespeare
from bora.core.config import ConfigError, DataConfig
from bora.data.batching import batches, collate, distinct_task_batches
from bora.data.documents import (
    Splits,
    TokenizedSplit,
    load_documents,
    split_documents,
    tokenize_split,
)


class FakeTokenizer:
    """Whitespace 'tokenizer': BOS id 1, then one id per word (ids from 2 up, assigned on first sight)."""

    bos = 1

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        ids = [self.vocab.setdefault(w, len(self.vocab) + 2) for w in text.split()]
        return ([self.bos] if add_special_tokens else []) + ids

    def __call__(self, text, add_special_tokens: bool = True):
        if isinstance(text, str):
            return {"input_ids": self._encode(text, add_special_tokens)}
        return {"input_ids": [self._encode(t, add_special_tokens) for t in text]}


def make_docs(sizes: dict[str, int]) -> list[dict]:
    docs = []
    for task, n in sizes.items():
        docs += [{"text": f"{task} doc {i} " + "w " * (i % 5), "task": task} for i in range(n)]
    return docs


@pytest.fixture()
def tmp_hf_cache(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    return tmp_path


# ---------------------------------------------------------------- shakespeare


def test_parse_hamlet_opening():
    speeches = shakespeare.parse_play(shakespeare.play_path("hamlet"))
    assert speeches[0] == ("BERNARDO", "Who's there?")
    assert speeches[1] == ("FRANCISCO", "Nay, answer me: stand, and unfold yourself.")
    francisco = [t for s, t in speeches if s == "FRANCISCO"]
    assert francisco[1] == "Bernardo?"
    # multi-line speech: joined with "\n", no trailing markdown spaces
    assert "For this relief much thanks: 'tis bitter cold,\nAnd I am sick at heart." in francisco


def test_parse_drops_stage_directions():
    speeches = shakespeare.parse_play(shakespeare.play_path("hamlet"))
    texts = [t for _, t in speeches]
    assert not any("Enter Ghost" in t or "Exit" == t for t in texts)
    assert not any(line.startswith("_") or line.endswith("_") or "**" in line
                   for t in texts for line in t.split("\n"))
    # '_\[Aside]_' at the start of a speech is dropped, the speech kept
    assert ("HAMLET", "A little more than kin, and less than kind.") in speeches
    # no trailing spaces or markdown escapes anywhere
    assert not any(line != line.rstrip() or "\\" in line for t in texts for line in t.split("\n"))


def test_parse_synthetic(tmp_path):
    p = tmp_path / "play.md"
    p.write_text(
        "# Play\n\n## ACT I\n\nstray text outside a speech\n\n"
        "_Enter A and\nB_\n\n"
        "**A**  \nline one,  \n_\\[Aside]_  \nline two\n\n"
        "*Sound a horn.*\n\nafter the horn\n\n"
        "**B**  \n_Exit_\n\n"  # a speech with no words is dropped
        "### SCENE II\n\n**B**  \nhello\\--there\n",
        encoding="utf-8",
    )
    assert shakespeare.parse_play(p) == [("A", "line one,\nline two\nafter the horn"), ("B", "hello--there")]


def test_default_tasks_present_and_unequal():
    docs = shakespeare.load_shakespeare()
    counts = {t: 0 for t in shakespeare.DEFAULT_TASKS}
    for d in docs:
        counts[d["task"]] += 1
    assert len(shakespeare.DEFAULT_TASKS) == 16 == len(set(shakespeare.DEFAULT_TASKS))
    assert min(counts.values()) >= 10
    assert max(counts.values()) >= 10 * min(counts.values())
    assert len({t.split("/")[0] for t in counts}) >= 8
    assert docs == shakespeare.load_shakespeare(None)  # deterministic


def test_load_shakespeare_subset_and_errors():
    docs = shakespeare.load_shakespeare(("hamlet/BERNARDO",))
    assert docs[0] == {"text": "Who's there?", "task": "hamlet/BERNARDO"}
    assert {d["task"] for d in docs} == {"hamlet/BERNARDO"}
    with pytest.raises(ConfigError, match="hamlet/NOBODY.*hamlet/HAMLET"):
        shakespeare.load_shakespeare(("hamlet/NOBODY",))
    with pytest.raises(ConfigError, match="nosuchplay/X"):
        shakespeare.load_shakespeare(("nosuchplay/X",))
    with pytest.raises(ConfigError, match="play/SPEAKER"):
        shakespeare.load_shakespeare(("hamlet",))


def test_load_documents_shakespeare():
    cfg = DataConfig(tasks=("hamlet/Ghost", "othello/IAGO"))
    docs = load_documents(cfg)
    assert {d["task"] for d in docs} == {"hamlet/Ghost", "othello/IAGO"}


# ---------------------------------------------------------------- local files


def test_load_jsonl(tmp_hf_cache):
    path = tmp_hf_cache / "d.jsonl"
    rows = [{"body": "first text", "label": 3}, {"body": "", "label": 3}, {"body": None, "label": 4},
            {"body": "second", "label": 4}, {"body": "third", "label": 5}]
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    cfg = DataConfig(source=str(path), text_column="body", task_column="label")
    docs = load_documents(cfg)
    assert docs == [{"text": "first text", "task": "3"}, {"text": "second", "task": "4"},
                    {"text": "third", "task": "5"}]
    assert [d["task"] for d in load_documents(cfg.replace(tasks=("4",)))] == ["4"]
    with pytest.raises(ConfigError, match="'9'"):
        load_documents(cfg.replace(tasks=("9",)))
    with pytest.raises(ConfigError, match=r"column 'text' not found.*\['body', 'label'\]"):
        load_documents(DataConfig(source=str(path), task_column="label"))
    with pytest.raises(ConfigError, match="column 'task' not found"):
        load_documents(DataConfig(source=str(path), text_column="body"))


def test_load_csv(tmp_hf_cache):
    path = tmp_hf_cache / "d.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "task"])
        w.writerows([["a, quoted text", "x"], ["b", "y"], ["c", "x"]])
    docs = load_documents(DataConfig(source=str(path)))
    assert docs == [{"text": "a, quoted text", "task": "x"}, {"text": "b", "task": "y"}, {"text": "c", "task": "x"}]


def test_load_errors(tmp_path):
    txt = tmp_path / "d.txt"
    txt.write_text("a\nb\n")
    with pytest.raises(ConfigError, match="no task column"):
        load_documents(DataConfig(source=str(txt)))
    with pytest.raises(ConfigError, match="data file not found"):
        load_documents(DataConfig(source=str(tmp_path / "missing.jsonl")))
    with pytest.raises(ConfigError, match="data file not found"):
        load_documents(DataConfig(source="./nothing/here"))
    with pytest.raises(ConfigError, match="unsupported file type"):
        (tmp_path / "d.xyz").write_text("x")
        load_documents(DataConfig(source=str(tmp_path / "d.xyz")))


# ---------------------------------------------------------------- splits


SIZES = {"big": 50, "mid": 12, "small": 3, "tiny": 4}


def _texts(docs):
    return [d["text"] for d in docs]


def test_split_deterministic_and_seeded():
    docs = make_docs(SIZES)
    cfg = DataConfig(seed=0)
    a, b = split_documents(docs, cfg), split_documents(list(docs), cfg)
    assert (a.train, a.val, a.test) == (b.train, b.val, b.test)
    c = split_documents(docs, cfg.replace(seed=1))
    assert (_texts(a.train), _texts(a.val)) != (_texts(c.train), _texts(c.val))
    assert a.tasks == ("big", "mid", "small", "tiny")
    # a task's split does not depend on the other tasks
    only_big = split_documents([d for d in docs if d["task"] == "big"], cfg)
    assert only_big.val == [d for d in a.val if d["task"] == "big"]


def test_split_partition_every_task_everywhere():
    docs = make_docs(SIZES)
    s = split_documents(docs, DataConfig(val_fraction=0.2, test_fraction=0.2))
    tr, va, te = set(_texts(s.train)), set(_texts(s.val)), set(_texts(s.test))
    assert not (tr & va or tr & te or va & te)
    assert tr | va | te == set(_texts(docs))
    counts = s.counts()
    for task, n in SIZES.items():
        assert min(counts[task].values()) >= 1
        assert sum(counts[task].values()) == n
    assert counts["big"] == {"train": 30, "val": 10, "test": 10}  # unequal sizes stay unequal
    assert counts["small"] == {"train": 1, "val": 1, "test": 1}
    assert isinstance(s, Splits) and s["val"] is s.val


def test_split_errors_and_fixed_tasks():
    docs = make_docs({"ok": 10, "few": 2})
    with pytest.raises(ConfigError, match="'few' has only 2"):
        split_documents(docs, DataConfig())
    docs = make_docs({"a": 5, "b": 5})
    s = split_documents(docs, DataConfig(), tasks=("b", "a", "c"))
    assert s.tasks == ("b", "a", "c") and s.counts()["c"] == {"train": 0, "val": 0, "test": 0}
    with pytest.raises(ConfigError, match="'b'"):
        split_documents(docs, DataConfig(), tasks=("a",))


# ---------------------------------------------------------------- tokenisation and batching


def _tokenized(sizes=None, max_length=64, **kw):
    docs = make_docs(sizes or {"a": 7, "b": 3, "c": 12})
    tasks = tuple(sorted({d["task"] for d in docs}))
    return docs, tokenize_split(docs, tasks, FakeTokenizer(), max_length, **kw)


def test_truncate_vs_chunk():
    docs = [{"text": " ".join(["w"] * 20), "task": "t"}, {"text": "x", "task": "t"}, {"text": "y z", "task": "u"}]
    tok = FakeTokenizer()
    tr = tokenize_split(docs, ("t", "u"), tok, max_length=8)
    assert [len(x) for x in tr.input_ids] == [8, 2, 3]  # BOS + words
    ch = tokenize_split(docs, ("t", "u"), tok, max_length=8, long_documents="chunk")
    assert [len(x) for x in ch.input_ids] == [8, 8, 5, 2, 3]  # 21 tokens -> 8 + 8 + 5
    assert ch.doc_index.tolist() == [0, 0, 0, 1, 2] and ch.task_ids.tolist() == [0, 0, 0, 0, 1]
    ch9 = tokenize_split(docs[:1], ("t",), tok, max_length=10, long_documents="chunk")
    assert [len(x) for x in ch9.input_ids] == [10, 10]  # final 1-token piece dropped
    short = tokenize_split([{"text": "", "task": "t"}, {"text": "a", "task": "t"}], ("t",), tok, 8)
    assert len(short) == 1  # "" -> [BOS] only: nothing to score
    no_bos = type("NoBos", (FakeTokenizer,), {"_encode": lambda self, t, a: FakeTokenizer._encode(self, t, False)})()
    assert len(tokenize_split([{"text": "one", "task": "t"}], ("t",), no_bos, 8)) == 0
    assert tr.num_tokens() == 7 + 1 + 2
    assert tr.task_sizes().tolist() == [2, 1] and tr.task_tokens().tolist() == [8, 2]
    with pytest.raises(ConfigError, match="'v'"):
        tokenize_split([{"text": "a b", "task": "v"}], ("t",), tok, 8)


def test_tokenized_split_subset():
    _, ts = _tokenized(max_length=6)
    sub = ts.subset([2, 0])
    assert isinstance(sub, TokenizedSplit) and len(sub) == 2 and sub.tasks == ts.tasks
    assert torch.equal(sub.input_ids[0], ts.input_ids[2]) and sub.task_ids.tolist() == ts.task_ids[[2, 0]].tolist()
    mask = ts.task_ids == 1
    assert len(ts.subset(mask)) == int(mask.sum())
    assert ts.task_tokens().sum() == ts.num_tokens()


def test_collate_padding_and_mask():
    _, ts = _tokenized(max_length=8)
    idx = torch.tensor([0, 3, 5])
    b = collate(ts, idx, pad_id=-7)
    lens = [len(ts.input_ids[i]) for i in idx.tolist()]
    assert b["input_ids"].shape == b["attention_mask"].shape == (3, max(lens))
    assert b["attention_mask"].sum(1).tolist() == lens
    for r, i in enumerate(idx.tolist()):
        assert torch.equal(b["input_ids"][r, : lens[r]], ts.input_ids[i])
        assert (b["input_ids"][r, lens[r]:] == -7).all()
    assert b["task_ids"].tolist() == ts.task_ids[idx].tolist() and b["index"].tolist() == [0, 3, 5]
    assert b["input_ids"].dtype == b["attention_mask"].dtype == torch.long
    assert collate(ts, [1])["input_ids"].shape[0] == 1


def test_batches_cover_each_index_once():
    _, ts = _tokenized()
    n = len(ts)
    g = torch.Generator().manual_seed(0)
    epochs = [torch.cat(list(batches(ts, 5, shuffle=True, generator=g))) for _ in range(2)]
    for e in epochs:
        assert sorted(e.tolist()) == list(range(n))
    assert epochs[0].tolist() != epochs[1].tolist()  # new permutation each epoch
    ordered = list(batches(ts, 5, shuffle=False))
    assert torch.cat(ordered).tolist() == list(range(n)) and [len(b) for b in ordered][:-1] == [5] * (len(ordered) - 1)
    dropped = list(batches(ts, 5, shuffle=True, drop_last=True))
    assert all(len(b) == 5 for b in dropped) and len(dropped) == n // 5
    a = torch.cat(list(batches(ts, 4, shuffle=True, generator=torch.Generator().manual_seed(3))))
    b = torch.cat(list(batches(ts, 4, shuffle=True, generator=torch.Generator().manual_seed(3))))
    assert torch.equal(a, b)


@pytest.mark.parametrize("max_per_task", [None, 1, 4, 100])
def test_distinct_task_batches(max_per_task):
    _, ts = _tokenized({"a": 7, "b": 3, "c": 12})
    g = torch.Generator().manual_seed(0)
    seen = []
    for b in distinct_task_batches(ts, max_per_task, generator=g):
        tasks = ts.task_ids[b].tolist()
        assert len(tasks) == len(set(tasks))  # every task at most once
        seen += b.tolist()
    assert len(seen) == len(set(seen))
    per_task = torch.bincount(ts.task_ids[torch.tensor(seen)], minlength=3).tolist()
    sizes = ts.task_sizes().tolist()
    cap = max_per_task or max(sizes)
    assert per_task == [min(s, cap) for s in sizes]


def test_end_to_end_shakespeare_small():
    cfg = DataConfig(tasks=("hamlet/Ghost", "julius-caesar/PORTIA"), max_length=16)
    splits = split_documents(load_documents(cfg), cfg)
    ts = tokenize_split(splits.train, splits.tasks, FakeTokenizer(), cfg.max_length)
    assert ts.task_sizes().tolist() == [sum(d["task"] == t for d in splits.train) for t in splits.tasks]
    assert max(len(x) for x in ts.input_ids) <= 16


def test_hub_name_errors_are_one_line(monkeypatch):
    import datasets

    calls = []

    def fake_load(name, split=None, **kw):
        calls.append((name, split))
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    want = r"^could not load dataset 'owner/name' \(split 'test'\): RuntimeError: boom$"
    with pytest.raises(ConfigError, match=want):
        load_documents(DataConfig(source="owner/name", split="test"))
    assert calls == [("owner/name", "test")]


def test_load_parquet(tmp_hf_cache):
    import datasets

    path = tmp_hf_cache / "d.parquet"
    datasets.Dataset.from_dict({"text": ["a b", "c"], "task": [1, 2]}).to_parquet(str(path))
    assert load_documents(DataConfig(source=str(path))) == [{"text": "a b", "task": "1"}, {"text": "c", "task": "2"}]


# ---------------------------------------------------------------- malformed and unusual data (docs/hostile_inputs.md)


def test_documented_data_behaviours(tmp_path):
    # a quoted CSV field keeps its newlines, commas and quotes: one document
    p = tmp_path / "q.csv"
    p.write_text('text,task\n"line one\nline two, with ""quotes""",a\nplain,a\n', encoding="utf-8")
    assert load_documents(DataConfig(source=str(p)))[0] == {"text": 'line one\nline two, with "quotes"', "task": "a"}
    # UTF-8 with a byte-order mark; numeric tasks become strings; blank texts are skipped
    p = tmp_path / "bom.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + b'{"text": "x", "task": 3}\n{"text": " ", "task": 3}\n{"text": "y", "task": 2.5}\n')
    assert load_documents(DataConfig(source=str(p))) == [{"text": "x", "task": "3"}, {"text": "y", "task": "2.5"}]
    # a .json file holding an array of objects, or an object of columns
    p = tmp_path / "a.json"
    p.write_text(json.dumps([{"text": "x", "task": "a"}, {"text": "y", "task": "b"}]))
    assert [d["text"] for d in load_documents(DataConfig(source=str(p)))] == ["x", "y"]
    p.write_text(json.dumps({"text": ["x", "y"], "task": ["a", "b"]}))
    assert [d["task"] for d in load_documents(DataConfig(source=str(p)))] == ["a", "b"]


def test_enormous_documents_are_truncated_or_chunked(tmp_path):
    big = " ".join(f"w{i % 40}" for i in range(300_000))  # ~1.7 MB on one line
    p = tmp_path / "big.jsonl"
    p.write_text("\n".join(json.dumps({"text": t, "task": "a"}) for t in [big, "w1 w2", "w3 w4"]) + "\n")
    docs = load_documents(DataConfig(source=str(p)))
    assert docs[0]["text"] == big
    ts = tokenize_split(docs, ("a",), FakeTokenizer(), 16)
    assert [len(x) for x in ts.input_ids] == [16, 3, 3]
    ts = tokenize_split(docs, ("a",), FakeTokenizer(), 1000, "chunk")
    assert len(ts) == 300 + 2 and (ts.doc_index == 0).sum() == 300  # 300001 tokens: a 1-token tail is dropped


def test_duplicates_through_a_file(tmp_path):
    p = tmp_path / "d.jsonl"
    rows = [{"text": "Swear.", "task": "ghost"}] * 4 + [{"text": f"g{i}", "task": "ghost"} for i in range(6)]
    rows += [{"text": "Swear.", "task": "hamlet"}] + [{"text": f"h{i}", "task": "hamlet"} for i in range(3)]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    keep = load_documents(DataConfig(source=str(p)))
    drop = load_documents(DataConfig(source=str(p), duplicates="drop"))
    assert len(keep) == 14 and len(drop) == 11
    assert [d["task"] for d in drop if d["text"] == "Swear."] == ["ghost", "hamlet"]
    splits = split_documents(drop, DataConfig(source=str(p), duplicates="drop"))
    for task in ("ghost", "hamlet"):
        seen = [d["text"] for name in ("train", "val", "test") for d in splits[name] if d["task"] == task]
        assert len(seen) == len(set(seen))  # no text in two splits of one task
    with pytest.raises(ConfigError, match="duplicates must be"):
        DataConfig(duplicates="merge")


@pytest.mark.parametrize("content,words", [
    (b"", "is empty"),
    (b'{"text": "a", "task": "x"}\n{"text": "b", "task": \n', "line 2: invalid JSON"),
    (b'{"text": "a", "task": "x"}\n{"text": "\xfe", "task": "x"}\n', "line 2: not valid UTF-8"),
    (b'{"text": ["a"], "task": "x"}\n', "line 1: the text column"),
    (b'{"text": "a", "task": "x"}\n{"text": "b"}\n', "line 2: a document without a value"),
    (b'{"text": "a", "task": "x"}\n{"text": "b", "task": null}\n', "line 2: a document without a value"),
    (b'{"text": "a", "task": "x"}\n{"text": "b", "task": " "}\n', "line 2: empty task name"),
    (b'{"text": "a", "task": true}\n', "task values must be"),
])
def test_malformed_jsonl_names_the_line(tmp_path, content, words):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(content)
    with pytest.raises(ConfigError, match=words) as info:
        load_documents(DataConfig(source=str(p)))
    assert str(p) in str(info.value) and "\n" not in str(info.value)


def test_malformed_csv_names_the_line(tmp_path):
    p = tmp_path / "bad.tsv"
    p.write_text("text\ttask\na\tx\nb\tx\ty\n")
    with pytest.raises(ConfigError, match=r"bad.tsv line 3: 3 fields"):
        load_documents(DataConfig(source=str(p)))
    p = tmp_path / "dup.csv"
    p.write_text("text,text\na,b\n")
    with pytest.raises(ConfigError, match="duplicate column name 'text'"):
        load_documents(DataConfig(source=str(p)))
    p = tmp_path / "blank.csv"
    p.write_text("text,task\n   ,ghost\n\t,ghost\na,x\n")
    with pytest.raises(ConfigError, match="'ghost'.*only empty or whitespace"):
        load_documents(DataConfig(source=str(p)))
    assert load_documents(DataConfig(source=str(p), tasks=("x",))) == [{"text": "a", "task": "x"}]


def test_a_folder_of_several_data_files_is_refused_and_one_file_is_read(tmp_path):
    import json

    folder = tmp_path / "d"
    folder.mkdir()
    rows = [{"text": f"speech {i}", "task": "a" if i % 2 else "b"} for i in range(6)]
    (folder / "one.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    docs = load_documents(DataConfig(source=str(folder)))
    assert len(docs) == 6
    (folder / "sub").mkdir()
    (folder / "sub" / "two.jsonl").write_text(json.dumps({"text": "other", "task": "c"}) + "\n")
    with pytest.raises(ConfigError, match=r"is a folder with 2 data files \('one.jsonl', 'sub/two.jsonl'\)"):
        load_documents(DataConfig(source=str(folder)))


def test_task_names_in_two_unicode_forms_are_one_task_with_a_warning(tmp_path):
    import json
    import unicodedata

    composed, decomposed = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    assert composed != decomposed
    path = tmp_path / "d.jsonl"
    rows = [{"text": f"t{i}", "task": composed if i % 2 else decomposed} for i in range(4)] + [
        {"text": "x", "task": "other"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.warns(UserWarning, match="more than one Unicode form were merged"):
        docs = load_documents(DataConfig(source=str(path)))
    assert sorted({d["task"] for d in docs}) == sorted({composed, "other"})


def test_shakespeare_all_is_the_many_task_corpus():
    """--data shakespeare-all: every speaker with at least 3 speeches, each split into train/val/test; many tiny."""
    from bora.data.shakespeare import MIN_SPEECHES_ALL, all_tasks, speech_counts

    cfg = DataConfig(source="shakespeare-all")
    docs = load_documents(cfg)
    splits = split_documents(docs, cfg)
    counts = speech_counts()
    assert splits.tasks == all_tasks() and len(splits.tasks) == 1023
    assert all(counts[t] >= MIN_SPEECHES_ALL for t in splits.tasks)
    assert len(docs) == sum(counts[t] for t in splits.tasks)
    train = Counter(d["task"] for d in splits.train)
    assert all(train[t] >= 1 for t in splits.tasks)
    assert sum(1 for t in splits.tasks if train[t] <= 2) >= 150  # cold-start-sized tasks
    sub = DataConfig(source="shakespeare-all", tasks=("hamlet/Ghost", "hamlet/HAMLET"))
    assert {d["task"] for d in load_documents(sub)} == {"hamlet/Ghost", "hamlet/HAMLET"}
