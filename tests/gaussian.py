"""A linear-Gaussian stand-in for the LM likelihood, so that bora's own model, guides and fit loop can be
checked against closed-form answers.

Task ``t`` has ``n_t`` documents; document ``d`` observes ``y_d ~ Normal(B_t, sigma^2)`` (every entry of the
task's ``B`` of one adapted module), with the hierarchical prior ``B_t ~ Normal(Theta_B, 1/tau)``,
``Theta_B ~ Normal(0, s^2)``. Only the likelihood is replaced (:class:`GaussianModel` overrides
``loglik``); priors, reparameterisation, guides, Fisher, tau updates and the optimiser are bora's.
"""

import math

import numpy as np
import torch

from bora.core.config import AdapterConfig, PriorConfig
from bora.data.documents import TokenizedSplit
from bora.data.feed import Feed
from bora.lora.inject import inject_adapters_
from bora.model.hierarchy import BoraModel

from conftest import tiny_llama


class GaussianModel(BoraModel):
    def __init__(self, lm, adapters, tasks, Y, task_ids, sigma, prior):
        super().__init__(lm, adapters, tasks, len(task_ids), prior)
        self.Y, self.doc_task, self.sigma = Y, task_ids, float(sigma)
        self.key = next(iter(self.shapes))

    def loglik(self, batch, params):
        B = params[self.key][1]
        Bt = B[batch["task_ids"]] if B.dim() == 3 else B
        r = self.Y[batch["index"]] - Bt
        return -0.5 * r.square().sum((-2, -1)) / self.sigma ** 2


def make_problem(n_per_task, *, tau=4.0, sigma=1.0, global_scale=3.0, seed=0, mode="fixed", tau_init=None,
                 parameterisation="noncentred", tau_evidence="profiled"):
    """``(model, feed, truth)``: the stand-in model, a feed of its documents and the true values."""
    g = torch.Generator().manual_seed(seed)
    lm = tiny_llama(layers=1)
    adapters = inject_adapters_(lm, AdapterConfig(rank=2, targets=("q_proj",), layers=(-1,)))
    (_, shape_b), = adapters.shapes().values()
    T = len(n_per_task)
    Theta = torch.randn(shape_b, generator=g) * 0.5
    theta = Theta + torch.randn(T, *shape_b, generator=g) / math.sqrt(tau)
    task_ids = torch.repeat_interleave(torch.arange(T), torch.tensor(n_per_task))
    Y = theta[task_ids] + sigma * torch.randn(len(task_ids), *shape_b, generator=g)
    prior = PriorConfig(tau_mode=mode, tau=float(tau if tau_init is None else tau_init), global_scale=global_scale,
                        tau_shape=1.0, tau_rate=1e-4, parameterisation=parameterisation, tau_evidence=tau_evidence)
    tasks = tuple(f"t{i}" for i in range(T))
    model = GaussianModel(lm, adapters, tasks, Y, task_ids, sigma, prior)
    split = TokenizedSplit([torch.tensor([1, 2])] * len(task_ids), task_ids, tasks)
    feed = Feed(split, pad_id=0, prefix=None)
    n = torch.tensor(n_per_task, dtype=torch.float64)
    ybar = torch.zeros(T, *shape_b, dtype=torch.float64).index_add_(0, task_ids, Y.double()) / n.view(-1, 1, 1)
    truth = {"Theta": Theta, "theta": theta, "ybar": ybar, "n": n, "sigma": sigma, "s": global_scale, "tau": tau}
    return model, feed, truth


def exact_posterior(truth, tau):
    """Exact posterior means and sds of Theta and every theta_t given tau (joint Gaussian)."""
    n, ybar, sigma, s = truth["n"], truth["ybar"], truth["sigma"], truth["s"]
    F = (n / sigma ** 2).view(-1, 1, 1)
    v = 1.0 / tau + 1.0 / F  # marginal variance of ybar_t around Theta
    prec_G = (1.0 / v).sum(0) + 1.0 / s ** 2
    mean_G = (ybar / v).sum(0) / prec_G
    lam = tau / (F + tau)
    mean_t = (F * ybar + tau * mean_G) / (F + tau)
    var_t = 1.0 / (F + tau) + lam ** 2 / prec_G
    return {"Theta_mean": mean_G, "Theta_sd": prec_G.rsqrt(), "theta_mean": mean_t, "theta_sd": var_t.sqrt(), "F": F}


def profile_log_evidence(truth, tau, a=1.0, b=1e-4):
    """``max_Theta log p(ybar | Theta, tau) p(Theta) + log Gamma(tau; a, b)`` (the type-II objective bora targets)."""
    n, ybar, sigma, s = truth["n"], truth["ybar"], truth["sigma"], truth["s"]
    v = (1.0 / tau + sigma ** 2 / n).view(-1, 1, 1)
    G = (ybar / v).sum(0) / ((1.0 / v).sum(0) + 1.0 / s ** 2)
    ll = (-0.5 * (ybar - G).square() / v - 0.5 * torch.log(2 * math.pi * v)).sum()
    lp = (-0.5 * G.square() / s ** 2).sum()
    return float(ll + lp) + (a - 1) * math.log(tau) - b * tau


def type_two_tau(truth, a=1.0, b=1e-4):
    grid = np.exp(np.linspace(math.log(1e-2), math.log(1e4), 2001))
    vals = [profile_log_evidence(truth, float(t), a, b) for t in grid]
    return float(grid[int(np.argmax(vals))]), grid, np.array(vals)


def integrated_log_evidence(truth, tau, a=1.0, b=1e-4):
    """``log p(ybar | tau) + log Gamma(tau; a, b)`` with Theta integrated out exactly (``Theta ~ Normal(0, s^2)``):
    per coordinate ``ybar ~ Normal(0, diag(v) + s^2 11^T)``, ``v_t = 1/tau + sigma^2/n_t`` (the type-II objective
    with nothing profiled)."""
    n, ybar, sigma, s = truth["n"], truth["ybar"], truth["sigma"], truth["s"]
    v = (1.0 / tau + sigma ** 2 / n).view(-1, 1, 1)
    P = (1.0 / v).sum(0)  # [out, r]
    quad = (ybar.square() / v).sum(0) - s ** 2 * (ybar / v).sum(0).square() / (1.0 + s ** 2 * P)
    logdet = torch.log(v).sum(0) + torch.log1p(s ** 2 * P)
    T = ybar.shape[0]
    ll = (-0.5 * quad - 0.5 * logdet - 0.5 * T * math.log(2 * math.pi)).sum()
    return float(ll) + (a - 1) * math.log(tau) - b * tau


def integrated_type_two_tau(truth, a=1.0, b=1e-4):
    grid = np.exp(np.linspace(math.log(1e-2), math.log(1e4), 4001))
    vals = [integrated_log_evidence(truth, float(t), a, b) for t in grid]
    return float(grid[int(np.argmax(vals))]), grid, np.array(vals)
