"""The report folder: every plot written and not blank, index.md, summary, report.json; from a saved fit too."""

import json
import math
import re

import numpy as np
import pytest

from bora.api import Bora
from bora.core.config import AdapterConfig, BoraConfig, FitConfig, PriorConfig
from bora.diagnostics import pooling
from bora.diagnostics.inference_data import load_idata
from bora.cli.commands import main_report
from bora.diagnostics.report import PLOTS, write_report

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
    summ = (out / "summary.csv").read_text()
    assert all(f"{v}[{t}]" in summ for v in ("pooling_factor", "effective_parameters", "delta_w_ratio") for t in tasks)
    rep = json.loads((out / "report.json").read_text())
    assert "spearman" in rep and (isinstance(rep["spearman"], float) or rep["spearman"] == "nan")
    assert set(rep["per_task"]) == set(tasks) and rep["draws"] == draws
    idata = load_idata(out / "diagnostics.nc")
    post = idata.posterior
    assert post.sizes["draw"] == draws
    assert post["task"].values.tolist() == list(tasks)
    const = idata.constant_data
    tau_varies = draws > 1 and np.ptp(post["tau"].values) > 0
    assert rep["tau_varies"] == tau_varies
    for i, t in enumerate(tasks):  # report.json carries the InferenceData's posterior means
        d = rep["per_task"][t]
        for var in ("pooling_factor", "effective_parameters", "delta_w_ratio", "delta_w_identified"):
            assert d[var] == pytest.approx(float(post[var].values[0, :, i].mean()), rel=1e-9)
            x = post[var].values[0]
            if draws == 1 or np.all(x == x[:1]):  # the same in every draw: no (zero-width) interval
                assert d[var + "_hdi"] is None and not rep["intervals"][var]
            else:
                lo, hi = d[var + "_hdi"]
                assert lo - 1e-12 <= d[var] <= hi + 1e-12 and rep["intervals"][var]
        if not tau_varies:  # the pooling factor and gamma vary only through tau
            assert d["pooling_factor_hdi"] is None and d["effective_parameters_hdi"] is None
        for var in ("delta_w_ratio_point", "delta_w_identified_point", "identified_coords"):
            assert d[var] == pytest.approx(float(const[var].values[i]), rel=1e-12)
        assert d["shrinkage_coord_mean"] == pytest.approx(float(post["shrinkage"].values[0, :, i].mean()))
        assert d["fit_ppl"] > 1 and d["base_ppl"] > 1
    # the per-task table: the new summaries, intervals only with draws, one line on how to read each
    table = index.split("## per task", 1)[1]
    assert "pooling λᶠ" in table and "eff. params γ" in table and "ΔW dev." in table
    assert "identified ΔW dev." in table and "identified coords" in table
    assert table.count("- **") >= 5
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in table.splitlines()
            if line.startswith("| ") and not line.startswith("| task |")}
    assert set(rows) == set(tasks), (list(rows), table)
    for t in tasks:  # brackets exactly where a shown quantity varies between draws
        d = rep["per_task"][t]
        shown = [d[v + "_hdi"] for v in ("pooling_factor", "effective_parameters", "delta_w_identified")]
        assert (" [" in "".join(rows[t])) == any(h is not None for h in shown)
    first = rows[tasks[0]]
    # λᶠ and γ (columns 3, 4) carry brackets only when tau varies between draws; the ΔW column is the point estimate
    assert ("[" in first[3]) == ("[" in first[4]) == tau_varies
    assert ("no HDI for λᶠ, γ" in table) == (draws > 1 and not tau_varies)
    for i, t in enumerate(tasks):
        assert float(rows[t][5]) == pytest.approx(rep["per_task"][t]["delta_w_ratio_point"], abs=6e-4)
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
    indep = {"task0": 3.0, "task1": 3.2, "task2": 9.0}  # an independent fit's test NLL per task
    rep = write_report(bora, tmp_path / "report", train=train, test=test, draws=20, independent=indep,
                       progress=False)
    check_report(tmp_path / "report", train.tasks, draws)
    assert rep["perplexity_source"] == "evaluated"
    assert rep["spearman_between"] == ["train_tokens", "pooling_factor"]
    assert rep["spearman"] == pytest.approx(pooling.spearman(train.task_tokens().numpy(),
                                                       [rep["per_task"][t]["pooling_factor"] for t in train.tasks]))
    for t in train.tasks:
        d = rep["per_task"][t]
        want = pooling.gain_kept(math.log(d["base_ppl"]), math.log(d["fit_ppl"]), indep[t])
        assert (math.isnan(want) and math.isnan(d["gain_kept"])) or d["gain_kept"] == pytest.approx(float(want))
    assert "gain kept" in (tmp_path / "report" / "index.md").read_text()
    if guide == "meanfield":  # posterior draws of the adapters: the function-space deviation has an interval
        lo, hi = rep["per_task"]["task0"]["delta_w_ratio_hdi"]
        assert lo < hi
    else:  # a MAP fit: one draw, the point estimate; no interval anywhere
        assert all(d[k] is None for d in rep["per_task"].values() for k in d if k.endswith("_hdi"))
    # the point deviation is delta_w_ratio at the point estimate
    vals = bora.point()
    want = pooling.delta_w_ratio(bora.model.params_from_values(vals), bora.model.global_from_values(vals))
    np.testing.assert_allclose([rep["per_task"][t]["delta_w_ratio_point"] for t in train.tasks], want, rtol=1e-9)


