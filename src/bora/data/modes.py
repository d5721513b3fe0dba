"""Prompt/completion and chat rows: reading them, tokenising them with a loss mask, fitting them to ``max_length``.

>>> from bora.data.modes import encode_pair, fit_to_length
>>> class Words:                                   # any tokenizer: a callable returning input_ids
...     bos_token_id = 0
...     def __call__(self, text, add_special_tokens=True):
...         ids = [int(w[1:]) for w in text.split()]
...         return {"input_ids": ([0] if add_special_tokens else []) + ids}
>>> ids, mask = encode_pair(Words(), "w5 w6", " w7 w8")
>>> ids, mask                                      # only the completion's tokens are scored
([0, 5, 6, 7, 8], [0, 0, 0, 1, 1])
>>> fit_to_length(ids, mask, 4, bos_id=0)          # too long: the prompt is cut from the left (BOS kept)
([0, 6, 7, 8], [0, 0, 1, 1], 0)

Three kinds of rows (:attr:`bora.core.config.DataConfig.mode`):

* ``'text'`` (``{"text", "task"}``): a whole document; every token after the first is scored.
* ``'completion'`` (``{"prompt", "completion", "task"}``, ``--prompt-column`` and ``--completion-column``): the
  prompt is tokenised as a document (``add_special_tokens=True``, so a BOS where the tokenizer adds one) and the
  completion on its own (``add_special_tokens=False``) and appended: no separator is added (a completion usually
  starts with a space or a newline) and no end-of-sequence token (write it in the completion to have it scored).
  The prompt conditions the model; only the completion's tokens are scored.
* ``'chat'`` (``{"messages", "task"}``, ``--messages-column``): a list of ``{"role", "content"}`` turns, rendered
  with ``tokenizer.apply_chat_template`` (tokenised with ``add_special_tokens=False``, as transformers does). The
  scored text of an assistant turn is what the template adds for it after the generation prompt: its content and
  the template's end-of-turn text (``<|im_end|>`` for SmolLM2), so the model learns to stop. Spans are found by
  rendering every conversation prefix (``messages[:i]`` with ``add_generation_prompt=True`` and ``messages[:i+1]``)
  and checking that each is a prefix of the whole rendering (a template for which this fails is an error); a
  token is scored when its characters (the fast tokenizer's offsets) overlap an assistant span.

Classification and multiple-choice rows (``'classification'``: ``--label-column``, with ``--choices-column`` or a
fixed label set) are read by :mod:`bora.data.classification`: each choice is a completion of the row's prompt.

A row's scores are one mask per token (``mask[j] = 1``: token ``j`` is predicted and counted); the first token is
never scored. Plain text is the special case ``mask = [0, 1, 1, ...]`` and is stored without a mask.

**Too long** (more than ``max_length`` tokens; :func:`fit_to_length`): the context before the first scored token
is cut from the left (a leading BOS is kept), so the completion (the assistant turns) stays whole. Only when the
scored part alone needs more than ``max_length - 1`` tokens is it cut too, from its end, after one token of
context; bora warns once per split with the number of rows and scored tokens cut. Prompt/completion and chat rows
are never chunked: ``long_documents='chunk'`` applies to plain-text documents only.

Every user error is a one-line :class:`~bora.core.config.ConfigError` naming the file and line: a missing or empty
prompt or completion, a messages value that is not a list of ``{"role", "content"}`` objects with string values,
a chat without an assistant turn (or whose assistant turns are all empty), a tokenizer without a chat template.
"""

from __future__ import annotations

import json
import warnings
from typing import Optional, Sequence

from ..core.config import ConfigError, DataConfig

__all__ = ["read_row", "check_string", "json_cell", "check_messages", "encode_pair", "encode_chat", "encode_row",
           "fit_to_length", "warn_cut"]


def _where(ds, i: int) -> str:
    return ds.where(i)


def _string(value, ds, i: int, role: str, column: str) -> str:
    return check_string(value, _where(ds, i), role, column)


def check_string(value, where: str, role: str, column: str) -> str:
    """``value`` as a non-empty string, or a :class:`~bora.core.config.ConfigError` naming ``where``."""
    if value is None or (isinstance(value, float) and value != value):
        raise ConfigError(f"{where}: no {role} (column {column!r} is missing or empty)")
    if not isinstance(value, str):
        raise ConfigError(f"{where}: the {role} column {column!r} must hold strings, got "
                          f"{type(value).__name__}")
    if not value.strip():
        raise ConfigError(f"{where}: empty {role} in column {column!r}")
    return value


