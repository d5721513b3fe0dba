"""Learning tau for MAP fits: Laplace empirical Bayes (type-II maximum a posteriori).

>>> import torch
>>> from bora.tau import marginal_tau
>>> g = torch.Generator().manual_seed(0)
>>> tau, F = 50.0, torch.full((20000,), 200.0)           # true tau, likelihood precision
>>> r = torch.randn(20000, generator=g) * (1 / tau + 1 / F).sqrt()   # own-data deviations
>>> abs(marginal_tau(r.square(), 1 / F) / tau - 1) < 0.1
True

Why not plain MAP over tau? The centred joint density of ``(theta_t, Theta, tau)`` is unbounded:
``theta_t -> Theta`` together with ``tau -> inf`` drives it to infinity, so gradient MAP drifts to
the one-shared-adapter fit, at a speed set by tau's learning rate. Integrating ``tau`` out of the
point estimates (a Student-t prior) does not help either: with millions of adapter coordinates the
``-(D/2) log S`` term still rewards shrinking every task to the global adapter.

The estimator used instead treats tau as a hyperparameter and maximises its (Laplace-approximate)
marginal posterior. Around the current point, task ``t``'s log-likelihood in adapter coordinate
``i`` is approximately Gaussian with precision ``F_ti`` (diagonal empirical Fisher) and mode
``y_ti = theta_ti + G_ti / F_ti`` (one Newton step with gradient ``G_ti``). In the normal-normal
model ``y_ti - Theta_i ~ Normal(0, 1/tau + 1/F_ti)``, so ::

    tau_hat = argmax_tau  sum_ti log Normal(r_ti; 0, 1/tau + c_t / F_ti) + log Gamma(tau; a, b)

with ``r_ti = theta_ti - Theta_i + G_ti / F_ti``. ``c_t = N_t / n_t >= 1`` inflates the variance when
``G`` and ``F`` were estimated from a subsample of ``n_t`` of the task's ``N_t`` documents (the
extra noise of the subsampled gradient). Because ``r`` estimates what each task's own data says,
not where the current fit put it, the estimate does not feed on its own shrinkage: it has a finite
maximiser whenever the tasks' own-data optima differ by more than their noise, and it recovers the
true tau of a normal-normal model (see the example above). The fit loop alternates optimiser steps
at fixed tau with this update (a generalised EM); ``tau_per_module`` gives one tau per module.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
from pyro import poutine

from .fisher import TaskFisher
from .model import site_names

__all__ = ["marginal_tau", "EmpiricalBayesTau"]


def _objective(u: torch.Tensor, r2: torch.Tensor, v: torch.Tensor, a: float, b: float) -> torch.Tensor:
    # u: [G] log-tau candidates; returns [G]
    var = torch.exp(-u)[:, None] + v[None, :]
    ll = -0.5 * (var.log() + r2[None, :] / var).sum(-1)
    return ll + (a - 1.0) * u - b * torch.exp(u)


def marginal_tau(r2: torch.Tensor, v: torch.Tensor, a: float = 1.0, b: float = 0.0,
                 lo: float = -12.0, hi: float = 30.0) -> float:
    """``argmax_tau sum log N(r; 0, 1/tau + v) + log Gamma(tau; a, b)`` by grid then golden section in log tau."""
    r2 = r2.detach().double().flatten()
    v = v.detach().double().flatten()
    keep = torch.isfinite(v) & torch.isfinite(r2)
    r2, v = r2[keep], v[keep]
    if r2.numel() == 0:
        raise ValueError("no informative coordinates to estimate tau from")
    chunk = max(1, 2_000_000 // max(1, r2.numel()))

    def f(u: torch.Tensor) -> torch.Tensor:
        return torch.cat([_objective(u[i:i + chunk], r2, v, a, b) for i in range(0, len(u), chunk)])

    grid = torch.linspace(lo, hi, 85, dtype=torch.float64)
    vals = f(grid)
    j = int(vals.argmax())
    x0, x1 = float(grid[max(0, j - 1)]), float(grid[min(len(grid) - 1, j + 1)])
    phi = (math.sqrt(5) - 1) / 2
    for _ in range(60):
        c, d = x1 - phi * (x1 - x0), x0 + phi * (x1 - x0)
        fc, fd = f(torch.tensor([c, d], dtype=torch.float64)).tolist()
        if fc > fd:
            x1 = d
        else:
            x0 = c
    return math.exp((x0 + x1) / 2)


class EmpiricalBayesTau:
    """Holds the current tau estimates and the model conditioned on them (for AutoDelta fits).

    ``self.model`` is ``poutine.condition(model, data=values)``: the tau sites are observed at
    the current estimates, so the guide has no tau parameter and :meth:`update_` changes the
    values in place between optimiser steps.
    """

    def __init__(self, model):
        if model.prior.tau_mode != "learned":
            raise ValueError("empirical-Bayes tau needs tau_mode='learned'")
        self.base_model = model
        self.values = {name: torch.tensor(float(model.prior.tau), device=model.device)
                       for name in model.tau_groups()}
        self.model = poutine.condition(model, data=self.values)

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.values.items()}

    def load_(self, values: Mapping[str, float]) -> None:
        for k, v in values.items():
            self.values[k].fill_(float(v))

    def residuals(self, point: Mapping[str, torch.Tensor], tf: TaskFisher, keys) -> tuple[torch.Tensor, torch.Tensor]:
        """``(r**2, c / F)`` over every task coordinate of the given adapter keys."""
        r2s, vs = [], []
        c = tf.inflation.to(torch.float64)
        for k in keys:
            n = site_names(k)
            for task_site, glob_site, F, G in ((n["TA"], n["GA"], *[x[0] for x in (tf.fisher[k], tf.grad[k])]),
                                                (n["TB"], n["GB"], *[x[1] for x in (tf.fisher[k], tf.grad[k])])):
                d = (point[task_site] - point[glob_site]).double().cpu()
                Fd, Gd = F.double().cpu(), G.double().cpu()
                pos = Fd > 0
                r = torch.where(pos, d + Gd / Fd.clamp_min(1e-300), d)
                v = torch.where(pos, c.view(-1, 1, 1) / Fd.clamp_min(1e-300), torch.full_like(Fd, math.inf))
                r2s.append(r.square()[pos])
                vs.append(v[pos])
        return torch.cat(r2s), torch.cat(vs)

    def update_(self, point: Mapping[str, torch.Tensor], tf: TaskFisher) -> dict[str, float]:
        P = self.base_model.prior
        for name, keys in self.base_model.tau_groups().items():
            r2, v = self.residuals(point, tf, keys)
            self.values[name].fill_(marginal_tau(r2, v, P.tau_shape, P.tau_rate))
        return self.as_dict()
