"""Turn a tokenized split into model-ready batches on a device, optionally with cached prefix states.

>>> import torch
>>> from transformers import LlamaConfig, LlamaForCausalLM
>>> from bora.data.documents import TokenizedSplit
>>> from bora.data.feed import Feed
>>> from bora.lora.prefix import FrozenPrefix
>>> lm = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
...                                   num_hidden_layers=4, num_attention_heads=4)).eval()
>>> split = TokenizedSplit([torch.arange(5), torch.arange(3)], torch.tensor([0, 1]), ("a", "b"))
>>> feed = Feed(split, prefix=FrozenPrefix(lm, 2))
>>> batch = feed.batch(torch.tensor([1, 0]))
>>> batch["input_ids"].shape, batch["hidden"].shape
(torch.Size([2, 5]), torch.Size([2, 5, 32]))

With a :class:`~bora.lora.prefix.FrozenPrefix`, the hidden states entering the first adapted layer are
computed once per document (lazily, in batches) and kept on the feed's device; every later batch
(any epoch, any fit that shares the feed) gathers and pads them instead of rerunning the frozen
layers. Cached states are stored unpadded, one tensor per document (per choice sequence for classification
rows, :meth:`bora.data.documents.TokenizedSplit.sequences`).
"""

from __future__ import annotations

from typing import Optional

import torch

from .documents import TokenizedSplit
from .batching import collate, pad_sequences
from ..lora.prefix import FrozenPrefix

__all__ = ["Feed"]


class Feed:
    """Batches of one split, on ``device``, with the frozen prefix cached when ``prefix`` is given."""

    def __init__(self, split: TokenizedSplit, *, pad_id: int = 0, device: torch.device | str = "cpu",
                 prefix: Optional[FrozenPrefix] = None, cache_batch_size: int = 32, progress: bool = False,
                 desc: str = "caching frozen layers"):
        self.split = split
        self.pad_id = pad_id
        self.device = torch.device(device)
        self.prefix = prefix
        self.cache_batch_size = cache_batch_size
        self.progress = progress
        self.desc = desc
        self._hidden: Optional[list[torch.Tensor]] = None

    def __len__(self) -> int:
        return len(self.split)

    def _collate(self, index, expand: Optional[bool] = None) -> dict:
        b = collate(self.split, index, pad_id=self.pad_id, expand=expand)
        return {k: v.to(self.device) for k, v in b.items()}

    def build_cache_(self) -> None:
        """Run the frozen prefix over every document once (no-op without a prefix or when cached)."""
        if self.prefix is None or self._hidden is not None:
            return
        from tqdm.auto import tqdm

        seqs = self.split.sequences()
        n = len(seqs)
        order = sorted(range(n), key=lambda i: len(seqs[i]))  # little padding
        hidden: list[Optional[torch.Tensor]] = [None] * n
        chunks = [order[i:i + self.cache_batch_size] for i in range(0, n, self.cache_batch_size)]
        for chunk in tqdm(chunks, desc=self.desc, disable=not self.progress, leave=False):
            b = pad_sequences([seqs[i] for i in chunk], pad_id=self.pad_id)
            h = self.prefix.compute(b["input_ids"].to(self.device), b["attention_mask"].to(self.device))
            for row, i in enumerate(chunk):
                hidden[i] = h[row, : len(seqs[i])].clone()
        self._hidden = hidden  # type: ignore[assignment]

    def batch(self, index, expand: Optional[bool] = None) -> dict:
        """Padded batch for document indices ``index`` (with ``hidden`` when the prefix is cached); ``expand``:
        classification rows as one sequence per choice (:func:`bora.data.batching.collate`)."""
        b = self._collate(index, expand)
        if self.prefix is not None:
            self.build_cache_()
            idx = b["sequence"].tolist() if "sequence" in b else (
                index.tolist() if torch.is_tensor(index) else list(index))
            L = b["input_ids"].shape[1]
            H = self._hidden[idx[0]].shape[-1]
            hid = torch.zeros(len(idx), L, H, dtype=self._hidden[idx[0]].dtype, device=self.device)
            for row, i in enumerate(idx):
                h = self._hidden[i]
                hid[row, : h.shape[0]] = h
            b["hidden"] = hid
        return b
