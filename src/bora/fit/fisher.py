"""Per-task diagonal empirical Fisher: the likelihood precision of each task's adapter coordinates.

>>> import torch
>>> from bora.fit.fisher import TaskFisher
>>> tf = TaskFisher(fisher={"m": (torch.ones(2, 1, 3), 3 * torch.ones(2, 3, 1))},
...                 used=torch.tensor([4, 2]), sizes=torch.tensor([8, 2]))
>>> tf.fisher["m"][1].flatten(1).sum(1).tolist()   # per task, summed over B's 3 coordinates
[9.0, 9.0]

For task ``t`` with documents ``d``, ``F_t = sum_d g_d**2`` where ``g_d`` is the gradient of document
``d``'s log-likelihood with respect to ``theta_t`` at the given point.
Per-document gradients come from one batched backward pass per batch in which every task appears
at most once (:func:`bora.data.batching.distinct_task_batches`): the gradient of the batch's summed
log-likelihood with respect to row ``t`` of the task tensors is then exactly that task's
document gradient. In a data-parallel run (:mod:`bora.core.distributed`) each rank takes every
``N``-th batch and the sums are all-reduced. With ``max_per_task`` only a random subset of ``n_t`` of a task's ``N_t``
documents is used and the sum is scaled by ``N_t / n_t`` (unbiased).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.batching import distinct_task_batches
from ..core.distributed import all_reduce_sum_, world
from ..data.feed import Feed

__all__ = ["TaskFisher", "task_fisher"]


@dataclass
class TaskFisher:
    fisher: dict  # key -> (F_A [T, r, in], F_B [T, out, r])
    used: torch.Tensor  # documents used per task, [T]
    sizes: torch.Tensor  # documents per task, [T]
    # with ``gradients=...``: per task, its documents' gradients as columns ``[P_t, n_t]`` (scaled by sqrt(N_t / n_t))
    gradients: Optional[list] = None

    @classmethod
    def from_sums(cls, fisher: dict, used: torch.Tensor, sizes: torch.Tensor,
                  weight: Optional[torch.Tensor] = None) -> "TaskFisher":
        """Sum ``fisher`` (squared per-document gradients, in place) and ``used`` over data-parallel ranks,
        then scale each task's sums by ``N_t / n_t`` (``n_t``: the documents used, or their ``weight``)."""
        weight = used.double() if weight is None else weight
        all_reduce_sum_(*(X for pair in fisher.values() for X in pair), used, weight)
        c = torch.where(weight > 0, sizes.double() / weight.clamp_min(1e-300), 0.0).float()
        for pair in fisher.values():
            for X in pair:
                X.mul_(c.to(X.device).view(-1, *([1] * (X.dim() - 1))))
        return cls(fisher=fisher, used=used, sizes=sizes)


def _sampled_loglik(model, batch, params, generator: torch.Generator) -> torch.Tensor:
    """Per-document log-likelihood of next tokens drawn from the model itself (labels ~ p(. | context)); of a
    classification row: of a choice drawn from the model's probabilities of its choices."""
    if "choice_row" in batch:
        logp = model.choice_log_probs(batch, params)
        u = torch.rand(logp.shape[0], 1, generator=generator).to(logp.device)
        probs = logp.detach().exp()
        pick = torch.searchsorted(probs.cumsum(-1), u * probs.sum(-1, keepdim=True)).clamp_max(logp.shape[1] - 1)
        return logp.gather(1, pick).squeeze(1)
    logits, _, rows = model.scored_logits(batch, params)
    u = torch.rand(logits.shape[0], 1, generator=generator).to(logits.device)
    probs = torch.softmax(logits.detach(), -1)
    labels = torch.searchsorted(probs.cumsum(-1), u * probs.sum(-1, keepdim=True)).squeeze(-1)
    labels = labels.clamp_max(logits.shape[-1] - 1)
    nll = F.cross_entropy(logits, labels, reduction="none")
    n = batch["input_ids"].shape[0]
    return -torch.zeros(n, device=nll.device, dtype=nll.dtype).index_add_(0, rows, nll)


def _gradient_columns(params, gradients: dict, batches, task_ids: torch.Tensor, T: int):
    """``task_fisher``'s per-document gradient columns: ``([T] zero [P, n_t] tensors, each batch's column per row)``.

    Column j of task t is the j-th batch (in the global order) holding one of t's documents: the same slot on every
    rank, so the ranks' columns are summed into place."""
    width = sum(params[k][i].shape[-2] * params[k][i].shape[-1] for k, fs in gradients.items() for i in fs)
    slot = torch.zeros(T, dtype=torch.long)  # ends as the number of documents per task
    slots = []
    for _, idx in batches:
        tids = task_ids[idx]
        slots.append(slot[tids].clone())
        slot[tids] += 1
    return [torch.zeros(width, int(n)) for n in slot], slots


