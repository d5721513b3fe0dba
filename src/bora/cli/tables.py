"""The tables the command line prints: per-task perplexity of a fit vs the base model, point vs posterior average.

>>> from bora.cli.tables import format_table
>>> s = {"per_task": {"a": {"ppl": 10.0, "nll": 2.3, "docs": 2, "tokens": 9}},
...      "overall": {"ppl_task_mean": 10.0, "ppl_token": 10.0}}
>>> f = {"per_task": {"a": {"ppl": 8.0, "nll": 2.08, "docs": 2, "tokens": 9}},
...      "overall": {"ppl_task_mean": 8.0, "ppl_token": 8.0}}
>>> print(format_table(s, f).splitlines()[1])
a         2       9     10.000      8.000   -20.0%
"""

from __future__ import annotations

from typing import Optional

__all__ = ["format_table", "format_posterior_table", "format_classification_table", "format_new_tasks",
           "format_tiny_tasks", "format_tau", "format_task_taus"]


#: above this many tasks the tables group tasks by training-split size instead of listing each one
MAX_TASK_ROWS = 40


def format_table(base: dict, fitted: dict, *, title: str = "test", train_sizes: Optional[dict] = None) -> str:
    """Per-task perplexity table: base model vs fit, plus the two overall summaries. With more than
    :data:`MAX_TASK_ROWS` tasks and ``train_sizes`` (task -> training documents), one row per size bucket
    (:func:`bora.evaluation.evaluate.by_task_size`) instead of one per task."""
    names = list(fitted["per_task"])
    if len(names) > MAX_TASK_ROWS and train_sizes is not None:
        from ..evaluation.evaluate import by_task_size

        w = max(len("training docs per task"), 24)
        lines = [f"{'training docs per task':<{w}}  {'tasks':>5}  {'base ppl':>9}  {'fit ppl':>9}  {'change':>7}"]
        for r in by_task_size(fitted, base, train_sizes):
            lines.append(f"{r['bucket']:<{w}}  {r['tasks']:>5}  {r['base_ppl']:>9.3f}  {r['fit_ppl']:>9.3f}  "
                         f"{100 * r['change']:>+6.1f}%")
        w = w - 17  # the overall rows below align their numbers with these columns
    else:
        w = max([len("task")] + [len(n) for n in names])
        lines = [f"{'task':<{w}}  {'docs':>5}  {'tokens':>6}  {'base ppl':>9}  {'fit ppl':>9}  {'change':>7}"]
        for n in names:
            b, f = base["per_task"][n], fitted["per_task"][n]
            lines.append(f"{n:<{w}}  {f['docs']:>5}  {f['tokens']:>6}  {b['ppl']:>9.3f}  {f['ppl']:>9.3f}  "
                         f"{100 * (f['ppl'] / b['ppl'] - 1):>+6.1f}%")
    bo, fo = base["overall"], fitted["overall"]
    lines.append("-" * len(lines[0]))
    lines.append(f"{'overall: exp(mean per-task NLL)':<{w + 24}}  {bo['ppl_task_mean']:>9.3f}  "
                 f"{fo['ppl_task_mean']:>9.3f}  {100 * (fo['ppl_task_mean'] / bo['ppl_task_mean'] - 1):>+6.1f}%")
    lines.append(f"{'overall: token-weighted':<{w + 24}}  {bo['ppl_token']:>9.3f}  "
                 f"{fo['ppl_token']:>9.3f}  {100 * (fo['ppl_token'] / bo['ppl_token'] - 1):>+6.1f}%")
    better = sum(fitted["per_task"][n]["ppl"] < base["per_task"][n]["ppl"] for n in names)
    lines.append(f"{title} perplexity lower than the base model on {better} of {len(names)} tasks")
    return "\n".join(lines)


def _bracket(lo: float, hi: float) -> str:
    return f"[{lo:.3f}, {hi:.3f}]"


