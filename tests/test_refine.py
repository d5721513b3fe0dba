"""tau rounds after a learned-tau fit (bora.fit.refine): inner fits at fixed tau alternate with the evidence update,
each round starting at the previous update, never worsening validation, and stopping at the tolerance."""

import json
import math

import pytest

from bora.cli.main import main
from bora.core.config import BoraConfig, ConfigError, FitConfig, PriorConfig
from bora.evaluation.evaluate import evaluate

from conftest import tiny_model_dir, write_jsonl
from test_loop import make


def _entry(history, step):
    return next(h for h in history if h["step"] == step)


def test_rounds_alternate_fixed_tau_fits_with_the_update():
    b, train, val = make(steps=9, eval_every=3, tau_rounds=3, tau_round_epochs=1.0, tau_tolerance=1e-9)
    res = b.fit(train, val, progress=False)
    main_best = _entry(res.history, res.best_step)
    assert len(res.tau_rounds) == 3 and res.tau_converged is False  # a tolerance no round can reach
    previous_update, previous_nll = main_best["tau"], _entry(res.history, res.best_step)["val_nll"]
    for r in res.tau_rounds:
        assert r["tau"] == previous_update  # each round is fitted at the previous round's update
        assert all(h["tau_trained"] == r["tau"] for h in r["history"])  # tau is fixed within a round
        assert all("log_evidence" in h for h in r["history"])  # the update is recorded at every validation
        assert r["history"][0]["val_nll"] == pytest.approx(previous_nll, abs=1e-6)  # it starts at the last point
        assert r["best_val_nll"] <= previous_nll + 1e-6  # and keeps it unless something improves
        best = _entry(r["history"], r["best_step"])
        assert r["update"] == best["tau"]
        want = abs(best["tau"]["tau"] - r["tau"]["tau"]) / r["tau"]["tau"]
        assert r["residual"] == {"tau": pytest.approx(want)}
        previous_update, previous_nll = r["update"], r["best_val_nll"]
    last = res.tau_rounds[-1]
    assert res.tau == last["tau"] and res.tau_residual == last["residual"] and res.best_val_nll == last["best_val_nll"]
    assert float(b.tau_estimate()["tau"]) == pytest.approx(last["tau"]["tau"])
    # the returned adapters are the last round's best point
    s = evaluate(b.model, b.model.params_from_values(b.point()), b.feed(val))
    assert s["overall"]["nll_task_mean"] == pytest.approx(res.best_val_nll, abs=1e-5)


def test_rounds_stop_at_the_tolerance():
    b, train, val = make(steps=9, eval_every=3, tau_rounds=3, tau_tolerance=100.0)
    res = b.fit(train, val, progress=False)
    assert res.tau_rounds == [] and res.tau_converged is True  # the fit's own residual is within 10000%
    b, train, val = make(steps=9, eval_every=3, tau_rounds=8, tau_round_epochs=1.0, tau_tolerance=0.05)
    res = b.fit(train, val, progress=False)
    # here tau settles within two rounds (measured: residual 66%, then 2.7%), and the rounds stop there
    assert res.tau_converged and max(res.tau_residual.values()) <= 0.05 and len(res.tau_rounds) < 8
    assert res.tau_residual == res.tau_rounds[-1]["residual"]
    assert all(max(r["residual"].values()) > 0.05 for r in res.tau_rounds[:-1])
    assert math.isfinite(res.seconds_tau_rounds) and res.seconds_tau_rounds > 0


def test_no_rounds_by_default():
    b, train, val = make(steps=6, eval_every=3)
    res = b.fit(train, val, progress=False)
    assert res.tau_rounds is None and res.tau_converged is None


@pytest.mark.parametrize("prior,fit,msg", [
    (dict(tau_mode="fixed"), dict(tau_rounds=2), "tau_rounds needs tau_mode='learned'"),
    (dict(tau_mode="learned", parameterisation="noncentred"), dict(tau_rounds=2, guide="map"), "noncentred"),
    (dict(tau_mode="learned"), dict(tau_rounds=2, guide="meanfield"), "tau_rounds needs a point guide"),
    (dict(tau_mode="learned"), dict(tau_rounds=2, task_updates="lazy"), "tau_rounds needs task_updates='eager'"),
    (dict(tau_mode="learned"), dict(tau_rounds=-1), "tau_rounds must be"),
    (dict(tau_mode="learned"), dict(tau_tolerance=0.0), "tau_tolerance must be"),
])
def test_bad_rounds_settings_are_refused(prior, fit, msg):
    with pytest.raises(ConfigError, match=msg):
        BoraConfig(prior=PriorConfig(**prior), fit=FitConfig(**fit))


def test_cli_prints_and_stores_the_rounds(tmp_path, capsys):
    model, data = tiny_model_dir(tmp_path / "model"), write_jsonl(tmp_path / "data.jsonl")
    out = tmp_path / "fit"
    rc = main(["fit", "--model", str(model), "--data", str(data), "--task-column", "speaker", "--targets", "q_proj",
               "--layers", "-1", "--rank", "2", "--steps", "6", "--eval-every", "3", "--batch-size", "4",
               "--lr", "0.02", "--tau-mode", "learned", "--guide", "map", "--tau-rounds", "2",
               "--tau-tolerance", "1e-9", "--output", str(out), "--quiet", "--device", "cpu"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "tau round 1: fitted at tau tau=" in text and "tau round 2:" in text
    assert "tau rounds: not converged after 2 of at most 2 (tolerance 1e-07%)" in text
    assert "tau fixed-point residual at the returned adapters: tau " in text
    state = json.loads((out / "state.json").read_text())
    rounds = state["result"]["tau_rounds"]
    assert [r["round"] for r in rounds] == [1, 2] and state["result"]["tau_converged"] is False
    assert state["result"]["tau_residual"] == rounds[-1]["residual"]
    assert main(["evaluate", str(out), "--quiet", "--device", "cpu"]) == 0  # the saved fit loads
