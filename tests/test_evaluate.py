"""Document bootstrap of test perplexity: known values, pairing, seeding, coverage."""

import math

import numpy as np
import pytest
import torch

from bora.evaluation.evaluate import bootstrap_ppl, paired_bootstrap, seeds_bootstrap, summarize


def _docs(seed=0, sizes=(40, 25, 3)):
    rng = np.random.default_rng(seed)
    tid = np.concatenate([np.full(n, t) for t, n in enumerate(sizes)])
    tok = rng.integers(5, 60, size=len(tid))
    nll = tok * (3.0 + 0.3 * tid + 0.4 * rng.standard_normal(len(tid)))
    return nll, tok, tid


def test_paired_bootstrap_identical_fits_give_zero_width_interval():
    nll, tok, tid = _docs()
    r = paired_bootstrap(nll, nll.copy(), tok, tid, tasks=("x", "y", "z"))
    assert (r["diff"], r["lo"], r["hi"]) == (0.0, 0.0, 0.0)
    assert r["frac_a_lower"] == 0.0 and r["a"] == r["b"]
    assert all((d["diff"], d["lo"], d["hi"]) == (0.0, 0.0, 0.0) for d in r["per_task"].values())
    s = summarize(torch.tensor(nll), torch.tensor(tok), torch.tensor(tid), ("x", "y", "z"))
    assert r["a"] == pytest.approx(s["overall"]["ppl_task_mean"], rel=1e-12)  # the paper's convention


def test_paired_bootstrap_known_shift_and_pairing():
    nll, tok, tid = _docs()
    shift = 0.05  # a is 0.05 nats/token worse on every document
    r = paired_bootstrap(nll + shift * tok, nll, tok, tid, resamples=500, level=0.95)
    assert r["diff"] == pytest.approx(r["b"] * (math.exp(shift) - 1), rel=1e-12)
    assert 0 < r["lo"] <= r["diff"] <= r["hi"] and r["frac_a_lower"] == 0.0
    r2 = paired_bootstrap(nll, nll + shift * tok, tok, tid, resamples=500, level=0.95)
    assert r2["hi"] < 0 and r2["frac_a_lower"] == 1.0
    # pairing: the per-document difficulty (sd 0.4 nats/token) cancels, a tiny uniform gain is resolved,
    # while the unpaired intervals of the two fits overlap almost entirely
    r3 = paired_bootstrap(nll - 0.01 * tok, nll, tok, tid, resamples=500)
    assert r3["hi"] < 0
    ia, ib = bootstrap_ppl(nll - 0.01 * tok, tok, tid)["overall"], bootstrap_ppl(nll, tok, tid)["overall"]
    assert ia["hi"] > ib["lo"]
    # per-task results: a shift on task 1 only changes task 1's difference
    only1 = nll + shift * tok * (tid == 1)
    r4 = paired_bootstrap(only1, nll, tok, tid, tasks=("x", "y", "z"))
    assert r4["per_task"]["x"]["diff"] == 0.0 and r4["per_task"]["y"]["lo"] > 0
    assert r4["lo"] > 0


def test_bootstrap_is_seeded_and_validates():
    nll, tok, tid = _docs()
    a = paired_bootstrap(nll + 0.3 * np.random.default_rng(5).standard_normal(len(nll)), nll, tok, tid, seed=3)
    assert a == paired_bootstrap(nll + 0.3 * np.random.default_rng(5).standard_normal(len(nll)), nll, tok, tid,
                                 seed=3)
    assert a["lo"] != paired_bootstrap(nll + 0.3 * np.random.default_rng(5).standard_normal(len(nll)), nll, tok,
                                       tid, seed=4)["lo"]
    with pytest.raises(ValueError):
        paired_bootstrap(nll, nll[:-1], tok, tid)
    with pytest.raises(ValueError):
        bootstrap_ppl(nll, tok, tid, level=1.5)
    # torch inputs work too and give the same numbers
    assert bootstrap_ppl(torch.tensor(nll), torch.tensor(tok), torch.tensor(tid)) == bootstrap_ppl(nll, tok, tid)


def test_bootstrap_ppl_matches_normal_theory_and_covers():
    """Equal-length documents with NLL/token ~ N(m_t, s^2): the per-task interval is close to
    exp(mean +- z s / sqrt(n)), and the 90% interval covers the true perplexity ~90% of the time."""
    rng = np.random.default_rng(0)
    n, s, L, m = 200, 0.5, 20, np.array([3.0, 3.5])
    tid = np.repeat([0, 1], n)
    tok = np.full(2 * n, L)
    per_tok = m[tid] + s * rng.standard_normal(2 * n)
    r = bootstrap_ppl(per_tok * tok, tok, tid, ("a", "b"), resamples=2000, level=0.9)
    for t, name in enumerate("ab"):
        mean = per_tok[tid == t].mean()
        se = per_tok[tid == t].std() / math.sqrt(n)
        assert r["per_task"][name]["ppl"] == pytest.approx(math.exp(mean), rel=1e-12)
        assert r["per_task"][name]["lo"] == pytest.approx(math.exp(mean - 1.6449 * se), rel=0.01)
        assert r["per_task"][name]["hi"] == pytest.approx(math.exp(mean + 1.6449 * se), rel=0.01)
    covered = 0
    reps = 300
    tid30 = np.repeat([0, 1], 30)  # 30 documents per task
    for k in range(reps):
        per_tok = m[tid30] + s * rng.standard_normal(60)
        iv = bootstrap_ppl(per_tok * L, np.full(60, L), tid30, resamples=400, seed=k)["overall"]
        covered += iv["lo"] <= math.exp(m.mean()) <= iv["hi"]
    assert 0.84 <= covered / reps <= 0.95


