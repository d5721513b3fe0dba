"""Task-sharded data parallelism (``FitConfig.parallel='tasks'``): which rank fits which task, the step's gradient
reduction, each rank's share of the per-task state, and bringing every rank's task rows together.

>>> import torch
>>> from bora.fit.sharding import TaskShards
>>> shards = TaskShards(torch.tensor([30, 12, 6]), rank=1, world_size=2)   # tasks' training documents
>>> shards.owner.tolist(), shards.mine.tolist()
([0, 1, 1], [False, True, True])
>>> shards.batch_rows(torch.arange(4), torch.tensor([0, 2, 0, 1]))      # this rank's rows, weight b_r / B
(tensor([1, 3]), 0.5)
>>> shards.rows.of(torch.tensor([2, 1])).tolist()                        # its tasks' rows of per-task state
[1, 0]

The design (:mod:`bora.core.distributed` says how it relates to the document-parallel mode):

* **Ownership**: :func:`bora.core.distributed.task_owners`, size-balanced by training documents (a batch's rows are
  uniform over documents, so each rank expects a share of the rows proportional to its tasks' documents; ``t mod N``
  would put two large tasks on one rank by chance).
* **Rows**: every rank draws the same global minibatch and keeps the rows of its own tasks at likelihood weight
  ``b_r / B`` (each document counts ``N / B``, as in one process); a rank without rows runs a placeholder row at
  weight 0, so that it still takes part in the collectives.
* **Gradients** (:meth:`TaskShards.reduce_grads_`): a task row's gradient is complete on its owner (its documents are
  all there, and with offset task sites ``theta_t = Theta + delta_t`` its prior ``-log p(delta_t)`` does not involve
  the global adapter), so the task rows are never communicated. The global parameters' gradients are summed over
  ranks (factor 1: ``sum_r`` of the ranks' likelihood gradients is the global batch's, and only rank 0's loss holds
  the global prior, :class:`bora.model.hierarchy.MaskGlobalSites`), which equals the single-process gradient. The
  gradient norm (NaN/inf check, clipping) is ``sqrt(|g_global|^2 + sum_r |g_rows of r's tasks|^2)``: one
  all-reduce of one flat buffer per step (the global gradients, the squared norm, a flag per global parameter that
  has a gradient on some rank).
* **State** (``task_updates='lazy'``): a rank keeps the optimiser state only for its own tasks: the lazy Adam
  moments ``m``, ``v``, the counts and every ``L_t`` (:class:`bora.fit.lazy.LazyRows`), and a learned tau's step
  Fisher accumulators (:class:`bora.fit.curvature.StepFisher`, in either update mode), as ``[T_r, ...]`` tensors
  with a task -> row map (:class:`TaskRows`: row ``i`` is owned task ``ids[i]``; in one process the identity, and
  the fit is bit-identical to what it was without it). The step only ever touches its own tasks' rows. The offsets
  ``delta`` themselves stay ``[T, ...]`` on every rank (validation evaluates the whole point): a rank updates only
  its own, and :meth:`TaskShards.gather_` replaces the others by their owners' values
  (:func:`bora.core.distributed.gather_rows_`, an all-reduce of the ``[T, ...]`` offsets) before each validation (so
  validation, the tau update's ``S = sum_t |delta_t|^2``, the best state and early stopping see the same full point
  on every rank, and are computed as in the document-parallel mode) and at the end of the fit. Where every task's
  state is needed it is built transiently and freed after: a checkpoint (:meth:`bora.fit.loop.FitLoop.full_state`:
  :meth:`TaskRows.full`, an all-reduce of the zero-padded rows, on every rank while rank 0 writes; the on-disk
  layout is the one-process layout, and each rank loads its own rows of it, so a fit resumes on any number of ranks
  or in one process), and a tau update's Fisher (:meth:`~bora.fit.curvature.StepFisher.task_fisher` sums the
  zero-padded ``[T, ...]`` rows over ranks, as the separate Fisher pass does; the evidence's volume terms need
  every task coordinate's Fisher, so no smaller statistic is reduced instead). Measured with
  :func:`task_state_bytes` on the tests' tiny fit (``tests/test_task_parallel.py``: 3 tasks, rank-2 adapters on
  two projections of two layers, 192 task values per task, learned tau): one process holds 2,304 B of offsets,
  4,728 B of lazy state and 2,424 B of step Fisher (9,456 B); with 2 ranks rank 0 (1 task) holds 2,304 + 1,576 +
  808 = 4,688 B and rank 1 (2 tasks) 2,304 + 3,152 + 1,616 = 7,072 B: per task value 4 B of offsets on every rank
  plus 12 B (8 of moments, 4 of Fisher) only on its owner, so ``4 + 12 / N`` B per value with ``N`` balanced
  ranks instead of 16. With ``task_updates='eager'`` every rank still holds every task's rows and their AdamW
  moments and updates only its own (the others go stale: AdamW keeps moving them on zero likelihood gradient,
  which nothing reads); :meth:`TaskShards.gather_` also gathers the moments, and the step Fisher is sharded as
  above. ``task_bank`` 'cpu' or 'disk' is refused in a multi-process fit (one-line ``ConfigError``). The gain
  besides memory is that a step's likelihood work on the task rows is split by task and, with lazy updates, a rank
  touches only its own tasks' rows.
* **Reported numbers**: the history's ``train_loss`` and ``train_nll`` are rank 0's, over its own rows only (as in
  the document-parallel mode, each rank's own); validation, tau and the saved fit are the whole fit's.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional, Sequence

import torch

from ..core.distributed import all_reduce_sum_, gather_rows_, shard_tasks, task_owners, world

__all__ = ["TaskShards", "TaskRows", "eager_task_tensors", "task_state_bytes", "tensor_bytes"]


class TaskRows:
    """The rows a rank keeps of per-task state: those of its own tasks ``ids`` (ascending; row ``i`` holds task
    ``ids[i]``), out of ``num_tasks``. ``mine`` (bool ``[T]``, :attr:`TaskShards.mine`); None: every task, the
    identity map of one process (every method then returns its argument, or a clone, unchanged)."""

    def __init__(self, num_tasks: int, mine: Optional[torch.Tensor] = None):
        self.num_tasks = int(num_tasks)
        self.identity = mine is None
        self.ids = torch.arange(self.num_tasks) if mine is None else mine.cpu().nonzero().reshape(-1)
        self.local = torch.full((self.num_tasks,), -1, dtype=torch.long)  # task -> its row here (-1: not kept)
        self.local[self.ids] = torch.arange(len(self.ids))
        self._on: dict = {}

    def __len__(self) -> int:
        return len(self.ids)

    def _map(self, name: str, device) -> torch.Tensor:
        key = (name, str(device))
        if key not in self._on:
            self._on[key] = getattr(self, name).to(device)
        return self._on[key]

    def of(self, tasks: torch.Tensor) -> torch.Tensor:
        """The rows of (owned) ``tasks`` here."""
        return tasks if self.identity else self._map("local", tasks.device).index_select(0, tasks)

    def tasks(self, rows: torch.Tensor) -> torch.Tensor:
        """The tasks of rows ``rows`` here."""
        return rows if self.identity else self._map("ids", rows.device).index_select(0, rows)

    def take(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a ``[T, ...]`` tensor (``full`` itself for the identity)."""
        return full if self.identity else full.index_select(0, self._map("ids", full.device))

    def expand(self, t: torch.Tensor) -> torch.Tensor:
        """A new ``[T, ...]`` tensor holding ``t``'s rows at their tasks and zeros elsewhere (a clone for the
        identity)."""
        if self.identity:
            return t.clone()
        out = t.new_zeros((self.num_tasks, *t.shape[1:]))
        return out.index_copy_(0, self._map("ids", t.device), t)

    def full(self, t: torch.Tensor) -> torch.Tensor:
        """Every task's rows of per-rank tensor ``t``, from their owners, as a new ``[T, ...]`` tensor on every rank
        (a collective: :meth:`expand` summed over ranks)."""
        out = self.expand(t)
        all_reduce_sum_(out)
        return out


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """``sum(numel * element_size)`` of ``tensors``."""
    return sum(t.numel() * t.element_size() for t in tensors)


