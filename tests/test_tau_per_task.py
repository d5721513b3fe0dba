"""A per-task tau (``PriorConfig.tau_per_task``, issue 24 item 3): ``tau_t ~ Gamma(a, b)`` with ``(a, b)`` learned by
the evidence (``bora.fit.tau.per_task_tau``), checked against brute force and on the linear-Gaussian stand-in
(``tests/gaussian.py``) with heterogeneous and homogeneous tasks."""

import math

import numpy as np
import pytest
import torch

from bora.core.config import BoraConfig, ConfigError, FitConfig, PriorConfig
from bora.fit.loop import fit
from bora.fit.tau import A_BOUNDS, EmpiricalBayesTau, gamma_gamma_evidence, gamma_hyper, per_task_tau
from bora.model.distributions import IsotropicNormal
from bora.model.guides import make_guide, point_values

from gaussian import GaussianModel

from bora.data.documents import TokenizedSplit
from bora.data.feed import Feed
from bora.core.config import AdapterConfig
from bora.lora.inject import inject_adapters_
from conftest import tiny_llama


# ----------------------------------------------------------------------------- the estimator against brute force
def _log_marginal_numeric(a, b, S, gamma):
    """``sum_t log int Gamma(tau; a, b) tau^(gamma_t/2) exp(-tau S_t/2) dtau`` by quadrature on a log-tau grid."""
    u = np.linspace(-25, 25, 40001)
    tau = np.exp(u)
    out = 0.0
    for s, g in zip(S, gamma):
        # the Gamma(a, b) density times the task's Gamma-shaped evidence, in log tau (dtau = tau du)
        logf = (a * math.log(b) - math.lgamma(a) + (a - 1) * u - b * tau) + 0.5 * g * u - 0.5 * tau * s + u
        m = logf.max()
        out += m + math.log(np.trapezoid(np.exp(logf - m), u))
    return out


def _synthetic(seed=0, T=7):
    g = np.random.default_rng(seed)
    gamma = g.uniform(20, 200, T)
    tau = g.gamma(3.0, 1 / 0.1, T)  # true taus around 30
    S = np.array([g.chisquare(max(gm, 1)) / t for gm, t in zip(gamma, tau)])
    return S, gamma


def test_gamma_gamma_marginal_matches_quadrature():
    S, gamma = _synthetic()
    for a, b in [(0.7, 0.02), (3.0, 0.1), (40.0, 2.0)]:
        closed = float(gamma_gamma_evidence(a, b, torch.tensor(S), torch.tensor(gamma)))
        assert closed == pytest.approx(_log_marginal_numeric(a, b, S, gamma), abs=1e-5)


def test_gamma_hyper_and_task_modes_match_brute_force():
    S, gamma = _synthetic(1)
    a, b = gamma_hyper(torch.tensor(S), torch.tensor(gamma))
    # brute force: a dense grid over (log a, log b) of the closed form (checked against quadrature above)
    la = np.linspace(math.log(A_BOUNDS[0]), math.log(1e4), 1201)
    lb = np.linspace(-12, 12, 1201)
    A, B = np.meshgrid(np.exp(la), np.exp(lb), indexing="ij")
    L = gamma_gamma_evidence(torch.tensor(A.ravel()), torch.tensor(B.ravel()), torch.tensor(S),
                             torch.tensor(gamma)).numpy().reshape(A.shape)
    i, j = np.unravel_index(np.argmax(L), L.shape)
    assert float(gamma_gamma_evidence(a, b, torch.tensor(S), torch.tensor(gamma))) >= L[i, j] - 1e-6
    assert math.log(a) == pytest.approx(la[i], abs=0.05) and math.log(b) == pytest.approx(lb[j], abs=0.05)
    # and at the brute-force maximum the quadrature objective is no higher than at the estimate
    assert _log_marginal_numeric(a, b, S, gamma) >= _log_marginal_numeric(A[i, j], B[i, j], S, gamma) - 1e-4
    # each task's posterior is Gamma(a + gamma_t/2, b + S_t/2): its mode and mean against a brute-force grid
    t = np.exp(np.linspace(-5, 12, 200001))
    for s, g in zip(S, gamma):
        logp = (a + g / 2 - 1) * np.log(t) - (b + s / 2) * t
        assert (a + g / 2 - 1) / (b + s / 2) == pytest.approx(t[np.argmax(logp)], rel=1e-3)
        p = np.exp(logp - logp.max()) * t  # density in log tau
        assert (a + g / 2) / (b + s / 2) == pytest.approx(float((p * t).sum() / p.sum()), rel=1e-4)


