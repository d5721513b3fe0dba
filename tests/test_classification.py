"""Classification and multiple-choice data: the likelihood of a row is the log softmax over its choices' summed
token log-probabilities, computed by hand here with the plain transformers model; metrics against hand values."""

import json
import math

import numpy as np
import pytest
import torch

from bora.cli.main import main
from bora.core.config import ConfigError, DataConfig
from bora.data.batching import collate
from bora.data.documents import load_documents, split_documents, tokenize_split
from bora.data.feed import Feed
from bora.evaluation.classification import choice_probs, classification_metrics, row_metrics
from bora.evaluation.evaluate import doc_loglik
from bora.evaluation.metrics import expected_calibration_error
from bora.fit.fisher import task_fisher
from bora.lora.prefix import FrozenPrefix
from bora.model.likelihood import LMLikelihood

from conftest import adapted_tiny_llama, tiny_model_dir, tiny_tokenizer

TASKS = ("a", "b")
ROWS = [  # different numbers of choices, and of tokens per choice and per prompt
    {"prompt": "w5 w6 w7", "choices": [" w8", " w9 w10 w11", " w12 w13"], "label": 1, "task": "a"},
    {"prompt": "w14", "choices": [" w15 w16", " w17"], "label": 0, "task": "b"},
    {"prompt": "w20 w21 w22 w23 w24 w25", "choices": [" w26 w27 w28 w29", " w30", " w31 w32", " w33"],
     "label": 3, "task": "a"},
]


@pytest.fixture(scope="module")
def setup():
    lm, adapters, params = adapted_tiny_llama(len(TASKS))
    tok = tiny_tokenizer()
    return lm, adapters, params, tok, tokenize_split(ROWS, TASKS, tok, 64)


def hand_choice_logprobs(lm, adapters, params, tok, row, task):
    """log softmax over the choices of sum_j log p(choice token j | prompt, earlier choice tokens), each choice run
    alone through the plain transformers model (no padding, no bora batching)."""
    scores = []
    p = tok(row["prompt"])["input_ids"]
    for c in row["choices"]:
        ids = torch.tensor(p + tok(c, add_special_tokens=False)["input_ids"])
        with torch.no_grad(), adapters.use(params, torch.tensor([task])):
            logp = torch.log_softmax(lm(input_ids=ids[None]).logits[0, :-1].double(), -1)
        tgt = ids[1:]
        scores.append(float(logp[torch.arange(len(tgt)), tgt][len(p) - 1:].sum()))
    return torch.log_softmax(torch.tensor(scores, dtype=torch.float64), 0)


def test_rows_expand_to_one_sequence_per_choice(setup):
    *_, split = setup
    assert split.is_classification and split.num_choices().tolist() == [3, 2, 4]
    assert split.scored.tolist() == [1, 1, 1] and split.num_tokens() == 3  # one scored unit per row
    b = collate(split, [2, 0])
    assert b["input_ids"].shape[0] == 7 and b["choice_row"].tolist() == [0] * 4 + [1] * 3
    assert b["choice_index"].tolist() == [0, 1, 2, 3, 0, 1, 2] and b["label"].tolist() == [3, 1]
    assert b["task_ids"].tolist() == [0, 0] and b["index"].tolist() == [2, 0]
    assert b["sequence"].tolist() == [5, 6, 7, 8, 0, 1, 2]
    assert b["loss_mask"].sum(1).tolist() == [4, 1, 2, 1, 1, 3, 2]  # each choice's own tokens are scored
    # the correct choice alone (the 'answer' loss, or prompt/completion data)
    assert torch.equal(split.input_ids[0], split.choices[0][1])
    answer = tokenize_split(ROWS, TASKS, setup[3], 64, choice_loss="answer")
    assert answer.scored.tolist() == [3, 2, 1] and "choice_row" not in collate(answer, [0, 1])
    sub = split.subset([2])
    assert sub.labels.tolist() == [3] and len(sub.choices[0]) == 4


