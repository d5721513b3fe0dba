"""Per-task pooling summaries (bora.pooling): normal-normal closed forms, known values, gauge invariance."""

import math

import numpy as np
import pytest
import torch

from bora.diagnostics.pooling import (adapter_norms, delta_w_ratio, effective_parameters, fisher_means, gain_kept,
                                      identified_delta_w, identified_mask, pooling_factor, shrinkage, spearman)


def test_shrinkage_limits_and_broadcasting():
    lam = shrinkage(np.array([[1.0], [4.0]]), np.array([0.0, 1.0, 3.0]))
    np.testing.assert_allclose(lam, [[1.0, 0.5, 0.25], [1.0, 0.8, 4 / 7]])
    assert shrinkage(0.0, [0.0, 2.0]).tolist() == [0.0, 0.0]  # independent
    assert shrinkage(math.inf, [0.0, 2.0, 1e30]).tolist() == [1.0, 1.0, 1.0]  # shared
    with pytest.raises(ValueError):
        shrinkage(-1.0, [1.0])


def test_shrinkage_matches_normal_normal_closed_form():
    """y_tj ~ N(theta_t, s^2), theta_t ~ N(mu, 1/tau): lambda_t = tau / (tau + n_t / s^2).

    F_t is estimated as the empirical Fisher sum_j (d/dtheta log N(y_tj; theta, s^2))^2 at the
    posterior mode (found numerically), exactly as bora.fisher does for adapters.
    """
    g = torch.Generator().manual_seed(0)
    s, mu, tau = 1.5, 0.3, 4000.0
    n = [1000, 5000, 20000, 100000]  # lambda from 0.9 to 0.08
    closed = np.array([tau / (tau + nt / s**2) for nt in n])
    F, post = [], []
    for nt in n:
        theta = mu + torch.randn((), generator=g, dtype=torch.float64) / math.sqrt(tau)
        y = theta + s * torch.randn(nt, generator=g, dtype=torch.float64)
        ybar = float(y.mean())

        def logjoint(th):
            return (torch.distributions.Normal(th, s).log_prob(y).sum()
                    + torch.distributions.Normal(mu, tau ** -0.5).log_prob(th))

        th = torch.tensor(ybar, dtype=torch.float64, requires_grad=True)
        for _ in range(3):  # Newton (exact for this quadratic log density)
            (d1,) = torch.autograd.grad(logjoint(th), th, create_graph=True)
            (d2,) = torch.autograd.grad(d1, th)
            th = (th - d1 / d2).detach().requires_grad_(True)
        per_obs = th.detach().expand(nt).clone().requires_grad_(True)  # one copy per observation
        (gj,) = torch.autograd.grad(torch.distributions.Normal(per_obs, s).log_prob(y).sum(), per_obs)
        F.append(float(gj.square().sum()))
        post.append((float(th.detach()) - ybar) / (mu - ybar))  # exact posterior-mean shrinkage
    lam = shrinkage(tau, F)
    np.testing.assert_allclose(post, closed, rtol=1e-4)  # the mode solver is right
    np.testing.assert_allclose(lam, closed, rtol=0.02)
    np.testing.assert_allclose(lam, post, rtol=0.02)
    assert closed.max() > 0.85 and closed.min() < 0.1  # the test covers strong and weak shrinkage
    assert spearman(n, lam) == -1.0  # more data, less shrinkage


def test_fisher_means_and_norms():
    FA, FB = torch.ones(2, 1, 3), torch.full((2, 4, 1), 2.0)
    FA[1] *= 3
    overall, per_mod, c = fisher_means({"m": (FA, FB)}, ["m"])
    np.testing.assert_allclose(per_mod[:, 0], [(3 + 8) / 7, (9 + 8) / 7])
    np.testing.assert_allclose(overall, per_mod[:, 0])
    assert c.tolist() == [7.0]
    A, B = torch.zeros(2, 1, 3), torch.zeros(2, 4, 1)
    A[0, 0, 0], B[1, 0, 0] = 3.0, 4.0
    dev, glob = adapter_norms({"m": (A, B)}, {"m": (torch.zeros(1, 3), torch.zeros(4, 1))}, ["m"], 2)
    np.testing.assert_allclose(dev[:, 0], [3.0, 4.0])
    dev, glob = adapter_norms({"m": (A, B)}, None, ["m"], 2)  # reference: mean of the task adapters
    np.testing.assert_allclose(dev[:, 0], [2.5, 2.5])
    np.testing.assert_allclose(glob, [2.5])


