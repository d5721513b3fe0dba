"""The Laplace posterior of a MAP fit: attached by the default guide, saved as safetensors, used by every
posterior consumer with the same draw for the same (seed, k)."""

import copy

import pytest
import torch

from bora.api import Bora
from bora.core.config import AdapterConfig, BoraConfig, ConfigError, FitConfig, PriorConfig
from bora.posterior.laplace import HierarchicalLaplace
from bora.io.export import adapter_estimate

from conftest import TinyTokenizer, task_data, tiny_llama


def _fit(lm, **fit):
    cfg = BoraConfig(model="tiny", adapter=AdapterConfig(rank=2, targets=("q_proj", "v_proj"), layers=(-1,)),
                     prior=PriorConfig(tau_mode="learned", tau=10.0),
                     fit=FitConfig(**{"steps": 6, "batch_size": 8, "lr": 2e-2, "fisher_docs": 4, "patience": 0,
                                      "warmup": 0.0, **fit}))
    train, val = task_data((16, 8, 4), seed=1), task_data((6, 4, 3), seed=2)
    bora = Bora(cfg, lm, TinyTokenizer(), train.tasks, len(train))
    bora.fit(train, val, progress=False)
    return bora, train, val


def test_laplace_is_attached_saved_and_sampled_consistently(tmp_path):
    lm = tiny_llama()
    bora, train, val = _fit(copy.deepcopy(lm))
    assert bora.config.fit.guide == "laplace" and bora.laplace is not None
    key = next(iter(bora.model.shapes))
    tau = bora.tau_estimate()["tau"]
    sd = bora.laplace.task_sd(key, 1)
    F = bora.laplace.task[key][1]
    assert (F >= 0).all() and (F > 0).any()
    torch.testing.assert_close(sd, (F + tau).rsqrt())  # (F + tau)^-1/2: the data only shrink the prior sd
    bora.save(tmp_path / "fit")
    again = Bora.load(tmp_path / "fit", lm=copy.deepcopy(lm), tokenizer=TinyTokenizer())
    torch.testing.assert_close(again.laplace.task_sd(key, 1), sd)
    post, post2 = bora.posterior(3, seed=5), again.posterior(3, seed=5)
    assert not post.is_point
    B0, B1 = post.params(0)[key][1], post.params(1)[key][1]
    assert not torch.equal(B0, B1) and torch.equal(B0, post2.params(0)[key][1])  # same (seed, k): same draw
    # export --estimate sample uses the same draw
    exported = adapter_estimate(again, task=bora.tasks[0], estimate="sample", sample_index=1, seed=5)
    torch.testing.assert_close(exported[key][1], B1[0])
    # draws spread around the MAP with the Laplace sd (centred: the mean of many draws is the MAP)
    many = bora.posterior(200, seed=0)
    draws = torch.stack([many.params(k)[key][1] for k in range(200)])
    point = bora.params()[key][1]
    assert ((draws.mean(0) - point).abs() / sd).mean() < 0.2


def test_map_guide_has_no_posterior_and_sampled_fisher_differs_from_empirical():
    lm = tiny_llama()
    bora, train, _ = _fit(copy.deepcopy(lm), guide="map")
    assert bora.laplace is None and bora.posterior(2).is_point
    key = next(iter(bora.model.shapes))
    emp = bora.fit_laplace_(train, labels="empirical").task[key][1]
    smp = bora.fit_laplace_(train, labels="sampled").task[key][1]
    assert emp.shape == smp.shape and (emp > 0).any() and (smp > 0).any() and not torch.allclose(emp, smp)


