"""Compare two saved fits of the same data on its test split: per-document NLL and a paired document bootstrap.

    python analysis/compare_fits.py runs/a runs/b --out analysis/results/early_stopping/compare.json
    python analysis/compare_fits.py baseline.json runs/b --out ...   # a baseline's per-document NLL (JSON) as a

A JSON file in place of ``a`` holds a baseline's ``doc_nll``, ``tokens``, ``tasks`` and ``task_ids`` in the
fit's test order (``analysis/per_task_lora.py`` writes one).

Both fits must hold the same tasks and test documents (the same data, split and seed); the second is the
reference (``diff = ppl(a) - ppl(b)``, negative when ``a`` is better). The JSON holds both fits' test
perplexity, the bootstrap interval (2000 resamples within each task, 95%), each fit's per-document NLL and
the tokens and tasks needed to recompute every figure, and the two fits' configs, best steps and validation
histories (with tau).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def doc_nll(fit_dir: Path):
    """``(bora, test feed, per-document NLL, tokens)`` of the fit in ``fit_dir`` on its test split."""
    from bora import Bora
    from bora.diagnostics.view import fit_splits
    from bora.evaluation.evaluate import doc_loglik

    bora = Bora.load(fit_dir, device="cpu")
    test = fit_splits(bora)["test"]
    feed = bora.feed(test)
    ll, toks = doc_loglik(bora.model, bora.params(), feed, bora.config.fit.eval_batch_size)
    return bora, test, (-ll).double(), toks


def _history(bora) -> list:
    """Each validation's step, validation NLL and perplexity, and tau (trained under, and after its update)."""
    keys = ("step", "val_nll", "val_ppl", "tau_trained", "tau")
    return [{k: h[k] for k in keys if k in h} for h in bora.result.history]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a", type=Path, help="fit folder a")
    p.add_argument("b", type=Path, help="fit folder b (the reference)")
    p.add_argument("--out", type=Path, required=True, help="JSON file to write")
    args = p.parse_args(argv)
    from bora.core.files import write_json
    from bora.evaluation.evaluate import paired_bootstrap, summarize

    bora_b, test_b, nll_b, toks_b = doc_nll(args.b)
    if args.a.suffix == ".json":
        base = json.loads(args.a.read_text())
        bora_a, nll_a, toks = None, torch.tensor(base["doc_nll"], dtype=torch.float64), torch.tensor(base["tokens"])
        tasks_a = tuple(base["tasks"])
        if base["task_ids"] != test_b.task_ids.tolist():
            sys.exit("compare_fits: the baseline's documents are not in the fit's test order")
    else:
        bora_a, test_a, nll_a, toks = doc_nll(args.a)
        tasks_a = test_a.tasks
        if test_a.task_ids.tolist() != test_b.task_ids.tolist():
            sys.exit("compare_fits: the two fits' test documents are in different orders")
    if tasks_a != test_b.tasks or toks.shape != toks_b.shape or not bool((toks == toks_b).all()):
        sys.exit("compare_fits: the two fits were not made on the same test documents")
    ids = test_b.task_ids
    r = paired_bootstrap(nll_a, nll_b, toks, ids, tasks=test_b.tasks, resamples=2000, level=0.95)
    out = {"command": "python analysis/compare_fits.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "a": str(args.a), "b": str(args.b),
           "ppl_a": summarize(nll_a, toks, ids, test_b.tasks)["overall"]["ppl_task_mean"],
           "ppl_b": summarize(nll_b, toks, ids, test_b.tasks)["overall"]["ppl_task_mean"],
           "bootstrap": {k: r[k] for k in ("diff", "lo", "hi", "level", "resamples", "frac_a_lower", "per_task")},
           "best_step": {"a": bora_a.result.best_step if bora_a else None, "b": bora_b.result.best_step},
           "history": {"a": _history(bora_a) if bora_a else None, "b": _history(bora_b)},
           "config": {"a": bora_a.config.to_dict() if bora_a else None, "b": bora_b.config.to_dict()},
           "tasks": list(test_b.tasks), "task_ids": ids.tolist(), "tokens": toks.tolist(),
           "doc_nll": {"a": nll_a.tolist(), "b": nll_b.tolist()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, out)
    print(json.dumps({k: out[k] for k in ("ppl_a", "ppl_b")} | {"diff": r["diff"], "lo": r["lo"], "hi": r["hi"]}))
    return out


if __name__ == "__main__":
    main()
