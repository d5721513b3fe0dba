"""A diagnostics report of a fit: ArviZ summary, PNG plots, ``index.md``, ``report.json``.

>>> from bora.report import markdown_table
>>> print(markdown_table(["task", "λ"], [["a", 0.25], ["b", 0.5]]))
| task | λ |
|---|---|
| a | 0.25 |
| b | 0.5 |

From a saved fit (``bora report FIT_DIR`` on the command line)::

    main_report("runs/shakespeare")                  # writes runs/shakespeare/report/
    write_report(bora, "out", train=train, test=test, draws=200)   # from a Bora in memory

The folder holds ``index.md`` (every plot with a one-line explanation and a per-task table),
``summary.md`` / ``summary.csv`` (``az.summary`` of tau, shrinkage, deviation and global norms),
``diagnostics.nc`` (the full :mod:`bora.diagnostics` InferenceData), ``report.json`` (per-task
numbers and the Spearman rank correlation between training tokens and shrinkage) and the PNGs:
``shrinkage_forest.png``, ``shrinkage_vs_size.png``, ``tau.png``, ``training_curve.png``,
``perplexity.png`` and ``deviation_heatmap.png``. The Fisher pass over the training split
(``fisher_docs`` documents per task) is the slow step; the training and test splits are reloaded
from the fit's data config unless given.
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from . import diagnostics as D
from . import plots
from .io import check_output, make_temp_dir, replace_dir, write_json

__all__ = ["write_report", "main_report", "markdown_table", "PLOTS"]

# file name -> (title, one-line explanation shown under the image in index.md)
PLOTS = {
    "shrinkage_forest.png": (
        "Shrinkage per task",
        "Per-task shrinkage λ_t = τ/(τ+F_t): 1 means the task's adapter is pulled all the way to the global "
        "adapter, 0 means its own data alone decide (bars: HDI when there are posterior draws)."),
    "shrinkage_vs_size.png": (
        "Shrinkage against task size",
        "Shrinkage against the task's number of training tokens: tasks with more data should be shrunk less "
        "(negative Spearman ρ)."),
    "tau.png": (
        "Prior precision τ",
        "Prior precision τ of the task adapters around the global adapter: the point estimate (MAP) or its "
        "posterior (mean-field draws)."),
    "training_curve.png": (
        "Training curve",
        "Training NLL per token and validation perplexity against optimisation step (and τ when it was "
        "re-estimated during the fit)."),
    "perplexity.png": (
        "Test perplexity: base model vs fit",
        "Per-task held-out perplexity of the base model and of the fit (percent change next to each bar)."),
    "deviation_heatmap.png": (
        "Task deviations per module",
        "Frobenius norm of each task's deviation θ_t − Θ from the global adapter, per adapted module (where "
        "the tasks differ)."),
}


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A GitHub-flavoured markdown table (floats with 4 significant digits)."""
    def cell(x):
        if isinstance(x, float):
            return "nan" if math.isnan(x) else f"{x:.4g}"
        return str(x)

    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)


def _num(x) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def _perplexities(bora, tasks, test, load, progress: bool) -> tuple[list, list, str]:
    """Per-task test perplexity (base, fit): from ``bora.metrics['test']`` or evaluated now."""
    m = (bora.metrics or {}).get("test") or {}
    if test is None and isinstance(m.get("base"), dict) and isinstance(m.get("fit"), dict):
        base, fit, src = m["base"], m["fit"], "metrics.json"
    else:
        split = test if test is not None else load()["test"]
        if progress:
            print(f"evaluating base model and fit on the test split ({len(split)} documents)", flush=True)
        feed = bora.feed(split, progress=progress, desc="caching frozen layers (test)")
        base, fit, src = bora.evaluate(feed, base=True), bora.evaluate(feed), "evaluated"
    get = lambda s, t: _num((s.get("per_task") or {}).get(t, {}).get("ppl"))  # noqa: E731
    return [get(base, t) for t in tasks], [get(fit, t) for t in tasks], src


