"""Lazy task updates (bora.fit.lazy): the closed-form prior equals the per-step proximal update, the sparse Adam
follows its documented semantics, the lazy loss has the eager gradients, and a lazy fit runs end to end, resumes
bit-identically and lands near the eager fit."""

import math

import pytest
import torch

from bora.api import Bora
from bora.core.config import AdapterConfig, BoraConfig, ConfigError, FitConfig, PriorConfig
from bora.fit.builder import build_step
from bora.fit.lazy import LazyRows, LazyStep
from bora.io.checkpoint import flatten_state, unflatten_state

from conftest import TinyTokenizer, task_data, tiny_llama

T, SHAPE = 9, (4, 3)


def schedule(k: int, n: int) -> float:
    """A warm-up + cosine learning rate, so the per-step factors all differ."""
    return 0.05 * min(1.0, (k + 1) / 5) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * k / n)))


def batches(n: int, seed: int = 0) -> list[torch.Tensor]:
    """Sorted task sets per step: tasks absent for stretches of varying length (task 8 only at the very end)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(n):
        present = torch.rand(T - 1, generator=g) < torch.linspace(0.7, 0.05, T - 1)
        if k == n - 1:
            present[:] = True
        u = present.nonzero().reshape(-1)
        if k == n - 1:
            u = torch.cat([u, torch.tensor([T - 1])])
        out.append(u)
    return out


def grad_at(delta_rows: torch.Tensor, u: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A likelihood gradient that depends on the current rows (a stale row would give a different one)."""
    return (delta_rows - target[u]) * (1 + u.reshape(-1, 1, 1).float())


