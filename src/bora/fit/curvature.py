"""Per-task diagonal Fisher accumulated from the training steps' own per-document gradients.

>>> import torch
>>> from bora.fit.curvature import StepFisher
>>> acc = StepFisher(shapes={"m": ((2, 3), (4, 2))}, num_tasks=2, task_sizes=torch.tensor([10, 5]),
...                  factors=(1,), device="cpu")
>>> acc.begin_step(loss_weight=0.5, task_ids=torch.tensor([0, 0, 1]))
>>> acc.sink("m", 1, torch.ones(3, 4, 2), torch.tensor([0, 0, 1]))   # d loss / d B_t of each document
>>> tf = acc.task_fisher()   # (1 / 0.5)^2 = 4 per document, times N_t / n_t (10 / 2 and 5 / 1)
>>> tf.fisher["m"][1][:, 0, 0].tolist(), tf.used.tolist()
([40.0, 20.0], [2, 1])

A learned-tau MAP fit needs, at every tau update, each task's diagonal Fisher
``F_t = sum_d g_d**2`` (:mod:`bora.fit.fisher`). A separate pass over ``fisher_docs`` documents per task
costs about half a training epoch each time. The training steps already compute every
document's gradient with respect to its own task's adapter: the batched LoRA layer gathers
``B[task_ids]`` per example, and the gradient of that gathered tensor, before it is summed into
``B``'s rows, is exactly the per-document gradient. :meth:`bora.lora.inject.AdapterSet.record_task_grads`
hands those to :meth:`StepFisher.sink` (a square and an ``index_add_`` per adapted module per step).

The loss a step differentiates weighs a document's log-likelihood by ``loss_weight`` (the data
plate's ``N / b``, a data-parallel rank's share, the division by the training tokens and by the
number of ELBO particles), so ``g_d = grad / loss_weight``. Between two tau updates (one epoch by
default) every document is seen about once, at parameters that move during the epoch; ``F_t`` is
the sum over the documents seen, scaled by ``N_t / n_t`` like the subsampled pass. With ``memory``
(in steps) every step first multiplies the sums and the counts by ``exp(-1 / memory)``, so the
estimate is ``N_t`` times a recency-weighted mean of the task's per-document squared gradients,
dominated by the last ``memory`` steps' parameters. Data-parallel ranks sum their accumulators when
the Fisher is read.

A step sees a document's gradient *before* fitting it, while the Fisher a tau update wants is at the
current point, after every document's step: there a document's gradient is smaller (by most just after
its step, so weighting recent steps more makes it worse). Probe documents measure the shrinkage:
:meth:`StepFisher.set_probe_` marks a few documents per task (:func:`probe_documents`), their squared
step gradients are also summed per task, and at the update one short pass
(:func:`bora.fit.fisher.task_fisher` with ``rows=probe_rows()``) re-measures them at the current point;
:meth:`StepFisher.probe_ratio` is ``sum end / sum steps`` over them, by which the accumulated Fisher is
scaled (``FitConfig.tau_probe_docs``, 4 by default). On the embedded default this moves tau from +0.3,
+8.5, +3.6, -4.0 percent of the separate 32-document pass at the same adapters to +0.2, +1.4, -0.3,
-1.3 percent (``benchmarks/curvature_check.py``).
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Optional, Sequence

import torch

from ..core.config import ConfigError
from ..data.batching import distinct_task_batches
from ..core.distributed import all_reduce_sum_
from .fisher import TaskFisher
from .sharding import TaskRows

__all__ = ["StepFisher", "probe_documents"]


class StepFisher:
    """Accumulates ``sum_d g_d**2`` per task coordinate from training steps (see the module docstring).

    ``rows`` (:class:`bora.fit.sharding.TaskRows`; default: every task): the tasks this accumulator keeps, a
    task-sharded rank's own (its steps see only their documents); its per-task tensors are ``[len(rows), ...]``
    and :meth:`task_fisher` brings every task's together, summed over ranks."""

    def __init__(self, shapes: Mapping[str, tuple[tuple[int, int], tuple[int, int]]], num_tasks: int,
                 task_sizes: torch.Tensor, factors: Sequence[int] = (0, 1), device="cpu",
                 memory: Optional[float] = None, rows: Optional[TaskRows] = None):
        if memory is not None and not memory > 0:
            raise ValueError(f"memory must be a positive number of steps, got {memory!r}")
        self.decay = 1.0 if memory is None else math.exp(-1.0 / memory)
        self.num_tasks = int(num_tasks)
        self.task_sizes = torch.as_tensor(task_sizes).long().cpu()
        self.factors = tuple(factors)
        self.rows = rows if rows is not None else TaskRows(self.num_tasks)
        n = len(self.rows)  # the rows of the per-task accumulators: this object's tasks
        # a factor that is not task-level (the shared A of hierarchy 'B') gets no gradients: an expanded zero
        # (no memory) keeps the (F_A, F_B) layout of a TaskFisher without a [T, r, in] accumulator
        self.fisher = {k: tuple(torch.zeros(n, *s, device=device) if i in self.factors
                                else torch.zeros((), device=device).expand(self.num_tasks, *s)
                                for i, s in enumerate(sh)) for k, sh in shapes.items()}
        self.used = torch.zeros(n, dtype=torch.long)
        self.weight = torch.zeros(n, dtype=torch.float64)  # recency-weighted document count
        self._inv_weight = 0.0
        self._particles = 1
        # probe documents (set_probe_): their squared step gradients summed per task, by adapter and factor
        self.probe: Optional[torch.Tensor] = None  # bool [documents]
        self.probe_seen: Optional[torch.Tensor] = None
        self.probe_sums = {k: {i: torch.zeros(n, device=device) for i in self.factors} for k in shapes}
        self.probe_visits = torch.zeros(n, dtype=torch.float64)  # a probe seen twice counts twice
        self._probe_pos: Optional[torch.Tensor] = None
        self._groups: Optional[tuple] = None  # (document of each sequence, task of each document)
        self._full: Optional[dict] = None  # every task's state, between gather_state_ and release_state_

    @classmethod
    def for_model(cls, model, task_sizes: torch.Tensor, memory: Optional[float] = None,
                  rows: Optional[TaskRows] = None) -> "StepFisher":
        return cls(model.shapes, model.num_tasks, task_sizes, model.task_factors(), model.device, memory=memory,
                   rows=rows)

    def _own(self, counts: torch.Tensor) -> torch.Tensor:
        """This accumulator's rows of a ``[T]`` per-task count."""
        return self.rows.take(counts)

    def set_probe_(self, rows: torch.Tensor, num_docs: int) -> None:
        """Mark training documents ``rows`` (indices among ``num_docs``) as probes: until the next call,
        their step gradients are also summed per task (:meth:`probe_ratio`)."""
        self.probe = torch.zeros(int(num_docs), dtype=torch.bool)
        self.probe[torch.as_tensor(rows, dtype=torch.long).cpu()] = True
        self.probe_seen = torch.zeros_like(self.probe)
        self.probe_visits.zero_()
        for sums in self.probe_sums.values():
            for v in sums.values():
                v.zero_()

    def probe_rows(self) -> torch.Tensor:
        """The probe documents seen by a step since :meth:`set_probe_` (indices; on any data-parallel rank)."""
        if self.probe_seen is None:
            return torch.zeros(0, dtype=torch.long)
        seen = self.probe_seen.long()
        all_reduce_sum_(seen)
        return seen.nonzero().reshape(-1)

    def begin_step(self, loss_weight: float, task_ids: torch.Tensor, particles: int = 1,
                   index: Optional[torch.Tensor] = None, groups: Optional[torch.Tensor] = None) -> None:
        """The next backward pass weighs each document's log-likelihood by ``loss_weight`` in every one
        of ``particles`` ELBO particles (0: a placeholder row that counts for nothing); ``index``: the
        batch's document indices (needed for probes). ``groups``: the document of each sequence the layers see
        when a document is several sequences (a classification row's choices, ``choice_row``): a document's
        gradient is then the sum of its sequences' gradients, summed before squaring."""
        self._groups = None if groups is None else (groups.to(task_ids.device), task_ids)
        self._inv_weight = 0.0 if loss_weight == 0 else 1.0 / (loss_weight * particles)
        self._particles = particles
        self._probe_pos = None
        if self.probe is not None and index is not None and loss_weight != 0:
            index = index.cpu()
            pos = self.probe[index].nonzero().reshape(-1)
            if len(pos):
                self.probe_seen[index[pos]] = True
                self.probe_visits += self._own(torch.bincount(task_ids.cpu()[pos], minlength=self.num_tasks))
                self._probe_pos = pos.to(task_ids.device)
        if self.decay != 1.0:  # older documents count less (their gradients were at older parameters)
            self.weight.mul_(self.decay)
            for pair in self.fisher.values():
                for i in self.factors:
                    pair[i].mul_(self.decay)
        if loss_weight != 0:
            n = self._own(torch.bincount(task_ids.cpu(), minlength=self.num_tasks))
            self.used += n
            self.weight += n

    def sink(self, key: str, factor: int, grad: torch.Tensor, task_ids: torch.Tensor) -> None:
        """The per-document gradients ``grad [N, ...]`` of factor ``factor`` of adapter ``key``."""
        if factor not in self.factors or self._inv_weight == 0.0:
            return
        # (grad / weight)^2, and each of the particles' backward passes brings the same documents once
        w = self._inv_weight ** 2 / self._particles
        if self._groups is not None:  # sequences -> their documents' gradients
            groups, task_ids = self._groups
            grad = torch.zeros((len(task_ids), *grad.shape[1:]), device=grad.device, dtype=torch.float32) \
                .index_add_(0, groups.to(grad.device), grad.detach().float())
            task_ids = task_ids.to(grad.device)
        sq = grad.detach().float().square()  # contiguous, whatever the layout of grad
        rows = self.rows.of(task_ids)
        self.fisher[key][factor].index_add_(0, rows, sq, alpha=w)
        if self._probe_pos is not None:
            pos = self._probe_pos
            self.probe_sums[key][factor].index_add_(0, rows[pos], sq[pos].flatten(1).sum(1), alpha=w)

    def task_fisher(self) -> TaskFisher:
        """The accumulated Fisher as a :class:`~bora.fit.fisher.TaskFisher` (summed over data-parallel ranks)."""
        recorded = any(bool(pair[i].any()) for pair in self.fisher.values() for i in self.factors)
        if int(self.used.sum()) > 0 and not recorded:
            raise ConfigError("tau_curvature='steps' recorded no per-document gradients: the model's likelihood does "
                              "not run through bora's adapter layers; use tau_curvature='pass'")
        expand = self.rows.expand  # [T, ...] (zeros in other ranks' tasks, summed over ranks in from_sums)
        sums = {k: tuple(expand(pair[i]) for i in self.factors) for k, pair in self.fisher.items()}
        # N_t times the (recency-weighted) mean over the task's documents seen
        tf = TaskFisher.from_sums(sums, expand(self.used), self.task_sizes.clone(), expand(self.weight))
        tf.fisher = {k: tuple(sums[k][self.factors.index(i)] if i in self.factors else F for i, F in enumerate(pair))
                     for k, pair in self.fisher.items()}  # a factor that is not task-level: its expanded zero
        return tf

    def probe_ratio(self, end: TaskFisher, by: str = "module") -> dict:
        """How much smaller the probe documents' squared gradients are at the current point (``end``: their
        Fisher from :func:`bora.fit.fisher.task_fisher` with ``rows=probe_rows()``) than in the steps that saw
        them: ``sum end / sum steps`` over the probe documents, per adapted module and factor (``by='module'``,
        what a fit uses) or pooled over all of them (``by='global'``); every task's probes pooled. Returns
        ``{(key, factor): ratio}``."""
        if by not in ("global", "module"):
            raise ValueError(f"by must be 'global' or 'module', got {by!r}")
        steps = {(k, i): self.rows.expand(v) for k, sums in self.probe_sums.items() for i, v in sums.items()}
        visits = self.rows.expand(self.probe_visits)
        all_reduce_sum_(*steps.values(), visits)
        # end's sums were scaled by N_t / n_t (n_t: its probe documents); undo that, and count each probe as
        # often as the steps saw it (more than once when the updates are more than an epoch apart)
        c = torch.where(end.sizes > 0, visits / end.sizes.double().clamp_min(1), 0.0).float()
        ends = {(k, i): (end.fisher[k][i].flatten(1).sum(1) * c.to(end.fisher[k][i].device))
                for k, i in steps}
        if by == "global":
            num = sum(float(v.sum()) for v in ends.values())
            den = sum(float(v.sum()) for v in steps.values())
            r = num / den if den > 0 else 1.0
            return {key: r for key in steps}
        return {key: (float(ends[key].sum()) / float(steps[key].sum()) if float(steps[key].sum()) > 0 else 1.0)
                for key in steps}

    def probe_corrected(self, end: TaskFisher, by: str = "module") -> tuple[TaskFisher, dict]:
        """:meth:`task_fisher` scaled by :meth:`probe_ratio` (``end``: the probes' Fisher at the current point);
        returns it and the ratios."""
        tf = self.task_fisher()
        ratio = self.probe_ratio(end, by)
        for (key, i), r in ratio.items():
            tf.fisher[key][i].mul_(r)
        return tf, ratio

    def reset_(self) -> None:
        for pair in self.fisher.values():
            for i in self.factors:
                pair[i].zero_()
        self.used.zero_()
        self.weight.zero_()

    def state_tensors(self) -> list[torch.Tensor]:
        """The per-task accumulators, ``[len(rows), ...]`` each (the task-level factors' sums, the counts, the
        probes' sums)."""
        return [*(pair[i] for pair in self.fisher.values() for i in self.factors), self.used, self.weight,
                *(v for sums in self.probe_sums.values() for v in sums.values()), self.probe_visits]

    def _state(self, task: Callable[[torch.Tensor], torch.Tensor]) -> dict:
        """The state with ``task`` applied to each per-task tensor (``torch.clone``, or :meth:`TaskRows.full`)."""
        tensors = {f"{k}.{i}": task(pair[i]) for k, pair in self.fisher.items() for i in self.factors}
        probe = {}
        if self.probe is not None:
            seen = self.probe_seen.clone()
            if task is not torch.clone:  # the probes any rank saw (one rank writes the checkpoint)
                seen = seen.long()
                all_reduce_sum_(seen)
                seen = seen > 0
            probe = {"probe": self.probe.clone(), "probe_seen": seen, "probe_visits": task(self.probe_visits),
                     **{f"probe.{k}.{i}": task(v) for k, sums in self.probe_sums.items() for i, v in sums.items()}}
        return {"used": task(self.used), "weight": task(self.weight), **tensors, **probe}

    def gather_state_(self) -> None:
        """Every task's accumulators from its owner, ``[T, ...]``, kept for :meth:`state_dict` until
        :meth:`release_state_` (a collective in a task-sharded fit: every rank calls it)."""
        self._full = self._state(self.rows.full)

    def release_state_(self) -> None:
        self._full = None

    def state_dict(self) -> dict:
        """Every task's state (a task-sharded rank's only between :meth:`gather_state_` and :meth:`release_state_`):
        the same layout whatever the number of ranks."""
        if self._full is None and not self.rows.identity:
            raise RuntimeError("a task-sharded rank's step Fisher needs gather_state_() (a collective) first")
        return self._full if self._full is not None else self._state(torch.clone)

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load :meth:`state_dict`'s every-task state (this accumulator's tasks' rows of it)."""
        take = self.rows.take
        self.used.copy_(take(state["used"]))
        self.weight.copy_(take(state["weight"]))
        for k, pair in self.fisher.items():  # (a checkpoint may also hold a non-task factor's zeros: ignored)
            for i in self.factors:
                pair[i].copy_(take(state[f"{k}.{i}"]))
        if "probe" in state:
            self.probe = state["probe"].clone().bool()
            self.probe_seen = state["probe_seen"].clone().bool()
            self.probe_visits.copy_(take(state["probe_visits"]))
            for k, sums in self.probe_sums.items():
                for i, v in sums.items():
                    v.copy_(take(state[f"probe.{k}.{i}"]))


def probe_documents(split, per_task: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``per_task`` random documents of every task of ``split`` (all of a smaller task's), as indices."""
    rows = list(distinct_task_batches(split, per_task, generator=generator))
    return torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long)
