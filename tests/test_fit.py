"""Fitting end to end on a tiny model: lower held-out loss, prefix cache, EB tau, save/load."""

import copy

import pytest
import torch

from bora.api import Bora
from bora.config import AdapterConfig, BoraConfig, ConfigError, FitConfig, PriorConfig
from bora.feed import Feed
from bora.prefix import FrozenPrefix
from bora.tau import evidence_tau

from conftest import TinyTokenizer, task_data, tiny_gpt2, tiny_llama, tiny_opt

TRAIN, VAL = (30, 12, 6), (10, 6, 4)


def config(mode="learned", **fit):
    f = dict(epochs=6, batch_size=8, lr=2e-2, fisher_docs=8, patience=0, warmup=0.0)
    f.update(fit)
    adapter = AdapterConfig(rank=2, targets=("q_proj", "v_proj", "o_proj"), layers=(-2, -1))
    return BoraConfig(model="tiny", adapter=adapter, prior=PriorConfig(tau_mode=mode, tau=10.0), fit=FitConfig(**f))


def fitted(mode="learned", lm=None, **fit):
    train, val = task_data(TRAIN, seed=1), task_data(VAL, seed=2)
    bora = Bora(config(mode, **fit), lm or tiny_llama(), TinyTokenizer(), train.tasks, len(train))
    return bora, train, val


@pytest.mark.parametrize("mode", ["learned", "fixed", "independent", "shared"])
def test_short_map_fit_lowers_every_tasks_heldout_loss(mode):
    bora, train, val = fitted(mode)
    before = bora.evaluate(val, base=True)["per_task"]
    res = bora.fit(train, val, progress=False)
    after = bora.evaluate(val)["per_task"]
    # one shared adapter cannot fit every task's own pattern: require the average to improve
    tasks = train.tasks if mode != "shared" else ()
    for t in tasks:
        assert after[t]["nll"] < before[t]["nll"] - 0.05, (t, before[t], after[t])
    def mean(d):
        return sum(v["nll"] for v in d.values()) / len(d)

    assert mean(after) < mean(before) - 0.05
    assert res.history[0]["step"] == 0 and res.steps > 0
    assert res.history[0]["val_nll"] == pytest.approx(
        sum(v["nll"] for v in before.values()) / len(before))  # step 0 is the base model


def test_learned_tau_is_finite_and_not_shared():
    bora, train, val = fitted("learned")
    bora.fit(train, val, progress=False)
    tau = bora.tau_estimate()["tau"]
    assert 0 < tau < 1e8
    params = bora.params()
    dev = sum(float((A - A.mean(0)).norm() + (B - B.mean(0)).norm()) for A, B in params.values())
    assert dev > 1e-3  # task adapters did not collapse onto one shared adapter


def _em(y, F, tau=1000.0, iters=60):
    for _ in range(iters):
        d = F * y / (F + tau)  # the MAP deviation given tau (exact in the normal-normal model)
        tau = evidence_tau(d.square().sum(), F)
    return tau


def test_evidence_tau_recovers_truth_and_limits():
    g = torch.Generator().manual_seed(0)
    n = 10000
    F = torch.rand(n, generator=g) * 400 + 10
    for tau in (3.0, 100.0, 1000.0):
        y = torch.randn(n, generator=g) * (1 / tau + 1 / F).sqrt()
        assert _em(y, F, iters=100) == pytest.approx(tau, rel=0.15)
    # tasks that differ only by noise -> very strong pooling; huge differences -> weak pooling
    y = torch.randn(n, generator=g) * (1 / F).sqrt()
    assert _em(y, F, iters=100) > 10 * float(F.max())  # lambda = tau / (tau + F) > 0.9 everywhere
    y = torch.randn(n, generator=g) * 10.0
    assert _em(y, F) == pytest.approx(0.01, rel=0.1)
    # coordinates the data do not inform (F = 0) do not count
    assert evidence_tau(torch.tensor(2.0), torch.cat([F[:100], torch.zeros(10000)])) == pytest.approx(
        evidence_tau(torch.tensor(2.0), F[:100]), rel=1e-6)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2, tiny_opt])
def test_prefix_cache_is_exact(make):
    lm = make(layers=4)
    split = task_data((5, 4), seed=3)
    plain = Feed(split)
    cached = Feed(split, prefix=FrozenPrefix(lm, 2))
    idx = torch.tensor([0, 8, 3, 5])
    with torch.no_grad():
        b1, b2 = plain.batch(idx), cached.batch(idx)
        want = lm(input_ids=b1["input_ids"], attention_mask=b1["attention_mask"]).logits
        with cached.prefix.resume(b2["hidden"]):
            got = lm(input_ids=b2["input_ids"], attention_mask=b2["attention_mask"]).logits
    m = b1["attention_mask"].bool()
    torch.testing.assert_close(got[m], want[m], atol=1e-5, rtol=1e-4)
    assert all(type(layer).__name__ != "_PassThrough" for layer in cached.prefix.layers)  # restored


def test_fit_with_and_without_prefix_cache_agree():
    out = []
    for cache in (True, False):
        bora, train, val = fitted("fixed", steps=6, cache_prefix=cache)
        assert (bora.prefix is not None) == cache
        bora.fit(train, val, progress=False)
        out.append(bora.evaluate(val)["overall"]["nll_task_mean"])
    assert out[0] == pytest.approx(out[1], abs=1e-4)


@pytest.mark.parametrize("mode", ["learned", "shared"])
def test_save_then_load_gives_identical_losses(tmp_path, mode):
    lm = tiny_llama()
    bora, train, val = fitted(mode, lm=copy.deepcopy(lm), steps=8)
    bora.fit(train, val, progress=False)
    before = bora.evaluate(val)
    bora.save(tmp_path / "fit")
    files = sorted(p.name for p in (tmp_path / "fit").iterdir())
    assert files == ["config.json", "estimates.safetensors", "guide.safetensors", "laplace.safetensors",
                     "metrics.json", "state.json", "tasks.json"]  # the default guide: MAP + Laplace
    again = Bora.load(tmp_path / "fit", lm=copy.deepcopy(lm), tokenizer=TinyTokenizer())
    after = again.evaluate(val)
    for t in train.tasks:
        assert after["per_task"][t]["nll"] == before["per_task"][t]["nll"]
    assert again.tau_estimate() == bora.tau_estimate()
    assert again.result.steps == bora.result.steps
    # saving over an existing fit replaces it whole; no temp folders left behind
    bora.save(tmp_path / "fit")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fit"]


def test_load_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        Bora.load(tmp_path / "missing")
    (tmp_path / "bad").mkdir()
    with pytest.raises(ConfigError, match="config.json"):
        Bora.load(tmp_path / "bad")
