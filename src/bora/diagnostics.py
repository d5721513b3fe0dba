"""Posterior diagnostics of a fit as ArviZ data: tau, per-task deviations, shrinkage, task sizes.

>>> from bora.diagnostics import shrinkage
>>> shrinkage(10.0, [0.0, 10.0, 90.0]).tolist()   # tau / (tau + F): no data -> 1, tau = F -> 1/2
[1.0, 0.5, 0.1]
>>> shrinkage(0.0, [5.0]).tolist(), shrinkage(float("inf"), [5.0]).tolist()   # independent, shared
([0.0], [1.0])

From a fit (``bora`` a fitted :class:`~bora.api.Bora`, ``train`` its training split)::

    idata = diagnose(bora, train=train, draws=200)     # arviz.InferenceData
    idata.to_netcdf("diagnostics.nc")                 # load_idata("diagnostics.nc") reads it back
    task_table(idata)["shrinkage"]                    # per-task point/mean shrinkage factors

**Shrinkage factor.** For task ``t`` with likelihood precision ``F_t`` (the diagonal empirical
Fisher of its own training data at the estimate, averaged over adapter coordinates) and prior
precision ``tau`` around the global adapter, ``lambda_t = tau / (tau + F_t)`` in ``[0, 1]``: 1 means
the task's adapter is pulled all the way to the global one, 0 means its own data alone decide.
In the normal-normal model ``y_tj ~ N(theta_t, sigma^2)``, ``theta_t ~ N(mu, 1/tau)`` this is
exact: the posterior mean is ``lambda_t mu + (1 - lambda_t) ybar_t`` with ``F_t = n_t / sigma^2``
(tests/test_diagnostics.py checks it against the closed form). ``independent`` fits have
``tau = 0`` (``lambda = 0``), ``shared`` fits ``tau = inf`` (``lambda = 1``). With one tau per
module, the per-module factors use that module's tau and the overall factor uses the
coordinate-weighted mean tau.

**InferenceData layout.** Dimensions ``chain``, ``draw``, ``task``, ``module`` (adapter keys such
as ``model_layers_3_self_attn_q_proj``). ``posterior``: ``tau`` (``[chain, draw]``, or
``[chain, draw, module]`` with one tau per module), ``shrinkage`` ``[.., task]``,
``shrinkage_module`` ``[.., task, module]``, ``deviation`` ``[.., task, module]`` (Frobenius norm
of ``theta_t - Theta`` over A and B together), ``deviation_total`` ``[.., task]`` (over every
module), ``global_norm`` ``[.., module]`` and ``global_norm_total`` (``||Theta||``).
``constant_data``: ``train_docs``, ``train_tokens``, ``fisher`` ``[task]``, ``fisher_module``
``[task, module]``, ``fisher_docs`` (documents used per task) and ``coords_per_module``.
A MAP fit contributes its point estimate as one draw (``chain=1, draw=1``); a mean-field
(AutoNormal) fit contributes ``draws`` samples from the guide, with the Fisher computed once at
the posterior mean and the shrinkage evaluated per draw with that draw's tau. The reference
``Theta`` is the global adapter, except for ``independent`` fits, which have none: there the
deviations are measured from the mean of the task adapters (``attrs["reference"] ==
"task_mean"``). ``shared`` fits have no task adapters: deviations are 0.
"""

from __future__ import annotations

import logging
import math
import warnings
from contextlib import contextmanager
from typing import Mapping, Optional, Sequence

import numpy as np
import torch

with warnings.catch_warnings():  # arviz announces its refactor on import
    warnings.simplefilter("ignore", FutureWarning)
    import arviz as az

__all__ = [
    "shrinkage",
    "fisher_means",
    "tau_per_module",
    "adapter_norms",
    "to_inference_data",
    "compute_fisher",
    "inference_data",
    "diagnose",
    "task_table",
    "spearman",
    "summary",
    "load_idata",
]


# ----------------------------------------------------------------------------- pure functions
def shrinkage(tau, fisher_mean) -> np.ndarray:
    """``lambda = tau / (tau + F)`` elementwise (broadcasting), with the limits made exact.

    ``tau = inf`` gives 1 (shared), ``tau = 0`` gives 0 (independent, also when ``F = 0``), and
    ``F = 0`` with ``tau > 0`` gives 1 (no data: the prior decides).
    """
    tau = np.asarray(tau, dtype=np.float64)
    F = np.asarray(fisher_mean, dtype=np.float64)
    if np.any(tau < 0) or np.any(F < 0):
        raise ValueError("tau and the Fisher information must be >= 0")
    tau, F = np.broadcast_arrays(tau, F)
    with np.errstate(divide="ignore", invalid="ignore"):
        lam = tau / (tau + F)
    lam = np.where(np.isinf(tau), 1.0, lam)
    lam = np.where((F == 0) & (tau > 0), 1.0, lam)
    lam = np.where(tau == 0, 0.0, lam)
    return np.clip(lam, 0.0, 1.0)


