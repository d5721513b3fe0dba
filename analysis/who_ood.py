"""Out-of-distribution rows for a ``shakespeare-who`` fit, as a JSONL file that ``bora evaluate --data`` scores.

    python analysis/who_ood.py --kind plays --out /tmp/ood_plays.jsonl
    bora evaluate runs/who --data /tmp/ood_plays.jsonl --json runs/who/ood_plays.json

Every row is relabelled with the name of a default task (round robin over :data:`DEFAULT_TASKS` in order, or
over ``--tasks``), so
``bora evaluate`` scores it under that task's adapter, with that task's question and pair of names:

* ``--kind plays``: the rows of :data:`bora.data.shakespeare_who.OTHER_PAIRS` (plays never trained on: Macbeth,
  Hamlet, Coriolanus, The Merchant of Venice), their dialogue kept and their question replaced by the assigned
  task's; the label is meaningless there (which of the task's pair speaks a line of another play) and is set to 0;
* ``--kind fortunes``: entries of the embedded ``fortunes`` corpus (its default categories, every ``--every``-th
  entry) in place of the dialogue, ``"???: "`` and the entry's first 3 lines, then the assigned task's question.

Only the rows' predictive entropy and mutual information matter for the out-of-distribution AUROC
(``analysis/classification.py --ood``); their accuracy means nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def ood_rows(kind: str, every: int = 10, tasks=None) -> list[dict]:
    """The rows, relabelled round robin over ``tasks`` (default: every default task)."""
    from bora.data.shakespeare_who import (DEFAULT_TASKS, MAX_LINES, OTHER_PAIRS, PAIRS, _question,
                                           load_shakespeare_who)

    tasks = tuple(tasks or DEFAULT_TASKS)
    if not set(tasks) <= set(PAIRS):
        raise ValueError(f"--tasks must be default shakespeare-who tasks ({', '.join(PAIRS)})")

    if kind == "plays":
        bodies = [r["prompt"].split("\n\n")[0] for r in load_shakespeare_who(tuple(OTHER_PAIRS))]
    elif kind == "fortunes":
        from bora.data.fortunes import load_fortunes

        bodies = ["???: " + "\n".join(d["text"].split("\n")[:MAX_LINES]) for d in load_fortunes()[::every]]
    else:
        raise ValueError(f"unknown kind {kind!r}")
    rows = []
    for k, body in enumerate(bodies):
        task = tasks[k % len(tasks)]
        title, first, second, _ = PAIRS[task]
        names = [" " + " ".join(w.capitalize() for w in s.split()) for s in (first, second)]
        rows.append({"prompt": body + "\n\n" + _question(title, first, second), "choices": names, "label": 0,
                     "task": task})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kind", choices=["plays", "fortunes"], default="plays")
    p.add_argument("--every", type=int, default=10, help="fortunes: keep every this-many-th entry")
    p.add_argument("--tasks", nargs="+", help="relabel over these tasks of the fit (default: every default task)")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    try:
        rows = ood_rows(a.kind, a.every, a.tasks)
    except ValueError as e:
        p.error(str(e))
    tmp = a.out.with_suffix(a.out.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(a.out)
    print(f"{a.out}: {len(rows)} {a.kind} rows over {len({r['task'] for r in rows})} tasks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
