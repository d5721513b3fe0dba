"""The guides' site-name mapping: locations and scales set by site round-trip through point values."""

import pyro
import pyro.distributions as dist
import torch

from bora.model.guides import AutoDelta, AutoNormal, guide_params, point_values, saved_scales, set_locs_, set_scales_


def model():
    pyro.sample("w", dist.Normal(torch.zeros(3), 1.0).to_event(1))
    pyro.sample("tau", dist.Gamma(2.0, 1.0))


def test_locs_and_scales_by_site_round_trip():
    for cls in (AutoDelta, AutoNormal):
        guide = cls(model)
        guide()
        params = guide_params(guide)
        assert set(params) == {"w", "tau"}
        assert ("scale" in params["w"]) == (cls is AutoNormal)
        want = {"w": torch.tensor([0.5, -1.0, 2.0]), "tau": torch.tensor(3.5)}
        assert sorted(set_locs_(guide, want)) == ["tau", "w"]
        got = point_values(guide)
        torch.testing.assert_close(got["w"], want["w"])
        torch.testing.assert_close(got["tau"], want["tau"])  # positive site: through its support transform
        if cls is AutoNormal:
            assert set_scales_(guide, {"w": torch.tensor([0.1, 0.2, 0.3])}) == ["w"]
            sd = saved_scales({k: v.detach() for k, v in guide.state_dict().items()})
            torch.testing.assert_close(sd["w"], torch.tensor([0.1, 0.2, 0.3]))
        else:
            assert set_scales_(guide, {"w": 0.1}) == []  # a MAP guide has no scales


def test_map_guide_masks_its_zero_log_density_and_keeps_the_elbo():
    import pyro.distributions as dist
    from pyro import poutine
    from pyro.infer import Trace_ELBO, autoguide
    from pyro.poutine.util import site_is_subsample

    from bora.model.guides import AutoDelta

    data = torch.randn(5)

    def model():
        loc = pyro.sample("loc", dist.Normal(0.0, 1.0))
        with pyro.plate("tasks", 3):
            theta = pyro.sample("theta", dist.Normal(loc, 0.5))
        with pyro.plate("data", 5):
            pyro.sample("y", dist.Normal(theta.sum(), 1.0), obs=data)

    ours, stock = AutoDelta(model), autoguide.AutoDelta(model)
    ours(), stock()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            dict(stock.named_parameters())[name].copy_(p)
    tr = poutine.trace(ours).get_trace()
    sites = [n for n in tr.nodes.values() if n["type"] == "sample" and not site_is_subsample(n)]
    assert len(sites) == 2 and all(node["fn"]._mask is False for node in sites)
    assert float(tr.log_prob_sum()) == 0.0
    elbo = Trace_ELBO()
    torch.testing.assert_close(elbo.differentiable_loss(model, ours), elbo.differentiable_loss(model, stock))


def test_meanfield_guide_draws_real_sites_directly_with_pyros_draws_and_elbo():
    """bora's AutoNormal samples each real-valued site once (no auxiliary site and zero-Jacobian Delta): the same
    draws as Pyro's AutoNormal for the same seed, the same ELBO and the same gradients; a model with a
    constrained site falls back to Pyro's form."""
    from pyro import poutine
    from pyro.infer import Trace_ELBO, autoguide

    data = torch.randn(5)

    def hier():
        loc = pyro.sample("loc", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        with pyro.plate("tasks", 3):
            theta = pyro.sample("theta", dist.Normal(loc, 0.5).to_event(1))
        with pyro.plate("data", 5):
            pyro.sample("y", dist.Normal(theta.sum(), 1.0), obs=data)

    ours, stock = AutoNormal(hier, init_scale=0.3), autoguide.AutoNormal(hier, init_scale=0.3)
    ours(), stock()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            p.add_(0.1 * torch.randn_like(p))
            dict(stock.named_parameters())[name].copy_(p)
    pyro.set_rng_seed(1)
    tr = poutine.trace(ours).get_trace()
    pyro.set_rng_seed(1)
    tr_stock = poutine.trace(stock).get_trace()
    assert "theta_unconstrained" not in tr.nodes and "theta_unconstrained" in tr_stock.nodes
    # the plate keeps the site's own distribution (no ExpandedDistribution wrapper), so its log-density is
    # taken from the draw's own noise, not recomputed from the value
    assert all(type(tr.nodes[site]["fn"]).__name__ == "_DiagNormal" for site in ("loc", "theta"))
    for site in ("loc", "theta"):
        torch.testing.assert_close(tr.nodes[site]["value"], tr_stock.nodes[site]["value"])
    elbo = Trace_ELBO()
    losses, grads = [], []
    for guide in (ours, stock):
        pyro.set_rng_seed(2)
        loss = elbo.differentiable_loss(hier, guide)
        params = [p for _, p in sorted(guide.named_parameters())]
        losses.append(loss)
        grads.append(torch.autograd.grad(loss, params))
    torch.testing.assert_close(losses[0], losses[1])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    # a positive site: Pyro's auxiliary-variable form, unchanged
    guide = AutoNormal(model)
    assert "tau_unconstrained" in poutine.trace(guide).get_trace().nodes
