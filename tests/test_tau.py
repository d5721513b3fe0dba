"""Empirical-Bayes tau (bora.tau): the evidence update against the normal-normal truth and its limits."""
import math

import pytest
import torch

from bora.fit.tau import evidence_tau


def _em(y, F, tau=1000.0, iters=60):
    for _ in range(iters):
        d = F * y / (F + tau)  # the MAP deviation given tau (exact in the normal-normal model)
        tau = evidence_tau(d.square().sum(), F)
    return tau


def test_evidence_tau_recovers_truth_and_limits():
    g = torch.Generator().manual_seed(0)
    n = 10000
    F = torch.rand(n, generator=g) * 400 + 10
    for tau in (3.0, 100.0, 1000.0):
        y = torch.randn(n, generator=g) * (1 / tau + 1 / F).sqrt()
        assert _em(y, F, iters=100) == pytest.approx(tau, rel=0.15)
    # tasks that differ only by noise -> very strong pooling; huge differences -> weak pooling
    y = torch.randn(n, generator=g) * (1 / F).sqrt()
    assert _em(y, F, iters=100) > 10 * float(F.max())  # lambda = tau / (tau + F) > 0.9 everywhere
    y = torch.randn(n, generator=g) * 10.0
    assert _em(y, F) == pytest.approx(0.01, rel=0.1)
    # coordinates the data do not inform (F = 0) do not count
    assert evidence_tau(torch.tensor(2.0), torch.cat([F[:100], torch.zeros(10000)])) == pytest.approx(
        evidence_tau(torch.tensor(2.0), F[:100]), rel=1e-6)


def test_integrated_evidence_update_has_the_exact_theta_integrated_tau_as_its_fixed_point():
    """At the exact posterior mode for the exact Theta-integrated type-II tau, the integrated update returns that
    tau (a fixed point), and the profiled update, a larger one (it counts Theta's coordinates as the tasks')."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from gaussian import exact_posterior, integrated_type_two_tau, make_problem

    sizes = [4 * n for n in (3, 3, 6, 10, 11, 12, 12, 14, 16, 16, 20, 23, 28, 30, 54, 72)]
    _, _, truth = make_problem(sizes, tau=100.0)
    tau_star = integrated_type_two_tau(truth)[0]
    ex = exact_posterior(truth, tau_star)
    S = float((ex["theta_mean"] - ex["Theta_mean"]).square().sum())
    F = ex["F"].expand_as(ex["theta_mean"]).reshape(len(sizes), -1)
    integrated = evidence_tau(S, F, 1.0, 1e-4, global_precision=truth["s"] ** -2)
    assert integrated == pytest.approx(tau_star, rel=0.01)  # the grid's resolution
    assert evidence_tau(S, F, 1.0, 1e-4) > 1.05 * tau_star
    with pytest.raises(ValueError, match="tasks, coordinates"):
        evidence_tau(S, F.flatten(), global_precision=1.0)


def test_point_guides_refuse_several_particles():
    """A point guide's particles are all the same draw; the steps' curvature would count a document p times."""
    from bora.core.config import ConfigError, FitConfig

    for guide in ("map", "laplace"):
        with pytest.raises(ConfigError, match="num_particles > 1 needs guide='meanfield'"):
            FitConfig(guide=guide, num_particles=2)
    assert FitConfig(guide="meanfield", num_particles=2).num_particles == 2


def _dense_terms(Fs, tau, g):
    """gamma, sum log det(1 + F_t/tau), and log det P - D log g with its log-tau derivative, by dense algebra."""
    D = Fs[0].shape[0]
    eye = torch.eye(D, dtype=torch.float64)
    gamma = sum(float(torch.trace(F @ torch.linalg.inv(F + tau * eye))) for F in Fs)
    vol = sum(float(torch.logdet(eye + F / tau)) for F in Fs)

    def logdet_P(t):
        P = g * eye + sum(t * F @ torch.linalg.inv(F + t * eye) for F in Fs)
        return float(torch.logdet(P)) - D * math.log(g)
    h = 1e-5
    return gamma, vol, logdet_P(tau), (logdet_P(tau * math.exp(h)) - logdet_P(tau * math.exp(-h))) / (2 * h)


def test_lowrank_curvature_against_dense_algebra():
    """A rank-50 Fisher in 400 dimensions per task (the review's case): gamma, the volume term and the global
    adapter's log-determinant and gamma_Theta equal the dense matrices' values, and the diagonal's gamma is far
    larger than the full curvature's."""
    from bora.fit.tau import LowRankCurvature

    g = torch.Generator().manual_seed(0)
    Gs = [torch.randn(400, 50, generator=g, dtype=torch.float64) * s for s in (0.5, 1.0, 2.0)]
    Fs = [G @ G.T for G in Gs]
    curv = LowRankCurvature(Gs)
    for tau in (1.0, 30.0, 500.0):
        gamma, vol, logdet, gamma_theta = _dense_terms(Fs, tau, 2.0)
        assert curv.gamma(tau) == pytest.approx(gamma, rel=1e-8)
        assert curv.log_volume(tau) == pytest.approx(vol, rel=1e-8)
        got = curv.global_terms(tau, 2.0)
        assert got[0] == pytest.approx(logdet, rel=1e-7) and got[1] == pytest.approx(gamma_theta, rel=1e-5)
        assert curv.gamma(tau) <= 150 + 1e-9
    diag_gamma = sum(float((torch.diagonal(F) / (torch.diagonal(F) + 30.0)).sum()) for F in Fs)
    assert diag_gamma > 3 * curv.gamma(30.0)


@pytest.mark.parametrize("g", [None, 1.0])
def test_lowrank_tau_equals_the_diagonal_one_on_a_diagonal_fisher(g):
    """Gradient columns along coordinate axes make every F_t diagonal: the low-rank tau (profiled and with the
    global adapter integrated out) is then the diagonal estimator's."""
    from bora.fit.tau import LowRankCurvature, evidence_tau_lowrank

    gen = torch.Generator().manual_seed(1)
    T, M = 4, 30
    F = torch.rand(T, M, generator=gen, dtype=torch.float64) * 50
    F[F < 15] = 0.0  # each task determines some of the coordinates only
    Gs = [torch.diag(F[t].sqrt())[:, F[t] > 0] for t in range(T)]
    S = 0.4
    want = evidence_tau(S, F, 1.0, 1e-4, global_precision=g)
    got = evidence_tau_lowrank(S, LowRankCurvature(Gs), 1.0, 1e-4, global_precision=g)
    assert got == pytest.approx(want, rel=1e-6)
