"""Data-parallel fits on ``torch.distributed`` (processes launched by ``torchrun``): sharding and sums, by
documents or by tasks.

>>> import torch
>>> from bora.core.distributed import shard_rows
>>> shard_rows(torch.arange(5), rank=1, world_size=2)   # rank 1's rows of a global batch of 5
(tensor([1, 3]), 0.8)
>>> shard_rows(torch.arange(1), rank=1, world_size=2)   # nothing left: one row, weighted 0
(tensor([0]), 0.0)

Launch ``torchrun --nproc-per-node N -m bora fit ...`` (or ``accelerate launch``, which sets the
same environment): :func:`init_from_env` joins the process group the launcher describes (gloo on
CPU, NCCL on CUDA, one GPU per local rank). Nothing here is bora's own communication code: the
gradient all-reduce is torch's ``DistributedDataParallel`` and the sums are ``all_reduce``.

How a fit is split (:func:`bora.fit.loop.fit`): every rank draws the same global minibatch (the batch
stream is seeded identically) and keeps the rows ``rank, rank + N, ...`` of it. The model's
likelihood on a shard of ``b_r`` of the batch's ``B`` rows is scaled by ``N b_r / B``, so that the
average over ranks of each rank's loss (what DDP's gradient averaging differentiates) is the prior
and guide terms once plus the full-batch likelihood: the all-reduced gradient equals the
single-process gradient of the global batch. Validation, the per-task Fisher of the tau update and
of the Laplace posterior shard their documents the same way and sum across ranks, so every rank
holds the same numbers and takes the same decisions (early stopping, tau). Only rank 0 writes
files and prints. Each rank keeps its own frozen-prefix cache. Adapter dropout draws its masks
per rank, so a fit with dropout is equivalent in distribution, not bit for bit.

**Two modes, one per fit** (``FitConfig.parallel``, ``--parallel``): they are alternatives, not layers of one
scheme. ``'documents'`` (the default, above) splits each batch's rows round-robin and DDP averages every gradient,
task rows included. ``'tasks'`` (:mod:`bora.fit.sharding`) gives each rank a size-balanced subset of the tasks
(:func:`task_owners`) and the batch's rows of those tasks (:func:`shard_tasks`, weight ``b_r / B``, so the ranks'
likelihoods *sum* to the global batch's); the ELBO is not wrapped in DDP: a task row's gradient is complete on its
owner and is never communicated, only the global parameters' gradients are summed (with the global prior on rank 0
alone, the sum is the single-process gradient), and the tasks' rows are brought to every rank
(:func:`gather_rows_`) before each validation, checkpoint and at the end, after which validation, the tau update's
curvature and the Laplace curvature run as in ``'documents'``. ``'tasks'`` needs a point guide, offset task sites
and a fixed or learned tau (one-line ``ConfigError`` otherwise); it supports ``task_updates='eager'`` and
``'lazy'`` (which needs it in a multi-process run). With ``'lazy'`` a rank keeps the optimiser state and the step
Fisher of its own tasks only (the offsets stay whole on every rank; :mod:`bora.fit.sharding` has the measured
bytes); with ``'eager'`` every rank holds every task's rows and moments. Its checkpoints hold the full state and
resume on any number of ranks. In a single process both
modes are the ordinary fit.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

__all__ = ["world", "is_main", "init_from_env", "shard_rows", "task_owners", "shard_tasks", "all_reduce_sum_",
           "gather_rows_", "data_parallel", "barrier", "close"]


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def world() -> tuple[int, int]:
    """``(rank, world size)`` of this process; ``(0, 1)`` outside a process group."""
    d = _dist()
    return (d.get_rank(), d.get_world_size()) if d is not None else (0, 1)


def is_main() -> bool:
    """Whether this process writes files and prints (rank 0, or no process group)."""
    return world()[0] == 0


def init_from_env(device: Optional[str] = None) -> bool:
    """Join the process group that ``torchrun`` describes in the environment (``WORLD_SIZE > 1``).

    Returns whether this process is part of a multi-process run. On CUDA each process uses the GPU
    of its ``LOCAL_RANK``; elsewhere the gloo backend. A no-op when already initialised."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    from .config import ConfigError

    if not dist.is_available():
        raise ConfigError("this torch build has no torch.distributed; run a single process")
    cuda = (device is None or str(device).startswith(("cuda", "auto"))) and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    elif device is not None and str(device).startswith("cuda"):
        raise ConfigError(f"device {device!r} requested but CUDA is not available")
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return dist.get_world_size() > 1


