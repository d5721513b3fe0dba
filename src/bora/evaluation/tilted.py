"""The document-level posterior predictive by importance sampling from a proposal tilted by the document's gradient.

>>> import torch
>>> from bora.evaluation.tilted import tilted_log_mean_exp
>>> # a log-likelihood linear in the adapter, L(theta) = 2 + g theta, posterior theta ~ N(0, s^2):
>>> # log E exp L = 2 + g^2 s^2 / 2 = 3.125, which plain Monte Carlo underestimates with few draws
>>> g, s = 3.0, 0.5
>>> eps = s * torch.randn(4, 1, dtype=torch.float64)         # 4 draws from N(0, s^2), 1 document
>>> theta = g * s ** 2 + eps                                  # the same draws around the tilted mean Sigma g
>>> est, ess = tilted_log_mean_exp(2 + g * theta, g * eps, torch.tensor([g * g * s ** 2]))
>>> round(float(est), 6), round(float(ess), 6)              # exact with any number of draws; ESS = all 4
(3.125, 4.0)

**Why.** The document-level BMA of a document ``d`` is ``log p(d) = log E_post[p(d | theta)]``. Plain Monte Carlo,
``log mean_s exp L_s`` with ``L_s = log p(d | theta_s)`` at posterior draws, is biased down by about
``var(L_s) / (2 S)`` and much more once ``var(L_s)`` exceeds a few nats^2: the average is then carried by rare
draws. A whole document's log-likelihood moves *linearly* with the adapter first: on the embedded default its
sd over Laplace draws is about 2.9 nats per document (``analysis/results/uncertainty/bma_gain.md``), almost all
of it the term ``g^T eps`` (``g``: the document's gradient at the point estimate, ``eps = theta - theta_hat``).

**The estimator.** For a Gaussian posterior ``N(theta_hat, Sigma)`` of the document's task adapter (the Laplace
posterior with the global adapter held at its estimate, or a centred mean-field posterior: its mean and
``diag(scale^2)``; a draw's other sites, e.g. the mean-field's shared ``A``, are drawn as they are), draw from
the proposal ``N(theta_hat + Sigma g, Sigma)``, the posterior tilted by ``exp(g^T theta)``:
``theta_s = theta_hat + Sigma g + eps_s``. The importance weights are
``p / q = exp(g^T Sigma g / 2 - g^T (theta_s - theta_hat))``, so

    ``log p(d) ~= -g^T Sigma g / 2 + log mean_s exp(L(theta_s) - g^T eps_s)``,

an unbiased estimate of ``p(d)`` (the usual log-of-a-mean bias only in what the linear term leaves: the
curvature), **exact** for any number of draws when ``L`` is linear in ``theta``. The shift is damped,
``alpha Sigma g`` with ``alpha = q / (q + kappa)``, by the curvature ``kappa`` measured along it
(:meth:`TiltedPredictive.log_weights`). Where the gradient at the point estimate is a poor guide (a wide
posterior of a bilinear ``B A``, a mean-field that also samples ``A``) the tilted draws alone can be worse than
plain Monte Carlo, so :func:`bora.evaluation.evaluate.evaluate_posterior` pools the ``S`` posterior draws it already
runs
and the ``S`` tilted ones as draws from their equal mixture (:func:`mixture_log_mean_exp`, defensive importance
sampling): never much worse than the better of the two, and close to the tilted estimate where it is good.

``eps_s`` are the posterior's own draws (:meth:`bora.posterior.samples.Posterior.params`, the same seeds as everywhere),
shifted per document. The cost: one forward and backward pass for the documents' gradients, one pass along the
shift for ``kappa`` and one more forward pass per draw. Both estimators also return each document's effective
sample size ``(sum_s w_s)^2 / sum_s w_s^2``: close to the number of draws where the weights are even, near 1
where the estimate rests on one draw. Validated against closed forms (a quadratic log-likelihood) and against
plain Monte Carlo with thousands of draws on tiny LMs (``tests/test_tilted.py``).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from .metrics import log_mean_exp

__all__ = ["tilted_log_mean_exp", "mixture_log_mean_exp", "tilted_bma_loglik", "TiltedPredictive", "unsupported",
           "task_covariance"]


def tilted_log_mean_exp(ll: torch.Tensor, lin: torch.Tensor, quad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log p(d) estimates [n], effective sample sizes [n])`` from draws of the tilted proposal.

    ``ll [S, n]``: each document's log-likelihood at ``theta_hat + Sigma g + eps_s``; ``lin [S, n]``: ``g^T eps_s``;
    ``quad [n]``: ``g^T Sigma g``. Float64."""
    _check_shapes(ll, lin, quad)
    x = ll.double() - lin.double()
    return log_mean_exp(x, 0) - 0.5 * quad.double(), _ess(x)


