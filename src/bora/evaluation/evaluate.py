"""Held-out log-likelihood and perplexity, per task and overall, with test-set (bootstrap) intervals.

>>> import torch
>>> from bora.evaluation.evaluate import summarize
>>> s = summarize(doc_nll=torch.tensor([2.0, 4.0, 3.0]), doc_tokens=torch.tensor([1, 1, 1]),
...               task_ids=torch.tensor([0, 0, 1]), tasks=("a", "b"))
>>> s["per_task"]["a"]["nll"], s["per_task"]["b"]["nll"]
(3.0, 3.0)
>>> round(s["overall"]["ppl_task_mean"], 4) == round(float(torch.tensor(3.0).exp()), 4)
True

Conventions (the BoRA paper's): a task's NLL is its token-weighted mean next-token NLL over its
documents; the headline ``ppl_task_mean`` is ``exp(mean over tasks of the per-task NLL)`` (every
task counts once); ``ppl_token`` weights every token equally.

**Test-set uncertainty.** A perplexity measured on a few test documents is itself uncertain (a
task with 75 test tokens has a wide one). :func:`bootstrap_ppl` resamples documents with
replacement *within each task* (the number of documents per task is kept) and reports percentile
intervals of every task's perplexity and of ``ppl_task_mean``; :func:`paired_bootstrap` does the
same for the *difference* of ``ppl_task_mean`` between two fits scored on the same documents,
resampling the same documents for both (paired), which cancels the documents' shared difficulty.
Both are pure functions of per-document NLL sums and token counts, seeded. This is a different
quantity from the spread of a perplexity over posterior samples (see
:func:`evaluate_posterior`, ``posterior_spread``): that one is the posterior
uncertainty of a plug-in quantity on fixed documents, this one the sampling uncertainty of the
test set.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import numpy as np
import torch

from ..core.config import DOC_ESTIMATORS, ConfigError
from ..core.distributed import all_reduce_sum_, world
from ..data.batching import row_tokens
from ..data.feed import Feed

__all__ = ["doc_loglik", "summarize", "by_task_size", "evaluate", "bootstrap_ppl", "paired_bootstrap",
           "tasks_bootstrap", "seeds_bootstrap", "seeds_bootstrap_means", "within_task_draws", "seed_draws"]


@torch.no_grad()
def doc_loglik(model, params, feed: Feed, batch_size: int = 32, direction=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-document log-likelihood sums and scored-token counts, on CPU (``direction``: of the network
    linearised at ``params``, :meth:`bora.model.likelihood.LMLikelihood.scored_logits`).

    In a data-parallel run each rank scores every ``N``-th document and the sums are all-reduced,
    so every rank returns the whole split's numbers."""
    n = len(feed)
    order = torch.argsort(feed.split.lengths, stable=True)  # similar lengths together: little padding
    rank, size = world()
    order = order[rank::size]
    ll = torch.zeros(n)
    tok = torch.zeros(n, dtype=torch.long)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        b = feed.batch(idx)
        ll[idx] = model.loglik(b, params, direction).float().cpu()
        tok[idx] = row_tokens(b).cpu()
    all_reduce_sum_(ll, tok)
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


def by_task_size(fitted: dict, base: dict, train_sizes: Mapping[str, int],
                 edges: Sequence[int] = (2, 10, 30, 100)) -> list[dict]:
    """Test perplexity by the size of a task's training split: one row per bucket of tasks with ``1..edges[0]``,
    ``edges[0]+1..edges[1]``, ... and more than ``edges[-1]`` training documents (``0``: a bucket of its own),
    each ``{"bucket", "tasks", "base_ppl", "fit_ppl", "change"}`` with the perplexities ``exp(mean per-task NLL)``
    over the bucket's tasks (every task counts once, as in :func:`summarize`). ``fitted`` and ``base``:
    :func:`summarize` outputs; tasks without test documents are left out; empty buckets are omitted.

    >>> f = {"per_task": {"a": {"nll": 1.0}, "b": {"nll": 2.0}, "c": {"nll": 3.0}}}
    >>> b = {"per_task": {"a": {"nll": 1.5}, "b": {"nll": 2.0}, "c": {"nll": 3.0}}}
    >>> [(r["bucket"], r["tasks"]) for r in by_task_size(f, b, {"a": 1, "b": 2, "c": 500})]
    [('1-2', 2), ('>100', 1)]
    """
    lows = [0, 1] + [e + 1 for e in edges]
    highs = [0] + list(edges) + [None]
    rows = []
    for lo, hi in zip(lows, highs):
        names = [t for t in fitted["per_task"] if t in base["per_task"]
                 and lo <= int(train_sizes.get(t, 0)) and (hi is None or int(train_sizes.get(t, 0)) <= hi)]
        if not names:
            continue
        f = math.exp(sum(fitted["per_task"][t]["nll"] for t in names) / len(names))
        b0 = math.exp(sum(base["per_task"][t]["nll"] for t in names) / len(names))
        label = "0" if hi == 0 else f">{lo - 1}" if hi is None else f"{lo}-{hi}"
        rows.append({"bucket": label, "tasks": len(names), "base_ppl": b0, "fit_ppl": f, "change": f / b0 - 1})
    return rows


