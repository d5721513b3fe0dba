"""The linearised (GLM) predictive: forward-mode JVP through the adapted LM against finite differences."""

import pytest
import torch

from bora.api import Bora
from bora.core.config import AdapterConfig, BoraConfig, ConfigError, FitConfig, PriorConfig
from bora.lora.linearize import linearized, tangent

from conftest import TinyTokenizer, task_data, tiny_gpt2, tiny_llama


def make(lm, hierarchy="B"):
    cfg = BoraConfig(model="tiny", adapter=AdapterConfig(rank=2, targets=("q_proj", "v_proj", "c_attn"),
                                                         layers=(-2, -1)),
                     prior=PriorConfig(tau_mode="fixed", tau=100.0, hierarchy=hierarchy),
                     fit=FitConfig(guide="meanfield", init_scale=0.3))
    train = task_data((5, 4, 3), seed=1)
    return Bora(cfg, lm.double(), TinyTokenizer(), train.tasks, len(train)), train


@pytest.mark.parametrize("lm,hierarchy", [(tiny_llama, "B"), (tiny_llama, "AB"), (tiny_gpt2, "B")])
def test_linearized_logits_are_the_first_order_expansion(lm, hierarchy):
    bora, split = make(lm(), hierarchy)
    post = bora.posterior(2, seed=0)
    batch = bora.feed(split).batch(torch.arange(len(split)))
    point, sample = bora.params(), post.params(1)
    d = tangent(sample, point)
    lin, labels, rows = bora.model.scored_logits(batch, point, d)
    f0, labels0, rows0 = bora.model.scored_logits(batch, point)
    assert torch.equal(labels, labels0) and torch.equal(rows, rows0)
    eps = 3e-4
    step = lambda s: {k: tuple(p + s * x for p, x in zip(point[k], d[k])) for k in point}  # noqa: E731
    jvp = (bora.model.scored_logits(batch, step(eps))[0] - bora.model.scored_logits(batch, step(-eps))[0]) / (2 * eps)
    scale = float(jvp.abs().max())      # float32 logits: finite differences are good to ~1e-5 of the scale
    torch.testing.assert_close(lin, f0 + jvp, rtol=0, atol=1e-4 * scale)
    assert scale > 1e-2                                     # the direction moves the logits
    # the network itself is not linear: the sampled predictive differs from the linearised one
    f1 = bora.model.scored_logits(batch, sample)[0]
    assert (f1 - lin).abs().max() > 1e-2 * scale
    # a zero direction is the point estimate
    zero = {k: tuple(torch.zeros_like(p) for p in v) for k, v in point.items()}
    torch.testing.assert_close(bora.model.scored_logits(batch, point, zero)[0], f0)


def test_posterior_predictives_and_errors():
    bora, split = make(tiny_llama())
    lin, smp = bora.posterior(3, seed=0, predictive="linear"), bora.posterior(3, seed=0)
    ll_lin, ll_smp = lin.doc_loglik(split), smp.doc_loglik(split)
    assert ll_lin.shape == ll_smp.shape == (3, len(split))
    assert not torch.allclose(ll_lin, ll_smp)
    # linearised sample k: the network at the point estimate moved along params(k) - point
    p, d = lin.predictive_args(1)
    assert torch.equal(p[next(iter(p))][1], bora.params()[next(iter(p))][1])
    want = tangent(smp.params(1), bora.params())
    assert all(torch.equal(a, b) for k in d for a, b in zip(d[k], want[k]))
    # a task the fit never saw expands around its prior-predictive mean (the global adapter)
    ids = split.input_ids[0].unsqueeze(0)
    u = lin.token_uncertainty("someone new", ids)
    assert (u["mutual_information"] >= -1e-12).all() and u["mutual_information"].sum() > 0
    point = lin.point_task_adapter("someone new")
    glob = bora.model.global_from_values(bora.point())
    k = next(iter(point))
    torch.testing.assert_close(point[k][1], glob[k][1])
    with pytest.raises(ConfigError, match="predictive"):
        bora.posterior(2, predictive="glm")
    with pytest.raises(ValueError, match="same keys"):
        linearized(lambda p: p["a"][0], {"a": (torch.ones(2),)}, {"b": (torch.ones(2),)})
