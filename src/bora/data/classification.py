"""Classification and multiple-choice rows: reading them, and tokenising each choice after the prompt.

>>> from bora.data.classification import encode_choices
>>> class Words:                                   # any tokenizer: a callable returning input_ids
...     bos_token_id = 0
...     def __call__(self, text, add_special_tokens=True):
...         ids = [int(w[1:]) for w in text.split()]
...         return {"input_ids": ([0] if add_special_tokens else []) + ids}
>>> doc = {"prompt": "w5 w6", "choices": [" w7", " w8 w9"], "label": 1, "task": "a"}
>>> [(ids, mask) for ids, mask, _ in encode_choices(Words(), doc, max_length=16)]
[([0, 5, 6, 7], [0, 0, 0, 1]), ([0, 5, 6, 8, 9], [0, 0, 0, 1, 1])]

A classification row is ``{"prompt": str, "choices": [str, ...], "label": int, "task": str}``: ``label`` is the
0-based index of the correct choice. Each choice is one sequence, the prompt's tokens followed by the choice's
(exactly as a prompt/completion pair, :func:`bora.data.modes.encode_pair`: no separator, no end-of-sequence
token), and the choice's tokens are its scored tokens. The choice's score is its summed token log-probability
given the prompt under the row's task adapter; the likelihood of the row (``DataConfig.choice_loss='choices'``,
the default) is ``log softmax`` over its choices' scores at the correct one. A row too long for ``max_length``
loses its prompt from the left (:func:`bora.data.modes.fit_to_length`), each choice's sequence on its own.

Two ways to write such rows in a data file (``--prompt-column`` holds the question or context):

* **a fixed label set** (``--label-column L``): every row's choices are the same labels. The label set is the keys
  of ``--label-map FILE.json`` (in the file's order; the value of each key is the text scored for it) or else
  every distinct label of the file, sorted, each label's own text being its answer. A number label becomes its
  decimal string (``1`` and ``"1"`` are one label).
* **per-row choices** (``--choices-column C --label-column L``): column ``C`` holds a list of at least 2
  distinct non-empty strings (a JSON string of one in a CSV cell) and ``L`` the correct choice, as a 0-based
  index (an integer; a string of digits that is not itself one of the choices, e.g. a CSV cell, is read as an
  index) or as the choice's exact text (a string).

Every problem is a one-line :class:`~bora.core.config.ConfigError` naming the file and line: a missing or empty
prompt or label, a label outside the label set, choices that are not a list of strings, an empty or repeated
choice, a row with fewer than 2 choices, a label index out of range, a label map that is not a JSON object of
non-empty strings (or has fewer than 2 labels).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

from ..core.config import ConfigError, DataConfig
from .modes import encode_pair, fit_to_length, json_cell

__all__ = ["read_label_map", "label_set", "read_classification_rows", "check_choices", "encode_choices"]


def read_label_map(path) -> dict[str, str]:
    """``{label: answer text}`` from a JSON file (an object of at least 2 non-empty strings), in file order."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"label map file not found: {path}")
    try:
        value = json.loads(p.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: the label map is not valid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: the label map must be a JSON object {{label: text}}, got "
                          f"{type(value).__name__}")
    for k, v in value.items():
        if not isinstance(v, str) or not v.strip():
            raise ConfigError(f"{path}: the text of label {k!r} must be a non-empty string")
    if len(value) < 2:
        raise ConfigError(f"{path}: the label map needs at least 2 labels, got {len(value)}")
    return dict(value)


def _label(value, where: str, column: str) -> str:
    """A fixed-set label as a string (numbers as their decimal string), or a ConfigError."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise ConfigError(f"{where}: no label (column {column!r} is missing or empty)")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ConfigError(f"{where}: the label column {column!r} must hold strings or numbers, got "
                          f"{type(value).__name__}")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value)
    if not text.strip():
        raise ConfigError(f"{where}: empty label in column {column!r}")
    return text


def label_set(labels, label_map: Optional[dict]) -> tuple[str, ...]:
    """The fixed label set: the label map's keys, or the sorted distinct ``labels`` (at least 2)."""
    if label_map is not None:
        return tuple(label_map)
    out = tuple(sorted(set(labels)))
    if len(out) < 2:
        raise ConfigError(f"classification needs at least 2 labels; the label column holds only {list(out)} "
                          "(give every label with --label-map, or use --choices-column)")
    return out


