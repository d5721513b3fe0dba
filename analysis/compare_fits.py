"""Compare two saved fits of the same data on its test split: per-document NLL and a paired document bootstrap.

    python analysis/compare_fits.py runs/a runs/b --out analysis/results/early_stopping/compare.json
    python analysis/compare_fits.py baseline.json runs/b --out ...   # a baseline's per-document NLL (JSON) as a
    python analysis/compare_fits.py runs/a0,runs/a1,runs/a2 runs/b0,runs/b1,runs/b2 --out ...  # 3 seeds, paired

A JSON file in place of ``a`` holds a baseline's ``doc_nll``, ``tokens``, ``tasks`` and ``task_ids`` in the
fit's test order (``analysis/per_task_lora.py`` writes one).

Both fits must hold the same tasks and test documents (the same data, split and seed); the second is the
reference (``diff = ppl(a) - ppl(b)``, negative when ``a`` is better). The JSON holds both fits' test
perplexity, the bootstrap interval (2000 resamples within each task, 95%), each fit's per-document NLL and
the tokens and tasks needed to recompute every figure, and the two fits' configs, best steps and validation
histories (with tau). With several seeds per side (comma-separated, paired by position) the interval
resamples the seeds too (:func:`bora.evaluation.evaluate.seeds_bootstrap`; ``ppl_a``/``ppl_b`` are then lists per
seed and the difference is that of the means over seeds).
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


def _side(path: Path, test_b):
    """``(bora or None, tasks, per-document NLL, tokens)`` of a fit folder or a baseline's JSON."""
    if path.suffix == ".json":
        base = json.loads(path.read_text())
        if base["task_ids"] != test_b.task_ids.tolist():
            sys.exit(f"compare_fits: the documents of {path} are not in the fit's test order")
        return None, tuple(base["tasks"]), torch.tensor(base["doc_nll"], dtype=torch.float64), \
            torch.tensor(base["tokens"])
    bora, test, nll, toks = doc_nll(path)
    if test.task_ids.tolist() != test_b.task_ids.tolist():
        sys.exit(f"compare_fits: the test documents of {path} are in another order")
    return bora, test.tasks, nll, toks


def _paths(arg: str) -> list[Path]:
    return [Path(p) for p in arg.split(",") if p]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a", help="fit folder a (or a baseline's JSON); several seeds: comma-separated, in seed order")
    p.add_argument("b", help="fit folder b, the reference; several seeds: comma-separated, paired with a's")
    p.add_argument("--out", type=Path, required=True, help="JSON file to write")
    args = p.parse_args(argv)
    from bora.core.files import write_json
    from bora.evaluation.evaluate import paired_bootstrap, seeds_bootstrap, summarize

    pa, pb = _paths(args.a), _paths(args.b)
    if not pa or len(pa) != len(pb):
        sys.exit("compare_fits: give a and b the same number of fits (one per seed)")
    sides_b = [doc_nll(x) for x in pb]
    test_b = sides_b[0][1]
    ids = test_b.task_ids
    sides_a = [_side(x, test_b) for x in pa]
    toks = sides_b[0][3]
    for bora_b, test, _, tb in sides_b:
        if test.task_ids.tolist() != ids.tolist() or not bool((tb == toks).all()):
            sys.exit("compare_fits: the reference fits were not made on the same test documents")
    for _, tasks_a, _, ta in sides_a:
        if tasks_a != test_b.tasks or ta.shape != toks.shape or not bool((ta == toks).all()):
            sys.exit("compare_fits: the two fits were not made on the same test documents")
    nll_a = torch.stack([x[2] for x in sides_a])
    nll_b = torch.stack([x[2] for x in sides_b])
    if len(pa) == 1:
        r = paired_bootstrap(nll_a[0], nll_b[0], toks, ids, tasks=test_b.tasks, resamples=2000, level=0.95)
        boot = {k: r[k] for k in ("diff", "lo", "hi", "level", "resamples", "frac_a_lower", "per_task")}
    else:  # documents and seeds resampled (bora.evaluation.evaluate.seeds_bootstrap)
        r = seeds_bootstrap(nll_a, nll_b, toks, ids, resamples=2000, level=0.95)
        boot = {k: r[k] for k in ("diff", "lo", "hi", "level", "resamples", "frac_a_lower", "seeds", "per_seed")}

    def ppl(nll):
        return summarize(nll, toks, ids, test_b.tasks)["overall"]["ppl_task_mean"]

    one = len(pa) == 1
    boras_a, boras_b = [x[0] for x in sides_a], [x[0] for x in sides_b]
    pick = (lambda v: v[0]) if one else (lambda v: v)  # one seed: the original flat layout
    out = {"command": "python analysis/compare_fits.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "a": pick([str(x) for x in pa]), "b": pick([str(x) for x in pb]),
           "ppl_a": pick([ppl(x) for x in nll_a]), "ppl_b": pick([ppl(x) for x in nll_b]),
           "bootstrap": boot,
           "best_step": {"a": pick([x.result.best_step if x else None for x in boras_a]),
                         "b": pick([x.result.best_step for x in boras_b])},
           "history": {"a": pick([_history(x) if x else None for x in boras_a]),
                       "b": pick([_history(x) for x in boras_b])},
           "config": {"a": pick([x.config.to_dict() if x else None for x in boras_a]),
                      "b": pick([x.config.to_dict() for x in boras_b])},
           "tasks": list(test_b.tasks), "task_ids": ids.tolist(), "tokens": toks.tolist(),
           "doc_nll": {"a": pick(nll_a.tolist()), "b": pick(nll_b.tolist())}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, out)
    print(json.dumps({"ppl_a": r["a"], "ppl_b": r["b"]} | {"diff": r["diff"], "lo": r["lo"], "hi": r["hi"]}))
    return out


if __name__ == "__main__":
    main()
