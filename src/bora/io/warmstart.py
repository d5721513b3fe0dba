"""Warm starts: set a guide at a saved fit's estimates, whatever the two fits' guides and parameterisations.

>>> from bora.io.warmstart import guide_value
>>> import torch
>>> natural = {"Theta_B:m": torch.zeros(2, 1), "theta_B:m": torch.ones(3, 2, 1)}
>>> z = guide_value("theta_B:m_decentered", natural, glob="Theta_B:m", tau=4.0)   # z = (theta - Theta) tau^1/2
>>> z[0].flatten().tolist()
[2.0, 2.0]

The mapping works on **natural coordinates**: every fit folder holds ``estimates.safetensors``
(:func:`bora.io.fitfolder.natural_estimates`), the
point estimate of every adapter site (``Theta_A:<m>``, ``Theta_B:<m>``, ``theta_A:<m>``, ``theta_B:<m>``
with a leading task dim) and of every tau site, whatever guide produced it. A target guide site is
then

* a natural site: its value (task rows matched by task name);
* a non-centred site ``theta_*:<m>_decentered``: ``z = (theta - Theta) tau^1/2`` with the target's tau.
* an offset site ``theta_*:<m>_offset``: ``delta = theta - Theta``.

Missing sites are derived where the structure allows (task adapters of a 'shared' source: its global
adapter; the global adapter of an 'uncoupled' source: the mean of its task adapters), otherwise left
at their initial value. A mean-field target takes its scales from the source's Laplace posterior
(``laplace.safetensors``: ``(F + tau)^-1/2`` per task coordinate; for the global adapter the
mean-field optimum given the task sites, ``(1/s^2 + T tau)^-1/2`` centred or ``(1/s^2 + sum_t F_t)^-1/2``
non-centred), or from a mean-field source's scales; otherwise they keep their initial values.

:func:`warm_start_` initialises anything with the attributes of :class:`WarmStartTarget` (a :class:`bora.api.Bora`
has them; :meth:`bora.api.Bora.init_from` calls it).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Optional, Protocol, Union

import torch

from ..core.config import ConfigError
from ..core.coupling import coupling_of, guide_of
from ..model.distributions import guide_value, natural_site
from .fitfolder import BaseModelSource, check_base, read_fit_files, read_laplace
from ..model.guides import saved_scales, set_locs_, set_scales_
from ..core.files import read_safetensors

if TYPE_CHECKING:
    from ..fit.tau import EmpiricalBayesTau
    from ..model.guides import AutoDelta, AutoNormal
    from ..model.hierarchy import BoraModel

__all__ = ["WarmStartTarget", "guide_value", "warm_start_", "warm_start_from_"]


class WarmStartTarget(BaseModelSource, Protocol):
    """What :func:`warm_start_` reads of the fit it initialises (and sets: its guide's locations and scales, its
    empirical-Bayes tau); a freshly built :class:`bora.api.Bora` has it all."""

    tasks: tuple[str, ...]
    device: torch.device
    model: BoraModel
    guide: Union[AutoDelta, AutoNormal]
    tau: Optional[EmpiricalBayesTau]


def _derive(natural: dict, model, src_tasks: list, tasks: tuple) -> tuple[dict, list]:
    """Natural values for the target's tasks (reordered by name), deriving what a limit source lacks."""
    out, derived = {}, []
    order = [src_tasks.index(t) for t in tasks] if all(t in src_tasks for t in tasks) else None
    for name, v in natural.items():
        if name.startswith("theta_"):
            if order is not None:
                out[name] = v[order]
        else:
            out[name] = v
    for k in model.shapes:
        for _, task_site, glob_site in model.task_sites(k):
            if task_site not in out and glob_site in out:  # a 'shared' source
                out[task_site] = out[glob_site].expand(len(tasks), *out[glob_site].shape).clone()
                derived.append(task_site)
        for g_site, t_site in ((f"Theta_A:{k}", f"theta_A:{k}"), (f"Theta_B:{k}", f"theta_B:{k}")):
            if g_site not in out and t_site in natural:  # an 'uncoupled' source
                out[g_site] = natural[t_site].mean(0)
                derived.append(g_site)
    return out, derived


def _source_tau(config, natural: Mapping[str, torch.Tensor], state: Mapping) -> dict[str, float]:
    if coupling_of(config.prior).fixed:
        return {"tau": float(config.prior.tau)}
    out = {k: float(v) for k, v in natural.items() if k.partition(":")[0] == "tau"}
    out.update({k: float(v) for k, v in ((state or {}).get("tau") or {}).items()})
    return out


