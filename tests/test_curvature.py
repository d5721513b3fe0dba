"""The tau update's Fisher from the training steps (bora.curvature) equals the separate pass where both apply."""

import pytest
import torch
from pyro.infer import Trace_ELBO

from bora.api import Bora
from bora.config import AdapterConfig, BoraConfig, FitConfig, PriorConfig
from bora.curvature import StepFisher
from bora.batching import batches
from bora.fisher import task_fisher
from bora.feed import Feed

from conftest import TinyTokenizer, task_data, tiny_llama

TRAIN, VAL = (30, 12, 6), (10, 6, 4)


def make(hierarchy="B", parameterisation="auto", **fit):
    f = dict(epochs=6, batch_size=8, lr=2e-2, fisher_docs=8, patience=0, warmup=0.0)
    f.update(fit)
    cfg = BoraConfig(model="tiny", adapter=AdapterConfig(rank=2, targets=("q_proj", "v_proj"), layers=(-2, -1)),
                     prior=PriorConfig(tau_mode="learned", tau=10.0, hierarchy=hierarchy,
                                       parameterisation=parameterisation), fit=FitConfig(**f))
    train = task_data(TRAIN, seed=1)
    return Bora(cfg, tiny_llama(), TinyTokenizer(), train.tasks, len(train)), train


@pytest.mark.parametrize("hierarchy", ["B", "AB"])
def test_step_gradients_give_the_exact_fisher_of_one_epoch(hierarchy):
    """An epoch of mixed-task batches (tasks repeat within a batch) at a fixed point: the per-document
    gradients the backward passes hand over square and sum to the separate pass's Fisher."""
    bora, train = make(hierarchy)
    bora.fit(train, progress=False)  # move away from the init (B = 0 has a degenerate A gradient)
    model, feed = bora.model, Feed(train)
    acc = StepFisher.for_model(model, train.task_sizes())
    elbo = Trace_ELBO(max_plate_nesting=1)(bora.tau.model, bora.guide)
    n_tokens = 7.0  # any constant the loss is divided by
    for idx in batches(train, 8, shuffle=True, generator=torch.Generator().manual_seed(3)):
        b = feed.batch(idx)
        acc.begin_step(len(train) / (len(idx) * n_tokens), b["task_ids"])
        with model.adapters.record_task_grads(acc.sink):
            (elbo(b) / n_tokens).backward()
    got = acc.task_fisher()
    want = task_fisher(model, bora.params(), feed, labels="empirical")
    assert torch.equal(got.used, want.used)
    for k in want.fisher:
        for i in model.task_factors():
            torch.testing.assert_close(got.fisher[k][i], want.fisher[k][i], rtol=1e-4, atol=1e-6)
        if hierarchy == "B":
            assert float(got.fisher[k][0].abs().sum()) == 0.0  # the shared A is no task site


@pytest.mark.parametrize("parameterisation,lr", [("noncentred", 2e-2), ("offset", 5e-3)])
def test_fit_with_step_curvature_learns_a_similar_tau(parameterisation, lr):
    """The steps' Fisher is a sum over the window's moving points: close to the pass at the current point
    while a window's steps move the adapters little. Offset deviations move about tau^1/2 times faster
    per Adam step than non-centred ones; at lr 2e-2 (ten times the LM default) its steps tau is 1.8x
    the pass's on this tiny model, at 5e-3 1.29x."""
    taus = {}
    for curvature in ("pass", "steps"):
        bora, train = make(tau_curvature=curvature, fisher_docs=64, eval_every=6, lr=lr,
                           parameterisation=parameterisation)
        res = bora.fit(train, task_data(VAL, seed=2), progress=False)
        taus[curvature] = res.tau["tau"]
        assert [h["step"] for h in res.history][:3] == [0, 6, 12]
    # the pass is at the current point, the steps over the last 6 steps' moving points: close, not equal
    assert taus["steps"] == pytest.approx(taus["pass"], rel=0.35)
    assert taus["steps"] != taus["pass"]