def test_lazy_sgd_equals_eager_proximal_sgd():
    n = 80
    g = torch.Generator().manual_seed(1)
    init, target = torch.randn(T, *SHAPE, generator=g), torch.randn(T, *SHAPE, generator=g) * 3
    eager, lazy = init.clone(), init.clone()
    rows = LazyRows({"d": lazy}, {"d": "tau"}, rule="sgd")
    for k, u in enumerate(batches(n)):
        lr, tau = schedule(k, n), (2.0 if k < n // 2 else 7.0)  # tau changes mid-fit (a tau update)
        # eager proximal SGD: a gradient step on the tasks with data, then every task's prior prox
        eager[u] -= lr * grad_at(eager[u], u, target)
        eager /= 1 + lr * tau
        # lazy: bring the batch's tasks up to date, step them, advance the running log-product
        rows.flush_(u)
        rows.step_(u, {"d": grad_at(lazy[u], u, target)}, lr, {"tau": tau})
        if k % 25 == 24:  # a validation in between: flushing everything is exact too
            rows.flush_()
            torch.testing.assert_close(lazy, eager, rtol=1e-5, atol=1e-7)
    rows.flush_()
    torch.testing.assert_close(lazy, eager, rtol=1e-5, atol=1e-7)
    assert not torch.equal(lazy, init)
    rows.flush_()  # idempotent
    torch.testing.assert_close(lazy, eager, rtol=1e-5, atol=1e-7)


def test_lazy_adam_matches_its_documented_semantics():
    n, b1, b2, eps = 60, 0.9, 0.999, 1e-8
    g = torch.Generator().manual_seed(2)
    init, target = torch.randn(T, *SHAPE, generator=g), torch.randn(T, *SHAPE, generator=g)
    ref, lazy = init.clone(), init.clone()
    m, v, c = torch.zeros_like(ref), torch.zeros_like(ref), torch.zeros(T, dtype=torch.long)
    rows = LazyRows({"d": lazy}, {"d": "tau"}, rule="adam", betas=(b1, b2), eps=eps)
    tau = 30.0
    for k, u in enumerate(batches(n, seed=3)):
        lr = schedule(k, n)
        # the reference, written out per step over every task: SparseAdam rows with per-row counts ...
        grad = grad_at(ref[u], u, target)
        c[u] += 1
        m[u] = b1 * m[u] + (1 - b1) * grad
        v[u] = b2 * v[u] + (1 - b2) * grad * grad
        cc = c[u].double().reshape(-1, 1, 1)
        ref[u] -= lr * (m[u] / (1 - b1 ** cc).float()) / ((v[u] / (1 - b2 ** cc).float()).sqrt() + eps)
        # ... then every task already updated shrinks by exp(-lr tau / D), D its frozen Adam denominator
        seen = c > 0
        cs = c[seen].double().reshape(-1, 1, 1)
        D = (v[seen].double() / (1 - b2 ** cs)).sqrt() + eps
        ref[seen] *= torch.exp(-lr * tau / D).float()
        rows.flush_(u)
        rows.step_(u, {"d": grad_at(lazy[u], u, target)}, lr, {"tau": tau})
    rows.flush_()
    torch.testing.assert_close(lazy, ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(rows.m["d"], m)
    torch.testing.assert_close(rows.v["d"], v)
    assert torch.equal(rows.count, c)


def test_lazy_rows_state_round_trips():
    lazy = torch.randn(T, *SHAPE)
    rows = LazyRows({"d": lazy}, {"d": "tau"})
    for k, u in enumerate(batches(10)):
        rows.flush_(u)
        rows.step_(u, {"d": torch.randn(len(u), *SHAPE)}, 0.01, {"tau": 3.0})
    state = unflatten_state(*flatten_state(rows.state_dict()))
    other = LazyRows({"d": lazy.clone()}, {"d": "tau"})
    other.load_state_dict(state)
    assert other.L == rows.L and torch.equal(other.count, rows.count)
    assert all(torch.equal(getattr(other, n)["d"], getattr(rows, n)["d"]) for n in ("last", "m", "v"))
    with pytest.raises(ConfigError, match="rule"):
        LazyRows({"d": lazy}, {"d": "tau"}, rule="sgd").load_state_dict(state)


# ------------------------------------------------------------------ the step and the fit


def make(tau_mode="learned", tasks=(20, 10, 6, 8, 4), prior=None, **fit):
    f = dict(steps=30, batch_size=8, lr=2e-2, fisher_docs=8, patience=0, eval_every=10)
    f.update(fit)
    cfg = BoraConfig(model="tiny", adapter=AdapterConfig(rank=2, targets=("q_proj", "v_proj"), layers=(-2, -1)),
                     prior=PriorConfig(tau_mode=tau_mode, tau=10.0, **(prior or {})), fit=FitConfig(**f))
    train, val = task_data(tasks, seed=1), task_data((6, 4, 4, 4, 4), seed=2)
    return Bora(cfg, tiny_llama(), TinyTokenizer(), train.tasks, len(train)), train, val


@pytest.mark.parametrize("prior", [{}, {"hierarchy": "AB", "tau_per_module": True}])
def test_lazy_loss_has_the_eager_gradients(prior):
    """The hand-written lazy loss against Pyro's ELBO of the model: the same global gradient, and the offsets'
    eager gradient is the lazy rows' likelihood gradient plus the prior's tau' delta (absent tasks: that alone)."""
    b, train, _ = make(tau_mode="fixed", task_updates="lazy", prior=prior)
    feed = b.feed(train)
    batch = feed.batch(torch.tensor([0, 1, 2, 21, 22, 40, 41, 42]))  # tasks 0, 1, 3 (2 and 4 absent)
    b.guide(batch)
    with torch.no_grad():
        for name, p in b.guide.named_parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    n_tokens = train.num_tokens()
    eager = build_step(b.model, b.guide, b.config.fit.replace(task_updates="eager"), total=10, n_tokens=n_tokens)
    lazy = build_step(b.model, b.guide, b.config.fit, total=10, n_tokens=n_tokens)
    assert isinstance(lazy, LazyStep) and not isinstance(eager, LazyStep)
    eager.optimizer.zero_grad(set_to_none=True)
    eager.loss_fn(batch).backward()
    want = {n: p.grad.clone() for n, p in b.guide.named_parameters()}
    u, inv = torch.unique(batch["task_ids"], sorted=True, return_inverse=True)
    assert u.tolist() == [0, 1, 3]
    lazy.optimizer.zero_grad(set_to_none=True)
    loss, leaves = lazy.loss(batch, u, inv)
    loss.backward()
    assert len(leaves) == (8 if prior else 4)  # 4 modules; theta_A and theta_B of each for 'AB'
    for name, p in lazy.globals.items():
        torch.testing.assert_close(p.grad, want[name + "_unconstrained"], rtol=1e-4, atol=1e-7)
    tau_prime = 10.0 / n_tokens
    for site, leaf in leaves.items():
        delta = lazy.rows.deltas[site]
        full = want[site + "_offset_unconstrained"]
        torch.testing.assert_close(full[u], leaf.grad + tau_prime * delta[u], rtol=1e-4, atol=1e-8)
        absent = torch.tensor([2, 4])
        torch.testing.assert_close(full[absent], tau_prime * delta[absent], rtol=1e-4, atol=1e-8)


def test_lazy_step_is_the_documented_update_written_out_with_pyros_gradients():
    """Eight lazy steps of a tiny model against the module docstring's update written out densely over every task,
    with the gradients from Pyro's ELBO of the model (the likelihood's: the eager gradient minus tau' delta) and a
    separate AdamW for the global adapter. No clipping (the two norms differ by design); learning rates from the
    fit's schedule."""
    cfg = dict(tau_mode="fixed", task_updates="lazy", clip_norm=0.0, lr=1e-2, steps=8, warmup=0.25)
    lazy_b, train, _ = make(**cfg)
    ref_b, _, _ = make(**cfg)
    n_tokens, T = train.num_tokens(), 5
    lazy = build_step(lazy_b.model, lazy_b.guide, lazy_b.config.fit, total=8, n_tokens=n_tokens)
    eager = build_step(ref_b.model, ref_b.guide, ref_b.config.fit.replace(task_updates="eager"), total=8,
                       n_tokens=n_tokens)
    params = {n: p for n, p in ref_b.guide.named_parameters()}
    offsets = {n: p for n, p in params.items() if "_offset" in n}
    glob = [p for n, p in params.items() if n not in offsets]
    opt = torch.optim.AdamW(glob, lr=1e-2, weight_decay=0.0)
    b1, b2, eps, tau_prime = 0.9, 0.999, 1e-8, 10.0 / n_tokens
    m = {n: torch.zeros_like(p) for n, p in offsets.items()}
    v = {n: torch.zeros_like(p) for n, p in offsets.items()}
    c = torch.zeros(T, dtype=torch.long)
    g = torch.Generator().manual_seed(5)
    feed = lazy_b.feed(train)
    for k in range(1, 9):
        batch = feed.batch(torch.randperm(len(train), generator=g)[:6])
        lr = float(lazy.optimizer.param_groups[0]["lr"])
        lazy(batch, k)
        eager.optimizer.zero_grad(set_to_none=True)
        eager.loss_fn(batch).backward()
        for p in glob:
            p.grad = p.grad.clone()
        with torch.no_grad():
            for group in opt.param_groups:
                group["lr"] = lr
            opt.step()
            u = torch.unique(batch["task_ids"])
            c[u] += 1
            cc = c[u].double().reshape(-1, 1, 1)
            for n, d in offsets.items():
                gl = (d.grad - tau_prime * d)[u]  # the likelihood's gradient of the batch's rows
                m[n][u] = b1 * m[n][u] + (1 - b1) * gl
                v[n][u] = b2 * v[n][u] + (1 - b2) * gl * gl
                d[u] -= lr * (m[n][u] / (1 - b1 ** cc).float()) / ((v[n][u] / (1 - b2 ** cc).float()).sqrt() + eps)
                seen = c > 0
                cs = c[seen].double().reshape(-1, 1, 1)
                D = (v[n][seen].double() / (1 - b2 ** cs)).sqrt() + eps
                d[seen] *= torch.exp(-lr * tau_prime / D).float()
    lazy.flush_()
    got = dict(lazy_b.guide.named_parameters())
    assert int((c == 0).sum()) == 0 and int(c.min()) < 8  # every task updated, some absent for a while
    for n, p in params.items():
        torch.testing.assert_close(got[n].detach(), p.detach(), rtol=2e-4, atol=2e-6)


def test_lazy_steps_feed_the_tau_curvature_with_the_batch_task_ids():
    """tau's per-task Fisher accumulated from a lazy step (run on remapped task ids) equals the eager step's."""
    from bora.fit.curvature import StepFisher

    fishers = {}
    for mode in ("eager", "lazy"):
        b, train, _ = make(task_updates=mode)
        feed = b.feed(train)
        batch = feed.batch(torch.tensor([0, 1, 21, 40, 41, 42, 44, 45]))  # tasks 0, 1, 3, 4 (2 absent)
        n_tokens = train.num_tokens()
        step = build_step(b.model, b.guide, b.config.fit, total=10, n_tokens=n_tokens, target=b.tau.model,
                          tau_values=b.tau.values)
        curv = StepFisher.for_model(b.model, train.task_sizes())
        curv.begin_step(len(train) / (len(batch["index"]) * n_tokens), batch["task_ids"])
        step(batch, 1, backward_context=b.model.adapters.record_task_grads(curv.sink))
        fishers[mode] = curv.task_fisher().fisher
    for key, pair in fishers["eager"].items():
        F, G = pair[1], fishers["lazy"][key][1]
        assert bool(F[[0, 1, 3, 4]].flatten(1).sum(1).gt(0).all()) and not bool(F[2].any())
        torch.testing.assert_close(G, F, rtol=1e-4, atol=1e-10)


def test_lazy_fit_end_to_end_and_close_to_eager(tmp_path):
    """fit -> evaluate -> save / load. Tolerance: the two optimisers target the same MAP point by different paths
    (module docstring: the prior outside Adam's moments), and 30 steps of lr 2e-2 on a tiny random model move the
    mean validation NLL by about 0.15 from the base model's; the lazy fit must land within 0.02 of the eager one
    (an eighth of that improvement) and improve on the base model as much, to within that."""
    results = {}
    for mode in ("eager", "lazy"):
        b, train, val = make(task_updates=mode)
        res = b.fit(train, val, progress=False)
        results[mode] = (b, res, val)
    (_, re_, val), (bl, rl, _) = results["eager"], results["lazy"]
    base = rl.history[0]["val_nll"]
    assert abs(rl.best_val_nll - re_.best_val_nll) < 0.02
    assert rl.best_val_nll < base - 0.1
    assert abs(rl.tau["tau"] / re_.tau["tau"] - 1) < 0.5  # the evidence tau, from flushed offsets
    s = bl.evaluate(val)
    assert math.isfinite(s["overall"]["nll_task_mean"])
    bl.save(tmp_path / "fit")
    again = Bora.load(tmp_path / "fit", lm=tiny_llama(), tokenizer=TinyTokenizer())
    assert again.config.fit.task_updates == "lazy"
    s2 = again.evaluate(val)
    assert s2["overall"]["nll_task_mean"] == pytest.approx(s["overall"]["nll_task_mean"], rel=1e-6)


def test_lazy_resume_is_bit_identical():
    b, train, val = make(task_updates="lazy", steps=12, eval_every=5)
    states = {}

    def keep(step, validated, capture):
        states[step] = flatten_state(capture())  # what a checkpoint writes: safetensors tensors + JSON

    b.fit(train, val, progress=False, checkpoint=keep)
    want = {k: v.clone() for k, v in b.guide.state_dict().items()}
    for step in (3, 5, 7):  # before, at and after a validation (a flush)
        state = unflatten_state(*states[step])
        assert "lazy" in state and state["lazy"]["rule"] == "adam"
        again, _, _ = make(task_updates="lazy", steps=12, eval_every=5)
        again.fit(train, val, progress=False, resume=state)
        got = again.guide.state_dict()
        assert all(torch.equal(want[k], got[k]) for k in want), step


def test_lazy_resume_from_a_checkpoint_on_disk_is_bit_identical(tmp_path):
    """The same through bora.io.checkpoint's files (safetensors + JSON): the lazy state's float64 log-products
    and per-task last-seen values survive the round trip exactly."""
    from bora.io.checkpoint import Checkpointer, load_checkpoint

    b, train, val = make(task_updates="lazy", steps=12, eval_every=5)
    b.fit(train, val, progress=False, checkpoint=Checkpointer(tmp_path / "fit", every=7))
    want = {k: v.clone() for k, v in b.guide.state_dict().items()}
    c = load_checkpoint(tmp_path / "fit")
    assert c.step == 7 and c.state["lazy"]["L"]["tau"] > 0 and c.state["lazy"]["last"]
    again, _, _ = make(task_updates="lazy", steps=12, eval_every=5)
    again.fit(train, val, progress=False, resume=c.state)
    got = again.guide.state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)


def test_lazy_refusals_are_one_line_errors():
    cases = [
        (lambda: FitConfig(task_updates="lazy", guide="meanfield"), "point guide"),
        (lambda: FitConfig(task_updates="lazy", weight_decay=0.1), "weight_decay"),
        (lambda: FitConfig(task_updates="lazy", guide="laplace", num_particles=2), "num_particles"),
        (lambda: BoraConfig(prior=PriorConfig(tau_mode="uncoupled"), fit=FitConfig(task_updates="lazy")),
         "tau_mode"),
        (lambda: BoraConfig(prior=PriorConfig(parameterisation="noncentred"), fit=FitConfig(task_updates="lazy")),
         "offset"),
        (lambda: FitConfig(task_updates="sometimes"), "task_updates"),
    ]
    for build, match in cases:
        with pytest.raises(ConfigError, match=match) as e:
            build()
        assert "\n" not in str(e.value)


def test_lazy_cli_fit_evaluate_and_refusals(tmp_path, capsys):
    """``bora fit --task-updates lazy`` (the flag generated from FitConfig.task_updates), then ``bora evaluate``;
    unsupported combinations exit 2 with one line."""
    import json

    from bora.cli.main import main

    from conftest import tiny_model_dir, write_jsonl

    model, data = tiny_model_dir(tmp_path / "model"), write_jsonl(tmp_path / "data.jsonl")
    base = ["fit", "--model", str(model), "--data", str(data), "--task-column", "speaker", "--targets", "q_proj",
            "v_proj", "--layers", "-1", "--rank", "2", "--steps", "6", "--batch-size", "4", "--lr", "0.02",
            "--quiet", "--device", "cpu", "--task-updates", "lazy"]
    out = tmp_path / "fit"
    assert main(base + ["--tau-mode", "learned", "--output", str(out)]) == 0
    capsys.readouterr()
    assert json.loads((out / "config.json").read_text())["fit"]["task_updates"] == "lazy"
    assert main(["evaluate", str(out), "--quiet", "--device", "cpu"]) == 0
    capsys.readouterr()
    for extra, msg in ((["--tau-mode", "shared"], "tau_mode"), (["--guide", "meanfield"], "point guide")):
        assert main(base + extra + ["--output", str(tmp_path / "err")]) == 2
        err = capsys.readouterr().err.strip()
        assert msg in err and err.startswith("bora: error:") and "\n" not in err
