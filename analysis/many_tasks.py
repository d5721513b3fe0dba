"""The many-task comparison: bora's learned tau against every baseline, overall and per bucket of task size.

    python analysis/tau_sweep.py --data shakespeare-all --sample-tasks 128 --taus 100 1000 --epochs 3 \
        --eval-every 40 --patience 3 --quiet --out analysis/results/many_tasks/s0
    python analysis/per_task_lora.py --data shakespeare-all --sample-tasks 128 --epochs 3 --patience 3 \
        --out analysis/results/many_tasks/per_task_lora_s0.json
    python analysis/many_tasks.py analysis/results/many_tasks/s0 \
        --baseline "per-task LoRA=analysis/results/many_tasks/per_task_lora_s0.json" \
        --out analysis/results/many_tasks/summary.md

Reads the sweep's per-document test NLL (``test_doc_nll.json``, ``per_task.csv`` for the training sizes, ``meta.json``
for the validation NLLs) and any baseline JSON in ``analysis/per_task_lora.py``'s format (the same test documents
in the same order, checked), and writes a Markdown summary: every setting's test perplexity (exp of the mean
per-task NLL); the learned tau minus each other setting with a paired document bootstrap (documents resampled within
each task, 2000 resamples, 95%), overall and within buckets of tasks by training documents (``1-2``: the cold-start
bucket); which limit is the better one and which fixed tau validation picks (never test). Also writes the numbers
as JSON beside the Markdown file.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from tau_sweep import SIZE_EDGES, bucket_bootstraps  # noqa: E402

LEARNED = "learned (MAP, evidence)"


def load(sweep: Path, baselines: list[str]) -> tuple[dict, list[int], dict, list[str]]:
    """``(docs, train_docs per task, meta, tasks)`` of a sweep folder with every baseline's NLL added to ``docs``."""
    docs = json.loads((sweep / "test_doc_nll.json").read_text())
    meta = json.loads((sweep / "meta.json").read_text())
    tasks = meta["tasks"]
    sizes: dict = {}
    with open(sweep / "per_task.csv") as f:
        for r in csv.DictReader(f):
            sizes[r["task"]] = int(r["train_docs"])
    for spec in baselines:
        name, _, path = spec.partition("=")
        if not path:
            sys.exit(f"many_tasks: --baseline takes NAME=FILE, got {spec!r}")
        b = json.loads(Path(path).read_text())
        if b["task_ids"] != docs["_task_ids"] or list(b["tasks"]) != list(tasks):
            sys.exit(f"many_tasks: {path} does not hold the sweep's test documents in its order")
        docs[name] = b["doc_nll"]
    return docs, [sizes[t] for t in tasks], meta, tasks


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sweep", type=Path, help="an analysis/tau_sweep.py output folder")
    p.add_argument("--baseline", action="append", default=[], help="NAME=FILE of a per_task_lora.py JSON")
    p.add_argument("--out", type=Path, required=True, help="Markdown file to write (JSON beside it)")
    a = p.parse_args(argv)
    from bora.evaluation.evaluate import paired_bootstrap, tasks_bootstrap

    docs, train_docs, meta, tasks = load(a.sweep, a.baseline)
    settings = [k for k in docs if not k.startswith("_")]
    if LEARNED not in settings:
        sys.exit(f"many_tasks: {a.sweep} has no '{LEARNED}' setting")
    others = [s for s in settings if s != LEARNED]
    overall = {}
    for s in others:
        args = (docs[LEARNED], docs[s], docs["_tokens"], docs["_task_ids"])
        r = paired_bootstrap(*args, resamples=2000, level=0.95)
        rt = tasks_bootstrap(*args, resamples=2000, level=0.95)
        overall[s] = {**{k: r[k] for k in ("a", "b", "diff", "lo", "hi")}, "tasks_lo": rt["lo"], "tasks_hi": rt["hi"]}
    ov = meta["overall"]
    grid = [s for s in others if s.startswith("tau=")]
    best_grid = min(grid, key=lambda s: ov[s]["best_val_nll"]) if grid else None
    limits = [s for s in ("shared", "uncoupled") if s in overall]
    better_limit = min(limits, key=lambda s: overall[s]["b"]) if limits else None
    rows = bucket_bootstraps(docs, train_docs, [(LEARNED, s) for s in others])
    lines = [f"# Many tasks: {len(tasks)} tasks of `{meta['config']['data']['source']}`", "",
             f"Sweep: `{meta['command']}`  ", f"Baselines: {', '.join(a.baseline) or 'none'}", "",
             "| setting | test ppl | learned minus it [95%: documents] | [95%: tasks, documents] |",
             "|---|---|---|---|"]
    lines.append(f"| {LEARNED} (tau {ov[LEARNED]['tau']:.4g}) | {overall[others[0]]['a']:.3f} | | |")
    for s in others:
        o = overall[s]
        mark = " (excludes 0)" if o["lo"] > 0 or o["hi"] < 0 else " (includes 0)"
        lines.append(f"| {s} | {o['b']:.3f} | {o['diff']:+.3f} ({100 * o['diff'] / o['b']:+.2f}%) "
                     f"[{o['lo']:+.3f}, {o['hi']:+.3f}]{mark} | [{o['tasks_lo']:+.3f}, {o['tasks_hi']:+.3f}] |")
    lines += ["", f"The better limit (of shared and uncoupled, on test): {better_limit}. "
              f"The fixed tau validation picks: {best_grid}." if best_grid else "", "",
              f"## By training documents per task (buckets {SIZE_EDGES}: 1-2 is the cold-start bucket)", "",
              "| bucket | tasks | test docs | baseline | learned ppl | baseline ppl | learned minus baseline "
              "[95%: documents] | [95%: tasks, documents] |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['bucket']} | {r['tasks']} | {r['test_docs']} | {r['b']} | {r['ppl_a']:.3f} | "
                     f"{r['ppl_b']:.3f} | {r['diff']:+.3f} ({100 * r['diff'] / r['ppl_b']:+.2f}%) "
                     f"[{r['lo']:+.3f}, {r['hi']:+.3f}] | [{r['tasks_lo']:+.3f}, {r['tasks_hi']:+.3f}] |")
    lines += ["", "Intervals: 2000 paired resamples, 95%. 'documents': documents resampled within each task, the tasks "
              "held fixed (a task with one test document adds no spread: a bucket of such tasks gets a zero-width "
              "interval). 'tasks, documents': the tasks resampled too, then documents within them: the interval for "
              "other tasks of the corpus, since these tasks are a random sample of it."]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text("\n".join(lines) + "\n")
    out = {"overall": overall, "better_limit": better_limit, "best_grid_by_validation": best_grid,
           "by_size": rows, "tasks": len(tasks)}
    from bora.core.files import write_json

    write_json(a.out.with_suffix(".json"), out)
    print(a.out.read_text())
    return out


if __name__ == "__main__":
    main()