@pytest.mark.parametrize("with_prefix", [False, True])
def test_loglik_is_log_softmax_over_choices(setup, with_prefix):
    lm, adapters, params, tok, split = setup
    prefix = FrozenPrefix(lm, adapters.first_layer) if with_prefix and adapters.first_layer else None
    lik = LMLikelihood(lm, adapters, prefix=prefix)
    feed = Feed(split, prefix=prefix)
    want = torch.zeros(len(ROWS), 4, dtype=torch.float64).fill_(-math.inf)
    for i, row in enumerate(ROWS):
        lp = hand_choice_logprobs(lm, adapters, params, tok, row, TASKS.index(row["task"]))
        want[i, :len(lp)] = lp
    labels = torch.tensor([r["label"] for r in ROWS])
    with torch.no_grad():
        batch = feed.batch(torch.arange(len(ROWS)))  # one padded batch of 9 sequences of 2 to 10 tokens
        assert len(set(batch["attention_mask"].sum(1).tolist())) > 3
        got = lik.choice_log_probs(batch, params).double()
        assert torch.allclose(got.exp(), want.exp(), atol=1e-5)
        ll = lik.loglik(batch, params)
        assert torch.allclose(ll.double(), want[torch.arange(3), labels], atol=1e-4)
        for i in range(len(ROWS)):  # each row alone
            one = lik.loglik(feed.batch(torch.tensor([i])), params)
            assert torch.allclose(one.double(), want[i, labels[i]].reshape(1), atol=1e-4)
    ll_doc, toks = doc_loglik(lik, params, feed)
    assert toks.tolist() == [1, 1, 1] and torch.allclose(ll_doc.double(), want[torch.arange(3), labels], atol=1e-4)

    class M(LMLikelihood):
        num_tasks = 2
    probs = choice_probs(M(lm, adapters, prefix=prefix), params, feed, batch_size=2)
    assert torch.allclose(probs, want.exp(), atol=1e-5)


def test_fisher_differentiates_the_row_loglik(setup):
    """The empirical Fisher of a task with one row is the square of the gradient of that row's classification
    log-likelihood (not of its choices' token sums)."""
    lm, adapters, params, tok, split = setup

    class M(LMLikelihood):
        num_tasks = 2
    model = M(lm, adapters)
    one = split.subset([1])  # task b's only row
    tf = task_fisher(model, params, Feed(one))
    leaves = {k: tuple(x.detach().clone().requires_grad_(True) for x in v) for k, v in params.items()}
    ll = model.loglik(collate(one, [0]), leaves).sum()
    key = next(iter(params))
    gA = torch.autograd.grad(ll, leaves[key][0])[0]
    assert torch.allclose(tf.fisher[key][0][1], gA[1].square(), rtol=1e-4, atol=1e-10)
    assert float(tf.fisher[key][0][1].abs().sum()) > 0 and tf.used.tolist() == [0, 1]


def test_metrics_against_hand_values():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.3, 0.6, 0.1], [0.5, 0.5, 0.0], [0.05, 0.15, 0.8]])
    labels = torch.tensor([0, 0, 1, 2])
    m = row_metrics(probs, labels)
    assert m["accuracy"] == pytest.approx(2 / 4)  # row 2: a tie goes to the first choice, wrong
    assert m["nll"] == pytest.approx(-(math.log(0.7) + math.log(0.3) + math.log(0.5) + math.log(0.8)) / 4)
    brier = [0.3 ** 2 + 0.2 ** 2 + 0.1 ** 2, 0.7 ** 2 + 0.6 ** 2 + 0.1 ** 2, 0.5 ** 2 + 0.5 ** 2,
             0.05 ** 2 + 0.15 ** 2 + 0.2 ** 2]
    assert m["brier"] == pytest.approx(sum(brier) / 4)
    # 15 bins of width 1/15: 0.7 -> bin 10 (hit), 0.6 -> bin 8 (miss), 0.5 -> bin 7 (miss), 0.8 -> bin 11 (hit)
    assert m["ece"] == pytest.approx((0.3 + 0.6 + 0.5 + 0.2) / 4)
    both = classification_metrics(probs, labels, torch.tensor([0, 0, 1, 1]), ("x", "y"))
    assert both["per_task"]["x"]["accuracy"] == 0.5 and both["per_task"]["y"]["accuracy"] == 0.5
    x, y = both["per_task"]["x"], both["per_task"]["y"]
    assert x["ece"] == pytest.approx((0.3 + 0.6) / 2) and y["ece"] == pytest.approx((0.5 + 0.2) / 2)
    for k in ("accuracy", "nll", "ece", "brier"):  # every task counts once
        assert both["overall"][k] == pytest.approx((x[k] + y[k]) / 2)
        assert both["pooled"][k] == pytest.approx(m[k])
    assert "z" not in classification_metrics(probs, labels, torch.zeros(4), ("x", "z"))["per_task"]


