"""How far the diagonal curvature pulls a learned tau toward pooling: tau's evidence fixed point at a fit's point
under the diagonal Fisher and under the full (low-rank) Fisher of the same documents' gradients.

    python analysis/tau_curvature.py runs/shakespeare --out analysis/results/tau_curvature/shakespeare

At the fit's point estimate, every training document's gradient with respect to its task's task-level adapter
factors is taken (the documents' own tokens: the empirical Fisher, as the tau update uses;
:func:`bora.fit.fisher.task_fisher`; ``--docs N`` takes N documents per task, scaled to all). From the same columns
``G_t``: the diagonal Fisher ``diag(G_t G_t^T)``, which fits use, and the full ``G_t G_t^T``
(:class:`bora.fit.tau.LowRankCurvature`). With ``S`` the fit's summed squared task deviations, the script reports
``gamma`` at the fit's tau under both, and tau's fixed point under both with the global adapter profiled and
integrated out (:func:`bora.fit.tau.evidence_tau`, :func:`bora.fit.tau.evidence_tau_lowrank`; the fit's
``Gamma(a, b)`` hyperprior). The curvature is held at this point: these are the taus one more update would
give, not a refit. Single-tau learned fits only. Writes ``tau_curvature.json`` / ``.md`` to ``--out``.

The documents' Fisher has rank at most the number of documents, while their tokens determine more directions.
``--labels sampled --label-samples M`` takes each document's gradient under next tokens drawn from the fit's own
predictive instead, ``M`` times (``M`` passes): each draw is an unbiased sample of the true Fisher (the Gauss-Newton
matrix of the token softmax, a sum over tokens), and the average of ``m`` draws has rank up to ``m`` times the
documents. The report gives every quantity for the average of the first 1, 2, 4, ..., ``M`` draws: where the full
curvature's gamma and tau still move with ``m``, the documents' rank, not the data, is setting them.

    python analysis/tau_curvature.py runs/shakespeare --labels sampled --label-samples 4 --out DIR
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path


def run(args) -> dict:
    import torch

    from bora.api import Bora, load_data
    from bora.fit.fisher import task_fisher
    from bora.fit.tau import LowRankCurvature, evidence_tau, evidence_tau_lowrank
    from bora.posterior.laplace import task_layout

    t0 = time.perf_counter()
    bora = Bora.load(args.fit, device="cpu")
    model = bora.model
    groups = model.tau_groups()
    if bora.tau is None or list(groups) != ["tau"] or bora.tau.per_task:
        sys.exit("tau_curvature: needs a MAP or Laplace fit with one learned tau (tau_mode 'learned', not per "
                 "module or per task)")
    data = load_data(bora.config, bora.tokenizer, tasks=bora.tasks)
    feed = bora.feed(data["train"])
    point = bora.point()
    layout = {k: [i for i, _, _ in model.task_sites(k)] for k in model.shapes}
    if layout != task_layout(model):
        sys.exit("tau_curvature: this fit has no task-level factors to take gradients of")
    draws = []  # one pass per label draw (one pass of the documents' own labels for 'empirical')
    for k in range(args.label_samples):
        tf = task_fisher(model, model.params_from_values(point), feed, max_per_task=args.docs, labels=args.labels,
                         gradients=layout, factors=model.task_factors(), progress=not args.quiet,
                         generator=torch.Generator().manual_seed(args.seed + 7919 * k))
        S, F_k = bora.tau.statistics(point, tf, groups["tau"])
        # the diagonal of G_t G_t^T is the diagonal Fisher (both scaled by N_t / n_t): the same numbers, checked
        for t, Gt in enumerate(tf.gradients):
            a, b = float(Gt.double().square().sum()), float(F_k[t].sum())
            if abs(a - b) > 1e-4 * max(abs(b), 1e-12):
                sys.exit(f"tau_curvature: task {t}'s gradient columns do not match its diagonal Fisher ({a} vs {b})")
        draws.append((tf, F_k.double()))
    t1 = time.perf_counter()
    prior = bora.config.prior
    g = float(prior.global_scale) ** -2
    tau_fit = float(bora.tau.values["tau"])
    tf = draws[0][0]
    rows = []
    for m in _prefixes(args.label_samples):  # the Fisher averaged over the first m draws
        F = sum(d[1] for d in draws[:m]) / m
        # one task's columns at a time: the curvature keeps only eigenvectors
        curv = LowRankCurvature(torch.cat([d[0].gradients[t] for d in draws[:m]], 1) / math.sqrt(m)
                                for t in range(len(bora.tasks)))
        rows.append({
            "samples": m,
            "rank": {"total": int(len(curv.lam)), "documents": int(sum(tf.used.tolist())), "columns": m * int(
                sum(tf.used.tolist()))},
            "gamma_at_fit_tau": {"diag": float((F / (F + tau_fit)).sum()), "lowrank": curv.gamma(tau_fit)},
            "gamma_theta_at_fit_tau": {"diag": _diag_gamma_theta(F, tau_fit, g),
                                       "lowrank": curv.global_terms(tau_fit, g)[1]},
            "tau": {
                "diag_profiled": evidence_tau(S, F, prior.tau_shape, prior.tau_rate),
                "diag_integrated": evidence_tau(S, F, prior.tau_shape, prior.tau_rate, global_precision=g),
                "lowrank_profiled": evidence_tau_lowrank(S, curv, prior.tau_shape, prior.tau_rate),
                "lowrank_integrated": evidence_tau_lowrank(S, curv, prior.tau_shape, prior.tau_rate,
                                                           global_precision=g),
            }})
        del curv
    out = {
        "fit": str(args.fit), "docs_per_task": args.docs, "used": tf.used.tolist(), "sizes": tf.sizes.tolist(),
        "tasks": list(bora.tasks), "coordinates_per_task": int(draws[0][1].shape[1]), "S": S, "tau_fit": tau_fit,
        "tau_evidence_fit": prior.tau_evidence, "labels": args.labels, "label_samples": args.label_samples,
        **{k: rows[-1][k] for k in ("rank", "gamma_at_fit_tau", "gamma_theta_at_fit_tau", "tau")},
        "by_samples": rows,
        "seconds_gradients": t1 - t0, "seconds_evidence": time.perf_counter() - t1,
    }
    return out


def _prefixes(n: int) -> list:
    """1, 2, 4, ... below ``n``, then ``n``: how many label draws each reported Fisher averages."""
    out, m = [], 1
    while m < n:
        out.append(m)
        m *= 2
    return out + [n]


def _diag_gamma_theta(F, tau: float, g: float) -> float:
    from bora.fit.tau import _global_terms

    return _global_terms(tau, F, g)[1]


def write(out: Path, res: dict, argv) -> None:
    from bora.core.files import write_json, write_text

    res = {"command": "python analysis/tau_curvature.py " + " ".join(argv), **res}
    t = res["tau"]
    labels = {"empirical": "the documents' own next tokens (empirical Fisher)",
              "sampled": "next tokens drawn from the fit's predictive (Monte-Carlo true Fisher), "
                         "averaged over the first m draws"}[res.get("labels", "empirical")]
    lines = [f"# tau under the diagonal and the full (low-rank) Fisher at `{res['fit']}`", "",
             f"S = {res['S']:.6g} (summed squared task deviations), {res['coordinates_per_task']} task-level "
             f"coordinates per task, {res['rank']['documents']} documents' gradients (rank {res['rank']['total']}). "
             f"The fit's tau: {res['tau_fit']:.4g} ({res['tau_evidence_fit']} evidence, diagonal curvature).", "",
             f"Labels: {labels}.", "",
             "| label draws | curvature | rank | gamma at the fit's tau | gamma_Theta there | tau, profiled | "
             "tau, integrated |",
             "|---|---|---|---|---|---|---|"]
    for r in res.get("by_samples", [res]):
        m, rt, rg, rgt = r.get("samples", 1), r["tau"], r["gamma_at_fit_tau"], r["gamma_theta_at_fit_tau"]
        lines += [f"| {m} | diagonal | | {rg['diag']:.4g} | {rgt['diag']:.4g} | {rt['diag_profiled']:.4g} | "
                  f"{rt['diag_integrated']:.4g} |",
                  f"| {m} | full (low-rank) | {r['rank']['total']} | {rg['lowrank']:.4g} | {rgt['lowrank']:.4g} | "
                  f"{rt['lowrank_profiled']:.4g} | {rt['lowrank_integrated']:.4g} |"]
    lines += ["",
             f"Diagonal over full, integrated: {t['diag_integrated'] / t['lowrank_integrated']:.2f}x.", "",
             f"Command: `{res['command']}`  ",
             f"Wall time: gradients {res['seconds_gradients'] / 60:.1f} min, evidence {res['seconds_evidence']:.0f} s"]
    write_json(out / "tau_curvature.json", res)
    write_text(out / "tau_curvature.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("fit", type=Path, help="a folder written by `bora fit` (learned tau, guide map or laplace)")
    p.add_argument("--out", type=Path, required=True, help="folder for tau_curvature.json / .md")
    p.add_argument("--docs", type=int, default=None, help="training documents per task (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the document subset with --docs")
    p.add_argument("--labels", choices=["empirical", "sampled"], default="empirical",
                   help="the documents' own next tokens (empirical Fisher) or tokens drawn from the fit's predictive "
                        "(a Monte-Carlo sample of the true Fisher, whose rank is not capped by the documents)")
    p.add_argument("--label-samples", type=int, default=1,
                   help="with --labels sampled: label draws per document; the Fisher averaged over the first "
                        "1, 2, 4, ... of them is reported, so the rank's effect shows")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.label_samples < 1 or (args.label_samples > 1 and args.labels != "sampled"):
        p.error("--label-samples must be >= 1, and > 1 only with --labels sampled")
    if args.docs is not None and args.docs < 1:
        p.error("--docs must be >= 1")
    res = run(args)
    write(args.out, res, sys.argv[1:] if argv is None else argv)
    return res


if __name__ == "__main__":
    main()
