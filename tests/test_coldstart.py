"""Cold start: tasks not in the fit scored under the global adapter (``bora evaluate FIT --data FILE``), and the
fitted tasks with 1-2 training documents reported apart (``bora fit`` / ``bora evaluate``)."""

import json

import pytest
import torch

from bora.cli.main import main

from conftest import tiny_model_dir, write_jsonl

SIZES = (20, 10, 4, 3)  # spk2: 2 training documents, spk3: 1 (the 1-2 cold-start bucket)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    d = tmp_path_factory.mktemp("coldstart")
    model, data = tiny_model_dir(d / "model"), write_jsonl(d / "data.jsonl", sizes=SIZES)
    out = d / "fit"
    argv = ["fit", "--model", str(model), "--data", str(data), "--task-column", "speaker", "--targets", "q_proj",
            "v_proj", "--layers", "-1", "--rank", "2", "--steps", "6", "--batch-size", "4", "--lr", "0.05",
            "--tau-mode", "learned", "--output", str(out), "--quiet", "--device", "cpu"]
    return d, out, argv


def _load(out):
    from bora.api import Bora

    return Bora.load(out, device="cpu")


def _theta(bora):
    """The global adapter straight from the fit's point estimate (not through the cold-start code)."""
    return bora.model.global_from_values(bora.point())


def _split(bora, docs, tasks):
    from bora.data.documents import tokenize_split

    cfg = bora.config.data
    return tokenize_split(docs, tasks, bora.tokenizer, cfg.max_length, cfg.long_documents)


def test_fit_reports_the_tasks_with_one_or_two_training_documents(fitted, capsys):
    from bora.evaluation.evaluate import evaluate

    d, out, argv = fitted
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "cold start (1-2 training documents): 2 tasks" in text and "global ppl" in text
    tiny = json.loads((out / "metrics.json").read_text())["test"]["tiny_tasks"]
    assert tiny["tasks"] == ["spk2", "spk3"] and tiny["train_docs"] == [1, 2]
    assert [tiny["per_task"][t]["train_docs"] for t in ("spk2", "spk3")] == [2, 1]
    assert f"{tiny['global_ppl']:>10.3f}" in text and f"{tiny['fit_ppl']:>9.3f}" in text
    # its "global adapter" numbers: the test documents of those tasks under Theta, scored directly
    from bora.api import load_data

    bora = _load(out)
    test = load_data(bora.config, bora.tokenizer, tasks=bora.tasks)["test"]
    rows = [i for i, t in enumerate(test.task_ids.tolist()) if bora.tasks[t] in ("spk2", "spk3")]
    direct = evaluate(bora.model, _theta(bora), bora.feed(test.subset(rows)))
    for t in ("spk2", "spk3"):
        assert tiny["per_task"][t]["global_ppl"] == pytest.approx(direct["per_task"][t]["ppl"], rel=1e-5)
    assert tiny["global_ppl"] == pytest.approx(direct["overall"]["ppl_task_mean"], rel=1e-5)
    # bora evaluate reports them too, with the same numbers
    assert main(["evaluate", str(out), "--quiet", "--device", "cpu", "--json", str(d / "ev.json")]) == 0
    again = capsys.readouterr().out
    assert "cold start (1-2 training documents): 2 tasks" in again
    ev = json.loads((d / "ev.json").read_text())
    assert ev["tiny_tasks"]["global_ppl"] == pytest.approx(tiny["global_ppl"], rel=1e-6)
    assert ev["tiny_tasks"]["fit_ppl"] == pytest.approx(tiny["fit_ppl"], rel=1e-6)


def _file_rows(bora):
    """The fit's own test documents of spk0 and spk1, and two documents each of two tasks not in the fit."""
    from bora.data.documents import load_documents, split_documents

    test = [d for d in split_documents(load_documents(bora.config.data), bora.config.data).test
            if d["task"] in ("spk0", "spk1")]
    new = [{"text": "w0 w7 w0 w9 w0 w11", "task": "newA"}, {"text": "w0 w8 w0 w12 w0", "task": "newA"},
           {"text": "w3 w20 w3 w21 w3 w22 w3", "task": "newB"}, {"text": "w3 w30 w3", "task": "newB"}]
    return test, new