def write_report(bora, out_dir, *, train=None, test=None, fisher_docs: Optional[int] = None, draws: int = 200,
                 seed: int = 0, hdi_prob: float = 0.94, progress: bool = True) -> dict:
    """Write the report folder for ``bora`` (a fitted :class:`~bora.api.Bora`); returns ``report.json``'s content.

    ``train`` / ``test`` are :class:`~bora.data.TokenizedSplit` (default: reloaded with
    :func:`bora.api.load_data`); the test split is only needed when ``bora.metrics`` has no test
    evaluation. ``draws`` posterior draws are used for a mean-field fit (a MAP fit has one).
    The folder is written into a temporary sibling and renamed into place; an existing ``out_dir``
    must be empty or an earlier bora report (anything else is refused with a ConfigError).
    """
    out = Path(out_dir)
    check_output(out, "report")
    tmp = make_temp_dir(out.parent, f".{out.name}.tmp-")
    try:
        report = _write_report(bora, tmp, out, train=train, test=test, fisher_docs=fisher_docs, draws=draws,
                               seed=seed, hdi_prob=hdi_prob, progress=progress)
        replace_dir(tmp, out, "report")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return report


def _write_report(bora, out: Path, shown: Path, *, train, test, fisher_docs, draws, seed, hdi_prob, progress) -> dict:
    t0 = time.perf_counter()
    cache: dict = {}

    def load():
        if "data" not in cache:
            from .api import load_data

            if progress:
                print("loading and tokenizing the fit's data", flush=True)
            cache["data"] = load_data(bora.config, bora.tokenizer, tasks=bora.tasks)
        return cache["data"]

    if train is None:
        train = load()["train"]
    idata = D.diagnose(bora, train=train, fisher_docs=fisher_docs, draws=draws, seed=seed, progress=progress)
    with D._quiet_arviz():
        idata.to_netcdf(str(out / "diagnostics.nc"))

    table = D.task_table(idata, hdi_prob=hdi_prob)
    tasks = table["task"]
    tokens = np.asarray(table["train_tokens"], dtype=float)
    use_tokens = bool(np.all(tokens > 0))
    sizes = tokens if use_tokens else np.asarray(table["train_docs"], dtype=float)
    size_name = "train_tokens" if use_tokens else "train_docs"
    rho = D.spearman(sizes, table["shrinkage"])

    summ = D.summary(idata, hdi_prob=hdi_prob)
    summ.to_csv(out / "summary.csv")
    cols = list(summ.columns)
    (out / "summary.md").write_text(
        "# az.summary\n\n" + markdown_table(["variable"] + cols, [[i] + [_num(v) for v in row]
                                                                  for i, row in zip(summ.index, summ.values)]) + "\n")

    base_ppl, fit_ppl, ppl_src = _perplexities(bora, tasks, test, load, progress)
    post = idata.posterior
    tau_draws = post["tau"].values.reshape(post.sizes["chain"] * post.sizes["draw"], -1)
    modules = [str(m) for m in post["module"].values]
    mode = bora.config.prior.tau_mode
    history = list(bora.result.history) if bora.result is not None else []

    if progress:
        print(f"drawing plots into {shown}", flush=True)
    plots.shrinkage_forest(tasks, table["shrinkage"], table["shrinkage_lo"], table["shrinkage_hi"],
                           out / "shrinkage_forest.png", sizes=table["train_docs"],
                           hdi_prob=hdi_prob if table["draws"] > 1 else None,
                           title=f"Per-task shrinkage factor ({mode}, {bora.config.fit.guide})")
    plots.shrinkage_vs_size(tasks, sizes, table["shrinkage"], out / "shrinkage_vs_size.png",
                            lo=table["shrinkage_lo"], hi=table["shrinkage_hi"], rho=rho,
                            xlabel=("training tokens" if use_tokens else "training documents") + " (log scale)")
    plots.tau_plot(tau_draws, out / "tau.png", modules=modules if tau_draws.shape[1] > 1 else None, mode=mode)
    plots.training_curve(history, out / "training_curve.png")
    plots.perplexity_bars(tasks, base_ppl, fit_ppl, out / "perplexity.png")
    plots.deviation_heatmap(tasks, modules, post["deviation"].mean(("chain", "draw")).values,
                            out / "deviation_heatmap.png")

    tau_est = bora.tau_estimate() or {}
    per_task = {}
    for i, t in enumerate(tasks):
        per_task[t] = {"train_docs": table["train_docs"][i], "train_tokens": table["train_tokens"][i],
                       "fisher": table["fisher"][i], "shrinkage": table["shrinkage"][i],
                       "shrinkage_hdi": [table["shrinkage_lo"][i], table["shrinkage_hi"][i]],
                       "deviation": table["deviation_total"][i], "base_ppl": base_ppl[i], "fit_ppl": fit_ppl[i]}
    report = {"spearman": rho, "spearman_between": [size_name, "shrinkage"], "tau": tau_est, "tau_mode": mode,
              "guide": bora.config.fit.guide, "draws": table["draws"], "hdi_prob": hdi_prob,
              "fisher_docs": fisher_docs or bora.config.fit.fisher_docs, "perplexity_source": ppl_src,
              "model": bora.config.model, "plots": list(PLOTS), "per_task": per_task}
    write_json(out / "report.json", report)
    (out / "index.md").write_text(_index_md(bora, report, tasks, history))
    if progress:
        print(f"report written to {shown} ({time.perf_counter() - t0:.1f} s)", flush=True)
    return report


