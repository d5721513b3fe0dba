"""High-level API: build a hierarchical LoRA model around a base LM, fit it, evaluate it.

>>> from bora import Bora, BoraConfig, FitConfig            # doctest: +SKIP
>>> bora, data = Bora.from_config(BoraConfig(fit=FitConfig(epochs=2)))     # doctest: +SKIP
>>> result = bora.fit(data["train"], data["val"])           # doctest: +SKIP
>>> bora.evaluate(data["test"])["overall"]["ppl_task_mean"] # doctest: +SKIP
>>> bora.save("runs/shakespeare")                           # doctest: +SKIP
>>> same = Bora.load("runs/shakespeare")                    # doctest: +SKIP

:class:`Bora` ties the pieces together (base model + injected adapters + :class:`~bora.model.hierarchy.BoraModel`
+ guide + tau estimator) and knows how to save itself as a folder of JSON and safetensors.
Feeds (:class:`~bora.data.feed.Feed`) carry the frozen-prefix cache; make them with :meth:`Bora.feed`
and reuse them across fits that share the base model and the first adapted layer.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from .core.config import BoraConfig, ConfigError
from .core.seeding import stream_seed
from .core.coupling import guide_of
from .data.documents import TokenizedSplit, load_documents, split_documents
from .core.device import autocast_dtype, resolve_device
from .model.distributions import LATENT_SUFFIX
from .evaluation.evaluate import evaluate
from .fit.fisher import task_fisher
from .io.fitfolder import read_fit_files, restore_fit_, save_fit
from .io.warmstart import warm_start_from_
from .data.feed import Feed
from .model.guides import make_guide, point_values, set_scales_
from .fit.callbacks import Callback
from .fit.loop import FitResult, fit
from .fit.refine import refine_tau
from .fit.newtask import fit_new_task
from .lora.inject import AdapterSet, inject_adapters_
from .posterior.laplace import HierarchicalLaplace, laplace_from_point, task_layout
from .model.hierarchy import BoraModel
from .lora.prefix import FrozenPrefix
from .fit.tau import EmpiricalBayesTau
from .diagnostics.view import load_data

__all__ = ["Bora", "resolve_device", "load_data"]


def _laplace_at(model: BoraModel, point: dict, feed: Feed, cfg, *, docs: Optional[int] = None,
                labels: Optional[str] = None, structure: str = "diag", seed: Optional[int] = None,
                progress: bool = False) -> HierarchicalLaplace:
    """The Laplace posterior of ``model`` around ``point``, with curvature from ``docs`` training documents per
    task of ``feed`` (defaults from the fit config ``cfg``)."""
    gen = torch.Generator().manual_seed(stream_seed(cfg.seed, "laplace") if seed is None else seed)
    keep = task_layout(model) if structure == "lowrank" and model.has_tasks else None
    tf = task_fisher(model, model.params_from_values(point), feed, max_per_task=docs or cfg.laplace_docs,
                     generator=gen, labels=labels or cfg.laplace_labels, progress=progress, gradients=keep)
    return laplace_from_point(model, tf, model.tau_by_key(point, per_task=True))


class Bora:
    """A base LM with hierarchical LoRA adapters, its Pyro model, guide and (optionally) tau estimator."""

    def __init__(self, config: BoraConfig, lm, tokenizer, tasks: Sequence[str], num_docs: int, *,
                 device: str | torch.device | None = None, task_sizes: Optional[Sequence[int]] = None):
        self.config = config
        self.device = resolve_device(device)
        # a bitsandbytes-quantised model already sits on its GPU and cannot be moved
        self.lm = lm if getattr(lm, "is_quantized", False) else lm.to(self.device)
        self.tokenizer = tokenizer
        self.tasks = tuple(tasks)
        self.num_docs = int(num_docs)
        self.task_sizes = list(task_sizes) if task_sizes is not None else None
        self.adapters: AdapterSet = inject_adapters_(self.lm, config.adapter)
        first = self.adapters.first_layer
        autocast = autocast_dtype(config.fit.precision, self.device)
        self.prefix = FrozenPrefix(self.lm, first, autocast_dtype=autocast) if (config.fit.cache_prefix and first) \
            else None
        self.model = BoraModel(self.lm, self.adapters, self.tasks, self.num_docs, config.prior,
                               prefix=self.prefix, init_seed=config.fit.seed, autocast_dtype=autocast,
                               guide_kind=config.fit.guide)
        # learned tau: empirical Bayes (Laplace evidence) for point fits, variational EM for mean-field fits in
        # the centred form; a non-centred or offset mean-field fit keeps tau as a variational site
        eb = guide_of(config.fit).point or self.model.parameterisation == "centred"
        self.tau = EmpiricalBayesTau(self.model) if self.model.coupling.learned and eb else None
        target = self.tau.model if self.tau is not None else self.model
        self.guide = make_guide(self.model, config.fit.guide, init_scale=config.fit.init_scale, target=target)
        self.laplace: Optional[HierarchicalLaplace] = None
        self.result: Optional[FitResult] = None
        self.map_phase: Optional[FitResult] = None  # the MAP fit a mean-field fit started from (meanfield_start)
        self.metrics: dict = {}
        self._setup_guide()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, config: BoraConfig, *, device=None, lm=None, tokenizer=None,
                    progress: bool = False) -> tuple["Bora", dict[str, TokenizedSplit]]:
        """Load the base model (unless given) and the data, and build an unfitted :class:`Bora`."""
        splits = split_documents(load_documents(config.data), config.data)  # data errors before the model loads
        if lm is None or tokenizer is None:
            from .lora.base import load_base_model

            lm, tokenizer = load_base_model(config.model, device=resolve_device(device), quantize=config.quantize)
        data = load_data(config, tokenizer, splits=splits)
        train = data["train"]
        bora = cls(config, lm, tokenizer, train.tasks, len(train), device=device,
                   task_sizes=train.task_sizes().tolist())
        return bora, data

    def _setup_guide(self) -> None:
        """Create the guide's parameters with one tiny model run (the init point)."""
        pad = self.pad_id
        dummy = {"input_ids": torch.full((1, 2), pad, dtype=torch.long, device=self.device),
                 "attention_mask": torch.ones(1, 2, dtype=torch.long, device=self.device),
                 "task_ids": torch.zeros(1, dtype=torch.long, device=self.device),
                 "index": torch.zeros(1, dtype=torch.long, device=self.device)}
        with torch.no_grad():
            self.guide(dummy)
        # non-centred / offset task sites start at their prior sd (1 / tau^-1/2): the posterior of an
        # uninformed coordinate (only mean-field guides have scales)
        p = self.model.parameterisation
        if p in LATENT_SUFFIX:
            sd = 1.0 if p == "noncentred" else float(self.config.prior.tau) ** -0.5
            set_scales_(self.guide, {site + LATENT_SUFFIX[p]: sd for k in self.model.shapes
                                     for _, site, _ in self.model.task_sites(k)})

    @property
    def pad_id(self) -> int:
        pid = getattr(self.tokenizer, "pad_token_id", None) if self.tokenizer is not None else None
        return int(pid) if pid is not None else 0

    def feed(self, split: TokenizedSplit, *, progress: bool = False, desc: str = "caching frozen layers",
             any_tasks: bool = False) -> Feed:
        """``split`` on this model's device with its frozen-prefix cache; reuse it across fits and evaluations.
        Its tasks must be the model's, unless ``any_tasks`` (a split of other tasks, e.g. tasks not in the fit, to
        score with adapters given per its own tasks or one adapter for every document)."""
        if split.tasks != self.tasks and not any_tasks:
            raise ConfigError("split's tasks differ from the model's tasks")
        return Feed(split, pad_id=self.pad_id, device=self.device, prefix=self.prefix,
                    cache_batch_size=self.config.fit.eval_batch_size, progress=progress, desc=desc)

    def _as_feed(self, x) -> Feed:
        return x if isinstance(x, Feed) else self.feed(x)

    # ------------------------------------------------------------------ fitting
    def fit(self, train, val=None, *, progress: bool = True, checkpoint=None, resume=None,
            callbacks: Sequence[Callback] = ()) -> FitResult:
        """Fit the guide (see :func:`bora.fit.loop.fit` for ``checkpoint``, ``resume`` and ``callbacks``)."""
        train_feed = self._as_feed(train)
        if len(train_feed) != self.num_docs:
            raise ConfigError(f"model was built for {self.num_docs} training documents, got {len(train_feed)}")
        val_feed = self._as_feed(val) if val is not None else None
        cfg = self.config.fit
        if self._starts_at_map():  # the variational fit starts at a MAP fit's estimates, its means at lr / 10
            if resume is None:
                self.map_phase = self._map_phase(train_feed, val_feed, progress)
            cfg = cfg.replace(lr=cfg.lr / 10)
        self.result = fit(self.model, self.guide, train_feed, val_feed, cfg, tau=self.tau,
                          progress=progress, checkpoint=checkpoint, resume=resume, callbacks=callbacks)
        if cfg.tau_rounds and self.tau is not None:  # alternate inner fits at fixed tau with its update
            self.result = refine_tau(self.model, self.guide, train_feed, val_feed, cfg, self.tau, self.result,
                                     progress=progress)
        if guide_of(self.config.fit).laplace:
            t0 = time.perf_counter()
            self.fit_laplace_(train_feed, progress=progress)
            self.result.seconds_posterior = time.perf_counter() - t0
        return self.result

    def _starts_at_map(self) -> bool:
        fit_cfg = self.config.fit
        return fit_cfg.guide == "meanfield" and fit_cfg.meanfield_start == "map"

    def _map_phase(self, train: Feed, val: Optional[Feed], progress: bool) -> FitResult:
        """The MAP fit a mean-field fit starts from (``meanfield_start='map'``): the same model with offset task
        sites and the evidence tau (as ``--guide map`` fits it), on the same adapters, then its Laplace posterior;
        the mean-field guide and tau are set at its estimates and scales
        (:func:`bora.io.warmstart.warm_start_from_`)."""
        config = self.config.replace(fit=self.config.fit.replace(guide="laplace"))
        model = BoraModel(self.lm, self.adapters, self.tasks, self.num_docs, config.prior, prefix=self.prefix,
                          init_seed=config.fit.seed, autocast_dtype=self.model.autocast_dtype, guide_kind="laplace")
        tau = EmpiricalBayesTau(model) if model.coupling.learned else None
        guide = make_guide(model, "map", target=tau.model if tau is not None else model)
        result = fit(model, guide, train, val, config.fit, tau=tau, progress=progress)
        point = model.complete({**point_values(guide), **(tau.values if tau is not None else {})})
        lap = _laplace_at(model, point, train, config.fit, structure="diag")
        warm_start_from_(self, point, config=config, src_tasks=list(self.tasks), lap=lap)
        return result

    def fit_laplace_(self, train, *, docs: Optional[int] = None, labels: Optional[str] = None,
                     structure: Optional[str] = None, seed: Optional[int] = None,
                     progress: bool = False) -> HierarchicalLaplace:
        """Attach a Laplace posterior around the current point estimate (:mod:`bora.posterior.laplace`), with
        curvature from ``docs`` training documents per task (default: ``fit.laplace_docs``, all) and
        ``structure`` ``'lowrank'`` or ``'diag'`` (default: ``fit.laplace_structure``)."""
        cfg = self.config.fit
        structure = structure or cfg.laplace_structure
        if structure not in ("lowrank", "diag"):
            raise ConfigError(f"structure must be 'lowrank' or 'diag', got {structure!r}")
        self.laplace = _laplace_at(self.model, self.point(), self._as_feed(train), cfg, docs=docs, labels=labels,
                                   structure=structure, seed=seed, progress=progress)
        return self.laplace

    # ------------------------------------------------------------------ estimates
    def point(self) -> dict[str, torch.Tensor]:
        """Point estimate of every latent site (MAP, or the posterior median for mean-field)."""
        return self.model.complete({**point_values(self.guide), **(self.tau.values if self.tau is not None else {})})

    def params(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per-task adapter tensors ``key -> (A [T, r, in], B [T, out, r])`` (``[r, in]``/``[out, r]`` if shared)."""
        return self.model.params_from_values(self.point())

    def tau_estimate(self) -> Optional[dict[str, float]]:
        fixed = self.model.coupling.tau_value(self.config.prior)
        if fixed is not None:
            return {"tau": fixed}
        if self.tau is not None:
            return self.tau.as_dict()
        return {k: float(v) for k, v in self.point().items() if k.startswith("tau")}

    def evaluate(self, split, *, base: bool = False, adapter: Optional[dict] = None) -> dict:
        """Per-task and overall NLL/perplexity of ``split`` under the fit (or the base model); with ``adapter``
        (one 2-D adapter ``key -> (A, B)``, e.g. :meth:`global_adapter`) under that adapter for every document,
        and then (as with ``base``) ``split`` may hold any tasks (e.g. tasks not in the fit)."""
        if not base and adapter is None:
            return evaluate(self.model, self.params(), self._as_feed(split), self.config.fit.eval_batch_size)
        feed = split if isinstance(split, Feed) else self.feed(split, any_tasks=True)
        return evaluate(self.model, None if base else adapter, feed, self.config.fit.eval_batch_size)

    def global_adapter(self) -> dict:
        """The 2-D adapter ``key -> (A, B)`` of a task not in the fit at the point estimate: the global adapter
        ``Theta``, the mean of a new task's prior predictive (the cold-start prediction,
        :mod:`bora.posterior.coldstart`; :meth:`bora.posterior.samples.Posterior.global_task_adapter`)."""
        return self.posterior(1).global_task_adapter()

    # ------------------------------------------------------------------ posterior (bora.posterior)
    def posterior(self, num_samples: int = 8, *, seed: int = 0, predictive: str = "sample"):
        """``num_samples`` adapter sets from the fit's posterior (:class:`bora.posterior.samples.Posterior`);
        ``predictive``: ``"sample"`` (the network run at each sampled adapter, the default) or ``"linear"``
        (the network linearised at the point estimate, :mod:`bora.lora.linearize`) for likelihoods and BMA
        predictions."""
        from .posterior.samples import Posterior

        return Posterior(self, num_samples, seed=seed, predictive=predictive)

    def init_from(self, path) -> dict:
        """Warm start: set the guide to the estimates of the saved fit ``path``
        (:func:`bora.io.warmstart.warm_start_`)."""
        from .io.warmstart import warm_start_

        report = warm_start_(self, path)
        if self._starts_at_map():  # started where the user chose: no MAP phase, the means at lr as given
            self.config = self.config.replace(fit=self.config.fit.replace(meanfield_start="init"))
        return report

    def fit_new_task(self, docs, *, steps: int = 100, lr: float = 0.05, **kw) -> dict:
        """Adapter ``key -> (A, B)`` of a task not in the fit, global level fixed
        (:func:`bora.fit.newtask.fit_new_task`)."""
        return fit_new_task(self, docs, steps=steps, lr=lr, **kw)

    def remove_adapters_(self):
        """Take this object's adapters out of the base LM (so another :class:`Bora` can use it); returns the LM."""
        from .lora.inject import remove_adapters_

        return remove_adapters_(self.adapters)

    # ------------------------------------------------------------------ fit folders (bora.fitfolder)
    def save(self, path) -> None:
        """Write this fit to the folder ``path`` atomically (:func:`bora.io.fitfolder.save_fit`)."""
        save_fit(self, path)

    @classmethod
    def load(cls, path, *, device=None, lm=None, tokenizer=None) -> "Bora":
        """The fit saved in folder ``path``; reads JSON and safetensors only (never unpickles), checks the
        checksums and that the base model (``lm``, or the one named in its config) is the one it was fitted on."""
        path = Path(path)
        config, meta, state, tensors = read_fit_files(path)
        if lm is None or tokenizer is None:
            from .lora.base import load_base_model

            lm, tokenizer = load_base_model(config.model, device=resolve_device(device), quantize=config.quantize)
        bora = cls(config, lm, tokenizer, meta["tasks"], meta["num_docs"], device=device,
                   task_sizes=meta.get("task_sizes"))
        restore_fit_(bora, path, meta, state, tensors)
        return bora