def json_cell(value, where: str, column: str, *, holds: str, noun: str):
    """A row's structured cell: a string is parsed as JSON (a CSV cell); ``None`` is a ConfigError naming ``where``
    (``no <noun>``), and so is a string that is not JSON (the column ``must hold <holds>``)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ConfigError(f"{where}: the {noun} column {column!r} must hold {holds}, got a string that is not "
                              "JSON") from None
    if value is None:
        raise ConfigError(f"{where}: no {noun} (column {column!r} is missing or empty)")
    return value


def check_messages(value, where: str, column: str) -> list[dict]:
    """``value`` as a list of ``{"role": str, "content": str}`` turns with a non-empty assistant turn, or a
    :class:`~bora.core.config.ConfigError` naming ``where``. A string holding JSON (a CSV cell) is parsed."""
    value = json_cell(value, where, column, holds="a list of {'role', 'content'} objects", noun="messages")
    if not isinstance(value, (list, tuple)) or not value:
        got = "an empty list" if isinstance(value, (list, tuple)) else type(value).__name__
        raise ConfigError(f"{where}: the messages column {column!r} must hold a non-empty list of "
                          f"{{'role', 'content'}} objects, got {got}")
    turns = []
    for k, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            got = type(m).__name__ if not isinstance(m, dict) else f"keys {sorted(m)}"
            raise ConfigError(f"{where}: message {k + 1} must be an object with string 'role' and 'content', "
                              f"got {got}")
        turns.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" and m["content"].strip() for m in turns):
        raise ConfigError(f"{where}: a chat without an assistant turn (nothing to score; roles: "
                          f"{sorted(set(m['role'] for m in turns))})")
    return turns


def read_row(ds, i: int, cfg: DataConfig) -> dict:
    """Row ``i`` of a table as a prompt/completion (``cfg.mode == 'completion'``) or chat row, without its task."""
    if cfg.mode == "completion":
        return {"prompt": _string(ds[cfg.prompt_column][i], ds, i, "prompt", cfg.prompt_column),
                "completion": _string(ds[cfg.completion_column][i], ds, i, "completion", cfg.completion_column)}
    return {"messages": check_messages(ds[cfg.messages_column][i], _where(ds, i), cfg.messages_column)}


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def encode_pair(tokenizer, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """``(ids, mask)`` of a prompt/completion pair: the prompt's tokens (special tokens added), then the
    completion's (none added); only the completion's are scored (and never the first token)."""
    p, c = _ids(tokenizer, prompt, True), _ids(tokenizer, completion, False)
    mask = [0] * len(p) + [1] * len(c)
    if mask:
        mask[0] = 0
    return p + c, mask


def _render(tokenizer, messages: Sequence[dict], generation: bool, where: str) -> str:
    try:
        text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation)
    except Exception as e:  # noqa: BLE001 - a template that fails on the user's data is a data problem
        first = str(e).strip().splitlines()
        raise ConfigError(f"{where}: the tokenizer's chat template failed ({type(e).__name__}"
                          f"{': ' + first[0] if first else ''})") from None
    if not isinstance(text, str):
        raise ConfigError(f"{where}: the tokenizer's chat template did not render text")
    return text


def assistant_spans(tokenizer, messages: Sequence[dict], where: str = "a chat") -> tuple[str, list[tuple[int, int]]]:
    """``(rendering, [(start, end), ...])``: the chat's text and the character spans of its assistant turns."""
    full = _render(tokenizer, messages, False, where)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], True, where) if i else _render(tokenizer, [], True, where)
        upto = _render(tokenizer, messages[:i + 1], False, where)
        if not (full.startswith(before) and full.startswith(upto) and len(upto) >= len(before)):
            raise ConfigError(f"{where}: the chat template does not render the beginning of a conversation as the "
                              f"beginning of the whole (turn {i + 1}), so bora cannot tell which tokens are the "
                              "assistant's")
        if len(upto) > len(before):
            spans.append((len(before), len(upto)))
    return full, spans


def encode_chat(tokenizer, messages: Sequence[dict], where: str = "a chat") -> tuple[list[int], list[int]]:
    """``(ids, mask)`` of a chat rendered with the tokenizer's template; assistant tokens scored (see the module)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("chat data (--messages-column) needs a tokenizer with a chat template; this model's "
                          "tokenizer has none (use an instruct/chat model, or prompt/completion columns)")
    full, spans = assistant_spans(tokenizer, messages, where)
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError("chat data (--messages-column) needs a fast tokenizer (character offsets of tokens)")
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    mask = [int(e > s and any(s < b and e > a for a, b in spans)) for s, e in offsets]
    if mask:
        mask[0] = 0
    return ids, mask


def encode_row(tokenizer, doc: dict) -> tuple[list[int], list[int]]:
    """``(ids, mask)`` of a prompt/completion or chat row."""
    if "messages" in doc:
        return encode_chat(tokenizer, doc["messages"], doc.get("where", "a chat"))
    return encode_pair(tokenizer, doc["prompt"], doc["completion"])


def fit_to_length(ids: list[int], mask: list[int], max_length: int,
                  bos_id: Optional[int] = None) -> tuple[list[int], list[int], int]:
    """``(ids, mask, scored tokens cut)`` of a row cut to at most ``max_length`` tokens (see the module): the
    context before the first scored token goes first, from the left (a leading ``bos_id`` kept); the scored part
    is cut from its end only when it alone needs more than ``max_length - 1`` tokens."""
    if len(ids) <= max_length:
        return ids, mask, 0
    first = next((j for j, m in enumerate(mask) if m), len(ids))
    context, rest, rest_mask = ids[:first], ids[first:], mask[first:]
    room = max_length - len(rest)
    if room >= 1:
        keep_bos = bos_id is not None and room >= 2 and context and context[0] == bos_id and len(context) > room
        ctx = ([context[0]] + context[len(context) - room + 1:]) if keep_bos else context[len(context) - room:]
        return ctx + rest, [0] * len(ctx) + rest_mask, 0
    ctx = context[-1:]
    n = max_length - len(ctx)
    return ctx + rest[:n], [0] * len(ctx) + rest_mask[:n], sum(rest_mask[n:])


def warn_cut(rows: int, tokens: int, max_length: int) -> None:
    """The one warning of a split whose scored parts had to be cut to ``max_length``."""
    if rows:
        warnings.warn(f"{rows} completion(s) or chat(s) longer than max_length={max_length} tokens even without "
                      f"their prompt were cut: {tokens} scored token(s) dropped (raise --max-length to keep them)",
                      UserWarning, stacklevel=3)
