"""The LM likelihood of bora's model: each document's next-token log-likelihood under its task's adapters.

>>> import torch
>>> from transformers import LlamaConfig, LlamaForCausalLM
>>> from bora.core.config import AdapterConfig
>>> from bora.lora.inject import inject_adapters_
>>> from bora.model.likelihood import LMLikelihood
>>> lm = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
...                                   num_hidden_layers=2, num_attention_heads=4))
>>> lik = LMLikelihood(lm, inject_adapters_(lm, AdapterConfig(rank=2, layers=None)))
>>> batch = {"input_ids": torch.randint(0, 64, (3, 6)), "attention_mask": torch.ones(3, 6, dtype=torch.long),
...          "task_ids": torch.tensor([0, 1, 1])}
>>> ll = lik.loglik(batch, None)                 # the base model (no adapters): [3] log-likelihoods
>>> logits = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
>>> ref = torch.distributions.Categorical(logits=logits).log_prob(batch["input_ids"][:, 1:]).sum(1)
>>> torch.allclose(ll, ref, atol=1e-4)
True

:class:`~bora.model.hierarchy.BoraModel` (the priors) inherits it. A batch may carry the frozen prefix's cached hidden
states (``hidden``, :mod:`bora.lora.prefix`); the adapters of each row's task are handed to the layers for the
pass (:meth:`bora.lora.inject.AdapterSet.use`); the pass runs under the precision's autocast (:mod:`bora.core.device`);
the LM head runs on scored positions only, through :func:`bora.lora.head.chunked_nll` when it is a frozen linear
layer.

A classification batch (:mod:`bora.data.classification`; ``choice_row`` says which row each sequence, one per
choice, belongs to) runs every sequence under its row's task adapter, sums each choice's scored token
log-probabilities, and gives each row ``log softmax`` over its choices at the correct one (``label``): the
log-likelihood of a row is that of its label, so the fit, the Fisher and the evaluation all see it.
"""

from __future__ import annotations

import contextlib
from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..core.device import autocast
from ..data.batching import scored_positions
from ..lora.head import chunked_nll
from ..lora.inject import AdapterSet
from ..lora.linearize import linearized
from ..lora.prefix import FrozenPrefix

__all__ = ["LMLikelihood", "Params", "sequence_tasks", "choice_log_softmax"]

Params = Mapping[str, tuple[torch.Tensor, torch.Tensor]]