def check_choices(value, where: str, column: str) -> list[str]:
    """``value`` as a list of at least 2 distinct non-empty strings, or a ConfigError naming ``where``. A string
    holding JSON (a CSV cell) is parsed."""
    value = json_cell(value, where, column, holds="a list of strings", noun="choices")
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{where}: the choices column {column!r} must hold a list of strings, got "
                          f"{type(value).__name__}")
    for k, c in enumerate(value):
        if not isinstance(c, str):
            raise ConfigError(f"{where}: the choices column {column!r} must hold a list of strings; choice {k + 1} "
                              f"is {type(c).__name__}")
        if not c.strip():
            raise ConfigError(f"{where}: choice {k + 1} in column {column!r} is empty")
    if len(value) < 2:
        raise ConfigError(f"{where}: a row needs at least 2 choices, got {len(value)}")
    if len(set(value)) < len(value):
        raise ConfigError(f"{where}: repeated choice in column {column!r} (choices must differ)")
    return list(value)


def _choice_label(value, choices: list[str], where: str, column: str) -> int:
    """The 0-based index of the correct choice: an integer index, or a choice's exact text."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise ConfigError(f"{where}: no label (column {column!r} is missing or empty)")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, str):
        if value in choices:
            return choices.index(value)
        if not value.strip():
            raise ConfigError(f"{where}: empty label in column {column!r}")
        if not value.strip().isdigit():
            raise ConfigError(f"{where}: label {value!r} is not one of the row's {len(choices)} choices (a label "
                              "is a 0-based index or a choice's exact text)")
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}: the label column {column!r} must hold a choice's index or text, got "
                          f"{type(value).__name__}")
    if not 0 <= value < len(choices):
        raise ConfigError(f"{where}: label index {value} is out of range for {len(choices)} choices "
                          f"(0 to {len(choices) - 1})")
    return value


def read_classification_rows(ds, cfg: DataConfig, task_of) -> list[dict]:
    """Every row of table ``ds`` as ``{"prompt", "choices", "label", "task"}`` (none skipped); ``task_of(i)`` is
    row ``i``'s task name."""
    from .modes import check_string

    raw_prompts, raw = ds[cfg.prompt_column], ds[cfg.label_column]
    prompts = [check_string(v, ds.where(i), "prompt", cfg.prompt_column) for i, v in enumerate(raw_prompts)]
    if cfg.choices_column is not None:
        docs = []
        for i, (prompt, choices, value) in enumerate(zip(prompts, ds[cfg.choices_column], raw)):
            choices = check_choices(choices, ds.where(i), cfg.choices_column)
            label = _choice_label(value, choices, ds.where(i), cfg.label_column)
            docs.append({"prompt": prompt, "choices": choices, "label": label, "task": task_of(i)})
        return docs
    label_map = read_label_map(cfg.label_map) if cfg.label_map is not None else None
    labels = [_label(v, ds.where(i), cfg.label_column) for i, v in enumerate(raw)]
    names = label_set(labels, label_map)
    for i, lab in enumerate(labels):
        if lab not in names:
            raise ConfigError(f"{ds.where(i)}: label {lab!r} is not in the label set of {cfg.label_map} "
                              f"({', '.join(map(repr, names[:8]))})")
    texts = [label_map[n] if label_map is not None else n for n in names]
    index = {n: k for k, n in enumerate(names)}
    return [{"prompt": p, "choices": list(texts), "label": index[lab], "task": task_of(i)}
            for i, (p, lab) in enumerate(zip(prompts, labels))]


def encode_choices(tokenizer, doc: dict, max_length: int) -> list[tuple[list[int], list[int], int]]:
    """``[(ids, mask, scored tokens cut), ...]``: each choice of a classification row after its prompt, fitted
    to ``max_length`` (:func:`bora.data.modes.fit_to_length`); a choice's tokens are scored."""
    bos = getattr(tokenizer, "bos_token_id", None)
    out = []
    for choice in doc["choices"]:
        ids, mask = encode_pair(tokenizer, doc["prompt"], choice)
        out.append(fit_to_length(ids, mask, max_length, bos))
    return out
