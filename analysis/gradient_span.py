"""How much does the Laplace posterior narrow the prediction of a held-out document, against a training one?

    python analysis/gradient_span.py runs/shakespeare --docs 64

For a document ``d`` of task ``t`` with log-likelihood gradient ``g`` (labels sampled from the model, so ``g g^T``
is one draw of its Gauss-Newton curvature), the linearised posterior variance of its log-likelihood is
``g^T Sigma_t g``; under the prior alone it is ``g^T g / tau``. Their ratio is 1 where the task's data say nothing
about ``g``'s direction and near 0 where they pin it down. The script builds both Laplace posteriors of the fit
(diagonal and low-rank, :mod:`bora.posterior.laplace`; not saved) from up to ``--docs`` training documents per task,
then
reports the ratio's median and quartiles for those training documents and for every test document of the same
tasks. Writes ``gradient_span.json`` / ``.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def run(args) -> dict:
    import torch

    from bora.api import Bora, load_data
    from bora.fit.fisher import task_fisher
    from bora.posterior.laplace import HierarchicalLaplace, task_layout

    t0 = time.perf_counter()
    torch.manual_seed(0)
    bora = Bora.load(args.fit, device="cpu")
    if not bora.model.has_tasks:
        sys.exit("bora: error: this fit has no task-level adapters")
    data = load_data(bora.config, bora.tokenizer, tasks=bora.tasks)
    lap = bora.fit_laplace_(data["train"], docs=args.docs, structure="lowrank", progress=not args.quiet)
    diag = HierarchicalLaplace(lap.task, lap.tau, global_scale=lap.global_scale, has_global=lap.has_global)
    test = task_fisher(bora.model, bora.params(), bora.feed(data["test"]), labels="sampled",
                       generator=torch.Generator().manual_seed(args.seed), gradients=task_layout(bora.model))

    def ratios(G, t):
        prior_var = lap.task_variance(t, G, prior=True)
        return lap.task_variance(t, G) / prior_var, diag.task_variance(t, G) / prior_var

    out = {"train": {"lowrank": [], "diag": []}, "test": {"lowrank": [], "diag": []}}
    for t in range(len(bora.tasks)):
        for name, G in (("train", lap.gradients[t]), ("test", test.gradients[t])):
            if G.shape[1]:
                lo, di = ratios(G, t)
                out[name]["lowrank"] += lo.tolist()
                out[name]["diag"] += di.tolist()
    summary = {}
    for name, kinds in out.items():
        for kind, xs in kinds.items():
            q = torch.tensor(xs).quantile(torch.tensor([0.25, 0.5, 0.75]))
            summary[f"{name} {kind}"] = {"docs": len(xs), "q25": float(q[0]), "median": float(q[1]), "q75": float(q[2])}
    return {"fit": str(args.fit), "docs_per_task": args.docs, "summary": summary, "seconds": time.perf_counter() - t0}


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("fit", type=Path, help="a MAP or Laplace fit folder")
    p.add_argument("--docs", type=int, default=64, help="training documents per task for the curvature")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--out", type=Path, default=Path("analysis/results/uncertainty"))
    args = p.parse_args(argv)
    res = run(args)
    from bora.core.files import write_json

    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "gradient_span.json", res)
    lines = ["# Posterior / prior variance of a document's log-likelihood (linearised)", "",
             f"Fit `{res['fit']}`; curvature from up to {res['docs_per_task']} training documents per task.", "",
             "| documents, posterior | n | 25% | median | 75% |", "|---|---|---|---|---|"]
    for name, s in res["summary"].items():
        lines.append(f"| {name} | {s['docs']} | {s['q25']:.3f} | {s['median']:.3f} | {s['q75']:.3f} |")
    lines += ["", f"Command: `python analysis/gradient_span.py {' '.join(argv)}`  ",
              f"Wall time: {res['seconds'] / 60:.1f} min"]
    (args.out / "gradient_span.md").write_text("\n".join(lines) + "\n")
    print((args.out / "gradient_span.md").read_text())
    return res


if __name__ == "__main__":
    main()