def format_new_tasks(res: dict) -> str:
    """The cold-start table of tasks not in the fit (:func:`bora.posterior.coldstart.evaluate_new_tasks`): per
    task (up to :data:`MAX_TASK_ROWS` of them) and overall perplexity under the base model and the global adapter,
    and with posterior samples the posterior predictive of a new task and the spread over its draws."""
    base, glob, pred = res["base"], res["global"], res["predictive"]
    names = list(glob["per_task"])
    S = res["samples"]
    ph = f"pred. S={S}" if pred is not None else ""
    lvl = f"{int(round(100 * res['level']))}% spread over draws"
    cw = max(10, len(ph))
    w = max([len("overall: exp(mean per-task NLL)") - 15, len("task")]
            + ([len(n) for n in names] if len(names) <= MAX_TASK_ROWS else []))
    head = f"{'task':<{w}}  {'docs':>5}  {'tokens':>6}  {'base ppl':>9}  {'global ppl':>10}  {'change':>7}"
    if pred is not None:
        head += f"  {ph:>{cw}}  {lvl:>24}"
    lines = [f"cold start: {len(names)} task{'s' if len(names) != 1 else ''} not in the fit, served by the global "
             f"adapter (E[theta_new] = Theta)", head]
    if len(names) <= MAX_TASK_ROWS:
        for n in names:
            b, g = base["per_task"][n], glob["per_task"][n]
            row = (f"{n:<{w}}  {g['docs']:>5}  {g['tokens']:>6}  {b['ppl']:>9.3f}  {g['ppl']:>10.3f}  "
                   f"{100 * (g['ppl'] / b['ppl'] - 1):>+6.1f}%")
            if pred is not None:
                sp = res["posterior_spread"][n]
                row += f"  {pred['per_task'][n]['ppl']:>{cw}.3f}  {_bracket(sp['lo'], sp['hi']):>24}"
            lines.append(row)
    lines.append("-" * len(head))
    for label, key in (("overall: exp(mean per-task NLL)", "ppl_task_mean"), ("overall: token-weighted", "ppl_token")):
        bo, go = base["overall"][key], glob["overall"][key]
        row = f"{label:<{w + 15}}  {bo:>9.3f}  {go:>10.3f}  {100 * (go / bo - 1):>+6.1f}%"
        if pred is not None:
            row += f"  {pred['overall'][key]:>{cw}.3f}"
        lines.append(row)
    better = sum(glob["per_task"][n]["ppl"] < base["per_task"][n]["ppl"] for n in names)
    lines.append(f"global adapter perplexity lower than the base model on {better} of {len(names)} new tasks")
    if pred is not None:
        lines.append(f"(pred.: the posterior predictive of a new task, per document -log mean_k p(doc | theta_new_k) "
                     f"over {S} draws theta_new_k ~ Normal(Theta, tau^-1/2), Theta and tau from posterior sample k; "
                     "spread: the task's perplexity under each draw)")
    if len(names) > MAX_TASK_ROWS:
        lines.append(f"({len(names)} new tasks: their per-task numbers are in --json)")
    return "\n".join(lines)


def format_tiny_tasks(tiny: dict, *, title: str = "test") -> str:
    """The fitted tasks with 1-2 training documents (:func:`bora.posterior.coldstart.tiny_tasks`), apart: their
    ``title`` perplexity under the base model, their own adapters and the global adapter alone (one row per task
    up to :data:`MAX_TASK_ROWS` of them). Empty when there are none."""
    names = tiny["tasks"]
    if not names:
        return ""
    glob = tiny["global_ppl"] is not None
    lo, hi = min(tiny["train_docs"]), max(tiny["train_docs"])
    lines = [f"cold start ({lo}-{hi} training documents): {len(names)} task{'s' if len(names) != 1 else ''}, "
             f"{title} perplexity under the tasks' own adapters"
             + (" and under the global adapter alone" if glob else "")]
    listed = len(names) <= MAX_TASK_ROWS
    w = max([len("exp(mean per-task NLL)") - 12, len("task")] + ([len(n) for n in names] if listed else []))
    head = (f"{'task':<{w}}  {'train docs':>10}  {'base ppl':>9}  {'fit ppl':>9}"
            + (f"  {'global ppl':>10}" if glob else ""))
    lines.append(head)
    if listed:
        for n in names:
            r = tiny["per_task"][n]
            lines.append(f"{n:<{w}}  {r['train_docs']:>10}  {r['base_ppl']:>9.3f}  {r['fit_ppl']:>9.3f}"
                         + (f"  {r['global_ppl']:>10.3f}" if glob else ""))
    lines.append("-" * len(head))
    lines.append(f"{'exp(mean per-task NLL)':<{w + 12}}  {tiny['base_ppl']:>9.3f}  {tiny['fit_ppl']:>9.3f}"
                 + (f"  {tiny['global_ppl']:>10.3f}" if glob else ""))
    if glob:
        lines.append(f"global adapter alone lower than the task's own adapter on {tiny['global_better']} of "
                     f"{len(names)} tasks")
    else:
        lines.append("(tau_mode='uncoupled': no global adapter to compare with)")
    return "\n".join(lines)


