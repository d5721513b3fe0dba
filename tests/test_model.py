"""The Pyro model: structure, closed-form log joint, special cases, minibatch scaling, init point."""

import math

import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

from bora.core.config import AdapterConfig, PriorConfig
from bora.data.batching import collate
from bora.model.guides import make_guide, point_values
from bora.lora.inject import inject_adapters_
from bora.model.hierarchy import BoraModel, site_names

from conftest import task_data, tiny_llama

T = 3


def build(mode="fixed", tau=50.0, per_module=False, n_docs=42, layers=None, hierarchy="B",
          parameterisation="noncentred"):
    lm = tiny_llama()
    adapters = inject_adapters_(lm, AdapterConfig(rank=2, targets=("q_proj", "v_proj"), layers=layers))
    prior = PriorConfig(tau_mode=mode, tau=tau, tau_per_module=per_module, global_scale=0.7, hierarchy=hierarchy,
                        parameterisation=parameterisation)
    return BoraModel(lm, adapters, ("a", "b", "c"), n_docs, prior)


def batch_of(split, idx):
    return collate(split, torch.as_tensor(idx))


def random_values(model, scale=0.1, seed=0):
    """Natural-coordinate values of every adapter site (and tau = 7 when learned)."""
    g = torch.Generator().manual_seed(seed)
    vals = {}
    for k, shapes in model.shapes.items():
        n = site_names(k)
        if model.has_global or model.shared_A:
            vals[n["GA"]] = torch.randn(shapes[0], generator=g) * scale
        if model.has_global:
            vals[n["GB"]] = torch.randn(shapes[1], generator=g) * scale
        for i, site, _ in model.task_sites(k):
            vals[site] = torch.randn(T, *shapes[i], generator=g) * scale
    for name in model.tau_groups():
        vals[name] = torch.tensor(7.0)
    return vals