def test_per_task_tau_is_a_fixed_point_and_homogeneous_tasks_give_the_single_tau_limit():
    g = torch.Generator().manual_seed(0)
    T, M = 10, 400
    F = torch.rand(T, M, generator=g, dtype=torch.float64) * 400 + 10
    taus = torch.tensor([50.0] * 8 + [1.0, 1.0], dtype=torch.float64)
    y = torch.randn(T, M, generator=g, dtype=torch.float64) * (1 / taus[:, None] + 1 / F).sqrt()
    S = (F * y / (F + 50.0)).square().sum(1)
    tau, a, b = per_task_tau(S, F)
    w = F / (F + tau[:, None])
    c = w.square().sum() / w.sum()  # the Gamma kernel (c gamma_t/2, c S_t/2)
    nu, R = c * w.sum(1), c * S
    torch.testing.assert_close(tau, (a + nu / 2) / (b + R / 2), rtol=2e-4, atol=0)  # posterior means
    a2, b2 = gamma_hyper(R, nu)
    assert a2 == pytest.approx(a, rel=1e-2) and b2 == pytest.approx(b, rel=1e-2)
    assert float(tau[8:].max()) < float(tau[:8].min()) / 5  # the two odd tasks stand out
    # homogeneous: a at (or near) its upper bound, every tau_t within 5% of the single-tau (MacKay) estimate
    y = torch.randn(T, M, generator=g, dtype=torch.float64) * (1 / 50.0 + 1 / F).sqrt()
    S = (F * y / (F + 50.0)).square().sum(1)
    tau, a, b = per_task_tau(S, F)
    from bora.fit.tau import evidence_tau

    single = evidence_tau(S.sum(), F)
    assert a > 1e3
    assert float((tau / single - 1).abs().max()) < 0.05, (tau, single)
    # and with weakly determined coordinates (F ~ tau / 10)
    F = F / 20
    y = torch.randn(T, M, generator=g, dtype=torch.float64) * (1 / 50.0 + 1 / F).sqrt()
    S = (F * y / (F + 50.0)).square().sum(1)
    assert per_task_tau(S, F)[1] > 1e3


def test_isotropic_normal_takes_one_scale_per_task():
    loc, x = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    scale = torch.tensor([0.5, 1.0, 2.0])
    ref = torch.distributions.Normal(loc, scale.view(3, 1, 1)).log_prob(x).sum((-2, -1))
    torch.testing.assert_close(IsotropicNormal(loc, scale).log_prob(x), ref)
    with pytest.raises(ValueError):
        IsotropicNormal(loc, torch.ones(4))


@pytest.mark.parametrize("kw, fit_kw", [
    ({"tau_mode": "fixed"}, {}), ({"tau_per_module": True}, {}), ({"hierarchy": "AB"}, {}),
    ({"parameterisation": "noncentred"}, {}), ({"tau_evidence": "integrated"}, {}), ({}, {"guide": "meanfield"}),
    ({}, {"task_updates": "lazy", "weight_decay": 0.0})])
def test_unsupported_combinations_are_refused_in_one_line(kw, fit_kw):
    with pytest.raises(ConfigError) as e:
        # the profiled evidence unless the case is the evidence itself: each case fails for its own reason
        BoraConfig(prior=PriorConfig(tau_per_task=True, **{"tau_evidence": "profiled", **kw}), fit=FitConfig(**fit_kw))
    assert "tau_per_task" in str(e.value) and "\n" not in str(e.value)


