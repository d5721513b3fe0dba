"""Laplace posterior around a MAP fit: a Gaussian with precision = prior precision + likelihood curvature.

>>> import torch
>>> from bora.laplace import HierarchicalLaplace
>>> # one module "m" with task-level B only: 2 tasks, B is 1 x 1; Fisher 3 and 0; tau = 1; Theta ~ N(0, 10^2)
>>> lap = HierarchicalLaplace(task={"m": {1: torch.tensor([[[3.0]], [[0.0]]])}}, tau={"m": 1.0},
...                           global_scale=10.0, has_global=True)
>>> lap.task_sd("m", 1).flatten().tolist()              # (F + tau)^-1/2: the data halve task 0's variance
[0.5, 1.0]
>>> round(float(lap.global_precision("m", 1)), 4)       # 1/s^2 + sum_t tau F_t / (F_t + tau)
0.76

As in Laplace-LoRA (Yang et al., 2024), but for the hierarchy: after a MAP fit, every task-level
adapter coordinate ``i`` of task ``t`` gets the diagonal curvature ``F_ti`` of its own task's
log-likelihood (:func:`bora.fisher.task_fisher`, by default the Fisher with labels sampled from the
model: the Gauss-Newton matrix of the softmax likelihood). In the linear-Gaussian model that the
hierarchy is given the global ``A`` (``hierarchy='B'``) this is exact:

* the global adapter ``Theta_i`` has marginal precision ``1/s^2 + sum_t tau F_ti / (F_ti + tau)``;
* given ``Theta``, task ``t``'s coordinate is ``Normal(theta_hat_ti + lambda_ti (Theta_i - Theta_hat_i),
  1 / (F_ti + tau))`` with ``lambda_ti = tau / (F_ti + tau)`` (its pooling factor);

so a draw is ``Theta ~ N(Theta_hat, P^-1)`` followed by the task coordinates (bora's fits hold
``Theta`` at its estimate by default: :func:`laplace_from_point`). 'independent' fits
have no ``Theta`` (``theta_ti ~ N(theta_hat_ti, 1/(F_ti + 1/s^2))``), 'shared' fits only a global
adapter (precision ``1/s^2 + sum_t F_ti``). The global ``A`` of ``hierarchy='B'``, informed by
every task's data, and tau (an empirical-Bayes or fixed hyperparameter) are held at their
estimates. Saved beside the fit as ``laplace.safetensors`` (the curvature per task site).

Why not a library: ``laplace-torch``, ``curvlinops`` and ``backpack`` compute curvature for the
parameters of an ``nn.Module`` under a standard loss; bora's adapters are not module parameters
(they are handed to the layers per forward pass, per task) and the curvature needed is per task,
which :mod:`bora.fisher` already gets exactly from one batched backward per batch of distinct tasks.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch

from .fisher import TaskFisher
from .model import site_names

__all__ = ["HierarchicalLaplace", "laplace_from_point"]

_PREFIX = "laplace.F."


class HierarchicalLaplace:
    """Diagonal Laplace posterior of the task-level (and global ``B``) adapter coordinates.

    ``task[key][factor]`` is the per-task Fisher ``[T, ...]`` of factor 0 (``A``) or 1 (``B``) of
    adapter ``key``; ``tau[key]`` its prior precision (``0``: independent, ``inf``: shared)."""

    def __init__(self, task: Mapping[str, Mapping[int, torch.Tensor]], tau: Mapping[str, float], *,
                 global_scale: float, has_global: bool, sample_global: bool = True):
        self.task = {k: {int(i): F.detach().float().cpu() for i, F in fs.items()} for k, fs in task.items()}
        self.tau = {k: float(v) for k, v in tau.items()}
        self.global_scale = float(global_scale)
        self.has_global = bool(has_global)
        self.sample_global = bool(sample_global)

    # ------------------------------------------------------------------ precisions
    def _prior_prec(self, key: str) -> float:
        t = self.tau[key]
        return 1.0 / self.global_scale ** 2 if t == 0 else t

    def task_sd(self, key: str, factor: int) -> torch.Tensor:
        """Conditional posterior sd of every task coordinate given ``Theta``: ``(F + tau)^-1/2``, ``[T, ...]``."""
        return (self.task[key][factor] + self._prior_prec(key)).rsqrt()

    def median_task_sd(self) -> float:
        """The median posterior sd over every task coordinate (compare with the prior sd ``tau^-1/2``)."""
        return float(torch.cat([self.task_sd(k, i).flatten() for k in self.task for i in self.task[k]]).median())

    def pooling(self, key: str, factor: int) -> torch.Tensor:
        """``lambda = tau / (F + tau)`` per task coordinate (0 for independent, 1 where the data say nothing)."""
        t = self.tau[key]
        if t == 0:
            return torch.zeros_like(self.task[key][factor])
        if math.isinf(t):
            return torch.ones_like(self.task[key][factor])
        return t / (self.task[key][factor] + t)

    def global_precision(self, key: str, factor: int) -> torch.Tensor:
        """Marginal posterior precision of ``Theta`` (task adapters integrated out), per coordinate."""
        F = self.task[key][factor]
        t = self.tau[key]
        like = F.sum(0) if math.isinf(t) else (t * F / (F + t)).sum(0)
        return like + 1.0 / self.global_scale ** 2

    # ------------------------------------------------------------------ sampling
    def sample(self, model, point: Mapping[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
        """One posterior draw of every adapter site (natural coordinates), from the MAP ``point``."""
        out = dict(point)
        for key in self.task:
            n = site_names(key)
            for factor in sorted(self.task[key]):
                g_site = n["GA" if factor == 0 else "GB"]
                t_site = n["TA" if factor == 0 else "TB"]
                shift = None
                if self.has_global and self.sample_global and g_site in point:
                    G = point[g_site]
                    eps = torch.randn(G.shape, generator=generator).to(G.device)
                    shift = eps * self.global_precision(key, factor).rsqrt().to(G.device)
                    out[g_site] = G + shift
                if t_site in point and not math.isinf(self.tau[key]):
                    th = point[t_site]
                    eps = torch.randn(th.shape, generator=generator).to(th.device)
                    draw = th + eps * self.task_sd(key, factor).to(th.device)
                    if shift is not None:
                        draw = draw + self.pooling(key, factor).to(th.device) * shift
                    out[t_site] = draw
        return out

    # ------------------------------------------------------------------ io
    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"{_PREFIX}{i}.{k}": F.contiguous() for k, fs in self.task.items() for i, F in fs.items()}

    def metadata(self) -> dict:
        return {"tau": self.tau, "global_scale": self.global_scale, "has_global": self.has_global,
                "sample_global": self.sample_global}

    @classmethod
    def from_saved(cls, tensors: Mapping[str, torch.Tensor], meta: Mapping) -> "HierarchicalLaplace":
        task: dict = {}
        for name, F in tensors.items():
            if not name.startswith(_PREFIX):
                continue
            factor, _, key = name[len(_PREFIX):].partition(".")
            task.setdefault(key, {})[int(factor)] = F
        tau = {k: float(v) for k, v in meta["tau"].items()}
        return cls(task, tau, global_scale=float(meta["global_scale"]), has_global=bool(meta["has_global"]),
                   sample_global=bool(meta.get("sample_global", True)))


def laplace_from_point(model, tf: TaskFisher, tau: Mapping[str, float], *,
                       sample_global: bool = False) -> HierarchicalLaplace:
    """The Laplace posterior of ``model`` at the point where ``tf`` was computed; ``tau`` per adapter key.

    By default the global adapter is held at its estimate (with tau: the empirical-Bayes predictive):
    in the many coordinates that the data barely inform, its diagonal marginal is the vague
    ``Normal(0, global_scale)`` hyperprior (sd 1 against adapter entries of about 0.01), whose draws
    would swamp the task-level uncertainty; ``sample_global=True`` samples it too (exact in the
    linear-Gaussian case)."""
    task = {}
    for key in model.shapes:
        factors = [i for i, _, _ in model.task_sites(key)] or list(model.task_factors())
        task[key] = {i: tf.fisher[key][i] for i in factors}
    return HierarchicalLaplace(task, tau, global_scale=model.prior.global_scale, has_global=model.has_global,
                               sample_global=sample_global)