@pytest.mark.parametrize("hierarchy", ["B", "AB"])
@pytest.mark.parametrize("mode", ["fixed", "learned", "uncoupled", "shared"])
def test_log_joint_equals_closed_form(mode, hierarchy):
    split = task_data()
    model = build(mode, n_docs=len(split), hierarchy=hierarchy, parameterisation="centred")
    vals = random_values(model)
    b = batch_of(split, [0, 5, 30, 40])
    tr = poutine.trace(poutine.condition(model, data=vals)).get_trace(b)
    got = tr.log_prob_sum()
    s, tau = 0.7, 50.0
    want = torch.tensor(0.0)
    for k in model.shapes:
        n = site_names(k)
        for i, (g_, t_) in enumerate((("GA", "TA"), ("GB", "TB"))):
            task_level = hierarchy == "AB" or i == 1
            if mode != "uncoupled" or (i == 0 and hierarchy == "B"):
                want = want + dist.Normal(0.0, s).log_prob(vals[n[g_]]).sum()
            if mode in ("fixed", "learned") and task_level:
                t = 7.0 if mode == "learned" else tau
                want = want + dist.Normal(vals[n[g_]], t ** -0.5).log_prob(vals[n[t_]]).sum()
            if mode == "uncoupled" and task_level:
                want = want + dist.Normal(0.0, s).log_prob(vals[n[t_]]).sum()
    if mode == "learned":
        want = want + dist.Gamma(1.0, 1e-4).log_prob(torch.tensor(7.0))
    params = model.params_from_values(vals)
    with torch.no_grad():
        ll = model.loglik(b, params).sum()
    want = want + len(split) / 4 * ll
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("parameterisation", ["noncentred", "offset"])
@pytest.mark.parametrize("hierarchy", ["B", "AB"])
def test_reparameterised_forms_are_the_same_model(hierarchy, parameterisation):
    """The same adapters and likelihood in every form. Non-centred, theta_t = Theta + tau^-1/2 z_t: density
    in z-coordinates = density in theta-coordinates - (D/2) log tau (D task-level coordinates); offset,
    theta_t = Theta + delta_t: a translation, the density is unchanged."""
    split = task_data()
    b = batch_of(split, [0, 5, 30, 40])
    cen = build("fixed", n_docs=len(split), hierarchy=hierarchy, parameterisation="centred")
    rep = build("fixed", n_docs=len(split), hierarchy=hierarchy, parameterisation=parameterisation)
    vals = random_values(cen)
    latent = {k: v for k, v in vals.items() if not k.startswith("theta_")}
    scale, suffix = (50.0 ** 0.5, "_decentered") if parameterisation == "noncentred" else (1.0, "_offset")
    D = 0
    for k in rep.shapes:
        for _, site, glob in rep.task_sites(k):
            latent[site + suffix] = (vals[site] - vals[glob]) * scale
            D += vals[site].numel()
    full = rep.complete(latent)
    for k in rep.shapes:
        for _, site, _ in rep.task_sites(k):
            torch.testing.assert_close(full[site], vals[site])
    lp_c = poutine.trace(poutine.condition(cen, data=vals)).get_trace(b).log_prob_sum()
    lp_r = poutine.trace(poutine.condition(rep, data=latent)).get_trace(b).log_prob_sum()
    jacobian = 0.5 * D * math.log(50.0) if parameterisation == "noncentred" else 0.0
    torch.testing.assert_close(lp_r, lp_c - jacobian, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("parameterisation", ["noncentred", "offset", "centred"])
@pytest.mark.parametrize("hierarchy", ["B", "AB"])
@pytest.mark.parametrize("per_module", [False, True])
def test_trace_structure(per_module, hierarchy, parameterisation):
    split = task_data()
    model = build("learned", per_module=per_module, n_docs=len(split), hierarchy=hierarchy,
                  parameterisation=parameterisation)
    tr = poutine.trace(model).get_trace(batch_of(split, [0, 1]))
    seen = set()
    for name, node in tr.nodes.items():
        if node["type"] != "sample":
            continue
        plates = {f.name for f in node["cond_indep_stack"]}
        seen.add(name.partition(":")[0])
        if name.startswith("Theta_") or name.startswith("tau"):
            assert plates == set(), name
            assert node["fn"].batch_shape == ()
        elif name.startswith("theta_"):
            assert plates == {"tasks"} and node["value"].shape[0] == T
            # the latent is z (non-centred), delta (offset) or theta itself (centred); theta is then deterministic
            suffix = {"noncentred": "_decentered", "offset": "_offset"}.get(parameterisation)
            latent = suffix is None or name.endswith(suffix)
            assert not name.endswith(("_decentered", "_offset")) or latent
            assert node["is_observed"] == (not latent), name
        elif name == "loglik":
            assert plates == {"data"}
    assert ("theta_A" in seen) == (hierarchy == "AB") and "theta_B" in seen
    taus = [n for n in tr.nodes if n.startswith("tau")]
    assert len(taus) == (len(model.shapes) if per_module else 1)


@pytest.mark.parametrize("hierarchy", ["B", "AB"])
def test_shared_uses_one_adapter_and_independent_is_uncoupled(hierarchy):
    split = task_data()
    shared = build("shared", n_docs=len(split), hierarchy=hierarchy)
    tr = poutine.trace(shared).get_trace(batch_of(split, [0]))
    assert not any(n.startswith("theta_") for n in tr.nodes)
    params = shared.params_from_values(random_values(shared))
    b = batch_of(split, [0, 0, 0])
    b["task_ids"] = torch.tensor([0, 1, 2])
    with torch.no_grad():
        ll = shared.loglik(b, params)
    assert torch.allclose(ll, ll[0].expand(3))  # every task sees the same adapter

    ind = build("uncoupled", n_docs=len(split), hierarchy=hierarchy)
    tr = poutine.trace(ind).get_trace(batch_of(split, [0]))
    assert not any(n.startswith("Theta_B") for n in tr.nodes)
    assert any(n.startswith("Theta_A") for n in tr.nodes) == (hierarchy == "B")  # the shared A
    # no coupling: the prior's gradient for task 0 ignores task 1's adapter entirely
    vals = random_values(ind)
    key = site_names(next(iter(ind.shapes)))["TB"]

    def grad_task0(v):
        v = {k: x.clone().requires_grad_(k == key) for k, x in v.items()}
        lp = poutine.trace(poutine.condition(ind.sample_adapters, data=v)).get_trace().log_prob_sum()
        return torch.autograd.grad(lp, v[key])[0][0]

    g1 = grad_task0(vals)
    vals[key] = vals[key].clone()
    vals[key][1] += 5.0
    torch.testing.assert_close(grad_task0(vals), g1)
    # while a finite tau couples task 0 to the others through the global adapter's posterior
    fixed = build("fixed", n_docs=len(split), hierarchy=hierarchy)
    assert any(n.startswith("Theta_B") for n in poutine.trace(fixed).get_trace(batch_of(split, [0])).nodes)


def test_shared_A_has_orthonormal_rows_and_tau_is_gauge_free():
    """hierarchy='B': A -> cA changes no adapter (so no learned tau); ||Delta W_t - Delta W|| = ||B_t - Theta_B||."""
    split = task_data()
    model = build("fixed", n_docs=len(split), parameterisation="centred")
    vals = random_values(model)
    scaled = {k: (3.0 * v if k.startswith("Theta_A") else v) for k, v in vals.items()}
    p1, p2 = model.params_from_values(vals), model.params_from_values(scaled)
    glob = model.global_from_values(vals)
    for k in p1:
        torch.testing.assert_close(p1[k][0], p2[k][0])
        A = p1[k][0][0]
        torch.testing.assert_close(A @ A.T, torch.eye(A.shape[0]), atol=1e-5, rtol=0)
        dW = torch.einsum("tor,ri->toi", p1[k][1] - glob[k][1], A)
        torch.testing.assert_close(dW.square().sum(), (p1[k][1] - glob[k][1]).square().sum(), rtol=1e-4, atol=1e-6)


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


@pytest.mark.parametrize("hierarchy", ["B", "AB"])
@pytest.mark.parametrize("kind", ["map", "meanfield"])
@pytest.mark.parametrize("mode", ["fixed", "uncoupled", "shared"])
def test_step_zero_is_the_base_model(kind, mode, hierarchy):
    split = task_data()
    model = build(mode, n_docs=len(split), hierarchy=hierarchy)
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
            sampled = model.params_from_values(guide())  # latent values: completed inside
            ll = model.loglik(b, sampled)
        assert (ll - base).abs().max() < 1e-2 * base.abs().max()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_loglik_equals_transformers_labels_loss_and_ignores_padding(arch):
    """Per-document log-likelihood against transformers' own ``labels=`` loss, document by document,
    with adapters set and in right-padded batches (padding must change nothing)."""
    from conftest import tiny_gpt2

    lm = tiny_llama() if arch == "llama" else tiny_gpt2()
    targets = ("q_proj", "v_proj") if arch == "llama" else ("c_attn",)
    adapters = inject_adapters_(lm, AdapterConfig(rank=2, targets=targets, layers=(-2, -1)))
    model = BoraModel(lm, adapters, ("a", "b", "c"), 42, PriorConfig(tau_mode="fixed", tau=50.0))
    split = task_data((4, 3, 2), seed=5)
    g = torch.Generator().manual_seed(1)
    params = {k: (torch.randn(T, *sa, generator=g) * 0.3, torch.randn(T, *sb, generator=g) * 0.3)
              for k, (sa, sb) in model.shapes.items()}
    idx = torch.arange(len(split))
    batched = model.loglik(batch_of(split, idx), params)  # documents of different lengths: padded
    for i in idx.tolist():
        one = batch_of(split, [i])
        ids = one["input_ids"]
        with torch.no_grad(), adapters.use(params, one["task_ids"]):
            mean_nll = lm(input_ids=ids, labels=ids).loss  # transformers shifts and averages itself
        want = -float(mean_nll) * (ids.shape[1] - 1)
        assert float(model.loglik(one, params)[0]) == pytest.approx(want, rel=1e-5, abs=1e-4)
        assert float(batched[i]) == pytest.approx(want, rel=1e-5, abs=1e-4)
