"""Posterior samples of a fit's adapters, and the prior-predictive adapters of tasks not in the fit.

>>> import torch
>>> from transformers import LlamaConfig, LlamaForCausalLM
>>> from bora.api import Bora
>>> from bora.core.config import AdapterConfig, BoraConfig, FitConfig, PriorConfig
>>> from bora.data.documents import TokenizedSplit
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

A :class:`Posterior` holds ``S`` adapter sets drawn from the guide (a mean-field fit), the Laplace
posterior (a Laplace fit) or ``S`` copies of the point estimate (a MAP fit: every "sample" is the MAP
adapter and every epistemic quantity is zero). Sample ``k`` is drawn with its own seed derived from
``(seed, k)``, so the same ``(seed, k)`` always gives the same adapters — across processes, :meth:`Posterior.evaluate`,
``bora sample``, ``bora export --estimate sample --sample-index k`` and ``bora report``
(:func:`bora.core.seeding.sample_seed`).

* :meth:`Posterior.doc_loglik` / :meth:`Posterior.bma_loglik`: per-document log-likelihood under
  every sample, and the Bayesian-model-average (log-mean-exp over samples) — the posterior
  predictive probability of the whole document, by plain Monte Carlo;
* :meth:`Posterior.evaluate` (:func:`bora.evaluation.evaluate.evaluate_posterior`): point estimate and BMA side by
  side. Two BMAs, labelled apart:
  ``bma_doc``, the document-level posterior predictive (the headline BMA NLL and perplexity; for
  Laplace and centred mean-field posteriors estimated by gradient-tilted importance sampling,
  :mod:`bora.evaluation.tilted`), and
  ``bma_token``, the mean of the samples' next-token probabilities (top-1 accuracy, ECE, Brier
  score, predictive entropy and mutual information). Per task, the perplexity's posterior spread
  over samples (``posterior_spread``) and its test-set interval from a document bootstrap
  (``test_interval``);
* :meth:`Posterior.token_uncertainty`: per-token predictive entropy and epistemic uncertainty;
* :meth:`Posterior.generate`: ``S`` continuations, continuation ``i`` generated with sample ``i``'s adapter
  (both in :mod:`bora.posterior.generate`);
* a task name that is not in the fit gets the **prior predictive** adapter of a new task,
  ``theta_new ~ Normal(Theta, tau^-1/2)`` with ``Theta``, ``tau`` from the same sample;
  :func:`bora.fit.newtask.fit_new_task` fits one new task's adapter on a few documents with the global level
  held fixed (warm starts from a saved fit: :mod:`bora.io.warmstart`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Optional, Protocol, Union

import torch

from ..core.config import PREDICTIVES, BoraConfig, ConfigError
from ..core.coupling import guide_of
from ..data.documents import TokenizedSplit
from ..evaluation.evaluate import doc_loglik, evaluate_posterior
from ..data.feed import Feed
from .generate import encode, generate, token_uncertainty
from ..lora.linearize import tangent
from ..evaluation.metrics import log_mean_exp
from ..core.seeding import sample_seed, seeded, task_code

if TYPE_CHECKING:
    from ..fit.tau import EmpiricalBayesTau
    from ..model.guides import AutoDelta, AutoNormal
    from ..model.hierarchy import BoraModel
    from .laplace import HierarchicalLaplace

__all__ = ["Posterior", "PosteriorSource", "TauSource", "tau_tensors"]

Adapter = dict  # key -> (A, B)


def _take_task(params: Mapping, t: int) -> Adapter:
    """Task ``t``'s 2-D adapter from per-task params (shared params have no task dim)."""
    return {k: (A[t] if A.dim() == 3 else A, B[t] if B.dim() == 3 else B) for k, (A, B) in params.items()}


def _stack(adapters) -> Adapter:
    return {k: (torch.stack([a[k][0] for a in adapters]), torch.stack([a[k][1] for a in adapters]))
            for k in adapters[0]}


class TauSource(Protocol):
    """What :func:`tau_tensors` reads of a fit."""

    model: BoraModel
    tau: Optional[EmpiricalBayesTau]