def fisher_means(fisher: Mapping[str, tuple[torch.Tensor, torch.Tensor]], keys: Sequence[str]
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(overall [T], per_module [T, M], coords [M])``: the per-task Fisher averaged over coordinates.

    ``fisher`` maps adapter key -> ``(F_A [T, r, in], F_B [T, out, r])`` (:class:`bora.fisher.TaskFisher`).
    """
    sums, counts = [], []
    for k in keys:
        FA, FB = fisher[k]
        sums.append((FA.double().flatten(1).sum(1) + FB.double().flatten(1).sum(1)).cpu().numpy())
        counts.append(FA[0].numel() + FB[0].numel())
    S = np.stack(sums, axis=1)  # [T, M]
    c = np.asarray(counts, dtype=np.float64)
    return S.sum(1) / c.sum(), S / c, c


def tau_per_module(tau_mode: str, keys: Sequence[str], tau_values: Mapping[str, float],
                   fixed_tau: Optional[float] = None) -> np.ndarray:
    """Prior precision of every module ``[M]`` from a tau estimate (``{"tau": v}`` or ``{"tau:<key>": v}``)."""
    if tau_mode == "independent":
        return np.zeros(len(keys))
    if tau_mode == "shared":
        return np.full(len(keys), np.inf)
    if tau_mode == "fixed" and fixed_tau is not None:
        return np.full(len(keys), float(fixed_tau))
    if "tau" in tau_values:
        return np.full(len(keys), float(tau_values["tau"]))
    return np.array([float(tau_values[f"tau:{k}"]) for k in keys])


def adapter_norms(params: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                  global_params: Optional[Mapping[str, tuple[torch.Tensor, torch.Tensor]]],
                  keys: Sequence[str], num_tasks: int) -> tuple[np.ndarray, np.ndarray]:
    """``(deviation [T, M], global_norm [M])``: ``||theta_t - Theta||`` and ``||Theta||`` per module.

    ``params`` holds task adapters ``(A [T, r, in], B [T, out, r])``, or a single shared adapter
    (``[r, in]``, ``[out, r]``; deviations are then 0). Without ``global_params`` (independent
    fits) the reference is the mean of the task adapters.
    """
    dev = np.zeros((num_tasks, len(keys)))
    glob = np.zeros(len(keys))
    for m, k in enumerate(keys):
        A, B = (x.detach().double() for x in params[k])
        if A.dim() == 2:  # shared: one adapter for every task
            glob[m] = math.sqrt(float(A.square().sum() + B.square().sum()))
            continue
        if global_params is not None:
            GA, GB = (x.detach().double() for x in global_params[k])
        else:
            GA, GB = A.mean(0), B.mean(0)
        glob[m] = math.sqrt(float(GA.square().sum() + GB.square().sum()))
        d2 = (A - GA).square().flatten(1).sum(1) + (B - GB).square().flatten(1).sum(1)
        dev[:, m] = d2.sqrt().cpu().numpy()
    return dev, glob


def to_inference_data(*, tasks: Sequence[str], modules: Sequence[str], tau: np.ndarray,
                      deviation: np.ndarray, global_norm: np.ndarray, fisher: np.ndarray,
                      fisher_module: np.ndarray, coords_per_module: np.ndarray,
                      train_docs: np.ndarray, train_tokens: np.ndarray,
                      fisher_docs: Optional[np.ndarray] = None, tau_per_module: bool = False,
                      attrs: Optional[dict] = None) -> az.InferenceData:
    """Assemble the InferenceData from per-draw arrays (leading dim: draws ``S``, one chain).

    ``tau`` is ``[S, M]`` (per-module prior precision); ``deviation`` ``[S, T, M]``,
    ``global_norm`` ``[S, M]``; the Fisher arrays and task sizes are per task (``[T]``,
    ``[T, M]``). The shrinkage factors are computed here with :func:`shrinkage`.
    """
    tau = np.asarray(tau, dtype=np.float64)
    deviation = np.asarray(deviation, dtype=np.float64)
    global_norm = np.asarray(global_norm, dtype=np.float64)
    fisher = np.asarray(fisher, dtype=np.float64)
    fisher_module = np.asarray(fisher_module, dtype=np.float64)
    w = np.asarray(coords_per_module, dtype=np.float64)
    S, T, M = deviation.shape
    if tau.shape != (S, M) or global_norm.shape != (S, M) or fisher.shape != (T,) or fisher_module.shape != (T, M):
        raise ValueError("inconsistent shapes for draws/tasks/modules")
    lam_mod = shrinkage(tau[:, None, :], fisher_module[None])  # [S, T, M]
    with np.errstate(invalid="ignore"):  # coordinate-weighted mean tau (inf stays inf)
        tau_bar = np.where(np.isinf(tau).any(1), np.inf, (tau * w).sum(1) / w.sum())
    lam = shrinkage(tau_bar[:, None], fisher[None])  # [S, T]
    post = {
        "tau": (tau if tau_per_module else tau[:, :1].reshape(S))[None],
        "shrinkage": lam[None],
        "shrinkage_module": lam_mod[None],
        "deviation": deviation[None],
        "deviation_total": np.sqrt(np.square(deviation).sum(-1))[None],
        "global_norm": global_norm[None],
        "global_norm_total": np.sqrt(np.square(global_norm).sum(-1))[None],
    }
    const = {
        "train_docs": np.asarray(train_docs, dtype=np.int64),
        "train_tokens": np.asarray(train_tokens, dtype=np.int64),
        "fisher": fisher,
        "fisher_module": fisher_module,
        "coords_per_module": w.astype(np.int64),
    }
    if fisher_docs is not None:
        const["fisher_docs"] = np.asarray(fisher_docs, dtype=np.int64)
    dims = {"tau": ["module"] if tau_per_module else [], "shrinkage": ["task"],
            "shrinkage_module": ["task", "module"], "deviation": ["task", "module"],
            "deviation_total": ["task"], "global_norm": ["module"], "global_norm_total": [],
            "train_docs": ["task"], "train_tokens": ["task"], "fisher": ["task"],
            "fisher_module": ["task", "module"], "coords_per_module": ["module"], "fisher_docs": ["task"]}
    idata = az.from_dict(posterior=post, constant_data=const, dims=dims,
                         coords={"task": list(tasks), "module": list(modules)})
    for group in (idata.posterior, idata.constant_data):
        group.attrs.update({k: v for k, v in (attrs or {}).items() if v is not None})
    return idata


def spearman(x, y) -> float:
    """Spearman rank correlation (average ranks for ties); NaN when undefined (< 3 points or a constant)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    from scipy.stats import rankdata

    rx, ry = rankdata(x), rankdata(y)
    return float(np.corrcoef(rx, ry)[0, 1])


def task_table(idata: az.InferenceData, hdi_prob: float = 0.94) -> dict:
    """Per-task numbers for plots and reports: plain lists in task order.

    ``shrinkage`` / ``deviation`` are posterior means (the point estimate for a MAP fit) and
    ``*_lo`` / ``*_hi`` their HDIs (equal to the mean when there is a single draw).
    """
    post, const = idata.posterior, idata.constant_data
    n_draws = post.sizes["chain"] * post.sizes["draw"]
    out = {"task": [str(t) for t in post["task"].values], "draws": int(n_draws), "hdi_prob": hdi_prob,
           "train_docs": const["train_docs"].values.tolist(), "train_tokens": const["train_tokens"].values.tolist(),
           "fisher": const["fisher"].values.tolist()}
    for var in ("shrinkage", "deviation_total"):
        x = post[var]
        mean = x.mean(("chain", "draw")).values
        if n_draws > 1:
            with _quiet_arviz():
                h = az.hdi(x, hdi_prob=hdi_prob)[var].values
            lo, hi = h[:, 0], h[:, 1]
        else:
            lo = hi = mean
        out[var] = mean.tolist()
        out[var + "_lo"] = np.asarray(lo).tolist()
        out[var + "_hi"] = np.asarray(hi).tolist()
    return out


@contextmanager
def _quiet_arviz():
    log = logging.getLogger("arviz")
    old = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        log.setLevel(old)


def summary(idata: az.InferenceData, var_names=("tau", "shrinkage", "deviation_total", "global_norm_total"),
            hdi_prob: float = 0.94):
    """``az.summary`` of the compact variables (statistics only for a single-draw MAP fit)."""
    n_draws = idata.posterior.sizes["chain"] * idata.posterior.sizes["draw"]
    with _quiet_arviz():
        return az.summary(idata, var_names=list(var_names), hdi_prob=hdi_prob,
                          kind="all" if n_draws > 3 else "stats")


def load_idata(path) -> az.InferenceData:
    """Read diagnostics written by ``idata.to_netcdf(path)``."""
    with _quiet_arviz():
        return az.from_netcdf(str(path))


# ----------------------------------------------------------------------------- from a fit
def _train_split(bora, train):
    if train is not None:
        return train
    from .api import load_data

    return load_data(bora.config, bora.tokenizer, tasks=bora.tasks)["train"]


def compute_fisher(bora, train=None, *, fisher_docs: Optional[int] = None, seed: int = 0,
                   progress: bool = False):
    """Per-task diagonal empirical Fisher at the point estimate (posterior mean for mean-field).

    ``train`` is the training split (a :class:`~bora.data.TokenizedSplit` or :class:`~bora.feed.Feed`);
    by default it is reloaded from the fit's data config. ``fisher_docs`` caps the documents per
    task (default ``bora.config.fit.fisher_docs``).
    """
    from .feed import Feed
    from .fisher import task_fisher

    train = _train_split(bora, train)
    feed = train if isinstance(train, Feed) else bora.feed(train, progress=progress,
                                                            desc="caching frozen layers (train)")
    k = fisher_docs or bora.config.fit.fisher_docs
    feed.build_cache_()  # its own progress bar, before the Fisher pass's
    if progress:
        print(f"per-task Fisher on up to {k} training documents per task ({len(bora.tasks)} tasks)", flush=True)
    gen = torch.Generator().manual_seed(seed)
    return task_fisher(bora.model, bora.params(), feed, max_per_task=k, generator=gen, progress=progress)


def _draw_site_values(bora, draws: int, seed: int, progress: bool):
    """Yield ``(site values, tau dict)`` per draw: the point estimate once (MAP) or guide samples."""
    model = bora.model
    if bora.config.fit.guide != "meanfield" or draws <= 1:
        yield bora.point(), bora.tau_estimate() or {}
        return
    from tqdm.auto import tqdm

    fallback = bora.tau_estimate() or {}
    cuda = [bora.device.index if bora.device.index is not None else torch.cuda.current_device()] \
        if bora.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), torch.no_grad():
        torch.manual_seed(seed)
        for _ in tqdm(range(draws), desc="posterior draws", disable=not progress, leave=False):
            values = bora.model.complete({k: v.detach() for k, v in bora.guide().items()})
            taus = {name: float(values[name]) for name in model.tau_groups() if name in values}
            yield values, (taus or fallback)


