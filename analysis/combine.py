"""Combine several ``tau_sweep.py`` runs (seeds, parameterisations) into one table with paired intervals.

    python analysis/combine.py analysis/results/shakespeare/s0 analysis/results/shakespeare/s1 \\
        --out analysis/results/shakespeare/summary.md

Every run folder must hold the ``meta.json`` and ``test_doc_nll.json`` that ``tau_sweep.py`` writes, on
the same data, test split and fit settings (checked: only the seed and the parameterisation may
differ). A setting with task-level adapters is named with the parameterisation its fits used
(``learned [offset]``, ``tau=100 [noncentred]``); ``uncoupled`` and ``shared`` have none. Per setting
the table gives the test perplexity (exp of the mean per-task NLL) of every seed and their mean.
Comparisons are paired document bootstraps (:func:`bora.evaluation.evaluate.paired_bootstrap`, documents
resampled within each task) on the *seed-averaged* per-document NLL of the seeds both settings share,
with the per-seed differences beside them: the interval is the test-set noise of the comparison of the
two fitting procedures, averaged over their seeds.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

LEARNED = "learned (MAP, evidence)"


def _param(meta: dict) -> str:
    """The run's parameterisation of task sites, for runs that did not record it per setting ('auto' was
    non-centred for point fits before commit f7c167b, offset from it on: such runs must name it)."""
    p = (meta.get("structure") or {}).get("parameterisation") or meta["config"]["prior"].get("parameterisation", "auto")
    if p == "auto":
        sys.exit("combine: a run records parameterisation 'auto' without the resolved one; rerun it")
    return p


RENAMED = {"independent": "uncoupled"}  # runs written before the tau -> 0 limit was renamed


def setting_name(name: str, param: str) -> str:
    name = RENAMED.get(name, name)
    if name in ("uncoupled", "shared"):
        return name
    short = "learned" if name == LEARNED else name
    return f"{short} [{param}]"


def load_runs(folders: list[Path]) -> tuple[dict, dict, dict]:
    """``(ppl[name][seed], docs[name][seed] -> per-doc NLL, info)`` over every run (``info["val"][name][seed]``:
    the best validation NLL, which selects among settings; test numbers are only reported)."""
    ppl: dict = {}
    docs: dict = {}
    tau: dict = {}
    val: dict = {}
    ref = None
    for folder in folders:
        meta = json.loads((folder / "meta.json").read_text())
        nll = json.loads((folder / "test_doc_nll.json").read_text())
        fit = {k: v for k, v in meta["config"]["fit"].items() if k != "seed"}
        key = (meta["tasks"], nll["_tokens"], nll["_task_ids"], meta["config"]["data"], fit,
               (meta.get("structure") or {}).get("hierarchy"), meta.get("lrs"))  # lrs: --lrs's grid (or None)
        if ref is None:
            ref = key
        elif key != ref:
            sys.exit(f"combine: {folder} was run on other data, another test split or other fit settings than "
                     f"{folders[0]} (only the seed and the parameterisation may differ)")
        seed = int(meta["config"]["fit"]["seed"])
        for name, o in meta["overall"].items():
            if name == "base model":
                ppl.setdefault(name, {})[seed] = o["test"]["ppl_task_mean"]
                continue
            name = RENAMED.get(name, name)
            plain = name in ("uncoupled", "shared")
            s = setting_name(name, "" if plain else o.get("parameterisation") or _param(meta))
            ppl.setdefault(s, {})[seed] = o["test"]["ppl_task_mean"]
            tau.setdefault(s, {})[seed] = o["tau"]
            val.setdefault(s, {})[seed] = o.get("best_val_nll", float("nan"))
            old = {v: k for k, v in RENAMED.items()}.get(name, name)
            if name in nll or old in nll:
                docs.setdefault(s, {})[seed] = np.asarray(nll[name if name in nll else old], float)
    info = {"tasks": ref[0], "tokens": np.asarray(ref[1], float), "task_ids": np.asarray(ref[2], int), "tau": tau,
            "val": val}
    return ppl, docs, info


def compare(a: str, b: str, docs: dict, info: dict) -> dict | None:
    from bora.evaluation.evaluate import paired_bootstrap

    if a not in docs or b not in docs:
        return None
    seeds = sorted(set(docs[a]) & set(docs[b]))
    if not seeds:
        return None
    mean = {s: np.mean([docs[s][k] for k in seeds], axis=0) for s in (a, b)}
    r = paired_bootstrap(mean[a], mean[b], info["tokens"], info["task_ids"], resamples=2000, level=0.95)
    per_seed = [paired_bootstrap(docs[a][k], docs[b][k], info["tokens"], info["task_ids"], resamples=1)["diff"]
                for k in seeds]
    return {"a": a, "b": b, "seeds": seeds, "diff": r["diff"], "lo": r["lo"], "hi": r["hi"], "ref": r["b"],
            "per_seed": per_seed}


def summary(folders: list[Path], pairs: list[tuple[str, str]] | None = None) -> tuple[str, dict]:
    ppl, docs, info = load_runs(folders)
    seeds = sorted({k for v in ppl.values() for k in v})
    order = ["base model", "uncoupled", "shared"] + sorted(
        (s for s in ppl if s not in ("base model", "uncoupled", "shared")),
        key=lambda s: (s.startswith("learned"), s.split(" [")[-1], float(s.split("=")[1].split()[0])
                       if s.startswith("tau=") else 0.0))
    lines = ["| setting | " + " | ".join(f"seed {k}" for k in seeds) + " | mean | tau (per seed) |",
             "|---|" + "---|" * len(seeds) + "---|---|"]
    for s in order:
        v = ppl[s]
        cells = [f"{v[k]:.3f}" if k in v else "" for k in seeds]
        taus = ", ".join(f"{float(info['tau'][s][k]):.4g}" for k in seeds if k in info["tau"].get(s, {}))
        lines.append(f"| {s} | " + " | ".join(cells) + f" | {np.mean(list(v.values())):.3f} | {taus} |")
    hier = [s for s in docs if s not in ("uncoupled", "shared")]
    if pairs is None:
        pairs = [(s, ref) for s in hier if s.startswith("learned") for ref in ("shared", "uncoupled")]
        learned = [s for s in hier if s.startswith("learned")]
        for s in learned:
            grid = [g for g in hier if g.startswith("tau=") and g.endswith(s.split(" ", 1)[1])]
            if grid:
                # the grid's best tau by validation NLL (never by test)
                best = min(grid, key=lambda g: np.mean(list(info["val"][g].values())))
                pairs.append((s, best))
        pairs += [(a, b) for i, a in enumerate(learned) for b in learned[i + 1:]]
    out = {"seeds": seeds, "ppl": ppl, "comparisons": []}
    notes = []
    for a, b in pairs:
        c = compare(a, b, docs, info)
        if c is None:
            continue
        out["comparisons"].append(c)
        excl = "excludes 0" if c["lo"] > 0 or c["hi"] < 0 else "includes 0"
        notes.append(f"- {a} minus {b} (seeds {', '.join(map(str, c['seeds']))}, per-document NLL averaged over "
                     f"them): {c['diff']:+.3f} ppl ({100 * c['diff'] / c['ref']:+.2f}%), 95% interval "
                     f"[{c['lo']:+.3f}, {c['hi']:+.3f}] ({excl}); per seed "
                     + ", ".join(f"{d:+.3f}" for d in c["per_seed"]))
    text = ("Test perplexity, exp(mean per-task NLL), by fitting seed (the data split is the same):\n\n"
            + "\n".join(lines) + "\n\nPaired document bootstraps (2000 resamples):\n\n" + "\n".join(notes) + "\n\n"
            + "Runs: " + ", ".join(f"`{f}`" for f in folders) + "\n")
    return text, out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="tau_sweep.py output folders")
    p.add_argument("--out", type=Path, default=None, help="write the summary (markdown) here; default: print it")
    args = p.parse_args(argv)
    for f in args.runs:
        for name in ("meta.json", "test_doc_nll.json"):
            if not (f / name).is_file():
                p.error(f"{f} has no {name}: not a tau_sweep.py output folder")
    text, out = summary(args.runs)
    if args.out is None:
        print(text)
    else:
        from bora.core.files import write_json

        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("# Seeds and parameterisations combined\n\n" + text)
        write_json(args.out.with_suffix(".json"), {"seeds": out["seeds"], "ppl": {
            s: {str(k): v for k, v in d.items()} for s, d in out["ppl"].items()},
            "comparisons": [{k: v for k, v in c.items()} for c in out["comparisons"]]})
        print(text)
    return out


if __name__ == "__main__":
    main()
