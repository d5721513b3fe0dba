"""A task bank: where a lazy fit's task rows live (``FitConfig.task_bank``), off the accelerator if asked.

>>> import torch
>>> from bora.fit.bank import TaskBank
>>> bank = TaskBank("disk", "cpu")                      # a memory-mapped file in a fresh temporary folder
>>> delta = bank.store("delta", torch.arange(6.0).reshape(3, 2))
>>> rows = bank.fetch(delta, torch.tensor([2, 0]))      # the batch's rows, on the fit's device
>>> bank.put_(delta, torch.tensor([2, 0]), rows * 10)   # written back after the step
>>> delta.tolist(), bank.file_bytes()
([[0.0, 10.0], [2.0, 3.0], [40.0, 50.0]], 24)
>>> bank.close_()

With lazy task updates (:mod:`bora.fit.lazy`) a step reads and writes only the rows of its batch's tasks, yet every
task's offsets ``delta_t`` and their lazy-Adam state (moments ``m``, ``v``, the per-task update count and last-seen
log-products) are dense ``[T, ...]`` tensors. The bank decides where those tensors are kept:

* ``'device'`` (the default): on the fit's device, as without a bank;
* ``'cpu'``: in CPU memory (pinned when the fit's device is CUDA, so that the copies can use DMA);
* ``'disk'``: in memory-mapped files (``torch.from_file(..., shared=True)``), one per tensor, in a fresh temporary
  folder inside ``FitConfig.task_bank_dir`` (default: the system's temporary folder), removed by :meth:`close_`
  (the fit's end). The files start sparse: zero state (moments, counts) takes no disk or memory until a task is
  first updated.

:meth:`TaskBank.fetch` pages the rows of a set of tasks in to the fit's device (``index_select`` where they live,
then one copy); :meth:`TaskBank.put_` writes them back (one copy, then ``index_copy_``); :meth:`TaskBank.chunks`
splits all ``T`` tasks into blocks of rows of at most ``chunk_bytes`` (16 MiB per tensor) for the operations that
touch every
task (the lazy rows' full flush), so those never hold more than one block on the device. The values are copied,
never converted: every arithmetic operation of the lazy step runs on the device on the same values in the same
order whatever the bank, so a fit with a bank is bit-identical to one without (``tests/test_task_bank.py``).

What the bank does not move: the global adapter and its AdamW state; validation, the tau update's statistics, the
best state and the Laplace posterior read the guide's point (whose task rows are the bank's tensors) and move it
to the fit's device whole (:meth:`bora.fit.loop.FitLoop.point`: a no-op on CPU, a transient ``[T, ...]`` copy on
an accelerator); checkpoints read the bank (a CPU copy of the state, written as safetensors). At the fit's end
the guide's task rows return to the fit's device (as without a bank) and the bank's files are removed.
CUDA (pinned memory) is untested on the CPU-only machine where this was written.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Iterator, Optional

import torch

from ..core.config import ConfigError

__all__ = ["TaskBank", "BANK_KINDS"]

BANK_KINDS = ("device", "cpu", "disk")
CHUNK_BYTES = 16 * 2**20


class TaskBank:
    """Storage for ``[T, ...]`` task tensors of kind ``'device'``, ``'cpu'`` or ``'disk'`` (module docstring);
    ``device``: the fit's device (where fetched rows go); ``directory``: where ``'disk'`` makes its temporary
    folder."""

    def __init__(self, kind: str, device, directory: Optional[str] = None, *, chunk_bytes: int = CHUNK_BYTES):
        if kind not in BANK_KINDS:
            raise ConfigError(f"task_bank must be one of {BANK_KINDS}, got {kind!r}")
        self.kind, self.device, self.chunk_bytes = kind, torch.device(device), int(chunk_bytes)
        self.folder: Optional[str] = None
        self.paths: list[str] = []
        if kind == "disk":
            if directory is not None and not os.path.isdir(directory):
                raise ConfigError(f"task_bank_dir {directory!r} is not a folder")
            self.folder = tempfile.mkdtemp(prefix="bora-task-bank-", dir=directory)

    @property
    def home(self) -> torch.device:
        """Where the bank's tensors live."""
        return self.device if self.kind == "device" else torch.device("cpu")

    def _empty(self, name: str, shape, dtype: torch.dtype) -> tuple[torch.Tensor, bool]:
        """A new bank tensor (uninitialised; zero for 'disk') and whether it is known to be zero."""
        shape = tuple(shape)
        if self.kind == "device":
            return torch.empty(shape, dtype=dtype, device=self.device), False
        if self.kind == "cpu":
            pin = self.device.type == "cuda" and torch.cuda.is_available()
            return torch.empty(shape, dtype=dtype, pin_memory=pin), False
        n = 1
        for s in shape:
            n *= int(s)
        safe = "".join(c if c.isalnum() else "_" for c in name)
        path = os.path.join(self.folder, f"{len(self.paths):03d}-{safe}.bin")
        self.paths.append(path)
        return torch.from_file(path, shared=True, size=n, dtype=dtype).view(shape), True  # a new sparse file: zeros

    def zeros(self, name: str, shape, dtype: torch.dtype) -> torch.Tensor:
        """A zero ``[T, ...]`` tensor in the bank (``name``: its file's name for 'disk')."""
        t, zero = self._empty(name, shape, dtype)
        if not zero:
            t.zero_()
        return t

    @torch.no_grad()
    def store(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """``value`` itself for 'device' (the tensor stays where it is), else a copy of it in the bank (copied in
        blocks of tasks; all-zero blocks are skipped on 'disk', whose files start as zeros)."""
        if self.kind == "device" and value.device == self.device:
            return value
        t, zero = self._empty(name, value.shape, value.dtype)
        for rows in self.chunks(value):
            block = value[rows.start:rows.stop]
            if zero and not bool(block.any()):
                continue
            t[rows.start:rows.stop].copy_(block)
        return t

    def fetch(self, t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Rows ``rows`` of bank tensor ``t``, on the fit's device (a new tensor)."""
        return t.index_select(0, rows.to(t.device)).to(self.device)

    def put_(self, t: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> None:
        """Write ``values`` (``[len(rows), ...]``, anywhere) into rows ``rows`` of bank tensor ``t``."""
        t.index_copy_(0, rows.to(t.device), values.to(t.device))

    def chunks(self, like: torch.Tensor) -> Iterator[range]:
        """Blocks of consecutive rows of ``like`` (``[T, ...]``), each at most ``chunk_bytes`` (at least 1 row)."""
        T = like.shape[0]
        row = max(1, like[:1].numel() * like.element_size())
        step = max(1, self.chunk_bytes // row)
        for start in range(0, T, step):
            yield range(start, min(T, start + step))

    def file_bytes(self) -> int:
        """The size of the bank's files ('disk'; 0 otherwise), as their length (sparse files use less disk)."""
        return sum(os.path.getsize(p) for p in self.paths if os.path.exists(p))

    def disk_bytes(self) -> int:
        """The disk space the bank's files take (their allocated blocks; 0 for 'device' and 'cpu')."""
        return sum(os.stat(p).st_blocks * 512 for p in self.paths if os.path.exists(p))

    def close_(self) -> None:
        """Remove the bank's files (tensors still mapped stay readable until freed). Idempotent."""
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None
