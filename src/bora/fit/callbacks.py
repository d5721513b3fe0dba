"""Callbacks of the fit loop: each owns one concern and its own ``state_dict``.

>>> from bora.fit.callbacks import Callback
>>> class CountValidations(Callback):
...     name = "count"
...     def __init__(self):
...         self.n = 0
...     def on_validate(self, loop, entry, point):
...         self.n += 1
...     def state_dict(self):
...         return {"n": self.n}
...     def load_state_dict(self, state):
...         self.n = state["n"]
>>> CountValidations().state_dict()
{'n': 0}

:class:`bora.fit.loop.FitLoop` calls the hooks in order (as Hugging Face's ``TrainerCallback`` does):
``on_train_begin`` (after a resume has restored the state), ``step_context`` (a context manager around one step's loss
and backward pass, or None),
``on_optimizer_step`` (right after the optimiser step, inside the step's timing), ``on_step_end``,
``on_validate`` (with the validation entry being built and the point estimate it validated) and ``on_save``
(after every step, where a checkpoint may be written); ``on_fit_end`` once when the fit completes, where a
callback may restore what it kept; ``close`` last, also after an error. A callback with a ``name`` is saved in every
checkpoint under that name and restored
on resume; ``phase`` names the :class:`~bora.fit.state.PhaseTimer` phase its ``on_validate`` time counts to.

Built in: :class:`BestState` (the best validated state and early stopping), :class:`PerTaskBest` (each task's
adapter from its own best validation, ``early_stopping='per_task'``), :class:`EvidenceTau` (a learned
tau by Laplace empirical Bayes at every validation, for point guides; its curvature from the steps' own
gradients, :mod:`bora.fit.curvature`), :class:`VariationalTau` (the variational M-step after every step,
for mean-field guides), :class:`ProgressBar`, and :class:`CheckpointFunction` (a plain
``fn(step, validated, capture)``; :class:`bora.io.checkpoint.Checkpointer` is the one that writes folders).
"""

from __future__ import annotations

import contextlib
import math
import statistics
from typing import Callable, ContextManager, Optional

import torch
from tqdm.auto import tqdm

from ..core.config import FitConfig
from ..core.seeding import stream_seed
from ..model.distributions import LATENT_SUFFIX, guide_value
from ..model.guides import set_locs_
from .curvature import StepFisher, probe_documents
from .fisher import task_fisher
from .tau import EmpiricalBayesTau, format_tau

__all__ = ["Callback", "BestState", "PerTaskBest", "EvidenceTau", "VariationalTau", "ProgressBar", "CheckpointFunction"]


