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
posterior average, the mean over posterior draws of the choice *probabilities* (``S >= 10`` draws advised),
and with ``rows=True`` each row's outputs (:func:`row_outputs`: both predictions over the row's own choices, the
predictive entropy of the average and the mutual information, for out-of-distribution scores;
``analysis/classification.py`` compares fits with them).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ..data.feed import Feed
from .metrics import brier, entropy, expected_calibration_error, mutual_information

__all__ = ["row_metrics", "classification_metrics", "choice_probs", "evaluate_classification", "row_outputs"]

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


def evaluate_classification(post, data, *, batch_size: int = 8, n_bins: int = 15, base: bool = True,
                            rows: bool = False) -> dict:
    """Classification metrics (:func:`classification_metrics`) of ``data`` under ``post`` (a
    :class:`~bora.posterior.samples.Posterior`): ``map`` (the point estimate), ``posterior_average`` (the mean over
    the posterior's distinct samples of the choice probabilities; the point estimate for a point fit) and, with
    ``base``, ``base`` (the base model without adapters); ``samples`` (draws averaged), ``seed``, ``point_fit``,
    ``predictive``. With ``rows``, also ``rows`` (:func:`row_outputs`: each row's task, label, MAP and
    posterior-average probabilities over its own choices, predictive entropy and mutual information)."""
    feed = post.as_feed(data)
    split = feed.split
    model = post.model
    p_map = choice_probs(model, post.point_params(), feed, batch_size)
    if post.is_point:
        p_bma, mi = p_map, torch.zeros(p_map.shape[0], dtype=torch.float64)
    else:
        draws = []
        for k in range(post.distinct_samples):
            params, direction = post.predictive_args(k)
            draws.append(choice_probs(model, params, feed, batch_size, direction))
        p_s = torch.stack(draws)  # [S, N, K_max], small: one number per choice
        p_bma = p_s.mean(0)
        mi = mutual_information(p_s.log()) if rows else None  # log 0 = -inf past a row's last choice: no term
    args = (split.labels, split.task_ids, split.tasks, n_bins)
    out = {"samples": 1 if post.is_point else post.distinct_samples, "seed": post.seed, "point_fit": post.is_point,
           "predictive": post.predictive, "map": classification_metrics(p_map, *args),
           "posterior_average": classification_metrics(p_bma, *args)}
    if base:
        out["base"] = classification_metrics(choice_probs(model, None, feed, batch_size), *args)
    if rows:
        out["rows"] = row_outputs(p_map, p_bma, mi, split.num_choices(), split.labels, split.task_ids, split.tasks)
    return out


def row_outputs(p_map: torch.Tensor, p_avg: torch.Tensor, mi: torch.Tensor, num_choices, labels, task_ids,
                tasks: Sequence[str]) -> dict:
    """Per-row outputs as JSON-ready lists: ``{"task", "label", "p_map", "p_avg", "entropy_avg",
    "mutual_information"}``; a row's probabilities are over its own ``num_choices`` choices (rows may differ),
    ``entropy_avg`` the entropy of ``p_avg`` (nats) and ``mutual_information`` ``H(p_avg) - mean_s H(p_s)`` (0 for a
    point fit; :func:`bora.evaluation.metrics.mutual_information`, a mean of KL terms, so never negative).

    >>> import torch
    >>> r = row_outputs(torch.tensor([[0.5, 0.5, 0.0]]), torch.tensor([[0.5, 0.5, 0.0]]), torch.zeros(1),
    ...                 [2], [1], [0], ("a",))
    >>> r["task"], r["p_avg"], round(r["entropy_avg"][0], 4)
    (['a'], [[0.5, 0.5]], 0.6931)
    """
    ks = [int(k) for k in torch.as_tensor(num_choices).tolist()]
    p_map, p_avg = p_map.double().cpu(), p_avg.double().cpu()
    return {"task": [tasks[int(t)] for t in torch.as_tensor(task_ids).tolist()],
            "label": [int(y) for y in torch.as_tensor(labels).tolist()],
            "p_map": [p_map[i, :k].tolist() for i, k in enumerate(ks)],
            "p_avg": [p_avg[i, :k].tolist() for i, k in enumerate(ks)],
            "entropy_avg": entropy(p_avg).tolist(),
            "mutual_information": mi.double().cpu().tolist()}