def task_state_bytes(loop) -> dict[str, int]:
    """The persistent per-task state a rank of fit loop ``loop`` (:class:`bora.fit.loop.FitLoop`) holds, in bytes:
    ``'offsets'`` (the task rows ``delta``, ``[T, ...]`` on every rank), ``'optimizer'`` (their optimiser state:
    lazy updates' moments, counts and ``L_t``, or eager AdamW's moments), ``'fisher'`` (a learned tau's step
    Fisher accumulators, :class:`bora.fit.curvature.StepFisher`), and ``'rows'``: the rows of the optimiser state
    (the number of tasks it is kept for)."""
    out = {"offsets": 0, "optimizer": 0, "fisher": 0, "rows": 0}
    if loop.lazy is not None:
        rows = loop.lazy.rows
        out["offsets"] = tensor_bytes(rows.deltas.values())
        out["optimizer"] = tensor_bytes(rows.state_tensors())
        out["rows"] = len(rows.local)
    elif loop.model.has_tasks and loop.model.parameterisation == "offset":  # eager: every rank holds every task's
        from ..model.distributions import LATENT_SUFFIX
        from ..model.guides import guide_params

        found = guide_params(loop.guide)
        task = [found[site + LATENT_SUFFIX["offset"]]["loc"]
                for k in loop.model.shapes for _, site, _ in loop.model.task_sites(k)]
        out["offsets"] = tensor_bytes(task)
        out["optimizer"] = tensor_bytes(t for p in task for k, t in loop.optimizer.state.get(p, {}).items()
                                        if k != "step")
        out["rows"] = loop.model.num_tasks
    for cb in loop.callbacks:
        curv = getattr(cb, "curv", None)
        if curv is not None:
            out["fisher"] += tensor_bytes(curv.state_tensors())
    return out