def _check_shapes(ll: torch.Tensor, lin: torch.Tensor, quad: torch.Tensor) -> None:
    if ll.dim() != 2 or ll.shape != lin.shape or quad.shape != ll.shape[1:]:
        raise ValueError("ll and lin must be [S, n] and quad [n]")


def _ess(x: torch.Tensor) -> torch.Tensor:
    """Effective sample size ``(sum_s w_s)^2 / sum_s w_s^2`` of log-weights ``x [S, n]``, per column."""
    return (2 * torch.logsumexp(x, 0) - torch.logsumexp(2 * x, 0)).exp()


def mixture_log_mean_exp(ll_post: torch.Tensor, ll_tilt: torch.Tensor, lin: torch.Tensor,
                         quad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log p(d) estimates [n], effective sample sizes [n])`` from ``S`` posterior draws and ``S`` tilted draws
    with the same ``eps_s``, weighted as draws from the equal mixture of the posterior and the tilted proposal
    (defensive importance sampling, the balance heuristic).

    ``ll_post [S, n]``: log-likelihoods at ``theta_hat + eps_s``; ``ll_tilt [S, n]`` at ``theta_hat + alpha Sigma g
    + eps_s``; ``lin [S, n] = alpha g^T eps_s``; ``quad [n] = alpha^2 g^T Sigma g``. With
    ``r = log q/p = alpha g^T (theta - theta_hat) - quad / 2``, a draw's weight is
    ``p(d | theta) / (1/2 + e^r / 2)``. Float64."""
    if ll_post.shape != ll_tilt.shape:
        raise ValueError("ll_post and ll_tilt must both be [S, n]")
    _check_shapes(ll_tilt, lin, quad)
    half = 0.5 * quad.double()
    r_post, r_tilt = lin.double() - half, lin.double() + half
    x = torch.cat([ll_post.double() - torch.logaddexp(torch.zeros_like(r_post), r_post),
                   ll_tilt.double() - torch.logaddexp(torch.zeros_like(r_tilt), r_tilt)]) + math.log(2.0)
    return log_mean_exp(x, 0), _ess(x)


def unsupported(post) -> Optional[str]:
    """Why the tilted estimator cannot serve ``post`` (a :class:`~bora.posterior.samples.Posterior`), or ``None``."""
    lap = post.laplace
    if post.is_point:
        return "it needs a posterior (a Laplace or a centred mean-field one); a MAP fit has only its point estimate"
    if not post.model.has_tasks:
        return "the fit has no task-level adapters"
    if lap is not None:
        if not all(isinstance(t, list) or 0 <= t < float("inf") for t in lap.tau.values()):  # a list: per task
            return "the fit has no task-level adapters"
        if lap.has_global and lap.sample_global:
            return "the Laplace posterior samples the global adapter too (its tasks' draws are then correlated)"
        return None
    if post.model.parameterisation != "centred":
        return (f"a mean-field posterior must be centred (this one is {post.model.parameterisation!r}: a task "
                "adapter is then not one Gaussian site)")
    return None


def task_covariance(post) -> tuple[list[tuple[str, int]], Callable[[int, torch.Tensor], torch.Tensor]]:
    """``(layout, cov_times)`` of ``post``'s Gaussian over a task's adapter coordinates: the ``(key, factor)`` blocks
    of a task's vector and ``cov_times(t, G) = Sigma_t G`` (``G [P, n]``, float64): the Laplace posterior's
    (:meth:`bora.posterior.laplace.HierarchicalLaplace.task_cov_times`), or a centred mean-field guide's
    ``diag(scale^2)``
    (its task sites are independent of every other site)."""
    lap = post.laplace
    if lap is not None:
        return lap.layout(), lap.task_cov_times
    from torch.distributions import transform_to

    from ..model.guides import guide_params

    model, guide = post.model, post.bora.guide
    params = guide_params(guide)
    positive = transform_to(guide.scale_constraint)
    layout, var = [], []
    for key in model.shapes:
        for i, site, _ in model.task_sites(key):
            layout.append((key, i))
            var.append(positive(params[site]["scale"].detach()).double().cpu().flatten(1).square())
    var = torch.cat(var, 1)  # [T, P]

    def cov_times(t: int, G: torch.Tensor) -> torch.Tensor:
        return G.double() * var[t][:, None]

    return layout, cov_times


class TiltedPredictive:
    """Per batch of documents, the tilted draws' log-weights of :func:`tilted_log_mean_exp` under ``post``."""

    def __init__(self, post):
        reason = unsupported(post)
        if reason is not None:
            raise ValueError(f"the tilted document-level estimator does not apply: {reason}")
        self.post, self.model = post, post.model
        self.layout, self.cov_times = task_covariance(post)
        self.point = post.point_params()

    @staticmethod
    def _rows(params, tids: torch.Tensor) -> dict[str, list[torch.Tensor]]:
        """Every document's own copy of its task's adapters (leading dim: the batch's rows)."""
        return {k: [x[tids] if x.dim() == 3 else x for x in pair] for k, pair in params.items()}

    def _flat(self, rows: dict) -> torch.Tensor:
        return torch.cat([rows[k][i].flatten(1).double().cpu() for k, i in self.layout], 1)

    def gradients(self, batch: dict, tids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log-likelihoods [n], gradients [n, P])`` of every document with respect to its task's coordinates at
        the point estimate (in the Laplace posterior's layout), from one batched backward pass: every row gets
        its own copy of the adapter, so the gradient of the summed log-likelihood is per document."""
        rows = self._rows(self.point, tids)
        leaves = []
        for k, i in self.layout:
            rows[k][i] = rows[k][i].detach().clone().requires_grad_(True)
            leaves.append(rows[k][i])
        with torch.enable_grad():
            ll = self.model.loglik(self._own_rows(batch), {k: tuple(v) for k, v in rows.items()})
            grads = torch.autograd.grad(ll.sum(), leaves, allow_unused=True)
        g = {k: [None, None] for k in rows}
        for (k, i), gr, leaf in zip(self.layout, grads, leaves):
            g[k][i] = torch.zeros_like(leaf) if gr is None else gr
        return ll.detach().double().cpu(), self._flat(g)

    @staticmethod
    def _own_rows(batch: dict) -> dict:
        n = batch["input_ids"].shape[0]
        return dict(batch, task_ids=torch.arange(n, device=batch["input_ids"].device))

    def _loglik(self, own: dict, tids: torch.Tensor, params, direction, shift: dict) -> torch.Tensor:
        """Each document's log-likelihood at its task's ``(params, direction)`` (a sample's predictive arguments)
        moved by its own ``shift`` (added to the sampled adapter, or to the direction of the linearised one)."""
        p = self._rows(params, tids)
        d = None if direction is None else self._rows(direction, tids)
        target = p if d is None else d
        for (key, i), s in shift.items():
            target[key][i] = target[key][i] + s.to(target[key][i].device, target[key][i].dtype)
        return self.model.loglik(own, {key: tuple(v) for key, v in p.items()},
                                 None if d is None else {key: tuple(v) for key, v in d.items()}).double().cpu()

    def log_weights(self, batch: dict, samples: range) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(ll [S, n], lin [S, n], quad [n])`` of :func:`tilted_log_mean_exp` for the batch's documents, one row
        per posterior sample ``k`` in ``samples``: the sample's own draw ``eps_k`` shifted by ``alpha Sigma g``,
        ``lin = alpha g^T eps_k`` and ``quad = alpha^2 g^T Sigma g``.

        ``alpha = q / (q + kappa)`` per document damps the tilt by the curvature ``kappa`` of the log-likelihood
        along the shift ``u = Sigma g``, measured with one more pass at ``theta_hat + u``:
        ``kappa = 2 (L(theta_hat) + q - L(theta_hat + u))``, ``q = g^T Sigma g`` (``alpha = 1`` where ``L`` is linear).
        For a log-likelihood quadratic along ``u`` this is the mean of the exactly tilted posterior in that
        direction; it depends on the document only, not on the draws, so the estimate of ``p(d)`` stays unbiased."""
        tids = batch["task_ids"]
        ll0, G = self.gradients(batch, tids)
        SG = torch.empty_like(G)
        tcpu = tids.cpu()
        for t in tcpu.unique().tolist():
            m = tcpu == t
            SG[m] = self.cov_times(t, G[m].T).T
        quad = (G * SG).sum(1)
        sizes = [self.point[k][i].shape[-2:].numel() for k, i in self.layout]

        def as_shift(flat: torch.Tensor) -> dict:
            return {ki: piece.reshape(len(tids), *self.point[ki[0]][ki[1]].shape[-2:]).float()
                    for ki, piece in zip(self.layout, flat.split(sizes, 1))}

        own = self._own_rows(batch)
        linear = self.post.predictive == "linear"
        zero = {k: tuple(torch.zeros_like(x) for x in pair) for k, pair in self.point.items()} if linear else None
        kappa = 2 * (ll0 + quad - self._loglik(own, tids, self.point, zero, as_shift(SG)))
        alpha = torch.where(quad > 0, quad / (quad + kappa.clamp_min(0)).clamp_min(1e-300), 1.0)
        shift = as_shift(SG * alpha[:, None])
        point_rows = self._flat(self._rows(self.point, tids))
        lls, lins = [], []
        for k in samples:
            lls.append(self._loglik(own, tids, *self.post.predictive_args(k), shift))
            eps = self._flat(self._rows(self.post.params(k), tids)) - point_rows
            lins.append(alpha * (G * eps).sum(1))
        return torch.stack(lls), torch.stack(lins), alpha.square() * quad


@torch.no_grad()
def tilted_bma_loglik(post, feed, batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log p(d) [N], effective sample sizes [N])``: every document's document-level BMA under ``post`` by
    :func:`mixture_log_mean_exp` (its ``S`` samples and ``S`` tilted copies), without the token-level metrics of
    :func:`bora.evaluation.evaluate.evaluate_posterior`. ``feed``: a :class:`~bora.data.feed.Feed` of the documents."""
    tp = TiltedPredictive(post)
    S, n = post.num_samples, len(feed)
    t_ll, t_lin = torch.zeros(S, n, dtype=torch.float64), torch.zeros(S, n, dtype=torch.float64)
    t_quad = torch.zeros(n, dtype=torch.float64)
    order = torch.argsort(feed.split.lengths, stable=True)
    for i in range(0, n, batch_size):
        idx = order[i:i + batch_size]
        t_ll[:, idx], t_lin[:, idx], t_quad[idx] = tp.log_weights(feed.batch(idx), range(S))
    return mixture_log_mean_exp(post.doc_loglik(feed, batch_size).double(), t_ll, t_lin, t_quad)