def format_posterior_table(res: dict, *, title: str = "test") -> str:
    """Point estimate vs Bayesian model average: likelihood, accuracy, calibration, uncertainty; per task.

    The BMA NLL and perplexities are the document-level posterior predictive (``bma_doc``, with the plain
    estimate beside it when the tilted estimator was used); accuracy,
    ECE, Brier, entropy and mutual information are of the token-level BMA (``bma_token``)."""
    S = res["samples"]
    bma = S > 1
    p, bd, bt = res["point"], res["bma_doc"], res["bma_token"]
    head = f"BMA (S={S}" + (", linearised)" if res.get("predictive") == "linear" else ")")
    w = 50
    tilted = res.get("doc_estimator") == "tilted"
    rows = [
        ("NLL per token (BMA: document-level)", p["overall"]["nll_token"], bd["overall"]["nll_token"], ".4f"),
        *([("  the same, plain log-mean-exp over samples", p["overall"]["nll_token"],
            res["bma_doc_plain"]["overall"]["nll_token"], ".4f")] if tilted and bma else []),
        ("perplexity: exp(mean per-task NLL)", p["overall"]["ppl_task_mean"], bd["overall"]["ppl_task_mean"], ".3f"),
        ("perplexity: token-weighted", p["overall"]["ppl_token"], bd["overall"]["ppl_token"], ".3f"),
        ("token-level BMA: NLL per token", p["tokens"]["nll"], bt["tokens"]["nll"], ".4f"),
        ("token-level: next-token top-1 accuracy", p["tokens"]["accuracy"], bt["tokens"]["accuracy"], ".4f"),
        ("token-level: expected calibration error (15 bins)", p["tokens"]["ece"], bt["tokens"]["ece"], ".4f"),
        ("token-level: Brier score", p["tokens"]["brier"], bt["tokens"]["brier"], ".4f"),
        ("token-level: predictive entropy (nats)", p["tokens"]["entropy"], bt["tokens"]["entropy"], ".4f"),
        ("token-level: mutual information (nats)", p["tokens"]["mutual_information"],
         bt["tokens"]["mutual_information"], ".3g"),
    ]
    label = f"{title} ({p['tokens']['tokens']} tokens)"
    lines = [f"{label:<{w}}  {'point':>10}" + (f"  {head:>12}" if bma else "")]
    cw = max(12, len(head))
    for name, a, c, fmt in rows:
        lines.append(f"{name:<{w}}  {a:>10{fmt}}" + (f"  {c:>{cw}{fmt}}" if bma else ""))
    if res.get("point_fit") and bma:
        lines.append("(MAP fit: every posterior sample is the point estimate, so the BMA equals it)")
    if tilted and bma:
        e = res["tilted_ess"]
        lines.append(f"(document-level BMA by importance sampling, bora.tilted: the {S} samples and {S} copies "
                     f"shifted along each document's gradient; effective sample size median {e['median']:.1f}, "
                     f"10% quantile {e['q10']:.1f} of {2 * S}. The plain log-mean-exp is biased low when a "
                     "document's log-likelihood varies by nats over the samples)")
    if bma:
        iv, ti = res["posterior_spread"], res["test_interval"]["bma_doc"]
        names = list(iv)
        tw = max([len("task")] + [len(n) for n in names])
        lvl = int(round(100 * ti["level"]))

        def br(lo, hi):
            return "[" + format(lo, ".3f") + ", " + format(hi, ".3f") + "]"

        lines.append("")
        lines.append(f"{'task':<{tw}}  {'point ppl':>9}  {'BMA ppl':>9}  {str(lvl) + '% test-set interval':>24}"
                     f"  {str(lvl) + '% posterior spread':>22}")
        for n in names:
            t = ti["per_task"][n]
            lines.append(f"{n:<{tw}}  {p['per_task'][n]['ppl']:>9.3f}  {bd['per_task'][n]['ppl']:>9.3f}  "
                         f"{br(t['lo'], t['hi']):>24}  {br(iv[n]['lo'], iv[n]['hi']):>22}")
        lines.append("(BMA ppl: document-level posterior predictive; test-set: documents resampled within the task; "
                     "posterior spread: the task's perplexity under each sample, a plug-in quantity)")
    return "\n".join(lines)