def task_fisher(model, params, feed: Feed, *, max_per_task: Optional[int] = None,
                generator: Optional[torch.Generator] = None, progress: bool = False,
                labels: str = "empirical", gradients: Optional[dict] = None,
                rows: Optional[torch.Tensor] = None, factors: Optional[Sequence[int]] = None) -> TaskFisher:
    """Diagonal Fisher of each task's log-likelihood with respect to its adapter at ``params``.

    ``labels='empirical'`` uses the documents' own next tokens (the empirical Fisher);
    ``'sampled'`` draws every next token from the model's predictive distribution at ``params``
    (one Monte-Carlo sample of the true Fisher, which is the Gauss-Newton matrix of the softmax
    likelihood: positive and unbiased even where the fit is poor).

    ``gradients``: ``{key: [factor, ...]}`` (0: ``A``, 1: ``B``) also keeps every used document's
    gradient with respect to those factors of its own task, flattened and concatenated in that order,
    as the columns of ``TaskFisher.gradients[t]`` (``[P, n_t]``, scaled by ``sqrt(N_t / n_t)``), so that
    ``G_t G_t^T`` is the task's full (not only diagonal) Fisher estimate and its diagonal is ``fisher``.

    ``rows``: only these documents of ``feed`` (indices), e.g. the probe documents of
    :class:`bora.fit.curvature.StepFisher`.

    ``factors``: only these adapter factors (0: ``A``, 1: ``B``; default both) get a per-task Fisher, e.g.
    ``model.task_factors()`` for a tau update; another factor is neither copied per task nor differentiated (its
    Fisher is an expanded zero), which saves four ``[T, r, in]`` tensors under hierarchy 'B'."""
    if labels not in ("empirical", "sampled"):
        raise ValueError(f"labels must be 'empirical' or 'sampled', got {labels!r}")
    label_seed = None
    if labels == "sampled":  # batch k draws its labels from its own stream: the same on any number of ranks
        label_seed = int(torch.randint(0, 2**62, (1,), generator=generator)) if generator is not None else 0
    T = model.num_tasks
    factors = (0, 1) if factors is None else tuple(sorted(set(factors)))
    if gradients is not None and any(i not in factors for fs in gradients.values() for i in fs):
        raise ValueError(f"gradients={gradients!r} asks for a factor outside factors={factors!r}")
    leaves, Fs = {}, {}
    for k, pair in params.items():
        leaves[k] = tuple(X.detach().expand(T, *X.shape[-2:]).clone().requires_grad_(True) if i in factors
                          else X.detach().expand(T, *X.shape[-2:]) for i, X in enumerate(pair))
        Fs[k] = tuple(torch.zeros_like(X) if i in factors else torch.zeros((), device=X.device).expand(X.shape)
                      for i, X in enumerate(leaves[k]))
    used = torch.zeros(T, dtype=torch.long)
    flat = [pair[i] for pair in leaves.values() for i in factors]
    model.adapters.train(False)
    batches = list(enumerate(distinct_task_batches(feed.split, max_per_task, generator=generator, rows=rows)))
    rank, size = world()
    cols, slots = (None, None) if gradients is None else _gradient_columns(params, gradients, batches,
                                                                           feed.split.task_ids, T)
    for k, idx in tqdm(batches[rank::size], desc="per-task Fisher", disable=not progress, leave=False):
        b = feed.batch(idx)
        if labels == "empirical":
            ll = model.loglik(b, leaves).sum()
        else:
            ll = _sampled_loglik(model, b, leaves, torch.Generator().manual_seed(label_seed + k)).sum()
        got = iter(torch.autograd.grad(ll, flat, allow_unused=True))  # a factor the likelihood ignores has none
        by_key = {key: tuple(next(got) if i in factors else None for i in range(2)) for key in Fs}
        for key, pair in Fs.items():
            for i in factors:
                if by_key[key][i] is not None:
                    pair[i].add_(by_key[key][i].square())
        if cols is not None:
            g = torch.cat([_or_zeros(by_key[key][i], leaves[key][i]).flatten(1)
                           for key, fs in gradients.items() for i in fs], 1).detach().cpu()
            for t, j in zip(b["task_ids"].cpu().tolist(), slots[k].tolist()):
                cols[t][:, j] = g[t]
        used += torch.bincount(b["task_ids"].cpu(), minlength=T)
    tf = TaskFisher.from_sums({k: tuple(pair[i] for i in factors) for k, pair in Fs.items()}, used,
                              feed.split.task_sizes().long())
    tf.fisher = Fs  # summed and scaled in place; a factor outside ``factors``: its expanded zero
    if cols is not None:
        all_reduce_sum_(*cols)
        sizes = feed.split.task_sizes().double()
        tf.gradients = [c.mul_(math.sqrt(float(sizes[t]) / c.shape[1]) if c.shape[1] else 0.0)
                        for t, c in enumerate(cols)]
    return tf


def _or_zeros(grad: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like) if grad is None else grad
