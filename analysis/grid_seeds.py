"""The learning-rate grids of several fitting seeds (``analysis/tau_sweep.py --lrs ... --seed S``) in one table, with
bora's learned tau against every baseline by a paired bootstrap over documents and seeds.

    python analysis/grid_seeds.py analysis/results/shakespeare/grid_s0 analysis/results/shakespeare/grid_s1 \
        analysis/results/shakespeare/grid_s2 --out analysis/results/shakespeare/grid_3seeds

Each folder is one seed's grid: per setting, the learning rate of the lowest best validation NLL was kept
(``meta.json``'s ``overall``), and ``test_doc_nll.json`` holds that fit's per-document test NLL. This script only
reads them: per setting and seed the chosen lr, the test perplexity (exp of the mean per-task NLL) and the learned
tau; and ``--ref`` (the learned tau) minus every other setting by
:func:`bora.evaluation.evaluate.seeds_bootstrap` (2000 resamples of documents within tasks and of seeds, paired by
seed, 95%). ``--extra NAME=FILE.json[,FILE.json...]`` adds a baseline written by ``analysis/per_task_lora.py``, one
file per learning rate, the one of the lowest mean validation NLL kept (one fitting seed; it is paired with every
seed, and the table says so). ``--fits NAME=DIR,DIR,...`` adds a bora variant from saved ``bora fit`` folders, one
per grid folder in the same order (per-document test NLL as ``analysis/compare_fits.py`` computes it), compared with
the strongest baseline too. Where a grid holds several fixed taus, the fixed-tau baseline is the one validation chose
per seed (``fixed tau (chosen on validation)``; each tau is still listed). The strongest baseline (shared, two-stage,
that choice, ``--extra``) is the one of the lowest mean test perplexity: reported, never used to choose anything.
Writes ``summary.json`` and ``summary.md`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

REF = "learned (MAP, evidence)"
GRID = "fixed tau (chosen on validation)"


def _load(folder: Path) -> tuple[dict, dict]:
    meta, docs = folder / "meta.json", folder / "test_doc_nll.json"
    if not meta.is_file() or not docs.is_file():
        sys.exit(f"grid_seeds: {folder} is not an analysis/tau_sweep.py output (no meta.json / test_doc_nll.json)")
    return json.loads(meta.read_text()), json.loads(docs.read_text())


def _add_grid_choice(runs, settings, rows, nll) -> list[str]:
    """Several fixed taus: add the setting GRID, per seed the tau of the lowest validation NLL (tau_sweep's
    ``best_grid_by_validation``), and return the fixed-tau settings it replaces as a baseline (none with one tau)."""
    taus = [s for s in settings if s.startswith("tau=")]
    if len(taus) < 2:
        return []
    picks = [m.get("best_grid_by_validation") for m, _ in runs]
    if any(p not in taus for p in picks):
        sys.exit(f"grid_seeds: a grid folder's best_grid_by_validation {picks} is not one of its taus {taus}")
    nll[GRID] = [docs[p] for p, (_, docs) in zip(picks, runs)]
    rows[GRID] = {"per_seed": [{**rows[p]["per_seed"][k], "setting": p} for k, p in enumerate(picks)],
                  "note": "per seed the fixed tau of the lowest validation NLL: " + ", ".join(picks)}
    settings.append(GRID)
    return taus


def _markdown(a, out, rows, settings, fitted, strongest) -> list[str]:
    """summary.md's lines: the table, the strongest baseline and each --fits variant against it."""
    lines = [f"# {out['seeds']} fitting seeds, every setting at the lr validation chose per seed", "",
             f"`{out['command']}`", "", "| setting | test ppl per seed (lr) | mean | learned tau | "
             f"{a.ref} minus it, 95% (documents and seeds) |", "|---|---|---|---|---|"]
    for s in settings:
        r = rows[s]
        seeds = ", ".join(f"{x['ppl']:.3f}" + (f" ({x['lr']:g})" if x["lr"] is not None else "") for x in r["per_seed"])
        taus = ", ".join(f"{x['tau']:.1f}" for x in r["per_seed"] if isinstance(x["tau"], (int, float))
                         and (s == a.ref or s in fitted))
        d = r.get("ref_minus")
        vs = "" if d is None else (f"{d['diff']:+.3f} ({100 * d['rel']:+.2f}%) [{d['lo']:+.3f}, {d['hi']:+.3f}]"
                                   + (" (excludes 0)" if d["lo"] > 0 or d["hi"] < 0 else " (includes 0)"))
        lines.append(f"| {s}{' (' + r['note'] + ')' if 'note' in r else ''} | {seeds} | {r['ppl_mean']:.3f} | "
                     f"{taus} | {vs} |")
    d = rows[strongest]["ref_minus"]
    lines += ["", f"Strongest baseline by mean test perplexity (reported, not used to choose): {strongest}; "
              f"{a.ref} minus it {d['diff']:+.3f} ppl ({100 * d['rel']:+.2f}%), [{d['lo']:+.3f}, {d['hi']:+.3f}]."]
    for f in sorted(fitted):
        r = rows[f]["minus_strongest"]
        lines += ["", f"{f} minus {strongest}: {r['diff']:+.3f} ppl ({100 * r['rel']:+.2f}%), "
                  f"[{r['lo']:+.3f}, {r['hi']:+.3f}]."]
    return lines


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="+", type=Path, help="one analysis/tau_sweep.py --lrs output folder per seed")
    p.add_argument("--ref", default=REF, help="the setting compared against every other one")
    p.add_argument("--extra", action="append", default=[], metavar="NAME=FILE.json",
                   help="a baseline of analysis/per_task_lora.py (one fit, paired with every seed)")
    p.add_argument("--fits", action="append", default=[], metavar="NAME=DIR,DIR,...",
                   help="a setting from saved fit folders (bora fit --output), one per grid folder in its order")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    from bora.core.files import write_json
    from bora.evaluation.evaluate import seeds_bootstrap
    from compare_fits import doc_nll

    runs = [_load(f) for f in a.folders]
    toks, tids = runs[0][1]["_tokens"], runs[0][1]["_task_ids"]
    for f, (_, docs) in zip(a.folders, runs):
        if docs["_tokens"] != toks or docs["_task_ids"] != tids:
            sys.exit(f"grid_seeds: {f} holds other test documents than {a.folders[0]}")
    settings = [s for s in runs[0][1] if not s.startswith("_")]
    for f, (_, docs) in zip(a.folders, runs):
        if sorted(s for s in docs if not s.startswith("_")) != sorted(settings):
            sys.exit(f"grid_seeds: {f} has other settings than {a.folders[0]}")
    if a.ref not in settings:
        sys.exit(f"grid_seeds: no setting {a.ref!r} (have {settings})")
    nll = {s: [docs[s] for _, docs in runs] for s in settings}
    rows = {}
    for s in settings:
        per = [m["overall"][s] for m, _ in runs]
        rows[s] = {"per_seed": [{"seed": m["config"]["fit"]["seed"] if "config" in m else k, "lr": o["lr"],
                                 "ppl": o["test"]["ppl_task_mean"], "val_nll": o["best_val_nll"], "tau": o["tau"],
                                 "best_step": o["best_step"]} for k, ((m, _), o) in enumerate(zip(runs, per))]}
    grid_taus = _add_grid_choice(runs, settings, rows, nll)
    for spec in a.extra:
        name, sep, paths = spec.partition("=")
        if not sep or not all(x.endswith(".json") for x in paths.split(",")):
            sys.exit(f"grid_seeds: --extra takes NAME=FILE.json[,FILE.json...], got {spec!r}")
        fits = []
        for path in paths.split(","):
            base = json.loads(Path(path).read_text())
            if base.get("tokens") != toks or base.get("task_ids") != tids:
                sys.exit(f"grid_seeds: {path} holds other test documents than the grids")
            fits.append((base["val_nll_task_mean"], path, base))
        _, path, base = min(fits, key=lambda x: x[0])  # the lr of the lowest mean validation NLL (never test)
        nll[name] = [base["doc_nll"]] * len(runs)
        rows[name] = {"per_seed": [{"seed": None, "lr": base.get("lr"), "ppl": base["ppl"],
                                    "val_nll": base["val_nll_task_mean"], "tau": None, "best_step": None}],
                      "source": path, "candidates": [{"source": q, "lr": b.get("lr"), "val_nll": v, "ppl": b["ppl"]}
                                                     for v, q, b in fits],
                      "note": "one fit, paired with every seed; lr chosen on validation"}
        settings.append(name)
    for spec in a.fits:
        name, sep, dirs = spec.partition("=")
        dirs = dirs.split(",")
        if not sep or len(dirs) != len(runs):
            sys.exit(f"grid_seeds: --fits takes NAME=DIR,DIR,... with one saved fit per grid folder, got {spec!r}")
        per = []
        for d in dirs:  # the saved fit's per-document test NLL (analysis/compare_fits.py's)
            bora, _, doc, tk = doc_nll(Path(d))
            if tk.tolist() != toks:
                sys.exit(f"grid_seeds: {d} holds other test documents than the grids")
            m = json.loads((Path(d) / "metrics.json").read_text())["test"]["fit"]["overall"]
            st = json.loads((Path(d) / "state.json").read_text())["result"]
            nll.setdefault(name, []).append(doc.tolist())
            per.append({"seed": bora.config.fit.seed, "lr": bora.config.fit.lr, "ppl": m["ppl_task_mean"],
                        "val_nll": st["best_val_nll"], "tau": (st.get("tau") or {}).get("tau"),
                        "best_step": st["best_step"], "source": d})
        rows[name] = {"per_seed": per, "note": "saved fits (--fits), one per seed",
                      "doc_nll": nll[name]}  # so that the figures can be recomputed without the adapters
        settings.append(name)
    for s in settings:  # one bootstrap per comparison; its means over seeds are each side's perplexity
        if s == a.ref:
            continue
        b = seeds_bootstrap(nll[a.ref], nll[s], toks, tids, resamples=2000, level=0.95)
        rows[a.ref]["ppl_mean"], rows[s]["ppl_mean"] = b["a"], b["b"]
        rows[s]["ref_minus"] = {"diff": b["diff"], "rel": b["diff"] / b["b"], "lo": b["lo"], "hi": b["hi"],
                                "per_seed": b["per_seed"], "frac_ref_lower": b["frac_a_lower"]}
    fitted = {spec.partition("=")[0] for spec in a.fits}  # bora variants, not baselines
    # with several fixed taus, the grid is one baseline: the tau chosen on validation per seed (never on test)
    baselines = [s for s in settings if s != a.ref and s not in fitted and s not in grid_taus]
    strongest = min(baselines, key=lambda s: rows[s]["ppl_mean"])
    for f in sorted(fitted):  # a bora variant against the strongest baseline too
        r = seeds_bootstrap(nll[f], nll[strongest], toks, tids, resamples=2000, level=0.95)
        rows[f]["minus_strongest"] = {"diff": r["diff"], "rel": r["diff"] / r["b"], "lo": r["lo"], "hi": r["hi"],
                                      "per_seed": r["per_seed"]}
    out = {"command": "python analysis/grid_seeds.py " + " ".join(str(f) for f in a.folders)
           + "".join(f" --extra {shlex.quote(e)}" for e in a.extra)
           + "".join(f" --fits {shlex.quote(e)}" for e in a.fits) + f" --out {a.out}",
           "folders": [str(f) for f in a.folders], "ref": a.ref, "settings": rows, "strongest_baseline": strongest,
           "seeds": len(runs), "resamples": 2000, "level": 0.95}
    a.out.mkdir(parents=True, exist_ok=True)
    write_json(a.out / "summary.json", out)
    lines = _markdown(a, out, rows, settings, fitted, strongest)
    (a.out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return out


if __name__ == "__main__":
    main()
