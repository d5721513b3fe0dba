"""One seeding helper for every posterior draw: sample ``k`` of seed ``s`` is the same draw everywhere.

>>> from bora.seeding import sample_seed, task_code
>>> sample_seed(0, 3) == sample_seed(0, 3) != sample_seed(0, 4)
True
>>> 0 <= sample_seed(1, 2, task_code("a new task")) < 2 ** 63
True

:class:`bora.posterior.Posterior` draws sample ``k`` with ``sample_seed(seed, k)``, so ``bora evaluate
--samples``, ``bora sample``, ``bora export --estimate sample --sample-index k`` and ``bora report``
see the same adapters for the same ``(seed, k)``. :func:`seeded` runs a block with torch's global RNG
seeded (Pyro samples from it) and restores the RNG afterwards.
"""

from __future__ import annotations

import contextlib
import zlib

import numpy as np
import torch

__all__ = ["sample_seed", "seeded", "task_code"]


def sample_seed(seed: int, *parts: int) -> int:
    """A well-mixed 63-bit seed for sample ``parts`` of a run seeded with ``seed``."""
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, *[int(p) & 0xFFFFFFFF for p in parts]])
               .generate_state(1, np.uint64)[0] >> np.uint64(1))


def task_code(name: str) -> int:
    """A stable integer for a task name (a seed part for a new task's prior-predictive draw)."""
    return zlib.crc32(name.encode("utf-8"))


@contextlib.contextmanager
def seeded(device: torch.device, seed: int):
    """Run with torch's global RNG seeded, restoring it afterwards (Pyro samples from it)."""
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
