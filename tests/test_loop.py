"""The fit loop over explicit state: callbacks see every hook in order, own their state in a checkpoint,
and a fit resumed from ``FitLoop.state_dict`` equals the uninterrupted one."""

import math

import pytest
import torch

from bora.api import Bora
from bora.core.config import AdapterConfig, BoraConfig, FitConfig, PriorConfig
from bora.fit.callbacks import Callback
from bora.fit.loop import FitLoop, tau_residual
from bora.fit.state import FitState, PhaseTimer
from bora.io.checkpoint import flatten_state, unflatten_state

from conftest import TinyTokenizer, task_data, tiny_llama


def make(**fit):
    f = dict(steps=6, batch_size=8, lr=2e-2, fisher_docs=8, patience=0, eval_every=3)
    f.update(fit)
    cfg = BoraConfig(model="tiny", adapter=AdapterConfig(rank=2, targets=("q_proj", "v_proj"), layers=(-2, -1)),
                     prior=PriorConfig(tau_mode="learned", tau=10.0), fit=FitConfig(**f))
    train, val = task_data((20, 10, 6), seed=1), task_data((6, 4, 4), seed=2)
    return Bora(cfg, tiny_llama(), TinyTokenizer(), train.tasks, len(train)), train, val


class Recorder(Callback):
    """Logs every hook, and counts steps in state of its own."""

    name = "recorder"

    def __init__(self):
        self.events, self.steps = [], 0

    def on_train_begin(self, loop):
        self.events.append(("train_begin", loop.state.step))

    def on_optimizer_step(self, loop):
        self.steps += 1

    def on_step_end(self, loop, loss):
        self.events.append(("step_end", loop.state.step))

    def on_validate(self, loop, entry, point):
        entry["recorded_steps"] = self.steps
        self.events.append(("validate", entry["step"]))

    def on_save(self, loop, validated):
        self.events.append(("save", loop.state.step, validated))

    def on_fit_end(self, loop):
        self.events.append(("fit_end", loop.state.step))

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, state):
        self.steps = state["steps"]


def test_hooks_run_in_order_and_feed_the_history():
    b, train, val = make()
    rec = Recorder()
    res = b.fit(train, val, progress=False, callbacks=[rec])
    assert rec.events[:3] == [("validate", 0), ("save", 0, True), ("train_begin", 0)]
    assert rec.events[3:7] == [("step_end", 1), ("save", 1, False), ("step_end", 2), ("save", 2, False)]
    assert rec.events[7:10] == [("step_end", 3), ("validate", 3), ("save", 3, True)]
    assert rec.events[-1] == ("fit_end", 6)
    assert [h["recorded_steps"] for h in res.history] == [0, 3, 6]
    assert res.steps == 6 and rec.steps == 6


def test_callback_state_is_part_of_the_loop_state_and_resumes():
    b, train, val = make()
    states = {}

    def keep(step, validated, capture):
        states[step] = unflatten_state(*flatten_state(capture()))  # live tensors: copy at once

    rec = Recorder()
    b.fit(train, val, progress=False, callbacks=[rec], checkpoint=keep)
    want = {k: v.clone() for k, v in b.guide.state_dict().items()}
    st = states[4]
    assert st["step"] == 4 and st["callback.recorder"] == {"steps": 4}
    assert {"guide", "optimizer", "scheduler", "stream", "loop", "timer", "rng", "callback.best",
            "callback.tau"} <= set(st)
    again, _, _ = make()
    rec2 = Recorder()
    again.fit(train, val, progress=False, callbacks=[rec2], resume=st)
    assert rec2.steps == 6 and rec2.events[0] == ("train_begin", 4)
    got = again.guide.state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_two_callbacks_with_one_name_are_refused():
    b, train, val = make()
    with pytest.raises(ValueError, match="share a name"):
        FitLoop(b.model, b.guide, b.feed(train), b.feed(val), b.config.fit, tau=b.tau,
                callbacks=[Recorder(), Recorder()], progress=False)


def test_fit_state_round_trips_and_running_means_reset():
    s = FitState(step=2)
    assert all(math.isnan(v) for v in s.take_running_())  # no steps yet
    s.add_step_(2.0, 1.0)
    s.add_step_(4.0, 3.0)
    assert s.take_running_() == (3.0, 2.0) and s.run_n == 0
    s.history.append({"step": 2, "val_nll": 1.5})
    t = FitState()
    t.load_state_dict(s.state_dict())
    assert t == s
    t.history[0]["val_nll"] = 0.0
    assert s.history[0]["val_nll"] == 1.5  # a copy, not shared


