"""Classification and multiple-choice metrics: accuracy, NLL, ECE and Brier score per task and overall.

>>> import torch
>>> from bora.evaluation.classification import classification_metrics
>>> probs = torch.tensor([[0.9, 0.1], [0.4, 0.6], [0.2, 0.8], [0.7, 0.3]])
>>> m = classification_metrics(probs, torch.tensor([0, 0, 1, 1]), torch.tensor([0, 0, 1, 1]), ("a", "b"))
>>> m["per_task"]["a"]["accuracy"], m["per_task"]["b"]["accuracy"], m["overall"]["accuracy"]
(0.5, 0.5, 0.5)
>>> round(m["per_task"]["a"]["brier"], 4)          # ((0.1^2 + 0.1^2) + (0.6^2 + 0.6^2)) / 2
0.37

A row's prediction is its probabilities over its choices (``probs [N, K]``, zero past a row's last choice;
:func:`choice_probs`: the softmax of the choices' summed token log-probabilities given the prompt). Per task:

* ``accuracy``: the fraction of rows whose most probable choice (the first on a tie) is the correct one;
* ``nll``: the mean over rows of ``-log p(correct choice)`` (nats);
* ``ece``: expected calibration error of the top-1 probability with 15 equal-width bins ``(k/15, (k+1)/15]``
  (:func:`bora.evaluation.metrics.expected_calibration_error`, the binning of torchmetrics'
  ``MulticlassCalibrationError(norm='l1')``);
* ``brier``: the mean multi-class Brier score ``sum_k (p_k - y_k)^2`` (0 is perfect, 2 the worst).

``overall`` is the mean over tasks of each (every task counts once, as bora's ``ppl_task_mean``); ``pooled``
weighs every row equally. :func:`evaluate_classification` gives them for the point estimate (MAP) and for the
posterior average, the mean over posterior draws of the choice *probabilities* (``S >= 10`` draws advised).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ..data.feed import Feed
from .metrics import brier, expected_calibration_error

__all__ = ["row_metrics", "classification_metrics", "choice_probs", "evaluate_classification"]

METRICS = ("accuracy", "nll", "ece", "brier")


def row_metrics(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> dict:
    """Accuracy, mean NLL, ECE and mean Brier score of rows ``probs [N, K]`` with correct choices ``labels [N]``."""
    probs = probs.detach().double()
    labels = labels.to(probs.device).long()
    if probs.shape[0] == 0:
        return {k: math.nan for k in METRICS} | {"rows": 0}
    conf, top = probs.max(-1)
    hit = top == labels
    p_y = probs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return {"accuracy": float(hit.double().mean()), "nll": float(-p_y.clamp_min(1e-300).log().mean()),
            "ece": expected_calibration_error(conf, hit, n_bins), "brier": float(brier(probs, labels).mean()),
            "rows": int(probs.shape[0])}


def classification_metrics(probs: torch.Tensor, labels: torch.Tensor, task_ids: torch.Tensor,
                           tasks: Sequence[str], n_bins: int = 15) -> dict:
    """``{"per_task": {task: metrics}, "overall": mean over tasks, "pooled": over all rows}``
    (:func:`row_metrics`; tasks without rows are left out)."""
    task_ids = torch.as_tensor(task_ids).long().to(probs.device)
    per_task = {}
    for t, name in enumerate(tasks):
        mine = task_ids == t
        if bool(mine.any()):
            per_task[name] = row_metrics(probs[mine], labels[mine.to(labels.device)], n_bins)
    overall = {k: sum(m[k] for m in per_task.values()) / max(1, len(per_task)) for k in METRICS}
    overall["rows"] = sum(m["rows"] for m in per_task.values())
    return {"per_task": per_task, "overall": overall, "pooled": row_metrics(probs, labels, n_bins)}


@torch.no_grad()
def choice_probs(model, params, feed: Feed, batch_size: int = 16, direction=None) -> torch.Tensor:
    """Each classification row's probabilities of its choices under ``params`` (``None``: the base model),
    ``[N, K_max]`` float64 on CPU, zero past a row's last choice (``direction``: of the network linearised at
    ``params``, :meth:`bora.model.likelihood.LMLikelihood.scored_logits`)."""
    split = feed.split
    if not split.is_classification:
        raise ValueError("choice_probs needs classification rows (a split with choices)")
    n, width = len(split), int(split.num_choices().max()) if len(split) else 0
    out = torch.zeros(n, width, dtype=torch.float64)
    lengths = torch.tensor([sum(len(c) for c in cs) for cs in split.choices], dtype=torch.long)
    order = torch.argsort(lengths, stable=True)
    model.adapters.train(False)
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        logp = model.choice_log_probs(feed.batch(idx, expand=True), params, direction)
        out[idx, :logp.shape[1]] = logp.double().exp().cpu()
    return out


def evaluate_classification(post, data, *, batch_size: int = 8, n_bins: int = 15, base: bool = True) -> dict:
    """Classification metrics (:func:`classification_metrics`) of ``data`` under ``post`` (a
    :class:`~bora.posterior.samples.Posterior`): ``map`` (the point estimate), ``posterior_average`` (the mean over
    the posterior's distinct samples of the choice probabilities; the point estimate for a point fit) and, with
    ``base``, ``base`` (the base model without adapters); ``samples`` (draws averaged), ``seed``, ``point_fit``,
    ``predictive``."""
    feed = post.as_feed(data)
    split = feed.split
    model = post.model
    p_map = choice_probs(model, post.point_params(), feed, batch_size)
    if post.is_point:
        p_bma = p_map
    else:
        p_bma = torch.zeros_like(p_map)
        for k in range(post.distinct_samples):
            params, direction = post.predictive_args(k)
            p_bma += choice_probs(model, params, feed, batch_size, direction)
        p_bma /= post.distinct_samples
    args = (split.labels, split.task_ids, split.tasks, n_bins)
    out = {"samples": 1 if post.is_point else post.distinct_samples, "seed": post.seed, "point_fit": post.is_point,
           "predictive": post.predictive, "map": classification_metrics(p_map, *args),
           "posterior_average": classification_metrics(p_bma, *args)}
    if base:
        out["base"] = classification_metrics(choice_probs(model, None, feed, batch_size), *args)
    return out
