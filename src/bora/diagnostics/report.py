"""A diagnostics report of a fit: ArviZ summary, PNG plots, ``index.md``, ``report.json``.

>>> from bora.diagnostics.report import markdown_table
>>> print(markdown_table(["task", "λ"], [["a", 0.25], ["b", 0.5]]))
| task | λ |
|---|---|
| a | 0.25 |
| b | 0.5 |

From a saved fit (``bora report FIT_DIR`` on the command line)::

    bora.cli.commands.main_report("runs/shakespeare")   # writes runs/shakespeare/report/
    write_report(bora, "out", train=train, test=test, draws=200)   # from a Bora in memory
    write_report(bora, "out", independent="runs/independent")     # adds the "gain kept" column

The folder holds ``index.md`` (every plot with a one-line explanation, and a per-task table of
the pooling summaries of :mod:`bora.diagnostics.pooling`, each column explained in one line: the pooling
factor and gamma, the point estimate's ΔW deviation, the deviation in the coordinates the task's
data identify and their number; an HDI in brackets only for a quantity that varies between the
fit's posterior draws, so none for the pooling factor and gamma under a point estimate of tau),
``summary.md`` / ``summary.csv`` (``az.summary`` of tau, the
pooling summaries, the coordinate-averaged shrinkage, deviation and global norms),
``diagnostics.nc`` (the full InferenceData), ``report.json`` and the PNGs.

``report.json``: the Spearman rank correlation between training tokens and the pooling factor,
tau, ``tau_varies`` and ``intervals`` (per quantity: whether it varies between draws), and per
task ``pooling_factor``, ``effective_parameters``, ``delta_w_ratio`` (posterior means) with
``*_hdi`` ``[lo, hi]`` (``null`` where the quantity is the same in every draw: a single draw, or
the pooling factor and gamma under a point tau), ``delta_w_ratio_point`` (the point estimate's),
``delta_w_identified`` with ``delta_w_identified_hdi``, ``delta_w_identified_point`` and
``identified_coords`` (absent for uncoupled and hierarchy 'AB' fits; ``identified_note`` says
why), the coordinate-averaged shrinkage, perplexities and, with an independent fit, ``gain_kept``.
The PNGs:
``shrinkage_forest.png`` (ArviZ forest of the pooling summaries), ``shrinkage_vs_size.png``,
``tau.png``, ``training_curve.png``, ``perplexity.png`` and ``deviation_heatmap.png`` (the point
estimate's ΔW deviation per task and module). The Fisher
pass over the training split (``fisher_docs`` documents per task) is the slow step; the training
and test splits are reloaded from the fit's data config unless given.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import numpy as np

from . import inference_data as D
from . import plots
from ..core.files import check_output, make_temp_dir, replace_dir, write_json
from .pooling import gain_kept, spearman
from .view import FitView, fit_splits

__all__ = ["write_report", "markdown_table", "PLOTS", "COLUMNS"]

# file name -> (title, one-line explanation shown under the image in index.md)
PLOTS = {
    "shrinkage_forest.png": (
        "Pooling per task",
        "Per task (largest training set at the top): the Fisher-weighted pooling factor λᶠ (1: pulled all the "
        "way to the global adapter, 0: own data decide), the effective number of task-level parameters γ and "
        "the relative ΔW deviation from the global adapter in the coordinates the task's data identify (F > τ; "
        "the full deviation where that is undefined); bars: HDI over posterior draws (none for λᶠ and γ when τ "
        "is a point estimate: they vary only through τ)."),
    "shrinkage_vs_size.png": (
        "Pooling factor against task size",
        "Pooling factor λᶠ against the task's number of training tokens: tasks with more data should be pooled "
        "less (negative Spearman ρ)."),
    "tau.png": (
        "Prior precision τ",
        "Prior precision τ of the task adapters around the global adapter: the point estimate or its "
        "posterior (draws)."),
    "training_curve.png": (
        "Training curve",
        "Training NLL per token and validation perplexity against optimisation step (and τ when it was "
        "re-estimated during the fit)."),
    "perplexity.png": (
        "Test perplexity: base model vs fit",
        "Per-task held-out perplexity of the base model and of the fit (percent change next to each bar)."),
    "deviation_heatmap.png": (
        "Task deviations per module",
        "‖B_t A_t − Θ_B Θ_A‖ / ‖Θ_B Θ_A‖ per task and adapted module at the point estimate (MAP; posterior "
        "median for mean-field): where the tasks' weight updates differ from the global one. Not the posterior "
        "mean of the norm: in every draw the coordinates the data do not inform sit about one prior sd from the "
        "global adapter, which gives every task about the same norm and hides the structure."),
}

# per-task table column -> one line on how to read it (index.md, under the table)
COLUMNS = {
    "pooling λᶠ": "Fisher-weighted pooling factor Σ F λ / Σ F with λ = τ/(τ+F) per coordinate: 0 = the task's own "
                  "data decide, 1 = pulled all the way to the global adapter.",
    "eff. params γ": "Σ F/(F+τ): how many adapter coordinates the task's own data determine (each counts 0 to 1).",
    "ΔW dev.": "‖B_t A_t − Θ_B Θ_A‖ / ‖Θ_B Θ_A‖ over all modules at the point estimate (MAP; posterior median for "
               "mean-field): 0 = the task's weight update equals the global one; 1 = it differs by as much as the "
               "global update's own size. The posterior mean of this norm (report.json's delta_w_ratio) is "
               "mostly prior noise in the coordinates the data do not inform, about equal for every task.",
    "identified ΔW dev.": "the same ratio restricted to the coordinates the task's data identify (F > τ, i.e. λ < "
                          "1/2; 0 when there are none): its mean over the posterior draws (the point estimate when "
                          "there is one draw), with an HDI that shows how well the data pin that deviation down.",
    "identified coords": "how many task-level coordinates have F > τ (at the point estimate's τ).",
    "gain kept": "(base − fit) / (base − independent) held-out NLL: the share of an independent fit's gain the task "
                 "keeps; above 1, pooling beats fitting the task alone.",
    "[HDI]": "highest-density interval over posterior draws, shown only for a quantity that varies between draws; "
             "report.json writes null for an interval of zero width.",
    "no HDI for λᶠ, γ": "τ is a point estimate (the same in every draw) and the Fisher is taken at the point "
                        "estimate, so the pooling factor and γ are the same in every draw: no interval.",
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


def _perplexities(bora: FitView, tasks, test, load, progress: bool) -> tuple[list, list, str]:
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


def _independent_nll(independent, tasks) -> Optional[list]:
    """Per-task held-out NLL of an independent fit: ``{task: nll}`` or a fit folder with ``metrics.json``."""
    if independent is None:
        return None
    if not isinstance(independent, Mapping):
        m = json.loads((Path(independent) / "metrics.json").read_text())
        per = m["test"]["fit"]["per_task"]
        independent = {t: per[t]["nll"] for t in per}
    return [_num(independent.get(t)) for t in tasks]


def _hdi(table: dict, var: str, i: int) -> Optional[list]:
    """``[lo, hi]`` of task ``i``'s HDI, or ``None`` when ``var`` is the same in every draw (a zero-width interval)."""
    if not table.get(var + "_varies", True):
        return None
    return [table[var + "_lo"][i], table[var + "_hi"][i]]


