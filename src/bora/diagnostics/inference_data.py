"""Posterior diagnostics of a fit as ArviZ data: the pooling summaries of :mod:`bora.diagnostics.pooling` per draw.

>>> import numpy as np
>>> from bora.diagnostics.inference_data import task_table, to_inference_data
>>> idata = to_inference_data(tasks=["a", "b"], modules=["m"], tau=np.full((1, 1), 10.0),
...                           deviation=np.ones((1, 2, 1)), global_norm=np.ones((1, 1)),
...                           fisher=np.array([10.0, 30.0]), fisher_module=np.array([[10.0], [30.0]]),
...                           coords_per_module=np.array([4]), train_docs=np.array([5, 9]),
...                           train_tokens=np.array([50, 90]))
>>> task_table(idata)["shrinkage"]                     # tau / (tau + mean F), one draw
[0.5, 0.25]

From a fit (``bora`` a fitted :class:`~bora.api.Bora`, or anything with the :class:`~bora.diagnostics.view.FitView`
interface; ``train`` its training split)::

    idata = diagnose(bora, train=train, draws=200)     # arviz.InferenceData
    idata.to_netcdf("diagnostics.nc")                 # load_idata("diagnostics.nc") reads it back
    task_table(idata)["pooling_factor_lo"]             # per-task means and HDIs as plain lists

With several posterior draws of (adapters, tau), every summary is computed per draw; the Fisher
is computed once, at the point estimate, so ``pooling_factor`` and ``effective_parameters`` vary
only through tau (a fit with a point estimate of tau gives them zero-width intervals, which
:func:`task_table` flags with ``*_varies = False``), while ``delta_w_ratio`` varies with the
adapters. :func:`task_table` reports means and HDIs.

**Where tasks differ.** The posterior mean of ``delta_w_ratio`` is a poor guide to it: in each draw
most adapter coordinates carry no data from the task and sit about one prior sd (``tau^-1/2``) from
the global adapter, so every task's draws have about the same norm (prior noise), whatever its
data say. Two quantities keep the task structure: the **point estimate's** deviation
(``delta_w_ratio_point``, ``delta_w_module_point``: :func:`~bora.diagnostics.pooling.delta_w_ratio`
at ``bora.point()``, the MAP, or the posterior median for mean-field), where the uninformed
coordinates sit at the global adapter, and the **identified deviation** ``delta_w_identified``
(:func:`~bora.diagnostics.pooling.identified_delta_w`): per draw, the deviation restricted to the
coordinates with ``F_ti > tau`` (the task's data outweigh the prior), whose HDI is meaningful;
``identified_coords`` counts those coordinates (at the point estimate's tau).

**InferenceData layout.** Dimensions ``chain``, ``draw``, ``task``, ``module`` (adapter keys such
as ``model_layers_3_self_attn_q_proj``). ``posterior``: ``pooling_factor``,
``effective_parameters``, ``delta_w_ratio`` ``[.., task]``, ``delta_w_module`` ``[.., task,
module]`` (the ratio per module), ``tau`` (``[chain, draw]``, or ``[chain, draw, module]`` with
one tau per module), ``shrinkage`` ``[.., task]`` and ``shrinkage_module`` ``[.., task, module]``
(coordinate-averaged factors), ``deviation`` ``[.., task, module]`` (Frobenius norm of ``theta_t -
Theta`` over A and B together; not gauge invariant), ``deviation_total`` ``[.., task]``,
``global_norm`` ``[.., module]``, ``global_norm_total`` (``||Theta||``) and ``delta_w_identified``
``[.., task]``. ``constant_data``:
``train_docs``, ``train_tokens``, ``fisher`` ``[task]`` (mean over coordinates), ``fisher_module``
``[task, module]``, ``fisher_docs`` (documents used per task), ``coords_per_module``, and at the point
estimate ``delta_w_ratio_point`` ``[task]``, ``delta_w_module_point`` ``[task, module]``,
``delta_w_identified_point`` ``[task]`` and ``identified_coords`` ``[task]``. The identified
deviation needs hierarchy 'B' (one shared ``A``) and a global adapter: ``uncoupled`` and
hierarchy 'AB' fits have none of the three ``*identified*`` variables (``attrs["identified_note"]``
says why). A fit
whose posterior samples are all its point estimate (MAP) contributes one draw (``chain=1,
draw=1``); otherwise ``draws`` samples of :meth:`bora.api.Bora.posterior` (the same samples as
``bora evaluate --samples`` with that seed). The reference ``Theta`` is the global adapter, except
for ``uncoupled`` fits (``tau = 0``, ``pooling_factor = 0``), which have none: there deviations
are measured from the mean of the task adapters (mean ``Delta W`` for ``delta_w_ratio``;
``attrs["reference"] == "task_mean"``). ``shared`` fits (``tau = inf``) have no task adapters:
``pooling_factor = 1``, ``effective_parameters = 0``, deviations 0 and no identified coordinates.
"""

