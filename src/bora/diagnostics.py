"""Posterior diagnostics of a fit as ArviZ data: how much each task is pooled toward the global adapter.

>>> import torch
>>> from bora.diagnostics import effective_parameters, pooling_factor
>>> F = {"q_proj": (torch.tensor([[0.0, 10.0, 90.0], [1.0, 1.0, 1.0]]),)}   # Fisher [task, coordinate]
>>> pooling_factor(F, tau=10.0).round(3).tolist()        # Fisher-weighted tau / (tau + F)
[0.14, 0.909]
>>> effective_parameters(F, tau=10.0).round(3).tolist()  # sum F / (F + tau): 0 + .5 + .9, 3 x 1/11
[1.4, 0.273]

From a fit (``bora`` a fitted :class:`~bora.api.Bora`, ``train`` its training split)::

    idata = diagnose(bora, train=train, draws=200)     # arviz.InferenceData
    idata.to_netcdf("diagnostics.nc")                 # load_idata("diagnostics.nc") reads it back
    task_table(idata)["pooling_factor_lo"]             # per-task means and HDIs as plain lists

**Per-task pooling summaries** (the headline; each a pure function, each unchanged under the
reparameterisation ``A -> cA, B -> B/c`` when the Fisher and tau transform with it, and each
checked against the normal-normal closed form in tests/test_diagnostics.py). ``F_ti`` is the
diagonal empirical Fisher of task ``t``'s own training data for its task-level coordinate ``i``
at the estimate, ``tau_i`` the prior precision around the global adapter, ``r_ti = F_ti / tau_i``
and ``lambda_ti = tau_i / (tau_i + F_ti) = 1 / (1 + r_ti)`` the coordinate's shrinkage factor.

* :func:`pooling_factor` ``lambda^F_t = sum_i F_ti lambda_ti / sum_i F_ti`` (weights ``r_ti``, the same
  when one tau covers the coordinates), in the spirit of Gelman & Pardoe's pooling factor: how far
  the directions the task's data actually inform are pulled to the global adapter (1: all the
  way, 0: not at all). The plain coordinate mean ``tau / (tau + mean_i F_ti)`` (``shrinkage``,
  kept for comparison) is dominated by the many coordinates with ``F << tau`` and is ~1 for
  every task of a real fit.
* :func:`effective_parameters` ``gamma_t = sum_i F_ti / (F_ti + tau_i)``: how many coordinates the
  task's own data determine (each counts 0..1).
* :func:`delta_w_ratio` ``||B_t A_t - Theta_B Theta_A||_F / ||Theta_B Theta_A||_F`` over all modules:
  how far the task's weight update is from the global one, relative to the global update's size;
  independent of how ``Delta W`` splits into ``B`` and ``A``.
* :func:`gain_kept` ``(nll_base - nll_fit) / (nll_base - nll_indep)`` per task: the fraction of
  the independent fit's held-out gain the task keeps (function space; needs an independent fit).

With several posterior draws of (adapters, tau), every summary is computed per draw; the Fisher
is computed once, at the point estimate, so ``pooling_factor`` and ``effective_parameters`` vary
only through tau (a fit with a point estimate of tau gives them zero-width intervals), while
``delta_w_ratio`` varies with the adapters. :func:`task_table` reports means and HDIs.

**InferenceData layout.** Dimensions ``chain``, ``draw``, ``task``, ``module`` (adapter keys such
as ``model_layers_3_self_attn_q_proj``). ``posterior``: ``pooling_factor``,
``effective_parameters``, ``delta_w_ratio`` ``[.., task]``, ``delta_w_module`` ``[.., task,
module]`` (the ratio per module), ``tau`` (``[chain, draw]``, or ``[chain, draw, module]`` with
one tau per module), ``shrinkage`` ``[.., task]`` and ``shrinkage_module`` ``[.., task, module]``
(coordinate-averaged factors), ``deviation`` ``[.., task, module]`` (Frobenius norm of ``theta_t -
Theta`` over A and B together; not gauge invariant), ``deviation_total`` ``[.., task]``,
``global_norm`` ``[.., module]`` and ``global_norm_total`` (``||Theta||``). ``constant_data``:
``train_docs``, ``train_tokens``, ``fisher`` ``[task]`` (mean over coordinates), ``fisher_module``
``[task, module]``, ``fisher_docs`` (documents used per task) and ``coords_per_module``. A fit
whose posterior samples are all its point estimate (MAP) contributes one draw (``chain=1,
draw=1``); otherwise ``draws`` samples of :meth:`bora.api.Bora.posterior` (the same samples as
``bora evaluate --samples`` with that seed). The reference ``Theta`` is the global adapter, except
for ``independent`` fits (``tau = 0``, ``pooling_factor = 0``), which have none: there deviations
are measured from the mean of the task adapters (mean ``Delta W`` for ``delta_w_ratio``;
``attrs["reference"] == "task_mean"``). ``shared`` fits (``tau = inf``) have no task adapters:
``pooling_factor = 1``, ``effective_parameters = 0`` and deviations 0.
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
    "pooling_factor",
    "effective_parameters",
    "precision_sums",
    "delta_w_ratio",
    "delta_w_sq_distances",
    "gain_kept",
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


def _scalar(x) -> float:
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


def _taus_for(tau, key: str, n: int) -> list[float]:
    """``n`` prior precisions for the ``n`` tensors of ``key`` from a scalar, ``{key: scalar}`` or ``{key: (t_1, ..)}``."""
    t = tau[key] if isinstance(tau, Mapping) else tau
    if isinstance(t, (tuple, list)):
        if len(t) != n:
            raise ValueError(f"tau for {key!r} has {len(t)} entries for {n} tensors")
        out = [_scalar(v) for v in t]
    else:
        out = [_scalar(t)] * n
    if any(v < 0 or math.isnan(v) for v in out):
        raise ValueError("tau must be >= 0")
    return out


def precision_sums(fisher: Mapping[str, Sequence[torch.Tensor]], tau) -> tuple[np.ndarray, np.ndarray]:
    """``(gamma [T], R [T])``: per task ``sum_i r_ti / (1 + r_ti)`` and ``sum_i r_ti``, ``r_ti = F_ti / tau_i``.

    ``fisher`` maps a key to a tuple of tensors ``[T, ...]`` (the task-level coordinates of that
    module, e.g. ``(F_A, F_B)``, or only ``(F_B,)``); ``tau`` is a scalar, ``{key: scalar}`` or
    ``{key: (tau per tensor)}``. ``tau = 0`` gives ``r = inf`` (a coordinate with data counts 1 in
    ``gamma``; without data 0), ``tau = inf`` gives ``r = 0``. Summed in float64.
    """
    gamma = R = None
    for key, Fs in fisher.items():
        Fs = tuple(Fs)
        for F, t in zip(Fs, _taus_for(tau, key, len(Fs))):
            F = F.detach().double().flatten(1)
            if torch.any(F < 0):
                raise ValueError("the Fisher information must be >= 0")
            if t == 0.0:
                g = (F > 0).double().sum(1)
                r = torch.where(F > 0, torch.full_like(F, math.inf), torch.zeros_like(F)).sum(1)
            elif math.isinf(t):
                g = r = torch.zeros(F.shape[0], dtype=torch.float64, device=F.device)
            else:
                ratio = F / t
                g, r = (ratio / (1.0 + ratio)).sum(1), ratio.sum(1)
            gamma = g if gamma is None else gamma + g
            R = r if R is None else R + r
    if gamma is None:
        raise ValueError("fisher is empty")
    return gamma.cpu().numpy(), R.cpu().numpy()


def pooling_factor(fisher: Mapping[str, Sequence[torch.Tensor]], tau) -> np.ndarray:
    """Fisher-weighted pooling factor per task, ``lambda^F_t = sum_i F_ti lambda_ti / sum_i F_ti`` ``[T]``.

    ``lambda_ti = tau_i / (tau_i + F_ti)`` is coordinate ``i``'s shrinkage factor. Weighting by the
    precision ratio ``r_ti = F_ti / tau_i`` (the same weights when one tau covers every coordinate)
    makes it invariant to reparameterising ``A -> cA, B -> B/c``; it equals ``gamma_t / sum_i r_ti``
    (:func:`effective_parameters`). 1: the task's well-determined directions are pulled all the way
    to the global adapter; 0: its own data decide. ``tau = inf`` or no data gives 1, ``tau = 0`` 0.
    Arguments as for :func:`precision_sums`.

    >>> import torch
    >>> F = {"m": (torch.tensor([[0.0, 10.0, 90.0]]),)}          # one task, three coordinates
    >>> pooling_factor(F, 10.0).round(4).tolist()                # (10 * 0.5 + 90 * 0.1) / 100
    [0.14]
    """
    return _pooling_from_sums(*precision_sums(fisher, tau))


def _pooling_from_sums(gamma: np.ndarray, R: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        lam = gamma / R
    lam = np.where(R == 0, 1.0, lam)  # no data, or tau = inf: the prior decides
    return np.where(np.isinf(R), 0.0, lam)  # tau = 0: independent


def effective_parameters(fisher: Mapping[str, Sequence[torch.Tensor]], tau) -> np.ndarray:
    """Effective number of task-level parameters, ``gamma_t = sum_i F_ti / (F_ti + tau_i)`` ``[T]``.

    Each coordinate counts between 0 (determined by the prior: pooled) and 1 (determined by the
    task's data); the sum is the number of directions in which the task's own data outweigh the
    prior (the trace of the hat matrix in the normal-normal model). Gauge invariant.

    >>> import torch
    >>> effective_parameters({"m": (torch.tensor([[0.0, 10.0, 90.0]]),)}, 10.0).round(4).tolist()  # 0 + .5 + .9
    [1.4]
    """
    return precision_sums(fisher, tau)[0]


def _expand_task(x: torch.Tensor, T: int) -> torch.Tensor:
    return x.expand(T, *x.shape[-2:]) if x.dim() == 2 else x


def delta_w_sq_distances(adapters: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                         reference: Optional[Mapping[str, tuple[torch.Tensor, torch.Tensor]]] = None,
                         ) -> tuple[np.ndarray, np.ndarray]:
    """``(d2 [T, M], g2 [M])``: ``||B_t A_t - Theta_B Theta_A||_F^2`` per task and module, and ``||Theta_B Theta_A||_F^2``.

    ``adapters``: ``key -> (A, B)`` with ``A [T, r, in]`` or ``[r, in]`` (shared by the tasks) and
    ``B [T, out, r]`` or ``[out, r]`` (at least one with a task dim); ``reference``: the global
    adapter ``key -> (Theta_A [r, in], Theta_B [out, r])``, or ``None`` for the mean of the tasks'
    ``Delta W_t``. Computed in float64 through ``r x r`` Gram matrices (``||BA||^2 = tr(B^T B A
    A^T)``), never forming ``out x in`` matrices. Depends on ``A``, ``B`` only through ``BA``.
    """
    d2s, g2s = [], []
    for key, (A, B) in adapters.items():
        A, B = A.detach().double(), B.detach().double()
        T = A.shape[0] if A.dim() == 3 else B.shape[0]
        if A.dim() == 2 and B.dim() == 2:
            raise ValueError(f"{key}: no task dimension (a shared adapter has no task deviations)")
        A, B = _expand_task(A, T), _expand_task(B, T)
        if reference is not None:
            GA, GB = (x.detach().double().to(A.device) for x in reference[key])
            C = torch.cat([B, -GB.expand(T, *GB.shape)], -1)  # [T, out, 2r]
            D = torch.cat([A, GA.expand(T, *GA.shape)], -2)  # [T, 2r, in]
            d2 = ((C.transpose(-1, -2) @ C) * (D @ D.transpose(-1, -2))).sum((-1, -2))
            g2 = ((GB.T @ GB) * (GA @ GA.T)).sum()
        else:  # the mean of the tasks' Delta W: inner products <B_t A_t, B_s A_s> = tr((B_t^T B_s)(A_s A_t^T))
            P = torch.einsum("tor,sop->tsrp", B, B)
            Q = torch.einsum("tri,spi->tsrp", A, A)
            K = (P * Q).sum((-1, -2))  # [T, T]
            g2 = K.mean()
            d2 = K.diagonal() - 2 * K.mean(1) + g2
        d2s.append(d2.clamp_min(0.0).cpu().numpy())
        g2s.append(float(g2))
    return np.stack(d2s, axis=1), np.asarray(g2s)


def delta_w_ratio(adapters: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                  reference: Optional[Mapping[str, tuple[torch.Tensor, torch.Tensor]]] = None) -> np.ndarray:
    """Relative deviation of each task's weight update from the global one, over every module ``[T]``.

    ``sqrt(sum_m ||B_tm A_tm - Theta_Bm Theta_Am||_F^2) / sqrt(sum_m ||Theta_Bm Theta_Am||_F^2)``:
    0 means the task's ``Delta W`` equals the global ``Delta W``; 1 that it differs by as much as the
    global update itself. Independent of how ``Delta W`` splits into ``B`` and ``A`` (LoRA's
    ``alpha / r`` scale cancels). Arguments as for :func:`delta_w_sq_distances`.

    >>> import torch
    >>> G = {"m": (torch.eye(2), torch.eye(2))}                                 # Theta_B Theta_A = I
    >>> task = {"m": (torch.eye(2)[None], torch.diag(torch.tensor([1.0, 1.5]))[None])}
    >>> delta_w_ratio(task, G).round(4).tolist()                                # ||diag(0, .5)|| / ||I||
    [0.3536]
    """
    d2, g2 = delta_w_sq_distances(adapters, reference)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.sqrt(d2.sum(1)) / math.sqrt(g2.sum())


def gain_kept(nll_base, nll_fit, nll_indep) -> np.ndarray:
    """Fraction of the independent fit's held-out gain that a task keeps: ``(base - fit) / (base - indep)``.

    Per task (elementwise, broadcasting): held-out NLL per token of the base model, of this fit and of
    an independent fit (one adapter per task, no pooling) on the same documents. 1: pooling kept the
    whole gain of fitting the task alone; 0: the task does no better than the base model; above 1:
    pooling helped beyond the independent fit. NaN where the independent fit does not improve on
    the base model (no gain to keep). Function-space, hence gauge invariant.

    >>> gain_kept([4.0, 4.0, 4.0], [3.5, 3.0, 2.9], [3.0, 3.0, 4.0]).tolist()
    [0.5, 1.0, nan]
    """
    b, f, i = (np.asarray(x, dtype=np.float64) for x in (nll_base, nll_fit, nll_indep))
    den = b - i
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, (b - f) / den, np.nan)


def fisher_means(fisher: Mapping[str, tuple[torch.Tensor, torch.Tensor]], keys: Sequence[str]
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(overall [T], per_module [T, M], coords [M])``: the per-task Fisher averaged over coordinates.

    ``fisher`` maps adapter key -> ``(F_A [T, r, in], F_B [T, out, r])`` (:class:`bora.fisher.TaskFisher`),
    or any tuple of ``[T, ...]`` tensors (the task-level coordinates of that module).
    """
    sums, counts = [], []
    for k in keys:
        Fs = tuple(fisher[k])
        sums.append(sum(F.double().flatten(1).sum(1) for F in Fs).cpu().numpy())
        counts.append(sum(F[0].numel() for F in Fs))
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
                      pooling_factor: Optional[np.ndarray] = None, effective_parameters: Optional[np.ndarray] = None,
                      delta_w_ratio: Optional[np.ndarray] = None, delta_w_module: Optional[np.ndarray] = None,
                      attrs: Optional[dict] = None) -> az.InferenceData:
    """Assemble the InferenceData from per-draw arrays (leading dim: draws ``S``, one chain).

    ``tau`` is ``[S, M]`` (per-module prior precision); ``deviation`` ``[S, T, M]``,
    ``global_norm`` ``[S, M]``; the Fisher arrays and task sizes are per task (``[T]``,
    ``[T, M]``). The coordinate-averaged shrinkage factors are computed here with :func:`shrinkage`.
    The per-task pooling summaries (:func:`pooling_factor`, :func:`effective_parameters`,
    :func:`delta_w_ratio` ``[S, T]``, and the per-module ``delta_w_module`` ``[S, T, M]``) are
    stored when given.
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
    for name, arr, shape in (("pooling_factor", pooling_factor, (S, T)),
                             ("effective_parameters", effective_parameters, (S, T)),
                             ("delta_w_ratio", delta_w_ratio, (S, T)), ("delta_w_module", delta_w_module, (S, T, M))):
        if arr is not None:
            arr = np.asarray(arr, dtype=np.float64)
            if arr.shape != shape:
                raise ValueError(f"{name} has shape {arr.shape}, expected {shape}")
            post[name] = arr[None]
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
            "pooling_factor": ["task"], "effective_parameters": ["task"], "delta_w_ratio": ["task"],
            "delta_w_module": ["task", "module"],
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

    For each of ``pooling_factor``, ``effective_parameters``, ``delta_w_ratio`` (when present),
    ``shrinkage`` and ``deviation_total``: the posterior mean (the point estimate for a single-draw
    MAP fit) and ``*_lo`` / ``*_hi``, its ``hdi_prob`` HDI over the draws (equal to the mean when
    there is a single draw).
    """
    post, const = idata.posterior, idata.constant_data
    n_draws = post.sizes["chain"] * post.sizes["draw"]
    out = {"task": [str(t) for t in post["task"].values], "draws": int(n_draws), "hdi_prob": hdi_prob,
           "train_docs": const["train_docs"].values.tolist(), "train_tokens": const["train_tokens"].values.tolist(),
           "fisher": const["fisher"].values.tolist()}
    for var in ("pooling_factor", "effective_parameters", "delta_w_ratio", "shrinkage", "deviation_total"):
        if var not in post:
            continue
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