# ----------------------------------------------------------------------------- per-task pooling summaries
def _newton_normal_normal(y, s, mu, tau):
    """Exact posterior mode and variance of theta_i in y_ij ~ N(theta_i, s_i^2), theta_i ~ N(mu, 1/tau),
    by Newton's method on the (separable) log joint, plus the empirical Fisher at the mode."""
    def logjoint(th):
        return (torch.distributions.Normal(th[:, None], s[:, None]).log_prob(y).sum()
                + torch.distributions.Normal(mu, tau ** -0.5).log_prob(th).sum())

    th = y.mean(1).clone().requires_grad_(True)
    for _ in range(3):
        (d1,) = torch.autograd.grad(logjoint(th), th, create_graph=True)
        (d2,) = torch.autograd.grad(d1.sum(), th)  # the diagonal Hessian
        th = (th - d1 / d2).detach().requires_grad_(True)
    per_obs = th.detach()[:, None].expand_as(y).clone().requires_grad_(True)  # one copy per observation
    (gj,) = torch.autograd.grad(torch.distributions.Normal(per_obs, s[:, None]).log_prob(y).sum(), per_obs)
    return th.detach(), -1.0 / d2, gj.square().sum(1)


def test_pooling_summaries_match_normal_normal_closed_form():
    """A task with D coordinates of very different likelihood precision F_i = n / s_i^2.

    Closed form: lambda_i = tau / (tau + F_i), lambda^F = sum F_i lambda_i / sum F_i, gamma = sum F_i / (F_i + tau).
    Independently from the exact posterior: lambda_i = (E[theta_i] - ybar_i) / (mu - ybar_i) (posterior-mean
    shrinkage) and gamma = sum_i (1 - tau Var[theta_i]). bora's estimates use the empirical Fisher at the mode."""
    g = torch.Generator().manual_seed(0)
    tau, mu = 1e5, 0.3
    s = torch.logspace(-1.0, 1.0, 9, dtype=torch.float64)  # F_i spans 4 orders of magnitude within the task
    closed_lam, closed_gam, est_lam, est_gam, old = [], [], [], [], []
    for n in (3000, 30000, 300000):
        theta = mu + torch.randn(len(s), generator=g, dtype=torch.float64) / math.sqrt(tau)
        y = theta[:, None] + s[:, None] * torch.randn(len(s), n, generator=g, dtype=torch.float64)
        mode, var, F_emp = _newton_normal_normal(y, s, mu, tau)
        Fc = n / s**2
        lam_c = tau / (tau + Fc)
        ybar = y.mean(1)
        lam_post = (mode - ybar) / (mu - ybar)
        torch.testing.assert_close(lam_post, lam_c, rtol=1e-4, atol=0)  # the solver is exact
        closed_lam.append(float((Fc * lam_c).sum() / Fc.sum()))
        closed_gam.append(float((Fc / (Fc + tau)).sum()))
        assert float((1 - tau * var).sum()) == pytest.approx(closed_gam[-1], rel=1e-6)
        assert float((Fc * lam_post).sum() / Fc.sum()) == pytest.approx(closed_lam[-1], rel=1e-4)
        # bora's functions on the estimated Fisher, split over two tensors of one module
        fisher = {"m": (F_emp[None, :4], F_emp[None, 4:].reshape(1, 5, 1))}
        est_lam.append(pooling_factor(fisher, tau)[0])
        est_gam.append(effective_parameters(fisher, tau)[0])
        old.append(float(shrinkage(tau, F_emp.mean())))
    np.testing.assert_allclose(est_lam, closed_lam, rtol=0.02)
    np.testing.assert_allclose(est_gam, closed_gam, rtol=0.02)
    assert max(closed_lam) > 0.3 and min(closed_lam) < 0.02 and 1 < min(closed_gam) < 2 and 5 < max(closed_gam) < 9
    # the coordinate-averaged factor is a different number (dominated by the largest F_i)
    assert all(abs(o - c) > 0.1 * c for o, c in zip(old, closed_lam))