# ----------------------------------------------------------------------------- the fit loop on the stand-in
def _problem(sizes, taus, *, sigma=1.0, seed=0, per_task=True, tau_init=10.0):
    """The stand-in (``tests/gaussian.py``) with task ``t`` drawn at its own precision ``taus[t]``."""
    g = torch.Generator().manual_seed(seed)
    lm = tiny_llama(layers=1)
    adapters = inject_adapters_(lm, AdapterConfig(rank=2, targets=("q_proj",), layers=(-1,)))
    (_, shape_b), = adapters.shapes().values()
    T = len(sizes)
    Theta = torch.randn(shape_b, generator=g) * 0.5
    theta = Theta + torch.randn(T, *shape_b, generator=g) / torch.tensor(taus).sqrt().view(-1, 1, 1)
    task_ids = torch.repeat_interleave(torch.arange(T), torch.tensor(sizes))
    Y = theta[task_ids] + sigma * torch.randn(len(task_ids), *shape_b, generator=g)
    prior = PriorConfig(tau_mode="learned", tau=tau_init, global_scale=3.0, tau_shape=1.0, tau_rate=1e-4,
                        parameterisation="offset", tau_per_task=per_task, tau_evidence="profiled")
    tasks = tuple(f"t{i}" for i in range(T))
    model = GaussianModel(lm, adapters, tasks, Y, task_ids, sigma, prior)
    feed = Feed(TokenizedSplit([torch.tensor([1, 2])] * len(task_ids), task_ids, tasks), pad_id=0, prefix=None)
    n = torch.tensor(sizes, dtype=torch.float64)
    ybar = torch.zeros(T, *shape_b, dtype=torch.float64).index_add_(0, task_ids, Y.double()) / n.view(-1, 1, 1)
    truth = {"Theta": Theta, "theta": theta, "ybar": ybar, "n": n, "sigma": sigma, "s": 3.0}
    return model, feed, truth


CFG = FitConfig(steps=600, lr=0.05, batch_size=32, eval_every=50, patience=0, fisher_docs=10_000, warmup=0.0,
                tau_curvature="pass")  # the stand-in likelihood bypasses the adapter layers


def _fit(model, feed):
    tau = EmpiricalBayesTau(model)
    guide = make_guide(model, "map", target=tau.model)
    res = fit(model, guide, feed, None, CFG, tau=tau, progress=False)
    point = model.complete({**point_values(guide), **tau.values})
    return tau, res, point


def _sq_error(model, point, truth):
    """Per task, ``||B_t - theta_t||^2``: the expected held-out log-likelihood of a new document of task ``t``
    under the fitted ``B_t`` is ``const - ||B_t - theta_t||^2 / (2 sigma^2)``."""
    B = model.params_from_values(point)[model.key][1].detach().double()
    return (B - truth["theta"].double()).square().flatten(1).sum(1)


SIZES = [3, 4, 5, 6, 8, 10, 12, 15, 20, 25, 30, 40]
ODD = (1, 6)  # a small and a mid-sized task drawn at tau = 1 among tasks at tau = 50


def test_per_task_tau_finds_the_odd_tasks_and_predicts_them_better():
    taus = [1.0 if t in ODD else 50.0 for t in range(len(SIZES))]
    model, feed, truth = _problem(SIZES, taus)
    tau, res, point = _fit(model, feed)
    got = torch.tensor(res.tau["tau"])
    err = _sq_error(model, point, truth)
    single_model, feed1, _ = _problem(SIZES, taus, per_task=False)
    single_tau, single_res, single_point = _fit(single_model, feed1)
    err1 = _sq_error(single_model, single_point, truth)
    odd = list(ODD)
    rest = [t for t in range(len(SIZES)) if t not in ODD]
    gain = (err1[odd] - err[odd]) / (2 * truth["sigma"] ** 2)  # expected held-out log-lik gain per document
    print(f"per-task tau {[round(float(t), 2) for t in got]}, a={res.tau_hyper['a']:.3g}, b={res.tau_hyper['b']:.3g}; "
          f"single tau {single_res.tau['tau']:.3g}; odd tasks' ||B - theta||^2 per-task {err[odd].tolist()} vs single "
          f"{err1[odd].tolist()}; held-out log-lik gain per document {gain.tolist()}; rest: "
          f"{float(err[rest].sum()):.3f} vs {float(err1[rest].sum()):.3f}")
    assert float(got[odd].max()) < 5.0 and float(got[rest].min()) > 3 * float(got[odd].max())
    assert float(got[rest].median()) > 15.0
    assert bool((gain > 0).all())
    # and the ordinary tasks are predicted no worse overall (within 10%)
    assert float(err[rest].sum()) < 1.1 * float(err1[rest].sum())


