"""Held-out log-likelihood and perplexity, per task and overall.

>>> import torch
>>> from bora.evaluate import summarize
>>> s = summarize(doc_nll=torch.tensor([2.0, 4.0, 3.0]), doc_tokens=torch.tensor([1, 1, 1]),
...               task_ids=torch.tensor([0, 0, 1]), tasks=("a", "b"))
>>> s["per_task"]["a"]["nll"], s["per_task"]["b"]["nll"]
(3.0, 3.0)
>>> round(s["overall"]["ppl_task_mean"], 4) == round(float(torch.tensor(3.0).exp()), 4)
True

Conventions (the BoRA paper's): a task's NLL is its token-weighted mean next-token NLL over its
documents; the headline ``ppl_task_mean`` is ``exp(mean over tasks of the per-task NLL)`` (every
task counts once); ``ppl_token`` weights every token equally.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from .feed import Feed

__all__ = ["doc_loglik", "summarize", "evaluate"]


@torch.no_grad()
def doc_loglik(model, params, feed: Feed, batch_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-document log-likelihood sums and scored-token counts, on CPU."""
    n = len(feed)
    order = torch.argsort(feed.split.lengths, stable=True)  # similar lengths together: little padding
    ll = torch.zeros(n)
    tok = torch.zeros(n, dtype=torch.long)
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        b = feed.batch(idx)
        ll[idx] = model.loglik(b, params).float().cpu()
        tok[idx] = b["attention_mask"][:, 1:].sum(-1).cpu()
    return ll, tok


def summarize(doc_nll: torch.Tensor, doc_tokens: torch.Tensor, task_ids: torch.Tensor,
              tasks: Sequence[str]) -> dict:
    """Per-task and overall NLL/perplexity from per-document NLL sums."""
    T = len(tasks)
    nll_t = torch.zeros(T, dtype=torch.float64).index_add_(0, task_ids, doc_nll.double())
    tok_t = torch.zeros(T, dtype=torch.float64).index_add_(0, task_ids, doc_tokens.double())
    docs_t = torch.bincount(task_ids, minlength=T)
    per_task = {}
    for t, name in enumerate(tasks):
        if tok_t[t] > 0:
            v = float(nll_t[t] / tok_t[t])
            per_task[name] = {"nll": v, "ppl": math.exp(v), "tokens": int(tok_t[t]), "docs": int(docs_t[t])}
    mean_nll = sum(d["nll"] for d in per_task.values()) / max(1, len(per_task))
    tok_nll = float(nll_t.sum() / tok_t.sum().clamp_min(1))
    return {
        "per_task": per_task,
        "overall": {"nll_task_mean": mean_nll, "ppl_task_mean": math.exp(mean_nll),
                    "nll_token": tok_nll, "ppl_token": math.exp(tok_nll), "tokens": int(tok_t.sum())},
    }


def evaluate(model, params, feed: Feed, batch_size: int = 32) -> dict:
    """``summarize`` of ``feed``'s split under ``params`` (``None``: the base model), adapter dropout off."""
    model.adapters.train(False)
    ll, toks = doc_loglik(model, params, feed, batch_size)
    return summarize(-ll, toks, feed.split.task_ids, feed.split.tasks)
