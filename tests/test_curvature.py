"""The tau update's Fisher from the training steps (bora.curvature) equals the separate pass where both apply."""

import math

import pytest
import torch
from pyro.infer import Trace_ELBO

from bora.api import Bora
from bora.core.config import AdapterConfig, BoraConfig, FitConfig, PriorConfig
from bora.fit.curvature import StepFisher, probe_documents
from bora.data.batching import batches
from bora.fit.fisher import task_fisher
from bora.data.feed import Feed

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


@pytest.mark.parametrize("by", ["global", "module"])
def test_probe_ratio_compares_the_probe_documents_gradients_with_the_steps(by):
    """At a fixed point the probes' step gradients are their gradients at the end: ratio 1, also when the steps
    saw every probe twice (two epochs between updates). Steps that saw a gradient half as large (a loss
    weighted twice) give ratio 4. Only probes a step saw are re-measured."""
    bora, train = make()
    bora.fit(train, progress=False)
    model, feed = bora.model, Feed(train)
    elbo = Trace_ELBO(max_plate_nesting=1)(bora.tau.model, bora.guide)
    probes = probe_documents(train, 3, torch.Generator().manual_seed(0))
    assert torch.bincount(train.task_ids[probes]).tolist() == [3, 3, 3]
    ratios = []
    for factor, epochs in ((1.0, 1), (2.0, 1), (1.0, 2)):
        acc = StepFisher.for_model(model, train.task_sizes())
        acc.set_probe_(probes, len(train))
        for idx in epochs * list(batches(train, 8, shuffle=True, generator=torch.Generator().manual_seed(3)))[:-1]:
            b = feed.batch(idx)
            acc.begin_step(factor * len(train) / len(idx), b["task_ids"], index=b["index"])
            with model.adapters.record_task_grads(acc.sink):
                elbo(b).backward()
        seen = acc.probe_rows()
        assert 0 < len(seen) < len(probes) and set(seen.tolist()) <= set(probes.tolist())
        end = task_fisher(model, bora.params(), feed, rows=seen)
        assert int(end.used.sum()) == len(seen)
        ratio = acc.probe_ratio(end, by)
        assert set(ratio) == {(k, 1) for k in model.shapes}
        ratios.append(ratio)
    for k in ratios[0]:
        assert ratios[0][k] == pytest.approx(1.0, rel=1e-4)
        assert ratios[1][k] == pytest.approx(4.0, rel=1e-4)
        assert ratios[2][k] == pytest.approx(1.0, rel=1e-4)


@pytest.mark.parametrize("parameterisation", ["noncentred", "offset"])
def test_fit_with_step_curvature_learns_the_pass_tau_once_probes_correct_it(parameterisation):
    """The steps' Fisher sums each document's gradient before a step has fitted it; the pass measures it
    after. At lr 2e-2 (ten times the LM default) the plain steps' tau is 1.11x (non-centred) and 1.80x
    (offset) the pass's on this tiny model; scaled by 4 probe documents per task re-measured at each
    update, 0.985x and 1.057x."""
    taus = {}
    for curvature, probes in (("pass", 4), ("steps", 0), ("steps", 4)):
        bora, train = make(tau_curvature=curvature, fisher_docs=64, eval_every=6, lr=2e-2, tau_probe_docs=probes,
                           parameterisation=parameterisation)
        res = bora.fit(train, task_data(VAL, seed=2), progress=False)
        taus[curvature, probes] = res.tau["tau"]
        assert [h["step"] for h in res.history][:3] == [0, 6, 12]
        ratios = [h["fisher_probe_ratio"] for h in res.history if "fisher_probe_ratio" in h]
        assert len(ratios) == (len(res.history) - 1 if (curvature, probes) == ("steps", 4) else 0)
    err = {k: abs(math.log(taus["steps", k] / taus["pass", 4])) for k in (0, 4)}
    assert err[4] < math.log(1.1) and err[4] < err[0]
    assert taus["steps", 4] != taus["pass", 4]