def write_report(bora: FitView, out_dir, *, train=None, test=None, fisher_docs: Optional[int] = None, draws: int = 200,
                 seed: int = 0, hdi_prob: float = 0.94, independent: Union[None, str, Path, Mapping] = None,
                 progress: bool = True) -> dict:
    """Write the report folder for ``bora`` (a fitted :class:`~bora.api.Bora`); returns ``report.json``'s content.

    ``train`` / ``test`` are :class:`~bora.data.documents.TokenizedSplit` (default: reloaded with
    :func:`bora.diagnostics.view.fit_splits`); the test split is only needed when ``bora.metrics`` has no test
    evaluation. ``draws`` posterior draws are used when the fit has a posterior (a MAP point
    estimate has one). ``independent``: an independent fit's per-task test NLL (``{task: nll}``, or
    its fit folder) for the "gain kept" column (:func:`bora.diagnostics.pooling.gain_kept`).
    The folder is written into a temporary sibling and renamed into place; an existing ``out_dir``
    must be empty or an earlier bora report (anything else is refused with a ConfigError).
    """
    out = Path(out_dir)
    check_output(out, "report")
    tmp = make_temp_dir(out.parent, f".{out.name}.tmp-")
    try:
        report = _write_report(bora, tmp, out, train=train, test=test, fisher_docs=fisher_docs, draws=draws,
                               seed=seed, hdi_prob=hdi_prob, independent=independent, progress=progress)
        replace_dir(tmp, out, "report")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return report