def test_ece_matches_torchmetrics():
    tm = pytest.importorskip("torchmetrics.classification")
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(2 * torch.randn(500, 4, generator=g), -1)
    labels = torch.randint(0, 4, (500,), generator=g)
    want = tm.MulticlassCalibrationError(num_classes=4, n_bins=15, norm="l1")(probs, labels)
    assert row_metrics(probs, labels)["ece"] == pytest.approx(float(want), abs=1e-6)


def embedded_corpus(source: str, tasks) -> tuple[list, list]:
    """An embedded classification corpus's rows (deterministic) and its tasks' sorted training sizes under the
    default split: at least 8 tasks, those of ``tasks``."""
    cfg = DataConfig(source=source)
    assert cfg.mode == "classification"
    docs = load_documents(cfg)
    assert docs == load_documents(cfg)  # deterministic
    splits = split_documents(docs, cfg)
    assert len(splits.tasks) == len(tasks) >= 8
    return docs, sorted(c["train"] for c in splits.counts().values())


def test_shakespeare_mc_corpus():
    from bora.data.shakespeare import parse_play, play_path
    from bora.data.shakespeare_mc import DEFAULT_TASKS

    docs, sizes = embedded_corpus("shakespeare-mc", DEFAULT_TASKS)
    assert sum(s <= 30 for s in sizes) >= 2 and len(set(sizes)) > 5
    speeches = parse_play(play_path("hamlet"))
    ghost = [d for d in docs if d["task"] == "hamlet/Ghost"]
    lines = [(speeches[j - 1], t) for j, (sp, t) in enumerate(speeches) if sp == "Ghost"]
    assert len(ghost) == len(lines)
    for d, ((cue_sp, cue), text) in zip(ghost, lines):
        assert len(d["choices"]) == 4 and len(set(d["choices"])) == 4
        assert d["choices"][d["label"]] == " " + text.split("\n")[0].strip()  # the speaker's actual next line
        assert d["prompt"] == f"{cue_sp}: {cue.splitlines()[-1].strip()}\nGhost:"
        firsts = {" " + t.split("\n")[0].strip() for sp, t in speeches if sp == "Ghost"}
        assert set(d["choices"]) <= firsts  # distractors: the same speaker's other lines
    assert len({d["label"] for d in docs}) == 4



def test_shakespeare_who_corpus():
    from bora.data.shakespeare import parse_play, play_path
    from bora.data.shakespeare_who import DEFAULT_TASKS, MAX_LINES, OTHER_PAIRS, PAIRS, load_shakespeare_who

    docs, sizes = embedded_corpus("shakespeare-who", DEFAULT_TASKS)
    assert not set(DEFAULT_TASKS) & set(OTHER_PAIRS)
    assert sum(s <= 30 for s in sizes) >= 3 and len(set(sizes)) == len(sizes)
    # every row is a speech of one of the pair, its label that speaker, its choices the pair in order
    title, first, second, keep = PAIRS["the-tempest"]
    rows = [d for d in docs if d["task"] == "the-tempest"]
    speeches = parse_play(play_path("the-tempest"))
    spoken = {f"{speeches[j - 1][0]}: {speeches[j - 1][1].splitlines()[-1].strip()}\n???: "
              + "\n".join(t.split("\n")[:MAX_LINES]): sp
              for j, (sp, t) in enumerate(speeches) if j and sp in (first, second)}
    assert len(rows) == keep
    for d in rows:
        assert d["choices"] == [" Ferdinand", " Miranda"]
        dialogue, question = d["prompt"].split("\n\n")
        assert question == "In The Tempest, who is ???: Ferdinand or Miranda?\nAnswer:"
        assert spoken[dialogue] == (first, second)[d["label"]]  # the cue, then the speech of the labelled speaker
    assert {d["label"] for d in rows} == {0, 1}
    assert len(load_shakespeare_who(("macbeth",))) == OTHER_PAIRS["macbeth"][3]
    with pytest.raises(ConfigError, match="unknown shakespeare-who task"):
        load_shakespeare_who(("hamlet/HAMLET",))


