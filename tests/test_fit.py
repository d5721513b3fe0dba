"""Fitting end to end on a tiny model: lower held-out loss, learned tau, prefix cache, save/load."""

import copy

import pytest
import torch

from bora.api import Bora
from bora.core.config import AdapterConfig, BoraConfig, ConfigError, FitConfig, PriorConfig
from bora.data.feed import Feed
from bora.lora.prefix import FrozenPrefix

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


@pytest.mark.parametrize("mode", ["learned", "fixed", "uncoupled", "shared"])
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


def test_learned_tau_is_reestimated_and_the_best_adapters_keep_theirs():
    bora, train, val = fitted("learned")
    res = bora.fit(train, val, progress=False)
    taus = [e["tau"]["tau"] for e in res.history]
    assert taus[0] == 10.0 and len(taus) > 2  # the configured start, then one evidence update per validation
    assert all(t != 10.0 and 0 < t < float("inf") for t in taus[1:]), taus
    best = next(e for e in res.history if e["step"] == res.best_step)
    # the fit keeps the tau its best adapters were trained under, not the last update
    assert bora.tau_estimate() == best["tau_trained"] == res.tau
    params = bora.params()
    dev = sum(float((A - A.mean(0)).norm() + (B - B.mean(0)).norm()) for A, B in params.values())
    assert dev > 1e-3  # task adapters did not collapse onto one shared adapter


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
