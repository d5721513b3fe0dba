"""bora's model, fit loop, tau estimator and posteriors against closed-form answers of the linear-Gaussian
hierarchy (``tests/gaussian.py``: the LM likelihood replaced by ``y_d ~ Normal(B_t, sigma^2)``)."""

import math

import numpy as np
import pytest
import torch

from bora.core.config import FitConfig
from bora.fit.fisher import task_fisher
from bora.model.guides import make_guide, point_values
from bora.fit.loop import fit
from bora.posterior.laplace import HierarchicalLaplace
from bora.fit.tau import EmpiricalBayesTau

from gaussian import exact_posterior, integrated_type_two_tau, make_problem, profile_log_evidence, type_two_tau

SIZES = [int(x) for x in np.linspace(4, 60, 24)]


def _map_fit(model, feed, cfg, tau=None):
    guide = make_guide(model, "map", target=tau.model if tau is not None else None)
    res = fit(model, guide, feed, None, cfg, tau=tau, progress=False)
    point = model.complete({**point_values(guide), **(tau.values if tau is not None else {})})
    return guide, res, point


@pytest.mark.parametrize("parameterisation", ["noncentred", "offset", "centred"])
def test_fit_recovers_type_two_tau_with_theta_estimated(parameterisation):
    """The fit loop's alternation (optimiser steps at fixed tau, Laplace-evidence update at each validation)
    lands on the maximiser of the exact marginal likelihood with Theta estimated (profiled, the default)."""
    model, feed, truth = make_problem(SIZES, tau=4.0, mode="learned", tau_init=100.0, parameterisation=parameterisation)
    tau = EmpiricalBayesTau(model)
    cfg = FitConfig(steps=900, lr=0.05, batch_size=64, eval_every=75, patience=0, fisher_docs=10_000, warmup=0.0,
                    tau_curvature="pass")  # the stand-in likelihood bypasses the adapter layers
    _, res, _ = _map_fit(model, feed, cfg, tau)
    exact, _, _ = type_two_tau(truth)
    got = res.tau["tau"]
    print(f"type-II tau: exact {exact:.3f}, bora {got:.3f} (true {truth['tau']})")
    assert got == pytest.approx(exact, rel=0.10)
    # every recorded update increased (or kept) the evidence once the inner fit settled
    ev = [h["log_evidence"]["tau"] for h in res.history if "log_evidence" in h]
    assert len(ev) >= 10 and ev[-1] >= ev[len(ev) // 2] - 1.0


def test_fixed_tau_map_is_the_exact_posterior_mean_and_laplace_its_covariance():
    T = len(SIZES)
    model, feed, truth = make_problem(SIZES, tau=4.0, mode="fixed")
    cfg = FitConfig(steps=600, lr=0.05, batch_size=len(feed), eval_every=600, patience=0, warmup=0.0)
    _, _, point = _map_fit(model, feed, cfg)  # full batches: the exact MAP
    ex = exact_posterior(truth, 4.0)
    key = model.key
    B = point[f"theta_B:{key}"].double()
    G = point[f"Theta_B:{key}"].double()
    assert ((B - ex["theta_mean"]) / ex["theta_sd"]).abs().max() < 0.02
    assert ((G - ex["Theta_mean"]) / ex["Theta_sd"]).abs().max() < 0.15  # Adam jitter at the final lr
    # Laplace with the exact curvature F = n / sigma^2 reproduces the exact marginal posterior sds
    F = ex["F"].expand(T, *B.shape[1:]).float()
    lap = HierarchicalLaplace({key: {1: F}}, {key: 4.0}, global_scale=truth["s"], has_global=True)
    g = torch.Generator().manual_seed(0)
    exact_point = {**point, f"theta_B:{key}": ex["theta_mean"].float(), f"Theta_B:{key}": ex["Theta_mean"].float()}
    draws = torch.stack([lap.sample(model, exact_point, g)[f"theta_B:{key}"] for _ in range(4000)]).double()
    sd_ratio = (draws.std(0) / ex["theta_sd"]).mean((1, 2))  # per task, averaged over its 64 coordinates
    mean_err = ((draws.mean(0) - ex["theta_mean"]) / ex["theta_sd"]).abs().mean()
    assert sd_ratio.sub(1).abs().max() < 0.02, sd_ratio
    assert mean_err < 0.05


def test_laplace_intervals_are_calibrated_over_prior_replicates():
    """Simulation-based calibration: 120 data sets drawn from the prior; the Laplace posterior's 50% and 90%
    intervals of every task coordinate cover the true value at their nominal rates (within 5 points)."""
    cover = {0.5: [], 0.9: []}
    sizes = [2, 5, 10, 20, 40]
    for rep in range(120):
        model, _, truth = make_problem(sizes, tau=4.0, global_scale=0.5, seed=1000 + rep)
        ex = exact_posterior(truth, 4.0)  # the MAP of a Gaussian model: its exact posterior mean
        key = model.key
        F = ex["F"].expand(len(sizes), *ex["theta_mean"].shape[1:]).float()
        lap = HierarchicalLaplace({key: {1: F}}, {key: 4.0}, global_scale=truth["s"], has_global=True)
        point = {f"theta_B:{key}": ex["theta_mean"].float(), f"Theta_B:{key}": ex["Theta_mean"].float()}
        g = torch.Generator().manual_seed(rep)
        draws = torch.stack([lap.sample(model, point, g)[f"theta_B:{key}"] for _ in range(200)])
        add_coverage_(cover, draws, truth["theta"])
    assert_nominal_coverage(cover, "Laplace")


def add_coverage_(cover: dict, draws: torch.Tensor, truth: torch.Tensor) -> None:
    """Append to ``cover[level]`` the fraction of coordinates whose central ``level`` interval of ``draws`` holds
    the true value."""
    for level in cover:
        lo, hi = torch.quantile(draws, torch.tensor([(1 - level) / 2, (1 + level) / 2]), dim=0)
        cover[level].append(((truth >= lo) & (truth <= hi)).float().mean())


def assert_nominal_coverage(cover: dict, name: str) -> None:
    """Every level's mean coverage over the replicates is within 5 points of the level."""
    for level, c in cover.items():
        rate = float(torch.stack(c).mean())
        print(f"{name} {int(level * 100)}% interval coverage: {rate:.3f}")
        assert abs(rate - level) < 0.05


def exact_tau_posterior(truth, grid, a=1.0, b=1e-4):
    """Normalised posterior density of tau on ``grid`` (Theta and every theta_t integrated out exactly)."""
    n, ybar, sigma, s = truth["n"], truth["ybar"], truth["sigma"], truth["s"]
    logp = []
    Y = ybar.flatten(1)  # [T, D]
    for t in grid:
        v = (1.0 / t + sigma ** 2 / n)  # [T]
        # cov = diag(v) + s^2 11^T per coordinate: Sherman-Morrison for the quadratic form and log det
        w = 1.0 / v
        c = s ** 2 / (1 + s ** 2 * w.sum())
        quad = (Y.square() * w.view(-1, 1)).sum(0) - c * (w.view(-1, 1) * Y).sum(0).square()
        logdet = torch.log(v).sum() + math.log(1 + s ** 2 * float(w.sum()))
        logp.append(float((-0.5 * quad).sum() - 0.5 * Y.shape[1] * logdet) + (a - 1) * math.log(t) - b * t)
    logp = np.array(logp)
    p = np.exp(logp - logp.max()) * grid  # density in log tau
    return p / p.sum()


def test_meanfield_with_bora_defaults_learns_scales_and_tau():
    """The mean-field guide in bora's loop with its default learning rates and initial scales, tau by
    variational EM (centred form, as ``parameterisation='auto'`` picks for mean-field): posterior sds of
    the task adapters within 20% of the exact ones; tau near the exact posterior (mean-field VI ignores the
    posterior correlation between tau and the adapters, so it is not exact: within 30% of the median)."""
    model, feed, truth = make_problem(SIZES, tau=4.0, mode="learned", tau_init=100.0, parameterisation="centred")
    tau = EmpiricalBayesTau(model)
    guide = make_guide(model, "meanfield", target=tau.model)
    cfg = FitConfig(guide="meanfield", steps=2000, batch_size=64, eval_every=2000, patience=0)
    fit(model, guide, feed, None, cfg, tau=tau, progress=False)
    grid = np.exp(np.linspace(math.log(0.1), math.log(1e3), 1500))
    cdf = np.cumsum(exact_tau_posterior(truth, grid))
    lo, med, hi = (grid[np.searchsorted(cdf, q)] for q in (0.05, 0.5, 0.95))
    tau_q = tau.as_dict()["tau"]
    with torch.no_grad():
        draws = torch.stack([model.complete(guide())[f"theta_B:{model.key}"] for _ in range(400)]).double()
    ex = exact_posterior(truth, tau_q)
    ratio = float((draws.std(0) / ex["theta_sd"]).median())
    print(f"mean-field tau {tau_q:.3f} (exact median {med:.3f}, 90% interval [{lo:.3f}, {hi:.3f}]); "
          f"sd ratio (median) {ratio:.3f}")
    assert abs(tau_q / med - 1) < 0.3
    assert abs(ratio - 1) < 0.2


def test_task_fisher_equals_a_per_document_autograd_loop():
    model, feed, truth = make_problem([6, 3, 9], tau=4.0)
    guide = make_guide(model, "map")
    guide(feed.batch(torch.arange(2)))
    params = model.params_from_values(point_values(guide))
    params = {k: (A, B + 0.3) for k, (A, B) in params.items()}
    gen = torch.Generator().manual_seed(0)
    tf = task_fisher(model, params, feed, max_per_task=4, generator=gen)
    # reference: the same subsample, one autograd call per document, scaled by n_t / used_t
    gen = torch.Generator().manual_seed(0)
    from bora.data.batching import distinct_task_batches

    rows = torch.cat(list(distinct_task_batches(feed.split, 4, generator=gen)))
    key = model.key
    A, B = params[key]
    ref = torch.zeros_like(B)
    for d in rows.tolist():
        Bl = B.detach().clone().requires_grad_(True)
        ll = model.loglik(feed.batch(torch.tensor([d])), {key: (A, Bl)}).sum()
        ref += torch.autograd.grad(ll, Bl)[0].square()
    sizes = torch.tensor([6.0, 3.0, 9.0])
    used = torch.tensor([4.0, 3.0, 4.0])
    torch.testing.assert_close(tf.fisher[key][1], ref * (sizes / used).view(-1, 1, 1))
    assert tf.used.tolist() == [4, 3, 4]


# 16 tasks as unequal as the embedded default's training sets (3 to 72 documents), 4 documents for each of
# those (the empirical Fisher of a 3-document task is too noisy for a 5% check)
SIZES16 = [4 * n for n in (3, 3, 6, 10, 11, 12, 12, 14, 16, 16, 20, 23, 28, 30, 54, 72)]


def test_fit_recovers_the_theta_integrated_tau_with_16_unequal_tasks():
    """With few tasks, holding Theta at its estimate (profiling) biases tau toward pooling; with
    ``tau_evidence='integrated'`` bora integrates Theta out (REML-type evidence) and lands within 5% of the exact
    type-II tau, which the profiled objective misses by more than 5%."""
    model, feed, truth = make_problem(SIZES16, tau=100.0, mode="learned", tau_init=100.0, parameterisation="offset",
                                      tau_evidence="integrated")
    integrated, _, _ = integrated_type_two_tau(truth)
    profiled, _, _ = type_two_tau(truth)
    assert abs(profiled / integrated - 1) > 0.05  # the test can tell the two objectives apart
    tau = EmpiricalBayesTau(model)
    cfg = FitConfig(steps=2400, lr=0.05, batch_size=128, eval_every=100, patience=0, fisher_docs=10_000,
                    warmup=0.0, tau_curvature="pass")
    _, res, _ = _map_fit(model, feed, cfg, tau)
    got = res.tau["tau"]
    print(f"type-II tau: integrated {integrated:.3f}, profiled {profiled:.3f}, bora {got:.3f}")
    assert got == pytest.approx(integrated, rel=0.05)


def test_profile_evidence_peaks_near_the_true_tau_with_many_tasks():
    """Sanity of the reference itself: with 200 tasks the type-II estimate is close to the truth."""
    _, _, truth = make_problem([20] * 200, tau=4.0)
    exact, _, _ = type_two_tau(truth)
    assert exact == pytest.approx(4.0, rel=0.15)
    assert profile_log_evidence(truth, exact) > profile_log_evidence(truth, 40.0)


def _heldout_loglik(model, point, truth, n_new=200, seed=99):
    """Mean held-out log-likelihood per task of fresh documents y ~ N(theta_t, sigma^2), under the fitted B_t."""
    g = torch.Generator().manual_seed(seed)
    B = model.params_from_values(point)[model.key][1].detach().double()
    T = truth["theta"].shape[0]
    if B.dim() == 2:
        B = B.expand(T, *B.shape)
    y = truth["theta"].double().unsqueeze(1) + truth["sigma"] * torch.randn(T, n_new, *B.shape[1:], generator=g,
                                                                            dtype=torch.float64)
    return float((-0.5 * (y - B.unsqueeze(1)).square().sum((-2, -1)) / truth["sigma"] ** 2).mean())


def test_synthetic_truth_hierarchy_beats_both_limits_and_tau_follows_the_spread():
    """Synthetic truth: 8 tasks of unequal size drawn around a shared adapter with precision ``spread``. The
    learned-tau fit predicts held-out documents better than the independent fit and, unless the tasks are
    nearly identical, than the shared fit; its tau rises with the true spread's precision."""
    sizes = [2, 3, 4, 6, 8, 12, 16, 24]
    cfg = FitConfig(steps=600, lr=0.05, batch_size=32, eval_every=50, patience=0, fisher_docs=10_000, warmup=0.0,
                    tau_curvature="pass")  # the stand-in likelihood bypasses the adapter layers
    learned_tau = []
    for spread in (1.0, 4.0, 400.0):
        scores = {}
        for mode in ("uncoupled", "shared", "learned"):
            model, feed, truth = make_problem(sizes, tau=spread, sigma=2.0, mode=mode, tau_init=10.0, seed=7)
            tau = EmpiricalBayesTau(model) if mode == "learned" else None
            _, res, point = _map_fit(model, feed, cfg, tau)
            scores[mode] = _heldout_loglik(model, point, truth)
        learned_tau.append(res.tau["tau"])
        print(f"spread {spread}: held-out loglik {scores}, learned tau {learned_tau[-1]:.3g}")
        assert scores["learned"] > scores["uncoupled"]
        if spread < 100:
            assert scores["learned"] > scores["shared"]
        else:  # nearly identical tasks: the data prefer pooling; learned is within 0.1% of shared
            assert scores["learned"] > scores["shared"] - 1e-3 * abs(scores["shared"])
    assert learned_tau[0] < learned_tau[1] < learned_tau[2]


@pytest.mark.slow
def test_meanfield_intervals_are_calibrated_over_prior_replicates():
    """Simulation-based calibration of the mean-field posterior, fitted by bora's loop with its default learning
    rates (tau fixed at the truth, centred sites): over 100 data sets drawn from the prior, the 50% and 90%
    intervals of every task coordinate cover the true value at their nominal rates within 5 points. (Mean-field
    drops the posterior correlation between a task and the global adapter, so its intervals of a small task are
    a little narrow: measured 0.466 and 0.866, 8.5 min on 2 cores; ``pytest -m slow``.)"""
    cover = {0.5: [], 0.9: []}
    sizes = [2, 5, 10, 20, 40]
    for rep in range(100):
        model, feed, truth = make_problem(sizes, tau=4.0, global_scale=0.5, seed=2000 + rep,
                                          parameterisation="centred")
        guide = make_guide(model, "meanfield")
        fit(model, guide, feed, None, FitConfig(guide="meanfield", steps=1500, batch_size=len(feed),
                                                eval_every=1500, patience=0), progress=False)
        with torch.no_grad():
            draws = torch.stack([model.complete(guide())[f"theta_B:{model.key}"] for _ in range(200)])
        add_coverage_(cover, draws, truth["theta"])
    assert_nominal_coverage(cover, "mean-field")


def _shipped_coverage(reps: int, sizes, *, tau_evidence: str = "profiled", sample_global: bool = False,
                      seed0: int = 3000) -> tuple[dict, list]:
    """Coverage of the Laplace posterior as fits ship it: tau learned by the fit loop's evidence updates, Theta
    held at its MAP estimate (``laplace_from_point``'s default), the curvature the empirical Fisher of the
    documents at the MAP (``task_fisher``), 200 draws per replicate; data drawn at tau = 4."""
    from bora.posterior.laplace import laplace_from_point

    cover, taus = {0.5: [], 0.9: []}, []
    cfg = FitConfig(steps=300, lr=0.05, batch_size=64, eval_every=50, patience=0, fisher_docs=10_000, warmup=0.0,
                    tau_curvature="pass")
    for rep in range(reps):
        model, feed, truth = make_problem(sizes, tau=4.0, global_scale=0.5, seed=seed0 + rep, mode="learned",
                                          tau_init=100.0, parameterisation="offset", tau_evidence=tau_evidence)
        tau = EmpiricalBayesTau(model)
        _, res, point = _map_fit(model, feed, cfg, tau)
        taus.append(res.tau["tau"])
        tf = task_fisher(model, model.params_from_values(point), feed)
        lap = laplace_from_point(model, tf, model.tau_by_key(point), sample_global=sample_global)
        g = torch.Generator().manual_seed(rep)
        draws = torch.stack([lap.sample(model, point, g)[f"theta_B:{model.key}"] for _ in range(200)])
        add_coverage_(cover, draws, truth["theta"])
    return cover, taus


@pytest.mark.slow
@pytest.mark.parametrize("tau_evidence", [
    pytest.param("profiled", marks=pytest.mark.xfail(strict=True, reason=(
        "measured: 50%/90% coverage 0.448/0.837 over 12 replicates, tau median 6.2 against the true 4 (the "
        "profiled evidence leans toward pooling with 8 tasks, so the intervals are too narrow)"))),
    "integrated"])
def test_shipped_laplace_pipeline_is_calibrated_over_prior_replicates(tau_evidence):
    """Simulation-based calibration of the pipeline fits ship (issue 24, finding 8), not of the exact posterior:
    tau learned by the evidence updates, Theta at its estimate, the estimated curvature; 40 data sets of 8 tasks
    (2 to 40 documents). With Theta integrated out of tau's evidence (``tau_evidence='integrated'``) the intervals
    cover at their nominal rates (measured over these 40 replicates: 0.488 and 0.875, tau median 4.76); the
    profiled evidence does not (12 replicates: 0.448 and 0.837, tau median 6.2)."""
    cover, taus = _shipped_coverage(40, [2, 3, 5, 8, 12, 20, 30, 40], tau_evidence=tau_evidence)
    print(f"learned tau over replicates: median {np.median(taus):.2f} (true 4)")
    assert_nominal_coverage(cover, f"shipped Laplace ({tau_evidence})")