def _ood_rows_script():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("ood_rows", Path(__file__).resolve().parents[1] / "analysis"
                                                  / "ood_rows.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("corpus,tasks", [("shakespeare-who", ["the-tempest", "measure-for-measure"]),
                                          ("fortunes-mine", ["magic", "goedel"])])
def test_cli_embedded_classification_and_its_ood_rows(tmp_path, capsys, corpus, tasks):
    """A fit on an embedded classification corpus (tiny model: plumbing only), then analysis/ood_rows.py's rows
    scored under the fit's tasks by ``bora evaluate --data`` (a row file in the embedded corpus's format)."""
    ood_rows = _ood_rows_script()
    model, out = tiny_model_dir(tmp_path / "model"), tmp_path / "fit"
    # the word-level tokenizer reads every word as <unk>: both choices score alike, so no gradient to learn tau from
    assert main(["fit", "--model", str(model), "--data", corpus, "--tasks", *tasks, "--output", str(out),
                 "--tau-mode", "fixed", "--tau", "10", *TINY[2:]]) == 0
    assert "classification" in capsys.readouterr().out
    for kind in ("plays", "fortunes"):
        ood = tmp_path / f"{kind}.jsonl"
        assert ood_rows.main(["--corpus", corpus, "--kind", kind, "--every", "50", "--tasks", *tasks,
                              "--out", str(ood)]) == 0
        rows = [json.loads(line) for line in ood.read_text().splitlines()]
        assert {r["task"] for r in rows} == set(tasks) and all(r["prompt"].endswith("Answer:") for r in rows)
        assert main(["evaluate", str(out), "--data", str(ood), "--quiet", "--device", "cpu", "--samples", "2",
                     "--json", str(tmp_path / f"{kind}.json")]) == 0
        got = json.loads((tmp_path / f"{kind}.json").read_text())["classification"]["rows"]
        assert got["task"] == [r["task"] for r in rows] and len(got["mutual_information"]) == len(rows)
    with pytest.raises(SystemExit):
        ood_rows.main(["--corpus", corpus, "--tasks", "hamlet", "--out", str(tmp_path / "x.jsonl")])


def test_fortunes_mine_corpus():
    from bora.data.fortunes import load_fortunes
    from bora.data.fortunes_mine import DEFAULT_TASKS, POSITIVES, QUESTION, load_fortunes_mine, prompt

    docs, sizes = embedded_corpus("fortunes-mine", DEFAULT_TASKS)
    assert sum(s <= 30 for s in sizes) >= 3 and sizes[-1] > 100
    by_cat = {c: {prompt(d["text"]) for d in load_fortunes((c,))} for c in DEFAULT_TASKS}
    for task in ("magic", "zippy"):
        rows = [d for d in docs if d["task"] == task]
        assert len(rows) == 2 * POSITIVES[task] and sum(d["label"] for d in rows) == POSITIVES[task]
        for d in rows:  # a positive is the collector's own category's entry, a negative another category's
            assert d["choices"] == [" No", " Yes"] and d["prompt"].endswith("\n\n" + QUESTION)
            assert (d["prompt"] in by_cat[task]) == bool(d["label"])
    with pytest.raises(ConfigError, match="unknown fortunes-mine task"):
        load_fortunes_mine(("computers",))

TINY = ["--task-column", "speaker", "--targets", "q_proj", "v_proj", "--layers", "-1", "--rank", "2",
        "--steps", "6", "--batch-size", "4", "--device", "cpu", "--quiet"]


def write_mc(path, sizes=(12, 8, 6)):
    """Multiple-choice rows: each speaker's correct choice is its own word."""
    import random

    rng = random.Random(0)
    with open(path, "w") as f:
        for t, n in enumerate(sizes):
            for i in range(n):
                choices = [f" w{rng.randrange(10, 40)} w{rng.randrange(10, 40)}", f" w{t + 5}", f" w{40 + i % 5}"]
                k = i % 3
                choices[1], choices[k] = choices[k], choices[1]
                f.write(json.dumps({"q": f"w{rng.randrange(10, 40)}", "choices": choices,
                                    "answer": k if i % 2 else choices[k], "speaker": f"spk{t}"}) + "\n")
    return path