class TaskShards:
    """This rank's share of the tasks (``owner [T]``: each task's rank; ``mine``: bool ``[T]``) in a task-sharded
    fit of ``world_size`` ranks (default: the process group's), assigned by ``task_sizes`` (training documents)."""

    def __init__(self, task_sizes, rank: Optional[int] = None, world_size: Optional[int] = None):
        if rank is None or world_size is None:
            rank, world_size = world()
        self.rank, self.world_size = int(rank), int(world_size)
        self.owner = task_owners(task_sizes, self.world_size)
        self.mine = self.owner == self.rank
        self.rows = TaskRows(len(self.owner), self.mine)  # what this rank keeps of per-task state
        self.tensors: Callable[[], Sequence[torch.Tensor]] = lambda: ()

    def batch_rows(self, rows: torch.Tensor, task_ids: torch.Tensor) -> tuple[torch.Tensor, float]:
        """This rank's rows of the global batch ``rows`` (``task_ids``: their tasks) and their likelihood weight."""
        return shard_tasks(rows, task_ids, self.owner, self.rank, self.world_size)

    def reduce_grads_(self, global_params: Sequence[torch.Tensor], row_grads: Sequence[torch.Tensor]) -> torch.Tensor:
        """Sum the global parameters' gradients over ranks (in place; a parameter without a gradient on this rank
        contributes zeros, and keeps none if no rank had one) and return the whole gradient's norm, ``row_grads``
        being the gradients of this rank's own task rows."""
        params = list(global_params)
        dev = params[0].device if params else (row_grads[0].device if row_grads else torch.device("cpu"))
        own = sum((g.detach().float().square().sum() for g in row_grads), torch.zeros((), device=dev))
        flat = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params]
        has = torch.tensor([float(p.grad is not None) for p in params], device=dev)
        buf = torch.cat([*flat, own.reshape(1).to(dev), has])
        all_reduce_sum_(buf)
        flags = buf[len(buf) - len(params):].tolist()
        start = 0
        for p, flag in zip(params, flags):
            n = p.numel()
            if flag > 0:
                g = buf[start:start + n].view_as(p).to(p.dtype)
                if p.grad is None:
                    p.grad = g.clone()
                else:
                    p.grad.copy_(g)
            start += n
        glob = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]) if params \
            else torch.zeros((), device=dev)
        return (glob.float().square() + buf[start]).sqrt()

    def gather_(self) -> None:
        """Every task's rows from its owner onto every rank (the tensors :attr:`tensors` lists, each ``[T, ...]``:
        the offsets, and with eager updates their AdamW moments)."""
        gather_rows_(self.mine, *self.tensors())


def eager_task_tensors(task_params: Sequence[torch.Tensor], optimizer: torch.optim.Optimizer
                       ) -> Callable[[], list[torch.Tensor]]:
    """The ``[T, ...]`` tensors of an eager fit's task rows: the offsets and their AdamW moments (once they exist)."""

    def tensors() -> list[torch.Tensor]:
        out = []
        for p in task_params:
            out.append(p.data)
            state = optimizer.state.get(p, {})
            out.extend(state[k] for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if k in state)
        return out

    return tensors
