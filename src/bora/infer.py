"""The inference loop: stochastic optimisation of a guide against the model, with validation.

>>> from bora.infer import fit                  # doctest: +SKIP
>>> result = fit(model, guide, train_feed, val_feed, FitConfig(epochs=2))   # doctest: +SKIP
>>> result.history[-1]["val_ppl"]              # doctest: +SKIP

One loop serves every guide: the ELBO is a module (``Trace_ELBO()(model, guide)``) whose
parameters are the guide's own (bora's guides keep them module-local, :mod:`bora.guides`), optimised
by :class:`bora.step.TrainStep` (the one optimiser step bora has: AdamW, warm-up + cosine schedule,
gradient clipping, NaN/inf checks). For AutoDelta the ELBO is the negative log joint (MAP). The loss
is divided by the number of training tokens, so clipping acts on a size-independent gradient; the
history keeps this loss (``train_loss``, which includes the prior's density) and the minibatches'
mean next-token NLL (``train_nll``, also shown on the progress bar).

Every ``eval_every`` steps the guide's point estimate is validated (per-task perplexity; the
criterion is the mean per-task NLL) and, for a learned tau in a MAP fit, tau is re-estimated by
Laplace empirical Bayes (:mod:`bora.tau`; a mean-field fit instead sets tau by the variational M-step
after every step). The optimiser has two groups: posterior means at ``lr``, and mean-field scales and a
learned tau site at ``scale_lr`` (:func:`bora.guides.param_groups`). The best validated state, and the
tau it was trained under, are restored at the end;
``patience`` validations without improvement stop the fit early.

Checkpoints and resume: ``checkpoint(step, validated, capture)`` is called after step 0's
validation and after every step; ``capture()`` returns the loop's complete state (guide,
optimiser and scheduler state, tau, the batch stream's position, every RNG state, the best state
so far, early-stopping counter and history) as tensors and plain Python values, and
``fit(..., resume=that state)`` continues from it so that the result is bit-identical (on CPU) to
an uninterrupted fit. :mod:`bora.checkpoint` writes and reads such states. A non-finite loss or
gradient norm stops the fit with :class:`NumericalError` (naming the step), before any optimiser
step applies it.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import pyro
import torch
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from tqdm.auto import tqdm

from .checkpoint import rng_state, set_rng_state_
from .config import ConfigError, FitConfig
from .curvature import StepFisher, probe_documents
from .batching import BatchStream
from .distributed import data_parallel, shard_rows
from .evaluate import evaluate
from .feed import Feed
from .fisher import task_fisher
from .guides import param_groups, point_values
from .step import NumericalError, TrainStep, make_optimizer, make_scheduler
from .tau import EmpiricalBayesTau

__all__ = ["FitResult", "fit", "num_steps", "NumericalError"]


@dataclass
class FitResult:
    history: list = field(default_factory=list)
    steps: int = 0
    best_step: int = 0
    best_val_nll: float = math.nan
    stopped_early: bool = False
    seconds: float = 0.0
    step_seconds: float = math.nan  # median wall time of one optimiser step
    tokens_per_second: float = math.nan
    tau: Optional[dict] = None
    # where the wall time went: optimiser steps, validation, tau updates (curvature + evidence), checkpoints
    seconds_steps: float = 0.0
    seconds_validation: float = 0.0
    seconds_tau: float = 0.0
    seconds_checkpoint: float = 0.0
    seconds_posterior: float = 0.0  # the Laplace posterior's curvature pass after the fit (set by Bora.fit)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def num_steps(cfg: FitConfig, num_docs: int) -> int:
    if cfg.steps is not None:
        return cfg.steps
    return max(1, math.ceil(cfg.epochs * math.ceil(num_docs / cfg.batch_size)))


def fit(model, guide, train: Feed, val: Optional[Feed], cfg: FitConfig, *,
        tau: Optional[EmpiricalBayesTau] = None, progress: bool = True,
        checkpoint: Optional[Callable[[int, bool, Callable[[], dict]], None]] = None,
        resume: Optional[dict] = None) -> FitResult:
    """Optimise ``guide`` for ``model`` (or for ``tau.model`` when tau is estimated by empirical Bayes).

    ``checkpoint(step, validated, capture)`` is called after every step (and after step 0's
    validation); ``resume`` is a state returned by ``capture`` of a fit with the same arguments."""
    pyro.set_rng_seed(cfg.seed)
    check_args = pyro.distributions.is_validation_enabled()
    gen = torch.Generator().manual_seed(cfg.seed)
    # the Fisher subsample has its own stream: learned- and fixed-tau fits see the same minibatches
    fisher_gen = torch.Generator().manual_seed(cfg.seed + 0x5F15)
    # a point guide's tau follows the Laplace evidence at each validation; a mean-field guide's the M-step
    variational_tau = tau is not None and isinstance(guide, AutoNormal)
    target = tau.model if tau is not None else model
    # the tau update's Fisher, accumulated from the steps' own per-document gradients (bora.curvature)
    curv = (StepFisher.for_model(model, train.split.task_sizes())
            if tau is not None and not variational_tau and cfg.tau_curvature == "steps" else None)

    def new_probes() -> None:
        """Fresh probe documents for the next tau update's curvature (bora.curvature; none when off)."""
        if curv is not None and cfg.tau_probe_docs:
            curv.set_probe_(probe_documents(train.split, cfg.tau_probe_docs, fisher_gen), len(train))

    total = num_steps(cfg, len(train))
    per_epoch = max(1, math.ceil(len(train) / cfg.batch_size))
    eval_every = cfg.eval_every or per_epoch
    n_tokens = max(1, train.split.num_tokens())
    train.build_cache_()
    if val is not None:
        val.build_cache_()

    def rank_batch(rows: torch.Tensor) -> dict:
        """This process's shard of the global batch ``rows`` (all of it in a single process)."""
        local, weight = shard_rows(rows)
        b = train.batch(local)
        if weight != 1.0:
            b["loglik_scale"] = weight
        return b

    stream = BatchStream(len(train), cfg.batch_size, gen)
    pending = next(stream)  # step 1's rows (the guide runs once on their batch first)
    first = rank_batch(pending)
    guide(first)  # sets up the guide's parameters (runs the model once)
    # averaged gradients across data-parallel ranks (bora.distributed); the module itself otherwise
    elbo = data_parallel(Trace_ELBO(num_particles=cfg.num_particles, max_plate_nesting=1)(target, guide))
    groups = param_groups(guide, cfg.lr, cfg.scale_lr)
    params = [p for g in groups for p in g["params"]]
    opt = make_optimizer(groups, cfg)
    sched = make_scheduler(opt, cfg, total)
    train_step = TrainStep(lambda b: elbo(b) / n_tokens, params, opt, sched, clip_norm=cfg.clip_norm,
                           pyro_checks=check_args)

    res = FitResult(tau=tau.as_dict() if tau is not None else None)
    best_state, bad = None, 0
    t_start = time.perf_counter()
    step_times, tok_count, run_loss, run_nll, run_n = [], 0, 0.0, 0.0, 0

    def validate(step: int, train_loss: float, train_nll: float) -> bool:
        nonlocal best_state, bad
        point = model.complete({**point_values(guide), **(tau.values if tau is not None else {})})
        trained_tau = tau.as_dict() if tau is not None else None  # the tau this point was fitted under
        entry = {"step": step, "epoch": step / per_epoch, "train_loss": train_loss, "train_nll": train_nll,
                 "lr": opt.param_groups[0]["lr"], "time": time.perf_counter() - t_start}
        improved = True
        t_val = time.perf_counter()
        if val is not None:
            s = evaluate(model, model.params_from_values(point), val)
            entry["val_nll"] = s["overall"]["nll_task_mean"]
            entry["val_ppl"] = s["overall"]["ppl_task_mean"]
            entry["val_ppl_per_task"] = {k: v["ppl"] for k, v in s["per_task"].items()}
            improved = not (entry["val_nll"] >= res.best_val_nll - 1e-6)  # nan-safe
            if not math.isfinite(entry["val_nll"]):
                raise NumericalError(step, "validation NLL", entry["val_nll"])
            if improved:
                res.best_val_nll, res.best_step = entry["val_nll"], step
        if improved:
            best_state = ({k: v.detach().clone() for k, v in guide.state_dict().items()}, trained_tau)
            bad = 0
        elif step > 0:
            bad += 1
        res.seconds_validation += time.perf_counter() - t_val
        if tau is not None:
            entry["tau_trained"] = trained_tau
            t_tau = time.perf_counter()
            if step > 0 and not variational_tau:
                if curv is not None:
                    rows = curv.probe_rows()
                    if len(rows):  # the probe documents' gradients at this point against the steps'
                        end = task_fisher(model, model.params_from_values(point), train, rows=rows)
                        tf, ratio = curv.probe_corrected(end)
                        entry["fisher_probe_ratio"] = statistics.fmean(ratio.values())
                    else:
                        tf = curv.task_fisher()
                    curv.reset_()
                    new_probes()
                else:
                    tf = task_fisher(model, model.params_from_values(point), train, max_per_task=cfg.fisher_docs,
                                     generator=fisher_gen)
                entry["log_evidence"] = tau.update_(point, tf, guide=guide, optimizer=opt)
            entry["tau"] = tau.as_dict()
            res.seconds_tau += time.perf_counter() - t_tau
        res.history.append(entry)
        return cfg.patience > 0 and bad >= cfg.patience

    def capture() -> dict:
        """The loop's complete state after ``step`` (tensors are live references: serialise at once)."""
        return {"step": step, "guide": guide.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "tau": tau.as_dict() if tau is not None else None,
                "stream": stream.state_dict(), "pending": pending, "rng": rng_state(gen), "bad": bad,
                "fisher_rng": fisher_gen.get_state(),
                "curvature": None if curv is None else curv.state_dict(),
                "best": None if best_state is None else {"guide": best_state[0], "tau": best_state[1]},
                "result": res.to_dict(), "step_times": list(step_times), "seconds": time.perf_counter() - t_start,
                "running": {"loss": run_loss, "nll": run_nll, "n": run_n, "tokens": tok_count}}

    step = 0
    new_probes()
    if resume is None:
        validate(0, math.nan, math.nan)
        if checkpoint is not None:
            checkpoint(0, True, capture)
    else:
        step = int(resume["step"])
        guide.load_state_dict(resume["guide"])
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        if tau is not None:
            tau.load_(resume["tau"])
        stream.load_state_dict(resume["stream"])
        bad = int(resume["bad"])
        b = resume["best"]
        best_state = None if b is None else ({k: v.clone() for k, v in b["guide"].items()}, b["tau"])
        res = FitResult(**resume["result"])
        step_times = list(resume["step_times"])
        t_start = time.perf_counter() - float(resume["seconds"])
        r = resume["running"]
        run_loss, run_nll, run_n, tok_count = float(r["loss"]), float(r["nll"]), int(r["n"]), int(r["tokens"])
        if curv is not None and resume.get("curvature") is not None:
            curv.load_state_dict(resume["curvature"])
        if "fisher_rng" in resume:
            fisher_gen.set_state(resume["fisher_rng"].to(torch.uint8))
        set_rng_state_(resume["rng"], gen)  # last: nothing above may draw random numbers
        pending = resume.get("pending")  # rows drawn for the next step but not yet used (after step 0)
        first = None
    bar = tqdm(total=total, initial=step, desc=f"fit ({type(guide).__name__})", disable=not progress,
               dynamic_ncols=True)
    try:
        for step in range(step + 1, total + 1):
            if res.stopped_early:
                step -= 1
                break
            if first is not None:
                batch, first = first, None
            else:
                batch = rank_batch(pending if pending is not None else next(stream))
            pending = None
            t0 = time.perf_counter()
            model.adapters.train(True)
            recording = None
            if curv is not None:  # a document's log-likelihood enters this loss with weight N w / (b n_tokens)
                w = float(batch.get("loglik_scale", 1.0)) * len(train) / (len(batch["index"]) * n_tokens)
                curv.begin_step(w, batch["task_ids"], cfg.num_particles, index=batch["index"])
                recording = model.adapters.record_task_grads(curv.sink)
            loss, _ = train_step(batch, step, backward_context=recording)
            if variational_tau:  # variational EM: tau at its M-step value under the current q (cheap)
                tau.update_variational_(guide)
            model.adapters.train(False)
            step_times.append(time.perf_counter() - t0)
            tok_count += int(batch["attention_mask"][:, 1:].sum())
            run_loss += float(loss.detach())
            run_nll += model.last_nll
            run_n += 1
            bar.update(1)
            post = {"nll": f"{model.last_nll:.3f}", "tok/s": f"{tok_count / sum(step_times):.0f}"}
            if res.history and "val_ppl" in res.history[-1]:
                post["val_ppl"] = f"{res.history[-1]['val_ppl']:.3f}"
            if tau is not None:
                post["tau"] = ",".join(f"{v:.3g}" for v in tau.as_dict().values())
            bar.set_postfix(post, refresh=False)
            validated = step % eval_every == 0 or step == total
            if validated:
                stop = validate(step, run_loss / max(1, run_n), run_nll / max(1, run_n))
                run_loss, run_nll, run_n = 0.0, 0.0, 0
                res.stopped_early = bool(stop)
            if checkpoint is not None:
                t_ck = time.perf_counter()
                checkpoint(step, validated, capture)
                res.seconds_checkpoint += time.perf_counter() - t_ck
            if res.stopped_early:
                break
    finally:
        bar.close()
    res.steps = step
    if best_state is not None:
        guide.load_state_dict(best_state[0])
        if tau is not None and best_state[1] is not None:
            tau.load_(best_state[1])
    res.tau = tau.as_dict() if tau is not None else None
    res.seconds = time.perf_counter() - t_start
    res.seconds_steps = float(sum(step_times))
    if step_times:
        res.step_seconds = statistics.median(step_times)
        res.tokens_per_second = tok_count / sum(step_times)
    return res