def evaluate(model, params, feed: Feed, batch_size: int = 32) -> dict:
    """``summarize`` of ``feed``'s split under ``params`` (``None``: the base model), adapter dropout off."""
    model.adapters.train(False)
    ll, toks = doc_loglik(model, params, feed, batch_size)
    return summarize(-ll, toks, feed.split.task_ids, feed.split.tasks)


# ----------------------------------------------------------------------------- document bootstrap
def _as_np(x, dtype) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double() if dtype == np.float64 else x.detach().cpu()
    return np.asarray(x, dtype=dtype)


def within_task_draws(task_ids, num_tasks: int, resamples: int, seed: int, skip=None):
    """The document bootstrap's draws: for each task ``t`` with documents (and not ``skip(docs)``), in task order,
    ``(t, docs [n_t], draws [R, n_t])``, ``draws`` the documents resampled with replacement within the task
    (one ``numpy`` generator seeded by ``seed``, consumed task by task: the same draws as
    :func:`paired_bootstrap` and :func:`seeds_bootstrap` make, for any statistic of the resampled documents).

    >>> [(t, d.tolist(), r.shape) for t, d, r in within_task_draws([0, 1, 1], 3, 5, 0)]
    [(0, [0], (5, 1)), (1, [1, 2], (5, 2))]
    """
    if resamples < 1:
        raise ValueError("resamples must be >= 1")
    task_ids = np.asarray(task_ids)
    rng = np.random.default_rng(seed)
    for t in range(num_tasks):
        docs = np.flatnonzero(task_ids == t)
        if len(docs) == 0 or (skip is not None and skip(docs)):
            continue
        yield t, docs, docs[rng.integers(0, len(docs), size=(resamples, len(docs)))]


def seed_draws(num_seeds: int, resamples: int, seed: int) -> np.ndarray:
    """``[R, K]``: the fitting seeds drawn with replacement in each resample (:func:`seeds_bootstrap`'s draws)."""
    return np.random.default_rng(seed + 1).integers(0, num_seeds, size=(resamples, num_seeds))


