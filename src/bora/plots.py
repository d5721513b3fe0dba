"""Headless PNG plots of a fit's diagnostics; every function only draws the plain data it is given.

>>> import tempfile, os
>>> from bora.plots import perplexity_bars
>>> d = tempfile.mkdtemp()
>>> p = perplexity_bars(["a", "b"], [30.0, 25.0], [20.0, 24.0], os.path.join(d, "ppl.png"))
>>> os.path.getsize(p) > 0
True

The numbers come from :mod:`bora.diagnostics` (``task_table``, the InferenceData) and from the
fit's history and metrics; :mod:`bora.report` puts them together. Each function writes one PNG
to ``path`` and returns ``path``. The Agg backend is selected on import, so no display is needed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["shrinkage_forest", "shrinkage_vs_size", "tau_plot", "training_curve", "perplexity_bars",
           "deviation_heatmap"]

_DPI = 110


def _save(fig, path) -> str:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=_DPI, bbox_inches="tight")
    plt.close(fig)
    return str(path)


def _height(n: int, per: float = 0.32, base: float = 1.6) -> float:
    return max(3.0, base + per * n)


def _note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=11,
            bbox=dict(boxstyle="round", facecolor="#f3f3f3", edgecolor="#888888"))


def shrinkage_forest(tasks: Sequence[str], mean: Sequence[float], lo: Sequence[float], hi: Sequence[float],
                     path, *, sizes: Optional[Sequence[int]] = None, hdi_prob: Optional[float] = None,
                     title: str = "Per-task shrinkage factor") -> str:
    """Forest plot: one row per task, the point/mean shrinkage and (when ``lo < hi``) its HDI."""
    T = len(tasks)
    fig, ax = plt.subplots(figsize=(7.0, _height(T)))
    y = np.arange(T)[::-1]
    mean, lo, hi = (np.asarray(v, dtype=float) for v in (mean, lo, hi))
    err = np.vstack([mean - lo, hi - mean])
    has_interval = bool(np.any(hi - lo > 0))
    ax.errorbar(mean, y, xerr=err if has_interval else None, fmt="o", color="C0", ecolor="C0",
                elinewidth=2, capsize=3, label=(f"{int(round(100 * hdi_prob))}% HDI" if has_interval and hdi_prob
                                               else None))
    labels = [f"{t} (n={n})" for t, n in zip(tasks, sizes)] if sizes is not None else list(tasks)
    ax.set_yticks(y, labels)
    ax.set_xlim(-0.03, 1.03)
    ax.axvline(0.0, color="#bbbbbb", lw=0.8)
    ax.axvline(1.0, color="#bbbbbb", lw=0.8)
    ax.set_xlabel("shrinkage  λ = τ / (τ + F)   (0: own data only, 1: global adapter)")
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    if has_interval and hdi_prob:
        ax.legend(loc="best", fontsize=8)
    return _save(fig, path)


def shrinkage_vs_size(tasks: Sequence[str], sizes: Sequence[float], mean: Sequence[float], path, *,
                      lo: Optional[Sequence[float]] = None, hi: Optional[Sequence[float]] = None,
                      rho: float = math.nan, xlabel: str = "training tokens (log scale)") -> str:
    """Shrinkage against task size on a log x-axis, points labelled, Spearman's rho in the title."""
    fig, ax = plt.subplots(figsize=(7.0, 4.8))
    x = np.asarray(sizes, dtype=float)
    m = np.asarray(mean, dtype=float)
    if lo is not None and hi is not None and np.any(np.asarray(hi) - np.asarray(lo) > 0):
        ax.errorbar(x, m, yerr=np.vstack([m - np.asarray(lo), np.asarray(hi) - m]), fmt="none",
                    ecolor="C0", alpha=0.5, capsize=2)
    ax.scatter(x, m, color="C0", zorder=3)
    for xi, yi, t in zip(x, m, tasks):
        ax.annotate(str(t).rsplit("/", 1)[-1], (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if np.all(x > 0):
        ax.set_xscale("log")
    ylo = np.nanmin(np.asarray(lo, dtype=float)) if lo is not None else np.nanmin(m)
    yhi = np.nanmax(np.asarray(hi, dtype=float)) if hi is not None else np.nanmax(m)
    if np.isfinite(ylo) and np.isfinite(yhi) and yhi - ylo < 0.2:  # zoom in on a narrow band
        pad = 0.15 * (yhi - ylo) + 1e-4
        ax.set_ylim(max(-0.03, ylo - pad), min(1.03, yhi + pad))
    else:
        ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("shrinkage λ")
    r = "n/a" if rho is None or not math.isfinite(rho) else f"{rho:+.2f}"
    ax.set_title(f"Shrinkage vs task size (Spearman ρ = {r})")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def tau_plot(tau: np.ndarray, path, *, modules: Optional[Sequence[str]] = None, mode: str = "",
             history_steps: Optional[Sequence[int]] = None, history_tau: Optional[np.ndarray] = None) -> str:
    """tau's point estimate (bars) or posterior draws (histogram density), ``tau`` ``[S]`` or ``[S, M]``.

    Non-finite or zero tau (shared / independent fits) is stated in words.
    """
    tau = np.asarray(tau, dtype=float)
    if tau.ndim == 1:
        tau = tau[:, None]
    S, M = tau.shape
    names = list(modules) if (modules is not None and M > 1) else ["tau"] * M
    fig, ax = plt.subplots(figsize=(7.0, 4.2 if M <= 8 else _height(M, 0.25)))
    if not np.all(np.isfinite(tau)) or np.all(tau == 0):
        v = tau.flat[0]
        what = {"shared": "shared adapter (tau = inf: every task uses the global adapter)",
                "independent": "independent adapters (tau = 0: no coupling between tasks)"}.get(mode, f"tau = {v}")
        _note(ax, what)
        ax.set_title(f"prior precision τ ({mode or 'fixed'})")
        ax.set_xticks([])
        ax.set_yticks([])
    elif S == 1:
        if M == 1:
            ax.bar([0], tau[0], color="C0", width=0.5)
            ax.set_xticks([0], ["τ"])
            ax.text(0, tau[0, 0], f"{tau[0, 0]:.4g}", ha="center", va="bottom")
            ax.set_xlim(-1, 1)
        else:
            y = np.arange(M)[::-1]
            ax.barh(y, tau[0], color="C0")
            ax.set_yticks(y, names, fontsize=7)
            ax.set_xscale("log")
            ax.set_xlabel("τ")
        ax.set_title(f"prior precision τ (point estimate, {mode})")
    else:
        for j in range(min(M, 12)):
            v = tau[:, j]
            bins = np.geomspace(v.min(), v.max(), 31) if v.min() > 0 and v.max() > 10 * v.min() else 30
            ax.hist(v, bins=bins, density=True, histtype="step" if M > 1 else "stepfilled",
                    alpha=0.9 if M > 1 else 0.6, label=names[j] if M > 1 else None)
        if tau.min() > 0 and tau.max() > 10 * tau.min():
            ax.set_xscale("log")
        ax.set_xlabel("τ")
        ax.set_ylabel("density")
        ax.set_title(f"posterior of τ ({S} draws, {mode})")
        if M > 1:
            ax.legend(fontsize=6)
    return _save(fig, path)


def training_curve(history: Sequence[dict], path) -> str:
    """Train NLL and validation perplexity against step (and tau, when the history has it)."""
    def series(key):
        pts = [(h["step"], h[key]) for h in history
               if isinstance(h.get(key), (int, float)) and math.isfinite(h[key])]
        return [p[0] for p in pts], [p[1] for p in pts]

    taus = [(h["step"], h["tau"]) for h in history if isinstance(h.get("tau"), dict) and h["tau"]]
    n = 3 if taus else 2
    fig, axes = plt.subplots(n, 1, figsize=(7.0, 2.6 * n), sharex=True)
    s, v = series("train_nll")
    if s:
        axes[0].plot(s, v, "o-", color="C0", label="train NLL (minibatch mean)")
    else:
        _note(axes[0], "no training NLL recorded")
    axes[0].set_ylabel("train NLL / token")
    axes[0].grid(alpha=0.3)
    s, v = series("val_ppl")
    if s:
        per = [(h["step"], h["val_ppl_per_task"]) for h in history if isinstance(h.get("val_ppl_per_task"), dict)]
        for t in (per[0][1] if per else {}):
            axes[1].plot([p[0] for p in per], [p[1].get(t, math.nan) for p in per], color="#bbbbbb", lw=0.8)
        axes[1].plot(s, v, "o-", color="C1", label="val perplexity (exp mean per-task NLL)")
        if per:
            axes[1].plot([], [], color="#bbbbbb", lw=0.8, label="per task")
        axes[1].legend(fontsize=8)
    else:
        _note(axes[1], "no validation recorded")
    axes[1].set_ylabel("val perplexity")
    axes[1].grid(alpha=0.3)
    if taus:
        names = list(taus[0][1])
        for name in names[:12]:
            axes[2].plot([t[0] for t in taus], [t[1].get(name, math.nan) for t in taus], "o-",
                         label=name if len(names) > 1 else "τ")
        axes[2].set_yscale("log")
        axes[2].set_ylabel("τ")
        axes[2].legend(fontsize=6)
        axes[2].grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    axes[0].set_title("Training curve")
    return _save(fig, path)


def perplexity_bars(tasks: Sequence[str], base: Sequence[float], fit: Sequence[float], path, *,
                    split: str = "test") -> str:
    """Per-task perplexity of the base model and the fit, side by side."""
    T = len(tasks)
    fig, ax = plt.subplots(figsize=(7.0, _height(T, 0.42)))
    y = np.arange(T)[::-1]
    h = 0.38
    ax.barh(y + h / 2, base, height=h, color="#999999", label="base model")
    ax.barh(y - h / 2, fit, height=h, color="C2", label="fit")
    for yi, b, f in zip(y, base, fit):
        if b and math.isfinite(b) and math.isfinite(f):
            ax.text(f, yi - h / 2, f" {100 * (f / b - 1):+.1f}%", va="center", fontsize=7)
    ax.set_yticks(y, list(tasks))
    ax.set_xlabel(f"{split} perplexity")
    ax.set_title(f"Per-task {split} perplexity: base model vs fit")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_xlim(0, 1.12 * max([v for v in list(base) + list(fit) if math.isfinite(v)] or [1.0]))
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def deviation_heatmap(tasks: Sequence[str], modules: Sequence[str], deviation: np.ndarray, path, *,
                      title: str = "‖θ_t − Θ‖ per task and module") -> str:
    """Heat map of the per-task deviation norms ``[T, M]``."""
    d = np.asarray(deviation, dtype=float)
    T, M = d.shape
    fig, ax = plt.subplots(figsize=(max(6.0, 1.5 + 0.22 * M), _height(T, 0.3, 2.4)))
    im = ax.imshow(d, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(np.arange(T), list(tasks), fontsize=8)
    short = [m.replace("model_layers_", "L").replace("_self_attn_", ".").replace("_mlp_", ".") for m in modules]
    ax.set_xticks(np.arange(M), short, rotation=90, fontsize=6)
    fig.colorbar(im, ax=ax, label="Frobenius norm (A and B)")
    ax.set_title(title)
    return _save(fig, path)
