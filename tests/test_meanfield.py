"""Mean-field variational inference: exactness on a linear-Gaussian hierarchy, bora's meanfield fit,
warm start from a MAP fit, and the command line (fit --guide meanfield, evaluate --samples, export, sample)."""

import copy
import importlib.util
import json
import math
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO

from bora.api import Bora
from bora.cli.main import main
from bora.core.config import AdapterConfig, BoraConfig, ConfigError, FitConfig, PriorConfig
from bora.model.guides import AutoNormal  # module-local parameters, as in a bora fit

from conftest import TinyTokenizer, task_data, tiny_llama, tiny_model_dir, write_jsonl

# ----------------------------------------------------------------------------- linear-Gaussian hierarchy
# bora's prior structure with a Gaussian likelihood: Theta ~ N(0, s), tau ~ Gamma(a, b),
# theta_t ~ N(Theta, tau^-1/2) in plate("tasks"), y_n ~ N(theta_task(n), sigma) in a minibatched plate("data").
T, D, S_GLOBAL, SIGMA, A, B, TRUE_TAU = 200, 2, 3.0, 1.0, 1.0, 0.01, 4.0


def lg_data(seed=0):
    g = torch.Generator().manual_seed(seed)
    Theta = torch.tensor([1.0, -0.5])
    theta = Theta + TRUE_TAU ** -0.5 * torch.randn(T, D, generator=g)
    J = torch.randint(2, 9, (T,), generator=g)  # unequal task sizes
    task = torch.repeat_interleave(torch.arange(T), J)
    y = theta[task] + SIGMA * torch.randn(len(task), D, generator=g)
    return y, task, J


def lg_model(y, task, idx):
    Theta = pyro.sample("Theta", dist.Normal(torch.zeros(D), S_GLOBAL).to_event(1))
    tau = pyro.sample("tau", dist.Gamma(torch.tensor(A), torch.tensor(B)))
    with pyro.plate("tasks", T, dim=-1):
        theta = pyro.sample("theta", dist.Normal(Theta.expand(T, D), tau.rsqrt()).to_event(1))
    with pyro.plate("data", len(task), subsample=idx, dim=-1):  # scales the minibatch by N / batch
        pyro.sample("y", dist.Normal(theta[task[idx]], SIGMA).to_event(1), obs=y[idx])


def exact_means(y, task, J, tau):
    """Posterior means of Theta and every theta_t given tau (the joint posterior is Gaussian)."""
    ybar = torch.zeros(T, D, dtype=torch.float64).index_add_(0, task, y.double()) / J[:, None]
    v = 1 / tau + SIGMA ** 2 / J.double()  # ybar_t | Theta ~ N(Theta, v_t)
    Theta = (ybar / v[:, None]).sum(0) / (1 / S_GLOBAL ** 2 + (1 / v).sum())
    lam = J.double()[:, None] / SIGMA ** 2
    return Theta, (tau * Theta + lam * ybar) / (tau + lam)


def exact_tau_median(y, task, J):
    """Median of p(tau | y) on a grid: ybar ~ N(0, diag(v) + s^2 11^T) per dimension (Sherman-Morrison)."""
    ybar = torch.zeros(T, D, dtype=torch.float64).index_add_(0, task, y.double()) / J[:, None]
    grid = torch.linspace(math.log(0.3), math.log(50.0), 2000, dtype=torch.float64).exp()
    c = S_GLOBAL ** 2
    lp = []
    for t in grid:
        d = 1 / t + SIGMA ** 2 / J.double()
        k = 1 + c * (1 / d).sum()
        logdet = d.log().sum() + k.log()
        quad = ((ybar ** 2) / d[:, None]).sum(0) - c * ((ybar / d[:, None]).sum(0)) ** 2 / k
        lp.append(float(-0.5 * (D * logdet + quad.sum()) + dist.Gamma(A, B).log_prob(t)))
    lp = torch.tensor(lp, dtype=torch.float64)
    w = (lp - lp.max()).exp()
    # the grid is uniform in log tau: weight by tau for the density in tau
    w = w * grid
    cdf = (w / w.sum()).cumsum(0)
    return float(grid[int((cdf >= 0.5).nonzero()[0])])


