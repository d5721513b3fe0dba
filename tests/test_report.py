"""The report folder: every plot written and not blank, index.md, summary, report.json; from a saved fit too."""

import json
import math
import re

import numpy as np
import pytest

from bora.api import Bora
from bora.config import AdapterConfig, BoraConfig, FitConfig, PriorConfig
from bora.diagnostics import load_idata
from bora.report import PLOTS, main_report, write_report

from conftest import TinyTokenizer, task_data, tiny_llama, tiny_model_dir, write_jsonl


def check_report(out, tasks, draws):
    import matplotlib.image as mpimg

    for name in PLOTS:
        img = mpimg.imread(out / name)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100, name
        assert float(img[..., :3].var()) > 1e-3, f"{name} looks blank"
    index = (out / "index.md").read_text()
    linked = set(re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", index))
    assert linked == set(PLOTS)
    assert (out / "summary.md").read_text().startswith("# az.summary")
    assert "shrinkage[" in (out / "summary.csv").read_text()
    rep = json.loads((out / "report.json").read_text())
    assert "spearman" in rep and (isinstance(rep["spearman"], float) or rep["spearman"] == "nan")
    assert set(rep["per_task"]) == set(tasks) and rep["draws"] == draws
    for d in rep["per_task"].values():
        assert 0 <= d["shrinkage"] <= 1 and d["fit_ppl"] > 1 and d["base_ppl"] > 1
    idata = load_idata(out / "diagnostics.nc")
    assert idata.posterior.sizes["draw"] == draws
    assert idata.posterior["task"].values.tolist() == list(tasks)
    return rep


@pytest.mark.parametrize("guide", ["map", "meanfield"])
def test_write_report_in_memory(tmp_path, guide):
    cfg = BoraConfig(model="tiny", adapter=AdapterConfig(rank=2, targets=("q_proj", "v_proj"), layers=(-1,)),
                     prior=PriorConfig(tau_mode="learned", tau=10.0),
                     fit=FitConfig(steps=6, batch_size=8, lr=2e-2, fisher_docs=4, patience=0, warmup=0.0,
                                   guide=guide, eval_every=3))
    train, val, test = task_data((24, 10, 5), seed=1), task_data((6, 4, 3), seed=2), task_data((6, 4, 3), seed=3)
    bora = Bora(cfg, tiny_llama(layers=2), TinyTokenizer(), train.tasks, len(train))
    bora.fit(train, val, progress=False)
    draws = 20 if guide == "meanfield" else 1
    rep = write_report(bora, tmp_path / "report", train=train, test=test, draws=20, progress=False)
    check_report(tmp_path / "report", train.tasks, draws)
    assert rep["perplexity_source"] == "evaluated"
    assert rep["spearman_between"] == ["train_tokens", "shrinkage"]
    assert math.isnan(rep["spearman"]) or -1 <= rep["spearman"] <= 1
    if guide == "meanfield":
        lo, hi = rep["per_task"]["task0"]["shrinkage_hdi"]
        assert lo < hi  # posterior draws give intervals


def test_main_report_from_saved_fit(tmp_path, capsys):
    from bora.cli import main

    model, data = tiny_model_dir(tmp_path / "model"), write_jsonl(tmp_path / "data.jsonl")
    fit_dir = tmp_path / "fit"
    rc = main(["fit", "--model", str(model), "--data", str(data), "--task-column", "speaker", "--targets",
               "q_proj", "v_proj", "--layers", "-1", "--rank", "2", "--steps", "4", "--batch-size", "4",
               "--lr", "0.02", "--fisher-docs", "4", "--output", str(fit_dir), "--quiet", "--device", "cpu"])
    assert rc == 0
    out = main_report(fit_dir, device="cpu", progress=False)
    assert out == fit_dir / "report"
    rep = check_report(out, ("spk0", "spk1", "spk2"), 1)
    assert rep["perplexity_source"] == "metrics.json"
    metrics = json.loads((fit_dir / "metrics.json").read_text())
    for t, d in rep["per_task"].items():
        assert d["fit_ppl"] == pytest.approx(metrics["test"]["fit"]["per_task"][t]["ppl"])
    assert np.isfinite(rep["spearman"])
