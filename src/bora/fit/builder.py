"""The optimiser step of a fit, built in one place for the fit loop and the benchmarks.

>>> from bora.fit.builder import build_step        # doctest: +SKIP
>>> step = build_step(model, guide, FitConfig(), total=100, n_tokens=29458)   # doctest: +SKIP
>>> loss, grad_norm = step(batch, 1)              # doctest: +SKIP

:func:`build_step` makes the ELBO module ``Trace_ELBO(num_particles, max_plate_nesting=1)(target, guide)``
(wrapped for data-parallel gradient averaging, :func:`bora.core.distributed.data_parallel`), the guide's
optimiser groups (:func:`bora.model.guides.param_groups`), AdamW and its schedule, and the
:class:`~bora.fit.step.TrainStep` that divides the ELBO by the training split's token count. Pyro's
distribution checks run on the first step only, when they are enabled at build time. ``task_updates='lazy'``
builds :class:`bora.fit.lazy.LazyStep` (only the batch's tasks per step) instead.
"""

from __future__ import annotations

from typing import Mapping, Optional

import pyro
import torch
from pyro.infer import Trace_ELBO

from ..core.config import FitConfig
from ..core.distributed import data_parallel
from ..model.guides import param_groups
from .lazy import LazyStep, build_lazy_step
from .step import TrainStep, make_optimizer, make_scheduler

__all__ = ["build_step"]


def build_step(model, guide, cfg: FitConfig, *, total: int, n_tokens: int, target=None,
               tau_values: Optional[Mapping[str, torch.Tensor]] = None) -> TrainStep | LazyStep:
    """The :class:`~bora.fit.step.TrainStep` of a fit of ``guide`` against ``target`` (default ``model``) over
    ``total`` steps; its ``optimizer`` and ``scheduler`` are attributes of the returned step. With
    ``cfg.task_updates='lazy'`` the :class:`~bora.fit.lazy.LazyStep` of ``model`` (its tau from ``tau_values``,
    a learned tau's current estimates) instead."""
    if cfg.task_updates == "lazy":
        return build_lazy_step(model, guide, cfg, total=total, n_tokens=n_tokens, tau_values=tau_values)
    elbo = data_parallel(Trace_ELBO(num_particles=cfg.num_particles, max_plate_nesting=1)(target or model, guide))
    groups = param_groups(guide, cfg.lr, cfg.scale_lr)
    params = [p for g in groups for p in g["params"]]
    opt = make_optimizer(groups, cfg)
    sched = make_scheduler(opt, cfg, total)
    scale = float(n_tokens)
    return TrainStep(lambda b: elbo(b) / scale, params, opt, sched, clip_norm=cfg.clip_norm,
                     pyro_checks=pyro.distributions.is_validation_enabled())