from __future__ import annotations

import logging
import math
import warnings
from contextlib import contextmanager
from typing import Optional, Sequence

import numpy as np
import torch

from .pooling import (adapter_norms, delta_w_sq_distances, fisher_means, identified_delta_w, pooling_from_sums,
                      precision_sums, shrinkage, tau_per_module)
from .view import FitView, fit_splits

with warnings.catch_warnings():  # arviz announces its refactor on import
    warnings.simplefilter("ignore", FutureWarning)
    import arviz as az

__all__ = ["to_inference_data", "compute_fisher", "inference_data", "diagnose", "task_table", "varies", "summary",
           "load_idata", "quiet_arviz", "identified_note"]


def to_inference_data(*, tasks: Sequence[str], modules: Sequence[str], tau: np.ndarray,
                      deviation: np.ndarray, global_norm: np.ndarray, fisher: np.ndarray,
                      fisher_module: np.ndarray, coords_per_module: np.ndarray,
                      train_docs: np.ndarray, train_tokens: np.ndarray,
                      fisher_docs: Optional[np.ndarray] = None, tau_per_module: bool = False,
                      pooling_factor: Optional[np.ndarray] = None, effective_parameters: Optional[np.ndarray] = None,
                      delta_w_ratio: Optional[np.ndarray] = None, delta_w_module: Optional[np.ndarray] = None,
                      delta_w_identified: Optional[np.ndarray] = None,
                      delta_w_ratio_point: Optional[np.ndarray] = None,
                      delta_w_module_point: Optional[np.ndarray] = None,
                      delta_w_identified_point: Optional[np.ndarray] = None,
                      identified_coords: Optional[np.ndarray] = None,
                      attrs: Optional[dict] = None, tau_per_task: bool = False) -> az.InferenceData:
    """Assemble the InferenceData from per-draw arrays (leading dim: draws ``S``, one chain).

    ``tau`` is ``[S, M]`` (per-module prior precision), or ``[S, T]`` with ``tau_per_task`` (each task's own prior
    precision, which its shrinkage factors then use); ``deviation`` ``[S, T, M]``,
    ``global_norm`` ``[S, M]``; the Fisher arrays and task sizes are per task (``[T]``,
    ``[T, M]``). The coordinate-averaged shrinkage factors are computed here with
    :func:`bora.diagnostics.pooling.shrinkage`.
    The per-task pooling summaries (:func:`~bora.diagnostics.pooling.pooling_factor`,
    :func:`~bora.diagnostics.pooling.effective_parameters`,
    :func:`~bora.diagnostics.pooling.delta_w_ratio` ``[S, T]``, the per-module ``delta_w_module`` ``[S, T, M]``,
    :func:`~bora.diagnostics.pooling.identified_delta_w`'s ``delta_w_identified`` ``[S, T]``) are
    stored when given, and so are the point estimate's ``delta_w_ratio_point`` ``[T]``,
    ``delta_w_module_point`` ``[T, M]``, ``delta_w_identified_point`` ``[T]`` and
    ``identified_coords`` ``[T]`` (in ``constant_data``).
    """
    tau = np.asarray(tau, dtype=np.float64)
    deviation = np.asarray(deviation, dtype=np.float64)
    global_norm = np.asarray(global_norm, dtype=np.float64)
    fisher = np.asarray(fisher, dtype=np.float64)
    fisher_module = np.asarray(fisher_module, dtype=np.float64)
    w = np.asarray(coords_per_module, dtype=np.float64)
    S, T, M = deviation.shape
    if tau.shape != ((S, T) if tau_per_task else (S, M)) or global_norm.shape != (S, M) or fisher.shape != (T,) \
            or fisher_module.shape != (T, M):
        raise ValueError("inconsistent shapes for draws/tasks/modules")
    lam, lam_mod = _shrinkages(tau, fisher, fisher_module, w, tau_per_task)
    post = {
        "tau": (tau if tau_per_module or tau_per_task else tau[:, :1].reshape(S))[None],
        "shrinkage": lam[None],
        "shrinkage_module": lam_mod[None],
        "deviation": deviation[None],
        "deviation_total": np.sqrt(np.square(deviation).sum(-1))[None],
        "global_norm": global_norm[None],
        "global_norm_total": np.sqrt(np.square(global_norm).sum(-1))[None],
    }
    for name, arr, shape in (("pooling_factor", pooling_factor, (S, T)),
                             ("effective_parameters", effective_parameters, (S, T)),
                             ("delta_w_ratio", delta_w_ratio, (S, T)), ("delta_w_module", delta_w_module, (S, T, M)),
                             ("delta_w_identified", delta_w_identified, (S, T))):
        if arr is not None:
            post[name] = _checked(name, arr, shape)[None]
    const = {
        "train_docs": np.asarray(train_docs, dtype=np.int64),
        "train_tokens": np.asarray(train_tokens, dtype=np.int64),
        "fisher": fisher,
        "fisher_module": fisher_module,
        "coords_per_module": w.astype(np.int64),
    }
    if fisher_docs is not None:
        const["fisher_docs"] = np.asarray(fisher_docs, dtype=np.int64)
    for name, arr, shape in (("delta_w_ratio_point", delta_w_ratio_point, (T,)),
                             ("delta_w_module_point", delta_w_module_point, (T, M)),
                             ("delta_w_identified_point", delta_w_identified_point, (T,))):
        if arr is not None:
            const[name] = _checked(name, arr, shape)
    if identified_coords is not None:
        const["identified_coords"] = _checked("identified_coords", identified_coords, (T,)).astype(np.int64)
    dims = {**DIMS, "tau": ["task"] if tau_per_task else ["module"] if tau_per_module else []}
    idata = az.from_dict(posterior=post, constant_data=const, dims=dims,
                         coords={"task": list(tasks), "module": list(modules)})
    for group in (idata.posterior, idata.constant_data):
        group.attrs.update({k: v for k, v in (attrs or {}).items() if v is not None})
    return idata


