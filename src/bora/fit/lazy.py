"""Lazy task updates for point fits: a step that touches only the tasks in its batch (``task_updates='lazy'``).

>>> import torch
>>> from bora.fit.lazy import LazyRows
>>> delta = torch.ones(3, 2, 1)                      # 3 tasks' offsets
>>> rows = LazyRows({"d": delta}, {"d": "tau"}, rule="sgd")
>>> for k in range(4):                               # 4 steps at lr 0.1, tau' 1; only task 0 has data
...     u = torch.tensor([0])
...     rows.flush_(u)                               # task 0's pending shrinkage, before its forward pass
...     rows.step_(u, {"d": torch.zeros(1, 2, 1)}, lr=0.1, rate={"tau": 1.0})
>>> rows.flush_()                                    # every task, before validation / tau / the fit's end
>>> round(float(delta[2, 0, 0]), 6) == round(1.1 ** -4, 6)    # 4 skipped proximal steps in one
True

With thousands of tasks, eager AdamW on the full objective costs every step O(T): the offsets' prior
gradient ``tau' delta_t`` is nonzero for every task, so every row of every ``delta`` gets a gradient, two moment
updates and a parameter update, and the gather's backward materialises a dense ``[T, ...]`` gradient. Lazy task
updates split the per-token objective of a point fit (offset task sites, ``theta_t = Theta + delta_t``)

    F = [-(N / b) sum_batch log p(doc | theta_task(doc)) - log p(Theta)] / n_tokens + sum_t tau'/2 ||delta_t||^2,

``tau' = tau / n_tokens``, into the likelihood-and-global part, optimised as follows, and each task's Gaussian
prior, applied exactly in closed form.

**The step** (:class:`LazyStep`). Step ``k`` with learning rate ``eta_k`` (the schedule's, the global AdamW's first
group) and batch tasks ``U``:

1. flush ``U`` (below): their offsets become their values after every step before ``k``;
2. the loss is computed on ``U``'s rows only (``theta_u = Theta + delta_u``, a ``[|U|, ...]`` leaf copy of the
   rows; the batch's task ids remapped to ``0..|U|-1``; per-document gradient sinks, e.g. the tau update's
   :class:`~bora.fit.curvature.StepFisher`, still see the original task ids). It has no prior term of the offsets
   (so the reported ``train_loss`` lacks ``-log p(delta)`` and the constant of a learned tau's hyperprior);
3. the gradient norm (NaN/inf check, clipping) is over the global parameters' gradients and ``U``'s rows' likelihood
   gradients; the global parameters (``Theta_A``, ``Theta_B``) take an ordinary AdamW step;
4. ``U``'s rows take a sparse Adam step on their likelihood gradient ``g`` (torch's ``SparseAdam`` semantics: only
   the rows with data update their moments and values), with each row's own step count ``c_t`` (its number of
   updates so far) for the bias correction, where ``SparseAdam`` uses the parameter's global step:
   ``m_t <- b1 m_t + (1 - b1) g``, ``v_t <- b2 v_t + (1 - b2) g^2``,
   ``delta_t <- delta_t - eta_k (m_t / (1 - b1^c_t)) / D_t`` with ``D_t = sqrt(v_t / (1 - b2^c_t)) + eps``
   (betas and eps of the global AdamW); no weight decay;
5. every task's offset then shrinks by step ``k``'s prior factor (lazily: only a running log-product advances).

**The prior.** Per step and element, ``delta <- delta * exp(-eta_k tau'_k / D)`` (rule ``'adam'``, fits): the
exact flow of the prior's Adam-preconditioned gradient ``tau' delta / D`` over the step, which equals the proximal
step ``delta / (1 + eta tau' / D)`` to second order. A task with data at every step is stationary where
``tau' delta = -m x / (e^x - 1)``, ``x = eta tau' / D``, ``m`` its likelihood-gradient average: the MAP balance
``tau' delta = -m`` up to a factor ``1 - x/2 + O(x^2)`` that vanishes with the learning rate (the proximal form would
balance exactly, but its per-element factors do not compose in closed form under a changing learning rate).
``D`` is the row's Adam denominator, frozen while
the task has no data (its moments do not change); a task never in a batch has no ``D`` and is not shrunk (its
offset stays at its initial value, 0 unless warm-started). With rule ``'sgd'`` (plain proximal SGD, for tests)
``D = 1`` and the factor is the proximal operator's ``1 / (1 + eta_k tau'_k)``. Either way the factors of the
steps a task misses compose in closed form: a running sum per tau group ``L = sum_k l_k`` (``l_k = eta_k tau'_k``,
or ``log(1 + eta_k tau'_k)``; ``tau'`` may change between steps) and each task's ``L`` when it was last brought
up to date, ``L_t``; flushing multiplies its rows by ``exp(-(L - L_t) / D_t)`` and sets ``L_t = L``: O(1) per
task, whatever the number of steps it missed. Without data between two flushes this is exactly the per-step
product (``tests/test_lazy.py`` checks it against the eager proximal update step by step).

**How it differs from eager AdamW on F.** (a) The prior's gradient never enters the moments: a row's ``m`` and
``v`` are those of its likelihood gradient only, and its prior acts through the shrinkage, in the metric of the
row's likelihood ``D``; eager AdamW normalises likelihood and prior gradient together (a prior-dominated
coordinate moves by about ``eta`` per step toward 0 there, by ``eta tau' |delta| / D`` here). (b) Absent tasks'
moments do not decay, and their bias correction counts their own updates. (c) Clipping sees only the batch's
rows. (d) The global adapter's gradient is the same as eager (with offsets, ``delta``'s prior does not depend on
``Theta``). Both reach the MAP point as the learning rate goes to 0; at a finite rate their stationary points
differ slightly (above), and their paths differ.

**When it is flushed.** Every task is brought up to date before each validation (so the point evaluated, the
best state kept, and the tau update's statistics ``S = sum_t ||delta_t||^2`` and its curvature are those of the
fit's actual values: nothing is maintained incrementally) and at the end of the fit (before the best state is
restored). Checkpoints save the unflushed offsets with the lazy state (``L``, every ``L_t``, the moments and
counts): flushing there would round differently from an uninterrupted run, and resuming is bit-identical.

**Several processes.** Lazy updates need ``parallel='tasks'`` there (:mod:`bora.fit.sharding`): each rank's batch
holds only its own tasks' rows (``U`` is a subset of its tasks), so it flushes and steps only those; the global
parameters' gradients are summed across ranks before the AdamW step, the gradient norm is the whole step's, and
``L`` advances identically on every rank. A rank without rows of the batch steps no rows (it still takes part
in the gradient sum). A rank keeps the lazy state (moments, counts, ``L_t``) of its own tasks only
(``[T_r, ...]``, :class:`bora.fit.sharding.TaskRows`) and flushes only them; every task's offsets are gathered from
their owners before each validation and the end of the fit, and the full lazy state transiently for a checkpoint
(:meth:`LazyRows.gather_state_`), which has the one-process layout.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, ContextManager, Mapping, Optional

import pyro
import torch

from ..core.config import ConfigError, FitConfig
from ..core.distributed import world
from ..model.distributions import IsotropicNormal, LATENT_SUFFIX
from ..model.guides import guide_params
from .bank import TaskBank
from .sharding import TaskRows, TaskShards
from .step import NumericalError, make_optimizer, make_scheduler

__all__ = ["LazyRows", "LazyStep", "build_lazy_step", "RULES"]

RULES = ("adam", "sgd")


class LazyRows:
    """The task rows of offset tensors ``deltas`` (``{site: [T, ...]}``, updated in place) and their lazy state.

    ``groups`` maps each site to its tau group (sites of one group share the running sum ``L``). ``rule``:
    'adam' (sparse Adam, prior in its metric) or 'sgd' (proximal SGD). See the module docstring. ``bank``
    (:class:`bora.fit.bank.TaskBank`, default: the deltas' own device) is where the rows and their state live: the
    offsets are copied into it (:attr:`deltas` are the bank's tensors: point the guide's parameters at them), and
    every operation fetches the rows it needs to the bank's device and writes them back. ``local``
    (:class:`bora.fit.sharding.TaskRows`; default: every task) is the tasks whose state this object keeps (a
    task-sharded rank's own): the moments, counts and ``L_t`` are ``[len(local), ...]``, the offsets ``[T, ...]``,
    and only those tasks are ever flushed or stepped."""

    def __init__(self, deltas: Mapping[str, torch.Tensor], groups: Mapping[str, str], *, rule: str = "adam",
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, bank: Optional[TaskBank] = None,
                 local: Optional[TaskRows] = None):
        if rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
        first = next(iter(deltas.values()))
        self.bank = bank if bank is not None else TaskBank("device", first.device)
        self.device = self.bank.device  # where the arithmetic runs
        self.deltas = {s: self.bank.store(f"delta.{s}", d) for s, d in deltas.items()}
        self.groups, self.rule = dict(groups), rule
        self.betas, self.eps = (float(betas[0]), float(betas[1])), float(eps)
        bank = self.bank
        self.local = local if local is not None else TaskRows(first.shape[0])
        n = len(self.local)  # the rows of the state: this object's tasks
        self.L = {g: 0.0 for g in set(self.groups.values())}  # running sums (Python floats: float64)
        self.last = {s: bank.zeros(f"last.{s}", (n,), torch.float64) for s in self.deltas}
        self.count = bank.zeros("count", (n,), torch.long)  # each task's sparse-Adam updates
        adam = rule == "adam"
        self.m = {s: bank.zeros(f"m.{s}", (n, *d.shape[1:]), d.dtype) for s, d in self.deltas.items()} if adam else {}
        self.v = {s: bank.zeros(f"v.{s}", (n, *d.shape[1:]), d.dtype) for s, d in self.deltas.items()} if adam else {}
        self._full: Optional[dict] = None  # every task's state, between gather_state_ and release_state_

    def rows(self, site: str, u: torch.Tensor) -> torch.Tensor:
        """The offsets of tasks ``u`` at ``site`` on the fit's device (a copy)."""
        return self.bank.fetch(self.deltas[site], u)

    def _inv_denominator(self, site: str, r: torch.Tensor) -> torch.Tensor:
        """``1 / D`` of state rows ``r`` (0 for a row never updated); 1 for rule 'sgd'."""
        if self.rule == "sgd":
            return torch.ones((), dtype=torch.float64, device=r.device)
        c = self.bank.fetch(self.count, r)
        v = self.bank.fetch(self.v[site], r).double()
        bc2 = (1.0 - torch.tensor(self.betas[1], dtype=torch.float64, device=r.device) ** c)
        bc2 = bc2.reshape(-1, *([1] * (v.dim() - 1)))
        seen = (c > 0).reshape(bc2.shape)
        d = (v / torch.where(seen, bc2, torch.ones_like(bc2))).sqrt() + self.eps
        return torch.where(seen, 1.0 / d, torch.zeros_like(d))

    def _shrink_(self, site: str, rows: torch.Tensor, r: torch.Tensor, dL: torch.Tensor) -> None:
        """Multiply the offsets of tasks ``rows`` (on the fit's device; ``r``: their state rows) of ``site`` by
        ``exp(-dL / D)``; mark them up to date."""
        delta = self.deltas[site]
        x = dL.reshape(-1, *([1] * (delta.dim() - 1))) * self._inv_denominator(site, r)
        factor = torch.exp(-x).to(delta.dtype)
        self.bank.put_(delta, rows, self.bank.fetch(delta, rows) * factor)
        self.last[site].index_fill_(0, r.to(self.last[site].device), self.L[self.groups[site]])

    @torch.no_grad()
    def flush_(self, u: Optional[torch.Tensor] = None) -> None:
        """Apply the pending prior shrinkage of tasks ``u`` (default: every task of :attr:`local`, in blocks of rows
        of the bank's ``chunk_bytes``, only those with pending shrinkage)."""
        local = self.local
        r = None if u is None else local.of(u)
        for site, delta in self.deltas.items():
            L = self.L[self.groups[site]]
            if u is not None:
                self._shrink_(site, u, r, L - self.bank.fetch(self.last[site], r))  # [U] float64
                continue
            for block in self.bank.chunks(delta[:len(local)]):
                rows = torch.arange(block.start, block.stop, device=self.device)  # state rows
                dL = L - self.bank.fetch(self.last[site], rows)
                keep = dL != 0
                if bool(keep.any()):
                    self._shrink_(site, local.tasks(rows[keep]), rows[keep], dL[keep])

    @torch.no_grad()
    def step_(self, u: torch.Tensor, grads: Mapping[str, torch.Tensor], lr: float, rate: Mapping[str, float]) -> None:
        """Update rows ``u`` (flushed: :meth:`flush_`) with their likelihood gradients ``grads`` (``{site:
        [|U|, ...]}``) at learning rate ``lr``, then advance every group's ``L`` by this step's prior factor at
        precision ``rate[group]`` (``tau'``)."""
        bank = self.bank
        r = self.local.of(u)
        c = bank.fetch(self.count, r) + 1
        bank.put_(self.count, r, c)
        if self.rule == "adam":
            b1, b2 = self.betas
            for site, delta in self.deltas.items():
                g = grads[site]
                shape = (-1, *([1] * (g.dim() - 1)))
                bc1 = (1.0 - b1 ** c.double()).reshape(shape).to(g.dtype)
                bc2 = (1.0 - b2 ** c.double()).reshape(shape).to(g.dtype)
                m = bank.fetch(self.m[site], r).mul_(b1).add_(g, alpha=1 - b1)
                v = bank.fetch(self.v[site], r).mul_(b2).addcmul_(g, g, value=1 - b2)
                bank.put_(self.m[site], r, m)
                bank.put_(self.v[site], r, v)
                upd = (m / bc1) / ((v / bc2).sqrt() + self.eps)
                bank.put_(delta, u, bank.fetch(delta, u) - lr * upd)
        else:
            for site, delta in self.deltas.items():
                bank.put_(delta, u, bank.fetch(delta, u) - lr * grads[site])
        for group in self.L:
            x = lr * float(rate[group])
            self.L[group] += x if self.rule == "adam" else math.log1p(x)

    def tensors(self) -> list[torch.Tensor]:
        """The ``[T, ...]`` offsets (what a task-sharded fit gathers from their owners; the state stays per rank)."""
        return list(self.deltas.values())

    def state_tensors(self) -> list[torch.Tensor]:
        """The per-task state, ``[len(local), ...]`` each: the moments, the counts and every ``L_t``."""
        return [*self.m.values(), *self.v.values(), self.count, *self.last.values()]

    def _state(self, clone: Callable[[torch.Tensor], torch.Tensor]) -> dict:
        return {"count": clone(self.count), "last": {s: clone(t) for s, t in self.last.items()},
                "m": {s: clone(t) for s, t in self.m.items()}, "v": {s: clone(t) for s, t in self.v.items()}}

    def gather_state_(self) -> None:
        """Every task's state from its owner, ``[T, ...]``, kept for :meth:`state_dict` until
        :meth:`release_state_` (a collective in a task-sharded fit: every rank calls it)."""
        self._full = self._state(self.local.full)

    def release_state_(self) -> None:
        self._full = None

    def state_dict(self) -> dict:
        """The state of every task (a task-sharded rank's only between :meth:`gather_state_` and
        :meth:`release_state_`): the same layout whatever the number of ranks."""
        if self._full is None and not self.local.identity:
            raise RuntimeError("a task-sharded rank's lazy state needs gather_state_() (a collective) first")
        return {"rule": self.rule, "L": dict(self.L),
                **(self._full if self._full is not None else self._state(torch.clone))}

    def load_state_dict(self, state: Mapping) -> None:
        """Load :meth:`state_dict`'s every-task state (this object's tasks' rows of it)."""
        if state["rule"] != self.rule:
            raise ConfigError(f"the lazy state is for rule {state['rule']!r}, this fit uses {self.rule!r}")
        self.L = {g: float(x) for g, x in state["L"].items()}
        take = self.local.take
        self.count.copy_(take(state["count"]))
        for name in ("last", "m", "v"):
            for s, t in getattr(self, name).items():
                t.copy_(take(state[name][s]))


class LazyStep:
    """``step(batch, k)``: one lazy step (module docstring); returns ``(loss, gradient norm)`` like
    :class:`bora.fit.step.TrainStep`. ``optimizer`` (AdamW of the global parameters), ``scheduler`` and ``rows``
    (:class:`LazyRows`) are attributes."""

    def __init__(self, model, guide, cfg: FitConfig, *, total: int, n_tokens: int,
                 tau_values: Optional[Mapping[str, torch.Tensor]] = None, pyro_checks: bool = False,
                 rule: str = "adam", shards: Optional[TaskShards] = None):
        if not model.has_tasks or not model.coupling.has_tau or model.parameterisation != "offset":
            raise ConfigError("task_updates='lazy' needs offset task sites coupled by a fixed or learned tau")
        if world()[1] > 1 and shards is None:
            raise ConfigError("task_updates='lazy' in a multi-process fit needs parallel='tasks'")
        self.model, self.cfg, self.n_tokens = model, cfg, float(n_tokens)
        self.tau_values = tau_values if tau_values is not None else {}
        self.pyro_checks = pyro_checks
        params = guide_params(guide)
        self.sites = [(k, i, site, glob) for k in model.shapes for i, site, glob in model.task_sites(k)]
        deltas = {site: params[site + LATENT_SUFFIX["offset"]]["loc"] for _, _, site, _ in self.sites}
        self.globals = {name: roles["loc"] for name, roles in params.items()
                        if name.partition(":")[0] in ("Theta_A", "Theta_B")}
        unknown = set(params) - set(self.globals) - {s + LATENT_SUFFIX["offset"] for s in deltas}
        if unknown:
            raise ConfigError(f"task_updates='lazy' cannot update the guide sites {sorted(unknown)}")
        groups = {k: name for name, keys in model.tau_groups().items() for k in keys}
        self.key_of = {site: k for k, _, site, _ in self.sites}
        self.optimizer = make_optimizer([{"params": list(self.globals.values()), "lr": cfg.lr}], cfg)
        self.scheduler = make_scheduler(self.optimizer, cfg, total)
        group = self.optimizer.param_groups[0]
        device = next(iter(deltas.values())).device
        if cfg.task_bank != "device" and (world()[1] > 1 or shards is not None):
            raise ConfigError(f"task_bank={cfg.task_bank!r} needs a single-process fit (a task-sharded fit gathers "
                              "every task's rows on the device)")
        bank = TaskBank(cfg.task_bank, device, cfg.task_bank_dir)
        self.rows = LazyRows({s: d.data for s, d in deltas.items()},
                             {s: groups.get(self.key_of[s], "tau") for s in deltas}, rule=rule,
                             betas=group["betas"], eps=group["eps"], bank=bank,
                             local=shards.rows if shards is not None else None)
        self.deltas = deltas
        for s, d in deltas.items():  # the guide's offsets are the bank's tensors (the device copy is freed)
            if self.banked:
                d.data = self.rows.deltas[s]
        self.released = False
        self.params = list(self.globals.values())
        self.shards = shards
        if shards is not None:  # what a task-sharded fit gathers from the tasks' owners (bora.fit.sharding)
            shards.tensors = self.rows.tensors

    @property
    def banked(self) -> bool:
        """Whether the task rows live off the fit's device (``task_bank`` 'cpu' or 'disk')."""
        return self.rows.bank.kind != "device"

    def release_(self) -> None:
        """The fit's end: the guide's offsets back on the fit's device (a copy out of the bank) and the bank's
        files removed. A no-op without a bank; idempotent."""
        if not self.banked or self.released:
            return
        for d in self.deltas.values():
            d.data = d.data.to(self.rows.device, copy=True)
        self.rows.bank.close_()
        self.released = True

    def flush_(self) -> None:
        """Bring every task up to date (before validation, tau updates, saving, the end of a fit)."""
        self.rows.flush_()

    def _rates(self) -> dict[str, float]:
        """``tau'`` per group: each tau over the training tokens (the per-token objective's prior precision)."""
        by_key = self.model.tau_by_key(self.tau_values)
        return {self.rows.groups[s]: by_key[self.key_of[s]] / self.n_tokens for s in self.rows.deltas}

    def loss(self, batch: Mapping[str, torch.Tensor], u: torch.Tensor, inv: torch.Tensor
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The per-token loss without the offsets' prior, on tasks ``u`` (``inv``: each row's position in ``u``);
        returns it and the leaf rows ``{site: [|U|, ...]}`` it differentiates."""
        model = self.model
        values: dict[str, torch.Tensor] = dict(self.globals)
        leaves = {}
        for _, _, site, glob in self.sites:
            leaves[site] = self.rows.rows(site, u).requires_grad_(True)
            values[site] = values[glob] + leaves[site]
        ll = model.loglik(dict(batch, task_ids=inv), model.params_from_values(values))
        model.last_nll = float(-ll.detach().sum() / batch["attention_mask"][:, 1:].sum().clamp_min(1))
        w = float(batch.get("loglik_scale", 1.0)) * model.num_docs / len(batch["index"])
        s = model.prior.global_scale
        log_prior = sum(IsotropicNormal.zero_mean(p.shape, s, like=p).log_prob(p).sum() for p in self.globals.values())
        if not batch.get("global_prior", True):  # a task-sharded rank other than 0: the prior counts once, on rank 0
            log_prior = 0.0
        return -(w * ll.sum() + log_prior) / self.n_tokens, leaves

    @contextlib.contextmanager
    def _original_ids(self, u: torch.Tensor):
        """Per-document gradient sinks see the batch's own task ids (the pass runs on remapped ones)."""
        layers = [layer for _, layer in self.model.adapters.items()]
        sinks = [layer.grad_sink for layer in layers]
        for layer, sink in zip(layers, sinks):
            if sink is not None:
                layer.grad_sink = _remapped(sink, u)
        try:
            yield
        finally:
            for layer, sink in zip(layers, sinks):
                layer.grad_sink = sink

    def __call__(self, batch, step: int, *, backward_context: Optional[ContextManager] = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        self.optimizer.zero_grad(set_to_none=True)
        lr = float(self.optimizer.param_groups[0]["lr"])
        u, inv = torch.unique(batch["task_ids"], sorted=True, return_inverse=True)
        placeholder = float(batch.get("loglik_scale", 1.0)) == 0  # a task-sharded rank without rows: not its task
        self.rows.flush_(u[:0] if placeholder else u)
        checks = pyro.validation_enabled(self.pyro_checks and step == 1)
        with checks, backward_context or contextlib.nullcontext(), self._original_ids(u):
            loss, leaves = self.loss(batch, u, inv)
            if not bool(torch.isfinite(loss.detach())):
                raise NumericalError(step, "loss", float(loss.detach()))
            loss.backward()
        for x in leaves.values():
            if x.grad is None:
                x.grad = torch.zeros_like(x)
        if self.shards is not None:  # the global gradients summed over ranks; the rows are this rank's own
            norm = self.shards.reduce_grads_(self.params, [x.grad for x in leaves.values()])
        targets = [p for p in self.params if p.grad is not None] + list(leaves.values())
        if self.shards is None:
            norm = torch.nn.utils.get_total_norm([p.grad for p in targets])
        if not bool(torch.isfinite(norm)):
            raise NumericalError(step, "gradient norm", float(norm))
        if self.cfg.clip_norm > 0 and self.cfg.clip_norm / (float(norm) + 1e-6) < 1.0:
            torch.nn.utils.clip_grads_with_norm_(targets, self.cfg.clip_norm, norm)
        self.optimizer.step()
        grads = {s: x.grad for s, x in leaves.items()}
        if placeholder:  # a placeholder row (a task-sharded rank without rows)
            u, grads = u[:0], {s: g[:0] for s, g in grads.items()}
        self.rows.step_(u, grads, lr, self._rates())
        self.scheduler.step()
        return loss.detach(), norm.detach()


def _remapped(sink: Callable, u: torch.Tensor) -> Callable:
    return lambda factor, grad, ids: sink(factor, grad, u.index_select(0, ids))


def build_lazy_step(model, guide, cfg: FitConfig, *, total: int, n_tokens: int,
                    tau_values: Optional[Mapping[str, torch.Tensor]] = None,
                    shards: Optional[TaskShards] = None) -> LazyStep:
    """The :class:`LazyStep` of a point fit of ``guide`` (``cfg.task_updates='lazy'``; ``shards``: a task-sharded
    fit's, :mod:`bora.fit.sharding`)."""
    return LazyStep(model, guide, cfg, total=total, n_tokens=n_tokens, tau_values=tau_values,
                    pyro_checks=pyro.distributions.is_validation_enabled(), shards=shards)

