"""Compare classification fits by their ``bora evaluate --json`` outputs (the same test rows, several seeds each).

    python analysis/classification.py --fits learned=l_s0.json,l_s1.json shared=sh_s0.json,sh_s1.json --out s.json

The full study (three settings, three seeds, out-of-distribution rows, the ECE-by-size plot)::

    python analysis/classification.py \\
        --fits learned=runs/l_s0/eval.json,runs/l_s1/eval.json,runs/l_s2/eval.json \\
               shared=runs/sh_s0/eval.json,runs/sh_s1/eval.json,runs/sh_s2/eval.json \\
               per_task=runs/pt_s0/eval.json,runs/pt_s1/eval.json,runs/pt_s2/eval.json \\
        --ref learned --ood learned=runs/l_s0/ood.json,runs/l_s1/ood.json,runs/l_s2/ood.json \\
        --out analysis/results/classification/summary.json \\
        --plot analysis/results/classification/ece_vs_size.png --train-sizes runs/l_s0

where the inputs come from, for each fit (``runs/l_s0`` etc.: ``bora fit ... --seed 0 --output runs/l_s0``)::

    bora evaluate runs/l_s0 --json runs/l_s0/eval.json                     # its test split, per-row outputs
    bora evaluate runs/l_s0 --data ood.jsonl --json runs/l_s0/ood.json     # out-of-distribution rows

``ood.jsonl``: rows of another corpus in the fit's columns, each relabelled with the name of a task of the fit, so
that they are scored under that task's adapter (rows of tasks not in the fit are refused for classification).

Flags:

* ``--fits NAME=EVAL[,EVAL...] ...``: one setting each, its fitting seeds' evaluation JSONs in seed order; the
  seeds of two settings are paired by position, and every JSON must hold the same test rows (tasks, labels, number
  of choices) in the same order.
* ``--ref NAME``: the reference setting (default: the first).
* ``--ood NAME=EVAL[,EVAL...] ...``: a setting's evaluations of out-of-distribution rows, one per seed (the same
  seeds, in the same order as in ``--fits``).
* ``--train-sizes PATH``: training rows per task, from a fit folder (its ``tasks.json``), a JSON ``{task: rows}``
  or an evaluation JSON; default: the ``train_sizes`` of the reference's first evaluation JSON.
* ``--out X.json`` (required): the summary; ``X.md`` gets its tables. ``--plot PNG``: ECE against task size.
* ``--resamples`` (2000), ``--level`` (0.95), ``--seed`` (0), ``--bins`` (15).

What it reports, from each JSON's per-row probabilities (``classification.rows``):

* per setting, averaged over seeds, accuracy, NLL, ECE (``--bins`` equal-width bins of the top-1 probability) and
  Brier score, each the mean over tasks (every task counts once), for the MAP (``p_map``) and the posterior
  average (``p_avg``; a point fit's is its MAP);
* **paired intervals**: the reference's posterior average minus each other setting's posterior average (its MAP
  for a point fit), and minus the reference's own MAP, for accuracy (positive: the reference is better) and NLL
  (negative: the reference is better); test rows resampled within tasks and seeds with replacement, paired by
  seed (:func:`bora.evaluation.evaluate.seeds_bootstrap_means`); and the reference's MAP minus each other
  setting (``paired_map``), with the same resampling;
* the **ECE ratio** posterior average / MAP per setting (ECE averaged over tasks and seeds, then the ratio), with
  an interval from the same resampling (:func:`bora.evaluation.evaluate.within_task_draws`,
  :func:`~bora.evaluation.evaluate.seed_draws`); 1 exactly for a point fit;
* **ECE against task size**: each task's posterior-average ECE (mean over seeds) against its training rows, one
  line per setting (tasks of equal size averaged);
* **OOD AUROC** per setting with ``--ood``, seed by seed and averaged: in-distribution = the setting's own test
  rows, out-of-distribution = the ``--ood`` rows, scored by the mutual information and by the predictive entropy
  of the posterior average (sklearn's ``roc_auc_score`` where installed, else torchmetrics' ``binary_auroc``, else
  a rank AUROC with ties counted half: :func:`rank_auroc`). A point fit's mutual information is 0 on every row,
  so its AUROC by it is 0.5. Beside it, the mean predictive entropy of both sets of rows and the accuracy on the
  OOD rows (under the labels their file gives them): an OOD row the task's adapter answers confidently and rightly
  is not one its uncertainty can flag;
* the **ECE floor** of the MAP and of the posterior average (:func:`ece_floor`): the mean-over-tasks ECE that
  a perfectly calibrated predictor with the same probabilities would still show on these test rows.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

METRICS = ("accuracy", "nll", "ece", "brier")
KINDS = ("p_map", "p_avg")  # the MAP's and the posterior average's probabilities


# ----------------------------------------------------------------------------- reading
def _named_paths(items, flag: str) -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = {}
    for item in items or ():
        name, eq, paths = item.partition("=")
        if not eq or not name or not paths:
            sys.exit(f"classification: {flag} takes NAME=FILE[,FILE...], got {item!r}")
        if name in out:
            sys.exit(f"classification: {flag} names {name!r} twice")
        out[name] = [Path(p) for p in paths.split(",") if p]
        if not out[name]:
            sys.exit(f"classification: {flag} {name}= names no file")
    return out


def load_rows(path: Path) -> dict:
    """One ``bora evaluate --json`` file's per-row outputs as arrays: ``tasks`` (names per row), ``labels [N]``,
    ``k [N]`` (choices per row), ``p_map`` / ``p_avg`` ``[N, K_max]`` (zero past a row's choices), ``entropy``,
    ``mi`` ``[N]``, ``point_fit``, ``samples``, ``train_sizes`` (or None)."""
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        sys.exit(f"classification: cannot read {path}: {e}")
    cls = obj.get("classification") if isinstance(obj, dict) else None
    if not isinstance(cls, dict) or "rows" not in cls:
        sys.exit(f"classification: {path} holds no classification rows (write it with `bora evaluate FIT --json`)")
    r = cls["rows"]
    k = np.array([len(p) for p in r["p_map"]], dtype=np.int64)
    width = int(k.max()) if len(k) else 0

    def pad(rows):
        out = np.zeros((len(rows), width))
        for i, p in enumerate(rows):
            out[i, :len(p)] = p
        return out
    return {"tasks": list(r["task"]), "labels": np.asarray(r["label"], dtype=np.int64), "k": k,
            "p_map": pad(r["p_map"]), "p_avg": pad(r["p_avg"]),
            "entropy": np.asarray(r["entropy_avg"], dtype=np.float64),
            "mi": np.asarray(r["mutual_information"], dtype=np.float64),
            "point_fit": bool(cls.get("point_fit")), "samples": cls.get("samples"),
            "train_sizes": obj.get("train_sizes")}


def read_train_sizes(path: Path) -> dict[str, int]:
    """Training rows per task from a fit folder (``tasks.json``: ``tasks`` and ``task_sizes``), an evaluation JSON
    (``train_sizes``) or a JSON ``{task: rows}``."""
    path = Path(path)
    if path.is_dir():
        meta = json.loads((path / "tasks.json").read_text())
        if meta.get("task_sizes") is None:
            sys.exit(f"classification: {path}/tasks.json has no task_sizes")
        return dict(zip(meta["tasks"], meta["task_sizes"]))
    obj = json.loads(path.read_text())
    sizes = obj.get("train_sizes", obj) if isinstance(obj, dict) else None
    if not isinstance(sizes, dict) or not all(isinstance(v, int) for v in sizes.values()):
        sys.exit(f"classification: {path} holds no training rows per task")
    return sizes


# ----------------------------------------------------------------------------- per-row quantities
def row_values(p: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Per row: ``hit`` (1 if the most probable choice, the first on a tie, is correct), ``nll``, ``conf`` (the
    top-1 probability) and ``brier`` (``1 - 2 p_y + sum p^2``)."""
    p_y = p[np.arange(len(labels)), labels]
    return {"hit": (p.argmax(-1) == labels).astype(np.float64), "nll": -np.log(np.maximum(p_y, 1e-300)),
            "conf": p.max(-1), "brier": 1.0 - 2.0 * p_y + np.square(p).sum(-1)}


def ece_resampled(conf: np.ndarray, hit: np.ndarray, idx: np.ndarray, n_bins: int = 15) -> np.ndarray:
    """``[K, R]``: the ECE of rows ``idx [R, m]`` of each of ``K`` columns ``conf, hit [K, n]``, with ``n_bins``
    equal-width bins ``(k/n, (k+1)/n]`` (:func:`bora.evaluation.metrics.expected_calibration_error`'s binning)."""
    c, h = conf[:, idx], hit[:, idx]  # [K, R, m]
    K, R, m = c.shape
    b = np.clip(np.ceil(c * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    flat = (np.arange(K * R).reshape(K, R, 1) * n_bins + b).ravel()
    gap = np.bincount(flat, weights=(c - h).ravel(), minlength=K * R * n_bins).reshape(K, R, n_bins)
    return np.abs(gap).sum(-1) / m  # sum_b |sum conf - sum hit| / m


def task_metrics(p: np.ndarray, labels: np.ndarray, tid: np.ndarray, T: int, n_bins: int) -> np.ndarray:
    """``[T, 4]``: accuracy, NLL, ECE and Brier of each task's rows."""
    v = row_values(p, labels)
    out = np.full((T, len(METRICS)), np.nan)
    for t in range(T):
        rows = np.flatnonzero(tid == t)
        if len(rows):
            ece = ece_resampled(v["conf"][None], v["hit"][None], rows[None], n_bins)[0, 0]
            out[t] = [v["hit"][rows].mean(), v["nll"][rows].mean(), ece, v["brier"][rows].mean()]
    return out


def ece_floor(p: np.ndarray, tid: np.ndarray, T: int, n_bins: int, draws: int = 200, seed: int = 0) -> float:
    """The expected mean-over-tasks ECE of a perfectly calibrated predictor with the probabilities ``p [N, C]``:
    labels drawn from ``p`` itself, ``draws`` times. ECE measured on a task's few rows is not 0 even then, so this
    is the calibration error that finite test rows alone produce; only the part of an observed ECE above it is
    miscalibration that a better predictor could remove."""
    rng = np.random.default_rng(seed)
    cum = np.cumsum(p / p.sum(-1, keepdims=True), -1)
    y = (rng.random((draws, len(p), 1)) > cum[None]).sum(-1).clip(max=p.shape[1] - 1)  # [draws, N]
    hit = (p.argmax(-1)[None] == y).astype(np.float64)
    conf = np.broadcast_to(p.max(-1), hit.shape)
    per_task = [ece_resampled(conf, hit, np.flatnonzero(tid == t)[None], n_bins)[:, 0].mean()
                for t in range(T) if (tid == t).any()]
    return float(np.mean(per_task))


# ----------------------------------------------------------------------------- AUROC
def rank_auroc(id_scores, ood_scores) -> float:
    """``P(score of an OOD row > score of an in-distribution row)``, ties counted half (Mann-Whitney, midranks).

    >>> rank_auroc([0.1, 0.2, 0.5], [0.5, 0.9])     # pairs won: 3 + 3, the tie 0.5 / 0.5 half: 5.5 of 6
    0.9166666666666666
    """
    a, b = np.asarray(id_scores, dtype=np.float64), np.asarray(ood_scores, dtype=np.float64)
    if not len(a) or not len(b):
        return math.nan
    s = np.concatenate([a, b])
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    sorted_s = s[order]
    start = 0
    while start < len(s):  # midranks of tied runs
        stop = start
        while stop + 1 < len(s) and sorted_s[stop + 1] == sorted_s[start]:
            stop += 1
        ranks[order[start:stop + 1]] = (start + stop) / 2 + 1
        start = stop + 1
    r_ood = ranks[len(a):].sum()
    return float((r_ood - len(b) * (len(b) + 1) / 2) / (len(a) * len(b)))


def auroc(id_scores, ood_scores) -> tuple[float, str]:
    """AUROC of telling OOD rows (positive) from in-distribution ones by a score, and the implementation used."""
    a, b = np.asarray(id_scores, dtype=np.float64), np.asarray(ood_scores, dtype=np.float64)
    if not len(a) or not len(b):
        return math.nan, "none"
    s, y = np.concatenate([a, b]), np.concatenate([np.zeros(len(a)), np.ones(len(b))])
    try:
        from sklearn.metrics import roc_auc_score

        return float(roc_auc_score(y, s)), "sklearn"
    except ImportError:
        pass
    try:
        import torch
        from torchmetrics.functional.classification import binary_auroc
    except ImportError:
        return rank_auroc(a, b), "rank"
    lo, hi = float(s.min()), float(s.max())
    s01 = (s - lo) / (hi - lo) if hi > lo else np.zeros_like(s)  # in [0, 1]: no sigmoid; the order is kept
    return float(binary_auroc(torch.from_numpy(s01), torch.from_numpy(y).long())), "torchmetrics"


# ----------------------------------------------------------------------------- the comparison
def _check_same_rows(ref: dict, other: dict, where: str) -> None:
    if (other["tasks"] != ref["tasks"] or not np.array_equal(other["labels"], ref["labels"])
            or not np.array_equal(other["k"], ref["k"])):
        sys.exit(f"classification: {where} does not hold the same test rows (tasks, labels, choices, in order) as "
                 "the reference's first evaluation")


def _mean_dict(a: np.ndarray) -> dict:
    return {m: float(a[..., i].mean()) for i, m in enumerate(METRICS)}


def summarize(fits: dict[str, list[dict]], ref: str, ood: dict[str, list[dict]], train_sizes, *,
              resamples: int = 2000, level: float = 0.95, seed: int = 0, n_bins: int = 15) -> dict:
    """The summary of settings ``fits`` (name -> the seeds' :func:`load_rows`), see the module docstring."""
    from bora.evaluation.evaluate import seed_draws, seeds_bootstrap_means, within_task_draws

    first = fits[ref][0]
    tasks = list(dict.fromkeys(first["tasks"]))
    tid = np.array([tasks.index(t) for t in first["tasks"]], dtype=np.int64)
    T, labels = len(tasks), first["labels"]
    q = (1 - level) / 2
    out: dict = {"ref": ref, "tasks": tasks, "rows": int(len(labels)), "level": level, "resamples": resamples,
                 "seed": seed, "bins": n_bins, "settings": {}, "paired": {}}
    per_task_ece: dict[str, np.ndarray] = {}
    values: dict[str, dict[str, np.ndarray]] = {}
    for name, runs in fits.items():
        K = len(runs)
        m = {kind: np.stack([task_metrics(r[kind], labels, tid, T, n_bins) for r in runs]) for kind in KINDS}
        have = ~np.isnan(m["p_map"][0, :, 0])
        s = {"seeds": K, "point_fit": [r["point_fit"] for r in runs], "samples": [r["samples"] for r in runs]}
        for kind, key in (("p_map", "map"), ("p_avg", "posterior_average")):
            x = m[kind][:, have]  # [K, T', 4]
            s[key] = {"overall": _mean_dict(x), "per_seed": [_mean_dict(x[k]) for k in range(K)],
                      "per_task": {tasks[t]: _mean_dict(m[kind][:, t]) for t in np.flatnonzero(have)}}
        rv = {kind: [row_values(r[kind], labels) for r in runs] for kind in KINDS}
        conf = {kind: np.stack([v["conf"] for v in rv[kind]]) for kind in rv}  # [K, N]
        hit = {kind: np.stack([v["hit"] for v in rv[kind]]) for kind in rv}
        # ECE ratio: the same row draws for MAP and average, every seed; seeds drawn as seeds_bootstrap draws them
        boot = np.zeros((2, K, resamples))
        n_t = 0
        for t, _, idx in within_task_draws(tid, T, resamples, seed):
            for j, kind in enumerate(KINDS):
                boot[j] += ece_resampled(conf[kind], hit[kind], idx, n_bins)
            n_t += 1
        boot /= max(n_t, 1)
        draws = seed_draws(K, resamples, seed)
        e_r = boot[:, draws, np.arange(resamples)[:, None]].mean(-1)  # [2, R]
        with np.errstate(divide="ignore", invalid="ignore"):  # a resample with no calibration error: inf or nan
            ratio_r = e_r[1] / e_r[0]
        e_map, e_avg = s["map"]["overall"]["ece"], s["posterior_average"]["overall"]["ece"]
        lo, hi = np.quantile(ratio_r, [q, 1 - q])
        floor = {kind: float(np.mean([ece_floor(r[kind], tid, T, n_bins, seed=seed + k) for k, r in enumerate(runs)]))
                 for kind in KINDS}
        s["ece_ratio"] = {"ratio": e_avg / e_map if e_map > 0 else math.nan, "lo": float(lo), "hi": float(hi),
                          "ece_map": e_map, "ece_avg": e_avg, "floor_map": floor["p_map"], "floor_avg": floor["p_avg"]}
        out["settings"][name] = s
        per_task_ece[name] = m["p_avg"][:, :, 2].mean(0)
        values[name] = {kind: np.stack([np.stack([v["hit"], v["nll"]]) for v in rv[kind]]) for kind in rv}  # [K, 2, N]
    K_ref = len(fits[ref])
    comparisons = [(o, values[o]["p_avg"]) for o in fits if o != ref] + [(f"{ref} MAP", values[ref]["p_map"])]
    out["paired_map"] = {}
    for o, v in comparisons:
        if v.shape[0] != K_ref:
            sys.exit(f"classification: {o} has {v.shape[0]} seeds and {ref} {K_ref}; the seeds are paired")
        for key, own in (("paired", "p_avg"), ("paired_map", "p_map")):
            if key == "paired_map" and o == f"{ref} MAP":
                continue
            out[key][o] = {}
            for j, metric in enumerate(("accuracy", "nll")):
                r = seeds_bootstrap_means(values[ref][own][:, j], v[:, j], tid, resamples=resamples, level=level,
                                          seed=seed)
                out[key][o][metric] = {k: r[k] for k in ("a", "b", "diff", "lo", "hi", "per_seed", "seeds")}
    if train_sizes is not None:
        missing = [t for t in tasks if t not in train_sizes]
        if missing:
            sys.exit(f"classification: no training rows given for task(s) {missing[:3]}")
        out["ece_by_size"] = {t: {"train_rows": int(train_sizes[t]),
                                  **{n: float(e[i]) for n, e in per_task_ece.items()}} for i, t in enumerate(tasks)}
    out["ood"] = {}
    for name, runs in ood.items():
        if name not in fits:
            sys.exit(f"classification: --ood names {name!r}, not a setting of --fits")
        if len(runs) != len(fits[name]):
            sys.exit(f"classification: --ood {name} has {len(runs)} evaluations for {len(fits[name])} seeds")
        per_seed = []
        for ind, od in zip(fits[name], runs):
            mi, how = auroc(ind["mi"], od["mi"])
            ent, _ = auroc(ind["entropy"], od["entropy"])
            per_seed.append({"mi": mi, "entropy": ent, "id_rows": int(len(ind["mi"])), "ood_rows": int(len(od["mi"])),
                             "id_entropy": float(ind["entropy"].mean()), "ood_entropy": float(od["entropy"].mean()),
                             "ood_accuracy": float(row_values(od["p_avg"], od["labels"])["hit"].mean())})
        out["ood"][name] = {"auroc_mi": float(np.mean([p["mi"] for p in per_seed])),
                            "auroc_entropy": float(np.mean([p["entropy"] for p in per_seed])),
                            **{k: float(np.mean([p[k] for p in per_seed]))
                               for k in ("id_entropy", "ood_entropy", "ood_accuracy")},
                            "per_seed": per_seed, "method": how}
    return out


# ----------------------------------------------------------------------------- output
def _f(x, d: int = 4) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{d}f}"


def markdown(s: dict) -> str:
    """The summary's tables."""
    pct = round(100 * s["level"])
    K = {n: v["seeds"] for n, v in s["settings"].items()}
    lines = [f"# Classification: {len(s['settings'])} settings on {s['rows']} test rows of {len(s['tasks'])} tasks "
             f"(reference {s['ref']})", "",
             "Means over seeds of the mean over tasks; MAP | posterior average (a point fit's is its MAP). ECE: "
             f"{s['bins']} bins. ECE ratio: posterior average / MAP, {pct}% interval. ECE floor: the expected ECE of "
             "a perfectly calibrated predictor with the same probabilities (labels drawn from them; "
             "`ece_floor`), what the few test rows per task alone produce.", "",
             "| setting | seeds | acc MAP | acc avg | NLL MAP | NLL avg | ECE MAP | ECE avg | Brier MAP | Brier avg "
             "| ECE avg/MAP | ECE floor MAP, avg |", "|---" * 12 + "|"]
    for n, v in s["settings"].items():
        a, b, r = v["map"]["overall"], v["posterior_average"]["overall"], v["ece_ratio"]
        cells = [n, str(K[n])] + [_f(x[m]) for m in METRICS for x in (a, b)]
        cells.append(f"{_f(r['ratio'], 3)} [{_f(r['lo'], 3)}, {_f(r['hi'], 3)}]")
        cells.append(f"{_f(r['floor_map'], 3)}, {_f(r['floor_avg'], 3)}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"{s['ref']} posterior average minus each (paired: rows within tasks and seeds resampled, "
              f"{s['resamples']} resamples, {pct}%); accuracy > 0 and NLL < 0 favour {s['ref']}.", "",
              "| minus | accuracy diff [interval] | NLL diff [interval] |", "|---|---|---|"]
    for o, v in s["paired"].items():
        cells = [f"{_f(v[m]['diff'])} [{_f(v[m]['lo'])}, {_f(v[m]['hi'])}]" for m in ("accuracy", "nll")]
        lines.append(f"| {o} | " + " | ".join(cells) + " |")
    if s.get("paired_map"):
        lines += ["", f"{s['ref']} MAP minus each (the same resampling):", "",
                  "| minus | accuracy diff [interval] | NLL diff [interval] |", "|---|---|---|"]
        for o, v in s["paired_map"].items():
            cells = [f"{_f(v[m]['diff'])} [{_f(v[m]['lo'])}, {_f(v[m]['hi'])}]" for m in ("accuracy", "nll")]
            lines.append(f"| {o} | " + " | ".join(cells) + " |")
    if s["ood"]:
        lines += ["", "OOD AUROC (in-distribution: the setting's test rows), mean over seeds [per seed]; the mean "
                  "predictive entropy of the in-distribution and OOD rows, and the accuracy on the OOD rows under "
                  "the labels their file gives them:", "",
                  "| setting | by mutual information | by predictive entropy | entropy ID | entropy OOD | acc OOD |",
                  "|---|---|---|---|---|---|"]
        for n, v in s["ood"].items():
            mi = ", ".join(_f(p["mi"], 3) for p in v["per_seed"])
            ent = ", ".join(_f(p["entropy"], 3) for p in v["per_seed"])
            extra = " | ".join(_f(v.get(k), 3) for k in ("id_entropy", "ood_entropy", "ood_accuracy"))
            lines.append(f"| {n} | {_f(v['auroc_mi'], 3)} [{mi}] | {_f(v['auroc_entropy'], 3)} [{ent}] | {extra} |")
    return "\n".join(lines) + "\n"


def plot_ece_by_size(s: dict, path: Path) -> None:
    """ECE of the posterior average against training rows per task, one line per setting (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = s["ece_by_size"]
    sizes = sorted({r["train_rows"] for r in rows.values()})
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in s["settings"]:
        y = [np.mean([r[name] for r in rows.values() if r["train_rows"] == n]) for n in sizes]
        ax.plot(sizes, y, marker="o", label=name)
    if sizes and sizes[0] > 0:
        ax.set_xscale("log")
    ax.set_xlabel("training rows of the task")
    ax.set_ylabel(f"ECE ({s['bins']} bins), posterior average")
    ax.set_title("Calibration against task size (mean over seeds)")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fits", nargs="+", required=True, metavar="NAME=EVAL[,EVAL...]",
                   help="a setting and its seeds' `bora evaluate --json` files, in seed order")
    p.add_argument("--ref", help="the reference setting (default: the first)")
    p.add_argument("--ood", nargs="*", default=[], metavar="NAME=EVAL[,EVAL...]",
                   help="a setting's evaluations of out-of-distribution rows, one per seed")
    p.add_argument("--train-sizes", type=Path, help="fit folder, or JSON of training rows per task")
    p.add_argument("--out", type=Path, required=True, help="summary JSON (its tables go to the same name .md)")
    p.add_argument("--plot", type=Path, help="PNG of ECE against task size")
    p.add_argument("--resamples", type=int, default=2000)
    p.add_argument("--level", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bins", type=int, default=15)
    args = p.parse_args(argv)
    from bora.core.files import write_json, write_text

    if args.out.suffix != ".json":
        sys.exit("classification: --out must name a .json file")
    named = _named_paths(args.fits, "--fits")
    ref = args.ref or next(iter(named))
    if ref not in named:
        sys.exit(f"classification: --ref {ref!r} is not a setting of --fits ({', '.join(named)})")
    fits = {n: [load_rows(x) for x in paths] for n, paths in named.items()}
    first = fits[ref][0]
    for n, runs in fits.items():
        for x, r in zip(named[n], runs):
            _check_same_rows(first, r, str(x))
    ood = {n: [load_rows(x) for x in paths] for n, paths in _named_paths(args.ood, "--ood").items()}
    sizes = read_train_sizes(args.train_sizes) if args.train_sizes is not None else first["train_sizes"]
    if args.plot is not None and sizes is None:
        sys.exit("classification: --plot needs training rows per task (--train-sizes, or evaluation JSONs that "
                 "hold train_sizes)")
    s = summarize(fits, ref, ood, sizes, resamples=args.resamples, level=args.level, seed=args.seed,
                  n_bins=args.bins)
    s = {"command": "python analysis/classification.py " + " ".join(sys.argv[1:] if argv is None else argv),
         "files": {n: [str(x) for x in v] for n, v in named.items()},
         "ood_files": {n: [str(x) for x in v] for n, v in _named_paths(args.ood, "--ood").items()}, **s}
    write_json(args.out, s)
    md = markdown(s)
    write_text(args.out.with_suffix(".md"), md)
    if args.plot is not None:
        plot_ece_by_size(s, args.plot)
    print(md)
    return s


if __name__ == "__main__":
    main()
