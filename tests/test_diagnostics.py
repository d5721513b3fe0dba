"""Diagnostics (bora.diagnostics): InferenceData layout and round trip, the summaries of real fits."""

import numpy as np
import pytest
import torch

from bora.api import Bora
from bora.core.config import AdapterConfig, BoraConfig, FitConfig, PriorConfig
from bora.diagnostics.inference_data import diagnose, load_idata, summary, task_table, to_inference_data
from bora.diagnostics.pooling import (delta_w_ratio, delta_w_sq_distances, effective_parameters, fisher_means,
                                      gain_kept, identified_delta_w, pooling_factor, tau_per_module)
from bora.model.hierarchy import site_names

from conftest import TinyTokenizer, task_data, tiny_llama

TRAIN, VAL = (24, 10, 5), (6, 4, 3)


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


def _fit(mode="learned", guide="map", per_module=False, steps=5, tau=10.0):
    cfg = BoraConfig(model="tiny", adapter=AdapterConfig(rank=2, targets=("q_proj", "v_proj"), layers=(-1,)),
                     prior=PriorConfig(tau_mode=mode, tau=tau, tau_per_module=per_module),
                     fit=FitConfig(steps=steps, batch_size=8, lr=2e-2, fisher_docs=4, patience=0, warmup=0.0,
                                   guide=guide, eval_every=steps))
    train, val = task_data(TRAIN, seed=1), task_data(VAL, seed=2)
    bora = Bora(cfg, tiny_llama(layers=2), TinyTokenizer(), train.tasks, len(train))
    bora.fit(train, val, progress=False)
    return bora, train


@pytest.mark.parametrize("mode,guide,per_module", [
    ("learned", "map", True), ("fixed", "meanfield", False), ("learned", "meanfield", False),
    ("shared", "map", False), ("uncoupled", "map", False)])