def test_seeds_bootstrap_reduces_to_the_paired_one_and_carries_the_seed_spread():
    nll, tok, tid = _docs()
    one = seeds_bootstrap([nll + 0.02 * tok], [nll], tok, tid, resamples=500)
    ref = paired_bootstrap(nll + 0.02 * tok, nll, tok, tid, resamples=500)
    assert (one["diff"], one["lo"], one["hi"]) == pytest.approx((ref["diff"], ref["lo"], ref["hi"]), rel=1e-12)
    # two seeds: a is 0.1 nats/token better at seed 0 and 0.1 worse at seed 1; each seed alone resolves its
    # sign, but over seeds the interval must span both (the seed spread is part of the uncertainty)
    a = np.stack([nll - 0.1 * tok, nll + 0.1 * tok])
    b = np.stack([nll, nll])
    r = seeds_bootstrap(a, b, tok, tid, resamples=1000)
    s0, s1 = (paired_bootstrap(a[k], nll, tok, tid, resamples=500) for k in (0, 1))
    assert s0["hi"] < 0 < s1["lo"]
    assert r["lo"] < s0["hi"] and r["hi"] > s1["lo"] and r["lo"] < 0 < r["hi"]
    assert r["per_seed"] == pytest.approx([s0["diff"], s1["diff"]], rel=1e-12)
    assert r["diff"] == pytest.approx((s0["diff"] + s1["diff"]) / 2, rel=1e-12)
    with pytest.raises(ValueError, match="same seeds"):
        seeds_bootstrap(a, b[:1], tok, tid)


def test_by_task_size_groups_tasks_by_training_documents():
    from bora.evaluation.evaluate import by_task_size

    names = [f"t{i}" for i in range(8)]
    sizes = dict(zip(names, [0, 1, 2, 3, 10, 11, 150, 500]))
    fit = {"per_task": {n: {"nll": 1.0 + 0.1 * i} for i, n in enumerate(names)}}
    base = {"per_task": {n: {"nll": 2.0} for n in names}}
    rows = {r["bucket"]: r for r in by_task_size(fit, base, sizes)}
    assert list(rows) == ["0", "1-2", "3-10", "11-30", ">100"]  # the empty 31-100 bucket is omitted
    assert [rows[k]["tasks"] for k in rows] == [1, 2, 2, 1, 2]
    assert rows["1-2"]["fit_ppl"] == pytest.approx(math.exp(1.15))  # every task counts once
    assert rows[">100"]["base_ppl"] == pytest.approx(math.exp(2.0))
    assert rows["0"]["change"] == pytest.approx(math.exp(1.0) / math.exp(2.0) - 1)
    assert sum(r["tasks"] for r in rows.values()) == len(names)


def test_tasks_bootstrap_spreads_one_document_tasks_and_agrees_in_sign():
    """Resampling the tasks gives one-document tasks the spread a document bootstrap cannot (it holds the tasks
    fixed); equal fits differ by exactly 0; a fit better on every task has an interval below 0."""
    import numpy as np

    from bora.evaluation.evaluate import paired_bootstrap, tasks_bootstrap

    rng = np.random.default_rng(0)
    b = rng.uniform(2.0, 4.0, size=40)
    a = b + rng.normal(-0.05, 0.2, size=40)  # mixed: better on some tasks, worse on others
    tok, tid = [1] * 40, list(range(40))  # 40 tasks of one one-token document
    doc = paired_bootstrap(a, b, tok, tid, resamples=500)
    both = tasks_bootstrap(a, b, tok, tid, resamples=500)
    assert doc["lo"] == doc["hi"] == doc["diff"]  # no spread without resampling the tasks
    assert both["lo"] < both["diff"] < both["hi"] and both["lo"] < 0 < both["hi"] and both["tasks"] == 40
    assert both["diff"] == doc["diff"]
    same = tasks_bootstrap(b, b, tok, tid, resamples=200)
    assert same["lo"] == same["hi"] == same["diff"] == 0.0
    better = tasks_bootstrap(b - 0.1, b, tok, tid, resamples=200)
    assert better["hi"] < 0 and better["frac_a_lower"] == 1.0
