"""Empirical-Bayes tau (bora.tau): the evidence update against the normal-normal truth and its limits."""

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