# the dims of every variable but tau (which has ["task"], ["module"] or none)
DIMS = {"shrinkage": ["task"], "shrinkage_module": ["task", "module"], "deviation": ["task", "module"],
        "deviation_total": ["task"], "global_norm": ["module"], "global_norm_total": [],
        "pooling_factor": ["task"], "effective_parameters": ["task"], "delta_w_ratio": ["task"],
        "delta_w_module": ["task", "module"], "delta_w_identified": ["task"],
        "delta_w_ratio_point": ["task"], "delta_w_module_point": ["task", "module"],
        "delta_w_identified_point": ["task"], "identified_coords": ["task"],
        "train_docs": ["task"], "train_tokens": ["task"], "fisher": ["task"],
        "fisher_module": ["task", "module"], "coords_per_module": ["module"], "fisher_docs": ["task"]}


def _shrinkages(tau: np.ndarray, fisher: np.ndarray, fisher_module: np.ndarray, w: np.ndarray,
                tau_per_task: bool) -> tuple[np.ndarray, np.ndarray]:
    """``(lambda [S, T], lambda_module [S, T, M])``: each task's shrinkage factors under the drawn taus."""
    if tau_per_task:  # task t's coordinates shrink with its own tau_t
        return shrinkage(tau, fisher[None]), shrinkage(tau[:, :, None], fisher_module[None])
    lam_mod = shrinkage(tau[:, None, :], fisher_module[None])  # [S, T, M]
    with np.errstate(invalid="ignore"):  # coordinate-weighted mean tau (inf stays inf)
        tau_bar = np.where(np.isinf(tau).any(1), np.inf, (tau * w).sum(1) / w.sum())
    return shrinkage(tau_bar[:, None], fisher[None]), lam_mod


def _checked(name: str, arr, shape) -> np.ndarray:
    arr = np.asarray(arr, dtype=np.float64)
    if arr.shape != shape:
        raise ValueError(f"{name} has shape {arr.shape}, expected {shape}")
    return arr


def varies(draws) -> bool:
    """Whether an array ``[S, ...]`` of draws differs between draws (NaN equal to NaN): whether an HDI has width."""
    x = np.asarray(draws, dtype=np.float64)
    return bool(x.shape[0] > 1 and not np.array_equal(x, np.broadcast_to(x[:1], x.shape), equal_nan=True))