def test_pooling_summaries_limits_and_known_values():
    F = {"a": (torch.tensor([[0.0, 10.0], [5.0, 5.0]]), torch.tensor([[[90.0]], [[0.0]]]))}
    np.testing.assert_allclose(pooling_factor(F, 10.0), [(5 + 9) / 100, 2 / 3])
    np.testing.assert_allclose(effective_parameters(F, 10.0), [0.5 + 0.9, 1 / 3 + 1 / 3])
    assert pooling_factor(F, math.inf).tolist() == [1.0, 1.0] and effective_parameters(F, math.inf).tolist() == [0, 0]
    assert pooling_factor(F, 0.0).tolist() == [0.0, 0.0] and effective_parameters(F, 0.0).tolist() == [2.0, 2.0]
    assert pooling_factor({"a": (torch.zeros(1, 3),)}, 5.0).tolist() == [1.0]  # no data: the prior decides
    # tau per key and per tensor
    F2 = {"a": (torch.tensor([[10.0]]),), "b": (torch.tensor([[30.0]]), torch.tensor([[30.0]]))}
    np.testing.assert_allclose(effective_parameters(F2, {"a": 10.0, "b": (30.0, 10.0)}), [0.5 + 0.5 + 0.75])
    with pytest.raises(ValueError):
        effective_parameters(F2, {"a": 10.0, "b": (30.0,)})
    assert gain_kept(4.0, 3.5, 3.0) == 0.5 and np.isnan(gain_kept(3.0, 3.0, 3.5))


def _random_adapters(T=3, r=2, d_in=5, d_out=4, seed=0, b_only=False):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(T, r, d_in, generator=g, dtype=torch.float64)
    GA = torch.randn(r, d_in, generator=g, dtype=torch.float64)
    if b_only:
        A = GA
    B = torch.randn(T, d_out, r, generator=g, dtype=torch.float64)
    GB = torch.randn(d_out, r, generator=g, dtype=torch.float64)
    return {"m": (A, B), "n": (A[..., :3] if not b_only else GA[..., :3], 0.5 * B)}, \
        {"m": (GA, GB), "n": (GA[..., :3], 0.5 * GB)}


@pytest.mark.parametrize("b_only", [False, True])
def test_delta_w_ratio_against_dense_products(b_only):
    params, glob = _random_adapters(b_only=b_only)
    num = np.zeros(3)
    den = 0.0
    for k, (A, B) in params.items():
        W = B @ A  # [T, out, in] (A broadcasts when shared)
        G = glob[k][1] @ glob[k][0]
        num += (W - G).square().sum((1, 2)).numpy()
        den += float(G.square().sum())
    np.testing.assert_allclose(delta_w_ratio(params, glob), np.sqrt(num / den), rtol=1e-10)
    # reference None: the mean of the tasks' Delta W
    num = np.zeros(3)
    den = 0.0
    for k, (A, B) in params.items():
        W = B @ A
        M = W.mean(0)
        num += (W - M).square().sum((1, 2)).numpy()
        den += float(M.square().sum())
    np.testing.assert_allclose(delta_w_ratio(params, None), np.sqrt(num / den), rtol=1e-9)
    same = {k: (GA[None].expand(2, -1, -1), GB[None].expand(2, -1, -1)) for k, (GA, GB) in glob.items()}
    assert delta_w_ratio(same, glob).tolist() == [0.0, 0.0]


def test_delta_w_ratio_normal_normal_with_a_shared_a():
    """Only B is task-level and A has orthonormal rows: ||(B_t - Theta_B) A|| = ||B_t - Theta_B||, and in the
    normal-normal model the posterior mean of B_t is Theta_B + (1 - lambda_t)(Bhat_t - Theta_B)."""
    g = torch.Generator().manual_seed(3)
    A = torch.linalg.qr(torch.randn(6, 2, generator=g, dtype=torch.float64))[0].T  # [2, 6], orthonormal rows
    GB = torch.randn(4, 2, generator=g, dtype=torch.float64)
    lam = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    Bhat = GB + 0.3 * torch.randn(3, 4, 2, generator=g, dtype=torch.float64)
    B = GB + (1 - lam)[:, None, None] * (Bhat - GB)
    want = (1 - lam) * (Bhat - GB).flatten(1).norm(dim=1) / GB.norm()
    np.testing.assert_allclose(delta_w_ratio({"m": (A, B)}, {"m": (A, GB)}), want.numpy(), rtol=1e-10)


