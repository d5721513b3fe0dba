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
from torch.distributions import transform_to

from .coupling import guide_of

__all__ = ["make_guide", "point_values", "set_scales_", "param_groups"]


def make_guide(model, kind: str = "map", *, init_scale: float = 1e-3, target=None):
    """An autoguide for ``target`` (default ``model``; e.g. the tau-conditioned model for MAP).

    For the mean-field guide, ``init_scale`` is the initial posterior sd of the global sites and tau;
    the non-centred task sites ``z_t`` start at their prior sd, 1 (see :func:`set_scales_`)."""
    target = model if target is None else target
    if guide_of(kind).point:  # a Laplace posterior is built around the MAP point after the fit
        return AutoDelta(target, init_loc_fn=model.init_loc)
    return AutoNormal(target, init_loc_fn=model.init_loc, init_scale=init_scale)


@torch.no_grad()
def point_values(guide, batch: Optional[dict] = None) -> dict[str, torch.Tensor]:
    """Point estimate of every guide site: the MAP value, or the posterior median (AutoNormal: the mean of
    each real-valued site; for tau, exp of its log-normal location)."""
    args = () if batch is None else (batch,)
    return {k: v.detach() for k, v in guide.median(*args).items()}


def _site_of(param_name: str) -> str:
    name = param_name.split(".", 1)[1] if param_name.startswith(("locs.", "scales.")) else param_name
    return name[: -len("_unconstrained")] if name.endswith("_unconstrained") else name


@torch.no_grad()
def set_scales_(guide, scales: dict) -> list[str]:
    """Set a mean-field (AutoNormal) guide's posterior sd per site: ``{site: float or tensor}``; returns the
    sites set. A MAP guide has no scales (nothing is set)."""
    done = []
    for pname, p in guide.named_parameters():
        if not pname.startswith("scales."):
            continue
        site = _site_of(pname)
        if site in scales:
            value = torch.as_tensor(scales[site], dtype=p.dtype, device=p.device).expand(p.shape)
            p.copy_(transform_to(guide.scale_constraint).inv(value.clamp_min(1e-8)))
            done.append(site)
    return done


def param_groups(guide, lr: float, scale_lr: float) -> list[dict]:
    """Optimizer groups: the posterior means at ``lr``; the mean-field scales and a learned tau at
    ``scale_lr``. Both move on a log scale, where Adam's step of about ``lr`` per step would otherwise
    cap how far they can travel in a fit (``sum_k lr_k``, 0.2 nats for bora's default schedule)."""
    main, log_scale = [], []
    for pname, p in guide.named_parameters():
        if not p.requires_grad:
            continue
        site = _site_of(pname)
        is_scale = pname.startswith("scales.") or (pname.startswith("locs.") and site.partition(":")[0] == "tau")
        (log_scale if is_scale else main).append(p)
    groups = [{"params": main, "lr": lr}]
    if log_scale:
        groups.append({"params": log_scale, "lr": scale_lr})
    return groups
