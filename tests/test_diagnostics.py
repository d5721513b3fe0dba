"""Diagnostics: the shrinkage factor against the normal-normal closed form, InferenceData of real fits."""

import math

import numpy as np
import pytest
import torch

from bora.api import Bora
from bora.config import AdapterConfig, BoraConfig, FitConfig, PriorConfig
from bora.diagnostics import (adapter_norms, diagnose, fisher_means, load_idata, shrinkage, spearman, summary,
                              task_table, to_inference_data)

from conftest import TinyTokenizer, task_data, tiny_llama

TRAIN, VAL = (24, 10, 5), (6, 4, 3)


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


def _random_idata(per_module: bool, S=4, T=3, M=2, seed=0):
    rng = np.random.default_rng(seed)
    tau = rng.gamma(2.0, 5.0, size=(S, M if per_module else 1)).repeat(1 if per_module else M, axis=1)
    return to_inference_data(tasks=["a", "b", "c"][:T], modules=[f"m{j}" for j in range(M)], tau=tau,
                             deviation=rng.random((S, T, M)), global_norm=rng.random((S, M)),
                             fisher=rng.random(T) * 10, fisher_module=rng.random((T, M)) * 10,
                             coords_per_module=np.array([6, 10][:M]), train_docs=np.array([9, 4, 2][:T]),
                             train_tokens=np.array([90, 41, 20][:T]), fisher_docs=np.array([4, 4, 2][:T]),
                             tau_per_module=per_module, attrs={"tau_mode": "learned", "guide": "meanfield"})


@pytest.mark.parametrize("per_module", [False, True])
def test_inference_data_netcdf_round_trip(tmp_path, per_module):
    idata = _random_idata(per_module)
    post = idata.posterior
    assert post["tau"].dims == (("chain", "draw", "module") if per_module else ("chain", "draw"))
    assert post["shrinkage_module"].dims == ("chain", "draw", "task", "module")
    assert idata.constant_data["train_tokens"].dims == ("task",)
    path = tmp_path / "d.nc"
    idata.to_netcdf(str(path))
    again = load_idata(path)
    for group in ("posterior", "constant_data"):
        a, b = getattr(idata, group), getattr(again, group)
        assert set(a.data_vars) == set(b.data_vars)
        for v in a.data_vars:
            assert a[v].dims == b[v].dims
            np.testing.assert_array_equal(a[v].values, b[v].values)
        for c in a.coords:
            assert a[c].values.tolist() == b[c].values.tolist()
        assert b.attrs["tau_mode"] == "learned"
    t = task_table(again)
    assert t["task"] == ["a", "b", "c"] and t["draws"] == 4
    assert all(lo <= m <= hi for lo, m, hi in zip(t["shrinkage_lo"], t["shrinkage"], t["shrinkage_hi"]))


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


def _fit(mode="learned", guide="map", per_module=False, steps=5):
    cfg = BoraConfig(model="tiny", adapter=AdapterConfig(rank=2, targets=("q_proj", "v_proj"), layers=(-1,)),
                     prior=PriorConfig(tau_mode=mode, tau=10.0, tau_per_module=per_module),
                     fit=FitConfig(steps=steps, batch_size=8, lr=2e-2, fisher_docs=4, patience=0, warmup=0.0,
                                   guide=guide, eval_every=steps))
    train, val = task_data(TRAIN, seed=1), task_data(VAL, seed=2)
    bora = Bora(cfg, tiny_llama(layers=2), TinyTokenizer(), train.tasks, len(train))
    bora.fit(train, val, progress=False)
    return bora, train


@pytest.mark.parametrize("mode,guide,per_module", [
    ("learned", "map", True), ("fixed", "meanfield", False), ("shared", "map", False),
    ("independent", "map", False)])
def test_diagnostics_of_fits(mode, guide, per_module):
    bora, train = _fit(mode, guide, per_module)
    idata = diagnose(bora, train=train, draws=12)
    post, const = idata.posterior, idata.constant_data
    S = 12 if guide == "meanfield" else 1
    assert (post.sizes["chain"], post.sizes["draw"]) == (1, S)
    assert post["task"].values.tolist() == list(bora.tasks)
    assert post["module"].values.tolist() == list(bora.model.shapes)
    lam = post["shrinkage"].values
    assert lam.shape == (1, S, 3) and np.all((lam >= 0) & (lam <= 1))
    assert np.all((post["shrinkage_module"].values >= 0) & (post["shrinkage_module"].values <= 1))
    assert const["train_docs"].values.tolist() == list(TRAIN)
    assert const["train_tokens"].values.tolist() == train.task_tokens().tolist()
    assert np.all(const["fisher"].values > 0)
    dev = post["deviation"].values
    if mode == "shared":
        assert np.all(lam == 1.0) and np.all(dev == 0) and np.all(np.isinf(post["tau"].values))
        assert post["global_norm_total"].values.item() > 0
    elif mode == "independent":
        assert np.all(lam == 0.0) and idata.posterior.attrs["reference"] == "task_mean"
        assert np.all(dev > 0)
    else:
        assert np.all((lam > 0) & (lam < 1)) and np.all(dev > 0)
        assert idata.posterior.attrs["reference"] == "global"
    if per_module:
        assert post["tau"].dims == ("chain", "draw", "module")
        want = [bora.tau_estimate()[f"tau:{k}"] for k in bora.model.shapes]
        np.testing.assert_allclose(post["tau"].values[0, 0], want, rtol=1e-6)
    if guide == "meanfield":  # real posterior draws: deviations differ between draws
        assert np.ptp(dev, axis=1).max() > 0
        assert post["tau"].values.flatten().tolist() == [10.0] * S  # fixed tau
    assert len(summary(idata)) > 0