def test_pooling_summaries_are_gauge_invariant():
    """A -> cA, B -> B/c with F_A -> F_A / c^2, F_B -> F_B c^2, tau_A -> tau / c^2, tau_B -> tau c^2."""
    g = torch.Generator().manual_seed(1)
    params, glob = _random_adapters()
    fisher = {k: (torch.rand(3, *A.shape[-2:], generator=g, dtype=torch.float64) * 50,
                  torch.rand(3, *B.shape[-2:], generator=g, dtype=torch.float64) * 5) for k, (A, B) in params.items()}
    tau = {"m": 7.0, "n": 2.0}
    c = 3.7
    params_c = {k: (c * A, B / c) for k, (A, B) in params.items()}
    glob_c = {k: (c * A, B / c) for k, (A, B) in glob.items()}
    fisher_c = {k: (FA / c**2, FB * c**2) for k, (FA, FB) in fisher.items()}
    tau_c = {k: (t / c**2, t * c**2) for k, t in tau.items()}
    np.testing.assert_allclose(pooling_factor(fisher_c, tau_c), pooling_factor(fisher, tau), rtol=1e-12)
    np.testing.assert_allclose(effective_parameters(fisher_c, tau_c), effective_parameters(fisher, tau), rtol=1e-12)
    np.testing.assert_allclose(delta_w_ratio(params_c, glob_c), delta_w_ratio(params, glob), rtol=1e-10)
    np.testing.assert_allclose(delta_w_ratio(params_c, None), delta_w_ratio(params, None), rtol=1e-10)
    # what is not invariant: the coordinate-averaged factor and the (A, B) deviation norms
    keys = list(params)
    F_old = fisher_means(fisher, keys)[0]
    F_old_c = fisher_means(fisher_c, keys)[0]
    assert np.abs(shrinkage(7.0, F_old_c) / shrinkage(7.0, F_old) - 1).max() > 0.05
    norms_c, norms = adapter_norms(params_c, glob_c, keys, 3)[0], adapter_norms(params, glob, keys, 3)[0]
    assert np.abs(norms_c / norms - 1).max() > 0.05
    assert not np.allclose(pooling_factor(fisher_c, tau), pooling_factor(fisher, tau))  # tau must transform too


def test_gain_kept_matches_normal_normal_closed_form():
    """theta ~ N(mu, 1/tau), ybar ~ N(theta, 1/F); predictors: mu (base), ybar (independent), the posterior
    mean (pooled). Expected held-out NLL = const + E[(theta - m)^2] / (2 s^2), so the kept fraction is
    (1/tau - 1/(F + tau)) / (1/tau - 1/F) = F^2 / (F^2 - tau^2): above 1, pooling beats the independent fit."""
    rng = np.random.default_rng(0)
    mu, s, K = 0.2, 1.0, 400_000
    for tau, F in ((10.0, 20.0), (10.0, 80.0)):
        theta = mu + rng.standard_normal(K) / math.sqrt(tau)
        ybar = theta + rng.standard_normal(K) / math.sqrt(F)
        post = (tau * mu + F * ybar) / (tau + F)

        def nll(m):
            return 0.5 * math.log(2 * math.pi * s**2) + float(np.mean((theta - m) ** 2 + s**2)) / (2 * s**2)

        kept = gain_kept(nll(mu), nll(post), nll(ybar))
        assert float(kept) == pytest.approx(F**2 / (F**2 - tau**2), rel=0.02)


# ----------------------------------------------------------------------------- identified-coordinate deviation
def _orthonormal_A(r, d_in, g):
    return torch.linalg.qr(torch.randn(d_in, r, generator=g, dtype=torch.float64))[0].T  # [r, in]