class Callback:
    """Hooks of :class:`~bora.fit.loop.FitLoop` (every one optional) and the callback's checkpointed state.

    Every hook gets ``loop``, the running :class:`~bora.fit.loop.FitLoop` (its ``state``, ``model``, ``guide``,
    ``tau``, ``optimizer``, ``timer``, ``train`` feed and ``cfg``)."""

    name: str = ""  # the key of this callback's state in a checkpoint ("" : nothing to save)
    phase: str = "validation"  # where on_validate's time counts

    def on_train_begin(self, loop) -> None:
        pass

    def step_context(self, loop, batch: dict) -> Optional[ContextManager]:
        return None

    def on_optimizer_step(self, loop) -> None:
        pass

    def on_step_end(self, loop, loss: float) -> None:
        pass

    def on_validate(self, loop, entry: dict, point: dict) -> None:
        pass

    def on_save(self, loop, validated: bool) -> None:
        pass

    def on_fit_end(self, loop) -> None:
        pass

    def close(self, loop) -> None:
        """Release what the callback holds open (called last, also when the fit raised)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class BestState(Callback):
    """Keeps the best validated guide state and the tau it was trained under; stops after ``patience``
    validations without improvement (0: never); restores the best state at the end of the fit."""

    name = "best"

    def __init__(self, patience: int):
        self.patience = patience
        self.best: Optional[dict] = None  # {"guide": state dict, "tau": tau dict or None}
        self.best_step = 0
        self.best_val_nll = float("nan")
        self.bad = 0

    def on_validate(self, loop, entry, point):
        improved = "val_nll" not in entry or not (entry["val_nll"] >= self.best_val_nll - 1e-6)  # nan-safe
        if improved and "val_nll" in entry:
            self.best_val_nll, self.best_step = entry["val_nll"], entry["step"]
        if improved:
            self.best = {"guide": {k: v.detach().clone() for k, v in loop.guide.state_dict().items()},
                         "tau": loop.tau.as_dict() if loop.tau is not None else None,
                         "tau_hyper": loop.tau.hyper_dict() if loop.tau is not None else None}
            self.bad = 0
        elif entry["step"] > 0:
            self.bad += 1
        if self.patience > 0 and self.bad >= self.patience:
            loop.state.stopped_early = True

    def on_fit_end(self, loop):
        if self.best is None:
            return
        loop.guide.load_state_dict(self.best["guide"])
        if loop.tau is not None and self.best["tau"] is not None:
            loop.tau.load_(self.best["tau"], self.best.get("tau_hyper"))

    def state_dict(self):
        return {"best": self.best, "best_step": self.best_step, "best_val_nll": self.best_val_nll, "bad": self.bad}

    def load_state_dict(self, state):
        b = state["best"]
        self.best = None if b is None else {"guide": {k: v.clone() for k, v in b["guide"].items()}, "tau": b["tau"]}
        self.best_step, self.best_val_nll, self.bad = int(state["best_step"]), float(state["best_val_nll"]), \
            int(state["bad"])


class PerTaskBest(Callback):
    """Per-task early stopping for point guides: each task's adapter rows are kept from the validation where its
    own validation NLL was best, and written back at the end (after :class:`BestState` restored the overall best
    state, whose global adapter and tau stay). Task rows are kept in natural coordinates (``B_t``) and written
    back through the guide's parameterisation (``delta_t = B_t - Theta`` for offset sites, ``z_t = (B_t - Theta)
    tau^1/2`` for non-centred ones).

    The fit goes on while any task still improves: it stops once neither the mean validation NLL
    (:class:`BestState`, which runs first) nor any task's own has improved for ``patience`` validations (0: never
    stops early). Without this, a task still improving would be cut off when the mean stalls."""

    name = "per_task_best"

    def __init__(self, tasks, patience: int = 0):
        self.tasks = list(tasks)
        self.patience = patience
        self.best_nll = {t: float("inf") for t in self.tasks}
        self.best_step = {t: 0 for t in self.tasks}
        self.rows: dict = {}  # "site#t" -> the task's natural adapter row at its best step
        self.bad = 0  # validations since any task last improved its own best

    def on_validate(self, loop, entry, point):
        per_task = entry.get("val_ppl_per_task")
        if not per_task:
            return
        improved = False
        for t, name in enumerate(self.tasks):
            nll = math.log(per_task[name])
            if nll < self.best_nll[name] - 1e-9:
                improved = True
                self.best_nll[name], self.best_step[name] = nll, entry["step"]
                for site in _task_sites(loop.model):
                    self.rows[f"{site}#{t}"] = point[site][t].detach().clone()
        self.bad = 0 if improved else self.bad + (entry["step"] > 0)
        if loop.state.stopped_early and self.bad < self.patience:
            loop.state.stopped_early = False  # the mean has stalled, but a task still improves

    def on_fit_end(self, loop):
        model = loop.model
        point = loop.point()
        tau = model.tau_by_key(point) if model.noncentred else {}  # only the non-centred z depend on tau
        changes = {}
        for site, glob in _task_sites(model).items():
            natural = point[site].detach().clone()
            for t in range(len(self.tasks)):
                row = self.rows.get(f"{site}#{t}")
                if row is not None:
                    natural[t] = row
            name = site + LATENT_SUFFIX.get(model.parameterisation, "")  # the guide's site for these task rows
            changes[name] = guide_value(name, {**point, site: natural}, glob=glob, tau=tau.get(site.partition(":")[2]))
        with torch.no_grad():
            set_locs_(loop.guide, changes)

    def state_dict(self):
        return {"best_nll": dict(self.best_nll), "best_step": dict(self.best_step), "rows": dict(self.rows),
                "bad": self.bad}

    def load_state_dict(self, state):
        self.best_nll = {k: float(v) for k, v in state["best_nll"].items()}
        self.best_step = {k: int(v) for k, v in state["best_step"].items()}
        self.rows = {k: v.clone() for k, v in state["rows"].items()}
        self.bad = int(state.get("bad", 0))  # a checkpoint from before the per-task stopping rule: 0


def _task_sites(model) -> dict[str, str]:
    """Natural task site -> its global site, for every task-level factor."""
    return {site: glob for k in model.shapes for _, site, glob in model.task_sites(k)}


class EvidenceTau(Callback):
    """A learned tau of a point guide: re-estimated by the Laplace evidence at every validation after step 0
    (:class:`~bora.fit.tau.EmpiricalBayesTau`), with each task's Fisher accumulated from the training steps
    and corrected by probe documents (``tau_curvature='steps'``) or from a separate pass (``'pass'``).

    ``apply=False`` (the inner fits of :mod:`bora.fit.refine`): tau stays where it is; every validation, step 0
    included, records the update the evidence gives at that point (``entry['tau']``, beside ``tau_trained``)."""

    name = "tau"
    phase = "tau"

    def __init__(self, tau: EmpiricalBayesTau, loop, apply: bool = True):
        cfg: FitConfig = loop.cfg
        self.tau = tau
        self.cfg = cfg
        self.apply = apply
        # the Fisher subsample has its own stream: learned- and fixed-tau fits see the same minibatches
        self.generator = torch.Generator().manual_seed(stream_seed(cfg.seed, "fisher"))
        # a task-sharded fit: each rank accumulates (and keeps rows for) its own tasks only
        rows = loop.shards.rows if loop.shards is not None else None
        self.curv = StepFisher.for_model(loop.model, loop.train.split.task_sizes(), rows=rows) \
            if cfg.tau_curvature == "steps" else None
        self._new_probes(loop)

    def gather_state_(self) -> None:
        """A task-sharded fit: every task's step Fisher rows, for :meth:`state_dict` (a collective)."""
        if self.curv is not None:
            self.curv.gather_state_()

    def release_state_(self) -> None:
        if self.curv is not None:
            self.curv.release_state_()

    def _new_probes(self, loop) -> None:
        """Fresh probe documents for the next update's curvature (bora.fit.curvature; none when off)."""
        if self.curv is not None and self.cfg.tau_probe_docs:
            rows = probe_documents(loop.train.split, self.cfg.tau_probe_docs, self.generator)
            self.curv.set_probe_(rows, len(loop.train))

    def step_context(self, loop, batch):
        if self.curv is None:
            return None
        # a document's log-likelihood enters the loss with weight N w / (b n_tokens)
        w = float(batch.get("loglik_scale", 1.0)) * len(loop.train) / (len(batch["index"]) * loop.n_tokens)
        self.curv.begin_step(w, batch["task_ids"], self.cfg.num_particles, index=batch["index"],
                             groups=batch.get("choice_row"))
        return loop.model.adapters.record_task_grads(self.curv.sink)

    def _task_fisher(self, loop, point) -> tuple[dict, Optional[float]]:
        """Each task's Fisher at ``point``, and the probes' mean ratio (None without probes)."""
        model, params = loop.model, loop.model.params_from_values(point)
        factors = model.task_factors()  # the update reads only the task-level factors' Fisher
        if self.curv is None:
            return task_fisher(model, params, loop.train, max_per_task=self.cfg.fisher_docs,
                               generator=self.generator, factors=factors), None
        rows, ratio = self.curv.probe_rows(), None
        if len(rows):  # the probe documents' gradients at this point against the steps'
            tf, per_module = self.curv.probe_corrected(task_fisher(model, params, loop.train, rows=rows,
                                                                   factors=factors))
            ratio = statistics.fmean(per_module.values())
        else:
            tf = self.curv.task_fisher()
        self.curv.reset_()
        self._new_probes(loop)
        return tf, ratio

    def on_validate(self, loop, entry, point):
        entry["tau_trained"] = self.tau.as_dict()  # the tau this point was fitted under
        kept = None if self.apply else (self.tau.as_dict(), self.tau.hyper_dict())
        if entry["step"] > 0 or not self.apply:
            tf, ratio = self._task_fisher(loop, point)
            if ratio is not None:
                entry["fisher_probe_ratio"] = ratio
            # recording only: nothing is rescaled (offset or centred sites do not move when tau changes)
            guide, optimizer = (loop.guide, loop.optimizer) if self.apply else (None, None)
            entry["log_evidence"] = self.tau.update_(point, tf, guide=guide, optimizer=optimizer)
        entry["tau"] = self.tau.as_dict()
        if self.tau.per_task:
            entry["tau_hyper"] = self.tau.hyper_dict()  # the learned Gamma(a, b) of the per-task taus
        if kept is not None:
            self.tau.load_(*kept)

    def state_dict(self):
        return {"tau": self.tau.as_dict(), "tau_hyper": self.tau.hyper_dict(), "generator": self.generator.get_state(),
                "curvature": None if self.curv is None else self.curv.state_dict()}

    def load_state_dict(self, state):
        self.tau.load_(state["tau"], state.get("tau_hyper"))
        if self.curv is not None and state["curvature"] is not None:
            self.curv.load_state_dict(state["curvature"])
        self.generator.set_state(state["generator"].to(torch.uint8))


