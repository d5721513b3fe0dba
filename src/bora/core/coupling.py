"""The coupling between task adapters and the kind of guide, each in one place.

>>> from bora.core.config import FitConfig, PriorConfig
>>> from bora.core.coupling import coupling_of, guide_of
>>> c = coupling_of(PriorConfig(tau_mode="fixed", tau=100.0))
>>> c.has_global, c.has_tasks, c.has_tau, c.learned, c.tau_value(PriorConfig(tau_mode="fixed", tau=100.0))
(True, True, True, False, 100.0)
>>> s = coupling_of(PriorConfig(tau_mode="shared"))
>>> s.has_tasks, s.tau_value(PriorConfig(tau_mode="shared")), s.reference
(False, inf, 'none')
>>> guide_of(FitConfig(guide="meanfield")).point, guide_of(FitConfig(guide="laplace")).laplace
(False, True)

**Couplings** (``PriorConfig.tau_mode``): ``uncoupled`` (no global adapter, ``tau = 0``; with
``hierarchy='B'`` the tasks still share ``A``: the tau -> 0 limit, not one LoRA per task), ``fixed``
(a configured ``tau``), ``learned`` (``tau`` a latent site, estimated) and ``shared`` (one adapter
for every task, ``tau = inf``). The model, guides, posterior, diagnostics, plots, tau estimation,
warm starts and the API ask a :class:`Coupling` what they need (is there a global adapter? task
adapters? a finite precision? is it learned? what is tau when it is not estimated?) instead of
comparing strings, so a new coupling is added here.

**Guide kinds** (``FitConfig.guide``): ``map`` and ``laplace`` fit a point estimate (AutoDelta;
``laplace`` then adds a Laplace posterior around it), ``meanfield`` a distribution (AutoNormal).
The configuration keeps the names (strings in its JSON); these objects are derived from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence, Union

import numpy as np

__all__ = ["Coupling", "GuideKind", "COUPLINGS", "GUIDE_KINDS", "coupling_of", "guide_of"]


@dataclass(frozen=True)
class Coupling:
    """How task adapters are tied to the global adapter (one per ``tau_mode``)."""

    name: str
    has_global: bool  # a global adapter Theta exists
    has_tasks: bool  # every task has its own adapter
    learned: bool  # tau is a latent site, estimated from the data
    limit_tau: Optional[float] = None  # tau of an exact limit (0: uncoupled, inf: shared)
    description: Optional[str] = None  # a limit in words (plots)

    @property
    def has_tau(self) -> bool:
        """Whether a finite, positive precision ties the task adapters to the global one ('fixed', 'learned')."""
        return self.has_global and self.has_tasks

    @property
    def fixed(self) -> bool:
        """Whether tau is the configured value."""
        return self.has_tau and not self.learned

    @property
    def reference(self) -> str:
        """What task deviations are measured from: ``'global'``, ``'task_mean'`` (no global adapter) or ``'none'``."""
        return "task_mean" if not self.has_global else "none" if not self.has_tasks else "global"

    def tau_value(self, prior) -> Optional[float]:
        """tau when it is not estimated: a limit's ``0`` / ``inf``, ``prior.tau`` for 'fixed'; ``None`` if learned."""
        if self.limit_tau is not None:
            return self.limit_tau
        return None if self.learned else prior.tau

    def tau_per_module(self, keys: Sequence[str], tau_values: Mapping[str, float],
                       fixed_tau: Optional[float] = None) -> np.ndarray:
        """Prior precision of every module ``[M]`` from a tau estimate (``{"tau": v}`` or ``{"tau:<key>": v}``)."""
        if self.limit_tau is not None:
            return np.full(len(keys), self.limit_tau, dtype=np.float64)
        if self.fixed and fixed_tau is not None:
            return np.full(len(keys), float(fixed_tau))
        if "tau" in tau_values:
            return np.full(len(keys), float(tau_values["tau"]))
        return np.array([float(tau_values[f"tau:{k}"]) for k in keys])


COUPLINGS = {c.name: c for c in (
    Coupling("uncoupled", has_global=False, has_tasks=True, learned=False, limit_tau=0.0,
             description="uncoupled task adapters (tau = 0; A stays shared, so this is not per-task LoRA)"),
    Coupling("fixed", has_global=True, has_tasks=True, learned=False),
    Coupling("learned", has_global=True, has_tasks=True, learned=True),
    Coupling("shared", has_global=True, has_tasks=False, learned=False, limit_tau=math.inf,
             description="shared adapter (tau = inf: every task uses the global adapter)"),
)}


def coupling_of(prior_or_mode) -> Coupling:
    """The :class:`Coupling` of a :class:`~bora.core.config.PriorConfig` (or of a ``tau_mode`` name)."""
    mode = prior_or_mode if isinstance(prior_or_mode, str) else prior_or_mode.tau_mode
    try:
        return COUPLINGS[mode]
    except KeyError:
        raise ValueError(f"unknown tau_mode {mode!r}; choose one of {tuple(COUPLINGS)}") from None


@dataclass(frozen=True)
class GuideKind:
    """What a guide fits (one per ``FitConfig.guide``)."""

    name: str
    point: bool  # a point estimate (AutoDelta); else a distribution (AutoNormal)
    laplace: bool = False  # a Laplace posterior is fitted around the point estimate after the fit


GUIDE_KINDS = {g.name: g for g in (GuideKind("map", point=True), GuideKind("laplace", point=True, laplace=True),
                                   GuideKind("meanfield", point=False))}


def guide_of(fit_or_name: Union[str, object]) -> GuideKind:
    """The :class:`GuideKind` of a :class:`~bora.core.config.FitConfig` (or of a guide name)."""
    name = fit_or_name if isinstance(fit_or_name, str) else fit_or_name.guide
    try:
        return GUIDE_KINDS[name]
    except KeyError:
        raise ValueError(f"unknown guide {name!r}; choose 'map', 'laplace' or 'meanfield'") from None
