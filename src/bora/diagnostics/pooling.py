"""Per-task pooling summaries: how much each task is pooled toward the global adapter (pure functions).

>>> import torch
>>> from bora.diagnostics.pooling import effective_parameters, pooling_factor
>>> F = {"q_proj": (torch.tensor([[0.0, 10.0, 90.0], [1.0, 1.0, 1.0]]),)}   # Fisher [task, coordinate]
>>> pooling_factor(F, tau=10.0).round(3).tolist()        # Fisher-weighted tau / (tau + F)
[0.14, 0.909]
>>> effective_parameters(F, tau=10.0).round(3).tolist()  # sum F / (F + tau): 0 + .5 + .9, 3 x 1/11
[1.4, 0.273]

**The summaries** (the headline of :mod:`bora.diagnostics.inference_data`; each a pure function, each unchanged under
the
reparameterisation ``A -> cA, B -> B/c`` when the Fisher and tau transform with it, and each
checked against the normal-normal closed form in tests/test_pooling.py). ``F_ti`` is the
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
* :func:`identified_delta_w` the same ratio restricted to the coordinates the task's data determine
  (``F_ti > tau_i``, i.e. ``lambda_ti < 1/2``; hierarchy 'B'): ``||(M_t * (B_t - Theta_B)) A|| / ||Theta_B A||``.
  The coordinates the data do not inform sit at the prior's spread around ``Theta_B`` in every
  posterior draw, so the full ratio of a draw is mostly prior noise (about the same for every task);
  the masked one is the part of the deviation the data speak to, and its posterior interval means
  something.
* :func:`gain_kept` ``(nll_base - nll_fit) / (nll_base - nll_indep)`` per task: the fraction of
  the independent fit's held-out gain the task keeps (function space; needs an independent fit).

Also here: :func:`shrinkage` (the coordinate-averaged factor), :func:`fisher_means`,
:func:`adapter_norms`, :func:`tau_per_module` and :func:`spearman`. :mod:`bora.diagnostics.inference_data` computes
them per posterior draw of a fit and stores them as ArviZ data.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import numpy as np
import torch

from ..core.coupling import coupling_of

__all__ = ["pooling_factor", "effective_parameters", "precision_sums", "pooling_from_sums", "delta_w_ratio",
           "delta_w_sq_distances", "identified_mask", "identified_delta_w", "gain_kept", "shrinkage", "fisher_means",
           "tau_per_module", "adapter_norms",
           "spearman"]


def shrinkage(tau, fisher_mean) -> np.ndarray:
    """``lambda = tau / (tau + F)`` elementwise (broadcasting), with the limits made exact.

    ``tau = inf`` gives 1 (shared), ``tau = 0`` gives 0 (uncoupled, also when ``F = 0``), and
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
    """``n`` prior precisions for the ``n`` tensors of ``key``: a scalar, ``{key: scalar}`` or ``{key: (t_1, ..)}``."""
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
    return pooling_from_sums(*precision_sums(fisher, tau))


