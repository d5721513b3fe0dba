"""One optimiser step, the same for a fit, a new task's fit and the benchmarks.

>>> import torch
>>> from bora.core.config import FitConfig
>>> from bora.fit.step import TrainStep, make_optimizer, make_scheduler
>>> w = torch.nn.Parameter(torch.tensor([3.0]))
>>> cfg = FitConfig(lr=0.5, steps=10, warmup=0.0)
>>> opt = make_optimizer([w], cfg)
>>> step = TrainStep(lambda batch: ((w - batch) ** 2).sum(), [w], opt, make_scheduler(opt, cfg), clip_norm=0.0)
>>> loss, norm = step(torch.tensor([1.0]), 1)
>>> round(float(loss), 3), round(float(norm), 3), round(float(w.detach()), 3)
(4.0, 4.0, 2.5)

:class:`TrainStep` runs ``zero_grad``, the loss, a finite check, ``backward`` (under an optional
context, e.g. :meth:`bora.lora.inject.AdapterSet.record_task_grads`), the gradient norm and its finite
check, gradient clipping where the norm exceeds ``clip_norm``, the optimiser and the scheduler. ``reduce_grads``
(a task-sharded fit, :mod:`bora.fit.sharding`) replaces the norm: it sums the global gradients across ranks and
returns the whole gradient's norm. A NaN or
infinite loss or gradient norm raises :class:`NumericalError` naming the step before anything is applied. With
``pyro_checks`` Pyro's distribution-argument validation runs on the first step only (afterwards it
would re-check every element of every adapter tensor on every step, for shapes that cannot change).
:func:`make_optimizer` is AdamW with the fused kernel where the device has one;
:func:`make_scheduler` the linear warm-up and cosine (or constant) schedule of a
:class:`~bora.core.config.FitConfig`.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, ContextManager, Optional, Sequence

import pyro
import torch

from ..core.config import ConfigError, FitConfig

__all__ = ["NumericalError", "TrainStep", "make_optimizer", "make_scheduler", "lr_factor"]


class NumericalError(ConfigError):
    """The loss or gradient became NaN or infinite at ``step`` (nothing from that step was applied)."""

    def __init__(self, step: int, what: str, value: float):
        super().__init__(f"the {what} is {value} at step {step}")
        self.step, self.what, self.value = step, what, value


def lr_factor(cfg: FitConfig, total: int) -> Callable[[int], float]:
    """The learning-rate multiplier at each step: linear warm-up, then cosine to 0.1 (or constant)."""
    warm = int(cfg.warmup * total)

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if cfg.schedule == "constant":
            return 1.0
        prog = (step - warm) / max(1, total - warm)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, prog)))

    return f


def make_optimizer(params, cfg: FitConfig) -> torch.optim.AdamW:
    """AdamW at ``cfg.lr`` with the fused kernel where the device has one (one kernel for every task tensor)."""
    try:
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(opt: torch.optim.Optimizer, cfg: FitConfig, total: Optional[int] = None):
    """``LambdaLR`` with :func:`lr_factor` over ``total`` steps (default ``cfg.steps``)."""
    total = cfg.steps if total is None else total
    if total is None:
        raise ConfigError("the schedule needs the number of steps")
    return torch.optim.lr_scheduler.LambdaLR(opt, lr_factor(cfg, total))


class TrainStep:
    """``step(batch, k)``: one optimiser step on ``loss_fn(batch)``; returns ``(loss, gradient norm)`` (detached)."""

    def __init__(self, loss_fn: Callable[[object], torch.Tensor], params: Sequence[torch.Tensor],
                 optimizer: torch.optim.Optimizer, scheduler=None, *, clip_norm: float = 0.0,
                 pyro_checks: bool = False, reduce_grads: Optional[Callable[[], torch.Tensor]] = None):
        self.loss_fn = loss_fn
        self.reduce_grads = reduce_grads
        self.params = list(params)
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.clip_norm = clip_norm
        self.pyro_checks = pyro_checks

    def __call__(self, batch, step: int, *, backward_context: Optional[ContextManager] = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        self.optimizer.zero_grad(set_to_none=True)
        checks = pyro.validation_enabled(self.pyro_checks and step == 1)
        with checks, backward_context or contextlib.nullcontext():
            loss = self.loss_fn(batch)
            if not bool(torch.isfinite(loss.detach())):
                raise NumericalError(step, "loss", float(loss.detach()))
            loss.backward()
        if self.reduce_grads is not None:  # a task-sharded fit: sums what it must across ranks, returns the norm
            norm = self.reduce_grads()
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        if not bool(torch.isfinite(norm)):
            raise NumericalError(step, "gradient norm", float(norm))
        # clip_grad_norm_'s scaling, max_norm / (norm + 1e-6) capped at 1, done only where it is below 1 (a step
        # under the threshold skips a pass over every gradient; the value is already on the host for the check)
        if self.clip_norm > 0 and self.clip_norm / (float(norm) + 1e-6) < 1.0:
            torch.nn.utils.clip_grads_with_norm_(self.params, self.clip_norm, norm)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        return loss.detach(), norm.detach()