# the per-task quantities whose HDIs report.json carries (None where the quantity does not vary between draws)
_INTERVAL_VARS = ("pooling_factor", "effective_parameters", "delta_w_ratio", "delta_w_identified")


def _write_report(bora: FitView, out: Path, shown: Path, *, train, test, fisher_docs, draws, seed, hdi_prob,
                  independent, progress) -> dict:
    t0 = time.perf_counter()
    cache: dict = {}

    def load():
        if "data" not in cache:
            if progress:
                print("loading and tokenizing the fit's data", flush=True)
            cache["data"] = fit_splits(bora)
        return cache["data"]

    if train is None:
        train = load()["train"]
    idata = D.diagnose(bora, train=train, fisher_docs=fisher_docs, draws=draws, seed=seed, progress=progress)
    with D.quiet_arviz():
        idata.to_netcdf(str(out / "diagnostics.nc"))

    table = D.task_table(idata, hdi_prob=hdi_prob)
    tasks = table["task"]
    tokens = np.asarray(table["train_tokens"], dtype=float)
    use_tokens = bool(np.all(tokens > 0))
    sizes = tokens if use_tokens else np.asarray(table["train_docs"], dtype=float)
    size_name = "train_tokens" if use_tokens else "train_docs"
    rho = spearman(sizes, table["pooling_factor"])

    summ = D.summary(idata, hdi_prob=hdi_prob)
    summ.to_csv(out / "summary.csv")
    cols = list(summ.columns)
    (out / "summary.md").write_text(
        "# az.summary\n\n" + markdown_table(["variable"] + cols, [[i] + [_num(v) for v in row]
                                                                  for i, row in zip(summ.index, summ.values)]) + "\n")

    base_ppl, fit_ppl, ppl_src = _perplexities(bora, tasks, test, load, progress)
    indep = _independent_nll(independent, tasks)
    kept = (gain_kept([math.log(v) for v in base_ppl], [math.log(v) for v in fit_ppl], indep).tolist()
            if indep is not None else None)
    post = idata.posterior
    mode = bora.config.prior.tau_mode
    history = list(bora.result.history) if bora.result is not None else []

    if progress:
        print(f"drawing plots into {shown}", flush=True)
    _draw_plots(idata, out, table, sizes, rho, use_tokens, base_ppl, fit_ppl, history,
                title=f"Per-task pooling ({mode}, {bora.config.fit.guide})", mode=mode, hdi_prob=hdi_prob)
    tau_est = bora.tau_estimate() or {}
    per_task = _per_task_rows(table, base_ppl, fit_ppl, kept, indep)
    tau_hyper = bora.result.tau_hyper if bora.result is not None else None
    if bora.model.tau_per_task:  # every task's own tau (report["tau"]["tau"] lists them in task order)
        for t, v in zip(per_task, tau_est.get("tau") or []):
            per_task[t]["tau"] = v
    report = {"spearman": rho, "spearman_between": [size_name, "pooling_factor"], "tau": tau_est, "tau_mode": mode,
              "guide": bora.config.fit.guide, "draws": table["draws"], "hdi_prob": hdi_prob,
              "draws_from": post.attrs.get("draws_from", ""),
              "fisher_docs": fisher_docs or bora.config.fit.fisher_docs, "perplexity_source": ppl_src,
              "model": bora.config.model, "plots": list(PLOTS), "tau_varies": table["tau_varies"],
              "intervals": {v: table[v + "_varies"] for v in _INTERVAL_VARS if v + "_varies" in table},
              "identified_note": post.attrs.get("identified_note", ""), "per_task": per_task,
              "tau_hyper": tau_hyper}
    write_json(out / "report.json", report)
    (out / "index.md").write_text(_index_md(bora, report, tasks, history))
    if progress:
        print(f"report written to {shown} ({time.perf_counter() - t0:.1f} s)", flush=True)
    return report


