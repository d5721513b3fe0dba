"""Headless PNG plots of a fit's diagnostics; every function only draws the data it is given.

>>> import tempfile, os
>>> from bora.diagnostics.plots import perplexity_bars
>>> d = tempfile.mkdtemp()
>>> p = perplexity_bars(["a", "b"], [30.0, 25.0], [20.0, 24.0], os.path.join(d, "ppl.png"))
>>> os.path.getsize(p) > 0
True

The numbers come from :mod:`bora.diagnostics.inference_data` (the InferenceData and ``task_table``) and from the
fit's history and metrics; :mod:`bora.diagnostics.report` puts them together. Each function writes one PNG
to ``path`` and returns ``path``. Figures are :class:`matplotlib.figure.Figure` objects drawn
with the Agg canvas directly: importing this module does not select a matplotlib backend, no
display is needed, and nothing is left open in pyplot's figure registry.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from ..core.coupling import COUPLINGS

__all__ = ["pooling_forest", "shrinkage_vs_size", "tau_plot", "training_curve", "perplexity_bars",
           "deviation_heatmap", "FOREST_VARS"]

_DPI = 110

#: InferenceData variable -> (panel title, x-axis label) of the forest plot
FOREST_VARS = {
    "pooling_factor": ("pooling factor λᶠ", "Fisher-weighted τ/(τ+F)\n0: own data, 1: global"),
    "effective_parameters": ("effective parameters γ", "Σ F/(F+τ): coordinates\nset by the task's data"),
    "delta_w_ratio": ("ΔW deviation", "‖B_t A_t − Θ_B Θ_A‖ / ‖Θ_B Θ_A‖"),
    "delta_w_identified": ("identified ΔW deviation", "‖(M ⊙ (B_t − Θ_B)) A‖ / ‖Θ_B Θ_A‖\nM: coordinates with F > τ"),
}


def _figure(w: float, h: float) -> Figure:
    fig = Figure(figsize=(w, h))
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path) -> str:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # tight_layout's "not compatible" notes
        fig.tight_layout()
    fig.savefig(path, dpi=_DPI, bbox_inches="tight")
    fig.clear()
    return str(path)


def _height(n: int, per: float = 0.32, base: float = 1.6) -> float:
    return max(3.0, base + per * n)


def _note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=11,
            bbox=dict(boxstyle="round", facecolor="#f3f3f3", edgecolor="#888888"))


def _short(task) -> str:
    return str(task).rsplit("/", 1)[-1]


def forest_figure(idata, *, sizes: Optional[Sequence[float]] = None, hdi_prob: float = 0.94,
                  var_names: Sequence[str] = tuple(FOREST_VARS), title: str = "Per-task pooling") -> Figure:
    """The :func:`pooling_forest` figure (not saved): one ArviZ ``plot_forest`` panel per variable."""
    import arviz as az

    post = idata.posterior
    tasks = [str(t) for t in post["task"].values]
    names = [v for v in var_names if v in post]
    if sizes is None:
        sizes = idata.constant_data["train_tokens"].values if "train_tokens" in idata.constant_data else None
    order = list(range(len(tasks)))
    if sizes is not None:
        order = sorted(order, key=lambda i: -float(sizes[i]))  # largest task at the top
    labels = [f"{_short(tasks[i])} (n={int(sizes[i])})" if sizes is not None else _short(tasks[i]) for i in order]
    draws = post.sizes["chain"] * post.sizes["draw"]
    fig = _figure(3.1 * max(1, len(names)) + 1.6, _height(len(tasks), 0.3, 1.9))
    axes = np.atleast_1d(fig.subplots(1, max(1, len(names)), squeeze=False)[0])
    if not names:
        _note(axes[0], "no per-task pooling summaries in these diagnostics")
        return fig
    for j, (ax, var) in enumerate(zip(axes, names)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            az.plot_forest(idata, var_names=[var], coords={"task": [tasks[i] for i in order]}, combined=True,
                           hdi_prob=hdi_prob, ax=ax, textsize=8, markersize=5)
        ticks = ax.get_yticks()
        ax.set_yticks(ticks, labels[::-1] if j == 0 else [""] * len(ticks))  # plot_forest lists bottom-up
        t, xl = FOREST_VARS.get(var, (var, var))
        ax.set_title(t, fontsize=9)
        ax.set_xlabel(xl, fontsize=7)
        ax.tick_params(axis="x", labelsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(4))
        ax.grid(axis="x", alpha=0.3)
    note = f"{int(round(100 * hdi_prob))}% HDI over {draws} posterior draws" if draws > 1 else \
        "point estimate (one draw: no interval)"
    fig.suptitle(f"{title}: tasks by training size ({note})", fontsize=10)
    return fig


def pooling_forest(idata, path, *, sizes: Optional[Sequence[float]] = None, hdi_prob: float = 0.94,
                   var_names: Sequence[str] = tuple(FOREST_VARS), title: str = "Per-task pooling") -> str:
    """Forest plot of the per-task pooling summaries of a :func:`bora.diagnostics.inference_data.diagnose`
    InferenceData.

    One ``arviz.plot_forest`` panel per variable (default :data:`FOREST_VARS`), one row per task,
    tasks sorted by training size (``sizes``, default ``constant_data["train_tokens"]``; largest at
    the top), with the posterior mean and ``hdi_prob`` HDI (a single-draw MAP fit: points only).
    Variables missing from ``idata`` are left out (``delta_w_identified`` exists for hierarchy 'B'
    fits with a global adapter); the report draws the pooling factor, gamma and the identified
    deviation, whose intervals mean something, rather than the full ``delta_w_ratio``.
    """
    return _save(forest_figure(idata, sizes=sizes, hdi_prob=hdi_prob, var_names=var_names, title=title), path)


def _declutter(fig: Figure, ax, texts, iterations: int = 300) -> None:
    """Move annotation texts (offset-point annotations) apart vertically until none overlap."""
    if len(texts) < 2:
        return
    renderer = fig.canvas.get_renderer()
    to_pt = 72.0 / fig.dpi
    for _ in range(iterations):
        boxes = [t.get_window_extent(renderer).expanded(1.02, 1.1) for t in texts]
        moved = False
        for i in range(len(texts)):
            for j in range(i + 1, len(texts)):
                bi, bj = boxes[i], boxes[j]
                if not bi.overlaps(bj):
                    continue
                dy = (min(bi.y1, bj.y1) - max(bi.y0, bj.y0)) / 2 + 1.0
                up, down = (i, j) if (bi.y0 + bi.y1) >= (bj.y0 + bj.y1) else (j, i)
                for k, sign in ((up, 1.0), (down, -1.0)):
                    x, y = texts[k].xyann
                    texts[k].xyann = (x, y + sign * dy * to_pt)
                moved = True
                boxes = [t.get_window_extent(renderer).expanded(1.02, 1.1) for t in texts]
        if not moved:
            break
    for t in texts:  # a leader line where a label moved away from its point
        if abs(t.xyann[1] - 4.0) > 6.0:
            ax.annotate("", xy=t.xy, xytext=t.xyann, textcoords="offset points",
                        arrowprops=dict(arrowstyle="-", color="#999999", lw=0.6, shrinkA=0, shrinkB=2))


def _compact(v: float, _pos=None) -> str:
    if v <= 0 or not math.isfinite(v):
        return ""
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if v >= div:
            return f"{v / div:g}{suffix}"
    return f"{v:g}"


def size_figure(tasks: Sequence[str], sizes: Sequence[float], mean: Sequence[float], *,
                lo: Optional[Sequence[float]] = None, hi: Optional[Sequence[float]] = None,
                rho: float = math.nan, xlabel: str = "training tokens (log scale)",
                ylabel: str = "pooling factor λᶠ", what: str = "Pooling factor") -> Figure:
    """The :func:`shrinkage_vs_size` figure (not saved)."""
    fig = _figure(7.0, 4.8)
    ax = fig.subplots()
    x = np.asarray(sizes, dtype=float)
    m = np.asarray(mean, dtype=float)
    has_iv = lo is not None and hi is not None and bool(np.any(np.asarray(hi) - np.asarray(lo) > 0))
    if has_iv:
        ax.errorbar(x, m, yerr=np.vstack([m - np.asarray(lo), np.asarray(hi) - m]), fmt="none",
                    ecolor="C0", alpha=0.5, capsize=2)
    ax.scatter(x, m, color="C0", zorder=3)
    if np.all(x > 0):
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0), numticks=12))
        ax.xaxis.set_major_formatter(FuncFormatter(_compact))
        ax.xaxis.set_minor_formatter(NullFormatter())
        span = np.log10(x.max() / x.min()) if len(x) else 0.0
        pad = 0.08 * max(span, 0.5)
        ax.set_xlim(x.min() / 10 ** pad, x.max() * 10 ** (pad + 0.12 * max(span, 0.5)))  # room for labels
    ylo = np.nanmin(np.asarray(lo, dtype=float)) if has_iv else np.nanmin(m)
    yhi = np.nanmax(np.asarray(hi, dtype=float)) if has_iv else np.nanmax(m)
    if np.isfinite(ylo) and np.isfinite(yhi):
        pad = 0.12 * (yhi - ylo) + 1e-4 * max(1.0, abs(yhi))
        ax.set_ylim(ylo - pad, yhi + 2 * pad)
    ax.yaxis.set_major_locator(MaxNLocator(6))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    r = "n/a" if rho is None or not math.isfinite(rho) else f"{rho:+.2f}"
    ax.set_title(f"{what} vs task size (Spearman ρ = {r})")
    ax.grid(alpha=0.3)
    texts = [ax.annotate(_short(t), (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=8)
             for xi, yi, t in zip(x, m, tasks)]
    _declutter(fig, ax, texts)
    return fig


def shrinkage_vs_size(tasks: Sequence[str], sizes: Sequence[float], mean: Sequence[float], path, *,
                      lo: Optional[Sequence[float]] = None, hi: Optional[Sequence[float]] = None,
                      rho: float = math.nan, xlabel: str = "training tokens (log scale)",
                      ylabel: str = "pooling factor λᶠ", what: str = "Pooling factor") -> str:
    """A per-task summary (the pooling factor) against task size on a log x-axis, Spearman's rho in the title.

    Points carry their task's name; labels that would overlap are moved apart (with a leader line
    back to the point), x ticks at 1-2-5 steps with compact labels (``20k``), the y range zoomed
    on the data (with the intervals ``lo`` / ``hi`` when given)."""
    return _save(size_figure(tasks, sizes, mean, lo=lo, hi=hi, rho=rho, xlabel=xlabel, ylabel=ylabel, what=what),
                 path)


def tau_plot(tau: np.ndarray, path, *, modules: Optional[Sequence[str]] = None, mode: str = "",
             history_steps: Optional[Sequence[int]] = None, history_tau: Optional[np.ndarray] = None) -> str:
    """tau's point estimate (bars) or posterior draws (histogram density), ``tau`` ``[S]`` or ``[S, M]``.

    Non-finite or zero tau (shared / uncoupled fits) is stated in words.
    """
    tau = np.asarray(tau, dtype=float)
    if tau.ndim == 1:
        tau = tau[:, None]
    S, M = tau.shape
    names = list(modules) if (modules is not None and M > 1) else ["tau"] * M
    fig = _figure(7.0, 4.2 if M <= 8 else _height(M, 0.25))
    ax = fig.subplots()
    if not np.all(np.isfinite(tau)) or np.all(tau == 0):
        v = tau.flat[0]
        limit = COUPLINGS[mode].description if mode in COUPLINGS else None
        what = limit or f"tau = {v}"
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
    fig = _figure(7.0, 2.6 * n)
    axes = fig.subplots(n, 1, sharex=True)
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
    fig = _figure(7.0, _height(T, 0.42))
    ax = fig.subplots()
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
                      title: str = "‖B_t A_t − Θ_B Θ_A‖ / ‖Θ_B Θ_A‖ per task and module",
                      label: str = "relative ΔW deviation") -> str:
    """Heat map of a per-task, per-module quantity ``[T, M]`` (the report: ``delta_w_module_point``, the point
    estimate's relative deviation per module)."""
    d = np.asarray(deviation, dtype=float)
    T, M = d.shape
    fig = _figure(max(6.0, 1.5 + 0.22 * M), _height(T, 0.3, 2.4))
    ax = fig.subplots()
    im = ax.imshow(d, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(np.arange(T), list(tasks), fontsize=8)
    short = [m.replace("model_layers_", "L").replace("_self_attn_", ".").replace("_mlp_", ".") for m in modules]
    ax.set_xticks(np.arange(M), short, rotation=90, fontsize=6)
    fig.colorbar(im, ax=ax, label=label)
    ax.set_title(title)
    return _save(fig, path)