def _task_nll_resamples(nlls: np.ndarray, tokens: np.ndarray, task_ids: np.ndarray, num_tasks: int,
                        resamples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-task NLL per token of every column of ``nlls [K, N]``: ``(estimate [K, T], resampled [K, R, T])``.

    Documents are resampled with replacement within each task (:func:`within_task_draws`), with the same indices
    for every column (paired). Tasks without documents are NaN."""
    K, N = nlls.shape
    if tokens.shape != (N,) or task_ids.shape != (N,):
        raise ValueError("nll, tokens and task_ids must have one entry per document")
    est = np.full((K, num_tasks), np.nan)
    boot = np.full((K, resamples, num_tasks), np.nan)
    for t, docs, idx in within_task_draws(task_ids, num_tasks, resamples, seed,
                                          skip=lambda d: tokens[d].sum() <= 0):
        est[:, t] = nlls[:, docs].sum(1) / tokens[docs].sum()
        tok = tokens[idx].sum(1)  # [R]
        boot[:, :, t] = nlls[:, idx].sum(-1) / np.maximum(tok, 1)
    return est, boot


def _interval(x: np.ndarray, level: float, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    q = (1.0 - level) / 2.0
    lo, hi = np.quantile(x, [q, 1.0 - q], axis=axis)
    return lo, hi


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level!r}")


def bootstrap_ppl(doc_nll, doc_tokens, task_ids, tasks: Optional[Sequence[str]] = None, *,
                  resamples: int = 1000, level: float = 0.9, seed: int = 0) -> dict:
    """Test-set percentile intervals of per-task perplexity and of ``ppl_task_mean`` by a document bootstrap.

    ``doc_nll``: per-document NLL sums (nats), ``doc_tokens``: scored tokens per document,
    ``task_ids``: the task of each document (``0..T-1``; ``T = len(tasks)``). Documents are
    resampled with replacement within each task, ``resamples`` times, seeded by ``seed``.
    Returns ``{"level", "resamples", "seed", "per_task": {task: {"ppl", "lo", "hi"}},
    "overall": {"ppl_task_mean", "lo", "hi"}}`` (tasks without documents are left out).

    >>> r = bootstrap_ppl([2.0, 2.0, 6.0, 6.0], [2, 2, 3, 3], [0, 0, 1, 1], ("a", "b"))
    >>> r["per_task"]["a"]        # every document of "a" has 1 nat/token: no test-set spread
    {'ppl': 2.718281828459045, 'lo': 2.718281828459045, 'hi': 2.718281828459045}
    >>> round(r["overall"]["ppl_task_mean"], 4)   # exp((1 + 2) / 2)
    4.4817
    """
    _check_level(level)
    nll = _as_np(doc_nll, np.float64)[None]
    tok = _as_np(doc_tokens, np.float64)
    tid = _as_np(task_ids, np.int64)
    T = len(tasks) if tasks is not None else int(tid.max()) + 1 if len(tid) else 0
    names = list(tasks) if tasks is not None else [str(t) for t in range(T)]
    est, boot = _task_nll_resamples(nll, tok, tid, T, resamples, seed)
    est, boot = est[0], boot[0]
    have = ~np.isnan(est)
    per_task = {}
    lo, hi = _interval(np.exp(boot), level)
    for t in np.flatnonzero(have):
        per_task[names[t]] = {"ppl": float(np.exp(est[t])), "lo": float(lo[t]), "hi": float(hi[t])}
    mean_boot = np.exp(boot[:, have].mean(1))
    olo, ohi = _interval(mean_boot, level)
    return {"level": level, "resamples": resamples, "seed": seed, "per_task": per_task,
            "overall": {"ppl_task_mean": float(np.exp(est[have].mean())), "lo": float(olo), "hi": float(ohi)}}


def paired_bootstrap(nll_a, nll_b, tokens, task_ids, *, tasks: Optional[Sequence[str]] = None,
                     resamples: int = 1000, level: float = 0.95, seed: int = 0) -> dict:
    """Paired document-bootstrap interval of ``ppl_task_mean(a) - ppl_task_mean(b)`` for two fits on the same documents.

    ``nll_a`` / ``nll_b``: per-document NLL sums of fit ``a`` and fit ``b`` on the *same*
    documents (same order), ``tokens``: scored tokens per document, ``task_ids``: each document's
    task (``0..T-1``). ``ppl_task_mean = exp(mean over tasks of the per-task NLL per token)`` (the
    paper's convention, :func:`summarize`). Documents are resampled with replacement within each
    task, ``resamples`` times (seeded), with the *same* resampled documents for ``a`` and ``b``.
    Returns ``{"a", "b", "diff", "lo", "hi", "level", "resamples", "seed", "frac_a_lower",
    "per_task"}``: the two perplexities, their difference and its ``level`` percentile interval,
    the fraction of resamples in which ``a`` has the lower perplexity, and per task (keyed by
    ``tasks`` or the task index as a string) ``{"a", "b", "diff", "lo", "hi"}`` for the per-task
    perplexities. A negative ``diff`` with ``hi < 0`` means ``a`` is better on this test set
    beyond its sampling noise.

    >>> nll = [2.0, 3.0, 2.5, 4.0]            # four documents of one token, two tasks
    >>> r = paired_bootstrap(nll, nll, [1, 1, 1, 1], [0, 0, 1, 1])
    >>> r["diff"], r["lo"], r["hi"]           # identical fits: a zero-width interval at 0
    (0.0, 0.0, 0.0)
    >>> worse = [x + 0.1 for x in nll]       # a is 0.1 nats/token worse on every document
    >>> r = paired_bootstrap(worse, nll, [1, 1, 1, 1], [0, 0, 1, 1])
    >>> r["diff"] > 0 and r["lo"] > 0, r["frac_a_lower"]
    (True, 0.0)
    """
    _check_level(level)
    a, b = _as_np(nll_a, np.float64), _as_np(nll_b, np.float64)
    if a.shape != b.shape:
        raise ValueError("nll_a and nll_b must score the same documents")
    tok = _as_np(tokens, np.float64)
    tid = _as_np(task_ids, np.int64)
    T = len(tasks) if tasks is not None else int(tid.max()) + 1 if len(tid) else 0
    names = list(tasks) if tasks is not None else [str(t) for t in range(T)]
    est, boot = _task_nll_resamples(np.stack([a, b]), tok, tid, T, resamples, seed)
    have = ~np.isnan(est[0])
    ppl = np.exp(est[:, have].mean(1))  # [2]
    ppl_r = np.exp(boot[:, :, have].mean(2))  # [2, R]
    d_r = ppl_r[0] - ppl_r[1]
    lo, hi = _interval(d_r, level)
    per_task = {}
    pt = np.exp(est)
    plo, phi = _interval(np.exp(boot[0]) - np.exp(boot[1]), level)
    for t in np.flatnonzero(have):
        per_task[names[t]] = {"a": float(pt[0, t]), "b": float(pt[1, t]), "diff": float(pt[0, t] - pt[1, t]),
                              "lo": float(plo[t]), "hi": float(phi[t])}
    return {"a": float(ppl[0]), "b": float(ppl[1]), "diff": float(ppl[0] - ppl[1]), "lo": float(lo),
            "hi": float(hi), "level": level, "resamples": resamples, "seed": seed,
            "frac_a_lower": float((d_r < 0).mean()), "per_task": per_task}


def tasks_bootstrap(nll_a, nll_b, tokens, task_ids, *, resamples: int = 2000, level: float = 0.95,
                    seed: int = 0) -> dict:
    """Two-level paired bootstrap of ``ppl_task_mean(a) - ppl_task_mean(b)``: the tasks with replacement, then the
    documents within each drawn task (the same draws for ``a`` and ``b``).

    :func:`paired_bootstrap` holds the tasks fixed, so a task with one test document contributes no spread and a
    set of such tasks gets a zero-width interval. Resampling the tasks too gives the interval for tasks drawn
    from the same population, e.g. when the tasks are a random sample of a larger corpus. Returns ``{"a", "b",
    "diff", "lo", "hi", "level", "resamples", "seed", "frac_a_lower", "tasks"}`` (``tasks``: how many tasks
    have documents).

    >>> nll = [2.0, 2.0, 2.0]                           # three tasks of one one-token document each
    >>> r = tasks_bootstrap([x - 0.1 for x in nll[:2]] + [2.3], nll, [1, 1, 1], [0, 1, 2], resamples=400)
    >>> r["lo"] < 0 < r["hi"], r["tasks"]              # better on two tasks, worse on one: the interval spans 0
    (True, 3)
    """
    _check_level(level)
    a, b = _as_np(nll_a, np.float64), _as_np(nll_b, np.float64)
    if a.shape != b.shape:
        raise ValueError("nll_a and nll_b must score the same documents")
    tok, tid = _as_np(tokens, np.float64), _as_np(task_ids, np.int64)
    T = int(tid.max()) + 1 if len(tid) else 0
    est, boot = _task_nll_resamples(np.stack([a, b]), tok, tid, T, resamples, seed)
    have = ~np.isnan(est[0])
    est, boot = est[:, have], boot[:, :, have]  # [2, n], [2, R, n]
    n = est.shape[1]
    draw = np.random.default_rng([seed, 1]).integers(0, n, size=(resamples, n))  # [R, n] tasks per resample
    ppl_r = np.exp(np.take_along_axis(boot, draw[None], axis=2).mean(2))  # [2, R]
    d_r = ppl_r[0] - ppl_r[1]
    lo, hi = _interval(d_r, level)
    ppl = np.exp(est.mean(1))
    return {"a": float(ppl[0]), "b": float(ppl[1]), "diff": float(ppl[0] - ppl[1]), "lo": float(lo),
            "hi": float(hi), "level": level, "resamples": resamples, "seed": seed,
            "frac_a_lower": float((d_r < 0).mean()), "tasks": int(n)}


def seeds_bootstrap(nll_a, nll_b, tokens, task_ids, *, resamples: int = 2000, level: float = 0.95,
                    seed: int = 0) -> dict:
    """Paired bootstrap over documents *and* fitting seeds of ``mean over seeds of ppl_task_mean(a) - ... (b)``.

    ``nll_a`` / ``nll_b``: ``[K, N]`` per-document NLL sums of ``K`` fits of each setting (row ``k`` of both:
    fitting seed ``k``, so the rows are paired by seed) on the same ``N`` documents. Each resample draws ``K``
    seeds with replacement (the same draws for ``a`` and ``b``) and the documents with replacement within each
    task (the same for every seed and both settings), and takes the mean over the drawn seeds of the
    difference of ``ppl_task_mean``. The interval so carries both the test set's sampling noise and the spread
    between fitting seeds; with ``K = 1`` it is :func:`paired_bootstrap`'s. Returns ``{"a", "b", "diff", "lo",
    "hi", "level", "resamples", "seed", "seeds", "per_seed", "frac_a_lower"}`` (``a``, ``b``: the mean
    perplexities over seeds; ``per_seed``: each seed's difference).

    >>> nll = [[2.0, 3.0, 2.5, 4.0], [2.2, 3.1, 2.4, 4.2]]   # two seeds, four one-token documents
    >>> worse = [[x + 0.1 for x in row] for row in nll]       # a is 0.1 nats/token worse everywhere
    >>> r = seeds_bootstrap(worse, nll, [1, 1, 1, 1], [0, 0, 1, 1], resamples=200)
    >>> r["lo"] > 0, r["seeds"], r["frac_a_lower"]
    (True, 2, 0.0)
    """
    return _seeds_bootstrap(nll_a, nll_b, tokens, task_ids, resamples, level, seed, np.exp)


def seeds_bootstrap_means(values_a, values_b, task_ids, *, resamples: int = 2000, level: float = 0.95,
                          seed: int = 0) -> dict:
    """:func:`seeds_bootstrap` of a per-row quantity's task mean: the paired interval of ``mean over seeds of
    (mean over tasks of the task's mean row value)`` of ``a`` minus that of ``b``.

    ``values_a`` / ``values_b``: ``[K, N]`` per-row values (e.g. a classification row's NLL, or 1 for a correct
    prediction) of ``K`` seeds of each setting, paired by seed, on the same ``N`` rows. The rows are resampled
    within each task and the seeds with replacement, exactly as :func:`seeds_bootstrap` (the same draws). Returns
    its keys (``a``, ``b``: the means over seeds).

    >>> r = seeds_bootstrap_means([[1.0, 0.0, 1.0, 1.0]], [[0.0, 0.0, 1.0, 0.0]], [0, 0, 1, 1], resamples=200)
    >>> r["a"], r["b"], r["diff"], r["lo"] >= 0      # a is right on every row b is, and on two more
    (0.75, 0.25, 0.5, True)
    """
    n = np.atleast_2d(_as_np(values_a, np.float64)).shape[-1]
    return _seeds_bootstrap(values_a, values_b, np.ones(n), task_ids, resamples, level, seed, lambda x: x)


def _seeds_bootstrap(nll_a, nll_b, tokens, task_ids, resamples: int, level: float, seed: int, link) -> dict:
    """:func:`seeds_bootstrap` with ``link`` applied to the mean over tasks (``np.exp``: perplexity)."""
    _check_level(level)
    a, b = np.atleast_2d(_as_np(nll_a, np.float64)), np.atleast_2d(_as_np(nll_b, np.float64))
    if a.shape != b.shape:
        raise ValueError("nll_a and nll_b must hold the same seeds and documents")
    K = a.shape[0]
    tok = _as_np(tokens, np.float64)
    tid = _as_np(task_ids, np.int64)
    T = int(tid.max()) + 1 if len(tid) else 0
    est, boot = _task_nll_resamples(np.concatenate([a, b]), tok, tid, T, resamples, seed)
    have = ~np.isnan(est[0])
    ppl = link(est[:, have].mean(1))  # [2K]
    ppl_r = link(boot[:, :, have].mean(2))  # [2K, R]
    d_seed = ppl[:K] - ppl[K:]
    d_seed_r = ppl_r[:K] - ppl_r[K:]  # [K, R]
    draws = seed_draws(K, resamples, seed)  # [R, K] seeds per resample
    d_r = d_seed_r[draws, np.arange(resamples)[:, None]].mean(1)
    lo, hi = _interval(d_r, level)
    return {"a": float(ppl[:K].mean()), "b": float(ppl[K:].mean()), "diff": float(d_seed.mean()), "lo": float(lo),
            "hi": float(hi), "level": level, "resamples": resamples, "seed": seed, "seeds": K,
            "per_seed": d_seed.tolist(), "frac_a_lower": float((d_r < 0).mean())}

# ---------------------------------------------------------------------- posterior predictive (BMA)
__all__ += ["token_log_probs", "evaluate_posterior", "perplexity_spread"]


def token_log_probs(model, batch: dict, params, direction=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Next-token log-probabilities on the scored positions of ``batch``: ``(log_probs [n, V], labels [n], rows [n])``.

    The same computation as :meth:`bora.model.likelihood.LMLikelihood.loglik` (frozen-prefix cache, head on scored
    positions only) but keeping the whole distribution; ``rows`` is each token's row in the batch.
    ``direction``: linearised at ``params`` (:meth:`bora.model.likelihood.LMLikelihood.scored_logits`).
    """
    logits, labels, rows = model.scored_logits(batch, params, direction)
    return torch.log_softmax(logits, -1), labels, rows


def evaluate_posterior(post, data, *, batch_size: int = 8, n_bins: int = 15, level: float = 0.9,
                       bootstrap: int = 1000, progress: bool = False, doc_estimator: str = "auto") -> dict:
    """Point estimate vs Bayesian model average on ``data`` under ``post`` (a
    :class:`~bora.posterior.samples.Posterior`), with posterior and test-set intervals.

    Returns a dict with

    * ``point``: the point estimate (:func:`bora.evaluation.evaluate.summarize`'s ``per_task`` / ``overall``
      NLL and perplexity, plus ``tokens``: :class:`bora.evaluation.metrics.TokenMetrics` of its next-token
      predictions: NLL, top-1 accuracy, ECE, Brier, entropy; MI is 0);
    * ``bma_doc``: the **document-level posterior predictive**, the headline BMA: each document's
      NLL is ``-log E_post p(doc | adapter)`` (``per_task`` / ``overall`` as for ``point``), estimated by
      ``doc_estimator``: ``"tilted"``, importance sampling from the equal mixture of the posterior and
      the posterior tilted by each document's gradient (:mod:`bora.evaluation.tilted`; Laplace and centred
      mean-field posteriors; ``2 S`` draws: the ``S`` samples and ``S`` tilted copies), or ``"plain"``,
      ``-log mean_s p(doc | adapter_s)`` over the samples (biased low by about
      ``var_s / (2 S)`` of a document's log-likelihood, far more when that variance is several nats^2);
      ``"auto"``: tilted where it applies. ``doc_estimator`` says which was used, ``bma_doc_plain``
      is always the plain estimate and ``tilted_ess`` (tilted only) the effective sample size of the
      documents' ``2 S`` importance weights (median, 10% quantile, fraction below ``S``);
    * ``bma_token``: the **token-level BMA**, ``p_bar = mean_s p_s`` of the samples' next-token
      distributions: ``per_task`` / ``overall`` NLL and ``tokens`` (accuracy, ECE, Brier, predictive
      entropy, mean sample entropy and mutual information ``mean_s KL(p_s || p_bar)`` per token,
      in float64). ECE / Brier / accuracy need one categorical prediction per token, so they use it;
    * ``posterior_spread[task]``: ``{"lo", "median", "hi", "level"}``, quantiles over samples of the
      task's perplexity under each sample: the posterior spread of a plug-in quantity on these
      documents (not test-set uncertainty);
    * ``test_interval``: ``{"point": ..., "bma_doc": ...}``, each :func:`bora.evaluation.evaluate.bootstrap_ppl`
      (``bootstrap`` resamples of documents within each task, ``level`` percentile intervals of
      per-task perplexity and ``ppl_task_mean``; seeded with the posterior's seed): how much the
      numbers would move on another test set of the same size;
    * ``documents``: per-document lists ``task_ids``, ``tokens``, ``nll_point``, ``nll_bma_doc``,
      ``nll_bma_doc_plain``, ``nll_bma_token`` (NLL sums), ``mutual_information`` (mean MI per token of
      the document) and, tilted only, ``ess`` (the importance weights' effective sample size),
      e.g. for :func:`bora.evaluation.evaluate.paired_bootstrap` or an MI-based out-of-distribution score;
    * ``samples``, ``seed``, ``point_fit`` (every sample is the point estimate), ``predictive``
      (``"linear"``: each sample's predictions are the network linearised at the point estimate,
      :mod:`bora.lora.linearize`; ``"sample"``: the network run at the sampled adapter).
    """
    from .metrics import log_mean_exp
    from .tilted import TiltedPredictive, mixture_log_mean_exp

    tilted = TiltedPredictive(post) if _use_tilted(post, doc_estimator) else None
    feed = post.as_feed(data)
    r = _posterior_pass(post, feed, batch_size=batch_size, n_bins=n_bins, tilted=tilted, progress=progress)
    nll_point, nll_tok_bma, toks, ll_s = r["nll_point"], r["nll_tok_bma"], r["toks"], r["ll_s"]
    if post.is_point and post.num_samples > 1:
        ll_s = ll_s.expand(post.num_samples, -1)
    tids, tasks = feed.split.task_ids, feed.split.tasks
    point = {**summarize(nll_point, toks, tids, tasks), "tokens": r["m_point"].result()}
    bma_token = {**summarize(nll_tok_bma, toks, tids, tasks), "tokens": r["m_bma"].result()}
    nll_plain = -log_mean_exp(ll_s, 0)
    bma_doc_plain = summarize(nll_plain, toks, tids, tasks)
    ess = None
    if tilted is not None:
        est, ess = mixture_log_mean_exp(ll_s, *r["tilted"])
        nll_doc, bma_doc = -est, summarize(-est, toks, tids, tasks)
    else:
        nll_doc, bma_doc = nll_plain, bma_doc_plain
    spread = perplexity_spread(ll_s, toks, tids, tasks, level)
    boot = dict(tasks=tasks, resamples=bootstrap, level=level, seed=post.seed)
    test_interval = {"point": bootstrap_ppl(nll_point, toks, tids, **boot),
                     "bma_doc": bootstrap_ppl(nll_doc, toks, tids, **boot)}
    documents = {"task_ids": tids.tolist(), "tokens": toks.tolist(), "nll_point": nll_point.tolist(),
                 "nll_bma_doc": nll_doc.tolist(), "nll_bma_doc_plain": nll_plain.tolist(),
                 "nll_bma_token": nll_tok_bma.tolist(),
                 "mutual_information": (r["mi_doc"] / toks.clamp_min(1)).tolist()}
    out = {"samples": post.num_samples, "seed": post.seed, "point_fit": post.is_point,
           "predictive": post.predictive, "doc_estimator": "plain" if tilted is None else "tilted", "point": point,
           "bma_doc": bma_doc, "bma_doc_plain": bma_doc_plain, "bma_token": bma_token, "posterior_spread": spread,
           "test_interval": test_interval, "documents": documents}
    if ess is not None:
        documents["ess"] = ess.tolist()
        out["tilted_ess"] = {"median": float(ess.median()), "q10": float(ess.quantile(0.1)),
                             "below_half": float((ess < post.distinct_samples).double().mean())}
    return out


def _use_tilted(post, doc_estimator: str) -> bool:
    """Whether :func:`evaluate_posterior` estimates the document-level BMA by gradient-tilted importance sampling
    (ConfigError for an unknown ``doc_estimator``, or ``"tilted"`` where it does not apply)."""
    from .tilted import unsupported

    if doc_estimator not in DOC_ESTIMATORS:
        raise ConfigError(f"doc_estimator must be one of {', '.join(DOC_ESTIMATORS)}, got {doc_estimator!r}")
    reason = unsupported(post)
    if doc_estimator == "tilted" and reason is not None:
        raise ConfigError(f"the tilted document-level estimator does not apply: {reason}")
    return doc_estimator == "tilted" or (doc_estimator == "auto" and reason is None and post.num_samples > 1)


def _posterior_pass(post, feed: Feed, *, batch_size: int, n_bins: int, tilted, progress: bool) -> dict:
    """One pass of :func:`evaluate_posterior` over ``feed`` (documents shortest first, ``batch_size`` at a time)
    under the point estimate and every distinct sample: per-document sums ``nll_point`` and ``nll_tok_bma``
    (token-level BMA), ``mi_doc`` and token counts ``toks``, per-sample log-likelihoods ``ll_s [S, n]``, the
    token metrics ``m_point`` / ``m_bma`` and, with ``tilted``, its log-weights ``(t_ll, t_lin, t_quad)``."""
    from tqdm.auto import tqdm

    from .metrics import SampleAverager, TokenMetrics

    model = post.model
    split = feed.split
    n = len(split)
    S = post.distinct_samples
    model.adapters.train(False)
    point_params = post.point_params()
    sample_args = [] if post.is_point else [post.predictive_args(k) for k in range(S)]
    nll_point = torch.zeros(n, dtype=torch.float64)
    nll_tok_bma = torch.zeros(n, dtype=torch.float64)
    mi_doc = torch.zeros(n, dtype=torch.float64)
    ll_s = torch.zeros(S, n, dtype=torch.float64)
    if tilted is not None:
        t_ll, t_lin = torch.zeros(S, n, dtype=torch.float64), torch.zeros(S, n, dtype=torch.float64)
        t_quad = torch.zeros(n, dtype=torch.float64)
    toks = torch.zeros(n, dtype=torch.long)
    m_point, m_bma = TokenMetrics(n_bins), TokenMetrics(n_bins)
    order = torch.argsort(split.lengths, stable=True)
    chunks = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    for idx in tqdm(chunks, desc="posterior evaluation", disable=not progress, leave=False):
        b = feed.batch(idx)
        logp, labels, rows = token_log_probs(model, b, point_params)
        doc = idx.to(rows.device)[rows].cpu()
        nll_tok = -logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1).double().cpu()
        nll_point.index_add_(0, doc, nll_tok)
        toks.index_add_(0, doc, torch.ones_like(doc))
        m_point.add(logp.exp(), labels)
        avg = SampleAverager()
        for k in range(S):
            lp = logp if post.is_point else token_log_probs(model, b, *sample_args[k])[0]
            ll_s[k].index_add_(0, doc, lp.gather(-1, labels.unsqueeze(-1)).squeeze(-1).double().cpu())
            avg.add(lp)
        p_bar = avg.probs()
        mi = avg.mutual_information()
        nll_tok_bma.index_add_(0, doc, -p_bar.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
                               .clamp_min(1e-300).log().cpu())
        mi_doc.index_add_(0, doc, mi.cpu())
        m_bma.add(p_bar, labels, expected_entropy=avg.expected_entropy(), mi=mi)
        del avg, p_bar
        if tilted is not None:
            t_ll[:, idx], t_lin[:, idx], t_quad[idx] = tilted.log_weights(b, range(S))
    return {"nll_point": nll_point, "nll_tok_bma": nll_tok_bma, "mi_doc": mi_doc, "toks": toks, "ll_s": ll_s,
            "m_point": m_point, "m_bma": m_bma, "tilted": (t_ll, t_lin, t_quad) if tilted is not None else None}


def perplexity_spread(ll_s: torch.Tensor, toks: torch.Tensor, tids: torch.Tensor, tasks, level: float) -> dict:
    """Per task with tokens, ``{"lo", "median", "hi", "level"}`` of its perplexity over the samples (the rows of
    the per-document log-likelihoods ``ll_s``): the posterior spread of the plug-in perplexity."""
    T = len(tasks)
    tok_t = torch.zeros(T, dtype=torch.float64).index_add_(0, tids, toks.double())
    nll_st = torch.zeros(ll_s.shape[0], T, dtype=torch.float64).index_add_(1, tids, -ll_s) / tok_t.clamp_min(1)
    ppl_st = nll_st.exp()
    lo_q, hi_q = (1 - level) / 2, 1 - (1 - level) / 2
    spread = {}
    for t, name in enumerate(tasks):
        if tok_t[t] > 0:
            col = ppl_st[:, t]
            spread[name] = {"lo": float(col.quantile(lo_q)), "hi": float(col.quantile(hi_q)),
                            "median": float(col.median()), "level": level}
    return spread