def test_main_report_from_saved_fit(tmp_path, capsys):
    from bora.cli.main import main

    model, data = tiny_model_dir(tmp_path / "model"), write_jsonl(tmp_path / "data.jsonl")
    fit_dir = tmp_path / "fit"
    rc = main(["fit", "--model", str(model), "--data", str(data), "--task-column", "speaker", "--targets",
               "q_proj", "v_proj", "--layers", "-1", "--rank", "2", "--steps", "4", "--batch-size", "4",
               "--lr", "0.02", "--fisher-docs", "4", "--output", str(fit_dir), "--quiet", "--device", "cpu"])
    assert rc == 0
    assert (fit_dir / "laplace.safetensors").exists()  # the default guide: MAP + Laplace posterior
    out = main_report(fit_dir, device="cpu", draws=30, progress=False)
    assert out == fit_dir / "report"
    rep = check_report(out, ("spk0", "spk1", "spk2"), 30)  # a MAP fit's report has posterior draws
    assert all(d["delta_w_ratio_hdi"][0] < d["delta_w_ratio_hdi"][1] for d in rep["per_task"].values())
    if not rep["tau_varies"]:  # a point tau: the pooling factor and gamma have no (zero-width) interval
        index = (out / "index.md").read_text()
        assert all(d["pooling_factor_hdi"] is None for d in rep["per_task"].values())
        assert "no HDI for λᶠ, γ" in index
    assert rep["perplexity_source"] == "metrics.json"
    metrics = json.loads((fit_dir / "metrics.json").read_text())
    for t, d in rep["per_task"].items():
        assert d["fit_ppl"] == pytest.approx(metrics["test"]["fit"]["per_task"][t]["ppl"])
    assert np.isfinite(rep["spearman"])


# ----------------------------------------------------------------------------- plots
def test_importing_bora_does_not_switch_the_matplotlib_backend():
    import subprocess
    import sys

    code = ("import matplotlib; matplotlib.use('svg'); "
            "import bora.diagnostics.report, bora.diagnostics.plots, bora.diagnostics.inference_data; "
            "import matplotlib.pyplot as plt; print(matplotlib.get_backend()); "
            "from bora.diagnostics.plots import perplexity_bars; import tempfile, os; "
            "perplexity_bars(['a'], [2.0], [1.5], os.path.join(tempfile.mkdtemp(), 'p.png')); "
            "print(len(plt.get_fignums()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["svg", "0"]  # the user's backend is kept, no figure is left open in pyplot


def test_size_plot_labels_do_not_overlap():
    from bora.diagnostics.plots import size_figure

    tasks = [f"corpus/Character {i}" for i in range(16)]
    sizes = np.r_[np.linspace(900, 1100, 8), np.geomspace(2e3, 4e5, 8)]  # a crowded cluster and a spread
    lam = np.r_[np.full(8, 0.95) + np.linspace(0, 1e-3, 8), np.linspace(0.97, 0.9, 8)]
    fig = size_figure(tasks, sizes, lam, lo=lam - 0.004, hi=lam + 0.004, rho=-0.8)
    ax = fig.axes[0]
    r = fig.canvas.get_renderer()
    labels = [t for t in ax.texts if t.get_text()]  # (leader lines are annotations without text)
    boxes = [t.get_window_extent(r) for t in labels]
    assert [t.get_text() for t in labels] == [f"Character {i}" for i in range(16)]
    assert not any(boxes[i].overlaps(boxes[j]) for i in range(16) for j in range(i + 1, 16))
    for axis in (ax.xaxis, ax.yaxis):
        ticks = [t for t in axis.get_ticklabels(which="both") if t.get_visible() and t.get_text()]
        tb = [t.get_window_extent(r) for t in ticks]
        assert len(tb) >= 2 and not any(tb[i].overlaps(tb[j]) for i in range(len(tb)) for j in range(i + 1, len(tb)))


def test_forest_is_arviz_sorted_by_size():
    import sys

    from bora.diagnostics.plots import forest_figure

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from test_diagnostics import _random_idata

    idata = _random_idata(False, S=6)
    rng = np.random.default_rng(0)
    for var in ("pooling_factor", "effective_parameters", "delta_w_ratio"):
        idata.posterior[var] = idata.posterior["shrinkage"].copy(data=rng.random((1, 6, 3)))
    fig = forest_figure(idata, sizes=[20, 90, 41])  # tasks a, b, c
    assert len(fig.axes) == 3
    ax = fig.axes[0]
    labels = [t.get_text() for t in sorted(ax.get_yticklabels(), key=lambda t: -t.get_position()[1])]
    assert labels == ["b (n=90)", "c (n=41)", "a (n=20)"]  # largest training set at the top
    # one HDI line per task from arviz: the x extent of each row's line covers the posterior draws' HDI
    assert len(ax.lines) >= 3
