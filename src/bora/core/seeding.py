"""One seeding helper for every posterior draw: sample ``k`` of seed ``s`` is the same draw everywhere.

>>> from bora.core.seeding import sample_seed, task_code
>>> sample_seed(0, 3) == sample_seed(0, 3) != sample_seed(0, 4)
True
>>> 0 <= sample_seed(1, 2, task_code("a new task")) < 2 ** 63
True

:class:`bora.posterior.samples.Posterior` draws sample ``k`` with ``sample_seed(seed, k)``, so ``bora evaluate
--samples``, ``bora sample``, ``bora export --estimate sample --sample-index k`` and ``bora report``
see the same adapters for the same ``(seed, k)``. :func:`seeded` runs a block with torch's global RNG
seeded (Pyro samples from it) and restores the RNG afterwards.
"""

from __future__ import annotations

import contextlib
import random
import zlib
from typing import Optional

import numpy as np
import torch

__all__ = ["STREAMS", "stream_seed", "sample_seed", "seeded", "task_code", "rng_state", "set_rng_state_"]

# The random streams derived from one seed, by name. Each value is part of what a seed means: changing one
# changes every result drawn from that stream.
STREAMS = {
    "fisher": 0x5F15,    # a fit's tau update: Fisher subsample and probe documents (a generator: seed + value)
    "laplace": 0x1A9,    # the Laplace posterior's curvature documents and sampled labels (seed + value)
    "new_task": 0x7E3,   # fit_new_task's global RNG (adapter dropout): sample_seed(seed, value)
    "generate": 0x6E6,   # generate's token sampling: sample_seed(seed, value)
}


def stream_seed(seed: int, name: str) -> int:
    """The seed of the generator of stream ``name`` (a key of ``STREAMS``) in a run seeded with ``seed``."""
    return int(seed) + STREAMS[name]


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


def rng_state(generator: Optional[torch.Generator] = None) -> dict:
    """Every random-number state a fit uses: torch (CPU, and CUDA when initialised), Python, NumPy, and
    ``generator`` (the batch-order generator)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    st = {"torch": torch.get_rng_state(), "python": random.getstate(),
          "numpy": [str(name), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = list(torch.cuda.get_rng_state_all())
    if generator is not None:
        st["generator"] = generator.get_state()
    return st


def set_rng_state_(st: dict, generator: Optional[torch.Generator] = None) -> None:
    """Restore a :func:`rng_state` (in place: the global generators and ``generator``)."""
    torch.set_rng_state(st["torch"].to(torch.uint8))
    version, internal, gauss = st["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = st["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.to(torch.uint8) for s in st["cuda"]])
    if generator is not None and "generator" in st:
        generator.set_state(st["generator"].to(torch.uint8))
