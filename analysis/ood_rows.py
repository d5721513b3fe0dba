"""Out-of-distribution rows for a fit on an embedded classification corpus, as a JSONL file that
``bora evaluate --data`` scores under the fit's task adapters.

    python analysis/ood_rows.py --corpus shakespeare-who --kind plays --out /tmp/ood_plays.jsonl
    bora evaluate runs/who --data /tmp/ood_plays.jsonl --json runs/who/ood_plays.json

Every row is relabelled with the name of a default task of the corpus (round robin over its default tasks in
order, or over ``--tasks``), so ``bora evaluate`` scores it under that task's adapter with that task's question
and choices. The label is meaningless out of distribution and is set to 0: only the rows' predictive entropy and
mutual information matter for the out-of-distribution AUROC (``analysis/classification.py --ood``).

``--corpus shakespeare-who`` (:mod:`bora.data.shakespeare_who`):

* ``--kind plays``: the rows of ``OTHER_PAIRS`` (plays never trained on: Macbeth, Hamlet, Coriolanus, The
  Merchant of Venice), their dialogue kept and their question replaced by the assigned task's;
* ``--kind fortunes``: entries of the embedded ``fortunes`` corpus (its default categories, every ``--every``-th
  entry) in place of the dialogue: ``"???: "`` and the entry's first 3 lines, then the task's question.

``--corpus fortunes-mine`` (:mod:`bora.data.fortunes_mine`):

* ``--kind fortunes``: entries of fortune categories that no collector keeps or sees as a negative
  (:data:`OTHER_CATEGORIES`, every ``--every``-th entry);
* ``--kind plays``: speeches of the embedded ``shakespeare`` corpus (every ``--every``-th), first 3 lines.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

#: fortune categories outside fortunes-mine's default tasks (none of the offensive ones).
OTHER_CATEGORIES = ("computers", "science", "pets", "politics", "education", "wisdom")


def _who_rows(kind: str, every: int, tasks) -> list[dict]:
    from bora.data.shakespeare_who import MAX_LINES, OTHER_PAIRS, load_shakespeare_who, question

    if kind == "plays":
        bodies = [r["prompt"].split("\n\n")[0] for r in load_shakespeare_who(tuple(OTHER_PAIRS))]
    else:
        from bora.data.fortunes import load_fortunes

        bodies = ["???: " + "\n".join(d["text"].split("\n")[:MAX_LINES]) for d in load_fortunes()[::every]]
    rows = []
    for k, body in enumerate(bodies):
        task = tasks[k % len(tasks)]
        ask, choices = question(task)
        rows.append({"prompt": body + "\n\n" + ask, "choices": choices, "label": 0, "task": task})
    return rows


def _mine_rows(kind: str, every: int, tasks) -> list[dict]:
    from bora.data.fortunes_mine import CHOICES, prompt

    if kind == "plays":
        from bora.data.shakespeare import load_shakespeare

        texts = [d["text"] for d in load_shakespeare()[::every]]
    else:
        from bora.data.fortunes import load_fortunes

        texts = [d["text"] for d in load_fortunes(OTHER_CATEGORIES)[::every]]
    return [{"prompt": prompt(t), "choices": list(CHOICES), "label": 0, "task": tasks[k % len(tasks)]}
            for k, t in enumerate(texts)]


def ood_rows(corpus: str, kind: str, every: int = 10, tasks=None) -> list[dict]:
    """The rows, relabelled round robin over ``tasks`` (default: every default task of ``corpus``)."""
    if corpus == "shakespeare-who":
        from bora.data.shakespeare_who import DEFAULT_TASKS
        make = _who_rows
    elif corpus == "fortunes-mine":
        from bora.data.fortunes_mine import DEFAULT_TASKS
        make = _mine_rows
    else:
        raise ValueError(f"unknown corpus {corpus!r}")
    tasks = tuple(tasks or DEFAULT_TASKS)
    if not set(tasks) <= set(DEFAULT_TASKS):
        raise ValueError(f"--tasks must be default {corpus} tasks ({', '.join(DEFAULT_TASKS)})")
    return make(kind, every, tasks)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", choices=["shakespeare-who", "fortunes-mine"], default="shakespeare-who")
    p.add_argument("--kind", choices=["plays", "fortunes"], default="plays")
    p.add_argument("--every", type=int, default=10, help="keep every this-many-th entry or speech")
    p.add_argument("--tasks", nargs="+", help="relabel over these tasks of the fit (default: every default task)")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    try:
        rows = ood_rows(a.corpus, a.kind, a.every, a.tasks)
    except ValueError as e:
        p.error(str(e))
    tmp = a.out.with_suffix(a.out.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(a.out)
    print(f"{a.out}: {len(rows)} {a.kind} rows over {len({r['task'] for r in rows})} tasks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
