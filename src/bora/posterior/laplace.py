"""Laplace posterior around a MAP fit: a Gaussian with precision = prior precision + likelihood curvature.

>>> import torch
>>> from bora.posterior.laplace import HierarchicalLaplace
>>> # one module "m" with task-level B only: 2 tasks, B is 1 x 1; Fisher 3 and 0; tau = 1; Theta ~ N(0, 10^2)
>>> lap = HierarchicalLaplace(task={"m": {1: torch.tensor([[[3.0]], [[0.0]]])}}, tau={"m": 1.0},
...                           global_scale=10.0, has_global=True)
>>> lap.task_sd("m", 1).flatten().tolist()              # (F + tau)^-1/2: the data halve task 0's variance
[0.5, 1.0]
>>> round(float(lap.global_precision("m", 1)), 4)       # 1/s^2 + sum_t tau F_t / (F_t + tau)
0.76

As in Laplace-LoRA (Yang et al., 2024), but for the hierarchy: after a MAP fit, every task-level
adapter coordinate ``i`` of task ``t`` gets the diagonal curvature ``F_ti`` of its own task's
log-likelihood (:func:`bora.fit.fisher.task_fisher`, by default the Fisher with labels sampled from the
model: the Gauss-Newton matrix of the softmax likelihood). In the linear-Gaussian model that the
hierarchy is given the global ``A`` (``hierarchy='B'``) this is exact:

* the global adapter ``Theta_i`` has marginal precision ``1/s^2 + sum_t tau F_ti / (F_ti + tau)``;
* given ``Theta``, task ``t``'s coordinate is ``Normal(theta_hat_ti + lambda_ti (Theta_i - Theta_hat_i),
  1 / (F_ti + tau))`` with ``lambda_ti = tau / (F_ti + tau)`` (its pooling factor);

so a draw is ``Theta ~ N(Theta_hat, P^-1)`` followed by the task coordinates (bora's fits hold
``Theta`` at its estimate by default: :func:`laplace_from_point`). 'uncoupled' fits
have no ``Theta`` (``theta_ti ~ N(theta_hat_ti, 1/(F_ti + 1/s^2))``), 'shared' fits only a global
adapter (precision ``1/s^2 + sum_t F_ti``). The global ``A`` of ``hierarchy='B'``, informed by
every task's data, and tau (an empirical-Bayes or fixed hyperparameter) are held at their
estimates. Saved beside the fit as ``laplace.safetensors`` (the curvature per task site).

**Low-rank curvature (``laplace_structure='lowrank'``; the default is ``'diag'``).** The diagonal treats every
coordinate as independent. A language model's per-document gradients are strongly correlated, so a
task's Fisher is close to low rank, and its diagonal spreads that curvature over every coordinate:
the posterior then keeps the prior's full variance in the directions the documents do determine.
On the embedded default the function-space spread on a task's own documents (``tr(F Sigma)``, its
effective parameters) is 90-2130 under the diagonal but 7-60 under the task's Fisher ``G_t G_t^T``
(``G_t``: the ``n_t`` documents' gradients as columns, kept by :func:`bora.fit.fisher.task_fisher`).
With that Fisher each task's posterior is ``N(theta_hat_t, (D + G_t G_t^T)^-1)`` (``D`` the prior
precision per module): exact in the directions the documents span, the prior elsewhere, sampled
through the eigendecomposition of the small ``n_t x n_t`` matrix ``W^T W``, ``W = D^-1/2 G_t``
(``n_t`` is at most ``laplace_docs``). The cost is storage: ``n_t`` vectors of the task's size
per task (bfloat16), e.g. 233 MB for the embedded default's 16 tasks x up to 64 documents
x 166k coordinates. The diagonal ``F`` (``diag(G_t G_t^T)``) still gives the pooling summaries and the global
adapter's precision. On the embedded default it does not change the predictive (document-level BMA
4.521 vs 4.528 nats/token with the linearised predictive; mean MI 0.197 vs 0.196,
``analysis/README.md``): a test document's gradient lies almost entirely outside the span of the
task's training documents' gradients, where both posteriors are the prior, so it is not the default.

Why not a library: ``laplace-torch``, ``curvlinops`` and ``backpack`` compute curvature for the
parameters of an ``nn.Module`` under a standard loss; bora's adapters are not module parameters
(they are handed to the layers per forward pass, per task) and the curvature needed is per task,
which :mod:`bora.fit.fisher` already gets exactly from one batched backward per batch of distinct tasks.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import torch

from ..fit.fisher import TaskFisher
from ..model.hierarchy import site_names

__all__ = ["HierarchicalLaplace", "laplace_from_point", "task_layout"]

_PREFIX = "laplace.F."
_GRAD = "laplace.G."


class HierarchicalLaplace:
    """Laplace posterior of the task-level (and global ``B``) adapter coordinates: diagonal, or with each task's
    low-rank Fisher ``G_t G_t^T`` (``gradients``: one ``[P, n_t]`` matrix per task, the task's coordinates in
    the order of ``task``, keys then factors).

    ``task[key][factor]`` is the per-task Fisher ``[T, ...]`` of factor 0 (``A``) or 1 (``B``) of
    adapter ``key``; ``tau[key]`` its prior precision (``0``: uncoupled, ``inf``: shared), or a list of one finite
    positive precision per task (a per-task tau: task ``t``'s coordinates then have prior precision ``tau[key][t]``)."""

    def __init__(self, task: Mapping[str, Mapping[int, torch.Tensor]], tau: Mapping[str, float | Sequence[float]], *,
                 global_scale: float, has_global: bool, sample_global: bool = True,
                 gradients: Optional[Sequence[torch.Tensor]] = None):
        self.task = {k: {int(i): F.detach().float().cpu() for i, F in fs.items()} for k, fs in task.items()}
        self.tau = {k: _tau_value(v) for k, v in tau.items()}
        for k, t in self.tau.items():
            if isinstance(t, list) and (len(t) != self._num_tasks() or not all(0 < x < math.inf for x in t)):
                raise ValueError(f"tau[{k!r}]: a per-task tau needs {self._num_tasks()} finite positive values")
        # stored in bfloat16 (half the disk of float32; ~3 significant digits are plenty for a curvature),
        # rounded here already so that a fit's draws are the same before and after saving
        self.gradients = None if gradients is None else [G.detach().cpu().to(torch.bfloat16).float() for G in gradients]
        self._eig: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        if self.gradients is not None:
            P = sum(F[0].numel() for fs in self.task.values() for F in fs.values())
            if len(self.gradients) != self._num_tasks() or any(G.dim() != 2 or G.shape[0] != P for G in self.gradients):
                raise ValueError(f"gradients must be one [{P}, n_t] matrix per task (the task coordinates in order)")
        self.global_scale = float(global_scale)
        self.has_global = bool(has_global)
        self.sample_global = bool(sample_global)

    @property
    def structure(self) -> str:
        """``"lowrank"`` (the task's Fisher ``G_t G_t^T`` from per-document gradients) or ``"diag"``."""
        return "diag" if self.gradients is None else "lowrank"

    def _num_tasks(self) -> int:
        return next(iter(next(iter(self.task.values())).values())).shape[0]

    # ------------------------------------------------------------------ precisions
    def _is_shared(self, key: str) -> bool:
        t = self.tau[key]
        return not isinstance(t, list) and math.isinf(t)

    def _tau_like(self, key: str, F: torch.Tensor):
        """``tau[key]`` broadcastable against ``F`` ``[T, ...]``: a float, or ``[T, 1, ...]`` for a per-task tau."""
        t = self.tau[key]
        if isinstance(t, list):
            return torch.tensor(t, dtype=F.dtype).view(-1, *([1] * (F.dim() - 1)))
        return t

    def _prior_prec(self, key: str, task: Optional[int] = None):
        """The prior precision of ``key``'s task coordinates: a float, of task ``task`` with a per-task tau, or
        (``task=None``) ``[T, 1, ...]`` for a per-task tau."""
        t = self.tau[key]
        if isinstance(t, list):
            return t[task] if task is not None else self._tau_like(key, next(iter(self.task[key].values())))
        return 1.0 / self.global_scale ** 2 if t == 0 else t

    def task_sd(self, key: str, factor: int) -> torch.Tensor:
        """Conditional posterior sd of every task coordinate given ``Theta``: ``(F + tau)^-1/2``, ``[T, ...]``."""
        return (self.task[key][factor] + self._prior_prec(key)).rsqrt()

    def median_task_sd(self) -> float:
        """The median marginal posterior sd over every task coordinate (compare with the prior sd ``tau^-1/2``)."""
        if self.gradients is None:
            return float(torch.cat([self.task_sd(k, i).flatten() for k in self.task for i in self.task[k]]).median())
        sds = []
        for t in range(len(self.gradients)):
            d, Q, lam = self._whitened_eig(t)
            sds.append(d * (1 - (Q.square() * (lam / (1 + lam))).sum(1)).clamp_min(0).sqrt())
        return float(torch.cat(sds).median())

    def pooling(self, key: str, factor: int) -> torch.Tensor:
        """``lambda = tau / (F + tau)`` per task coordinate (0 for uncoupled, 1 where the data say nothing)."""
        F = self.task[key][factor]
        t = self._tau_like(key, F)
        if isinstance(t, float) and t == 0:
            return torch.zeros_like(F)
        if self._is_shared(key):
            return torch.ones_like(F)
        return t / (F + t)

    def global_precision(self, key: str, factor: int) -> torch.Tensor:
        """Marginal posterior precision of ``Theta`` (task adapters integrated out), per coordinate."""
        F = self.task[key][factor]
        t = self._tau_like(key, F)
        like = F.sum(0) if self._is_shared(key) else (t * F / (F + t)).sum(0)
        return like + 1.0 / self.global_scale ** 2

    # ------------------------------------------------------------------ sampling
    def sample(self, model, point: Mapping[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
        """One posterior draw of every adapter site (natural coordinates), from the MAP ``point``."""
        out = dict(point)
        shifts: dict = {}
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
                if self.gradients is None and t_site in point and not self._is_shared(key):
                    th = point[t_site]
                    eps = torch.randn(th.shape, generator=generator).to(th.device)
                    draw = th + eps * self.task_sd(key, factor).to(th.device)
                    if shift is not None:
                        draw = draw + self.pooling(key, factor).to(th.device) * shift
                    out[t_site] = draw
                if shift is not None:
                    shifts[(key, factor)] = shift
        if self.gradients is not None:
            self._sample_lowrank_(out, point, shifts, generator)
        return out

    # ------------------------------------------------------------------ low-rank curvature
    def _layout(self) -> list[tuple[str, int, str]]:
        """``(key, factor, task site)`` in the order of a task's coordinate vector."""
        return [(key, i, site_names(key)["TA" if i == 0 else "TB"])
                for key, fs in self.task.items() for i in sorted(fs)]

    def _prior_vector(self, t: int) -> torch.Tensor:
        """The prior precision of every coordinate of task ``t``'s vector, ``[P]``."""
        return torch.cat([torch.full((self.task[k][i][0].numel(),), float(self._prior_prec(k, t)))
                          for k, i, _ in self._layout()])

    def _whitened_eig(self, t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(d, Q, lam)`` of task ``t``: ``d = D^-1/2`` (prior sds), and ``W W^T = Q diag(lam) Q^T`` with
        ``W = D^-1/2 G_t``, so the posterior covariance is ``D^-1/2 (I - Q diag(lam/(1+lam)) Q^T) D^-1/2``."""
        if t not in self._eig:
            d = self._prior_vector(t).rsqrt()
            W = self.gradients[t].double() * d.double()[:, None]
            lam, V = torch.linalg.eigh(W.T @ W) if W.shape[1] else (torch.zeros(0), torch.zeros(0, 0))
            keep = lam > 1e-10 * lam.max().clamp_min(1e-300) if len(lam) else lam > 0
            lam, V = lam[keep], V[:, keep]
            Q = (W @ V) / lam.sqrt()
            self._eig[t] = (d, Q.float(), lam.float())
        return self._eig[t]

    def _sample_lowrank_(self, out: dict, point: Mapping[str, torch.Tensor], shifts: dict,
                         generator: torch.Generator) -> None:
        layout = [(k, i, site) for k, i, site in self._layout() if site in point and not self._is_shared(k)]
        if not layout:
            return
        T = self._num_tasks()
        draws = {site: point[site].clone() for _, _, site in layout}
        for t in range(T):
            d, Q, lam = self._whitened_eig(t)
            eps = torch.randn(d.shape[0], generator=generator)
            x = eps + Q @ (((1 + lam).rsqrt() - 1) * (Q.T @ eps))  # N(0, (I + W W^T)^-1)
            delta = d * x
            if shifts:  # E[theta_t | Theta] moves by Sigma_t D (Theta - Theta_hat)
                y = torch.cat([shifts[(k, i)].flatten().cpu() / d_k if (k, i) in shifts else
                               torch.zeros(self.task[k][i][0].numel())
                               for (k, i, _), d_k in zip(self._layout(), self._split(d))])
                delta = delta + d * (y - Q @ ((lam / (1 + lam)) * (Q.T @ y)))
            for (k, i, site), piece in zip(self._layout(), self._split(delta)):
                if site in draws:
                    draws[site][t] += piece.view_as(draws[site][t]).to(draws[site].device)
        out.update(draws)

    def task_variance(self, t: int, G: torch.Tensor, *, prior: bool = False) -> torch.Tensor:
        """``g^T Sigma_t g`` for every column ``g`` of ``G`` (``[P, n]``, task ``t``'s coordinates in the order of
        ``gradients``): the linearised posterior variance of a quantity with gradient ``g`` (e.g. a document's
        log-likelihood); ``prior=True``: under the prior alone, ``g^T D^-1 g``. ``[n]``, float64."""
        G = G.double()
        d = self._prior_vector(t).double().rsqrt()
        if prior:
            return (G * d[:, None]).square().sum(0)
        if self.gradients is None:
            F = torch.cat([self.task[k][i][t].flatten() for k, i, _ in self._layout()]).double()
            return (G.square() / (F + d.pow(-2))[:, None]).sum(0)
        _, Q, lam = self._whitened_eig(t)
        W = G * d[:, None]
        return W.square().sum(0) - ((Q.double().T @ W).square() * (lam.double() / (1 + lam.double()))[:, None]).sum(0)

    def task_cov_times(self, t: int, G: torch.Tensor) -> torch.Tensor:
        """``Sigma_t G``: task ``t``'s posterior covariance given ``Theta`` times every column of ``G`` (``[P, n]``, its
        coordinates in the order of :meth:`layout`), ``[P, n]`` float64 (e.g. the mean shift of a proposal tilted
        by a document's gradient, :mod:`bora.evaluation.tilted`)."""
        G = G.double()
        d = self._prior_vector(t).double().rsqrt()
        if self.gradients is None:
            F = torch.cat([self.task[k][i][t].flatten() for k, i, _ in self._layout()]).double()
            return G / (F + d.pow(-2))[:, None]
        _, Q, lam = self._whitened_eig(t)
        Q, lam = Q.double(), lam.double()
        W = G * d[:, None]
        return d[:, None] * (W - Q @ ((lam / (1 + lam))[:, None] * (Q.T @ W)))

    def layout(self) -> list[tuple[str, int]]:
        """``(adapter key, factor)`` of every block of a task's coordinate vector, in order."""
        return [(k, i) for k, i, _ in self._layout()]

    def _split(self, vec: torch.Tensor) -> list[torch.Tensor]:
        return list(vec.split([self.task[k][i][0].numel() for k, i, _ in self._layout()]))

    # ------------------------------------------------------------------ io
    def tensors(self) -> dict[str, torch.Tensor]:
        out = {f"{_PREFIX}{i}.{k}": F.contiguous() for k, fs in self.task.items() for i, F in fs.items()}
        for t, G in enumerate(self.gradients or ()):
            out[f"{_GRAD}{t}"] = G.to(torch.bfloat16).contiguous()
        return out

    def metadata(self) -> dict:
        return {"tau": self.tau, "global_scale": self.global_scale, "has_global": self.has_global,
                "sample_global": self.sample_global, "structure": self.structure,
                "order": [[k, sorted(fs)] for k, fs in self.task.items()]}

    @classmethod
    def from_saved(cls, tensors: Mapping[str, torch.Tensor], meta: Mapping) -> "HierarchicalLaplace":
        task: dict = {}
        grads: dict = {}
        for name, F in tensors.items():
            if name.startswith(_GRAD):
                grads[int(name[len(_GRAD):])] = F
            if not name.startswith(_PREFIX):
                continue
            factor, _, key = name[len(_PREFIX):].partition(".")
            task.setdefault(key, {})[int(factor)] = F
        order = meta.get("order")  # the coordinate order of the gradients: (key, factor) pairs
        if order is not None:
            task = {k: {int(i): task[k][int(i)] for i in fs} for k, fs in order}
        tau = {k: _tau_value(v) for k, v in meta["tau"].items()}
        if grads and sorted(grads) != list(range(len(grads))):
            raise ValueError("laplace: the saved per-task gradients are not numbered 0..T-1")
        return cls(task, tau, global_scale=float(meta["global_scale"]), has_global=bool(meta["has_global"]),
                   sample_global=bool(meta.get("sample_global", True)),
                   gradients=[grads[t] for t in range(len(grads))] if grads else None)


def _tau_value(v) -> float | list[float]:
    """A saved or given tau: a float, or a per-task tau as a list of floats."""
    if isinstance(v, torch.Tensor):
        v = v.tolist()
    return [float(x) for x in v] if isinstance(v, (list, tuple)) else float(v)


def task_layout(model) -> dict[str, list[int]]:
    """The task-level factors of every adapter key (all factors for a 'shared' fit), in the Laplace order."""
    return {key: sorted([i for i, _, _ in model.task_sites(key)] or list(model.task_factors())) for key in model.shapes}


def laplace_from_point(model, tf: TaskFisher, tau: Mapping[str, float | Sequence[float]], *,
                       sample_global: bool = False) -> HierarchicalLaplace:
    """The Laplace posterior of ``model`` at the point where ``tf`` was computed; ``tau`` per adapter key (a list of
    the tasks' taus for a per-task tau: ``model.tau_by_key(point, per_task=True)``).

    By default the global adapter is held at its estimate (with tau: the empirical-Bayes predictive):
    in the many coordinates that the data barely inform, its diagonal marginal is the vague
    ``Normal(0, global_scale)`` hyperprior (sd 1 against adapter entries of about 0.01), whose draws
    would swamp the task-level uncertainty; ``sample_global=True`` samples it too (exact in the
    linear-Gaussian case)."""
    task = {key: {i: tf.fisher[key][i] for i in factors} for key, factors in task_layout(model).items()}
    return HierarchicalLaplace(task, tau, global_scale=model.prior.global_scale, has_global=model.has_global,
                               sample_global=sample_global, gradients=tf.gradients if model.has_tasks else None)
