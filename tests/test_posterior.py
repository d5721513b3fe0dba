"""Posterior API: reproducible samples, BMA likelihood and evaluation, uncertainty, generation, new tasks."""

import copy

import pytest
import torch

from bora.api import Bora
from bora.core.config import AdapterConfig, BoraConfig, ConfigError, FitConfig, PriorConfig
from bora.data.batching import collate
from bora.evaluation.evaluate import token_log_probs
from bora.evaluation.metrics import brier, expected_calibration_error

from conftest import VOCAB, TinyTokenizer, task_data, tiny_llama

KEY = "model_layers_2_self_attn_q_proj"


def make(guide="meanfield", mode="fixed", init_scale=0.2, lm=None, layers=(-2, -1), tau=100.0, **fit):
    f = dict(guide=guide, init_scale=init_scale, steps=6, batch_size=8, lr=2e-2, patience=0, warmup=0.0,
             fisher_docs=4)
    f.update(fit)
    cfg = BoraConfig(model="tiny", adapter=AdapterConfig(rank=2, targets=("q_proj", "v_proj"), layers=layers),
                     prior=PriorConfig(tau_mode=mode, tau=tau), fit=FitConfig(**f))
    train = task_data((8, 6, 4), seed=1)
    return Bora(cfg, lm or tiny_llama(), TinyTokenizer(), train.tasks, len(train)), train


# ----------------------------------------------------------------------------- sampling
def test_samples_are_reproducible_and_seeded():
    bora, _ = make()
    a, b, c = bora.posterior(3, seed=0), bora.posterior(3, seed=0), bora.posterior(3, seed=1)
    for k in range(3):
        for name, v in a.values(k).items():
            assert torch.equal(v, b.values(k)[name])
    assert not torch.equal(a.params(0)[KEY][0], c.params(0)[KEY][0])   # different seed -> different
    assert not torch.equal(a.params(0)[KEY][0], a.params(1)[KEY][0])   # different samples differ
    # sample k does not depend on how many samples were asked for (export --sample-index relies on it)
    assert torch.equal(bora.posterior(5, seed=0).params(2)[KEY][1], a.params(2)[KEY][1])
    # the global RNG is left untouched
    torch.manual_seed(123)
    want = torch.rand(1)
    torch.manual_seed(123)
    bora.posterior(2, seed=7).values(1)
    assert torch.equal(torch.rand(1), want)
    # a MAP fit's samples are all the point estimate
    m, _ = make("map")
    pm = m.posterior(3, seed=0)
    assert torch.equal(pm.params(0)[KEY][0], pm.params(2)[KEY][0])


def test_bma_loglik_and_uncertainty():
    bora, split = make()
    post = bora.posterior(4, seed=0)
    ll = post.doc_loglik(split)
    assert ll.shape == (4, len(split))
    assert (ll.std(0) > 0).all()
    bma = post.bma_loglik(split)
    torch.testing.assert_close(bma, (ll.double().exp().mean(0).log()).float())
    assert (bma >= ll.mean(0) - 1e-4).all()  # Jensen: log mean exp >= mean
    ids = split.input_ids[0].unsqueeze(0)
    u = post.token_uncertainty("task0", ids)
    assert u["mutual_information"].shape == (1, ids.shape[1] - 1) and (u["mutual_information"] > 0).all()
    torch.testing.assert_close(u["entropy"], u["expected_entropy"] + u["mutual_information"])
    # a MAP fit: every sample identical, no epistemic uncertainty, BMA = point log-likelihood
    m, _ = make("map", init_scale=1e-3)
    pm = m.posterior(3, seed=0)
    assert torch.all(pm.token_uncertainty("task1", ids)["mutual_information"].abs() < 1e-6)
    torch.testing.assert_close(pm.bma_loglik(split), m.posterior(1).doc_loglik(split)[0], atol=1e-4, rtol=0)


def test_token_log_probs_match_the_model_loglik():
    bora, split = make()
    b = bora.feed(split).batch(torch.arange(len(split)))  # with the frozen-prefix cache
    params = bora.posterior(2, seed=3).params(1)
    with torch.no_grad():
        logp, labels, rows = token_log_probs(bora.model, b, params)
        want = bora.model.loglik(b, params)
    got = torch.zeros(len(split)).index_add_(0, rows, logp.gather(-1, labels[:, None]).squeeze(-1))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    assert logp.shape[-1] == VOCAB


