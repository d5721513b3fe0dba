"""Can any width of the posterior beat the MAP on held-out documents? The second-order answer, per task.

    python analysis/bma_gain.py runs/shakespeare --draws 4

Around the MAP, with the linearised predictive and the fit's Gaussian posterior ``Sigma_t`` (its Laplace
posterior, scaled by ``c^2``), a held-out document ``d`` with log-likelihood gradient ``g_d`` (its own next
tokens) and Gauss-Newton curvature ``H_d`` has

    log BMA(d) - log p(d | MAP)  ~  c^2/2 (g_d^T Sigma_t g_d - tr(H_d Sigma_t))

to second order: the Jensen gain of averaging over the posterior against the curvature it pays for. ``tr(H_d
Sigma_t)`` is the expected value of ``g~^T Sigma_t g~`` for a gradient ``g~`` whose labels are drawn from the
model (:func:`bora.fit.fisher.task_fisher` with ``labels='sampled'``; ``--draws`` draws averaged). So the BMA can
beat the MAP on a document only where its realised gradient is larger, in the posterior's directions, than the
model itself expects: where the MAP is detectably wrong about it. The sign of the difference does not depend on
``c``: if it is negative for a task, no narrowing or widening of the posterior helps there (to second order).
The script reports, per task, both terms summed over the task's test documents and divided by its tokens
(nats/token), and their ratio; the mean over tasks is comparable with the BMA - MAP NLL of
``analysis/uncertainty.py``. Writes ``bma_gain.json`` / ``.md`` to ``--out``.
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
    from bora.posterior.laplace import task_layout

    t0 = time.perf_counter()
    bora = Bora.load(args.fit, device="cpu")
    if bora.laplace is None:
        sys.exit("bora: error: this fit has no Laplace posterior; run `bora laplace FIT_DIR` first")
    data = load_data(bora.config, bora.tokenizer, tasks=bora.tasks)
    split = data[args.split]
    feed, point, layout = bora.feed(split), bora.params(), task_layout(bora.model)
    T = len(bora.tasks)

    def summed_variance(labels: str, seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        tf = task_fisher(bora.model, point, feed, labels=labels, generator=gen, gradients=layout)
        # a task's columns are scaled by sqrt(N_t / n_t) = 1 here (every document of the split is used)
        return torch.tensor([float(bora.laplace.task_variance(t, G).sum()) if G.shape[1] else 0.0
                             for t, G in enumerate(tf.gradients)], dtype=torch.float64)

    real = summed_variance("empirical", args.seed)
    model = torch.stack([summed_variance("sampled", args.seed + 1 + k) for k in range(args.draws)]).mean(0)
    tokens = torch.zeros(T, dtype=torch.float64).index_add_(0, split.task_ids, (split.lengths - 1).double())
    rows = []
    for t, name in enumerate(bora.tasks):
        n = float(tokens[t])
        rows.append({"task": name, "tokens": n, "realised": float(real[t]) / 2 / n,
                     "expected": float(model[t]) / 2 / n, "ratio": float(real[t] / model[t])})
    mean = {k: sum(r[k] for r in rows) / T for k in ("realised", "expected")}
    sampled = _sampled_check(bora, feed, split.task_ids, tokens, args.samples, args.seed) if args.samples else None
    return {"sampled": sampled, "fit": str(args.fit), "split": args.split, "draws": args.draws, "seed": args.seed,
            "structure": bora.laplace.structure, "rows": rows,
            "mean_realised": mean["realised"], "mean_expected": mean["expected"],
            "mean_gain": mean["realised"] - mean["expected"],
            "tasks_with_gain": sum(r["ratio"] > 1 for r in rows), "seconds": time.perf_counter() - t0}


def _sampled_check(bora, feed, task_ids, tokens, S: int, seed: int) -> dict:
    """The same terms from ``S`` posterior draws of the fit (the sampled predictive), per document ``d``:
    ``mean_s L_s - L_0`` (the curvature cost, expected ``-1/2 tr(H Sigma)``), ``var_s L_s / 2`` (the Jensen gain,
    expected ``1/2 g^T Sigma g``), the ``S``-sample document-level BMA ``log mean_s exp L_s - L_0`` (what
    ``bora evaluate --samples S`` reports; biased low when ``var_s L_s`` is large) and the normal-theory estimate
    ``mean + var / 2 - L_0``; each summed per task over its documents, divided by its tokens, averaged over
    tasks (nats/token)."""
    import torch

    from bora.evaluation.evaluate import doc_loglik
    from bora.evaluation.metrics import log_mean_exp

    bs = bora.config.fit.eval_batch_size
    ll0 = doc_loglik(bora.model, bora.params(), feed, bs)[0].double()
    post = bora.posterior(S, seed=seed)
    lls = torch.stack([doc_loglik(bora.model, post.params(k), feed, bs)[0].double() for k in range(S)])
    mean, var = lls.mean(0), lls.var(0)
    T = len(tokens)

    def per_token(x):
        return float((torch.zeros(T, dtype=torch.float64).index_add_(0, task_ids, x) / tokens).mean())

    return {"samples": S, "cost": per_token(mean - ll0), "half_var": per_token(var / 2),
            "bma_lme": per_token(log_mean_exp(lls, 0) - ll0), "bma_normal": per_token(mean + var / 2 - ll0),
            "doc_sd_median": float(var.sqrt().median())}


def write(out: Path, res: dict, argv) -> None:
    from bora.core.files import write_json

    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "bma_gain.json", res)
    lines = ["# Second-order BMA - MAP gain per task (linearised, the fit's Laplace posterior)", "",
             f"Fit `{res['fit']}`, {res['split']} split, Laplace structure `{res['structure']}`, {res['draws']} "
             "sampled-label draws. Entries in nats/token at the posterior itself (c = 1; both terms scale with "
             "c^2): the Jensen gain 1/2 sum_d g_d^T Sigma g_d (realised labels), the curvature cost "
             "1/2 sum_d tr(H_d Sigma) (its expectation under the model), and realised/expected.", "",
             "| task | tokens | realised 1/2 gSg | expected 1/2 tr(H Sigma) | ratio |", "|---|---:|---:|---:|---:|"]
    for r in res["rows"]:
        lines.append(f"| {r['task']} | {r['tokens']:.0f} | {r['realised']:.4f} | {r['expected']:.4f} | "
                     f"{r['ratio']:.3f} |")
    lines += ["", f"Mean over tasks: realised {res['mean_realised']:.4f}, expected {res['mean_expected']:.4f}, "
              f"predicted BMA - MAP gain {res['mean_gain']:+.4f} nats/token; tasks where the realised term is the "
              f"larger: {res['tasks_with_gain']} of {len(res['rows'])}.", ""]
    c = res.get("sampled")
    if c:
        lines += [f"The same from {c['samples']} posterior draws (sampled predictive), nats/token, mean over tasks: "
                  f"curvature cost mean_s L_s - L_0 = {c['cost']:+.4f} (second-order: {-res['mean_expected']:+.4f}); "
                  f"Jensen gain var_s L_s / 2 = {c['half_var']:.4f} (second-order: {res['mean_realised']:.4f}); "
                  f"document-level BMA - MAP from log mean_s exp L_s: {c['bma_lme']:+.4f}; from the normal-theory "
                  f"mean + var/2: {c['bma_normal']:+.4f}. Median sd of a document's log-likelihood over the draws: "
                  f"{c['doc_sd_median']:.2f} nats.", ""]
    lines += [f"Command: `python analysis/bma_gain.py {' '.join(argv)}`  ",
              f"Wall time: {res['seconds'] / 60:.1f} min"]
    (out / "bma_gain.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("fit", type=Path, help="a fit folder with a Laplace posterior")
    p.add_argument("--split", choices=["test", "val"], default="test")
    p.add_argument("--draws", type=int, default=4, help="sampled-label gradients per document (averaged)")
    p.add_argument("--samples", type=int, default=0,
                   help="also measure both terms from this many posterior draws of the fit (0: skip)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("analysis/results/uncertainty"))
    args = p.parse_args(argv)
    if args.draws < 1:
        p.error("--draws must be >= 1")
    res = run(args)
    write(args.out, res, argv)
    print((args.out / "bma_gain.md").read_text())
    return res


if __name__ == "__main__":
    main()
