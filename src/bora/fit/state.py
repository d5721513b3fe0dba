"""The fit loop's own state and its phase timer: explicit values that a checkpoint saves once.

>>> from bora.fit.state import FitState
>>> s = FitState(step=3, history=[{"step": 3, "val_nll": 4.2}])
>>> t = FitState()
>>> t.load_state_dict(s.state_dict())
>>> t == s
True

:class:`FitState` is what the loop itself carries from step to step (the step, the rows drawn for the next
step, the validation history, the running training loss since the last validation, whether the fit stopped
early); :class:`PhaseTimer` is where the wall time went. Everything else a fit carries belongs to the
object that changes it (the guide, the optimiser, the batch stream, each callback: :mod:`bora.fit.callbacks`),
and :meth:`bora.fit.loop.FitLoop.state_dict` gathers them all in one place.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch

__all__ = ["FitState", "PhaseTimer", "PHASES"]

PHASES = ("steps", "validation", "tau", "checkpoint")


@dataclass
class FitState:
    """The loop's own state after ``step`` optimiser steps."""

    step: int = 0
    # rows drawn for the next step but not yet used (only between step 0's validation and step 1)
    pending: Optional[torch.Tensor] = None
    history: list = field(default_factory=list)
    stopped_early: bool = False
    # sums since the last validation: training loss, the minibatches' mean next-token NLL, their number
    run_loss: float = 0.0
    run_nll: float = 0.0
    run_n: int = 0

    def add_step_(self, loss: float, nll: float) -> None:
        self.run_loss += loss
        self.run_nll += nll
        self.run_n += 1

    def take_running_(self) -> tuple[float, float]:
        """Mean training loss and NLL since the last validation (nan before any step); resets the sums."""
        out = (self.run_loss / self.run_n, self.run_nll / self.run_n) if self.run_n else (math.nan, math.nan)
        self.run_loss, self.run_nll, self.run_n = 0.0, 0.0, 0
        return out

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)  # a deep copy

    def load_state_dict(self, state: dict) -> None:
        for f in dataclasses.fields(self):
            v = state[f.name]
            setattr(self, f.name, v if torch.is_tensor(v) or v is None else copy.deepcopy(v))


class PhaseTimer:
    """Wall time per phase (``PHASES``), each optimiser step's time and the tokens it saw.

    ``with timer.phase("validation"): ...`` adds the block's time to that phase; ``elapsed()`` counts from
    the start of the fit, across a resume."""

    def __init__(self):
        self.seconds = {p: 0.0 for p in PHASES if p != "steps"}
        self.step_times: list[float] = []
        self.tokens = 0
        self._start = time.perf_counter()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if name == "steps":
                self.step_times.append(time.perf_counter() - t0)
            else:
                self.seconds[name] += time.perf_counter() - t0

    def add_tokens_(self, n: int) -> None:
        self.tokens += int(n)

    def elapsed(self) -> float:
        return time.perf_counter() - self._start

    def tokens_per_second(self) -> float:
        busy = sum(self.step_times)
        return self.tokens / busy if busy > 0 else math.nan

    def summary(self) -> dict:
        """The :class:`~bora.fit.loop.FitResult` fields this timer owns."""
        out = {"seconds": self.elapsed(), "seconds_steps": float(sum(self.step_times)),
               **{f"seconds_{k}": v for k, v in self.seconds.items()}}
        if self.step_times:
            out["step_seconds"] = statistics.median(self.step_times)
            out["tokens_per_second"] = self.tokens_per_second()
        return out

    def state_dict(self) -> dict:
        return {"seconds": dict(self.seconds), "step_times": list(self.step_times), "tokens": self.tokens,
                "elapsed": self.elapsed()}

    def load_state_dict(self, state: dict) -> None:
        self.seconds = {k: float(v) for k, v in state["seconds"].items()}
        self.step_times = [float(t) for t in state["step_times"]]
        self.tokens = int(state["tokens"])
        self._start = time.perf_counter() - float(state["elapsed"])
