"""Guides: the only thing that differs between a MAP fit and a mean-field variational fit.

>>> import torch
>>> from bora.guides import make_guide      # doctest: +SKIP
>>> guide = make_guide(model, "map")        # AutoDelta, starts exactly at the base model  # doctest: +SKIP
>>> guide = make_guide(model, "meanfield", init_scale=1e-3)   # AutoNormal                # doctest: +SKIP

Both guides use :meth:`bora.model.BoraModel.init_loc`: every task's ``A`` starts at one shared
random matrix and every ``B`` at zero, so every adapter product ``B A`` is zero and the first loss
equals the base model's. (Pyro's default ``init_to_median`` would draw adapters about ten times
the norm of the base weights; ``init_to_mean`` puts ``A = B = 0`` on a zero-gradient saddle.)
The mean-field guide's initial scale defaults to 1e-3 so that sampled adapters start near the
base model (AutoNormal's default 0.1 gives sampled products larger than the base weights).
"""

from __future__ import annotations

from typing import Optional

import torch
from pyro.infer.autoguide import AutoDelta, AutoNormal

__all__ = ["make_guide", "point_values"]


def make_guide(model, kind: str = "map", *, init_scale: float = 1e-3, target=None):
    """An autoguide for ``target`` (default ``model``; e.g. the tau-conditioned model for MAP)."""
    target = model if target is None else target
    if kind == "map":
        return AutoDelta(target, init_loc_fn=model.init_loc)
    if kind == "meanfield":
        return AutoNormal(target, init_loc_fn=model.init_loc, init_scale=init_scale)
    raise ValueError(f"unknown guide {kind!r}; choose 'map' or 'meanfield'")


@torch.no_grad()
def point_values(guide, batch: Optional[dict] = None) -> dict[str, torch.Tensor]:
    """Point estimate of every guide site: the MAP value, or the posterior median (AutoNormal: the mean of
    each real-valued site; for tau, exp of its log-normal location)."""
    args = () if batch is None else (batch,)
    return {k: v.detach() for k, v in guide.median(*args).items()}