def test_evaluate_a_file_with_tasks_not_in_the_fit(fitted, capsys):
    d, out, argv = fitted
    if not (out / "metrics.json").exists():
        assert main(argv) == 0
    bora = _load(out)
    known, new = _file_rows(bora)
    path = d / "new.jsonl"
    path.write_text("".join(json.dumps({"text": r["text"], "speaker": r["task"]}) + "\n" for r in known + new))
    capsys.readouterr()
    rc = main(["evaluate", str(out), "--data", str(path), "--samples", "3", "--json", str(d / "new.json"),
               "--quiet", "--device", "cpu"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "cold start: 2 tasks not in the fit, served by the global adapter" in text and "pred. S=3" in text
    res = json.loads((d / "new.json").read_text())
    # known tasks: as the fit scored the same documents
    metrics = json.loads((out / "metrics.json").read_text())["test"]["fit"]["per_task"]
    for t in ("spk0", "spk1"):
        assert res["fit"]["per_task"][t]["nll"] == pytest.approx(metrics[t]["nll"], rel=1e-5)
        assert res["fit"]["per_task"][t]["docs"] == metrics[t]["docs"]
    assert set(res["fit"]["per_task"]) == {"spk0", "spk1"}
    # new tasks: their own block, scored under Theta (checked against the adapter taken from the point estimate)
    nt = res["new_tasks"]
    assert nt["tasks"] == ["newA", "newB"] and nt["documents"] == 4 and nt["samples"] == 3
    direct = bora.evaluate(_split(bora, new, ("newA", "newB")), adapter=_theta(bora))
    base = bora.evaluate(_split(bora, new, ("newA", "newB")), base=True)
    for t in ("newA", "newB"):
        assert nt["global"]["per_task"][t]["nll"] == pytest.approx(direct["per_task"][t]["nll"], rel=1e-5)
        assert nt["base"]["per_task"][t]["nll"] == pytest.approx(base["per_task"][t]["nll"], rel=1e-5)
        sp = nt["posterior_spread"][t]
        assert sp["lo"] <= sp["median"] <= sp["hi"]
    assert f"{nt['global']['overall']['ppl_task_mean']:>10.3f}" in text
    assert nt["predictive"]["overall"]["ppl_task_mean"] > 0
    # the API gives the same Theta, and the predictive's draws are the ones `bora sample` makes for a new task
    for key, (A, B) in bora.global_adapter().items():
        assert torch.allclose(A, _theta(bora)[key][0]) and torch.allclose(B, _theta(bora)[key][1])
    from bora.evaluation.evaluate import doc_loglik

    post = bora.posterior(3, seed=0)
    split = _split(bora, new, ("newA", "newB"))
    feed = bora.feed(split, any_tasks=True)
    ll = torch.stack([doc_loglik(bora.model, {k: (torch.stack([post.new_task_adapter(s, t)[k][0] for t in split.tasks]),
                                                  torch.stack([post.new_task_adapter(s, t)[k][1] for t in split.tasks]))
                                              for k in bora.model.shapes}, feed)[0] for s in range(3)]).double()
    nll_a = float(-(torch.logsumexp(ll[:, :2], 0) - torch.log(torch.tensor(3.0))).sum() / split.task_tokens()[0])
    assert nt["predictive"]["per_task"]["newA"]["nll"] == pytest.approx(nll_a, rel=1e-5)


def test_evaluate_a_file_of_new_tasks_only(fitted, capsys):
    d, out, argv = fitted
    if not (out / "metrics.json").exists():
        assert main(argv) == 0
    path = d / "only_new.jsonl"
    path.write_text(json.dumps({"text": "w1 w2 w3 w4", "speaker": "zz"}) + "\n")
    capsys.readouterr()
    assert main(["evaluate", str(out), "--data", str(path), "--json", str(d / "o.json"), "--quiet",
                 "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "0 documents of 0 task(s) in the fit, 1 documents of 1 task(s) not in the fit" in text
    assert "cold start: 1 task not in the fit" in text and "tau:" in text
    res = json.loads((d / "o.json").read_text())
    assert res["new_tasks"]["predictive"] is None and "fit" not in res


@pytest.mark.parametrize("content,extra,msg", [
    ('{"body": "w1 w2 w3", "speaker": "a"}\n', [], "text column 'text' not found"),
    ('{"text": "w1 w2 w3", "who": "a"}\n', [], "task column 'speaker' not found"),
    ('{"text": "   ", "speaker": "a"}\n', [], "no documents"),
    ('{"text": "w1", "speaker": "a"}\n', [], "no document of"),
    ('{"text": "w1 w2 w3", "speaker": "a"}\n', ["--split", "val"], "give one of them"),
    (None, [], "data file not found"),
])
def test_bad_data_files_are_one_line_errors(fitted, capsys, content, extra, msg):
    d, out, argv = fitted
    if not (out / "metrics.json").exists():
        assert main(argv) == 0
    path = d / "bad.jsonl"
    if content is None:
        path = d / "missing.jsonl"
    else:
        path.write_text(content)
    capsys.readouterr()
    rc = main(["evaluate", str(out), "--data", str(path), "--quiet", "--device", "cpu"] + extra)
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("bora: error:") and "\n" not in err and msg in err, err


def test_classification_rows_of_new_tasks_are_refused(tmp_path):
    from types import SimpleNamespace

    from bora.core.config import BoraConfig, ConfigError, DataConfig
    from bora.posterior.coldstart import read_new_documents

    from conftest import tiny_tokenizer

    path = tmp_path / "mc.jsonl"
    path.write_text("".join(json.dumps({"q": "w1 w2", "choices": ["w3", "w4"], "answer": 0, "task": t}) + "\n"
                            for t in ("a", "a", "b")))
    cfg = BoraConfig(data=DataConfig(source=str(path), prompt_column="q", choices_column="choices",
                                     label_column="answer"))
    fit = SimpleNamespace(config=cfg, tasks=("a",), tokenizer=tiny_tokenizer())
    with pytest.raises(ConfigError, match="classification rows of tasks not in the fit"):
        read_new_documents(fit, path)
    path.write_text(path.read_text().replace('"b"', '"a"'))
    known, new = read_new_documents(fit, path)  # the fitted tasks' rows alone are fine
    assert new is None and known.is_classification and len(known) == 3