def task_table(idata: az.InferenceData, hdi_prob: float = 0.94) -> dict:
    """Per-task numbers for plots and reports: plain lists in task order.

    For each of ``pooling_factor``, ``effective_parameters``, ``delta_w_ratio``,
    ``delta_w_identified`` (when present), ``shrinkage`` and ``deviation_total``: the posterior
    mean (the point estimate for a single-draw MAP fit), ``*_lo`` / ``*_hi``, its ``hdi_prob`` HDI
    over the draws (equal to the mean when there is a single draw), and ``*_varies``: whether the
    variable differs between draws at all (else its HDI has zero width and means nothing; e.g. the
    pooling factor and ``gamma`` under a point estimate of tau). ``tau_varies``: whether tau does.
    The point estimate's ``delta_w_ratio_point``, ``delta_w_identified_point`` and
    ``identified_coords`` are copied from ``constant_data`` when present.
    """
    post, const = idata.posterior, idata.constant_data
    n_draws = post.sizes["chain"] * post.sizes["draw"]
    out = {"task": [str(t) for t in post["task"].values], "draws": int(n_draws), "hdi_prob": hdi_prob,
           "train_docs": const["train_docs"].values.tolist(), "train_tokens": const["train_tokens"].values.tolist(),
           "fisher": const["fisher"].values.tolist(),
           "tau_varies": varies(post["tau"].values.reshape(n_draws, -1))}
    for var in ("pooling_factor", "effective_parameters", "delta_w_ratio", "delta_w_identified", "shrinkage",
                "deviation_total"):
        if var not in post:
            continue
        x = post[var]
        mean = x.mean(("chain", "draw")).values
        if n_draws > 1:
            with quiet_arviz():
                h = az.hdi(x, hdi_prob=hdi_prob)[var].values
            lo, hi = h[:, 0], h[:, 1]
        else:
            lo = hi = mean
        out[var] = mean.tolist()
        out[var + "_lo"] = np.asarray(lo).tolist()
        out[var + "_hi"] = np.asarray(hi).tolist()
        out[var + "_varies"] = varies(x.values.reshape(n_draws, -1))
    for var in ("delta_w_ratio_point", "delta_w_identified_point", "identified_coords"):
        if var in const:
            out[var] = const[var].values.tolist()
    return out


@contextmanager
def quiet_arviz():
    log = logging.getLogger("arviz")
    old = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        log.setLevel(old)


def summary(idata: az.InferenceData, var_names=("tau", "pooling_factor", "effective_parameters", "delta_w_ratio",
                                                "delta_w_identified", "shrinkage", "deviation_total",
                                                "global_norm_total"),
            hdi_prob: float = 0.94):
    """``az.summary`` of the compact variables (statistics only for a single-draw MAP fit)."""
    n_draws = idata.posterior.sizes["chain"] * idata.posterior.sizes["draw"]
    var_names = [v for v in var_names if v in idata.posterior]
    with quiet_arviz():
        return az.summary(idata, var_names=list(var_names), hdi_prob=hdi_prob,
                          kind="all" if n_draws > 3 else "stats")


def load_idata(path) -> az.InferenceData:
    """Read diagnostics written by ``idata.to_netcdf(path)``."""
    with quiet_arviz():
        return az.from_netcdf(str(path))


# ----------------------------------------------------------------------------- from a fit
def _train_split(bora: FitView, train):
    return train if train is not None else fit_splits(bora)["train"]


def compute_fisher(bora: FitView, train=None, *, fisher_docs: Optional[int] = None, seed: int = 0,
                   progress: bool = False):
    """Per-task diagonal empirical Fisher at the point estimate (posterior mean for mean-field).

    ``train`` is the training split (a :class:`~bora.data.documents.TokenizedSplit` or :class:`~bora.data.feed.Feed`);
    by default it is reloaded from the fit's data config. ``fisher_docs`` caps the documents per
    task (default ``bora.config.fit.fisher_docs``).
    """
    from ..data.feed import Feed
    from ..fit.fisher import task_fisher

    train = _train_split(bora, train)
    feed = train if isinstance(train, Feed) else bora.feed(train, progress=progress,
                                                            desc="caching frozen layers (train)")
    k = fisher_docs or bora.config.fit.fisher_docs
    feed.build_cache_()  # its own progress bar, before the Fisher pass's
    if progress:
        print(f"per-task Fisher on up to {k} training documents per task ({len(bora.tasks)} tasks)", flush=True)
    gen = torch.Generator().manual_seed(seed)
    return task_fisher(bora.model, bora.params(), feed, max_per_task=k, generator=gen, progress=progress)


