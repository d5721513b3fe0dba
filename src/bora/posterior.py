"""Posterior predictive use of a fit: adapter samples, BMA likelihoods, uncertainty, generation, new tasks.

>>> import torch
>>> from transformers import LlamaConfig, LlamaForCausalLM
>>> from bora.api import Bora
>>> from bora.config import AdapterConfig, BoraConfig, FitConfig, PriorConfig
>>> from bora.data import TokenizedSplit
>>> lm = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
...                                   num_hidden_layers=2, num_attention_heads=4))
>>> config = BoraConfig(adapter=AdapterConfig(rank=2, targets=("q_proj",), layers=(-1,)),
...                     prior=PriorConfig(tau_mode="fixed", tau=100.0),
...                     fit=FitConfig(guide="meanfield", init_scale=0.1))
>>> bora = Bora(config, lm, None, tasks=("a", "b"), num_docs=10)   # (unfitted: the guide's initial state)
>>> post = bora.posterior(num_samples=4, seed=0)                    # 4 adapter sets, reproducible
>>> docs = TokenizedSplit([torch.arange(1, 9), torch.arange(5, 12)], torch.tensor([0, 1]), ("a", "b"))
>>> post.doc_loglik(docs).shape, post.bma_loglik(docs).shape        # [S, N] and log-mean-exp over S
(torch.Size([4, 2]), torch.Size([2]))
>>> A, B = post.task_adapters("a")["model_layers_1_self_attn_q_proj"]   # one adapter per sample
>>> A.shape, B.shape
(torch.Size([4, 2, 32]), torch.Size([4, 32, 2]))
>>> new = post.task_adapters("unseen")    # a task not in the fit: drawn from the global level
>>> torch.equal(post.task_adapters("a")[next(iter(new))][0], A)     # same seed, same samples
True

A :class:`Posterior` holds ``S`` adapter sets drawn from the guide (a mean-field fit) or ``S``
copies of the point estimate (a MAP fit: every "sample" is the MAP adapter and every epistemic
quantity is zero). Sample ``k`` is drawn with its own seed derived from ``(seed, k)``, so the
same ``(seed, k)`` always gives the same adapters — across processes, :meth:`Posterior.evaluate`,
``bora sample`` and ``bora export --estimate sample --sample-index k``.

* :meth:`Posterior.doc_loglik` / :meth:`Posterior.bma_loglik`: per-document log-likelihood under
  every sample, and the Bayesian-model-average (log-mean-exp over samples) — the posterior
  predictive probability of the whole document;
* :meth:`Posterior.evaluate`: point estimate and BMA side by side. Two BMAs, labelled apart:
  ``bma_doc``, the document-level posterior predictive (the headline BMA NLL and perplexity), and
  ``bma_token``, the mean of the samples' next-token probabilities (top-1 accuracy, ECE, Brier
  score, predictive entropy and mutual information). Per task, the perplexity's posterior spread
  over samples (``posterior_spread``) and its test-set interval from a document bootstrap
  (``test_interval``);
* :meth:`Posterior.token_uncertainty`: per-token predictive entropy and epistemic uncertainty;
* :meth:`Posterior.generate`: ``S`` continuations, continuation ``i`` generated with sample ``i``'s adapter;
* a task name that is not in the fit gets the **prior predictive** adapter of a new task,
  ``theta_new ~ Normal(Theta, tau^-1/2)`` with ``Theta``, ``tau`` from the same sample;
  :func:`fit_new_task` fits one new task's adapter on a few documents with the global level
  held fixed (warm starts from a saved fit: :mod:`bora.warmstart`).
"""

from __future__ import annotations

import contextlib
import math
import zlib
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch.distributions import biject_to, transform_to

from .config import ConfigError
from .data import TokenizedSplit, batches, tokenize_split
from .evaluate import doc_loglik, summarize
from .feed import Feed
from .metrics import SampleAverager, TokenMetrics, log_mean_exp

__all__ = ["Posterior", "evaluate_posterior", "token_log_probs", "fit_new_task", "sample_seed"]

Adapter = dict  # key -> (A, B)


def sample_seed(seed: int, *parts: int) -> int:
    """A well-mixed 63-bit seed for sample ``parts`` of a run seeded with ``seed``."""
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *[int(p) & 0xFFFFFFFF for p in parts]])
               .generate_state(1, np.uint64)[0] >> np.uint64(1))


