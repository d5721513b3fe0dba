"""The coupling and guide-kind objects cover every configured name and say what each site asks."""

import math

import pytest

from bora.core.config import GUIDES, TAU_MODES, ConfigError, FitConfig, PriorConfig
from bora.core.coupling import COUPLINGS, GUIDE_KINDS, coupling_of, guide_of


def test_every_configured_name_has_one_object():
    assert set(COUPLINGS) == set(TAU_MODES)
    assert set(GUIDE_KINDS) == set(GUIDES)
    with pytest.raises(ValueError, match="unknown tau_mode"):
        coupling_of("sometimes")
    with pytest.raises(ValueError, match="unknown guide"):
        guide_of("hmc")


@pytest.mark.parametrize("mode,glob,tasks,has_tau,learned,tau,reference", [
    ("uncoupled", False, True, False, False, 0.0, "task_mean"),
    ("fixed", True, True, True, False, 250.0, "global"),
    ("learned", True, True, True, True, None, "global"),
    ("shared", True, False, False, False, math.inf, "none"),
])
def test_couplings(mode, glob, tasks, has_tau, learned, tau, reference):
    prior = PriorConfig(tau_mode=mode, tau=250.0)
    c = coupling_of(prior)
    assert (c.has_global, c.has_tasks, c.has_tau, c.learned, c.tau_value(prior), c.reference) == (
        glob, tasks, has_tau, learned, tau, reference)
    assert c.fixed == (mode == "fixed")
    got = c.tau_per_module(["q", "v"], {"tau": 7.0}, fixed_tau=250.0).tolist()
    assert got == [tau if tau is not None else 7.0] * 2
    if learned:
        assert c.tau_per_module(["q", "v"], {"tau:q": 1.0, "tau:v": 2.0}).tolist() == [1.0, 2.0]


def test_guide_kinds():
    assert [(g, guide_of(FitConfig(guide=g)).point, guide_of(g).laplace) for g in ("map", "laplace", "meanfield")] == [
        ("map", True, False), ("laplace", True, True), ("meanfield", False, False)]


def test_the_old_name_of_the_uncoupled_limit_is_read_with_a_warning():
    """'independent' was renamed 'uncoupled' (it shares A, so it is not per-task LoRA): saved fits and old command
    lines still work, with a FutureWarning naming the new value."""
    import warnings

    from bora.cli.args import field_kwargs
    from bora.core.config import BoraConfig

    with pytest.warns(FutureWarning, match="now called 'uncoupled'"):
        assert PriorConfig(tau_mode="independent").tau_mode == "uncoupled"
    with pytest.warns(FutureWarning):
        cfg = BoraConfig.from_dict({"prior": {"tau_mode": "independent"}})
    assert cfg.prior.tau_mode == "uncoupled" and cfg.to_dict()["prior"]["tau_mode"] == "uncoupled"
    choices = field_kwargs(PriorConfig, "tau_mode")["choices"]
    assert "independent" in choices and "independent" not in list(choices)  # accepted, not advertised
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert PriorConfig(tau_mode="uncoupled").tau_mode == "uncoupled"
    with pytest.raises(ConfigError, match="tau_mode must be one of"):
        PriorConfig(tau_mode="indep")
