"""The Pyro model: structure, closed-form log joint, special cases, minibatch scaling, init point."""


import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

from bora.config import AdapterConfig, PriorConfig
from bora.data import collate
from bora.guides import make_guide, point_values
from bora.inject import inject_adapters_
from bora.model import BoraModel, site_names

from conftest import task_data, tiny_llama

T = 3


def build(mode="fixed", tau=50.0, per_module=False, n_docs=42, layers=None):
    lm = tiny_llama()
    adapters = inject_adapters_(lm, AdapterConfig(rank=2, targets=("q_proj", "v_proj"), layers=layers))
    prior = PriorConfig(tau_mode=mode, tau=tau, tau_per_module=per_module, global_scale=0.7)
    return BoraModel(lm, adapters, ("a", "b", "c"), n_docs, prior)


def batch_of(split, idx):
    return collate(split, torch.as_tensor(idx))


def random_values(model, scale=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    vals = {}
    for k, (sa, sb) in model.shapes.items():
        n = site_names(k)
        if model.has_global:
            vals[n["GA"]] = torch.randn(sa, generator=g) * scale
            vals[n["GB"]] = torch.randn(sb, generator=g) * scale
        if model.has_tasks:
            vals[n["TA"]] = torch.randn(T, *sa, generator=g) * scale
            vals[n["TB"]] = torch.randn(T, *sb, generator=g) * scale
    for name in model.tau_groups():
        vals[name] = torch.tensor(7.0)
    return vals


@pytest.mark.parametrize("mode", ["fixed", "learned", "independent", "shared"])
def test_log_joint_equals_closed_form(mode):
    split = task_data()
    model = build(mode, n_docs=len(split))
    vals = random_values(model)
    b = batch_of(split, [0, 5, 30, 40])
    tr = poutine.trace(poutine.condition(model, data=vals)).get_trace(b)
    got = tr.log_prob_sum()
    s, tau = 0.7, 50.0
    want = torch.tensor(0.0)
    for k in model.shapes:
        n = site_names(k)
        for g_, t_ in (("GA", "TA"), ("GB", "TB")):
            if mode != "independent":
                want = want + dist.Normal(0.0, s).log_prob(vals[n[g_]]).sum()
            if mode in ("fixed", "learned"):
                t = 7.0 if mode == "learned" else tau
                want = want + dist.Normal(vals[n[g_]], t ** -0.5).log_prob(vals[n[t_]]).sum()
            if mode == "independent":
                want = want + dist.Normal(0.0, s).log_prob(vals[n[t_]]).sum()
    if mode == "learned":
        want = want + dist.Gamma(1.0, 1e-4).log_prob(torch.tensor(7.0))
    params = model.params_from_values(vals)
    with torch.no_grad():
        ll = model.loglik(b, params).sum()
    want = want + len(split) / 4 * ll
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("per_module", [False, True])
def test_trace_structure(per_module):
    split = task_data()
    model = build("learned", per_module=per_module, n_docs=len(split))
    tr = poutine.trace(model).get_trace(batch_of(split, [0, 1]))
    for name, node in tr.nodes.items():
        if node["type"] != "sample":
            continue
        plates = {f.name for f in node["cond_indep_stack"]}
        if name.startswith("Theta_") or name.startswith("tau"):
            assert plates == set(), name
            assert node["fn"].batch_shape == ()
        elif name.startswith("theta_"):
            assert plates == {"tasks"} and node["value"].shape[0] == T
        elif name == "loglik":
            assert plates == {"data"}
    taus = [n for n in tr.nodes if n.startswith("tau")]
    assert len(taus) == (len(model.shapes) if per_module else 1)


def test_shared_uses_one_adapter_and_independent_is_uncoupled():
    split = task_data()
    shared = build("shared", n_docs=len(split))
    tr = poutine.trace(shared).get_trace(batch_of(split, [0]))
    assert not any(n.startswith("theta_") for n in tr.nodes)
    params = shared.params_from_values(random_values(shared))
    b = batch_of(split, [0, 0, 0])
    b["task_ids"] = torch.tensor([0, 1, 2])
    with torch.no_grad():
        ll = shared.loglik(b, params)
    assert torch.allclose(ll, ll[0].expand(3))  # every task sees the same adapter

    ind = build("independent", n_docs=len(split))
    tr = poutine.trace(ind).get_trace(batch_of(split, [0]))
    assert not any(n.startswith("Theta_") for n in tr.nodes)
    # no coupling: the prior's gradient for task 0 ignores task 1's adapter entirely
    vals = random_values(ind)
    key = site_names(next(iter(ind.shapes)))["TA"]

    def grad_task0(v):
        v = {k: x.clone().requires_grad_(k == key) for k, x in v.items()}
        lp = poutine.trace(poutine.condition(ind.sample_adapters, data=v)).get_trace().log_prob_sum()
        return torch.autograd.grad(lp, v[key])[0][0]

    g1 = grad_task0(vals)
    vals[key] = vals[key].clone()
    vals[key][1] += 5.0
    torch.testing.assert_close(grad_task0(vals), g1)
    # while a finite tau couples task 0 to the others through the global adapter's posterior
    fixed = build("fixed", n_docs=len(split))
    assert any(n.startswith("Theta_") for n in poutine.trace(fixed).get_trace(batch_of(split, [0])).nodes)


def test_minibatch_loglik_is_unbiased():
    split = task_data((8, 8, 8))
    N = len(split)
    model = build("fixed", n_docs=N)
    vals = random_values(model)
    cond = poutine.condition(model, data=vals)
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(0))
    estimates = []
    for idx in perm.view(-1, 6):  # a partition into equal minibatches
        tr = poutine.trace(cond).get_trace(batch_of(split, idx))
        node = tr.nodes["loglik"]
        assert node["scale"] == pytest.approx(N / 6)
        estimates.append(float(node["scale"] * node["fn"].log_prob(node["value"]).sum()))
    with torch.no_grad():
        full = float(model.loglik(batch_of(split, range(N)), model.params_from_values(vals)).sum())
    # the mean of the scaled minibatch estimates over a uniform partition is the full-data sum
    assert sum(estimates) / len(estimates) == pytest.approx(full, rel=1e-5)
    assert max(estimates) - min(estimates) > 1e-3  # they are genuinely noisy estimates


@pytest.mark.parametrize("kind", ["map", "meanfield"])
@pytest.mark.parametrize("mode", ["fixed", "independent", "shared"])
def test_step_zero_is_the_base_model(kind, mode):
    split = task_data()
    model = build(mode, n_docs=len(split))
    guide = make_guide(model, kind)
    b = batch_of(split, range(len(split)))
    guide(b)
    params = model.params_from_values(point_values(guide))
    with torch.no_grad():
        base = model.loglik(b, None)
        init = model.loglik(b, params)
    assert torch.equal(base, init)
    for k, (A, B) in params.items():
        assert A.abs().sum() > 0 and B.abs().sum() == 0  # random shared A, zero B: not the A=B=0 saddle
        if A.dim() == 3:
            assert torch.equal(A[0], A[-1])
    if kind == "meanfield":  # sampled adapters start near the base model
        with torch.no_grad():
            sampled = model.params_from_values(guide())
            ll = model.loglik(b, sampled)
        assert (ll - base).abs().max() < 1e-2 * base.abs().max()