def test_per_task_tau_with_homogeneous_tasks_stays_near_the_single_tau():
    sizes = [10, 12, 15, 20, 25, 30, 40, 50]
    model, feed, truth = _problem(sizes, [50.0] * len(sizes), seed=3)
    _, res, _ = _fit(model, feed)
    single_model, feed1, _ = _problem(sizes, [50.0] * len(sizes), seed=3, per_task=False)
    _, single_res, _ = _fit(single_model, feed1)
    got = torch.tensor(res.tau["tau"])
    single = single_res.tau["tau"]
    print(f"homogeneous: per-task tau {[round(float(t), 2) for t in got]}, a={res.tau_hyper['a']:.3g}; "
          f"single {single:.3g}")
    assert res.tau_hyper["a"] > 50
    assert float(got.max() / got.min()) < 1.5
    assert float((got / single - 1).abs().max()) < 0.05


# ----------------------------------------------------------------------------- a saved fit, the CLI
def test_per_task_fit_saves_loads_evaluates_and_reports(tmp_path, capsys):
    import json

    from bora.api import Bora
    from bora.cli.main import main
    from conftest import tiny_model_dir, write_jsonl

    model_dir, data = tiny_model_dir(tmp_path / "model"), write_jsonl(tmp_path / "data.jsonl")
    out = tmp_path / "fit"
    rc = main(["fit", "--model", str(model_dir), "--data", str(data), "--task-column", "speaker", "--targets",
               "q_proj", "--layers", "-1", "--rank", "2", "--steps", "8", "--batch-size", "4", "--lr", "0.02",
               "--eval-every", "4", "--tau-mode", "learned", "--tau-per-task", "--tau-evidence", "profiled",
               "--output", str(out), "--quiet",
               "--device", "cpu"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "per-task tau (Gamma(a=" in text and "spk2=" in text
    state = json.loads((out / "state.json").read_text())
    taus = state["tau"]["tau"]
    assert isinstance(taus, list) and len(taus) == 3 and all(t > 0 for t in taus)
    assert set(state["tau_hyper"]) == {"a", "b"} and state["result"]["tau_hyper"] == state["tau_hyper"]
    bora = Bora.load(out, device="cpu")
    assert bora.tau.as_dict()["tau"] == pytest.approx(taus) and bora.tau.hyper_dict() == state["tau_hyper"]
    # the Laplace posterior gives each task its own prior precision
    (lap_tau,) = set(map(tuple, bora.laplace.tau.values()))
    assert list(lap_tau) == pytest.approx(taus)
    key = next(iter(bora.laplace.task))
    F = bora.laplace.task[key][1]
    torch.testing.assert_close(bora.laplace.task_sd(key, 1),
                               (F + torch.tensor(taus, dtype=F.dtype).view(-1, 1, 1)).rsqrt())
    with pytest.raises(ValueError, match="one tau per task"):
        bora.model.tau_by_key(bora.point())
    assert main(["evaluate", str(out), "--samples", "3", "--quiet", "--device", "cpu"]) == 0
    assert main(["report", str(out), "-o", str(tmp_path / "report"), "--draws", "3", "--quiet", "--device",
                 "cpu"]) == 0
    rep = json.loads((tmp_path / "report" / "report.json").read_text())
    assert rep["tau"]["tau"] == pytest.approx(taus) and rep["tau_hyper"] == state["tau_hyper"]
    assert [rep["per_task"][t]["tau"] for t in ("spk0", "spk1", "spk2")] == pytest.approx(taus)
    assert "learned Gamma(a = " in (tmp_path / "report" / "index.md").read_text()