def test_meanfield_recovers_linear_gaussian_posterior():
    y, task, J = lg_data()
    N, M = len(task), len(task) // 2
    pyro.set_rng_seed(0)
    init = {"Theta": torch.zeros(D), "theta": torch.zeros(T, D), "tau": torch.tensor(1.0)}
    guide = AutoNormal(lg_model, init_scale=1e-3, init_loc_fn=lambda site: init[site["name"]].clone())
    guide(y, task, torch.arange(M))
    elbo = Trace_ELBO()(lg_model, guide)  # the same loop as bora.infer: ELBO module + torch optimiser
    steps = 800
    opt = torch.optim.Adam(guide.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: 1.0 if k < steps // 2 else 0.01 ** ((k - steps // 2) / (steps - steps // 2)))
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        idx = torch.randperm(N, generator=gen)[:M]
        loss = elbo(y, task, idx)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    med = {k: v.detach() for k, v in guide.median().items()}
    tau_hat, tau_exact = float(med["tau"]), exact_tau_median(y, task, J)
    # tau: many tasks identify it; the mean-field estimate is close to the exact posterior median
    assert tau_hat == pytest.approx(tau_exact, rel=0.15)
    assert tau_hat == pytest.approx(TRUE_TAU, rel=0.25)
    # means: for a Gaussian posterior mean-field VI recovers the exact means (given tau); tolerance
    # 0.15 is about half a posterior standard deviation of a theta_t (~0.33), rms within 0.05
    Theta, theta = exact_means(y, task, J, tau_exact)
    torch.testing.assert_close(med["Theta"].double(), Theta, atol=0.03, rtol=0)
    err = med["theta"].double() - theta
    assert err.abs().max() < 0.15 and err.square().mean().sqrt() < 0.05
    # and it learned a spread: posterior scales are far above the initial 1e-3 and below the prior's
    sd = guide.scales.theta.detach()  # unconstrained == constrained for real sites
    assert (sd > 0.1).all() and (sd < 0.6).all()


# ----------------------------------------------------------------------------- bora's mean-field fit
TRAIN, VAL = (16, 8, 4), (6, 4, 3)


def config(guide="meanfield", mode="learned", **fit):
    f = dict(steps=6, batch_size=8, lr=2e-2, fisher_docs=4, patience=0, warmup=0.0, guide=guide)
    f.update(fit)
    return BoraConfig(model="tiny", adapter=AdapterConfig(rank=2, targets=("q_proj", "v_proj"), layers=(-1,)),
                      prior=PriorConfig(tau_mode=mode, tau=10.0), fit=FitConfig(**f))


def test_meanfield_fit_learns_scales_and_tau_by_variational_em():
    train, val = task_data(TRAIN, seed=1), task_data(VAL, seed=2)
    bora = Bora(config(num_particles=2, meanfield_start="init"), tiny_llama(), TinyTokenizer(), train.tasks, len(train))
    names = {k.split(".", 1)[1] for k in bora.guide.state_dict()}
    # centred task sites ('auto' for mean-field); tau is a hyperparameter set by the variational M-step
    assert any(n.startswith("theta_B:") and "_decentered" not in n for n in names)
    assert not any(n.startswith("tau") for n in names) and bora.tau is not None
    before = {k: v.clone() for k, v in bora.guide.state_dict().items()}
    res = bora.fit(train, val, progress=False)
    after = bora.guide.state_dict()
    assert res.steps == 6 and math.isfinite(res.history[-1]["val_nll"])
    moved = [k for k in before if k.startswith("scales.") and not torch.equal(before[k], after[k])]
    assert len(moved) == sum(k.startswith("scales.") for k in before)
    taus = [h["tau"]["tau"] for h in res.history]
    assert taus[0] == 10.0 and all(0 < t < 1e6 for t in taus) and taus[-1] != 10.0  # moved by the M-step


def test_meanfield_starts_at_a_map_fit_by_default():
    """``--guide meanfield`` alone: a MAP phase (offset sites, evidence tau) first, then the variational fit from its
    estimates; tau stays within 2x of the MAP's and the posterior mean validates within 1% of the MAP."""
    train, val = task_data(TRAIN, seed=1), task_data(VAL, seed=2)
    lm = tiny_llama()
    mf = Bora(config(steps=30, eval_every=5), copy.deepcopy(lm), TinyTokenizer(), train.tasks, len(train))
    res = mf.fit(train, val, progress=False)
    m = mf.map_phase
    assert m is not None and m.steps == 30 and m.tau is not None
    assert res.history[0]["tau"]["tau"] == pytest.approx(m.tau["tau"], rel=1e-6)  # started at the MAP's tau
    assert all(0.5 < h["tau"]["tau"] / m.tau["tau"] < 2.0 for h in res.history)
    assert res.best_val_nll <= m.best_val_nll * 1.01
    # the MAP phase is what `--guide map` fits: same data, seed and settings
    alone = Bora(config("map", steps=30, eval_every=5), copy.deepcopy(lm), TinyTokenizer(), train.tasks, len(train))
    assert alone.fit(train, val, progress=False).best_val_nll == pytest.approx(m.best_val_nll, rel=1e-6)
    # a warm start replaces the MAP phase
    skip = Bora(config(steps=2), copy.deepcopy(lm), TinyTokenizer(), train.tasks, len(train))
    assert skip.config.fit.meanfield_start == "map"
    skip.config = skip.config.replace(fit=skip.config.fit.replace(meanfield_start="init"))
    skip.fit(train, val, progress=False)
    assert skip.map_phase is None


def test_warm_start_copies_map_estimates(tmp_path):
    lm = tiny_llama()
    train, val = task_data(TRAIN, seed=1), task_data(VAL, seed=2)

    m = Bora(config("map"), copy.deepcopy(lm), TinyTokenizer(), train.tasks, len(train))
    m.fit(train, val, progress=False)
    m.fit_laplace_(train)
    m.save(tmp_path / "map")
    mf = Bora(config("meanfield"), copy.deepcopy(lm), TinyTokenizer(), train.tasks, len(train))
    # 'auto': the two fits use different coordinates
    assert mf.model.parameterisation == "centred" and m.model.parameterisation == "offset"
    report = mf.init_from(tmp_path / "map")
    assert report["kept"] == [] and "tau" in report["copied"]
    point_map, point_mf = m.point(), mf.point()
    for name, v in point_map.items():
        if not name.endswith(("_decentered", "_offset")):
            torch.testing.assert_close(point_mf[name], v)
    assert mf.tau_estimate()["tau"] == pytest.approx(m.tau_estimate()["tau"])
    # the scales start at the source's Laplace posterior: (F + tau)^-1/2 per task coordinate
    key = next(iter(m.model.shapes))
    loc, scale = mf.guide._get_loc_and_scale(f"theta_B:{key}")
    torch.testing.assert_close(scale.detach(), m.laplace.task_sd(key, 1), rtol=1e-4, atol=1e-7)
    # the global B: the mean-field optimum given the task sites (prior + coupling to T tasks), not the vague marginal
    _, gscale = mf.guide._get_loc_and_scale(f"Theta_B:{key}")
    want = (1.0 / mf.config.prior.global_scale ** 2 + len(train.tasks) * mf.tau_estimate()["tau"]) ** -0.5
    torch.testing.assert_close(gscale.detach(), torch.full_like(gscale, want), rtol=1e-4, atol=1e-7)
    assert mf.evaluate(val)["overall"]["nll_task_mean"] == pytest.approx(m.evaluate(val)["overall"]["nll_task_mean"],
                                                                         abs=1e-5)
    # a mean-field source is resumed: locs and scales
    mf.save(tmp_path / "mf")
    # analysis/meanfield_scales.py compares the saved scales with the source's Laplace sds: equal at the warm start
    spec = importlib.util.spec_from_file_location("mfs", Path(__file__).parents[1] / "analysis" / "meanfield_scales.py")
    mfs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mfs)
    cmp = mfs.compare(tmp_path / "mf", tmp_path / "map",
                      load=lambda path: Bora.load(path, lm=copy.deepcopy(lm), tokenizer=TinyTokenizer()))
    assert cmp["ratio_q10"] == pytest.approx(1.0, rel=1e-3) and cmp["ratio_q90"] == pytest.approx(1.0, rel=1e-3)
    assert cmp["coordinates"] == sum(m.laplace.task_sd(k, 1).numel() for k in m.model.shapes)
    again = Bora(config("meanfield"), copy.deepcopy(lm), TinyTokenizer(), tuple(reversed(train.tasks)), len(train))
    again.init_from(tmp_path / "mf")  # tasks are matched by name
    a, b = mf.guide.state_dict(), again.guide.state_dict()
    for name, v in a.items():
        want = v.flip(0) if ".theta_" in name else v
        torch.testing.assert_close(b[name], want)
    # mismatched settings are a one-line user error
    other = Bora(config("meanfield").replace(adapter=AdapterConfig(rank=3, targets=("q_proj", "v_proj"), layers=(-1,))),
                 copy.deepcopy(lm), TinyTokenizer(), train.tasks, len(train))
    with pytest.raises(ConfigError, match="adapter settings"):
        other.init_from(tmp_path / "map")