def sequence_tasks(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The task of each sequence of a batch: its row's (a classification batch has one sequence per choice)."""
    tids = batch["task_ids"]
    return tids[batch["choice_row"].to(tids.device)] if "choice_row" in batch else tids


def choice_log_softmax(seq_ll: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``[N, K_max]``: the per-sequence scores ``seq_ll [S]`` of a classification batch placed by ``choice_row`` and
    ``choice_index`` (``-inf`` where a row has fewer choices), log-softmaxed over each row's choices."""
    row, k = batch["choice_row"].to(seq_ll.device), batch["choice_index"].to(seq_ll.device)
    n = len(batch["task_ids"])
    width = int(k.max()) + 1 if k.numel() else 0
    scores = torch.full((n, width), float("-inf"), device=seq_ll.device, dtype=seq_ll.dtype)
    scores = scores.index_put((row, k), seq_ll)
    return torch.log_softmax(scores, 1)


class LMLikelihood:
    """Per-document log-likelihoods of a causal LM with bora's adapters in it."""

    def __init__(self, lm: nn.Module, adapters: AdapterSet, *, prefix: Optional[FrozenPrefix] = None,
                 autocast_dtype: Optional[torch.dtype] = None):
        self.lm = lm
        self.adapters = adapters
        self.prefix = prefix
        self.autocast_dtype = autocast_dtype
        self.device = next(lm.parameters()).device
        self._head_cast: Optional[tuple] = None  # (key, the LM head's weight in the autocast dtype)

    def autocast(self):
        """The context of a pass in the fit's precision (:func:`bora.core.device.autocast`)."""
        return autocast(self.device, self.autocast_dtype, self.lm)

    def _head_only_on_tokens(self) -> bool:
        """Whether logits can be computed as ``lm_head(hidden)`` on scored positions only."""
        cfg = getattr(self.lm, "config", None)
        special = any(getattr(cfg, a, None) not in (None, 1.0) for a in ("final_logit_softcapping", "logit_scale"))
        return (not special and getattr(self.lm, "base_model", None) is not None
                and self.lm.base_model is not self.lm and self.lm.get_output_embeddings() is not None)

    def scored_logits(self, batch: Mapping[str, torch.Tensor], params: Optional[Params],
                      direction: Optional[Params] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Next-token logits on the scored positions: ``(logits [n, V], labels [n], rows [n])``.

        ``rows`` is each scored token's document (row) in the batch. The LM head (the largest
        matmul of a small LM) runs only on scored, non-padding positions, so padding costs nothing
        there; ``params=None`` is the base model. With ``direction`` (adapters' shapes) the logits
        are those of the network linearised at ``params``, one step along ``direction``
        (:func:`bora.lora.linearize.linearized`: the GLM predictive at ``params + direction``).
        """
        if direction is not None:
            aux = {}

            def logits_at(p):
                logits, aux["labels"], aux["rows"] = self.scored_logits(batch, p)
                return logits

            return linearized(logits_at, params, direction), aux["labels"], aux["rows"]
        if self._head_only_on_tokens():
            h, labels, rows = self._scored_hidden(batch, params)
            with self.autocast():
                logits = self.lm.get_output_embeddings()(h)
            return logits.float(), labels, rows
        scored, labels, rows = self._scored(batch)
        with self._run(batch, params):
            logits = self.lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             use_cache=False).logits[:, :-1][scored]
        return logits.float(), labels, rows

    @staticmethod
    def _scored(batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(scored [N, L-1] mask, labels [n], rows [n])`` of a batch's scored next-token positions
        (:func:`bora.data.batching.scored_positions`: its ``loss_mask`` where it has one)."""
        ids = batch["input_ids"]
        scored = scored_positions(batch)
        rows = torch.arange(ids.shape[0], device=ids.device).unsqueeze(1).expand_as(scored)[scored]
        return scored, ids[:, 1:][scored], rows

    @contextlib.contextmanager
    def _run(self, batch: Mapping[str, torch.Tensor], params: Optional[Params]):
        """The context of one forward pass: the batch's adapters, its cached prefix and the autocast."""
        hidden = batch.get("hidden")
        if hidden is not None and self.prefix is None:
            raise ValueError("batch carries cached hidden states but the model has no prefix")
        resume = self.prefix.resume(hidden) if hidden is not None else contextlib.nullcontext()
        with self.adapters.use(params, sequence_tasks(batch) if params is not None else None), resume, \
                self.autocast():
            yield

    def _scored_hidden(self, batch, params) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The last hidden states at the scored positions ``[n, H]`` (the LM head's input), labels and rows."""
        scored, labels, rows = self._scored(batch)
        with self._run(batch, params):
            h = self.lm.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                   use_cache=False).last_hidden_state
        return h[:, :-1][scored], labels, rows

    def _head_weight(self) -> Optional[torch.Tensor]:
        """The frozen LM head's weight for :func:`bora.lora.head.chunked_nll` in the autocast dtype (a bfloat16 copy is
        made once and kept while the weight is unchanged), or ``None`` when the head is not a frozen bias-free
        linear layer (then the logits go through ``cross_entropy``)."""
        head = self.lm.get_output_embeddings()
        W, bias = getattr(head, "weight", None), getattr(head, "bias", None)
        if not isinstance(W, torch.Tensor) or W.requires_grad or bias is not None or W.dim() != 2:
            return None
        dtype = self.autocast_dtype if self.autocast_dtype is not None and W.is_floating_point() else W.dtype
        if dtype == W.dtype:
            return W
        key = (W.data_ptr(), W._version, dtype, W.device)
        if self._head_cast is None or self._head_cast[0] != key:
            self._head_cast = (key, W.detach().to(dtype))
        return self._head_cast[1]

    def loglik(self, batch: Mapping[str, torch.Tensor], params: Optional[Params],
               direction: Optional[Params] = None) -> torch.Tensor:
        """Per-document sum of next-token log-probabilities, ``[N]``; ``params=None`` is the base model
        (``direction``: linearised, as in :meth:`scored_logits`). The LM head and the NLL run in chunks of tokens
        (:func:`bora.lora.head.chunked_nll`) when the head is a frozen linear layer.

        A classification batch (one sequence per choice, :func:`bora.data.batching.collate`) gives each row's
        classification log-likelihood: the log softmax over its choices' summed token log-probabilities at the
        correct choice (:meth:`choice_log_probs`)."""
        if "choice_row" in batch:
            logp = self.choice_log_probs(batch, params, direction)
            return logp.gather(1, batch["label"].to(logp.device).unsqueeze(1)).squeeze(1)
        return self.sequence_loglik(batch, params, direction)

    def choice_log_probs(self, batch: Mapping[str, torch.Tensor], params: Optional[Params],
                         direction: Optional[Params] = None) -> torch.Tensor:
        """Each row's log-probabilities of its choices, ``[N, K_max]`` (``-inf`` past a row's last choice): the log
        softmax over the row's choices of their summed token log-probabilities given the prompt."""
        return choice_log_softmax(self.sequence_loglik(batch, params, direction), batch)

    def sequence_loglik(self, batch: Mapping[str, torch.Tensor], params: Optional[Params],
                        direction: Optional[Params] = None) -> torch.Tensor:
        """Per-sequence sum of the scored tokens' log-probabilities, ``[S]`` (``S = N`` but for a classification
        batch, whose sequences are its choices)."""
        W = self._head_weight() if direction is None and self._head_only_on_tokens() else None
        if W is not None:
            h, labels, rows = self._scored_hidden(batch, params)
            nll = chunked_nll(h, W, labels)
        else:
            logits, labels, rows = self.scored_logits(batch, params, direction)
            nll = F.cross_entropy(logits, labels, reduction="none")
        n = batch["input_ids"].shape[0]
        return -torch.zeros(n, device=nll.device, dtype=nll.dtype).index_add_(0, rows, nll)