def format_classification_table(res: dict, *, title: str = "test") -> str:
    """Per task and overall (mean over tasks) accuracy, NLL, ECE (15 bins) and Brier score of a classification
    evaluation (:func:`bora.evaluation.classification.evaluate_classification`): the base model (where given),
    the MAP and the posterior average of the choice probabilities."""
    S = res["samples"]
    cols = [c for c in ("base", "map", "posterior_average") if c in res]
    heads = {"base": "base", "map": "MAP", "posterior_average": f"post. avg (S={S})"}
    names = list(res["map"]["per_task"])
    w = max([len("overall (task mean)")] + [len(n) for n in names])
    cw = 8
    metrics = (("accuracy", "acc"), ("nll", "NLL"), ("ece", "ECE"), ("brier", "Brier"))
    top = f"{'':<{w}}  {'rows':>5}  " + "  ".join(f"{heads[c]:^{4 * cw + 3}}" for c in cols)
    sub = f"{'task':<{w}}  {'':>5}  " + "  ".join(" ".join(f"{m:>{cw}}" for _, m in metrics) for _ in cols)
    lines = [f"{title}: classification (accuracy, NLL per row, ECE with 15 bins, Brier)", top, sub]

    def row(label, get, rows):
        return f"{label:<{w}}  {rows:>5}  " + "  ".join(
            " ".join(f"{get(c)[k]:>{cw}.4f}" for k, _ in metrics) for c in cols)

    for n in names:
        lines.append(row(n, lambda c: res[c]["per_task"][n], res["map"]["per_task"][n]["rows"]))
    lines.append("-" * len(sub))
    lines.append(row("overall (task mean)", lambda c: res[c]["overall"], res["map"]["overall"]["rows"]))
    lines.append(row("pooled (every row)", lambda c: res[c]["pooled"], res["map"]["pooled"]["rows"]))
    if res.get("point_fit"):
        lines.append("(MAP fit without a posterior: the posterior average is the MAP)")
    return "\n".join(lines)


def format_tau(v, spec: str = ".4g") -> str:
    """A tau estimate for printing: the number, or a per-task tau (a list) as ``min..max``."""
    if isinstance(v, (list, tuple)):
        return f"{min(v):{spec}}..{max(v):{spec}} over {len(v)} tasks" if v else "n/a"
    return f"{float(v):{spec}}"


def format_task_taus(tasks, taus, hyper: dict) -> str:
    """Every task's tau of a per-task fit and the learned ``Gamma(a, b)`` they are drawn from, one line."""
    each = ", ".join(f"{t}={v:.4g}" for t, v in zip(tasks, taus))
    a, b = hyper["a"], hyper["b"]
    return f"per-task tau (Gamma(a={a:.4g}, b={b:.4g}), mean a/b={a / b:.4g}): {each}"