def test_offset_fits_save_load_and_warm_start_across_parameterisations(tmp_path):
    """The offset form (theta_t = Theta + delta_t): a MAP fit reloads exactly, a non-centred fit warm-starts
    it at the same adapters, and a mean-field guide's delta scales start at the prior sd tau^-1/2."""
    from bora.io.fitfolder import natural_estimates

    lm = tiny_llama()
    train, val = task_data(TRAIN, seed=1), task_data(VAL, seed=2)
    off_cfg = config("map")
    off_cfg = off_cfg.replace(prior=off_cfg.prior.replace(parameterisation="offset"))
    off = Bora(off_cfg, copy.deepcopy(lm), TinyTokenizer(), train.tasks, len(train))
    assert off.model.parameterisation == "offset" == Bora(config("map"), copy.deepcopy(lm), TinyTokenizer(),
                                                           train.tasks, len(train)).model.parameterisation  # 'auto'
    assert any("_offset" in k for k in off.guide.state_dict())
    res = off.fit(train, val, progress=False)
    assert math.isfinite(res.history[-1]["val_nll"]) and off.tau is not None
    off.save(tmp_path / "off")
    assert not any(k.endswith("_offset") for k in natural_estimates(off))
    back = Bora.load(tmp_path / "off", lm=copy.deepcopy(lm), tokenizer=TinyTokenizer())
    assert back.evaluate(val)["overall"]["nll_task_mean"] == off.evaluate(val)["overall"]["nll_task_mean"]

    non_cfg = config("map")
    non = Bora(non_cfg.replace(prior=non_cfg.prior.replace(parameterisation="noncentred")), copy.deepcopy(lm),
               TinyTokenizer(), train.tasks, len(train))
    assert non.model.parameterisation == "noncentred"
    non.fit(train, val, progress=False)
    non.save(tmp_path / "non")
    warm = Bora(off_cfg, copy.deepcopy(lm), TinyTokenizer(), train.tasks, len(train))
    assert warm.init_from(tmp_path / "non")["kept"] == []
    for name, v in non.point().items():
        if not name.endswith("_decentered"):
            torch.testing.assert_close(warm.point()[name], v)

    mf_cfg = config("meanfield")
    mf = Bora(mf_cfg.replace(prior=mf_cfg.prior.replace(parameterisation="offset")), copy.deepcopy(lm),
              TinyTokenizer(), train.tasks, len(train))
    key = next(iter(mf.model.shapes))
    _, scale = mf.guide._get_loc_and_scale(f"theta_B:{key}_offset")
    torch.testing.assert_close(scale.detach(), torch.full_like(scale, 10.0 ** -0.5))