def test_diagnostics_of_fits(mode, guide, per_module):
    from bora.diagnostics.inference_data import compute_fisher

    bora, train = _fit(mode, guide, per_module)
    idata = diagnose(bora, train=train, draws=12)
    post, const = idata.posterior, idata.constant_data
    S = 12 if guide == "meanfield" else 1
    keys = list(bora.model.shapes)
    assert (post.sizes["chain"], post.sizes["draw"]) == (1, S)
    assert post["task"].values.tolist() == list(bora.tasks)
    assert post["module"].values.tolist() == keys
    assert const["train_docs"].values.tolist() == list(TRAIN)
    assert const["train_tokens"].values.tolist() == train.task_tokens().tolist()
    # the stored summaries are the pure functions of the Fisher, tau and the draws' adapters
    full = compute_fisher(bora, train).fisher
    # only the task-level factors: B for hierarchy 'B', whose A is one global factor that tau does not tie
    fisher = {k: tuple(full[k][i] for i in bora.model.task_factors()) for k in keys}
    assert all(len(fisher[k]) == (1 if bora.model.shared_A else 2) for k in keys)
    F_mean = fisher_means(fisher, keys)[0]
    np.testing.assert_allclose(const["fisher"].values, F_mean, rtol=1e-6)
    tau = post["tau"].values.reshape(S, -1)
    pf, gam = post["pooling_factor"].values[0], post["effective_parameters"].values[0]
    dwr = post["delta_w_ratio"].values[0]
    draws = bora.posterior(S, seed=0)
    for k in (0, S - 1):
        tk = {key: float(tau[k, min(j, tau.shape[1] - 1)]) for j, key in enumerate(keys)}
        np.testing.assert_allclose(pf[k], pooling_factor(fisher, tk), rtol=1e-6)
        np.testing.assert_allclose(gam[k], effective_parameters(fisher, tk), rtol=1e-6)
        if mode not in ("shared",):
            vals = draws.values(k) if guide == "meanfield" else bora.point()
            want = delta_w_ratio(bora.model.params_from_values(vals), bora.model.global_from_values(vals))
            np.testing.assert_allclose(dwr[k], want, rtol=1e-6)
    # the point estimate's deviation: delta_w_ratio at bora.point() (a MAP fit's one draw)
    vals = bora.point()
    params, glob = bora.model.params_from_values(vals), bora.model.global_from_values(vals)
    dw_point = const["delta_w_ratio_point"].values
    if mode == "shared":
        assert np.all(dw_point == 0) and np.all(const["delta_w_module_point"].values == 0)
        assert np.all(post["delta_w_identified"].values == 0) and np.all(const["identified_coords"].values == 0)
    else:
        np.testing.assert_allclose(dw_point, delta_w_ratio(params, glob), rtol=1e-9)
        d2, g2 = delta_w_sq_distances(params, glob)
        np.testing.assert_allclose(const["delta_w_module_point"].values, np.sqrt(d2 / g2[None]), rtol=1e-9)
        if guide == "map":  # the one draw is the point estimate
            np.testing.assert_allclose(dwr[0], dw_point, rtol=1e-12)
            np.testing.assert_allclose(post["delta_w_module"].values[0, 0], const["delta_w_module_point"].values,
                                       rtol=1e-12)
    if mode == "uncoupled":  # no global adapter: no identified deviation
        assert "delta_w_identified" not in post and "identified_coords" not in const
        assert "uncoupled" in post.attrs["identified_note"]
    elif mode != "shared":
        tau_point = tau_per_module(bora.model.coupling, keys, bora.tau_estimate() or {}, bora.config.prior.tau)
        want, count = identified_delta_w(params, glob, fisher, dict(zip(keys, tau_point.tolist())))
        np.testing.assert_allclose(const["delta_w_identified_point"].values, want, rtol=1e-9, atol=1e-12)
        assert const["identified_coords"].values.tolist() == count.tolist()
        for k in (0, S - 1):
            vals_k = draws.values(k) if guide == "meanfield" else vals
            tk = {key: float(tau[k, min(j, tau.shape[1] - 1)]) for j, key in enumerate(keys)}
            want_k = identified_delta_w(bora.model.params_from_values(vals_k), bora.model.global_from_values(vals_k),
                                        fisher, tk)[0]
            np.testing.assert_allclose(post["delta_w_identified"].values[0, k], want_k, rtol=1e-9, atol=1e-12)
    n_coords = sum(F[0].numel() for Fs in fisher.values() for F in Fs)
    dev = post["deviation"].values
    if mode == "shared":
        assert np.all(pf == 1.0) and np.all(gam == 0.0) and np.all(dwr == 0.0) and np.all(dev == 0)
        assert np.all(np.isinf(post["tau"].values)) and post["global_norm_total"].values.item() > 0
    elif mode == "uncoupled":
        assert np.all(pf == 0.0) and idata.posterior.attrs["reference"] == "task_mean"
        np.testing.assert_allclose(gam, [[float((torch.cat([F[t].flatten() for ab in fisher.values() for F in ab])
                                                  > 0).sum()) for t in range(3)]])
        assert np.all(dwr > 0) and np.all(dev > 0)
    else:
        assert np.all((pf > 0) & (pf < 1)) and np.all((gam > 0) & (gam < n_coords)) and np.all(dwr > 0)
        assert idata.posterior.attrs["reference"] == "global"
    # the old coordinate-averaged factor is kept for comparison: tau / (tau + mean F)
    if mode in ("fixed", "learned") and not per_module:
        np.testing.assert_allclose(post["shrinkage"].values[0], tau[:, :1] / (tau[:, :1] + F_mean[None]), rtol=1e-6)
    if per_module:
        assert post["tau"].dims == ("chain", "draw", "module")
        want = [bora.tau_estimate()[f"tau:{k}"] for k in keys]
        np.testing.assert_allclose(post["tau"].values[0, 0], want, rtol=1e-6)
    table = task_table(idata)
    if guide == "meanfield":  # real posterior draws: deviations differ between draws, intervals have width
        assert np.ptp(dev, axis=1).max() > 0
        assert all(lo < hi for lo, hi in zip(table["delta_w_ratio_lo"], table["delta_w_ratio_hi"]))
        # fixed tau, or a learned tau set by the variational M-step (a hyperparameter): one tau for every draw,
        # and the Fisher is computed once, so the pooling factor is the same per draw
        assert len(set(post["tau"].values.flatten().tolist())) == 1
        assert np.ptp(pf, axis=0).max() == 0
    else:
        assert table["pooling_factor_lo"] == table["pooling_factor"] == table["pooling_factor_hi"]
    summ = summary(idata)
    assert {f"pooling_factor[{t}]" for t in bora.tasks} <= set(summ.index)
    np.testing.assert_allclose(summ.loc[[f"effective_parameters[{t}]" for t in bora.tasks], "mean"],
                               gam.mean(0), rtol=1e-3, atol=1e-3)