class PosteriorSource(TauSource, Protocol):
    """What a :class:`Posterior` (and :mod:`bora.posterior.generate`, :mod:`bora.evaluation.tilted` through
    ``Posterior.bora``) reads of a fit; a fitted :class:`bora.api.Bora` has it all."""

    config: BoraConfig
    tasks: tuple[str, ...]
    device: torch.device
    tokenizer: object
    guide: Union[AutoDelta, AutoNormal]
    laplace: Optional[HierarchicalLaplace]

    @property
    def pad_id(self) -> int: ...

    def point(self) -> dict[str, torch.Tensor]: ...

    def params(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]: ...

    def feed(self, split: TokenizedSplit, *, progress: bool = False, desc: str = "",
             any_tasks: bool = False) -> Feed: ...


class Posterior:
    """``num_samples`` posterior adapter sets of a fit (any :class:`PosteriorSource`; see the module docstring)."""

    def __init__(self, bora: PosteriorSource, num_samples: int = 8, *, seed: int = 0, predictive: str = "sample"):
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ConfigError(f"num_samples must be a positive integer, got {num_samples!r}")
        if predictive not in PREDICTIVES:
            raise ConfigError(f"predictive must be one of {', '.join(PREDICTIVES)}, got {predictive!r}")
        self.predictive = predictive
        self.bora = bora
        self.model = bora.model
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.laplace = getattr(bora, "laplace", None)
        self.is_point = guide_of(bora.config.fit).point and self.laplace is None
        self._values: dict[int, dict] = {}
        self._point: Optional[dict] = None

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
                with seeded(self.bora.device, sample_seed(self.seed, k)), torch.no_grad():
                    self._values[k] = self.model.complete({n: v.detach() for n, v in self.bora.guide().items()})
        return self._values[k]

    def params(self, k: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Adapters of every fitted task in sample ``k``: ``key -> (A [T, r, in], B [T, out, r])``."""
        return self.model.params_from_values(self.values(k))

    def predictive_args(self, k: int) -> tuple[dict, Optional[dict]]:
        """``(params, direction)`` that give sample ``k``'s predictions
        (:meth:`bora.model.likelihood.LMLikelihood.scored_logits`):
        ``(params(k), None)`` for the sampled predictive, ``(point, params(k) - point)`` for the linearised one."""
        if self.predictive == "sample" or self.is_point:
            return self.params(k), None
        point = self.point_params()
        return point, tangent(self.params(k), point)

    def point_params(self) -> dict:
        """The fit's point-estimate adapters (computed once): where the linearised predictive expands."""
        if self._point is None:
            self._point = self.bora.params()
        return self._point

    def tau(self, k: int) -> dict[str, Optional[torch.Tensor]]:
        """Per adapter key, the precision tying a task to the global adapter in sample ``k``
        (``None`` for 'uncoupled', ``inf`` for 'shared')."""
        return tau_tensors(self.bora, self.values(k))

    def global_adapters(self) -> Adapter:
        """The global adapter ``Theta`` of every sample: ``key -> (A [S, r, in], B [S, out, r])``."""
        if not self.model.has_global:
            raise ConfigError("tau_mode='uncoupled' has no global adapter")
        return _stack([self.model.global_from_values(self.values(k)) for k in range(self.num_samples)])

    def new_task_adapter(self, k: int, name: str = "new task") -> Adapter:
        """Sample ``k``'s prior-predictive adapter for a task not in the fit: ``Normal(Theta, tau^-1/2)``.

        'shared' gives the global adapter itself; 'uncoupled' a draw from the ``Normal(0, s)`` prior."""
        g = torch.Generator().manual_seed(sample_seed(self.seed, k, task_code(name)))
        return self._new_task(self.values(k), g)

    def _new_task(self, vals: dict, g: Optional[torch.Generator]) -> Adapter:
        """A new task's adapter given the site values ``vals``: drawn with ``g``, or its mean (``g=None``)."""
        coupling = self.model.coupling
        glob = self.model.global_from_values(vals)
        if not coupling.has_tasks:
            return {key: (A.clone(), B.clone()) for key, (A, B) in glob.items()}
        tau = tau_tensors(self.bora, vals)
        if self.model.tau_per_task:  # a new task's own tau: a draw from the learned Gamma(a, b) (Student-t adapter)
            tau = {k: _new_task_tau(self.bora.tau.hyper_dict(), g) for k in tau}
        shared_A = self.model.shared_A_from_values(vals) if self.model.shared_A else None
        out = {}
        for key, shapes in self.model.shapes.items():
            if not coupling.has_global:
                mean, sd = [torch.zeros(sh) for sh in shapes], float(self.model.prior.global_scale)
            else:
                mean, sd = [x.cpu() for x in glob[key]], float(tau[key]) ** -0.5
            pair = []
            for i, sh in enumerate(shapes):
                if shared_A is not None and i == 0:  # every task uses the global A
                    pair.append(shared_A[key].clone())
                else:
                    noise = 0.0 if g is None else sd * torch.randn(sh, generator=g)
                    pair.append((mean[i] + noise).to(self.bora.device))
            out[key] = tuple(pair)
        return out

    def task_adapter(self, k: int, task: str) -> Adapter:
        """Sample ``k``'s 2-D adapter of ``task`` (a fitted task, or a new task's prior predictive)."""
        if task in self.bora.tasks:
            return _take_task(self.params(k), self.bora.tasks.index(task))
        return self.new_task_adapter(k, task)

    def point_task_adapter(self, task: str) -> Adapter:
        """``task``'s adapter at the point estimate (for a task not in the fit: the mean of its prior
        predictive, the global adapter, :meth:`global_task_adapter`): where the linearised predictive expands."""
        if task in self.bora.tasks:
            return _take_task(self.point_params(), self.bora.tasks.index(task))
        return self._new_task(self.bora.point(), None)

    def global_task_adapter(self) -> Adapter:
        """The 2-D adapter a task not in the fit gets at the point estimate: the mean of its prior predictive,
        ``E[theta_new] = Theta`` (with the shared ``A`` of ``hierarchy='B'``); the cold-start point prediction
        (:mod:`bora.posterior.coldstart`). ConfigError for 'uncoupled', which has no global adapter."""
        if not self.model.has_global:
            raise ConfigError("tau_mode='uncoupled' has no global adapter to serve a task with")
        return self._new_task(self.bora.point(), None)

    def task_predictive_args(self, k: int, task: str) -> tuple[Adapter, Optional[Adapter]]:
        """``(adapter, direction)`` of sample ``k`` for ``task``, as :meth:`predictive_args` per task."""
        if self.predictive == "sample" or self.is_point:
            return self.task_adapter(k, task), None
        point = self.point_task_adapter(task)
        return point, tangent(self.task_adapter(k, task), point)

    def tasks_predictive_args(self, k: int, tasks) -> tuple[Adapter, Optional[Adapter]]:
        """:meth:`task_predictive_args` of every task of ``tasks`` (fitted or not) stacked in that order,
        ``key -> (A [len(tasks), r, in], B [len(tasks), out, r])``: the ``(params, direction)`` of sample ``k`` for a
        split over ``tasks`` (e.g. tasks not in the fit, :func:`bora.posterior.coldstart.evaluate_new_tasks`)."""
        pairs = [self.task_predictive_args(k, t) for t in tasks]
        direction = None if pairs[0][1] is None else _stack([d for _, d in pairs])
        return _stack([a for a, _ in pairs]), direction

    def task_adapters(self, task: str) -> Adapter:
        """``task``'s adapter in every sample, stacked: ``key -> (A [S, r, in], B [S, out, r])``."""
        return _stack([self.task_adapter(k, task) for k in range(self.num_samples)])

    @property
    def distinct_samples(self) -> int:
        """How many samples differ: 1 for a MAP fit (its samples are all the point estimate), else ``num_samples``;
        computations over samples run this many."""
        return 1 if self.is_point else self.num_samples

    # ------------------------------------------------------------------ likelihoods
    def as_feed(self, data) -> Feed:
        """``data`` (a :class:`~bora.data.documents.TokenizedSplit`) as the fit's Feed (on its device, with its
        frozen-prefix cache); a Feed as it is."""
        if isinstance(data, Feed):
            return data
        if not isinstance(data, TokenizedSplit):
            raise TypeError("data must be a TokenizedSplit or a Feed")
        return self.bora.feed(data)

    @torch.no_grad()
    def doc_loglik(self, data, batch_size: Optional[int] = None) -> torch.Tensor:
        """Per-document log-likelihood under every sample, ``[S, N]`` (on CPU)."""
        feed = self.as_feed(data)
        bs = batch_size or self.bora.config.fit.eval_batch_size
        self.model.adapters.train(False)
        rows = []
        for k in range(self.distinct_samples):
            params, direction = self.predictive_args(k)
            rows.append(doc_loglik(self.model, params, feed, bs, direction)[0])
        ll = torch.stack(rows)
        return ll.expand(self.num_samples, -1).clone() if self.is_point else ll

    def bma_loglik(self, data, batch_size: Optional[int] = None) -> torch.Tensor:
        """Per-document Bayesian-model-average log-likelihood ``log mean_s p(doc | adapter_s)``, ``[N]``: plain
        Monte Carlo, biased low when a document's log-likelihood varies by nats over the samples
        (:meth:`evaluate` uses the gradient-tilted estimate of :mod:`bora.evaluation.tilted` where it applies)."""
        return log_mean_exp(self.doc_loglik(data, batch_size).double(), 0).float()

    @torch.no_grad()
    def evaluate(self, data, *, batch_size: int = 8, n_bins: int = 15, level: float = 0.9,
                 bootstrap: int = 1000, progress: bool = False, doc_estimator: str = "auto") -> dict:
        """Point estimate and BMA predictive on ``data``; see :func:`bora.evaluation.evaluate.evaluate_posterior`."""
        return evaluate_posterior(self, data, batch_size=batch_size, n_bins=n_bins, level=level,
                                  bootstrap=bootstrap, progress=progress, doc_estimator=doc_estimator)

    # ------------------------------------------------------------------ free text (bora.generate)
    def encode(self, text: str) -> torch.Tensor:
        """Token ids of ``text`` as the fit's documents were tokenised (:func:`bora.posterior.generate.encode`)."""
        return encode(self, text)

    def token_uncertainty(self, task: str, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-token uncertainty about the next token (:func:`bora.posterior.generate.token_uncertainty`)."""
        return token_uncertainty(self, task, input_ids)

    def generate(self, task: str, prompt: Union[str, torch.Tensor], *, max_new_tokens: int = 32,
                 do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                 seed: Optional[int] = None) -> dict:
        """``S`` continuations of ``prompt``, one per sample's adapter (:func:`bora.posterior.generate.generate`)."""
        return generate(self, task, prompt, max_new_tokens=max_new_tokens, do_sample=do_sample,
                        temperature=temperature, top_p=top_p, seed=seed)


def tau_tensors(bora: TauSource, values: Mapping[str, torch.Tensor]) -> dict[str, Optional[torch.Tensor]]:
    """Per adapter key, the prior precision of task adapters around the global one as a 0-d tensor (``[T]``, one per
    task, for a per-task tau), given the site ``values`` (and the fit's empirical-Bayes tau, which ``values``
    override); ``None`` for every key when the coupling has no global adapter ('uncoupled').
    :meth:`bora.model.hierarchy.BoraModel.tau_by_key` gives the same precisions as floats."""
    if not bora.model.coupling.has_global:
        return {k: None for k in bora.model.shapes}
    vals = {**(bora.tau.values if bora.tau is not None else {}), **values}
    return {k: torch.tensor(t) for k, t in bora.model.tau_by_key(vals, per_task=True).items()}


def _new_task_tau(hyper: Mapping[str, float], g: Optional[torch.Generator]) -> torch.Tensor:
    """A task not in a per-task-tau fit: its tau drawn from the learned ``Gamma(a, b)`` with ``g`` (its mean
    ``a/b`` when ``g`` is None: the adapter's mean does not depend on it)."""
    a, b = float(hyper["a"]), float(hyper["b"])
    if g is None:
        return torch.tensor(a / b)
    import numpy as np

    rng = np.random.default_rng(int(torch.randint(0, 2 ** 62, (1,), generator=g)))
    return torch.tensor(float(rng.gamma(a, 1.0 / b)))