def test_lowrank_curvature_is_the_documents_gradients(tmp_path):
    """structure='lowrank': per task, the columns G_t are its documents' gradients, so diag(G_t G_t^T) is the
    diagonal Fisher; saved and reloaded with the draws unchanged; 'diag' keeps no gradients."""
    lm = tiny_llama()
    bora, train, _ = _fit(copy.deepcopy(lm), guide="map")
    lap = bora.fit_laplace_(train, structure="lowrank")
    assert lap.structure == "lowrank" and len(lap.gradients) == len(bora.tasks)
    for t, G in enumerate(lap.gradients):
        F = torch.cat([lap.task[k][i][t].flatten() for k in lap.task for i in sorted(lap.task[k])])
        torch.testing.assert_close(G.square().sum(1), F, rtol=1e-2, atol=1e-9)   # G is kept in bfloat16
        assert G.shape[1] == int(train.task_sizes()[t])          # every document (fewer than laplace_docs)
    bora.save(tmp_path / "fit")
    again = Bora.load(tmp_path / "fit", lm=copy.deepcopy(lm), tokenizer=TinyTokenizer())
    assert again.laplace.structure == "lowrank"
    key = next(iter(bora.model.shapes))
    draw, redraw = bora.posterior(2, seed=3).params(1)[key][1], again.posterior(2, seed=3).params(1)[key][1]
    torch.testing.assert_close(redraw, draw)
    assert bora.fit_laplace_(train, structure="diag").gradients is None
    with pytest.raises(ConfigError, match="structure"):
        bora.fit_laplace_(train, structure="kfac")


def test_lowrank_draws_have_the_exact_covariance():
    """A draw of task t's coordinates is N(point, (D + G_t G_t^T)^-1), D the prior precision per module."""
    torch.manual_seed(0)
    G = [torch.randn(8, 3).bfloat16().float(), torch.randn(8, 2).bfloat16().float()]  # 2 tasks; modules a, b

    def fisher(t):
        return G[t].square().sum(1)

    task = {"a": {1: torch.stack([fisher(t)[:6].view(2, 3) for t in range(2)])},
            "b": {1: torch.stack([fisher(t)[6:].view(1, 2) for t in range(2)])}}
    lap = HierarchicalLaplace(task, {"a": 2.0, "b": 5.0}, global_scale=1.0, has_global=True, sample_global=False,
                              gradients=G)
    point = {"theta_B:a": torch.zeros(2, 2, 3), "theta_B:b": torch.zeros(2, 1, 2)}
    gen = torch.Generator().manual_seed(0)
    n = 20000
    X = torch.stack([torch.cat([d["theta_B:a"][1].flatten(), d["theta_B:b"][1].flatten()])
                     for d in (lap.sample(None, point, gen) for _ in range(n))]).double()
    want = torch.linalg.inv(torch.diag(torch.tensor([2.0] * 6 + [5.0] * 2)).double() + G[1].double() @ G[1].double().T)
    err = (X.T @ X / n - want).abs().max()
    assert err < 5 * float(want.diagonal().max()) * (2 / n) ** 0.5     # Monte-Carlo error of a covariance
    # the diagonal structure ignores the correlations: its covariance is diag(1 / (D + F))
    diag = HierarchicalLaplace(task, {"a": 2.0, "b": 5.0}, global_scale=1.0, has_global=True, sample_global=False)
    assert torch.allclose(diag.task_sd("a", 1)[1].flatten() ** 2,
                          1 / (2.0 + fisher(1)[:6]))
    assert (want - torch.diag(want.diagonal())).abs().max() > 0.05   # the low-rank posterior is correlated
    # g^T Sigma g of any direction, exactly; the diagonal posterior's with its own covariance; the prior's
    probe = torch.randn(8, 3, dtype=torch.float64)
    torch.testing.assert_close(lap.task_variance(1, probe), (probe * (want @ probe)).sum(0))
    diag_cov = torch.diag(1 / (torch.tensor([2.0] * 6 + [5.0] * 2) + fisher(1))).double()
    torch.testing.assert_close(diag.task_variance(1, probe), (probe * (diag_cov @ probe)).sum(0))
    prior_cov = torch.diag(torch.tensor([2.0] * 6 + [5.0] * 2).double() ** -1)
    torch.testing.assert_close(lap.task_variance(1, probe, prior=True), (probe * (prior_cov @ probe)).sum(0))
    # Sigma_t G, exactly (the tilted estimator's proposal shift), for both structures
    torch.testing.assert_close(lap.task_cov_times(1, probe), want @ probe)
    torch.testing.assert_close(diag.task_cov_times(1, probe), diag_cov @ probe)
    with pytest.raises(ValueError, match="one \\[8, n_t\\] matrix per task"):
        HierarchicalLaplace(task, {"a": 2.0, "b": 5.0}, global_scale=1.0, has_global=True, gradients=G[:1])
