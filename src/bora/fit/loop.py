"""The fit loop: stochastic optimisation of a guide against the model, over explicit state, with callbacks.

>>> from bora.fit.loop import fit                  # doctest: +SKIP
>>> result = fit(model, guide, train_feed, val_feed, FitConfig(epochs=2))   # doctest: +SKIP
>>> result.history[-1]["val_ppl"]                  # doctest: +SKIP

One loop serves every guide: the ELBO is a module (``Trace_ELBO()(model, guide)``) whose parameters are the
guide's own (:mod:`bora.model.guides`), optimised by the step :func:`bora.fit.builder.build_step` builds
(:class:`bora.fit.step.TrainStep`: AdamW, warm-up + cosine schedule, clipping, NaN/inf checks). For AutoDelta
the ELBO is the negative log joint (MAP). The loss is divided by the number of training tokens, so clipping
acts on a size-independent gradient; the history keeps this loss (``train_loss``, which includes the prior's
density) and the minibatches' mean next-token NLL (``train_nll``).

Every ``eval_every`` steps the guide's point estimate is validated (per-task perplexity; the criterion is the
mean per-task NLL) and the callbacks see the validation (:mod:`bora.fit.callbacks`):
:class:`~bora.fit.callbacks.BestState` keeps the best state and stops early after ``patience`` validations
without improvement, and a learned tau is re-estimated (:class:`~bora.fit.callbacks.EvidenceTau` for point
guides; :class:`~bora.fit.callbacks.VariationalTau` takes the M-step after every step instead). The best
validated state, and the tau it was trained under, are restored at the end.

With ``task_updates='lazy'`` the step is :class:`bora.fit.lazy.LazyStep` (only the batch's tasks); the loop
flushes every task's pending prior shrinkage before each validation and at the end of the fit, and its lazy
state (``parts()['lazy']``) is checkpointed with the rest. With ``task_bank`` 'cpu' or 'disk'
(:mod:`bora.fit.bank`) the task rows and their lazy state live off the device during the fit (the guide's offset
parameters are the bank's tensors); :meth:`FitLoop.point` copies the point to the device for validation and the
callbacks, and the offsets return to the device when :meth:`FitLoop.run` ends.

In a multi-process run, ``cfg.parallel`` picks how each global batch is split (:mod:`bora.core.distributed`): by
documents (every ``N``-th row, DDP) or by tasks (:mod:`bora.fit.sharding`: the rows of this rank's tasks; each rank
updates only its own tasks' rows, and :meth:`FitLoop.gather_tasks_` brings every task's rows to every rank before
each validation, each checkpoint and at the end; with lazy updates each rank keeps the optimiser state and step
Fisher of its own tasks only, and :meth:`FitLoop.full_state` gathers them transiently for a checkpoint).

State and resume (as NumPyro's ``SVI.init/update`` and Hugging Face's ``TrainerState``): the loop carries
an explicit :class:`~bora.fit.state.FitState`; :meth:`FitLoop.state_dict` gathers it with every other stateful
part (guide, optimiser, scheduler, batch stream, phase timer, each named callback, every RNG state) from one
list, :meth:`FitLoop.parts`, and :meth:`FitLoop.load_state_dict` restores the same list, so checkpoint and
resume share one schema. A fit resumed from any state of an uninterrupted one ends with bit-identical
adapters on CPU, and so do two uninterrupted runs (every reduction in a step has a fixed order: the task
adapters are gathered by ``index_select``, :mod:`bora.lora.layers`).
:mod:`bora.io.checkpoint` writes such states. A non-finite loss or gradient norm stops the fit with
:class:`~bora.fit.step.NumericalError` (naming the step), before any optimiser step applies it.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import pyro
import torch
from pyro.infer.autoguide import AutoNormal

from ..core.config import FitConfig
from ..core.distributed import shard_rows, world
from ..core.seeding import rng_state, set_rng_state_
from ..data.batching import BatchStream, scored_positions
from ..data.feed import Feed
from ..evaluation.evaluate import evaluate
from ..model.guides import point_values
from .builder import build_step
from .lazy import LazyStep
from .sharding import TaskShards
from .callbacks import BestState, Callback, CheckpointFunction, EvidenceTau, PerTaskBest, ProgressBar, \
    VariationalTau, combined_context
from .state import FitState, PhaseTimer
from .step import NumericalError
from .tau import EmpiricalBayesTau

__all__ = ["FitResult", "FitLoop", "fit", "num_steps", "history_entry", "tau_residual", "NumericalError"]


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
    # per tau: |the evidence update at the returned point - the tau it was trained under| / that tau
    tau_residual: Optional[dict] = None
    # a per-task tau's learned Gamma(a, b) ({"a": a, "b": b}; None for a single tau)
    tau_hyper: Optional[dict] = None
    # the rounds of bora.fit.refine after the fit (fit.tau_rounds): one summary per round, with its history
    tau_rounds: Optional[list] = None
    # whether the last residual is at most fit.tau_tolerance (None: no rounds were asked for)
    tau_converged: Optional[bool] = None
    seconds_tau_rounds: float = 0.0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def history_entry(history: list, step: int) -> Optional[dict]:
    """The validation entry of ``step`` in a fit's ``history`` (None when that step was not validated)."""
    return next((h for h in history if h["step"] == step), None)


