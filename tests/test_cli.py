"""The command line as a user runs it: fit, evaluate, and one-line errors with a non-zero exit."""

import json

import pytest

from bora.cli.main import main

from conftest import tiny_model_dir, write_jsonl


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    return tiny_model_dir(d / "model"), write_jsonl(d / "data.jsonl"), d


def test_fit_then_evaluate(setup, capsys):
    model, data, d = setup
    out = d / "fit"
    rc = main(["fit", "--model", str(model), "--data", str(data), "--task-column", "speaker", "--targets", "q_proj",
               "v_proj", "--layers", "-1", "--rank", "2", "--steps", "6", "--batch-size", "4", "--lr", "0.02",
               "--tau-mode", "learned", "--output", str(out), "--quiet", "--device", "cpu"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "overall: exp(mean per-task NLL)" in text and "spk0" in text and "tau: tau=" in text
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["data"]["task_column"] == "speaker" and cfg["adapter"]["layers"] == [-1]
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["test"]["fit"]["per_task"]) == {"spk0", "spk1", "spk2"}
    rc = main(["evaluate", str(out), "--quiet", "--device", "cpu"])
    again = capsys.readouterr().out
    assert rc == 0
    want = metrics["test"]["fit"]["overall"]["ppl_task_mean"]
    assert f"{want:>9.3f}" in again  # evaluate reproduces the fit's test perplexity
    # a Laplace fit (the default guide): the document-level BMA by the tilted estimator, the plain one beside it
    assert main(["evaluate", str(out), "--samples", "3", "--quiet", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "plain log-mean-exp over samples" in text and "effective sample size median" in text
    assert main(["evaluate", str(out), "--samples", "3", "--doc-estimator", "plain", "--quiet", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "BMA (S=3)" in text and "plain log-mean-exp" not in text


@pytest.mark.parametrize("args,msg", [
    (["--data", "missing.jsonl"], "data file not found"),
    (["--task-column", "nope"], "nope"),
    (["--tau", "-1"], "tau must be"),
    (["--targets", "zz_proj"], "no module matches"),
    (["--layers", "x"], "--layers takes integers"),
    (["--load-in-4bit", "--device", "cpu"], "4bit quantised base model needs a CUDA GPU"),
    (["--load-in-8bit", "--device", "cpu"], "8bit quantised base model needs a CUDA GPU"),
    (["--load-in-8bit", "--load-in-4bit"], "exclude each other"),
])
def test_user_errors_are_one_line(setup, capsys, args, msg):
    model, data, d = setup
    base = ["fit", "--model", str(model), "--data", str(data), "--task-column", "speaker", "--steps", "1",
            "--layers", "-1", "--output", str(d / "err"), "--quiet"]
    rc = main(base + args)
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert msg in err and err.startswith("bora: error:") and "\n" not in err
    assert not (d / "err").exists()


def test_evaluate_missing_folder(capsys, tmp_path):
    assert main(["evaluate", str(tmp_path / "nothing")]) == 2
    assert "fit folder not found" in capsys.readouterr().err


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    text = capsys.readouterr().out
    for flag in ("--tau-mode", "--rank", "--targets", "--layers", "--lr", "--batch-size", "--seed", "--output",
                 "--text-column", "--task-column", "--guide", "--steps", "--epochs", "--model", "--data"):
        assert flag in text
