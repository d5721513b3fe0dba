"""Does the posterior's uncertainty tell the user something? Seen-task test documents vs an unseen speaker vs
text from outside the training distribution, on a saved fit with a posterior (Laplace or mean-field).

    python analysis/uncertainty.py runs/shakespeare --samples 8 --out analysis/results/uncertainty
    python analysis/uncertainty.py RUN --unseen othello/OTHELLO --docs 60
    python analysis/uncertainty.py runs/shakespeare --predictive linear --out analysis/results/uncertainty/linear

For every group it computes, per document, the mean per-token mutual information between the next token and
the adapter (``mean_s KL(p_s || p_bar)``, the epistemic part of the predictive uncertainty) under ``S``
posterior adapter samples:

* **seen**: test documents of the fitted tasks, each under its own task's adapter;
* **unseen task**: speeches of a speaker the fit never saw, under the prior-predictive adapter of a new task
  (``theta_new ~ N(Theta, 1/tau)`` per sample: the cold-start adapter);
* **out of distribution**: modern English prose and Python source (bora's own README and code, cut into
  documents of the fit's length), also under the new-task adapter.

It also reports the test split's point vs document-level BMA NLL, ECE and Brier (``Posterior.evaluate``),
and the AUROC of telling each group from the seen documents by their MI. Writes ``uncertainty.json`` and
``uncertainty.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def auroc(neg, pos) -> float:
    """P(score of a positive > score of a negative) (ties count 1/2): the Mann-Whitney AUROC."""
    import numpy as np

    neg, pos = np.asarray(neg, float), np.asarray(pos, float)
    gt = (pos[:, None] > neg[None, :]).mean()
    eq = (pos[:, None] == neg[None, :]).mean()
    return float(gt + 0.5 * eq)


def _chunks(text: str, tokenizer, length: int, limit: int) -> list:
    import torch

    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    out = [torch.tensor(ids[i:i + length]) for i in range(0, len(ids) - length + 1, length)]
    return out[:limit]


def _doc_mi(post, task: str, docs) -> list[float]:
    out = []
    for ids in docs:
        u = post.token_uncertainty(task, ids.unsqueeze(0))
        out.append(float(u["mutual_information"].mean()))
    return out


def run(args) -> dict:
    import torch

    from bora.api import Bora, load_data
    from bora.data.shakespeare import load_shakespeare

    torch.manual_seed(0)
    t0 = time.perf_counter()
    bora = Bora.load(args.fit, device="cpu")
    if bora.config.fit.guide == "map" and bora.laplace is None:
        sys.exit("bora: error: this MAP fit has no posterior; run `bora laplace FIT_DIR` first")
    post = bora.posterior(args.samples, seed=args.seed, predictive=args.predictive)
    data = load_data(bora.config, bora.tokenizer, tasks=bora.tasks)
    test = data["test"]
    res = post.evaluate(test, batch_size=4, progress=not args.quiet)
    L = bora.config.data.max_length
    seen_idx = torch.randperm(len(test), generator=torch.Generator().manual_seed(args.seed))[: args.docs]
    seen = _doc_mi_by_task(post, test, seen_idx)
    unseen_docs = [d["text"] for d in load_shakespeare((args.unseen,))]
    unseen_ids = []
    for text in unseen_docs:
        ids = bora.tokenizer(text, add_special_tokens=True)["input_ids"][:L]
        if len(ids) >= 8:
            unseen_ids.append(torch.tensor(ids))
    unseen_ids = unseen_ids[: args.docs]
    new = "a task not in the fit"
    groups = {"seen": seen, "unseen task": _doc_mi(post, new, unseen_ids)}
    prose = (ROOT / "README.md").read_text()
    code = "\n".join(p.read_text() for p in sorted((ROOT / "src" / "bora").glob("*.py")))
    groups["OOD: modern English"] = _doc_mi(post, new, _chunks(prose, bora.tokenizer, L, args.docs))
    groups["OOD: Python code"] = _doc_mi(post, new, _chunks(code, bora.tokenizer, L, args.docs))
    summary = {}
    for name, mi in groups.items():
        summary[name] = {"docs": len(mi), "mean_mi": sum(mi) / max(1, len(mi)),
                         "auroc_vs_seen": None if name == "seen" else auroc(groups["seen"], mi)}
    p, bd, bt = res["point"], res["bma_doc"], res["bma_token"]
    return {"fit": str(args.fit), "guide": bora.config.fit.guide, "laplace": bora.laplace is not None,
            "samples": args.samples, "seed": args.seed, "predictive": args.predictive, "unseen": args.unseen,
            "test": {"point_nll_token": p["tokens"]["nll"], "bma_doc_nll_token": bd["overall"]["nll_token"],
                     "point_ppl_task_mean": p["overall"]["ppl_task_mean"],
                     "bma_doc_ppl_task_mean": bd["overall"]["ppl_task_mean"],
                     "point_ece": p["tokens"]["ece"], "bma_token_ece": bt["tokens"]["ece"],
                     "point_brier": p["tokens"]["brier"], "bma_token_brier": bt["tokens"]["brier"],
                     "bma_token_mi": bt["tokens"]["mutual_information"]},
            "groups": summary, "per_doc_mi": groups, "seconds": time.perf_counter() - t0}


def _doc_mi_by_task(post, split, idx) -> list[float]:
    out = []
    for i in idx.tolist():
        task = split.tasks[int(split.task_ids[i])]
        u = post.token_uncertainty(task, split.input_ids[i].unsqueeze(0))
        out.append(float(u["mutual_information"].mean()))
    return out


def write(out: Path, result: dict, argv) -> None:
    from bora.core.files import write_json

    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "uncertainty.json", result)
    t = result["test"]
    lines = ["# Posterior uncertainty on the embedded default", "",
             f"Fit: `{result['fit']}` (guide `{result['guide']}`, Laplace posterior: {result['laplace']}); "
             f"{result['samples']} posterior samples, seed {result['seed']}, "
             f"{result.get('predictive', 'sample')} predictive.", "",
             "| test split | point (MAP) | posterior |", "|---|---|---|",
             f"| NLL per token (posterior: document-level BMA) | {t['point_nll_token']:.4f} "
             f"| {t['bma_doc_nll_token']:.4f} |",
             f"| perplexity exp(mean per-task NLL) | {t['point_ppl_task_mean']:.3f} "
             f"| {t['bma_doc_ppl_task_mean']:.3f} |",
             f"| ECE, 15 bins (posterior: token-level BMA) | {t['point_ece']:.4f} | {t['bma_token_ece']:.4f} |",
             f"| Brier (token-level BMA) | {t['point_brier']:.4f} | {t['bma_token_brier']:.4f} |", "",
             "| documents | n | mean MI per token (nats) | AUROC vs seen |", "|---|---|---|---|"]
    for name, g in result["groups"].items():
        au = "" if g["auroc_vs_seen"] is None else f"{g['auroc_vs_seen']:.3f}"
        lines.append(f"| {name} | {g['docs']} | {g['mean_mi']:.3g} | {au} |")
    lines += ["", f"Command: `{' '.join(argv)}`  ", f"Wall time: {result['seconds'] / 60:.1f} min"]
    (out / "uncertainty.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("fit", type=Path, help="a fit folder with a posterior (Laplace or mean-field)")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--docs", type=int, default=60, help="documents per group")
    p.add_argument("--unseen", default="othello/OTHELLO", help="a Shakespeare speaker not in the fit")
    p.add_argument("--predictive", choices=("linear", "sample"), default="sample",
                   help="linearised (GLM) predictive at the point estimate, or the network at each sampled adapter")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--out", type=Path, default=Path("analysis/results/uncertainty"))
    args = p.parse_args(argv)
    result = run(args)
    write(args.out, result, ["python", "analysis/uncertainty.py"] + argv)
    print((args.out / "uncertainty.md").read_text())
    return result


if __name__ == "__main__":
    main()
