"""Cold start: tasks with no training documents (not in the fit) or only one or two, served by the global adapter.

>>> import torch
>>> from transformers import LlamaConfig, LlamaForCausalLM
>>> from bora.api import Bora
>>> from bora.core.config import AdapterConfig, BoraConfig, PriorConfig
>>> from bora.data.documents import TokenizedSplit
>>> from bora.posterior.coldstart import evaluate_new_tasks
>>> lm = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
...                                   num_hidden_layers=2, num_attention_heads=4))
>>> config = BoraConfig(adapter=AdapterConfig(rank=2, targets=("q_proj",), layers=(-1,)),
...                     prior=PriorConfig(tau_mode="fixed", tau=100.0))
>>> bora = Bora(config, lm, None, tasks=("a", "b"), num_docs=10)   # (unfitted: the guide's initial state)
>>> new = TokenizedSplit([torch.arange(1, 9), torch.arange(3, 12)], torch.tensor([0, 1]), ("c", "d"))
>>> r = evaluate_new_tasks(bora, new, samples=4, seed=0)          # "c" and "d" are not in the fit
>>> sorted(r["global"]["per_task"]), r["samples"], sorted(r["posterior_spread"])
(['c', 'd'], 4, ['c', 'd'])
>>> direct = bora.evaluate(new, adapter=bora.global_adapter())    # the same point prediction, by hand
>>> direct["overall"]["ppl_task_mean"] == r["global"]["overall"]["ppl_task_mean"]
True

**Tasks not in the fit** (no training documents). A new task's adapter has the prior predictive
``theta_new ~ Normal(Theta, tau^-1/2)`` with ``Theta`` and ``tau`` from the fit's posterior, so its point
prediction is the **global adapter**: ``E[theta_new] = Theta`` (with the shared ``A`` of ``hierarchy='B'``;
:meth:`bora.posterior.samples.Posterior.global_task_adapter`). :func:`evaluate_new_tasks` scores a split of such
tasks under the base model and under ``Theta`` and, with ``samples=K``, under the **posterior predictive of a new
task**: each document's NLL is ``-log mean_k p(doc | theta_new_k)`` (plain log-mean-exp), with ``theta_new_k``
the draws ``bora sample`` makes for a task not in the fit (:meth:`bora.posterior.samples.Posterior.new_task_adapter`:
``Theta``, ``tau`` of posterior sample ``k``, every task its own draws, seeded by ``(seed, k, task name)``), and
per task the spread of its perplexity over the draws (``posterior_spread``). A MAP fit has one ``Theta``; its
new-task draws still differ by ``tau^-1/2`` noise. :func:`read_new_documents` reads a data file in the fit's
format and splits it into documents of fitted tasks and of new ones (``bora evaluate FIT --data FILE``).

**Tasks in the fit with 1 or 2 training documents** (:data:`TINY`). :func:`tiny_tasks` reports their test
perplexity ``exp(mean per-task NLL)`` under their own adapters beside the one under the global adapter alone, so
one sees whether serving them ``Theta`` would do better (``bora fit`` and ``bora evaluate`` print it and write it
to ``metrics.json`` / ``--json`` under ``tiny_tasks``).

Every function here reads only what :class:`~bora.posterior.samples.PosteriorSource` declares of a fit.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping, Optional

import torch

from ..core.config import CLASSIFICATION_CORPORA, ConfigError
from ..data.documents import TokenizedSplit, load_documents, tokenize_split
from ..data.feed import Feed
from ..evaluation.evaluate import doc_loglik, evaluate, perplexity_spread, summarize
from ..evaluation.metrics import log_mean_exp
from .samples import Posterior, PosteriorSource

__all__ = ["TINY", "read_new_documents", "evaluate_new_tasks", "tiny_tasks"]

#: training-document counts of a fitted task that make it a cold-start task, reported apart
TINY = (1, 2)

_EMBEDDED = ("shakespeare", "shakespeare-all", "fortunes", *CLASSIFICATION_CORPORA)


def read_new_documents(bora: PosteriorSource, source) -> tuple[Optional[TokenizedSplit], Optional[TokenizedSplit]]:
    """Every document of ``source`` (a data file in the fit's format: its text / prompt / completion / task
    columns and tokenisation; for a fit on an embedded multiple-choice corpus, a file of that corpus's rows,
    ``{"prompt", "choices", "label", "task"}``; or an embedded corpus name), no split: ``(fitted, new)``, the
    documents of tasks in the fit (a split over ``bora.tasks``) and of tasks not in it (a split over their sorted
    names); ``None`` where there are none. ConfigError for a missing file, columns the fit's data config does not
    find, no documents, or classification rows of new tasks."""
    src = str(source)
    if src not in _EMBEDDED and not Path(src).expanduser().exists():
        raise ConfigError(f"data file not found: {src}")
    cfg = bora.config.data.replace(source=src, tasks=None)
    if cfg.source not in _EMBEDDED and bora.config.data.source in CLASSIFICATION_CORPORA:
        # a fit on an embedded multiple-choice corpus reads a file in that corpus's row format
        cfg = cfg.replace(prompt_column="prompt", choices_column="choices", label_column="label", task_column="task")
    try:
        docs = load_documents(cfg)
    except ConfigError as e:
        if "column" not in str(e):
            raise
        cols = {k: getattr(cfg, f"{k}_column") for k in ("text", "prompt", "completion", "messages", "label",
                                                            "choices", "task")}
        want = ", ".join(f"{k} {v!r}" for k, v in cols.items() if v is not None and (k != "text" or cfg.mode == "text"))
        raise ConfigError(f"{e} (--data is read with the fit's columns: {want})") from None
    fitted = set(bora.tasks)
    known = [d for d in docs if d["task"] in fitted]
    other = [d for d in docs if d["task"] not in fitted]
    if other and any("choices" in d for d in other):
        first = sorted({d["task"] for d in other})[0]
        raise ConfigError(f"{src} has classification rows of tasks not in the fit ({first!r}"
                          ", ...); cold-start scoring of new tasks is for plain-text, prompt/completion and chat data")
    tok = bora.tokenizer
    if tok is None:
        raise ConfigError("this fit has no tokenizer to read a data file with")

    def split(rows, tasks):
        if not rows:
            return None
        s = tokenize_split(rows, tasks, tok, cfg.max_length, cfg.long_documents, cfg.choice_loss)
        return s if len(s) else None

    out = split(known, bora.tasks), split(other, tuple(sorted({d["task"] for d in other})))
    if out == (None, None):
        raise ConfigError(f"no document of {src} has a token to score (every one is shorter than 2 tokens)")
    return out


def _as_feed(bora: PosteriorSource, data, progress: bool) -> Feed:
    if isinstance(data, Feed):
        return data
    return bora.feed(data, any_tasks=True, progress=progress, desc="caching frozen layers (new tasks)")


@torch.no_grad()
def evaluate_new_tasks(bora: PosteriorSource, data, *, samples: Optional[int] = None, seed: int = 0,
                       predictive: str = "sample", batch_size: Optional[int] = None, level: float = 0.9,
                       progress: bool = False) -> dict:
    """Documents of tasks not in the fit (``data``: a :class:`~bora.data.documents.TokenizedSplit` over their
    names, or its Feed from ``bora.feed(split, any_tasks=True)``) under the base model, the global adapter and,
    with ``samples=K``, the posterior predictive of a new task (see the module docstring).

    Returns ``{"tasks", "documents", "base", "global", "samples", "seed", "predictive", "predictive_kind",
    "posterior_spread", "level"}``: ``base`` / ``global`` / ``predictive`` are
    :func:`~bora.evaluation.evaluate.summarize` outputs (``predictive`` and ``posterior_spread``: ``None`` without
    ``samples``); ``posterior_spread[task]``: ``{"lo", "median", "hi", "level"}`` of the task's perplexity over the
    ``K`` draws of its adapter."""
    if not bora.model.has_global:
        raise ConfigError("this fit (tau_mode='uncoupled') has no global adapter to serve tasks not in the fit with")
    if samples is not None and samples < 1:
        raise ConfigError("samples must be >= 1")
    feed = _as_feed(bora, data, progress)
    split = feed.split
    bs = batch_size or bora.config.fit.eval_batch_size
    post = Posterior(bora, samples or 1, seed=seed, predictive=predictive)
    base = evaluate(bora.model, None, feed, bs)
    out = {"tasks": list(split.tasks), "documents": len(split), "base": base,
           "global": evaluate(bora.model, post.global_task_adapter(), feed, bs), "samples": samples, "seed": seed,
           "predictive": None, "predictive_kind": predictive if samples else None, "posterior_spread": None,
           "level": level}
    if samples:
        rows, toks = [], None
        for k in range(samples):
            params, direction = post.tasks_predictive_args(k, split.tasks)
            ll, toks = doc_loglik(bora.model, params, feed, bs, direction)
            rows.append(ll)
        ll = torch.stack(rows).double()
        out["predictive"] = summarize(-log_mean_exp(ll, 0), toks, split.task_ids, split.tasks)
        out["posterior_spread"] = perplexity_spread(ll, toks, split.task_ids, split.tasks, level)
    return out


def _ppl(res: dict, names) -> Optional[float]:
    return math.exp(sum(res["per_task"][t]["nll"] for t in names) / len(names)) if names else None


@torch.no_grad()
def tiny_tasks(bora: PosteriorSource, data, fitted: dict, base: dict, train_sizes: Mapping[str, int], *,
               batch_size: Optional[int] = None) -> dict:
    """The fitted tasks with 1 or 2 training documents (:data:`TINY`; ``train_sizes``: task -> training documents)
    that have documents in ``data`` (a split over ``bora.tasks`` or its Feed), under their own adapters (``fitted``,
    :meth:`bora.api.Bora.evaluate` of ``data``), the base model (``base``) and the global adapter alone (computed
    here on those tasks' documents; ``None`` for 'uncoupled').

    Returns ``{"train_docs", "tasks", "base_ppl", "fit_ppl", "global_ppl", "global_better", "per_task"}``: the
    perplexities ``exp(mean per-task NLL)`` over those tasks (``None`` when there are none), ``global_better`` the
    number of them whose perplexity is lower under the global adapter than under their own, and per task
    ``{"train_docs", "docs", "tokens", "base_ppl", "fit_ppl", "global_ppl"}``."""
    names = [t for t in fitted["per_task"] if int(train_sizes.get(t, 0)) in TINY and t in base["per_task"]]
    out = {"train_docs": list(TINY), "tasks": names, "base_ppl": _ppl(base, names), "fit_ppl": _ppl(fitted, names),
           "global_ppl": None, "global_better": None, "per_task": {}}
    if not names:
        return out
    glob = None
    if bora.model.has_global:
        split = data.split if isinstance(data, Feed) else data
        ids = {bora.tasks.index(t) for t in names}
        rows = [i for i, t in enumerate(split.task_ids.tolist()) if t in ids]
        feed = bora.feed(split.subset(rows))
        adapter = Posterior(bora, 1).global_task_adapter()
        glob = evaluate(bora.model, adapter, feed, batch_size or bora.config.fit.eval_batch_size)
        out["global_ppl"] = _ppl(glob, names)
        out["global_better"] = sum(glob["per_task"][t]["nll"] < fitted["per_task"][t]["nll"] for t in names)
    for t in names:
        f = fitted["per_task"][t]
        out["per_task"][t] = {"train_docs": int(train_sizes[t]), "docs": f["docs"], "tokens": f["tokens"],
                              "base_ppl": base["per_task"][t]["ppl"], "fit_ppl": f["ppl"],
                              "global_ppl": glob["per_task"][t]["ppl"] if glob is not None else None}
    return out