def _draw_plots(idata, out: Path, table: dict, sizes, rho: float, use_tokens: bool, base_ppl, fit_ppl, history,
                *, title: str, mode: str, hdi_prob: float) -> None:
    """Every plot of ``PLOTS`` into ``out``, drawn from the diagnostics' InferenceData and task table."""
    post = idata.posterior
    tasks = table["task"]
    tau_draws = post["tau"].values.reshape(post.sizes["chain"] * post.sizes["draw"], -1)
    modules = [str(m) for m in post["module"].values]
    forest = ["pooling_factor", "effective_parameters",
              "delta_w_identified" if "delta_w_identified" in post else "delta_w_ratio"]
    plots.pooling_forest(idata, out / "shrinkage_forest.png", sizes=sizes, hdi_prob=hdi_prob, title=title,
                         var_names=forest)
    plots.shrinkage_vs_size(tasks, sizes, table["pooling_factor"], out / "shrinkage_vs_size.png",
                            lo=table["pooling_factor_lo"], hi=table["pooling_factor_hi"], rho=rho,
                            xlabel=("training tokens" if use_tokens else "training documents") + " (log scale)")
    per_task_tau = "task" in post["tau"].dims  # a per-task tau: one bar (or histogram) per task
    labels = [str(t) for t in tasks] if per_task_tau else modules
    plots.tau_plot(tau_draws, out / "tau.png", modules=labels if tau_draws.shape[1] > 1 else None, mode=mode)
    plots.training_curve(history, out / "training_curve.png")
    plots.perplexity_bars(tasks, base_ppl, fit_ppl, out / "perplexity.png")
    const = idata.constant_data
    if "delta_w_module_point" in const:  # the point estimate's deviations (see PLOTS)
        dev, what = const["delta_w_module_point"].values, "point estimate"
    else:  # diagnostics written before the point deviations were stored
        dev, what = post["delta_w_module"].mean(("chain", "draw")).values, "posterior mean"
    plots.deviation_heatmap(tasks, modules, dev, out / "deviation_heatmap.png",
                            title=f"‖B_t A_t − Θ_B Θ_A‖ / ‖Θ_B Θ_A‖ per task and module ({what})")


def _per_task_rows(table: dict, base_ppl, fit_ppl, kept, indep) -> dict:
    """``report.json``'s per-task numbers (an ``*_hdi`` is ``None`` where the quantity is the same in every draw)."""
    per_task = {}
    for i, t in enumerate(table["task"]):
        per_task[t] = {"train_docs": table["train_docs"][i], "train_tokens": table["train_tokens"][i],
                       "fisher": table["fisher"][i],
                       "pooling_factor": table["pooling_factor"][i],
                       "pooling_factor_hdi": _hdi(table, "pooling_factor", i),
                       "effective_parameters": table["effective_parameters"][i],
                       "effective_parameters_hdi": _hdi(table, "effective_parameters", i),
                       "delta_w_ratio": table["delta_w_ratio"][i], "delta_w_ratio_hdi": _hdi(table, "delta_w_ratio", i),
                       "shrinkage_coord_mean": table["shrinkage"][i],
                       "deviation": table["deviation_total"][i], "base_ppl": base_ppl[i], "fit_ppl": fit_ppl[i]}
        if "delta_w_ratio_point" in table:
            per_task[t]["delta_w_ratio_point"] = table["delta_w_ratio_point"][i]
        if "delta_w_identified" in table:
            per_task[t].update({"delta_w_identified": table["delta_w_identified"][i],
                                "delta_w_identified_hdi": _hdi(table, "delta_w_identified", i)})
        for var in ("delta_w_identified_point", "identified_coords"):
            if var in table:
                per_task[t][var] = table[var][i]
        if kept is not None:
            per_task[t]["gain_kept"] = kept[i]
            per_task[t]["independent_nll"] = indep[i]
    return per_task