def pooling_from_sums(gamma: np.ndarray, R: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        lam = gamma / R
    lam = np.where(R == 0, 1.0, lam)  # no data, or tau = inf: the prior decides
    return np.where(np.isinf(R), 0.0, lam)  # tau = 0: uncoupled


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
    """``(d2 [T, M], g2 [M])``: ``||B_t A_t - Theta_B Theta_A||_F^2`` per task and module; ``||Theta_B Theta_A||_F^2``.

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


def _tau_B(tau, key: str) -> float:
    """The prior precision of ``key``'s ``B`` coordinates: a scalar, ``{key: scalar}`` or ``{key: (.., tau_B)}``."""
    t = tau[key] if isinstance(tau, Mapping) else tau
    if isinstance(t, (tuple, list)):
        t = t[-1]
    t = _scalar(t)
    if t < 0 or math.isnan(t):
        raise ValueError("tau must be >= 0")
    return t


def _fisher_B(F) -> torch.Tensor:
    return F[-1] if isinstance(F, (tuple, list)) else F


def identified_mask(fisher: Mapping[str, object], tau) -> dict[str, torch.Tensor]:
    """``key -> M [T, out, r]`` (bool): the task-level ``B`` coordinates task ``t``'s own data determine.

    Coordinate ``i`` is identified when ``F_ti > tau_i``: the precision the task's data give it
    exceeds the prior's, i.e. its shrinkage factor ``lambda_ti = tau_i / (tau_i + F_ti) < 1/2``.
    ``fisher`` maps a key to ``F_B [T, out, r]`` or to a :class:`~bora.fit.fisher.TaskFisher` pair
    ``(F_A, F_B)`` (its ``F_B`` is used); ``tau`` is a scalar, ``{key: scalar}`` or ``{key: (tau_A,
    tau_B)}``. ``tau = inf`` identifies nothing, ``tau = 0`` every coordinate with ``F > 0``.

    >>> import torch
    >>> identified_mask({"m": torch.tensor([[[0.0, 5.0, 20.0]]])}, 10.0)["m"].tolist()
    [[[False, False, True]]]
    """
    out = {}
    for key, F in fisher.items():
        F = _fisher_B(F).detach()
        if torch.any(F < 0):
            raise ValueError("the Fisher information must be >= 0")
        out[key] = F > _tau_B(tau, key)
    return out


def identified_delta_w(adapters: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                       reference: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                       fisher: Mapping[str, object], tau, *, atol: float = 1e-6,
                       ) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """``(ratio [T], count [T])``: each task's ``Delta W`` deviation in the directions its own data identify.

    ``ratio_t = sqrt(sum_m ||(M_tm * (B_tm - Theta_Bm)) Theta_Am||_F^2) / sqrt(sum_m ||Theta_Bm Theta_Am||_F^2)``
    with ``M_t`` the :func:`identified_mask` (``F_ti > tau_i``), and ``count_t`` the number of
    identified coordinates. The denominator is :func:`delta_w_ratio`'s. For hierarchy 'B' (every
    task uses the global ``A``, rows orthonormal) the masked ``B`` entries are coordinates of
    ``Delta W_t - Delta W`` in that basis, so ``tau = 0`` (every coordinate with data identified)
    gives :func:`delta_w_ratio` and ``tau = inf`` gives 0. Computed in float64 through ``r x r`` Gram
    matrices, as :func:`delta_w_sq_distances`.

    ``adapters``: ``key -> (A, B [T, out, r])`` with ``A`` the shared ``[r, in]`` (or it expanded to
    ``[T, r, in]``); ``reference``: ``key -> (Theta_A, Theta_B)``; ``fisher``, ``tau`` as for
    :func:`identified_mask`. Returns ``None`` when a task's ``A`` differs from ``Theta_A`` (beyond
    ``atol``; hierarchy 'AB'): then the deviation has an ``A`` part the ``B`` mask does not cover.

    >>> import torch
    >>> G = {"m": (torch.eye(2), torch.eye(2))}                               # Theta_B Theta_A = I
    >>> task = {"m": (torch.eye(2), torch.tensor([[[1.0, 0.3], [0.4, 1.5]]]))}  # deviation [[0, .3], [.4, .5]]
    >>> F = {"m": torch.tensor([[[0.0, 1.0], [20.0, 50.0]]])}                 # the data inform the second row
    >>> ratio, count = identified_delta_w(task, G, F, tau=10.0)               # ||[[0, 0], [.4, .5]]|| / ||I||
    >>> ratio.round(4).tolist(), count.tolist()
    ([0.4528], [2])
    """
    masks = identified_mask(fisher, tau)
    num, den, count = None, 0.0, None
    for key, (A, B) in adapters.items():
        GA, GB = (x.detach().double() for x in reference[key])
        A, B = A.detach().double().to(GA.device), B.detach().double().to(GA.device)
        if A.dim() == 3 and not torch.allclose(A, GA.expand_as(A), rtol=0.0, atol=atol):
            return None  # task-level A (hierarchy 'AB')
        if B.dim() != 3:
            raise ValueError(f"{key}: B has no task dimension (a shared adapter has no task deviations)")
        M = masks[key].to(B.device)
        if M.shape != B.shape:
            raise ValueError(f"{key}: Fisher of shape {tuple(M.shape)} for B of shape {tuple(B.shape)}")
        D = torch.where(M, B - GB, torch.zeros_like(B))  # [T, out, r]
        gram_A = GA @ GA.T  # [r, r]
        d2 = ((D.transpose(-1, -2) @ D) * gram_A).sum((-1, -2)).clamp_min(0.0)
        num = d2 if num is None else num + d2
        den += float(((GB.T @ GB) * gram_A).sum())
        c = M.flatten(1).sum(1)
        count = c if count is None else count + c
    if num is None:
        raise ValueError("adapters is empty")
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.sqrt(num.cpu().numpy()) / math.sqrt(den)
    return ratio, count.cpu().numpy().astype(np.int64)


def gain_kept(nll_base, nll_fit, nll_indep) -> np.ndarray:
    """Fraction of the independent fit's held-out gain that a task keeps: ``(base - fit) / (base - indep)``.

    Per task (elementwise, broadcasting): held-out NLL per token of the base model, of this fit and of
    an independent fit (each task fitted alone: per-task LoRA, or the 'uncoupled' limit) on the same
    documents. 1: pooling kept the
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

    ``fisher`` maps adapter key -> ``(F_A [T, r, in], F_B [T, out, r])`` (:class:`bora.fit.fisher.TaskFisher`),
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


def tau_per_module(tau_mode, keys: Sequence[str], tau_values: Mapping[str, float],
                   fixed_tau: Optional[float] = None) -> np.ndarray:
    """Prior precision of every module ``[M]`` from a tau estimate (``{"tau": v}`` or ``{"tau:<key>": v}``).

    ``tau_mode``: a :class:`~bora.core.coupling.Coupling` or its name
    (:meth:`bora.core.coupling.Coupling.tau_per_module`).

    >>> tau_per_module("shared", ["q", "v"], {}).tolist(), tau_per_module("learned", ["q"], {"tau": 3.0}).tolist()
    ([inf, inf], [3.0])
    """
    coupling = coupling_of(tau_mode) if isinstance(tau_mode, str) else tau_mode
    return coupling.tau_per_module(keys, tau_values, fixed_tau)


def adapter_norms(params: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                  global_params: Optional[Mapping[str, tuple[torch.Tensor, torch.Tensor]]],
                  keys: Sequence[str], num_tasks: int) -> tuple[np.ndarray, np.ndarray]:
    """``(deviation [T, M], global_norm [M])``: ``||theta_t - Theta||`` and ``||Theta||`` per module.

    ``params`` holds task adapters ``(A [T, r, in], B [T, out, r])``, or a single shared adapter
    (``[r, in]``, ``[out, r]``; deviations are then 0). Without ``global_params`` (uncoupled
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


def spearman(x, y) -> float:
    """Spearman rank correlation (average ranks for ties); NaN when undefined (< 3 points or a constant)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    from scipy.stats import rankdata

    rx, ry = rankdata(x), rankdata(y)
    return float(np.corrcoef(rx, ry)[0, 1])
