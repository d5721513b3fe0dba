"""Minibatches of a tokenized split: padding, shuffled epochs, a resumable stream, one-document-per-task batches.

>>> import torch
>>> from bora.data.documents import TokenizedSplit
>>> from bora.data.batching import BatchStream, collate, distinct_task_batches
>>> split = TokenizedSplit([torch.arange(3), torch.arange(5), torch.arange(2)], torch.tensor([0, 1, 1]), ("a", "b"))
>>> collate(split, [0, 1])["attention_mask"].tolist()    # right-padded
[[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
>>> [b.tolist() for b in distinct_task_batches(split, None)]    # every task at most once per batch
[[0, 1], [2]]
>>> stream = BatchStream(3, 2, torch.Generator().manual_seed(0))
>>> sorted(torch.cat([next(stream), next(stream)]).tolist())    # one epoch: every row once
[0, 1, 2]
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch

from ..core.config import ConfigError
from .documents import TokenizedSplit, row_index

__all__ = ["collate", "pad_sequences", "row_tokens", "scored_positions", "batches", "BatchStream",
           "distinct_task_batches"]


def collate(split: TokenizedSplit, index, pad_id: int = 0, expand: Optional[bool] = None) -> dict:
    """Right-padded batch of rows ``index``: ``input_ids`` and ``attention_mask`` (1 real, 0 pad)
    LongTensors ``[N, Lmax]``, ``task_ids`` ``[N]`` and ``index`` ``[N]`` (rows of ``split``); with
    ``loss_mask`` ``[N, Lmax]`` (1: a scored token) when the split has one (prompt/completion, chat).

    Classification rows (``split.choices``) with ``expand`` (default: when the split is fitted with
    ``choice_loss='choices'``) become one sequence per choice: ``input_ids``, ``attention_mask`` and ``loss_mask``
    are ``[S, Lmax]`` (``S``: the rows' choices together), ``choice_row`` ``[S]`` is each sequence's row in the
    batch, ``choice_index`` ``[S]`` its choice within the row and ``label`` ``[N]`` each row's correct choice;
    ``task_ids`` and ``index`` stay per row. ``sequence`` ``[S]`` numbers the sequences within the split
    (row ``i``'s choice ``k`` is ``split.choice_offsets()[i] + k``), for caches. Without ``expand`` a classification
    batch holds each row's correct sequence (and its ``sequence`` number)."""
    idx = row_index(index, len(split))
    rows = idx.tolist()
    if split.is_classification:
        expand = split.choice_loss == "choices" if expand is None else expand
        offsets = split.choice_offsets()
        if expand:
            seqs = [c for i in rows for c in split.choices[i]]
            masks = [m for i in rows for m in split.choice_masks[i]]
            k = [len(split.choices[i]) for i in rows]
            out = pad_sequences(seqs, masks, pad_id)
            out["choice_row"] = torch.repeat_interleave(torch.arange(len(rows)), torch.tensor(k, dtype=torch.long))
            out["choice_index"] = torch.cat([torch.arange(n) for n in k]) if k else torch.zeros(0, dtype=torch.long)
            out["label"] = split.labels[idx]
            out["sequence"] = offsets[idx][out["choice_row"]] + out["choice_index"]
        else:
            out = pad_sequences([split.input_ids[i] for i in rows], [split.loss_mask[i] for i in rows], pad_id)
            out["sequence"] = offsets[idx] + split.labels[idx]
        return {**out, "task_ids": split.task_ids[idx], "index": idx}
    out = pad_sequences([split.input_ids[i] for i in rows],
               None if split.loss_mask is None else [split.loss_mask[i] for i in rows], pad_id)
    return {**out, "task_ids": split.task_ids[idx], "index": idx}


def pad_sequences(seqs: list, masks: Optional[list] = None, pad_id: int = 0) -> dict:
    """``input_ids`` and ``attention_mask`` (and ``loss_mask`` given ``masks``), right-padded."""
    lmax = max((len(s) for s in seqs), default=0)
    input_ids = torch.full((len(seqs), lmax), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(seqs), lmax), dtype=torch.long)
    for r, s in enumerate(seqs):
        input_ids[r, : len(s)] = s
        mask[r, : len(s)] = 1
    out = {"input_ids": input_ids, "attention_mask": mask}
    if masks is not None:
        loss_mask = torch.zeros((len(seqs), lmax), dtype=torch.long)
        for r, m in enumerate(masks):
            loss_mask[r, : len(m)] = m
        out["loss_mask"] = loss_mask
    return out


def row_tokens(batch: dict) -> torch.Tensor:
    """Scored units per row of a batch, ``[N]``: its scored tokens, or 1 for a classification row whose choices
    were expanded (its likelihood is one log softmax over the choices)."""
    if "choice_row" in batch:
        return torch.ones(len(batch["task_ids"]), dtype=torch.long, device=batch["task_ids"].device)
    return scored_positions(batch).sum(-1)


def scored_positions(batch: dict) -> torch.Tensor:
    """Boolean ``[N, L-1]``: position ``j`` predicts token ``j + 1`` and that token is scored. Plain text: every
    real token after the first; with ``loss_mask`` (prompt/completion, chat) only the masked-in tokens.

    >>> b = {"attention_mask": torch.tensor([[1, 1, 1, 0]]), "loss_mask": torch.tensor([[0, 0, 1, 0]])}
    >>> scored_positions(b).tolist(), scored_positions({"attention_mask": b["attention_mask"]}).tolist()
    ([[False, True, False]], [[True, True, False]])
    """
    mask = batch["attention_mask"]
    scored = mask[:, 1:].bool() & mask[:, :-1].bool()
    loss_mask = batch.get("loss_mask")
    return scored if loss_mask is None else scored & loss_mask[:, 1:].bool()


def batches(
    split: TokenizedSplit,
    batch_size: int,
    *,
    shuffle: bool,
    generator: Optional[torch.Generator] = None,
    drop_last: bool = False,
) -> Iterator[torch.Tensor]:
    """One epoch of row-index LongTensors. With ``shuffle`` the order is a uniform random
    permutation (no length sorting), so every minibatch is a uniform sample without replacement."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    n = len(split)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for start in range(0, n, batch_size):
        b = order[start:start + batch_size]
        if drop_last and len(b) < batch_size:
            return
        yield b


class BatchStream:
    """Endless shuffled epochs of row indices: exactly the batches of ``batches(split, batch_size,
    shuffle=True, generator=generator)`` epoch after epoch, with a position that can be saved and
    restored (:meth:`state_dict`; the generator's own state is saved separately)."""

    def __init__(self, n: int, batch_size: int, generator: Optional[torch.Generator] = None):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
        if n < 1:
            raise ConfigError("no documents to draw batches from")
        self.n, self.batch_size, self.generator = int(n), batch_size, generator
        self.order: Optional[torch.Tensor] = None
        self.pos = 0

    def __iter__(self) -> "BatchStream":
        return self

    def __next__(self) -> torch.Tensor:
        if self.order is None or self.pos >= self.n:
            self.order = torch.randperm(self.n, generator=self.generator)
            self.pos = 0
        b = self.order[self.pos:self.pos + self.batch_size]
        self.pos += self.batch_size
        return b

    def state_dict(self) -> dict:
        """The epoch's order and the position in it (``load_state_dict`` continues from here)."""
        return {"order": None if self.order is None else self.order.clone(), "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        order = state["order"]
        if order is not None and (order.dim() != 1 or len(order) != self.n):
            raise ConfigError(f"batch stream state is for {len(order)} documents, not {self.n}")
        self.order = None if order is None else order.clone().to(torch.long)
        self.pos = int(state["pos"])


def distinct_task_batches(
    split: TokenizedSplit,
    max_per_task: Optional[int],
    generator: Optional[torch.Generator] = None,
    rows: Optional[torch.Tensor] = None,
) -> Iterator[torch.Tensor]:
    """Row-index LongTensors in which every task appears at most once (round robin over tasks).

    Covers ``max_per_task`` rows per task (a uniform random subset, drawn with ``generator``, when a
    task has more; all rows when None), so batch ``k`` holds the ``k``-th chosen row of every task
    that has one. Rows within a task keep their order in ``split``. ``rows`` (indices) restricts the
    choice to those rows."""
    if max_per_task is not None and (not isinstance(max_per_task, int) or max_per_task < 1):
        raise ConfigError(f"max_per_task must be a positive integer or None, got {max_per_task!r}")
    chosen: list[torch.Tensor] = []
    allowed = None
    if rows is not None:
        allowed = torch.zeros(len(split), dtype=torch.bool)
        allowed[torch.as_tensor(rows, dtype=torch.long).cpu()] = True
    for t in range(len(split.tasks)):
        mine = split.task_ids == t
        idx = (mine if allowed is None else mine & allowed).nonzero().reshape(-1)
        if max_per_task is not None and len(idx) > max_per_task:
            pick = torch.randperm(len(idx), generator=generator)[:max_per_task]
            idx = idx[pick.sort().values]
        chosen.append(idx)
    rounds = max((len(c) for c in chosen), default=0)
    for k in range(rounds):
        yield torch.stack([c[k] for c in chosen if len(c) > k])
