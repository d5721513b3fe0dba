"""bora's adapter priors against torch's Normal (oracle): densities and gradients."""

import pyro
import pytest
import torch
from pyro import poutine

from bora.model.distributions import IsotropicNormal, OffsetReparam


@pytest.mark.parametrize("scale_kind", ["number", "tensor"])
def test_isotropic_normal_matches_normal_with_gradients(scale_kind):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    loc = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    d = IsotropicNormal(loc.expand(3, 4, 5), 0.7 if scale_kind == "number" else s)
    ref = torch.distributions.Normal(loc, s).log_prob(x).sum((-2, -1))
    got = d.log_prob(x)
    torch.testing.assert_close(got, ref)
    w = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64)  # a weighted sum: per-task gradients differ
    wrt = (x, loc) if scale_kind == "number" else (x, loc, s)
    for a, b in zip(torch.autograd.grad((got * w).sum(), wrt), torch.autograd.grad((ref * w).sum(), wrt)):
        torch.testing.assert_close(a, b)
    assert d.expand(torch.Size([2, 3])).log_prob(x).shape == (2, 3)


def test_offset_reparam_keeps_the_joint_density():
    def model():
        return pyro.sample("x", IsotropicNormal(torch.ones(2, 3), torch.tensor(0.5)))

    tr = poutine.trace(poutine.reparam(model, config={"x": OffsetReparam()})).get_trace()
    offset = tr.nodes["x_offset"]["value"]
    ref = torch.distributions.Normal(torch.ones(2, 3), 0.5).log_prob(1.0 + offset).sum()
    torch.testing.assert_close(tr.log_prob_sum(), ref)


def test_zero_mean_prior_and_generic_offset():
    """The offset prior of an IsotropicNormal site is a zero-mean one (same density, no subtraction); any
    other loc-scale distribution gets a zero-location copy of itself."""
    x = torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True)
    d = IsotropicNormal.zero_mean((3, 2, 4), torch.tensor(0.4, dtype=torch.float64), like=x)
    ref = torch.distributions.Normal(0.0, 0.4).log_prob(x).sum((-2, -1))
    torch.testing.assert_close(d.log_prob(x), ref)
    torch.testing.assert_close(torch.autograd.grad(d.log_prob(x).sum(), x)[0], -x / 0.16)
    assert d.loc.stride() == (0, 0, 0) and d.expand(torch.Size([5, 3])).log_prob(x).shape == (5, 3)

    def model():
        return pyro.sample("y", pyro.distributions.Normal(torch.full((3,), 2.0), 0.5).to_event(1))

    tr = poutine.trace(poutine.reparam(model, config={"y": OffsetReparam()})).get_trace()
    torch.testing.assert_close(tr.nodes["y"]["value"], 2.0 + tr.nodes["y_offset"]["value"])