@pytest.mark.parametrize("predictive", ["linear", "sample"])
def test_evaluate_point_and_both_bmas_match_direct_computations(predictive):
    from bora.cli.main import format_posterior_table
    from bora.evaluation.evaluate import bootstrap_ppl
    from bora.evaluation.metrics import log_mean_exp, mutual_information

    bora, split = make()
    post = bora.posterior(3, seed=0, predictive=predictive)
    res = post.evaluate(split, batch_size=5, bootstrap=200, doc_estimator="plain")  # (tilted: tests/test_tilted.py)
    assert res["doc_estimator"] == "plain" and res["bma_doc"] == res["bma_doc_plain"]
    want = bora.evaluate(split)
    for t in split.tasks:
        assert res["point"]["per_task"][t]["nll"] == pytest.approx(want["per_task"][t]["nll"], abs=1e-5)
    docs = res["documents"]
    assert docs["tokens"] == [len(x) - 1 for x in split.input_ids] and docs["task_ids"] == split.task_ids.tolist()
    # document-level BMA (the headline): -log mean_s p(doc | adapter_s), from the model's own loglik
    ll = post.doc_loglik(split).double()
    torch.testing.assert_close(torch.tensor(docs["nll_bma_doc"], dtype=torch.float64), -log_mean_exp(ll, 0),
                               atol=2e-4, rtol=1e-6)
    tok = torch.tensor(docs["tokens"]).double()
    for t in split.tasks:
        sel = split.task_ids == split.tasks.index(t)
        nll_t = float(-log_mean_exp(ll, 0)[sel].sum() / tok[sel].sum())
        assert res["bma_doc"]["per_task"][t]["nll"] == pytest.approx(nll_t, abs=1e-5)
        # posterior spread: quantiles over samples of the task's perplexity under each sample
        ppl_s = (-ll[:, sel].sum(1) / tok[sel].sum()).exp()
        sp = res["posterior_spread"][t]
        assert sp["lo"] == pytest.approx(float(ppl_s.quantile(0.05)), rel=1e-5)
        assert sp["hi"] == pytest.approx(float(ppl_s.quantile(0.95)), rel=1e-5) and sp["hi"] > sp["lo"]
    # test-set interval: the document bootstrap of the document-level BMA NLLs, seeded by the posterior seed
    boot = bootstrap_ppl(docs["nll_bma_doc"], docs["tokens"], docs["task_ids"], split.tasks, resamples=200,
                         level=0.9, seed=0)
    assert res["test_interval"]["bma_doc"] == boot
    # token-level BMA and MI per document, from the samples' next-token log-probabilities
    b = bora.feed(split).batch(torch.arange(len(split)))
    with torch.no_grad():
        lps = [token_log_probs(bora.model, b, *post.predictive_args(k)) for k in range(3)]
    if predictive == "sample":  # the sampled predictive runs the network at each drawn adapter
        for k in range(3):
            params, direction = post.predictive_args(k)
            assert direction is None and all(torch.equal(params[n][1], post.params(k)[n][1]) for n in params)
    rows, labels = lps[0][2], lps[0][1]
    lp = torch.stack([x[0] for x in lps]).double()
    p_bar = lp.exp().mean(0)
    nll_tok = -p_bar.gather(-1, labels[:, None]).squeeze(-1).log()
    mi = mutual_information(lp)
    n = len(split)
    torch.testing.assert_close(torch.tensor(docs["nll_bma_token"], dtype=torch.float64),
                               torch.zeros(n, dtype=torch.float64).index_add_(0, rows, nll_tok), atol=2e-4, rtol=1e-5)
    torch.testing.assert_close(torch.tensor(docs["mutual_information"], dtype=torch.float64),
                               torch.zeros(n, dtype=torch.float64).index_add_(0, rows, mi) / tok, atol=1e-6, rtol=1e-3)
    bt = res["bma_token"]["tokens"]
    assert bt["mutual_information"] == pytest.approx(float(mi.mean()), rel=1e-3) and bt["mutual_information"] > 0
    assert bt["ece"] == pytest.approx(expected_calibration_error(p_bar.max(-1).values, p_bar.argmax(-1) == labels),
                                      abs=1e-4)
    assert bt["brier"] == pytest.approx(float(brier(p_bar, labels).mean()), rel=1e-4)
    assert bt["entropy"] == pytest.approx(bt["expected_entropy"] + bt["mutual_information"], rel=1e-9)
    assert res["point"]["tokens"]["mutual_information"] == 0
    # Jensen, per document: the document-level BMA is at least the mean over samples
    assert all(torch.tensor(docs["nll_bma_doc"], dtype=torch.float64) <= -ll.mean(0) + 1e-6)
    table = format_posterior_table(res)
    assert "document-level" in table and "posterior spread" in table and "test-set" in table


