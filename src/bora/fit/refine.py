"""Alternate inner fits at fixed tau with the evidence update, after a learned-tau point fit (``fit.tau_rounds``).

>>> from bora.fit.refine import refine_tau        # doctest: +SKIP
>>> result = refine_tau(model, guide, train, val, cfg, tau, result)   # doctest: +SKIP
>>> result.tau_rounds[-1]["residual"], result.tau_converged      # doctest: +SKIP

During a fit, a learned tau is re-estimated at every validation (a generalised EM: a few optimiser steps, then an
update), so each update is made at a point that was never fitted at the tau it had, and the fit stops early (on
validation) before the two settle. The fixed-point residual ``|update - tau| / tau`` at the returned adapters
(:func:`bora.fit.loop.tau_residual`) measures how far from a type-II fixed point that leaves tau.

:func:`refine_tau` alternates the two steps from the returned adapters. Round ``k``:

1. tau is set to the update at the previous round's best point (the fit's, for the first round);
2. an inner fit at that fixed tau runs on from those adapters for ``tau_round_epochs`` passes, with the fit's
   optimiser settings (a fresh AdamW and schedule), validating every ``eval_every`` steps and stopping early as the
   fit does; it keeps its best validated point, the start included, so a round never worsens the validation NLL;
3. at every validation the evidence update is recorded but not applied (:class:`~bora.fit.callbacks.EvidenceTau`
   with ``apply=False``), with each task's Fisher from a pass over ``fisher_docs`` documents per task at that point
   (``tau_curvature='pass'``: the steps' accumulated Fisher is of the points the steps saw, not of this one);
4. the residual at the round's best point decides: at most ``tau_tolerance``, the rounds stop (converged).

When the rounds run out first, the adapters and the tau they were fitted under are those of the last round, and
``tau_converged`` is False: the stored residual says how far off it ended. Where an inner fit keeps its start
(nothing improves on validation), the round is MacKay's fixed-point iteration at fixed adapters.

Rounds are not checkpointed: a fit resumed after a crash in them re-runs them from the fit's returned adapters.
"""

from __future__ import annotations

import math
import time
from typing import Optional

from ..core.config import FitConfig
from .loop import FitLoop, FitResult, history_entry
from .tau import EmpiricalBayesTau

__all__ = ["refine_tau", "round_config"]


def round_config(cfg: FitConfig, k: int) -> FitConfig:
    """The inner fit's settings in round ``k`` (from 1): ``tau_round_epochs`` passes, Fisher from a pass, its own
    batch order."""
    return cfg.replace(epochs=cfg.tau_round_epochs, steps=None, tau_curvature="pass", tau_rounds=0,
                       seed=cfg.seed + 1000 * k)


def _worst(residual: Optional[dict]) -> float:
    return max(residual.values()) if residual else math.inf


def refine_tau(model, guide, train, val, cfg: FitConfig, tau: EmpiricalBayesTau, result: FitResult, *,
               progress: bool = True) -> FitResult:
    """Run up to ``cfg.tau_rounds`` rounds (module docstring) after a fit that returned ``result``, on the same
    ``model``, ``guide`` (at the fit's returned point) and ``tau``; returns ``result`` with ``tau``,
    ``tau_residual``, ``best_val_nll``, ``tau_rounds`` (a summary per round), ``tau_converged`` and
    ``seconds_tau_rounds`` set."""
    if val is None:
        raise ValueError("tau_rounds needs a validation split (each round early-stops on it)")
    t0 = time.perf_counter()
    rounds: list = []
    residual = result.tau_residual
    entry = history_entry(result.history, result.best_step)
    for k in range(1, cfg.tau_rounds + 1):
        if _worst(residual) <= cfg.tau_tolerance:
            break
        if entry is not None and "log_evidence" in entry:  # the update at the current point becomes tau
            tau.load_(entry["tau"], entry.get("tau_hyper"))
        trained = tau.as_dict()
        loop = FitLoop(model, guide, train, val, round_config(cfg, k), tau=tau, progress=progress, tau_apply=False)
        r = loop.run()
        entry = history_entry(r.history, r.best_step)
        residual = r.tau_residual
        rounds.append({"round": k, "tau": trained, "update": entry["tau"], "residual": residual,
                       "log_evidence": entry.get("log_evidence"), "best_step": r.best_step, "steps": r.steps,
                       "best_val_nll": r.best_val_nll, "seconds": r.seconds, "history": r.history})
        result.best_val_nll = r.best_val_nll  # the round started at the previous best point and kept it or better
    result.tau = tau.as_dict()
    result.tau_hyper = (tau.hyper_dict() or None)
    result.tau_residual = residual
    result.tau_rounds = rounds
    result.tau_converged = _worst(residual) <= cfg.tau_tolerance
    result.seconds_tau_rounds = time.perf_counter() - t0
    return result