def summary(idata: az.InferenceData, var_names=("tau", "pooling_factor", "effective_parameters", "delta_w_ratio",
                                                "shrinkage", "deviation_total", "global_norm_total"),
            hdi_prob: float = 0.94):
    """``az.summary`` of the compact variables (statistics only for a single-draw MAP fit)."""
    n_draws = idata.posterior.sizes["chain"] * idata.posterior.sizes["draw"]
    var_names = [v for v in var_names if v in idata.posterior]
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
        taus = {name: float(values[name]) for name in groups if name in values}
        yield values, (taus or fallback)


def inference_data(bora, fisher, *, train=None, draws: int = 200, seed: int = 0,
                   progress: bool = False) -> az.InferenceData:
    """InferenceData of a fit given its :class:`~bora.fisher.TaskFisher` (see the module docstring)."""
    model = bora.model
    keys = list(model.shapes)
    mode = bora.config.prior.tau_mode
    F, F_mod, coords = fisher_means(fisher.fisher, keys)
    taus, devs, globs, pools, gammas, dws, dw_mods = [], [], [], [], [], [], []
    pool_cache: dict = {}
    n_draws = 0
    for values, tau_vals in _draw_site_values(bora, draws, seed, progress):
        n_draws += 1
        params = model.params_from_values(values)
        glob = model.global_from_values(values)
        d, g = adapter_norms(params, glob, keys, model.num_tasks)
        tau_m = tau_per_module(mode, keys, tau_vals, bora.config.prior.tau)
        taus.append(tau_m)
        devs.append(d)
        globs.append(g)
        ck = tuple(tau_m.tolist())
        if ck not in pool_cache:  # the Fisher is fixed: the pooling summaries change only with tau
            tau_key = {k: float(t) for k, t in zip(keys, tau_m)}
            gam, R = precision_sums(fisher.fisher, tau_key)
            pool_cache[ck] = (_pooling_from_sums(gam, R), gam)
        pools.append(pool_cache[ck][0])
        gammas.append(pool_cache[ck][1])
        if model.has_tasks:
            d2, g2 = delta_w_sq_distances(params, glob)
            with np.errstate(divide="ignore", invalid="ignore"):
                dws.append(np.sqrt(d2.sum(1)) / math.sqrt(g2.sum()))
                dw_mods.append(np.sqrt(d2) / np.sqrt(g2)[None])
        else:  # shared: every task uses the global adapter
            dws.append(np.zeros(model.num_tasks))
            dw_mods.append(np.zeros((model.num_tasks, len(keys))))
    if train is not None and not hasattr(train, "task_tokens"):
        train = getattr(train, "split", None)
    docs = fisher.sizes.numpy() if train is None else train.task_sizes().numpy()
    tokens = (np.full(model.num_tasks, -1) if train is None else train.task_tokens().numpy())
    per_module = mode == "learned" and bora.config.prior.tau_per_module
    attrs = {"tau_mode": mode, "guide": bora.config.fit.guide, "model": bora.config.model,
             "reference": {"independent": "task_mean", "shared": "none"}.get(mode, "global"),
             "draws_from": "posterior" if n_draws > 1 else "point_estimate",
             "tau_per_module": int(per_module)}
    return to_inference_data(tasks=bora.tasks, modules=keys, tau=np.stack(taus), deviation=np.stack(devs),
                             global_norm=np.stack(globs), fisher=F, fisher_module=F_mod, coords_per_module=coords,
                             train_docs=docs, train_tokens=tokens, fisher_docs=fisher.used.numpy(),
                             tau_per_module=per_module, pooling_factor=np.stack(pools),
                             effective_parameters=np.stack(gammas), delta_w_ratio=np.stack(dws),
                             delta_w_module=np.stack(dw_mods), attrs=attrs)


def diagnose(bora, *, train=None, fisher_docs: Optional[int] = None, draws: int = 200, seed: int = 0,
             progress: bool = False) -> az.InferenceData:
    """Fisher pass on the training split, then :func:`inference_data` (one call from a fit)."""
    from .feed import Feed

    train = _train_split(bora, train)
    split = train.split if isinstance(train, Feed) else train
    fisher = compute_fisher(bora, train, fisher_docs=fisher_docs, seed=seed, progress=progress)
    return inference_data(bora, fisher, train=split, draws=draws, seed=seed, progress=progress)