def shard_rows(rows: torch.Tensor, rank: Optional[int] = None, world_size: Optional[int] = None
               ) -> tuple[torch.Tensor, float]:
    """This rank's rows of a global batch and the weight of its likelihood: ``(rows[rank::N], N b_r / B)``.

    A rank left without rows gets the batch's first row at weight 0 (it still runs the model, so that
    every rank takes part in the gradient all-reduce)."""
    if rank is None or world_size is None:
        rank, world_size = world()
    if world_size == 1:
        return rows, 1.0
    local = rows[rank::world_size]
    if len(local) == 0:
        return rows[:1], 0.0
    return local, world_size * len(local) / len(rows)


def task_owners(sizes, world_size: int) -> torch.Tensor:
    """The rank that owns each task (``LongTensor [T]``): size-balanced, largest task first onto the least
    loaded rank (by training documents; ties to the lower task index and rank). Deterministic, so every rank
    computes the same assignment; independent of the ranks' state, so any number of ranks can resume a fit.

    >>> task_owners([30, 12, 6, 1], 2).tolist()
    [0, 1, 1, 1]
    """
    import heapq

    sizes = torch.as_tensor(sizes).long().cpu()
    owner = torch.zeros(len(sizes), dtype=torch.long)
    loads = [(0, r) for r in range(world_size)]
    for t in torch.argsort(-sizes, stable=True).tolist():
        load, r = heapq.heappop(loads)
        owner[t] = r
        heapq.heappush(loads, (load + int(sizes[t]), r))
    return owner


def shard_tasks(rows: torch.Tensor, task_ids: torch.Tensor, owner: torch.Tensor, rank: Optional[int] = None,
                world_size: Optional[int] = None) -> tuple[torch.Tensor, float]:
    """This rank's rows of a global batch in a task-sharded fit and the weight of their likelihood:
    ``(rows whose task this rank owns, b_r / B)`` (``task_ids``: each row's task, ``owner``: :func:`task_owners`).

    The weight makes every document count ``N / B`` as in a single process, so the ranks' likelihoods *sum* to the
    global batch's. A rank left without rows gets the batch's first row at weight 0 (it still takes part in the
    collectives).

    >>> shard_tasks(torch.arange(5), torch.tensor([0, 1, 1, 0, 1]), torch.tensor([0, 1]), rank=1, world_size=2)
    (tensor([1, 2, 4]), 0.6)
    """
    if rank is None or world_size is None:
        rank, world_size = world()
    if world_size == 1:
        return rows, 1.0
    local = rows[owner.to(task_ids.device)[task_ids] == rank]
    if len(local) == 0:
        return rows[:1], 0.0
    return local, len(local) / len(rows)


def gather_rows_(mine: torch.Tensor, *tensors: torch.Tensor) -> None:
    """Every rank's own task rows of each ``[T, ...]`` tensor, onto every rank, in place: a rank zeroes the rows
    it does not own (``mine``: bool ``[T]``) and the tensors are summed over ranks (exact: one term per row is
    nonzero). A no-op in a single process."""
    d = _dist()
    if d is None or d.get_world_size() == 1:
        return
    for t in tensors:
        t.masked_fill_(~mine.to(t.device).reshape(-1, *([1] * (t.dim() - 1))), 0)
    all_reduce_sum_(*tensors)


def all_reduce_sum_(*tensors: torch.Tensor) -> None:
    """Sum each tensor over all ranks, in place (a no-op in a single process)."""
    d = _dist()
    if d is None or d.get_world_size() == 1:
        return
    nccl = d.get_backend() == "nccl"
    for t in tensors:
        if nccl and t.device.type != "cuda":
            buf = t.to("cuda")
            d.all_reduce(buf)
            t.copy_(buf.to(t.device))
        else:
            d.all_reduce(t)


def barrier() -> None:
    """Wait until every rank gets here (a no-op in a single process)."""
    d = _dist()
    if d is not None:
        d.barrier()


def close(ok: bool = True) -> None:
    """Leave the process group: free what still holds it, wait for every rank (when this one finished
    normally, ``ok``), then destroy it.

    A ``DistributedDataParallel`` wrapper that outlives the process group (a finished fit loop waiting
    in a reference cycle for the garbage collector) is destroyed at interpreter exit, and with it gloo's
    threads: ``terminate called without an active exception`` (SIGABRT) in 4 of 15 two-rank runs on a
    2-core CPU, none of 20 when it is collected first (``tests/test_distributed.py``). A failed rank
    skips the barrier: its peers would wait forever."""
    import gc

    d = _dist()
    if d is None:
        return
    gc.collect()  # finished fit loops and their DDP wrappers go while the process group is alive
    if ok:
        d.barrier()
    d.destroy_process_group()


def data_parallel(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` wrapped in ``DistributedDataParallel`` in a multi-process run (averaged gradients),
    else ``module`` itself. Parameters are broadcast from rank 0 when wrapped."""
    d = _dist()
    if d is None or d.get_world_size() == 1:
        return module
    from torch.nn.parallel import DistributedDataParallel

    dev = next((p.device for p in module.parameters()), torch.device("cpu"))
    ids = [dev] if dev.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)