class VariationalTau(Callback):
    """A learned tau of a mean-field guide (centred task sites): the variational M-step after every step."""

    name = "tau"

    def __init__(self, tau: EmpiricalBayesTau):
        self.tau = tau

    def on_optimizer_step(self, loop):
        self.tau.update_variational_(loop.guide)

    def on_validate(self, loop, entry, point):
        entry["tau_trained"] = entry["tau"] = self.tau.as_dict()

    def state_dict(self):
        return {"tau": self.tau.as_dict()}

    def load_state_dict(self, state):
        self.tau.load_(state["tau"])


class ProgressBar(Callback):
    """A tqdm bar over the steps, showing the minibatch NLL, tokens/s, the last validation and tau."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.bar = None

    def on_train_begin(self, loop):
        self.bar = tqdm(total=loop.total, initial=loop.state.step, desc=f"fit ({type(loop.guide).__name__})",
                        disable=not self.enabled, dynamic_ncols=True)

    def on_step_end(self, loop, loss):
        self.bar.update(1)
        post = {"nll": f"{loop.model.last_nll:.3f}", "tok/s": f"{loop.timer.tokens_per_second():.0f}"}
        hist = loop.state.history
        if hist and "val_ppl" in hist[-1]:
            post["val_ppl"] = f"{hist[-1]['val_ppl']:.3f}"
        if loop.tau is not None:
            post["tau"] = ",".join(format_tau(v) for v in loop.tau.as_dict().values())
        self.bar.set_postfix(post, refresh=False)

    def close(self, loop):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class CheckpointFunction(Callback):
    """``fn(step, validated, capture)`` after step 0's validation and after every step; ``capture()`` returns
    :meth:`bora.fit.loop.FitLoop.state_dict` (live tensors: serialise at once). In a task-sharded fit every task's
    rows are gathered onto every rank before each call (:meth:`bora.fit.loop.FitLoop.gather_tasks_`), and so is
    the per-rank task state for the call's duration (:meth:`bora.fit.loop.FitLoop.full_state`: a collective and a
    transient ``[T, ...]`` copy of it at every step; :class:`bora.io.checkpoint.Checkpointer` does it only when it
    writes)."""

    phase = "checkpoint"

    def __init__(self, fn: Callable[[int, bool, Callable[[], dict]], None]):
        self.fn = fn

    def on_save(self, loop, validated):
        loop.gather_tasks_()  # a task-sharded fit: capture() must see every task (a collective at every step)
        with loop.full_state():
            self.fn(loop.state.step, validated, loop.state_dict)


@contextlib.contextmanager
def combined_context(contexts):
    """One context manager entering every non-None context of ``contexts``."""
    with contextlib.ExitStack() as stack:
        for c in contexts:
            if c is not None:
                stack.enter_context(c)
        yield