def tau_residual(history: list, step: int) -> Optional[dict]:
    """The fixed-point residual of an evidence-updated tau at the validation of ``step``: per tau,
    ``|tau_new - tau| / tau`` where ``tau`` is what the adapters there were trained under and ``tau_new`` the
    update computed from them (None when tau was not re-estimated at that step). A per-task tau gives the largest
    residual over its tasks."""
    entry = history_entry(history, step)
    if entry is None or "log_evidence" not in entry:
        return None
    out = {}
    for k, v in entry["tau_trained"].items():
        old = torch.as_tensor(v, dtype=torch.float64)
        new = torch.as_tensor(entry["tau"][k], dtype=torch.float64)
        out[k] = float(((new - old).abs() / old).max())
    return out


def num_steps(cfg: FitConfig, num_docs: int) -> int:
    if cfg.steps is not None:
        return cfg.steps
    return max(1, math.ceil(cfg.epochs * math.ceil(num_docs / cfg.batch_size)))


class FitLoop:
    """Optimise ``guide`` for ``model`` (or ``tau.model`` when tau is learned by empirical Bayes) on ``train``,
    validating on ``val``. ``callbacks`` run after the built-in ones (tau, best state) and before the progress
    bar; :meth:`run` fits, from the start or from a :meth:`state_dict`. ``tau_apply=False`` keeps a learned tau
    fixed and only records the evidence update at every validation (:mod:`bora.fit.refine`'s inner fits)."""

    def __init__(self, model, guide, train: Feed, val: Optional[Feed], cfg: FitConfig, *,
                 tau: Optional[EmpiricalBayesTau] = None, callbacks: Sequence[Callback] = (), progress: bool = True,
                 tau_apply: bool = True):
        pyro.set_rng_seed(cfg.seed)
        self.model, self.guide, self.train, self.val, self.cfg, self.tau = model, guide, train, val, cfg, tau
        self.total = num_steps(cfg, len(train))
        self.per_epoch = max(1, math.ceil(len(train) / cfg.batch_size))
        self.eval_every = cfg.eval_every or self.per_epoch
        self.n_tokens = max(1, train.split.num_tokens())
        train.build_cache_()
        if val is not None:
            val.build_cache_()
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.stream = BatchStream(len(train), cfg.batch_size, self.generator)
        # parallel='tasks' in a multi-process run: this rank's tasks (bora.fit.sharding)
        self.shards = TaskShards(train.split.task_sizes()) if cfg.parallel == "tasks" and world()[1] > 1 else None
        self.gathered_step: Optional[int] = None
        self.state = FitState(pending=next(self.stream))  # step 1's rows (the guide runs once on their batch)
        self._first: Optional[dict] = self.rank_batch(self.state.pending)
        guide(self._first)  # sets up the guide's parameters (runs the model once)
        self.step_fn = build_step(model, guide, cfg, total=self.total, n_tokens=self.n_tokens,
                                  target=tau.model if tau is not None else model,
                                  tau_values=tau.values if tau is not None else None, shards=self.shards)
        self.lazy: Optional[LazyStep] = self.step_fn if isinstance(self.step_fn, LazyStep) else None
        self.optimizer, self.scheduler = self.step_fn.optimizer, self.step_fn.scheduler
        self.timer = PhaseTimer()
        builtin: list[Callback] = []
        if tau is not None:  # a point guide's tau follows the Laplace evidence, a mean-field guide's the M-step
            builtin.append(VariationalTau(tau) if isinstance(guide, AutoNormal) else EvidenceTau(tau, self, tau_apply))
        self.best = BestState(cfg.patience)
        if cfg.early_stopping == "per_task" and val is not None and model.has_tasks:
            # after BestState: its rows go over the restored best state, and it may undo BestState's stop
            builtin.append(PerTaskBest(model.tasks, cfg.patience))
        self.callbacks = [self.best, *builtin, *callbacks, ProgressBar(progress)]
        names = [cb.name for cb in self.callbacks if cb.name]
        if len(set(names)) != len(names):
            raise ValueError(f"two callbacks share a name: {names}")

    # ------------------------------------------------------------------ state
    def parts(self) -> dict:
        """Every stateful part of a fit, by the key its state has in :meth:`state_dict` (restore order)."""
        return {"guide": self.guide, "optimizer": self.optimizer, "scheduler": self.scheduler,
                "stream": self.stream, "loop": self.state, "timer": self.timer,
                **({"lazy": self.lazy.rows} if self.lazy is not None else {}),
                **{f"callback.{cb.name}": cb for cb in self.callbacks if cb.name}}

    def state_dict(self) -> dict:
        """The complete state after ``state.step`` steps (tensors are live references: serialise at once)."""
        return {"step": self.state.step, **{k: p.state_dict() for k, p in self.parts().items()},
                "rng": rng_state(self.generator)}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a :meth:`state_dict` of a fit with the same arguments."""
        for k, p in self.parts().items():
            p.load_state_dict(state[k])
        set_rng_state_(state["rng"], self.generator)  # last: nothing above may draw random numbers
        self._first = None
        self.gathered_step = None

    # ------------------------------------------------------------------ pieces
    def rank_batch(self, rows: torch.Tensor) -> dict:
        """This process's shard of the global batch ``rows`` (all of it in a single process): every ``N``-th row
        (``parallel='documents'``) or the rows of this rank's tasks (``'tasks'``; ranks other than 0 leave out the
        global prior)."""
        if self.shards is not None:
            local, weight = self.shards.batch_rows(rows, self.train.split.task_ids[rows])
        else:
            local, weight = shard_rows(rows)
        b = self.train.batch(local)
        if weight != 1.0:
            b["loglik_scale"] = weight
        if self.shards is not None and self.shards.rank != 0:
            b["global_prior"] = False
        return b

    def gather_tasks_(self, force: bool = False) -> None:
        """A task-sharded fit: every task's rows (offsets and their optimiser state) from its owning rank onto every
        rank, once per step (``force``: again). A collective: every rank calls it at the same step. A no-op
        otherwise."""
        if self.shards is None or (self.gathered_step == self.state.step and not force):
            return
        self.shards.gather_()
        self.gathered_step = self.state.step

    @contextlib.contextmanager
    def full_state(self):
        """A task-sharded fit: within the block, :meth:`state_dict` holds every task's state (a lazy fit's moments,
        counts and ``L_t`` and a learned tau's step Fisher, which each rank keeps for its own tasks only:
        :mod:`bora.fit.sharding`), gathered from their owners on entry (a collective: every rank enters it at the
        same step) and freed on exit. Nothing otherwise."""
        parts = [p for p in self.parts().values() if hasattr(p, "gather_state_")] if self.shards is not None else []
        for p in parts:
            p.gather_state_()
        try:
            yield
        finally:
            for p in parts:
                p.release_state_()

    def flush_(self) -> None:
        """Bring every task's lazily updated offset up to date (``task_updates='lazy'``; nothing otherwise)."""
        if self.lazy is not None:
            self.lazy.flush_()

    def point(self) -> dict:
        """The guide's point estimate (and tau), on the fit's device: with a task bank (``task_bank`` 'cpu' or
        'disk', :mod:`bora.fit.bank`) the task rows are copied there whole (a no-op on CPU)."""
        values = point_values(self.guide)
        if self.lazy is not None and self.lazy.banked:
            values = {k: v.to(self.lazy.rows.device) for k, v in values.items()}
        return self.model.complete({**values, **(self.tau.values if self.tau is not None else {})})

    def _next_batch(self) -> dict:
        if self._first is not None:
            batch, self._first = self._first, None
        else:
            pending = self.state.pending
            batch = self.rank_batch(pending if pending is not None else next(self.stream))
        self.state.pending = None
        return batch

    def _step(self, batch: dict) -> float:
        """One optimiser step (timed as a step, with the callbacks' contexts and post-step hooks)."""
        state, model = self.state, self.model
        with self.timer.phase("steps"):
            model.adapters.train(True)
            contexts = [c for c in (cb.step_context(self, batch) for cb in self.callbacks) if c is not None]
            ctx = contexts[0] if len(contexts) == 1 else (combined_context(contexts) if contexts else None)
            loss, _ = self.step_fn(batch, state.step, backward_context=ctx)
            for cb in self.callbacks:
                cb.on_optimizer_step(self)
            model.adapters.train(False)
        self.timer.add_tokens_(int(scored_positions(batch).sum()))
        return float(loss.detach())

    def validate(self) -> dict:
        """Validate the current point, let the callbacks see it, and append the entry to the history."""
        state = self.state
        train_loss, train_nll = state.take_running_()
        self.flush_()  # lazy task updates: validation, the best state and the tau update see up-to-date offsets
        self.gather_tasks_(force=True)  # task-sharded: ... and every task's, on every rank
        point = self.point()
        entry = {"step": state.step, "epoch": state.step / self.per_epoch, "train_loss": train_loss,
                 "train_nll": train_nll, "lr": self.optimizer.param_groups[0]["lr"], "time": self.timer.elapsed()}
        if self.val is not None:
            with self.timer.phase("validation"):
                s = evaluate(self.model, self.model.params_from_values(point), self.val)
            entry["val_nll"] = s["overall"]["nll_task_mean"]
            entry["val_ppl"] = s["overall"]["ppl_task_mean"]
            entry["val_ppl_per_task"] = {k: v["ppl"] for k, v in s["per_task"].items()}
            if not math.isfinite(entry["val_nll"]):
                raise NumericalError(state.step, "validation NLL", entry["val_nll"])
        for cb in self.callbacks:
            with self.timer.phase(cb.phase):
                cb.on_validate(self, entry, point)
        state.history.append(entry)
        return entry

    def _save(self, validated: bool) -> None:
        for cb in self.callbacks:
            with self.timer.phase("checkpoint"):
                cb.on_save(self, validated)

    # ------------------------------------------------------------------ the loop
    def run(self, resume: Optional[dict] = None) -> FitResult:
        """Fit from the start, or from ``resume`` (a :meth:`state_dict`); returns the :class:`FitResult`."""
        state = self.state
        if resume is None:
            self.validate()
            self._save(True)
        else:
            self.load_state_dict(resume)
        for cb in self.callbacks:
            cb.on_train_begin(self)
        try:
            while state.step < self.total and not state.stopped_early:
                state.step += 1
                loss = self._step(self._next_batch())
                state.add_step_(loss, self.model.last_nll)
                for cb in self.callbacks:
                    cb.on_step_end(self, loss)
                validated = state.step % self.eval_every == 0 or state.step == self.total
                if validated:
                    self.validate()
                self._save(validated)
            self.flush_()  # before a callback restores a kept state
            self.gather_tasks_(force=True)
            for cb in self.callbacks:
                cb.on_fit_end(self)
        finally:
            if self.lazy is not None:  # a task bank: the guide's offsets back on the device, its files removed
                self.lazy.release_()
            for cb in self.callbacks:
                cb.close(self)
        return self.result()

    def result(self) -> FitResult:
        return FitResult(history=self.state.history, steps=self.state.step, best_step=self.best.best_step,
                         best_val_nll=self.best.best_val_nll, stopped_early=self.state.stopped_early,
                         tau=self.tau.as_dict() if self.tau is not None else None,
                         tau_hyper=(self.tau.hyper_dict() or None) if self.tau is not None else None,
                         tau_residual=tau_residual(self.state.history, self.best.best_step), **self.timer.summary())


def fit(model, guide, train: Feed, val: Optional[Feed], cfg: FitConfig, *,
        tau: Optional[EmpiricalBayesTau] = None, progress: bool = True,
        checkpoint: Optional[Callback | Callable[[int, bool, Callable[[], dict]], None]] = None,
        resume: Optional[dict] = None, callbacks: Sequence[Callback] = ()) -> FitResult:
    """Run a :class:`FitLoop`. ``checkpoint``: a :class:`~bora.fit.callbacks.Callback` (e.g.
    :class:`bora.io.checkpoint.Checkpointer`) or ``fn(step, validated, capture)``, called after step 0's
    validation and after every step; ``resume``: a state it captured, from a fit with the same arguments."""
    extra = list(callbacks)
    if checkpoint is not None:
        extra.append(checkpoint if isinstance(checkpoint, Callback) else CheckpointFunction(checkpoint))
    return FitLoop(model, guide, train, val, cfg, tau=tau, callbacks=extra, progress=progress).run(resume)