# ----------------------------------------------------------------------------- command line
def test_cli_meanfield_fit_evaluate_export_sample(tmp_path, capsys):
    model, data = tiny_model_dir(tmp_path / "model"), write_jsonl(tmp_path / "data.jsonl")
    common = ["--model", str(model), "--data", str(data), "--task-column", "speaker", "--targets", "q_proj",
              "v_proj", "--layers", "-1", "--rank", "2", "--steps", "4", "--batch-size", "8", "--lr", "0.02",
              "--quiet", "--device", "cpu"]
    assert main(["fit", *common, "--output", str(tmp_path / "map")]) == 0
    rc = main(["fit", *common, "--guide", "meanfield", "--init-scale", "0.05", "--num-particles", "2",
               "--init-from", str(tmp_path / "map"), "--output", str(tmp_path / "mf")])
    out = capsys.readouterr().out
    assert rc == 0 and "warm start from" in out and "guide=meanfield" in out
    cfg = json.loads((tmp_path / "mf" / "config.json").read_text())
    assert cfg["fit"]["guide"] == "meanfield" and cfg["fit"]["num_particles"] == 2 and cfg["fit"]["init_scale"] == 0.05

    assert main(["evaluate", str(tmp_path / "mf"), "--samples", "4", "--quiet", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for row in ("BMA (S=4)", "expected calibration error", "Brier score", "mutual information", "interval"):
        assert row in out
    assert main(["evaluate", str(tmp_path / "mf"), "--samples", "2", "--predictive", "linear", "--quiet",
                 "--device", "cpu"]) == 0
    assert "BMA (S=2, linearised)" in capsys.readouterr().out
    # a centred mean-field posterior gets the tilted document-level estimator (tests/test_tilted.py: what does not)
    assert main(["evaluate", str(tmp_path / "mf"), "--samples", "2", "--doc-estimator", "tilted", "--quiet",
                 "--device", "cpu"]) == 0
    assert "effective sample size median" in capsys.readouterr().out

    assert main(["export", str(tmp_path / "mf"), "--all", "--output", str(tmp_path / "peft"), "--device", "cpu"]) == 0
    index = json.loads((tmp_path / "peft" / "index.json").read_text())
    assert set(index["tasks"]) == {"spk0", "spk1", "spk2"} and index["global"] == "_global"
    for folder in [*index["tasks"].values(), "_global"]:
        assert (tmp_path / "peft" / folder / "adapter_model.safetensors").exists()
        assert (tmp_path / "peft" / folder / "adapter_config.json").exists()

    capsys.readouterr()
    assert main(["sample", str(tmp_path / "mf"), "--task", "spk1", "--prompt", "w1 w9 w1", "--samples", "3",
                 "--max-new-tokens", "3", "--seed", "1", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "[3]" in out and "mutual information" in out
    # a task that is not in the fit: adapters drawn from the global level
    assert main(["sample", str(tmp_path / "mf"), "--task", "nobody", "--prompt", "w1", "--samples", "2",
                 "--max-new-tokens", "2", "--device", "cpu"]) == 0
    assert "not in the fit" in capsys.readouterr().out

    # user errors: one line, exit 2
    assert main(["export", str(tmp_path / "mf"), "--task", "nobody", "--output", str(tmp_path / "x"),
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bora: error:") and "not in this fit" in err and "\n" not in err
    assert not (tmp_path / "x").exists()
    assert main(["sample", str(tmp_path / "missing"), "--task", "a", "--prompt", "w1"]) == 2