def test_cli_multiple_choice_end_to_end(tmp_path, capsys):
    model, data = tiny_model_dir(tmp_path / "model"), write_mc(tmp_path / "mc.jsonl")
    out = tmp_path / "fit"
    assert main(["fit", "--model", str(model), "--data", str(data), "--prompt-column", "q", "--choices-column",
                 "choices", "--label-column", "answer", "--output", str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    assert "classification" in printed and "Brier" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    cls = metrics["test"]["classification"]
    cfg = DataConfig(source=str(data), prompt_column="q", choices_column="choices", label_column="answer",
                     task_column="speaker")
    test = split_documents(load_documents(cfg), cfg).test
    assert cls["map"]["overall"]["rows"] == len(test) == metrics["test"]["fit"]["overall"]["tokens"]
    assert set(cls["map"]["per_task"]) == {"spk0", "spk1", "spk2"}
    capsys.readouterr()
    assert main(["evaluate", str(out), "--quiet", "--device", "cpu", "--json", str(tmp_path / "ev.json")]) == 0
    printed = capsys.readouterr().out
    assert "MAP" in printed and "post. avg (S=10)" in printed and "ECE" in printed and "Brier" in printed
    ev = json.loads((tmp_path / "ev.json").read_text())["classification"]
    assert ev["samples"] == 10 and not ev["point_fit"]
    assert ev["map"]["overall"] == pytest.approx(cls["map"]["overall"])
    pa = ev["posterior_average"]
    assert pa["overall"] != ev["map"]["overall"] and 0 <= pa["overall"]["accuracy"] <= 1
    for k in ("accuracy", "nll", "ece", "brier"):
        assert pa["overall"][k] == pytest.approx(sum(m[k] for m in pa["per_task"].values()) / 3)
        assert f"{ev['map']['overall'][k]:.4f}" in printed and f"{pa['overall'][k]:.4f}" in printed
    check_rows(out, ev, test, point=False)
    # out-of-distribution rows: another corpus's rows relabelled with a fitted task, scored under its adapter
    ood = tmp_path / "ood.jsonl"
    ood.write_text("".join(json.dumps({"q": f"w{50 + i}", "choices": [f" w{60 + i}", f" w{70 + i} w5", " w80"],
                                       "answer": i % 3, "speaker": "spk0"}) + "\n" for i in range(5)))
    assert main(["evaluate", str(out), "--data", str(ood), "--quiet", "--device", "cpu",
                 "--json", str(tmp_path / "ood.json")]) == 0
    od = json.loads((tmp_path / "ood.json").read_text())["classification"]["rows"]
    assert od["task"] == ["spk0"] * 5 and od["label"] == [0, 1, 2, 0, 1] and len(od["p_avg"][0]) == 3
    new = tmp_path / "new.jsonl"  # classification rows of a task not in the fit stay refused
    new.write_text(json.dumps({"q": "w5", "choices": [" w6", " w7"], "answer": 0, "speaker": "other"}) + "\n")
    assert main(["evaluate", str(out), "--data", str(new), "--quiet", "--device", "cpu"]) != 0
    # analysis/classification.py on these JSONs recomputes bora's numbers from the rows
    summary = _analysis_classification().main([
        "--fits", f"learned={tmp_path / 'ev.json'}", "--ood", f"learned={tmp_path / 'ood.json'}",
        "--resamples", "50", "--out", str(tmp_path / "cls" / "summary.json"), "--plot", str(tmp_path / "p.png")])
    for key in ("map", "posterior_average"):
        for k in ("accuracy", "nll", "ece", "brier"):
            assert summary["settings"]["learned"][key]["overall"][k] == pytest.approx(ev[key]["overall"][k])
            for t, m in ev[key]["per_task"].items():
                assert summary["settings"]["learned"][key]["per_task"][t][k] == pytest.approx(m[k])
    sizes = dict(zip(*(json.loads((out / "tasks.json").read_text())[k] for k in ("tasks", "task_sizes"))))
    assert {t: r["train_rows"] for t, r in summary["ece_by_size"].items()} == sizes
    assert 0 <= summary["ood"]["learned"]["auroc_mi"] <= 1 and (tmp_path / "p.png").stat().st_size > 0


def _analysis_classification():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "classification_analysis", Path(__file__).resolve().parents[1] / "analysis" / "classification.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def check_rows(fit, ev, test_rows, point):
    """``bora evaluate --json``'s per-row outputs: the MAP's are choice_probs of the fit's point estimate, over each
    row's own choices; entropy of the average; mutual information 0 for a point fit, >= 0 otherwise."""
    from bora.api import Bora, load_data
    from bora.evaluation.metrics import entropy

    rows = ev["rows"]
    bora = Bora.load(fit, device="cpu")
    split = load_data(bora.config, bora.tokenizer, tasks=bora.tasks)["test"]
    want = choice_probs(bora.model, bora.params(), bora.feed(split))
    k = split.num_choices().tolist()
    assert rows["task"] == [split.tasks[t] for t in split.task_ids.tolist()] == [r["task"] for r in test_rows]
    assert rows["label"] == split.labels.tolist() and [len(p) for p in rows["p_map"]] == k
    for i, n in enumerate(k):
        assert rows["p_map"][i] == pytest.approx(want[i, :n].tolist(), abs=1e-9)
        assert sum(rows["p_avg"][i]) == pytest.approx(1.0) and len(rows["p_avg"][i]) == n
    p_avg = torch.zeros(len(k), max(k), dtype=torch.float64)
    for i, p in enumerate(rows["p_avg"]):
        p_avg[i, :len(p)] = torch.tensor(p, dtype=torch.float64)
    assert rows["entropy_avg"] == pytest.approx(entropy(p_avg).tolist(), abs=1e-9)
    mi = rows["mutual_information"]
    if point:
        assert mi == [0.0] * len(k) and rows["p_avg"] == rows["p_map"]
    else:
        assert min(mi) >= 0 and max(mi) > 0
        assert all(m <= h + 1e-9 for m, h in zip(mi, rows["entropy_avg"]))  # MI <= H(average)


def test_cli_fixed_label_set(tmp_path, capsys):
    model = tiny_model_dir(tmp_path / "model")
    (tmp_path / "map.json").write_text(json.dumps({"yes": " w5", "no": " w6", "maybe": " w7 w8"}))
    rows = [{"q": f"w{10 + i}", "y": ("yes", "no", "maybe")[i % 3], "speaker": f"spk{t}"}
            for t in range(2) for i in range(9)]
    (tmp_path / "l.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "fit"
    assert main(["fit", "--model", str(model), "--data", str(tmp_path / "l.jsonl"), "--prompt-column", "q",
                 "--label-column", "y", "--label-map", str(tmp_path / "map.json"), "--guide", "map",
                 "--output", str(out), *TINY]) == 0
    docs = load_documents(DataConfig(source=str(tmp_path / "l.jsonl"), prompt_column="q", label_column="y",
                                     label_map=str(tmp_path / "map.json"), task_column="speaker"))
    assert docs[2] == {"prompt": "w12", "choices": [" w5", " w6", " w7 w8"], "label": 2, "task": "spk0"}
    assert "rows" in json.loads((out / "metrics.json").read_text())["test"]["classification"]["map"]["overall"]
    assert main(["evaluate", str(out), "--quiet", "--device", "cpu", "--json", str(tmp_path / "ev.json")]) == 0
    ev = json.loads((tmp_path / "ev.json").read_text())["classification"]
    assert ev["point_fit"]
    cfg = DataConfig(source=str(tmp_path / "l.jsonl"), prompt_column="q", label_column="y",
                     label_map=str(tmp_path / "map.json"), task_column="speaker")
    check_rows(out, ev, split_documents(load_documents(cfg), cfg).test, point=True)
    # without a map the label set is the sorted labels, each its own text
    plain = load_documents(DataConfig(source=str(tmp_path / "l.jsonl"), prompt_column="q", label_column="y",
                                      task_column="speaker"))
    assert plain[0]["choices"] == ["maybe", "no", "yes"] and plain[0]["label"] == 2


def write_eval(path, p_map, labels, tasks, p_avg=None, mi=None, train_sizes=None):
    """A ``bora evaluate --json`` file with only what analysis/classification.py reads: the per-row outputs."""
    from bora.evaluation.metrics import entropy

    p_avg = p_map if p_avg is None else p_avg
    rows = {"task": list(tasks), "label": list(labels), "p_map": p_map, "p_avg": p_avg,
            "entropy_avg": [float(entropy(torch.tensor(p, dtype=torch.float64))) for p in p_avg],
            "mutual_information": [0.0] * len(labels) if mi is None else list(mi)}
    obj = {"classification": {"rows": rows, "point_fit": mi is None, "samples": 1 if mi is None else 10},
           "train_sizes": train_sizes}
    path.write_text(json.dumps(obj))
    return str(path)


def test_classification_analysis_on_synthetic_evaluations(tmp_path):
    mod = _analysis_classification()
    g = torch.Generator().manual_seed(0)
    tasks = ["a"] * 6 + ["b"] * 4 + ["c"] * 3
    labels = [i % 2 if t != "c" else i % 3 for i, t in enumerate(tasks)]
    width = [3 if t == "c" else 2 for t in tasks]  # rows with 2 and 3 choices
    sizes = {"a": 40, "b": 12, "c": 3}

    def probs(seed, right):
        """Random probabilities; ``right``: the correct choice gets 0.9 (else 0.3 of 2, or 0.2 of 3: wrong)."""
        out = []
        for y, k in zip(labels, width):
            if right is None:
                p = torch.softmax(torch.randn(k, generator=g), 0).tolist()
            else:
                p_y = 0.9 if right else (0.3 if k == 2 else 0.2)
                p = [(1 - p_y) / (k - 1)] * k
                p[y] = p_y
            out.append(p)
        return out
    good, bad, learned, ood = [], [], [], []
    for s in range(2):
        pm, pa = probs(s, None), probs(s, None)
        mi = [0.01 * (i % 4) for i in range(len(labels))]
        learned.append(write_eval(tmp_path / f"l{s}.json", pm, labels, tasks, pa, mi, sizes))
        good.append(write_eval(tmp_path / f"g{s}.json", probs(s, True), labels, tasks))
        bad.append(write_eval(tmp_path / f"b{s}.json", probs(s, False), labels, tasks))
        ood.append(write_eval(tmp_path / f"o{s}.json", probs(s, None)[:5], labels[:5], tasks[:5], probs(s, None)[:5],
                              [0.5 + i for i in range(5)]))
    out = tmp_path / "res" / "summary.json"
    r = mod.main(["--fits", "learned=" + ",".join(learned), "same=" + ",".join(learned), "good=" + ",".join(good),
                  "bad=" + ",".join(bad), "--ref", "learned", "--ood", "learned=" + ",".join(ood),
                  "--resamples", "300", "--out", str(out), "--plot", str(tmp_path / "ece.png")])
    assert out.exists() and out.with_suffix(".md").exists() and (tmp_path / "ece.png").exists()
    assert json.loads(out.read_text())["paired"] == json.loads(json.dumps(r["paired"]))
    for m in ("accuracy", "nll"):  # a setting against itself: exactly 0
        assert (r["paired"]["same"][m]["diff"], r["paired"]["same"][m]["lo"], r["paired"]["same"][m]["hi"]) == (0, 0, 0)
    # "good" is right with p 0.9 on every row, "bad" wrong on every row: the intervals exclude 0
    assert r["paired"]["good"]["nll"]["lo"] > 0 and r["paired"]["good"]["accuracy"]["hi"] < 0
    assert r["paired"]["bad"]["nll"]["hi"] < 0 and r["paired"]["bad"]["accuracy"]["lo"] > 0
    assert r["settings"]["bad"]["map"]["overall"]["accuracy"] == 0 and "learned MAP" in r["paired"]
    gb = mod.main(["--fits", "good=" + ",".join(good), "bad=" + ",".join(bad), "--resamples", "300",
                   "--out", str(tmp_path / "gb.json")])["paired"]["bad"]  # better on every row
    assert (gb["accuracy"]["lo"], gb["accuracy"]["hi"]) == (1.0, 1.0) and gb["nll"]["hi"] < 0
    # against a hand computation of the learned setting's overall numbers (mean over seeds of the mean over tasks)
    for kind, key in (("p_map", "map"), ("p_avg", "posterior_average")):
        per_seed = []
        for f in learned:
            rows = json.loads((tmp_path / f).read_text())["classification"]["rows"]
            width_ = max(len(p) for p in rows[kind])
            p = torch.tensor([q + [0.0] * (width_ - len(q)) for q in rows[kind]], dtype=torch.float64)
            m = classification_metrics(p, torch.tensor(labels), torch.tensor([ord(t) - 97 for t in tasks]),
                                       ("a", "b", "c"))
            per_seed.append(m["overall"])
        for k in ("accuracy", "nll", "ece", "brier"):
            assert r["settings"]["learned"][key]["overall"][k] == pytest.approx(sum(x[k] for x in per_seed) / 2)
    # ECE ratio: 1 for a point fit; the estimate inside its interval otherwise
    assert (r["settings"]["good"]["ece_ratio"]["lo"], r["settings"]["good"]["ece_ratio"]["hi"]) == (1.0, 1.0)
    er = r["settings"]["learned"]["ece_ratio"]
    assert er["ratio"] == pytest.approx(er["ece_avg"] / er["ece_map"]) and er["lo"] <= er["hi"]
    assert {t: v["train_rows"] for t, v in r["ece_by_size"].items()} == sizes
    # OOD rows have a larger mutual information than every test row: AUROC 1
    assert r["ood"]["learned"]["auroc_mi"] == 1.0 and [p["mi"] for p in r["ood"]["learned"]["per_seed"]] == [1.0, 1.0]
    assert 0 <= r["ood"]["learned"]["auroc_entropy"] <= 1
    with pytest.raises(SystemExit, match="same test rows"):
        mod.main(["--fits", "learned=" + ",".join(learned), "ood=" + ",".join(ood), "--out", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit, match="paired"):
        mod.main(["--fits", "learned=" + ",".join(learned), "one=" + good[0], "--out", str(tmp_path / "y.json")])


def test_classification_analysis_auroc_and_ece():
    mod = _analysis_classification()
    # hand case: OOD 0.5 ties one in-distribution 0.5 (half), beats 0.1, 0.2 and 0.5's other pairs
    assert mod.rank_auroc([0.1, 0.2, 0.5], [0.5, 0.9]) == pytest.approx(5.5 / 6)
    assert mod.rank_auroc([1.0, 1.0], [1.0]) == 0.5 and mod.rank_auroc([0.0, 0.1], [0.2, 0.3]) == 1.0
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 5, 40) / 4, rng.integers(1, 6, 30) / 4  # many ties
    assert mod.auroc(a, b)[0] == pytest.approx(mod.rank_auroc(a, b))
    assert mod.auroc([0.0, 0.1], [3.0, 4.0])[0] == 1.0
    conf, hit = rng.uniform(0.3, 1, (2, 50)), rng.integers(0, 2, (2, 50)).astype(float)
    idx = rng.integers(0, 50, (4, 50))
    got = mod.ece_resampled(conf, hit, idx, 15)
    for k in range(2):
        for r in range(4):
            want = expected_calibration_error(torch.tensor(conf[k, idx[r]]), torch.tensor(hit[k, idx[r]]) > 0, 15)
            assert got[k, r] == pytest.approx(want, abs=1e-12)


def test_ece_floor_against_the_binomial_expectation():
    """Every row with probabilities (0.7, 0.3) falls in one bin; labels drawn from them make the hits
    Binomial(n, 0.7), so the task's expected ECE is E|0.7 n - H| / n exactly. A sure, right predictor has floor 0."""
    from scipy.stats import binom

    mod = _analysis_classification()
    for n in (5, 40):
        p = np.tile([0.7, 0.3], (n, 1))
        k = np.arange(n + 1)
        exact = float((binom.pmf(k, n, 0.7) * np.abs(0.7 * n - k)).sum() / n)
        got = mod.ece_floor(p, np.zeros(n, dtype=np.int64), 1, 15, draws=20000)
        assert got == pytest.approx(exact, rel=0.03)
    two_tasks = np.array([0] * 5 + [1] * 40)
    both = mod.ece_floor(np.tile([0.7, 0.3], (45, 1)), two_tasks, 2, 15, draws=20000)
    small = mod.ece_floor(np.tile([0.7, 0.3], (5, 1)), np.zeros(5, dtype=np.int64), 1, 15, draws=20000)
    assert both < small  # the mean over tasks: the 40-row task's floor is lower
    assert mod.ece_floor(np.tile([1.0, 0.0], (10, 1)), np.zeros(10, dtype=np.int64), 1, 15) == 0.0