def warm_start_(bora: WarmStartTarget, source) -> dict:
    """Initialise ``bora``'s guide (and empirical-Bayes tau) at the estimates of the fit in folder ``source``.

    Typical use: ``bora fit --guide meanfield --init-from MAP_DIR`` (after ``bora laplace MAP_DIR`` the
    scales start at the Laplace posterior's). Tasks are matched by name; the base model and adapter
    settings must agree. Returns ``{"copied", "derived", "kept"}`` lists of site names."""
    source = Path(source)
    config, meta, state, tensors = read_fit_files(source)
    mine = bora.config
    if config.model != mine.model:
        raise ConfigError(f"--init-from fit uses base model {config.model!r}, this fit {mine.model!r}")
    if config.adapter != mine.adapter:
        raise ConfigError("--init-from fit has different adapter settings (rank/alpha/targets/layers)")
    check_base(bora, meta, source)
    if not (source / "estimates.safetensors").exists():
        raise ConfigError(f"--init-from: {source} has no estimates.safetensors (saved by an older bora); refit it")
    src_tasks = list(meta.get("tasks", []))
    model = bora.model
    missing = [t for t in bora.tasks if t not in src_tasks]
    if missing and model.has_tasks and coupling_of(config.prior).has_tasks:
        raise ConfigError(f"--init-from fit lacks task(s) {missing[:3]} of this fit")
    natural, derived = _derive(read_safetensors(source / "estimates.safetensors"), model, src_tasks, bora.tasks)
    lap = read_laplace(source / "laplace.safetensors") if (source / "laplace.safetensors").exists() else None
    return warm_start_from_(bora, natural, config=config, src_tasks=src_tasks, lap=lap, tensors=tensors, state=state,
                            derived=derived)


def warm_start_from_(bora: WarmStartTarget, natural: dict, *, config, src_tasks: list, lap=None,
                     tensors: Optional[Mapping] = None, state: Optional[Mapping] = None, derived=()) -> dict:
    """Initialise ``bora``'s guide (and empirical-Bayes tau) at the natural-coordinate estimates ``natural`` of a
    fit with ``config`` over ``src_tasks`` (its Laplace posterior ``lap``, its saved ``tensors`` and ``state``
    where it has them); :func:`warm_start_` reads all of these from a fit folder."""
    model = bora.model
    if model.tau_per_task or getattr(config.prior, "tau_per_task", False):
        raise ConfigError("warm starts to or from a fit with a per-task tau (tau_per_task) are not supported")
    natural = dict(natural)
    src_tau = _source_tau(config, natural, state or {})
    report: dict = {"copied": [], "derived": [], "kept": []}
    if src_tau:  # tau first: non-centred sites are expressed in the target's tau
        geo = math.exp(sum(math.log(v) for v in src_tau.values()) / len(src_tau))
        target = {name: src_tau.get(name, src_tau.get("tau", geo)) for name in model.tau_groups()}
        if bora.tau is not None:
            bora.tau.load_(target)
        natural.update({name: torch.tensor(v) for name, v in target.items()})
        report["copied"].extend(sorted(target))
    tau_key = model.tau_by_key(natural)
    globs = {site: g for k in model.shapes for _, site, g in model.task_sites(k)}
    guide = bora.guide
    meanfield = not guide_of(bora.config.fit).point
    locs, scales = {}, {}
    for name, site in guide.prototype_trace.iter_stochastic_nodes():
        if name.partition(":")[0] == "tau" and bora.tau is not None:
            continue
        base = natural_site(name)[0]
        key = base.partition(":")[2]
        v = guide_value(name, natural, glob=globs.get(base), tau=tau_key.get(key))
        if v is None:
            report["kept"].append(name)
            continue
        if tuple(v.shape) != tuple(site["value"].shape):
            raise ConfigError(f"--init-from: site {name} has shape {tuple(v.shape)} in the source, "
                              f"{tuple(site['value'].shape)} here")
        locs[name] = v.to(bora.device, torch.float32)
        report["derived" if base in derived else "copied"].append(name)
        if meanfield:
            scale = _source_scale(name, base, key, lap, tensors or {}, config, src_tasks, bora.tasks, tau_key,
                                  global_in_likelihood=model.parameterisation != "centred")
            if scale is not None and tuple(scale.shape) == tuple(site["value"].shape):
                scales[name] = scale.to(bora.device)
    set_locs_(guide, locs)
    set_scales_(guide, scales)
    return report


def _source_scale(name, base, key, lap, tensors, config, src_tasks, tasks, tau_key, *,
                  global_in_likelihood: bool = False) -> Optional[torch.Tensor]:
    """The posterior sd of guide site ``name`` from the source's Laplace posterior or mean-field scales."""
    kind = base.partition(":")[0]
    factor = 0 if kind.endswith("_A") else 1
    if lap is not None and key in lap.task and factor in lap.task[key]:
        order = [src_tasks.index(t) for t in tasks]
        if kind.startswith("theta_"):
            sd = lap.task_sd(key, factor)[order]
            return sd * math.sqrt(tau_key[key]) if natural_site(name)[1] == "noncentred" else sd
        if kind.startswith("Theta_") and lap.has_global:
            # q(Theta) of the mean-field target given its task sites (not Laplace's marginal, which is the vague
            # hyperprior wherever the data say little): the prior plus the coupling to the T task adapters
            # (centred), or plus every task's likelihood curvature (non-centred or offset: Theta enters the likelihood)
            F = lap.task[key][factor]
            t = tau_key[key]
            couple = F.sum(0) if global_in_likelihood else len(tasks) * t
            return (1.0 / lap.global_scale ** 2 + couple + torch.zeros_like(F[0])).rsqrt()
    scale = saved_scales(tensors).get(name) if not guide_of(config.fit).point else None
    if scale is not None and name.startswith("theta_"):
        scale = scale[[src_tasks.index(t) for t in tasks]]
    return scale