# ----------------------------------------------------------------------------- generation
def test_generate_uses_one_adapter_per_continuation():
    bora, _ = make(init_scale=2.0, mode="uncoupled")  # very different samples
    post = bora.posterior(4, seed=0)
    prompt = torch.tensor([1, 7, 1, 9])
    out = post.generate("task0", prompt, max_new_tokens=6)
    assert len(out["ids"]) == 4 and out["prompt_ids"] == prompt.tolist()
    # continuation i is the greedy continuation under sample i's adapter alone
    for i in (0, 3):
        ids = prompt.unsqueeze(0)
        with torch.no_grad(), bora.adapters.use(post.task_adapter(i, "task0"), None):
            for _ in range(len(out["ids"][i])):
                nxt = bora.lm(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
                ids = torch.cat([ids, nxt], 1)
        assert ids[0, 4:].tolist() == out["ids"][i]
    assert len({tuple(s) for s in out["ids"]}) > 1
    again = post.generate("task0", prompt, max_new_tokens=6, do_sample=True, seed=5)
    assert again == post.generate("task0", prompt, max_new_tokens=6, do_sample=True, seed=5)
    with pytest.raises(ConfigError):
        post.generate("task0", prompt, max_new_tokens=0)


# ----------------------------------------------------------------------------- new tasks
def test_unseen_task_is_drawn_from_the_global_level():
    bora, _ = make(init_scale=1e-3)  # fixed tau = 100: task deviations have sd 0.1
    post = bora.posterior(60, seed=0)
    A, B = post.task_adapters("brand new")[KEY]
    GA, GB = post.global_adapters()[KEY]
    dev = (B - GB).flatten()  # hierarchy 'B': only B is task-level, every task uses the global A
    assert dev.std().item() == pytest.approx(0.1, rel=0.05) and abs(dev.mean().item()) < 0.01
    assert torch.equal(A, GA)
    assert torch.equal(post.task_adapters("brand new")[KEY][0], A)  # reproducible
    assert not torch.equal(post.task_adapters("other new")[KEY][1], B)


def test_fit_new_task_improves_its_likelihood_and_respects_the_prior():
    lm = tiny_llama()
    bora, train = make("map", lm=copy.deepcopy(lm), layers=(-1,), steps=10)
    bora.fit(train, None, progress=False)
    new = task_data((0, 0, 0, 14), seed=4)  # a fourth token pattern: a task the fit never saw
    fit_docs, held = new.subset(range(10)), new.subset(range(10, 14))
    glob = bora.model.global_from_values(bora.point())
    adapter = bora.fit_new_task(fit_docs, steps=25, lr=0.05)
    assert set(adapter) == set(glob) and adapter[next(iter(glob))][0].dim() == 2

    def nll(params):
        b = collate(held, torch.arange(len(held)))
        b["task_ids"] = torch.zeros(len(held), dtype=torch.long)
        with torch.no_grad():
            return float(-bora.model.loglik(b, params).sum())

    print("new-task held-out NLL: global", nll(glob), "fitted", nll(adapter))
    assert nll(adapter) < nll(glob) - 0.5
    # a huge tau pins the new task to the global adapter
    stiff, _ = make("map", lm=copy.deepcopy(lm), layers=(-1,), tau=1e9)
    pinned = stiff.fit_new_task(fit_docs, steps=5, lr=0.05)
    g2 = stiff.model.global_from_values(stiff.point())
    for k, (A, B) in pinned.items():
        assert (A - g2[k][0]).abs().max() < 1e-3 and (B - g2[k][1]).abs().max() < 1e-3
