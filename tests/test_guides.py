"""The guides' site-name mapping: locations and scales set by site round-trip through point values."""

import pyro
import pyro.distributions as dist
import torch

from bora.guides import AutoDelta, AutoNormal, guide_params, point_values, saved_scales, set_locs_, set_scales_


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
