"""Does any width of the Laplace posterior beat the MAP on held-out documents? A sweep of the posterior's scale.

    python analysis/posterior_scale.py runs/shakespeare --samples 8 --scales 1 0.5 0.25 0.125

Every posterior draw ``theta_s`` of the fit's posterior is moved to ``theta* + c (theta_s - theta*)`` (``c = 1``:
the posterior itself; ``c -> 0``: the MAP; ``c^2`` is a posterior temperature) and the document-level BMA
``-log mean_s p(doc | theta_s)`` is scored on the validation and test splits, as the paper's perplexity
``exp(mean over tasks of the per-task NLL per token)``. If some ``c`` gave a lower validation NLL than the MAP it
would be the width to use; the sweep shows whether one does. Writes ``posterior_scale.json`` / ``.md`` to
``--out``.

``--estimator tilted`` scores the same quantity as ``bora evaluate`` does (:mod:`bora.evaluation.tilted`) instead of
the plain
log-mean-exp: importance sampling from the equal mixture of the scaled posterior (diagonal Laplace, ``sd -> c sd``,
the same draws) and its copy tilted by each document's gradient, which removes most of the bias the plain estimate
has when a document's log-likelihood varies by nats over the draws. Run both at a width where the plain estimate is
reliable to check one against the other.
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
    from bora.evaluation.evaluate import doc_loglik
    from bora.evaluation.metrics import log_mean_exp
    from bora.evaluation.tilted import tilted_bma_loglik

    t0 = time.perf_counter()
    bora = Bora.load(args.fit, device="cpu")
    if bora.laplace is None and bora.config.fit.guide != "meanfield":
        sys.exit("bora: error: this MAP fit has no posterior; run `bora laplace FIT_DIR` first")
    data = load_data(bora.config, bora.tokenizer, tasks=bora.tasks)
    post = bora.posterior(args.samples, seed=args.seed)
    point = bora.params()
    lap = bora.laplace
    samples = [] if args.estimator == "tilted" else [post.params(k) for k in range(args.samples)]
    T = len(bora.tasks)
    rows = {}
    for split in ("val", "test"):
        feed = bora.feed(data[split])
        tids = data[split].task_ids

        def ppl(nll, tok):
            per = torch.zeros(T, dtype=torch.float64).index_add_(0, tids, nll.double())
            n = torch.zeros(T, dtype=torch.float64).index_add_(0, tids, tok.double())
            mean = float((per / n).mean())
            return mean, math.exp(mean)

        ll0, tok = doc_loglik(bora.model, point, feed, bora.config.fit.eval_batch_size)
        rows[split] = {"map": ppl(-ll0, tok)}
        for c in args.scales:
            if args.estimator == "tilted":
                bora.laplace = scaled(lap, c)
                est = tilted_bma_loglik(bora.posterior(args.samples, seed=args.seed), feed,
                                        bora.config.fit.eval_batch_size)[0]
                rows[split][str(c)] = ppl(-est, tok)
                continue
            lls = []
            for s in samples:
                moved = {k: tuple(p + c * (x - p) for p, x in zip(point[k], s[k])) for k in point}
                lls.append(doc_loglik(bora.model, moved, feed, bora.config.fit.eval_batch_size)[0])
            rows[split][str(c)] = ppl(-log_mean_exp(torch.stack(lls).double(), 0), tok)
    return {"fit": str(args.fit), "samples": args.samples, "seed": args.seed, "scales": args.scales,
            "estimator": args.estimator,
            "structure": bora.laplace.structure if bora.laplace is not None else None,
            "rows": rows, "seconds": time.perf_counter() - t0}


def scaled(lap, c: float):
    """The diagonal Laplace posterior with every task sd multiplied by ``c`` (curvature ``(F + tau) / c^2 - tau``)."""
    from bora.posterior.laplace import HierarchicalLaplace

    if lap is None or lap.structure != "diag" or lap.sample_global or not 0 < c:
        sys.exit("bora: error: --estimator tilted needs a diagonal Laplace posterior and scales > 0")
    task = {k: {i: (F + lap._prior_prec(k)) / c ** 2 - lap._prior_prec(k) for i, F in fs.items()}
            for k, fs in lap.task.items()}
    return HierarchicalLaplace(task, lap.tau, global_scale=lap.global_scale, has_global=lap.has_global,
                               sample_global=False)


def write(out: Path, res: dict, argv) -> None:
    from bora.core.files import write_json

    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "posterior_scale.json", res)
    lines = ["# Width of the posterior vs the MAP: document-level BMA", "",
             f"Fit `{res['fit']}`, {res['samples']} posterior samples (seed {res['seed']}), Laplace structure "
             f"`{res['structure']}`, estimator `{res.get('estimator', 'plain')}`. Entries: NLL per token (mean over "
             "tasks) / perplexity.", "",
             "| scale c | validation | test |", "|---|---|---|"]
    for key in ["map"] + [str(c) for c in res["scales"]]:
        name = "MAP (c = 0)" if key == "map" else key
        v, t = res["rows"]["val"][key], res["rows"]["test"][key]
        lines.append(f"| {name} | {v[0]:.4f} / {v[1]:.3f} | {t[0]:.4f} / {t[1]:.3f} |")
    lines += ["", f"Command: `{' '.join(argv)}`  ", f"Wall time: {res['seconds'] / 60:.1f} min"]
    (out / "posterior_scale.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("fit", type=Path, help="a fit folder with a posterior (Laplace or mean-field)")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scales", type=float, nargs="+", default=[1.0, 0.5, 0.25, 0.125])
    p.add_argument("--estimator", choices=["plain", "tilted"], default="plain",
                   help="document-level BMA: plain log-mean-exp, or importance sampling tilted by the gradient")
    p.add_argument("--out", type=Path, default=Path("analysis/results/uncertainty"))
    args = p.parse_args(argv)
    if args.samples < 1 or any(c < 0 for c in args.scales):
        p.error("--samples must be >= 1 and every scale >= 0")
    res = run(args)
    write(args.out, res, ["python", "analysis/posterior_scale.py"] + argv)
    print((args.out / "posterior_scale.md").read_text())
    return res


if __name__ == "__main__":
    main()