def _draw_site_values(bora: FitView, draws: int, seed: int, progress: bool):
    """Yield ``(site values, tau dict)`` per draw: the point estimate once, or the fit's posterior samples.

    Draws come from :meth:`bora.api.Bora.posterior` (sample ``k`` is the same adapter set as
    ``bora evaluate --samples`` / ``bora sample`` use with that seed); a posterior whose samples
    are all the point estimate contributes one draw."""
    post = bora.posterior(max(1, int(draws)), seed=seed)
    fallback = bora.tau_estimate() or {}
    if getattr(post, "is_point", True) or draws <= 1:
        yield bora.point(), fallback
        return
    from tqdm.auto import tqdm

    groups = bora.model.tau_groups()
    for k in tqdm(range(post.num_samples), desc="posterior draws", disable=not progress, leave=False):
        values = post.values(k)
        taus = {name: (values[name].tolist() if values[name].dim() else float(values[name]))
                for name in groups if name in values}
        yield values, (taus or fallback)


def _delta_w(model, params, glob, keys) -> tuple[np.ndarray, np.ndarray]:
    """``(ratio [T], per module [T, M])``: :func:`~bora.diagnostics.pooling.delta_w_ratio` and its per-module parts."""
    if not model.has_tasks:  # shared: every task uses the global adapter
        return np.zeros(model.num_tasks), np.zeros((model.num_tasks, len(keys)))
    d2, g2 = delta_w_sq_distances(params, glob)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.sqrt(d2.sum(1)) / math.sqrt(g2.sum()), np.sqrt(d2) / np.sqrt(g2)[None]


def _identified(model, params, glob, fisher, tau_m, keys) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """:func:`~bora.diagnostics.pooling.identified_delta_w` at these adapters and tau (``None`` where undefined);
    with a per-task tau, ``tau_m`` is ``[T]`` and task ``t``'s row uses its own ``tau_t``."""
    if not model.has_tasks:
        return np.zeros(model.num_tasks), np.zeros(model.num_tasks, dtype=np.int64)
    if glob is None or not model.shared_A:
        return None
    if model.tau_per_task:
        rows = [identified_delta_w(params, glob, fisher.fisher, {k: float(t) for k in keys}) for t in tau_m]
        return (np.array([r[0][i] for i, r in enumerate(rows)]),
                np.array([r[1][i] for i, r in enumerate(rows)], dtype=np.int64))
    return identified_delta_w(params, glob, fisher.fisher, {k: float(t) for k, t in zip(keys, tau_m)})


def _tau_array(model, coupling, keys, tau_vals, fixed_tau) -> np.ndarray:
    """``[M]`` per module, or ``[T]`` per task for a per-task tau (``tau_vals = {"tau": [one per task]}``)."""
    if model.tau_per_task:
        return np.asarray(tau_vals["tau"], dtype=np.float64).reshape(model.num_tasks)
    return tau_per_module(coupling, keys, tau_vals, fixed_tau)


def _pooling_sums(model, task_level, keys, tau_m) -> tuple[np.ndarray, np.ndarray]:
    """``(gamma [T], R [T])`` of :func:`~bora.diagnostics.pooling.precision_sums`; with a per-task tau each task's
    row at its own ``tau_t``."""
    if not model.tau_per_task:
        return precision_sums(task_level, {k: float(t) for k, t in zip(keys, tau_m)})
    rows = [precision_sums(task_level, {k: float(t) for k in keys}) for t in tau_m]
    return (np.array([r[0][i] for i, r in enumerate(rows)]), np.array([r[1][i] for i, r in enumerate(rows)]))


def identified_note(model) -> str:
    """Why a fit has no ``delta_w_identified`` ('' when it has)."""
    if model.has_tasks and not model.has_global:
        return "uncoupled: no global adapter to deviate from"
    if model.has_tasks and not model.shared_A:
        return "hierarchy 'AB': each task's A deviates too, which the B coordinates' mask does not cover"
    return ""