def test_phase_timer_round_trips():
    timer = PhaseTimer()
    with timer.phase("steps"):
        pass
    with timer.phase("tau"):
        pass
    timer.add_tokens_(10)
    other = PhaseTimer()
    other.load_state_dict(timer.state_dict())
    assert other.step_times == timer.step_times and other.tokens == 10 and other.elapsed() >= timer.elapsed() - 1
    summary = other.summary()
    assert summary["seconds_steps"] == sum(timer.step_times) and "seconds_tau" in summary


def test_tau_residual_is_the_update_at_the_returned_point():
    b, train, val = make(steps=9, eval_every=3)
    res = b.fit(train, val, progress=False)
    entry = next(h for h in res.history if h["step"] == res.best_step)
    assert res.best_step > 0
    want = abs(entry["tau"]["tau"] - entry["tau_trained"]["tau"]) / entry["tau_trained"]["tau"]
    assert res.tau_residual == {"tau": pytest.approx(want)} and want > 0
    assert res.tau == entry["tau_trained"]  # the returned tau is the one the returned adapters were trained under
    assert tau_residual([{"step": 0, "tau": {"tau": 2.0}, "tau_trained": {"tau": 2.0}}], 0) is None
    assert tau_residual([{"step": 3, "log_evidence": {}, "tau": {"tau": 3.0}, "tau_trained": {"tau": 2.0}}], 3) \
        == {"tau": 0.5}


class PointLog(Callback):
    """Every validation's natural point (copied)."""

    def __init__(self):
        self.points = {}

    def on_validate(self, loop, entry, point):
        self.points[entry["step"]] = ({k: v.detach().clone() for k, v in point.items()},
                                      dict(entry["val_ppl_per_task"]))


def test_per_task_early_stopping_keeps_each_task_at_its_own_best_validation():
    b, train, val = make(steps=30, eval_every=3, early_stopping="per_task", lr=1.0)
    log = PointLog()
    res = b.fit(train, val, progress=False, callbacks=[log])
    point = b.point()
    tasks = list(b.model.tasks)
    sites = {site: glob for k in b.model.shapes for _, site, glob in b.model.task_sites(k)}
    best = {t: min(log.points, key=lambda s: (log.points[s][1][t], s)) for t in tasks}
    assert len(set(best.values())) > 1  # the tasks' best steps differ: the check below means something
    for site, glob in sites.items():
        torch.testing.assert_close(point[glob], log.points[res.best_step][0][glob], rtol=0, atol=0)
        for i, t in enumerate(tasks):
            torch.testing.assert_close(point[site][i], log.points[best[t]][0][site][i], rtol=1e-6, atol=1e-7)


def test_per_task_early_stopping_goes_on_while_a_task_improves():
    """The mean validation NLL stalls from step 3, but task a improves until step 6: with patience 2 the global
    rule alone stops at step 6, and per-task early stopping once no task has improved for 2 validations (step 12)."""
    from types import SimpleNamespace

    from bora.fit.callbacks import BestState, PerTaskBest

    # (step, mean val NLL, task a's, task b's)
    seq = [(0, 1.0, 1.0, 1.0), (3, 1.1, 0.9, 1.3), (6, 1.2, 0.8, 1.6), (9, 1.3, 0.85, 1.7), (12, 1.4, 0.9, 1.8),
           (15, 1.5, 0.95, 1.9)]

    def stop_step(per_task: bool):
        loop = SimpleNamespace(model=SimpleNamespace(shapes={}), guide=torch.nn.Linear(1, 1), tau=None,
                               state=SimpleNamespace(stopped_early=False))
        cbs = [BestState(2)] + ([PerTaskBest(["a", "b"], 2)] if per_task else [])
        for step, mean, a, b in seq:
            entry = {"step": step, "val_nll": mean, "val_ppl_per_task": {"a": math.exp(a), "b": math.exp(b)}}
            for cb in cbs:
                cb.on_validate(loop, entry, {})
            if loop.state.stopped_early:
                return step, cbs[-1]
        return None, cbs[-1]

    assert stop_step(False)[0] == 6
    step, pt = stop_step(True)
    assert step == 12 and pt.best_step == {"a": 6, "b": 0}
    again = PerTaskBest(["a", "b"], 2)
    again.load_state_dict(pt.state_dict())
    assert again.bad == pt.bad == 2
    old = pt.state_dict()
    del old["bad"]  # a checkpoint written before the rule
    again.load_state_dict(old)
    assert again.bad == 0