def _task_code(name: str) -> int:
    return zlib.crc32(name.encode("utf-8"))


@contextlib.contextmanager
def _seeded(device: torch.device, seed: int):
    """Run with torch's global RNG seeded, restoring it afterwards (Pyro samples from it)."""
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def token_log_probs(model, batch: Mapping[str, torch.Tensor], params) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Next-token log-probabilities on the scored positions of ``batch``: ``(log_probs [n, V], labels [n], rows [n])``.

    The same computation as :meth:`bora.model.BoraModel.loglik` (frozen-prefix cache, head on scored
    positions only) but keeping the whole distribution; ``rows`` is each token's row in the batch.
    """
    logits, labels, rows = model.scored_logits(batch, params)
    return F.log_softmax(logits, -1), labels, rows


def _take_task(params: Mapping, t: int) -> Adapter:
    """Task ``t``'s 2-D adapter from per-task params (shared params have no task dim)."""
    return {k: (A[t] if A.dim() == 3 else A, B[t] if B.dim() == 3 else B) for k, (A, B) in params.items()}


def _stack(adapters: Sequence[Adapter]) -> Adapter:
    return {k: (torch.stack([a[k][0] for a in adapters]), torch.stack([a[k][1] for a in adapters]))
            for k in adapters[0]}


class Posterior:
    """``num_samples`` posterior adapter sets of a :class:`~bora.api.Bora` (see the module docstring)."""

    def __init__(self, bora, num_samples: int = 8, *, seed: int = 0):
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ConfigError(f"num_samples must be a positive integer, got {num_samples!r}")
        self.bora = bora
        self.model = bora.model
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.laplace = getattr(bora, "laplace", None)
        self.is_point = bora.config.fit.guide != "meanfield" and self.laplace is None
        self._values: dict[int, dict] = {}

    # ------------------------------------------------------------------ samples
    def values(self, k: int) -> dict[str, torch.Tensor]:
        """Site values of sample ``k`` (a guide draw; the point estimate for a MAP fit)."""
        if k not in self._values:
            if self.is_point:
                self._values[k] = self.bora.point()
            elif self.laplace is not None:
                g = torch.Generator().manual_seed(sample_seed(self.seed, k))
                self._values[k] = self.laplace.sample(self.model, self.bora.point(), g)
            else:
                with _seeded(self.bora.device, sample_seed(self.seed, k)), torch.no_grad():
                    self._values[k] = self.model.complete({n: v.detach() for n, v in self.bora.guide().items()})
        return self._values[k]

    def params(self, k: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Adapters of every fitted task in sample ``k``: ``key -> (A [T, r, in], B [T, out, r])``."""
        return self.model.params_from_values(self.values(k))

    def tau(self, k: int) -> dict[str, Optional[torch.Tensor]]:
        """Per adapter key, the precision tying a task to the global adapter in sample ``k``
        (``None`` for 'independent', ``inf`` for 'shared')."""
        return _tau_by_key(self.bora, self.values(k))

    def global_adapters(self) -> Adapter:
        """The global adapter ``Theta`` of every sample: ``key -> (A [S, r, in], B [S, out, r])``."""
        if not self.model.has_global:
            raise ConfigError("tau_mode='independent' has no global adapter")
        return _stack([self.model.global_from_values(self.values(k)) for k in range(self.num_samples)])

    def new_task_adapter(self, k: int, name: str = "new task") -> Adapter:
        """Sample ``k``'s prior-predictive adapter for a task not in the fit: ``Normal(Theta, tau^-1/2)``.

        'shared' gives the global adapter itself; 'independent' a draw from the ``Normal(0, s)`` prior."""
        vals = self.values(k)
        mode = self.model.prior.tau_mode
        glob = self.model.global_from_values(vals)
        if mode == "shared":
            return {key: (A.clone(), B.clone()) for key, (A, B) in glob.items()}
        tau = _tau_by_key(self.bora, vals)
        g = torch.Generator().manual_seed(sample_seed(self.seed, k, _task_code(name)))
        shared_A = self.model.shared_A_from_values(vals) if self.model.shared_A else None
        out = {}
        for key, shapes in self.model.shapes.items():
            if mode == "independent":
                mean, sd = [torch.zeros(sh) for sh in shapes], float(self.model.prior.global_scale)
            else:
                mean, sd = [x.cpu() for x in glob[key]], float(tau[key]) ** -0.5
            pair = []
            for i, sh in enumerate(shapes):
                if shared_A is not None and i == 0:  # every task uses the global A
                    pair.append(shared_A[key].clone())
                else:
                    pair.append((mean[i] + sd * torch.randn(sh, generator=g)).to(self.bora.device))
            out[key] = tuple(pair)
        return out

    def task_adapter(self, k: int, task: str) -> Adapter:
        """Sample ``k``'s 2-D adapter of ``task`` (a fitted task, or a new task's prior predictive)."""
        if task in self.bora.tasks:
            return _take_task(self.params(k), self.bora.tasks.index(task))
        return self.new_task_adapter(k, task)

    def task_adapters(self, task: str) -> Adapter:
        """``task``'s adapter in every sample, stacked: ``key -> (A [S, r, in], B [S, out, r])``."""
        return _stack([self.task_adapter(k, task) for k in range(self.num_samples)])

    @property
    def _compute_samples(self) -> int:
        return 1 if self.is_point else self.num_samples  # a MAP fit's samples are all identical

    # ------------------------------------------------------------------ likelihoods
    def _feed(self, data) -> Feed:
        if isinstance(data, Feed):
            return data
        if not isinstance(data, TokenizedSplit):
            raise TypeError("data must be a TokenizedSplit or a Feed")
        return self.bora.feed(data)

    @torch.no_grad()
    def doc_loglik(self, data, batch_size: Optional[int] = None) -> torch.Tensor:
        """Per-document log-likelihood under every sample, ``[S, N]`` (on CPU)."""
        feed = self._feed(data)
        bs = batch_size or self.bora.config.fit.eval_batch_size
        self.model.adapters.train(False)
        rows = [doc_loglik(self.model, self.params(k), feed, bs)[0] for k in range(self._compute_samples)]
        ll = torch.stack(rows)
        return ll.expand(self.num_samples, -1).clone() if self.is_point else ll

    def bma_loglik(self, data, batch_size: Optional[int] = None) -> torch.Tensor:
        """Per-document Bayesian-model-average log-likelihood ``log mean_s p(doc | adapter_s)``, ``[N]``."""
        return log_mean_exp(self.doc_loglik(data, batch_size).double(), 0).float()

    @torch.no_grad()
    def evaluate(self, data, *, batch_size: int = 8, n_bins: int = 15, level: float = 0.9,
                 bootstrap: int = 1000, progress: bool = False) -> dict:
        """Point estimate and BMA predictive on ``data``; see :func:`evaluate_posterior`."""
        return evaluate_posterior(self, data, batch_size=batch_size, n_bins=n_bins, level=level,
                                  bootstrap=bootstrap, progress=progress)

    # ------------------------------------------------------------------ free text
    def encode(self, text: str) -> torch.Tensor:
        """Token ids of ``text`` as the fit's documents were tokenised (special tokens added)."""
        tok = self.bora.tokenizer
        if tok is None:
            raise ConfigError("this fit has no tokenizer")
        ids = list(tok(text, add_special_tokens=True)["input_ids"])
        if not ids:
            bos = getattr(tok, "bos_token_id", None)
            if bos is None:
                raise ConfigError("the prompt is empty and the tokenizer has no BOS token to start from")
            ids = [bos]
        return torch.tensor(ids, dtype=torch.long)

    @torch.no_grad()
    def token_uncertainty(self, task: str, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per position of ``input_ids`` (``[B, L]``, no padding) the uncertainty about the next token.

        Returns ``[B, L-1]`` float64 tensors: ``entropy`` (of the token-level BMA prediction, nats),
        ``expected_entropy`` (mean of each sample's entropy), ``mutual_information`` (``mean_s
        KL(p_s || p_bar)``, their difference: the epistemic part) and ``nll`` (``-log`` token-level
        BMA probability of the token that follows)."""
        ids = input_ids.to(self.bora.device)
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        S = self._compute_samples
        avg = SampleAverager()
        self.model.adapters.train(False)
        for k in range(S):
            with self.model.adapters.use(self.task_adapter(k, task), None), self.model._autocast():
                logits = self.model.lm(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
            avg.add(F.log_softmax(logits[:, :-1].float(), -1))
        p_bar = avg.probs()
        nll = -p_bar.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1).clamp_min(1e-300).log()
        return {"entropy": avg.entropy().cpu(), "expected_entropy": avg.expected_entropy().cpu(),
                "mutual_information": avg.mutual_information().cpu(), "nll": nll.cpu()}

    @torch.no_grad()
    def generate(self, task: str, prompt: Union[str, torch.Tensor], *, max_new_tokens: int = 32,
                 do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                 seed: Optional[int] = None) -> dict:
        """``S`` continuations of ``prompt``; continuation ``i`` is generated with sample ``i``'s adapter.

        Greedy by default (``do_sample=True`` samples with ``temperature`` / ``top_p``, seeded). The
        whole model runs (no frozen-prefix cache). Returns ``{"prompt_ids", "ids" (list of new-token
        lists), "texts"}``."""
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        if do_sample and not (temperature > 0 and 0 < top_p <= 1):
            raise ConfigError("temperature must be > 0 and top_p in (0, 1]")
        prompt_ids = self.encode(prompt) if isinstance(prompt, str) else torch.as_tensor(prompt).reshape(-1)
        S = self.num_samples
        dev = self.bora.device
        ids = prompt_ids.to(dev).unsqueeze(0).expand(S, -1).contiguous()
        kw = {"max_new_tokens": max_new_tokens, "do_sample": do_sample, "pad_token_id": self.bora.pad_id}
        if do_sample:
            kw.update(temperature=float(temperature), top_p=float(top_p), top_k=0)
        else:
            kw.update(temperature=None, top_p=None, top_k=None)
        stacked = self.task_adapters(task)
        self.model.adapters.train(False)
        with _seeded(dev, sample_seed(self.seed if seed is None else seed, 0x6E6)), \
                self.model.adapters.use(stacked, torch.arange(S, device=dev)), self.model._autocast():
            out = self.model.lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
        new = out[:, ids.shape[1]:].cpu()
        eos = _eos_ids(self.model.lm, self.bora.tokenizer)
        seqs = []
        for row in new.tolist():
            cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
            seqs.append(row[:cut])
        decode = getattr(self.bora.tokenizer, "decode", None)
        texts = [decode(s, skip_special_tokens=True) if decode is not None else " ".join(map(str, s)) for s in seqs]
        return {"prompt_ids": prompt_ids.tolist(), "ids": seqs, "texts": texts}


def _eos_ids(lm, tokenizer) -> set:
    out = set()
    for src in (getattr(lm, "generation_config", None), getattr(lm, "config", None), tokenizer):
        e = getattr(src, "eos_token_id", None) if src is not None else None
        if isinstance(e, int):
            out.add(e)
        elif isinstance(e, (list, tuple)):
            out.update(int(x) for x in e)
    return out


def _tau_by_key(bora, values: Mapping[str, torch.Tensor]) -> dict[str, Optional[torch.Tensor]]:
    """Per adapter key: the prior precision of task adapters around the global one (``None``: independent)."""
    if bora.model.prior.tau_mode == "independent":
        return {k: None for k in bora.model.shapes}
    vals = {**(bora.tau.values if bora.tau is not None else {}), **values}
    return {k: torch.tensor(t) for k, t in bora.model.tau_by_key(vals).items()}


# ---------------------------------------------------------------------- evaluation
def evaluate_posterior(post: Posterior, data, *, batch_size: int = 8, n_bins: int = 15, level: float = 0.9,
                       bootstrap: int = 1000, progress: bool = False) -> dict:
    """Point estimate vs Bayesian model average on ``data``, with posterior and test-set intervals.

    Returns a dict with

    * ``point``: the point estimate (:func:`bora.evaluate.summarize`'s ``per_task`` / ``overall``
      NLL and perplexity, plus ``tokens``: :class:`bora.metrics.TokenMetrics` of its next-token
      predictions: NLL, top-1 accuracy, ECE, Brier, entropy; MI is 0);
    * ``bma_doc``: the **document-level posterior predictive**, the headline BMA: each document's
      NLL is ``-log mean_s p(doc | adapter_s)`` (``per_task`` / ``overall`` as for ``point``);
    * ``bma_token``: the **token-level BMA**, ``p_bar = mean_s p_s`` of the samples' next-token
      distributions: ``per_task`` / ``overall`` NLL and ``tokens`` (accuracy, ECE, Brier, predictive
      entropy, mean sample entropy and mutual information ``mean_s KL(p_s || p_bar)`` per token,
      in float64). ECE / Brier / accuracy need one categorical prediction per token, so they use it;
    * ``posterior_spread[task]``: ``{"lo", "median", "hi", "level"}``, quantiles over samples of the
      task's perplexity under each sample: the posterior spread of a plug-in quantity on these
      documents (not test-set uncertainty);
    * ``test_interval``: ``{"point": ..., "bma_doc": ...}``, each :func:`bora.evaluate.bootstrap_ppl`
      (``bootstrap`` resamples of documents within each task, ``level`` percentile intervals of
      per-task perplexity and ``ppl_task_mean``; seeded with the posterior's seed): how much the
      numbers would move on another test set of the same size;
    * ``documents``: per-document lists ``task_ids``, ``tokens``, ``nll_point``, ``nll_bma_doc``,
      ``nll_bma_token`` (NLL sums) and ``mutual_information`` (mean MI per token of the document),
      e.g. for :func:`bora.evaluate.paired_bootstrap` or an MI-based out-of-distribution score;
    * ``samples``, ``seed``, ``point_fit`` (every sample is the point estimate).
    """
    from tqdm.auto import tqdm

    from .evaluate import bootstrap_ppl

    bora, model = post.bora, post.model
    feed = post._feed(data)
    split = feed.split
    n = len(split)
    S = post._compute_samples
    model.adapters.train(False)
    point_params = bora.params()
    sample_params = [] if post.is_point else [post.params(k) for k in range(S)]
    nll_point = torch.zeros(n, dtype=torch.float64)
    nll_tok_bma = torch.zeros(n, dtype=torch.float64)
    mi_doc = torch.zeros(n, dtype=torch.float64)
    ll_s = torch.zeros(S, n, dtype=torch.float64)
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
            lp = logp if post.is_point else token_log_probs(model, b, sample_params[k])[0]
            ll_s[k].index_add_(0, doc, lp.gather(-1, labels.unsqueeze(-1)).squeeze(-1).double().cpu())
            avg.add(lp)
        p_bar = avg.probs()
        mi = avg.mutual_information()
        nll_tok_bma.index_add_(0, doc, -p_bar.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
                               .clamp_min(1e-300).log().cpu())
        mi_doc.index_add_(0, doc, mi.cpu())
        m_bma.add(p_bar, labels, expected_entropy=avg.expected_entropy(), mi=mi)
        del avg, p_bar
    if post.is_point and post.num_samples > 1:
        ll_s = ll_s.expand(post.num_samples, -1)
    tids, tasks = split.task_ids, split.tasks
    point = summarize(nll_point, toks, tids, tasks)
    point["tokens"] = m_point.result()
    bma_token = summarize(nll_tok_bma, toks, tids, tasks)
    bma_token["tokens"] = m_bma.result()
    nll_doc = -log_mean_exp(ll_s, 0)
    bma_doc = summarize(nll_doc, toks, tids, tasks)
    # per-task perplexity of every sample -> posterior spread of the plug-in perplexity
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
    boot = dict(tasks=tasks, resamples=bootstrap, level=level, seed=post.seed)
    test_interval = {"point": bootstrap_ppl(nll_point, toks, tids, **boot),
                     "bma_doc": bootstrap_ppl(nll_doc, toks, tids, **boot)}
    documents = {"task_ids": tids.tolist(), "tokens": toks.tolist(), "nll_point": nll_point.tolist(),
                 "nll_bma_doc": nll_doc.tolist(), "nll_bma_token": nll_tok_bma.tolist(),
                 "mutual_information": (mi_doc / toks.clamp_min(1)).tolist()}
    return {"samples": post.num_samples, "seed": post.seed, "point_fit": post.is_point, "point": point,
            "bma_doc": bma_doc, "bma_token": bma_token, "posterior_spread": spread, "test_interval": test_interval,
            "documents": documents}


# ---------------------------------------------------------------------- new tasks
def _new_task_split(bora, docs, name: str) -> TokenizedSplit:
    if isinstance(docs, TokenizedSplit):
        return TokenizedSplit(list(docs.input_ids), torch.zeros(len(docs), dtype=torch.long), (name,))
    if isinstance(docs, str):
        docs = [docs]
    docs = list(docs)
    if not docs or not all(isinstance(d, str) for d in docs):
        raise ConfigError("docs must be a TokenizedSplit or a non-empty list of texts")
    if bora.tokenizer is None:
        raise ConfigError("this fit has no tokenizer to tokenise the new task's texts")
    cfg = bora.config.data
    split = tokenize_split([{"text": d, "task": name} for d in docs], (name,), bora.tokenizer, cfg.max_length,
                           cfg.long_documents)
    if len(split) == 0:
        raise ConfigError("none of the new task's texts has 2 or more tokens")
    return split


def fit_new_task(bora, docs, *, steps: int = 100, lr: float = 0.05, batch_size: Optional[int] = None,
                 seed: int = 0, name: str = "new task") -> Adapter:
    """Fit the adapter of one task that is not in the fit, with the global level held fixed.

    Maximises ``sum_d log p(d | theta_new) + log Normal(theta_new | Theta, tau^-1/2)`` (MAP) over
    ``theta_new``, where ``Theta`` and ``tau`` are the fit's point estimates (posterior medians for
    a mean-field fit). ``docs``: a :class:`~bora.data.TokenizedSplit` (all rows are treated as the
    new task) or a list of texts (tokenised like the fit's data). The optimisation is non-centred:
    Adam (learning rate ``lr``, minibatches of ``batch_size`` documents, the likelihood scaled to the
    whole set) moves ``z = (theta_new - Theta) tau^1/2``, which starts at 0 (the global adapter) and
    has a standard-normal prior, so ``lr`` is in units of the prior's standard deviation whatever
    tau is. Returns ``key -> (A [r, in], B [out, r])``, usable with ``bora.adapters.use(adapter)``
    and :func:`bora.export.write_peft_adapter`.

    'shared' returns the global adapter (a task adapter equals it); 'independent' uses the
    ``Normal(0, s)`` prior and starts from the fit's initial point."""
    if not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps must be a positive integer, got {steps!r}")
    if not lr > 0:
        raise ConfigError(f"lr must be > 0, got {lr!r}")
    model = bora.model
    split = _new_task_split(bora, docs, name)
    point = bora.point()
    mode = model.prior.tau_mode
    glob = model.global_from_values(point)
    if mode == "shared":
        return {k: (A.detach().clone(), B.detach().clone()) for k, (A, B) in glob.items()}
    tau = _tau_by_key(bora, point)
    dev = bora.device
    shared_A = model.shared_A_from_values(point) if model.shared_A else None
    mean, sd, z = {}, {}, {}
    for k, (sa, sb) in model.shapes.items():
        if mode == "independent":
            mean[k] = (torch.zeros(sa, device=dev), torch.zeros(sb, device=dev))
            sd[k] = float(model.prior.global_scale)
            z0 = (model.init_A[k] / sd[k], torch.zeros(sb, device=dev))
        else:
            mean[k] = (glob[k][0].detach(), glob[k][1].detach())
            sd[k] = float(tau[k]) ** -0.5
            z0 = (torch.zeros(sa, device=dev), torch.zeros(sb, device=dev))
        if model.shared_A:  # A is global: held fixed at the fit's A (z_A unused)
            mean[k] = (shared_A[k].detach(), mean[k][1])
            z0 = (torch.zeros(sa, device=dev), z0[1])
        # plain leaf tensors (the adapter layers store what they are given; an nn.Parameter would register)
        z[k] = (z0[0].clone().requires_grad_(not model.shared_A), z0[1].clone().requires_grad_(True))
    params = [p for ab in z.values() for p in ab if p.requires_grad]

    def theta() -> Adapter:
        return {k: (mean[k][0] if model.shared_A else mean[k][0] + sd[k] * zA, mean[k][1] + sd[k] * zB)
                for k, (zA, zB) in z.items()}

    feed = Feed(split, pad_id=bora.pad_id, device=dev, prefix=bora.prefix,
                cache_batch_size=bora.config.fit.eval_batch_size)
    feed.build_cache_()
    bs = batch_size or bora.config.fit.batch_size
    N = len(split)
    n_tok = max(1, split.num_tokens())
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    clip = bora.config.fit.clip_norm

    def stream():
        while True:
            yield from batches(split, bs, shuffle=True, generator=gen)

    it = stream()
    model.adapters.train(True)
    try:
        with _seeded(dev, sample_seed(seed, 0x7E3)):
            for _ in range(steps):
                idx = next(it)
                ll = model.loglik(feed.batch(idx), theta()).sum() * (N / len(idx))
                lp = -0.5 * sum(zA.square().sum() + zB.square().sum() for zA, zB in z.values())
                loss = -(ll + lp) / n_tok
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, clip)
                opt.step()
    finally:
        model.adapters.train(False)
    with torch.no_grad():
        return {k: (A.detach().clone(), B.detach().clone()) for k, (A, B) in theta().items()}