def inference_data(bora, fisher, *, train=None, draws: int = 200, seed: int = 0,
                   progress: bool = False) -> az.InferenceData:
    """InferenceData of a fit given its :class:`~bora.fisher.TaskFisher` (see the module docstring)."""
    model = bora.model
    keys = list(model.shapes)
    mode = bora.config.prior.tau_mode
    F, F_mod, coords = fisher_means(fisher.fisher, keys)
    taus, devs, globs = [], [], []
    for values, tau_vals in _draw_site_values(bora, draws, seed, progress):
        params = model.params_from_values(values)
        glob = model.global_from_values(values)
        d, g = adapter_norms(params, glob, keys, model.num_tasks)
        taus.append(tau_per_module(mode, keys, tau_vals, bora.config.prior.tau))
        devs.append(d)
        globs.append(g)
    if train is not None and not hasattr(train, "task_tokens"):
        train = getattr(train, "split", None)
    docs = fisher.sizes.numpy() if train is None else train.task_sizes().numpy()
    tokens = (np.full(model.num_tasks, -1) if train is None else train.task_tokens().numpy())
    per_module = mode == "learned" and bora.config.prior.tau_per_module
    attrs = {"tau_mode": mode, "guide": bora.config.fit.guide, "model": bora.config.model,
             "reference": {"independent": "task_mean", "shared": "none"}.get(mode, "global"),
             "draws_from": "guide" if (bora.config.fit.guide == "meanfield" and draws > 1) else "point_estimate",
             "tau_per_module": int(per_module)}
    return to_inference_data(tasks=bora.tasks, modules=keys, tau=np.stack(taus), deviation=np.stack(devs),
                             global_norm=np.stack(globs), fisher=F, fisher_module=F_mod, coords_per_module=coords,
                             train_docs=docs, train_tokens=tokens, fisher_docs=fisher.used.numpy(),
                             tau_per_module=per_module, attrs=attrs)


def diagnose(bora, *, train=None, fisher_docs: Optional[int] = None, draws: int = 200, seed: int = 0,
             progress: bool = False) -> az.InferenceData:
    """Fisher pass on the training split, then :func:`inference_data` (one call from a fit)."""
    from .feed import Feed

    train = _train_split(bora, train)
    split = train.split if isinstance(train, Feed) else train
    fisher = compute_fisher(bora, train, fisher_docs=fisher_docs, seed=seed, progress=progress)
    return inference_data(bora, fisher, train=split, draws=draws, seed=seed, progress=progress)