def test_identified_delta_w_by_hand():
    """Two tasks, one module, r = 2, out = 2, A = I: the ratio is the norm of the masked B deviation by hand."""
    A, GB = torch.eye(2, dtype=torch.float64), torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    B = torch.stack([GB + torch.tensor([[0.3, -0.4], [1.0, 0.0]]), GB + torch.tensor([[0.0, 2.0], [0.5, 0.5]])])
    F = torch.tensor([[[20.0, 20.0], [1.0, 0.0]],     # task 0: the first row is identified (F > tau = 10)
                      [[0.0, 5.0], [10.0, 11.0]]], dtype=torch.float64)  # task 1: only (1, 1); F = tau is not
    ratio, count = identified_delta_w({"m": (A, B)}, {"m": (A, GB)}, {"m": (torch.zeros_like(F), F)}, 10.0)
    np.testing.assert_allclose(ratio, [math.sqrt(0.3**2 + 0.4**2) / math.sqrt(5.0), 0.5 / math.sqrt(5.0)])
    assert count.tolist() == [2, 1]
    assert identified_mask({"m": F}, 10.0)["m"].sum().item() == 3
    # a task whose adapter is the global one: 0 whatever is identified
    same = torch.stack([GB, B[1]])
    assert identified_delta_w({"m": (A, same)}, {"m": (A, GB)}, {"m": F}, 10.0)[0][0] == 0.0


def test_identified_delta_w_with_a_shared_orthonormal_a_against_dense_products():
    g = torch.Generator().manual_seed(5)
    T, r, d_in, d_out = 3, 2, 7, 4
    A = {"m": _orthonormal_A(r, d_in, g), "n": _orthonormal_A(r, 5, g)}
    GB = {"m": torch.randn(d_out, r, generator=g, dtype=torch.float64), "n": torch.randn(3, r, generator=g,
                                                                                       dtype=torch.float64)}
    B = {k: GB[k] + 0.4 * torch.randn(T, *GB[k].shape, generator=g, dtype=torch.float64) for k in A}
    F = {k: torch.rand(T, *GB[k].shape, generator=g, dtype=torch.float64) * 20 for k in A}
    tau = {"m": 8.0, "n": (3.0, 12.0)}  # (tau_A, tau_B): the B one applies
    adapters = {k: (A[k].expand(T, -1, -1), B[k]) for k in A}  # a shared A, expanded as params_from_values does
    ref = {k: (A[k], GB[k]) for k in A}
    ratio, count = identified_delta_w(adapters, ref, F, tau)
    num, den, n = np.zeros(T), 0.0, np.zeros(T)
    for k, t in (("m", 8.0), ("n", 12.0)):
        M = F[k] > t
        num += ((M * (B[k] - GB[k])) @ A[k]).square().sum((1, 2)).numpy()
        den += float((GB[k] @ A[k]).square().sum())
        n += M.flatten(1).sum(1).numpy()
    np.testing.assert_allclose(ratio, np.sqrt(num / den), rtol=1e-10)
    assert count.tolist() == n.tolist() and 0 < n.min() and n.max() < sum(x[0].numel() for x in F.values())
    # tau -> inf: nothing identified; tau -> 0: every coordinate with data, the full deviation (orthonormal A)
    r_inf, c_inf = identified_delta_w(adapters, ref, F, math.inf)
    assert r_inf.tolist() == [0.0] * T and c_inf.tolist() == [0] * T
    np.testing.assert_allclose(identified_delta_w(adapters, ref, F, 1e12)[0], 0.0)
    r0, c0 = identified_delta_w(adapters, ref, F, 0.0)
    np.testing.assert_allclose(r0, delta_w_ratio(adapters, ref), rtol=1e-10)
    np.testing.assert_allclose(identified_delta_w(adapters, ref, F, 1e-12)[0], r0, rtol=1e-10)
    assert c0.tolist() == [sum(x[0].numel() for x in F.values())] * T
    # a coordinate without data is never identified, even at tau = 0
    F0 = {k: v.clone() for k, v in F.items()}
    F0["m"][0, 0, 0] = 0.0
    assert identified_delta_w(adapters, ref, F0, 0.0)[1][0] == c0[0] - 1
    # identified deviations are part of the whole: never above the full ratio
    assert np.all(ratio <= r0 + 1e-12)


def test_identified_delta_w_refuses_task_level_a():
    params, glob = _random_adapters()  # hierarchy 'AB': each task its own A
    F = {k: torch.ones(3, *B.shape[-2:]) for k, (A, B) in params.items()}
    assert identified_delta_w(params, glob, F, 1.0) is None
    with pytest.raises(ValueError):
        identified_mask({"m": -torch.ones(1, 2, 2)}, 1.0)
    with pytest.raises(ValueError):
        identified_mask({"m": torch.ones(1, 2, 2)}, -1.0)
