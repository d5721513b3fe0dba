"""The optimiser step of a fit, built in one place for the fit loop and the benchmarks.

>>> from bora.fit.builder import build_step        # doctest: +SKIP
>>> step = build_step(model, guide, FitConfig(), total=100, n_tokens=29458)   # doctest: +SKIP
>>> loss, grad_norm = step(batch, 1)              # doctest: +SKIP

:func:`build_step` makes the ELBO module ``Trace_ELBO(num_particles, max_plate_nesting=1)(target, guide)``
(wrapped for data-parallel gradient averaging, :func:`bora.core.distributed.data_parallel`), the guide's
optimiser groups (:func:`bora.model.guides.param_groups`), AdamW and its schedule, and the
:class:`~bora.fit.step.TrainStep` that divides the ELBO by the training split's token count. Pyro's
distribution checks run on the first step only, when they are enabled at build time. ``task_updates='lazy'``
builds :class:`bora.fit.lazy.LazyStep` (only the batch's tasks per step) instead. ``parallel='tasks'`` (a
task-sharded fit, :mod:`bora.fit.sharding`) leaves the ELBO unwrapped: the step sums the global parameters'
gradients across ranks itself and never communicates the task rows.
"""

from __future__ import annotations

from typing import Mapping, Optional

import pyro
import torch
from pyro.infer import Trace_ELBO

from ..core.config import ConfigError, FitConfig
from ..core.distributed import data_parallel
from ..model.distributions import LATENT_SUFFIX
from ..model.guides import guide_params, param_groups
from .lazy import LazyStep, build_lazy_step
from .sharding import TaskShards, eager_task_tensors
from .step import TrainStep, make_optimizer, make_scheduler

__all__ = ["build_step"]


def build_step(model, guide, cfg: FitConfig, *, total: int, n_tokens: int, target=None,
               tau_values: Optional[Mapping[str, torch.Tensor]] = None,
               shards: Optional[TaskShards] = None) -> TrainStep | LazyStep:
    """The :class:`~bora.fit.step.TrainStep` of a fit of ``guide`` against ``target`` (default ``model``) over
    ``total`` steps; its ``optimizer`` and ``scheduler`` are attributes of the returned step. With
    ``cfg.task_updates='lazy'`` the :class:`~bora.fit.lazy.LazyStep` of ``model`` (its tau from ``tau_values``,
    a learned tau's current estimates) instead. ``shards``: this rank's tasks in a task-sharded fit
    (``cfg.parallel='tasks'`` in a multi-process run; the step then lists in ``shards.tensors`` the task rows to
    gather)."""
    if cfg.parallel == "tasks" and (not model.has_tasks or not model.coupling.has_tau
                                    or model.parameterisation != "offset"):
        raise ConfigError("parallel='tasks' needs offset task sites coupled by a fixed or learned tau")
    if cfg.task_updates == "lazy":
        return build_lazy_step(model, guide, cfg, total=total, n_tokens=n_tokens, tau_values=tau_values,
                               shards=shards)
    elbo = Trace_ELBO(num_particles=cfg.num_particles, max_plate_nesting=1)(target or model, guide)
    if cfg.parallel == "documents":
        elbo = data_parallel(elbo)
    groups = param_groups(guide, cfg.lr, cfg.scale_lr)
    params = [p for g in groups for p in g["params"]]
    opt = make_optimizer(groups, cfg)
    sched = make_scheduler(opt, cfg, total)
    scale = float(n_tokens)
    reduce = None
    if shards is not None:
        found = guide_params(guide)
        task = [found[site + LATENT_SUFFIX["offset"]]["loc"]
                for k in model.shapes for _, site, _ in model.task_sites(k)]
        glob = [p for p in params if all(p is not q for q in task)]
        mine = shards.mine.to(task[0].device)
        shards.tensors = eager_task_tensors(task, opt)

        def reduce() -> torch.Tensor:
            return shards.reduce_grads_(glob, [p.grad[mine] for p in task if p.grad is not None])

    return TrainStep(lambda b: elbo(b) / scale, params, opt, sched, clip_norm=cfg.clip_norm,
                     pyro_checks=pyro.distributions.is_validation_enabled(), reduce_grads=reduce)