# ---------------------------------------------------------------------- a new task, global level fixed
__all__ += ["fit_new_task"]


def _new_task_split(bora, docs, name: str):
    from .data import TokenizedSplit, tokenize_split

    if isinstance(docs, TokenizedSplit):
        return TokenizedSplit(list(docs.input_ids), torch.zeros(len(docs), dtype=torch.long), (name,))
    if isinstance(docs, str):
        docs = [docs]
    docs = list(docs)
    if not docs or not all(isinstance(d, str) for d in docs):
        raise ConfigError("docs must be a TokenizedSplit or a non-empty list of texts")
    if bora.tokenizer is None:
        raise ConfigError("this fit has no tokenizer to tokenise the new task's texts")
    cfg = bora.config.data
    split = tokenize_split([{"text": d, "task": name} for d in docs], (name,), bora.tokenizer, cfg.max_length,
                           cfg.long_documents)
    if len(split) == 0:
        raise ConfigError("none of the new task's texts has 2 or more tokens")
    return split


def fit_new_task(bora, docs, *, steps: int = 100, lr: float = 0.05, batch_size: Optional[int] = None,
                 seed: int = 0, name: str = "new task") -> dict:
    """Fit the adapter of one task that is not in the fit, with the global level held fixed.

    Maximises ``sum_d log p(d | theta_new) + log Normal(theta_new | Theta, tau^-1/2)`` (MAP) over
    ``theta_new``, where ``Theta`` and ``tau`` are the fit's point estimates (posterior medians for
    a mean-field fit). ``docs``: a :class:`~bora.data.TokenizedSplit` (all rows are treated as the
    new task) or a list of texts (tokenised like the fit's data). The optimisation is non-centred:
    Adam (learning rate ``lr``, minibatches of ``batch_size`` documents, the likelihood scaled to the
    whole set) moves ``z = (theta_new - Theta) tau^1/2``, which starts at 0 (the global adapter) and
    has a standard-normal prior, so ``lr`` is in units of the prior's standard deviation whatever
    tau is. Returns ``key -> (A [r, in], B [out, r])``, usable with ``bora.adapters.use(adapter)``
    and :func:`bora.export.write_peft_adapter`.

    'shared' returns the global adapter (a task adapter equals it); 'independent' uses the
    ``Normal(0, s)`` prior and starts from the fit's initial point."""
    from .batching import batches
    from .posterior import tau_by_key
    from .seeding import sample_seed, seeded

    if not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps must be a positive integer, got {steps!r}")
    if not lr > 0:
        raise ConfigError(f"lr must be > 0, got {lr!r}")
    model = bora.model
    split = _new_task_split(bora, docs, name)
    point = bora.point()
    coupling = model.coupling
    glob = model.global_from_values(point)
    if not coupling.has_tasks:
        return {k: (A.detach().clone(), B.detach().clone()) for k, (A, B) in glob.items()}
    tau = tau_by_key(bora, point)
    dev = bora.device
    shared_A = model.shared_A_from_values(point) if model.shared_A else None
    mean, sd, z = {}, {}, {}
    for k, (sa, sb) in model.shapes.items():
        if not coupling.has_global:
            mean[k] = (torch.zeros(sa, device=dev), torch.zeros(sb, device=dev))
            sd[k] = float(model.prior.global_scale)
            z0 = (model.init_A[k] / sd[k], torch.zeros(sb, device=dev))
        else:
            mean[k] = (glob[k][0].detach(), glob[k][1].detach())
            sd[k] = float(tau[k]) ** -0.5
            z0 = (torch.zeros(sa, device=dev), torch.zeros(sb, device=dev))
        if model.shared_A:  # A is global: held fixed at the fit's A (z_A unused)
            mean[k] = (shared_A[k].detach(), mean[k][1])
            z0 = (torch.zeros(sa, device=dev), z0[1])
        # plain leaf tensors (the adapter layers store what they are given; an nn.Parameter would register)
        z[k] = (z0[0].clone().requires_grad_(not model.shared_A), z0[1].clone().requires_grad_(True))
    params = [p for ab in z.values() for p in ab if p.requires_grad]

    def theta() -> dict:
        return {k: (mean[k][0] if model.shared_A else mean[k][0] + sd[k] * zA, mean[k][1] + sd[k] * zB)
                for k, (zA, zB) in z.items()}

    feed = Feed(split, pad_id=bora.pad_id, device=dev, prefix=bora.prefix,
                cache_batch_size=bora.config.fit.eval_batch_size)
    feed.build_cache_()
    bs = batch_size or bora.config.fit.batch_size
    N = len(split)
    n_tok = max(1, split.num_tokens())
    gen = torch.Generator().manual_seed(seed)

    def loss_fn(idx):
        ll = model.loglik(feed.batch(idx), theta()).sum() * (N / len(idx))
        lp = -0.5 * sum(zA.square().sum() + zB.square().sum() for zA, zB in z.values())
        return -(ll + lp) / n_tok

    train_step = TrainStep(loss_fn, params, torch.optim.Adam(params, lr=lr), clip_norm=bora.config.fit.clip_norm)

    def stream():
        while True:
            yield from batches(split, bs, shuffle=True, generator=gen)

    it = stream()
    model.adapters.train(True)
    try:
        with seeded(dev, sample_seed(seed, 0x7E3)):
            for k in range(1, steps + 1):
                train_step(next(it), k)
    finally:
        model.adapters.train(False)
    with torch.no_grad():
        return {k: (A.detach().clone(), B.detach().clone()) for k, (A, B) in theta().items()}
