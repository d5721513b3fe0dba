"""The posterior average (document-level BMA) against the MAP point, over several posterior seeds, with a paired
interval: the perplexity headline's figure, recomputable from the evaluations it reads.

    for s in 0 1 2; do bora evaluate runs/shakespeare --samples 64 --seed $s --json runs/bma_s$s.json; done
    python analysis/bma_seeds.py runs/bma_s0.json runs/bma_s1.json runs/bma_s2.json --out analysis/results/x.json

Each input is one ``bora evaluate FIT --samples S --seed k --json`` of the same fit and split (a Laplace or
mean-field fit; plain text), so the documents, their tokens and the point estimate's per-document NLL are the same
in every file (checked) and only the posterior draws differ. Reported, from the per-document NLL sums
(``posterior.documents.nll_point``, ``nll_bma_doc``):

* per seed and averaged: the NLL per token (mean over tasks) and the perplexity (exp of it) of the MAP point and of
  the BMA (``bma_doc``: ``-log mean_s p(doc | theta_s)``, by the estimator the evaluation used);
* the paired interval of BMA minus MAP in perplexity, documents resampled within tasks and the posterior seeds
  resampled (:func:`bora.evaluation.evaluate.seeds_bootstrap`; 2000 resamples, 95%): negative favours the BMA.

Writes ``--out`` (JSON, with the per-document NLLs and the command) and the same name ``.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np


def load(path: Path) -> dict:
    """One evaluation's per-document NLLs, tokens and task ids, with its samples, seed and estimator."""
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        sys.exit(f"bma_seeds: cannot read {path}: {e}")
    split = d.get("split")
    d = d.get("posterior") or {}
    docs = d.get("documents")
    if not docs or "nll_bma_doc" not in docs:
        sys.exit(f"bma_seeds: {path} holds no per-document BMA (run `bora evaluate FIT --samples S --json ...` "
                 "on a Laplace or mean-field fit of plain text)")
    return {"point": np.asarray(docs["nll_point"], np.float64), "bma": np.asarray(docs["nll_bma_doc"], np.float64),
            "tokens": np.asarray(docs["tokens"], np.float64), "task_ids": np.asarray(docs["task_ids"], np.int64),
            "samples": d.get("samples"), "seed": d.get("seed"), "estimator": d.get("doc_estimator"),
            "split": split}


def task_mean_nll(nll: np.ndarray, tokens: np.ndarray, task_ids: np.ndarray) -> float:
    """Mean over tasks (with tokens) of each task's NLL per token."""
    per = [nll[task_ids == t].sum() / tokens[task_ids == t].sum() for t in np.unique(task_ids)
           if tokens[task_ids == t].sum() > 0]
    return float(np.mean(per))


def summarize(runs: list[dict], resamples: int = 2000, level: float = 0.95, seed: int = 0) -> dict:
    """Per seed and averaged NLL/perplexity of the point and the BMA, and the paired interval of their difference."""
    from bora.evaluation.evaluate import seeds_bootstrap

    first = runs[0]
    for i, r in enumerate(runs[1:], 1):
        same = (r["tokens"].shape == first["tokens"].shape and np.array_equal(r["tokens"], first["tokens"])
                and np.array_equal(r["task_ids"], first["task_ids"]) and np.allclose(r["point"], first["point"]))
        if not same:
            sys.exit(f"bma_seeds: evaluation {i} scores other documents or another point estimate than the first")
    tok, tid = first["tokens"], first["task_ids"]
    per_seed = [{"seed": r["seed"], "samples": r["samples"], "estimator": r["estimator"],
                 "nll_point": task_mean_nll(r["point"], tok, tid), "nll_bma": task_mean_nll(r["bma"], tok, tid)}
                for r in runs]
    boot = seeds_bootstrap(np.stack([r["bma"] for r in runs]), np.stack([r["point"] for r in runs]), tok, tid,
                           resamples=resamples, level=level, seed=seed)
    nll_p = float(np.mean([p["nll_point"] for p in per_seed]))
    nll_b = float(np.mean([p["nll_bma"] for p in per_seed]))
    return {"split": first["split"], "documents": int(len(tok)), "tasks": int(len(np.unique(tid))),
            "seeds": len(runs), "per_seed": per_seed, "nll_point": nll_p, "nll_bma": nll_b,
            "ppl_point": math.exp(nll_p), "ppl_bma": math.exp(nll_b),
            "paired": {k: boot[k] for k in ("diff", "lo", "hi", "level", "resamples", "per_seed", "frac_a_lower")},
            "doc_nll": {"tokens": tok.tolist(), "task_ids": tid.tolist(), "point": first["point"].tolist(),
                        "bma": [r["bma"].tolist() for r in runs]}}


def markdown(s: dict) -> str:
    p = s["paired"]
    lines = [f"# Document-level BMA against the MAP point, {s['seeds']} posterior seeds ({s['split']} split, "
             f"{s['documents']} documents of {s['tasks']} tasks)", "",
             "NLL per token (mean over tasks) / perplexity (exp of it).", "",
             "| posterior seed | samples | estimator | MAP point | BMA |", "|---|---|---|---|---|"]
    for r in s["per_seed"]:
        lines.append(f"| {r['seed']} | {r['samples']} | {r['estimator']} | {r['nll_point']:.4f} / "
                     f"{math.exp(r['nll_point']):.3f} | {r['nll_bma']:.4f} / {math.exp(r['nll_bma']):.3f} |")
    lines += [f"| mean | | | {s['nll_point']:.4f} / {s['ppl_point']:.3f} | {s['nll_bma']:.4f} / {s['ppl_bma']:.3f} |",
              "", f"BMA minus MAP, perplexity: {p['diff']:+.3f}, {round(100 * p['level'])}% interval "
              f"[{p['lo']:+.3f}, {p['hi']:+.3f}] (documents within tasks and posterior seeds resampled, "
              f"{p['resamples']} resamples; per seed {', '.join(f'{x:+.3f}' for x in p['per_seed'])}).", "",
              f"Command: `{s['command']}`"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("evaluations", nargs="+", type=Path, help="`bora evaluate --samples S --seed k --json` files")
    p.add_argument("--out", type=Path, required=True, help="summary JSON (its table goes to the same name .md)")
    p.add_argument("--resamples", type=int, default=2000)
    p.add_argument("--level", type=float, default=0.95)
    args = p.parse_args(argv)
    if args.out.suffix != ".json":
        sys.exit("bma_seeds: --out must name a .json file")
    from bora.core.files import write_json, write_text

    s = summarize([load(x) for x in args.evaluations], args.resamples, args.level)
    s = {"command": "python analysis/bma_seeds.py " + " ".join(sys.argv[1:] if argv is None else argv),
         "files": [str(x) for x in args.evaluations], **s}
    write_json(args.out, s)
    md = markdown(s)
    write_text(args.out.with_suffix(".md"), md)
    print(md)
    return s


if __name__ == "__main__":
    main()