def inference_data(bora: FitView, fisher, *, train=None, draws: int = 200, seed: int = 0,
                   progress: bool = False) -> az.InferenceData:
    """InferenceData of a fit given its :class:`~bora.fit.fisher.TaskFisher` (see the module docstring)."""
    model = bora.model
    keys = list(model.shapes)
    coupling = model.coupling
    mode = coupling.name
    # the coordinates tau ties to the global adapter: B alone for hierarchy 'B' (A is one shared, global factor),
    # A and B for 'AB'; a shared fit has no task-level factor and keeps its factors (tau = inf: pooling 1)
    task_level = {k: tuple(fisher.fisher[k][i] for i in model.task_factors()) for k in keys}
    F, F_mod, coords = fisher_means(task_level, keys)
    taus, devs, globs, pools, gammas, dws, dw_mods, idents = [], [], [], [], [], [], [], []
    pool_cache: dict = {}
    n_draws = 0
    for values, tau_vals in _draw_site_values(bora, draws, seed, progress):
        n_draws += 1
        params = model.params_from_values(values)
        glob = model.global_from_values(values)
        d, g = adapter_norms(params, glob, keys, model.num_tasks)
        tau_m = _tau_array(model, coupling, keys, tau_vals, bora.config.prior.tau)
        taus.append(tau_m)
        devs.append(d)
        globs.append(g)
        ck = tuple(tau_m.tolist())
        if ck not in pool_cache:  # the Fisher is fixed: the pooling summaries change only with tau
            gam, R = _pooling_sums(model, task_level, keys, tau_m)
            pool_cache[ck] = (pooling_from_sums(gam, R), gam)
        pools.append(pool_cache[ck][0])
        gammas.append(pool_cache[ck][1])
        dw, dw_mod = _delta_w(model, params, glob, keys)
        dws.append(dw)
        dw_mods.append(dw_mod)
        ident = _identified(model, params, glob, fisher, tau_m, keys)
        idents.append(None if ident is None else ident[0])
    # the point estimate (MAP; the posterior median = mean for mean-field) and its tau
    values = bora.point()
    params, glob = model.params_from_values(values), model.global_from_values(values)
    tau_point = _tau_array(model, coupling, keys, bora.tau_estimate() or {}, bora.config.prior.tau)
    dw_point, dw_mod_point = _delta_w(model, params, glob, keys)
    ident_point = _identified(model, params, glob, fisher, tau_point, keys)
    if train is not None and not hasattr(train, "task_tokens"):
        train = getattr(train, "split", None)
    docs = fisher.sizes.numpy() if train is None else train.task_sizes().numpy()
    tokens = (np.full(model.num_tasks, -1) if train is None else train.task_tokens().numpy())
    per_module = coupling.learned and bora.config.prior.tau_per_module
    attrs = {"tau_mode": mode, "guide": bora.config.fit.guide, "model": bora.config.model,
             "reference": coupling.reference,
             "draws_from": "posterior" if n_draws > 1 else "point_estimate",
             "tau_per_module": int(per_module), "tau_per_task": int(model.tau_per_task),
             "identified_note": identified_note(model) or None}
    has_ident = ident_point is not None
    return to_inference_data(tasks=bora.tasks, modules=keys, tau=np.stack(taus), deviation=np.stack(devs),
                             global_norm=np.stack(globs), fisher=F, fisher_module=F_mod, coords_per_module=coords,
                             train_docs=docs, train_tokens=tokens, fisher_docs=fisher.used.numpy(),
                             tau_per_module=per_module, pooling_factor=np.stack(pools),
                             effective_parameters=np.stack(gammas), delta_w_ratio=np.stack(dws),
                             delta_w_module=np.stack(dw_mods),
                             delta_w_identified=np.stack(idents) if has_ident else None,
                             delta_w_ratio_point=dw_point, delta_w_module_point=dw_mod_point,
                             delta_w_identified_point=ident_point[0] if has_ident else None,
                             identified_coords=ident_point[1] if has_ident else None, attrs=attrs,
                             tau_per_task=model.tau_per_task)


def diagnose(bora: FitView, *, train=None, fisher_docs: Optional[int] = None, draws: int = 200, seed: int = 0,
             progress: bool = False) -> az.InferenceData:
    """Fisher pass on the training split, then :func:`inference_data` (one call from a fit)."""
    from ..data.feed import Feed

    train = _train_split(bora, train)
    split = train.split if isinstance(train, Feed) else train
    fisher = compute_fisher(bora, train, fisher_docs=fisher_docs, seed=seed, progress=progress)
    return inference_data(bora, fisher, train=split, draws=draws, seed=seed, progress=progress)