def _tau_text(v) -> str:
    """A tau for the report: the number, or a per-task tau's values."""
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(f"{x:.4g}" for x in v) + "]"
    return f"{v:.4g}"


def _index_md(bora: FitView, report: dict, tasks, history) -> str:
    tau = ", ".join(f"{k} = {_tau_text(v)}" for k, v in report["tau"].items()) or "n/a"
    if report.get("tau_hyper"):
        h = report["tau_hyper"]
        tau += f" (per task, drawn from the learned Gamma(a = {h['a']:.4g}, b = {h['b']:.4g}))"
    rho = report["spearman"]
    r = "n/a" if not math.isfinite(rho) else f"{rho:+.3f}"
    steps = bora.result.steps if bora.result is not None else 0
    draws = report["draws"]
    level = int(round(100 * report["hdi_prob"]))
    lines = [
        "# bora fit report", "",
        f"- base model: `{report['model']}`; tasks: {len(tasks)}; adapted modules: {len(bora.model.shapes)}",
        f"- prior: `tau_mode={report['tau_mode']}`; τ: {tau}; inference: `{report['guide']}` "
        f"({draws} draw{'s' if draws != 1 else ''}{' from the posterior' if draws > 1 else ', the point estimate'});"
        f" steps: {steps}",
        f"- Spearman rank correlation between {report['spearman_between'][0].replace('_', ' ')} and the pooling "
        f"factor: **{r}**",
        "- full diagnostics: [`diagnostics.nc`](diagnostics.nc) (ArviZ InferenceData), "
        "[`summary.md`](summary.md) / [`summary.csv`](summary.csv), [`report.json`](report.json)", "",
    ]
    for name, (title, text) in PLOTS.items():
        lines += [f"## {title}", "", f"![{title}]({name})", "", text, ""]

    def cell(d, var, fmt, value=None):
        v = f"{d[var] if value is None else value:{fmt}}"
        if draws > 1 and d.get(var + "_hdi") is not None:
            lo, hi = d[var + "_hdi"]
            v += f" [{lo:{fmt}}, {hi:{fmt}}]"
        return v

    has_kept = any("gain_kept" in report["per_task"][t] for t in tasks)
    has_ident = all("delta_w_identified" in report["per_task"][t] for t in tasks)
    rows = []
    for t in tasks:
        d = report["per_task"][t]
        dev = d.get("delta_w_ratio_point", d["delta_w_ratio"])
        row = [t, d["train_docs"], d["train_tokens"], cell(d, "pooling_factor", ".3f"),
               cell(d, "effective_parameters", ".4g"), f"{dev:.3f}"]
        if has_ident:
            row += [cell(d, "delta_w_identified", ".3f"), d.get("identified_coords", "n/a")]
        if has_kept:
            row.append(float(d["gain_kept"]))
        rows.append(row + [float(d["base_ppl"]), float(d["fit_ppl"])])
    header = ["task", "train docs", "train tokens", "pooling λᶠ", "eff. params γ", "ΔW dev."]
    header += ["identified ΔW dev.", "identified coords"] if has_ident else []
    header += ["gain kept"] if has_kept else []
    header += ["base ppl", "fit ppl"]
    lines += ["## per task", "", markdown_table(header, rows), ""]
    explain = ["pooling λᶠ", "eff. params γ", "ΔW dev."]
    explain += ["identified ΔW dev.", "identified coords"] if has_ident else []
    explain += ["gain kept"] if has_kept else []
    lines += [f"- **{c}**: {COLUMNS[c]}" for c in explain]
    if not has_ident and report.get("identified_note"):
        lines.append(f"- no identified ΔW deviation: {report['identified_note']}.")
    if draws > 1:
        lines.append(f"- **[…]**: {level}% {COLUMNS['[HDI]']}")
        if not report.get("intervals", {}).get("pooling_factor", True):
            lines.append(f"- **no HDI for λᶠ, γ**: {COLUMNS['no HDI for λᶠ, γ']}")
    else:
        lines.append("- no intervals: the fit has a single point estimate (fit a posterior, e.g. Laplace or "
                     "mean-field, for intervals).")
    lines.append("")
    return "\n".join(lines)