class _TaskZeroIsGlobal:
    """A view of a fit whose task 0 uses the global adapter (``B_0 = Theta_B``); everything else is the fit's."""

    def __init__(self, bora):
        self.bora = bora

    def __getattr__(self, name):
        return getattr(self.bora, name)

    def point(self):
        values = dict(self.bora.point())
        for key in self.bora.model.shapes:
            n = site_names(key)
            B = values[n["TB"]].clone()
            B[0] = values[n["GB"]]
            values[n["TB"]] = B
        return values


def test_point_deviation_keeps_the_task_structure():
    """A task whose adapter is the global one has point deviation 0 (every module, identified or not); the others
    do not. tau small enough that the tiny fit's data identify coordinates (F > tau)."""
    bora, train = _fit("fixed", "map", tau=1e-3)
    view = _TaskZeroIsGlobal(bora)
    idata = diagnose(view, train=train, draws=1)
    const = idata.constant_data
    dw, dw_mod = const["delta_w_ratio_point"].values, const["delta_w_module_point"].values
    assert dw[0] == 0 and np.all(dw_mod[0] == 0) and np.all(dw[1:] > 0) and np.all(dw_mod[1:] > 0)
    ident, count = const["delta_w_identified_point"].values, const["identified_coords"].values
    assert ident[0] == 0 and np.all(count > 0) and np.all(ident[1:] > 0)
    assert np.all(ident <= dw + 1e-12)  # the identified part of the deviation is part of it
    table = task_table(idata)
    assert table["delta_w_ratio_point"] == dw.tolist() and table["identified_coords"] == count.tolist()
    assert not table["tau_varies"] and not table["pooling_factor_varies"]  # one draw


def test_task_table_flags_what_varies_between_draws():
    idata = _random_idata(False, S=5)  # tau varies between draws
    t = task_table(idata)
    assert t["tau_varies"] and t["shrinkage_varies"]
    fixed = to_inference_data(tasks=["a", "b"], modules=["m"], tau=np.full((3, 1), 10.0),
                              deviation=np.random.default_rng(0).random((3, 2, 1)), global_norm=np.ones((3, 1)),
                              fisher=np.array([10.0, 30.0]), fisher_module=np.array([[10.0], [30.0]]),
                              coords_per_module=np.array([4]), train_docs=np.array([5, 9]),
                              train_tokens=np.array([50, 90]), pooling_factor=np.full((3, 2), 0.4),
                              effective_parameters=np.full((3, 2), 1.5),
                              delta_w_identified=np.array([[0.1, 0.0], [0.2, 0.0], [0.3, 0.0]]),
                              delta_w_ratio_point=np.array([0.2, 0.0]), identified_coords=np.array([3, 0]))
    t = task_table(fixed)
    assert not t["tau_varies"] and not t["pooling_factor_varies"] and not t["effective_parameters_varies"]
    assert t["delta_w_identified_varies"] and t["deviation_total_varies"]
    assert t["delta_w_ratio_point"] == [0.2, 0.0] and t["identified_coords"] == [3, 0]


def test_gain_kept_is_function_space_and_gauge_invariant():
    """The model's likelihood, hence gain_kept, is unchanged by A -> cA, B -> B/c."""
    bora, train = _fit(steps=3)
    feed = bora.feed(train)
    b = feed.batch(torch.arange(len(train)))
    params = bora.params()
    scaled = {k: (2.5 * A, B / 2.5) for k, (A, B) in params.items()}
    with torch.no_grad():
        base = -bora.model.loglik(b, None).double()
        fit = -bora.model.loglik(b, params).double()
        fit_c = -bora.model.loglik(b, scaled).double()
    torch.testing.assert_close(fit_c, fit, rtol=1e-5, atol=1e-4)
    indep = fit - 0.1  # any third fit
    np.testing.assert_allclose(gain_kept(base.numpy(), fit_c.numpy(), indep.numpy()),
                               gain_kept(base.numpy(), fit.numpy(), indep.numpy()), rtol=1e-3)


def test_a_bora_is_a_fit_view_and_a_bare_object_is_not():
    from bora.diagnostics.view import FitView

    cfg = BoraConfig(model="tiny", adapter=AdapterConfig(rank=2, targets=("q_proj",), layers=(-1,)))
    bora = Bora(cfg, tiny_llama(layers=2), TinyTokenizer(), ("a", "b"), 4)
    assert isinstance(bora, FitView)
    assert not isinstance(bora.model, FitView)