def _index_md(bora, report: dict, tasks, history) -> str:
    tau = ", ".join(f"{k} = {v:.4g}" for k, v in report["tau"].items()) or "n/a"
    rho = report["spearman"]
    r = "n/a" if not math.isfinite(rho) else f"{rho:+.3f}"
    steps = bora.result.steps if bora.result is not None else 0
    lines = [
        "# bora fit report", "",
        f"- base model: `{report['model']}`; tasks: {len(tasks)}; adapted modules: {len(bora.model.shapes)}",
        f"- prior: `tau_mode={report['tau_mode']}`; τ: {tau}; inference: `{report['guide']}` "
        f"({report['draws']} draw{'s' if report['draws'] != 1 else ''}); steps: {steps}",
        f"- Spearman rank correlation between {report['spearman_between'][0].replace('_', ' ')} and shrinkage: "
        f"**{r}**",
        "- full diagnostics: [`diagnostics.nc`](diagnostics.nc) (ArviZ InferenceData), "
        "[`summary.md`](summary.md) / [`summary.csv`](summary.csv), [`report.json`](report.json)", "",
    ]
    for name, (title, text) in PLOTS.items():
        lines += [f"## {title}", "", f"![{title}]({name})", "", text, ""]
    rows = []
    for t in tasks:
        d = report["per_task"][t]
        lo, hi = d["shrinkage_hdi"]
        rows.append([t, d["train_docs"], d["train_tokens"], float(d["fisher"]), float(d["shrinkage"]),
                     f"[{lo:.3g}, {hi:.3g}]" if report["draws"] > 1 else "", float(d["deviation"]),
                     float(d["base_ppl"]), float(d["fit_ppl"])])
    lines += ["## per task", "", markdown_table(
        ["task", "train docs", "train tokens", "mean Fisher", "shrinkage", "HDI", "‖θ_t − Θ‖",
         "base ppl", "fit ppl"], rows), ""]
    return "\n".join(lines)


def main_report(fit_dir, out_dir=None, *, device="auto", fisher_docs: Optional[int] = None, draws: int = 200,
                progress: bool = True) -> Path:
    """Load the fit saved in ``fit_dir`` and write its report to ``out_dir`` (default ``fit_dir/report``)."""
    from .api import Bora

    fit_dir = Path(fit_dir)
    out = Path(out_dir) if out_dir is not None else fit_dir / "report"
    check_output(out, "report")  # before loading anything
    if progress:
        print(f"loading fit {fit_dir}", flush=True)
    bora = Bora.load(fit_dir, device=device)
    write_report(bora, out, fisher_docs=fisher_docs, draws=draws, progress=progress)
    return out
