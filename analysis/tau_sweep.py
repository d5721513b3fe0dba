"""The paper's tau trade-off on a true test split, and bora's learned tau against a grid search.

    python analysis/tau_sweep.py                       # embedded default (SmolLM2 + 16 Shakespeare speakers)
    python analysis/tau_sweep.py --data fortunes --seed 1     # the second corpus, another fitting seed
    python analysis/tau_sweep.py --tiny --epochs 1     # seconds: smoke run on a random-init tiny model
    python analysis/tau_sweep.py --data shakespeare-all --sample-tasks 128   # a random 128 of the 1,023 tasks
    python analysis/tau_sweep.py --lrs 1e-3 2e-3 4e-3  # every setting at every lr, each setting's lr chosen on val

Fits ``uncoupled`` (the tau -> 0 limit, A shared), ``shared``, ``two-stage`` (the practice of fine-tuning every
task from the shared fit: each task's ``B`` starts at the chosen shared fit's and keeps its own best validation step,
``A`` stays the shared fit's), every fixed tau of ``--taus`` and the learned tau (MAP with the
Laplace-evidence update; ``--meanfield`` adds a mean-field fit) on the same splits, with the same
budget and early stopping on validation, and evaluates per-task perplexity on the test split, which
nothing is tuned on. The frozen lower layers are computed once per document for the whole sweep
(one :class:`bora.data.feed.Feed` per split, shared by every fit). Writes to ``--out``:

* ``per_task.csv`` -- setting, tau, task, train docs/tokens, test NLL and perplexity;
* ``table.md`` -- the paper's Table 1 form (overall = exp of the mean per-task NLL, plus token-weighted),
  with how many tasks each setting beats uncoupled and shared on;
* ``ppl_vs_tau.png`` and ``gain_vs_size.png`` (Pearson and Spearman r; the paper's r is -0.43);
* ``meta.json`` -- the exact command, package versions, subset sizes, wall time and the paired bootstraps;
* ``test_doc_nll.json`` -- every setting's per-document test NLL (plus ``_tokens`` and ``_task_ids``), for
  :func:`bora.evaluation.evaluate.paired_bootstrap` of any other pair;
* ``by_size.md`` -- the same paired comparisons within buckets of tasks by training documents (``1-2`` is the
  cold-start bucket: a task that small is served mostly by the global adapter).

``--lrs LR [LR ...]`` (instead of the single ``--lr``) fits every setting at every learning rate and keeps, per
setting, the fit with the lowest best validation NLL (the early-stopping metric; for the fixed-tau grid per tau
value, and the grid's best tau is then the one of the lowest validation NLL among those): test numbers are never
looked at to choose (:func:`choose_lr` sees only validation NLLs). Everything above reports the chosen fits;
``meta.json`` holds every (setting, lr) fit's validation and test numbers (``overall[setting]["by_lr"]``, the
chosen lr in ``overall[setting]["lr"]``), ``table.md`` lists them, and ``test_doc_nll_by_lr.json`` holds every fit's
per-document test NLL (``test_doc_nll.json`` keeps the chosen fits', so the comparison scripts read it as before).

``--sample-tasks N`` keeps a random ``N`` of the source's tasks (seeded by ``--sample-seed``; the list is in
``meta.json``): a many-task corpus at a cost this machine can pay, with the corpus's size distribution.
"""

from __future__ import annotations

import argparse
import csv
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

from bora.data.documents import sample_tasks  # noqa: F401  (--sample-tasks; tests call it from here)


def _versions() -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for p in ("torch", "pyro-ppl", "transformers", "bora-lora"):
        try:
            out[p] = md.version(p)
        except md.PackageNotFoundError:
            out[p] = None
    return out


def _corr(x, y) -> tuple[float, float]:
    import numpy as np

    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 3 or x.std() == 0 or y.std() == 0:
        return math.nan, math.nan
    pearson = float(np.corrcoef(x, y)[0, 1])
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return pearson, float(np.corrcoef(rx, ry)[0, 1])


#: the two-stage practice: the chosen shared fit, then every task's ``B`` fine-tuned from it, each task stopped at
#: its own best validation step (``early_stopping='per_task'``; the global ``A`` stays the shared fit's)
TWO_STAGE = "two-stage"


def settings_from(args) -> list[tuple[str, dict]]:
    out = [("uncoupled", {"tau_mode": "uncoupled"}), ("shared", {"tau_mode": "shared"}),
           (TWO_STAGE, {"tau_mode": "uncoupled", "early_stopping": "per_task", "init": "shared"})]
    out += [(f"tau={t:g}", {"tau_mode": "fixed", "tau": float(t)}) for t in args.taus]
    out.append(("learned (MAP, evidence)", {"tau_mode": "learned"}))
    if args.meanfield:
        out.append(("learned (mean-field)", {"tau_mode": "learned", "guide": "meanfield"}))
    structure = {"hierarchy": args.hierarchy, "parameterisation": args.parameterisation}
    chosen = [(name, {**change, **structure}) for name, change in out
              if not args.only or name.split(" ")[0] in args.only]
    names = [n for n, _ in chosen]
    if TWO_STAGE in names and "shared" not in names:
        raise SystemExit("tau_sweep: error: the two-stage setting starts from the shared fit: add 'shared' to --only")
    return chosen


#: bucket edges of training documents per task for ``by_size.md`` (``1-2``: cold start)
SIZE_EDGES = (2, 9, 29)


def bucket_bootstraps(docs: dict, train_docs: list, pairs, edges=SIZE_EDGES) -> list[dict]:
    """Paired document bootstraps of each ``(a, b)`` of ``pairs`` within each bucket of tasks by training
    documents (``train_docs[t]``: task ``t``'s), one row per (bucket, pair) with the bucket's task count."""
    from bora.evaluation.evaluate import paired_bootstrap, tasks_bootstrap

    tid, toks = docs["_task_ids"], docs["_tokens"]
    bounds = [(1, edges[0])] + [(lo + 1, hi) for lo, hi in zip(edges, edges[1:])] + [(edges[-1] + 1, None)]
    out = []
    for lo, hi in bounds:
        keep = [t for t, n in enumerate(train_docs) if n >= lo and (hi is None or n <= hi)]
        rows = [i for i, t in enumerate(tid) if t in set(keep)]
        if not rows:
            continue
        remap = {t: k for k, t in enumerate(keep)}
        label = f"{lo}-{hi}" if hi is not None else f">{lo - 1}"
        for a, b in pairs:
            if a in docs and b in docs:
                args = ([docs[a][i] for i in rows], [docs[b][i] for i in rows], [toks[i] for i in rows],
                        [remap[tid[i]] for i in rows])
                r = paired_bootstrap(*args, resamples=2000, level=0.95)
                rt = tasks_bootstrap(*args, resamples=2000, level=0.95)
                out.append({"bucket": label, "tasks": len(keep), "test_docs": len(rows), "a": a, "b": b,
                            "ppl_a": r["a"], "ppl_b": r["b"], "diff": r["diff"], "lo": r["lo"], "hi": r["hi"],
                            "tasks_lo": rt["lo"], "tasks_hi": rt["hi"]})
    return out


def choose_lr(val_nll: list) -> int:
    """Index of the learning rate to keep: the lowest validation NLL (a diverged fit's NaN counts as +inf; ties
    go to the first). It sees only validation numbers: nothing is chosen on test."""
    key = [v if isinstance(v, (int, float)) and math.isfinite(v) else math.inf for v in val_nll]
    return min(range(len(key)), key=lambda i: key[i])


def run(args) -> dict:
    import torch

    from bora.api import Bora, load_data
    from bora.core.config import BoraConfig, DataConfig, PriorConfig
    from bora.data.documents import load_documents, split_documents
    from bora.evaluation.evaluate import doc_loglik

    t_start = time.perf_counter()
    settings = settings_from(args)  # refuses a bad --only before anything is loaded
    base_cfg = BoraConfig()
    fit_cfg = base_cfg.fit.replace(epochs=args.epochs, patience=args.patience, seed=args.seed,
                                   eval_every=args.eval_every, lr=args.lr,
                                   task_updates=getattr(args, "task_updates", "eager"))
    data_cfg = base_cfg.data if args.data is None else DataConfig(source=args.data)
    if args.tiny:
        from bora.lora.base import tiny_model

        lm, tok = tiny_model(layers=6)
        data_cfg = DataConfig(source="shakespeare", tasks=("hamlet/HAMLET", "macbeth/LADY MACBETH", "hamlet/Ghost"),
                              max_length=24)
        fit_cfg = fit_cfg.replace(batch_size=8)
    else:
        from bora.lora.base import load_base_model

        lm, tok = load_base_model(base_cfg.model)
    if args.sample_tasks:
        data_cfg = data_cfg.replace(tasks=sample_tasks(load_documents(data_cfg), args.sample_tasks,
                                                       args.sample_seed))
    base_cfg = base_cfg.replace(fit=fit_cfg, data=data_cfg)
    splits = split_documents(load_documents(data_cfg), data_cfg)
    data = load_data(base_cfg, tok, splits=splits)
    train = data["train"]
    feeds = None
    grid = bool(getattr(args, "lrs", None))
    lrs = [float(x) for x in args.lrs] if grid else [float(args.lr)]
    rows, overall, docs, docs_by_lr = [], {}, {}, {}
    base_test = None
    saved = tempfile.TemporaryDirectory(prefix="tau-sweep-")  # fits later settings start from (two-stage)
    starts = {}  # setting -> folder of its chosen fit
    fit_keys = ("guide", "early_stopping", "init")
    for name, change in settings:
        tries = []  # one fit per learning rate
        for lr in lrs:
            prior = PriorConfig(**{k: v for k, v in change.items() if k not in fit_keys})
            fit = fit_cfg.replace(guide=change.get("guide", "map"), lr=lr,
                                  early_stopping=change.get("early_stopping", "global"))
            cfg = base_cfg.replace(prior=prior, fit=fit)
            bora = Bora(cfg, lm, tok, train.tasks, len(train), task_sizes=train.task_sizes().tolist())
            if "init" in change:  # started from the chosen fit of an earlier setting
                bora.init_from(starts[change["init"]])
            if feeds is None:  # one frozen-prefix cache per split for the whole sweep
                feeds = {k: bora.feed(v, progress=True, desc=f"caching frozen layers ({k})") for k, v in data.items()}
                base_test = bora.evaluate(feeds["test"], base=True)
            print(f"\n=== {name}" + (f" @ lr {lr:g}" if grid else ""), flush=True)
            t0 = time.perf_counter()
            res = bora.fit(feeds["train"], feeds["val"], progress=not args.quiet)
            test = bora.evaluate(feeds["test"])
            ll, toks = doc_loglik(bora.model, bora.params(), feeds["test"])
            tau = bora.tau_estimate()
            tau_value = float(next(iter(tau.values()))) if tau else math.nan
            o = {"tau": tau_value, "test": test["overall"], "steps": res.steps, "best_step": res.best_step,
                 "parameterisation": bora.model.parameterisation,
                 "best_val_nll": res.best_val_nll, "seconds": time.perf_counter() - t0,
                 "step_seconds": res.step_seconds, "lr": lr}
            task_rows = []
            for t, task in enumerate(train.tasks):
                m = test["per_task"][task]
                task_rows.append({"setting": name, "tau": tau_value, "lr": lr, "task": task,
                                  "train_docs": int(train.task_sizes()[t]), "train_tokens": int(train.task_tokens()[t]),
                                  "test_tokens": m["tokens"], "test_nll": m["nll"], "test_ppl": m["ppl"]})
            tries.append({"overall": o, "rows": task_rows, "docs": (-ll).tolist()})
            if any(c.get("init") == name for _, c in settings):  # a later setting starts here
                tries[-1]["folder"] = Path(saved.name) / f"{name}_lr{lr:g}"
                bora.save(tries[-1]["folder"])
            print(f"{name}: val NLL {res.best_val_nll:.4f}  test ppl (task mean) {test['overall']['ppl_task_mean']:.3f}"
                  f"  tau {tau_value:.4g}  steps {res.steps}", flush=True)
            bora.remove_adapters_()
            del bora
            torch.manual_seed(0)
        # the learning rate is chosen on validation only (choose_lr never sees a test number)
        k = choose_lr([x["overall"]["best_val_nll"] for x in tries])
        by_lr = [{key: x["overall"][key] for key in ("lr", "best_val_nll", "test", "tau", "steps", "best_step",
                                                     "seconds")} | {"chosen": i == k} for i, x in enumerate(tries)]
        overall[name] = {**tries[k]["overall"], "by_lr": by_lr}
        if "folder" in tries[k]:
            starts[name] = tries[k]["folder"]
        if "init" in change:
            overall[name]["init_lr"] = overall[change["init"]]["lr"]
        rows += tries[k]["rows"]
        docs[name] = tries[k]["docs"]
        docs_by_lr[name] = {f"{x['overall']['lr']:g}": x["docs"] for x in tries}
        if grid:
            print(f"{name}: lr {lrs[k]:g} chosen on validation", flush=True)
    for t, task in enumerate(train.tasks):
        m = base_test["per_task"][task]
        rows.append({"setting": "base model", "tau": math.nan, "lr": math.nan, "task": task,
                     "train_docs": int(train.task_sizes()[t]), "train_tokens": int(train.task_tokens()[t]),
                     "test_tokens": m["tokens"],
                     "test_nll": m["nll"], "test_ppl": m["ppl"]})
    overall["base model"] = {"tau": math.nan, "test": base_test["overall"]}
    saved.cleanup()
    wall = time.perf_counter() - t_start
    test_split = data["test"]
    docs["_tokens"] = [int(len(x)) - 1 for x in test_split.input_ids]
    docs["_task_ids"] = test_split.task_ids.tolist()
    config = base_cfg.to_dict()
    if grid:  # no single learning rate: each setting's is in overall[setting]["lr"]
        config["fit"]["lr"] = None
        docs_by_lr.update({"_lrs": lrs, "_tokens": docs["_tokens"], "_task_ids": docs["_task_ids"]})
    return {"rows": rows, "overall": overall, "docs": docs, "wall_seconds": wall, "tasks": list(train.tasks),
            "structure": {"hierarchy": args.hierarchy, "parameterisation": args.parameterisation},
            "sizes": {k: {"docs": len(v), "tokens": v.num_tokens()} for k, v in data.items()},
            "config": config, "lrs": lrs if grid else None, "docs_by_lr": docs_by_lr if grid else None}


def write_outputs(out: Path, result: dict, argv: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    rows = result["rows"]
    with open(out / "per_task.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    by = {}
    for r in rows:
        by.setdefault(r["setting"], {})[r["task"]] = r
    tasks = result["tasks"]
    ov = result["overall"]
    fits = [s for s in ov if s != "base model"]

    def wins(s, ref):
        return sum(by[s][t]["test_nll"] < by[ref][t]["test_nll"] for t in tasks)

    grid = [s for s in fits if s.startswith("tau=")]
    # the grid's best tau is the one with the best validation NLL (test numbers are only reported)
    # (with --lrs each setting's entry is already its fit at the lr of the best validation NLL)
    best_grid = min(grid, key=lambda s: ov[s]["best_val_nll"]) if grid else None
    result["best_grid_by_validation"] = best_grid
    lrs = result.get("lrs")
    lr_head, lr_rule = (" lr (chosen on val) |", "---|") if lrs else ("", "")
    lines = ["| setting | tau |" + lr_head + " test ppl (exp mean per-task NLL) | token-weighted ppl | "
             "beats uncoupled on | beats shared on | steps (best) |", "|---|---|" + lr_rule + "---|---|---|---|---|"]
    for s in ["base model"] + fits:
        o = ov[s]
        tau = "" if not math.isfinite(o["tau"]) and s == "base model" else f"{o['tau']:.4g}"
        lr = (f" {o['lr']:g} |" if "lr" in o else " |") if lrs else ""
        bi = (f"{wins(s, 'uncoupled')}/{len(tasks)}"
              if s not in ("uncoupled", "base model") and "uncoupled" in by else "")
        bs = f"{wins(s, 'shared')}/{len(tasks)}" if s not in ("shared", "base model") and "shared" in by else ""
        st = f"{o['steps']} ({o['best_step']})" if "steps" in o else ""
        lines.append(f"| {s} | {tau} |{lr} {o['test']['ppl_task_mean']:.3f} | {o['test']['ppl_token']:.3f} | {bi} "
                     f"| {bs} | {st} |")
    if lrs:  # every (setting, lr) fit, for auditing the choice
        lines += ["", f"Every fit of the learning-rate grid ({', '.join(f'{x:g}' for x in lrs)}); per setting the lr "
                  "of the lowest best validation NLL (the early-stopping metric) is kept (marked), test is only "
                  "reported:", "",
                  "| setting | lr | best val NLL | test ppl | token-weighted ppl | tau | steps (best) | chosen |",
                  "|---|---|---|---|---|---|---|---|"]
        for s in fits:
            for x in ov[s].get("by_lr", []):
                lines.append(f"| {s} | {x['lr']:g} | {x['best_val_nll']:.4f} | {x['test']['ppl_task_mean']:.3f} | "
                             f"{x['test']['ppl_token']:.3f} | {x['tau']:.4g} | {x['steps']} ({x['best_step']}) | "
                             f"{'yes' if x['chosen'] else ''} |")
    learned = "learned (MAP, evidence)"
    notes = []
    if best_grid:
        b = ov[best_grid]["test"]["ppl_task_mean"]
        note = f"Best grid setting by validation NLL: {best_grid} (test ppl {b:.3f})"
        if learned in ov:
            a = ov[learned]["test"]["ppl_task_mean"]
            note += f"; learned tau {ov[learned]['tau']:.4g} gives {a:.3f}, {100 * (a / b - 1):+.2f}% relative to it"
        notes.append(note + ".")
    ref = learned if learned in by else (best_grid or fits[0])
    indep = by.get("uncoupled", by[ref])  # a subset run without 'uncoupled' plots zero gains
    gains = [(indep[t]["test_ppl"] - by[ref][t]["test_ppl"]) / indep[t]["test_ppl"] for t in tasks]
    sizes = [by[ref][t]["train_tokens"] for t in tasks]
    pr, sr = _corr(sizes, gains)
    if "uncoupled" in by:
        notes.append(f"Per-task relative perplexity gain of '{ref}' over uncoupled vs training tokens: "
                     f"Pearson r = {pr:.2f}, Spearman r = {sr:.2f} (paper: r = -0.43 at its best tau).")
    from bora.evaluation.evaluate import paired_bootstrap

    docs = result.get("docs", {})
    pairs = [(learned, "shared"), (learned, TWO_STAGE), (learned, "uncoupled")]
    pairs += ([(learned, best_grid)] if best_grid else []) + [("tau=10000", "tau=1000"), ("shared", "tau=10000")]
    boot = {}
    for a, b in pairs:
        if a in docs and b in docs:
            r = paired_bootstrap(docs[a], docs[b], docs["_tokens"], docs["_task_ids"], resamples=2000, level=0.95)
            boot[f"{a} vs {b}"] = {k: r[k] for k in ("a", "b", "diff", "lo", "hi", "frac_a_lower")}
            rel = 100 * r["diff"] / r["b"]
            notes.append(f"Paired document bootstrap (2000 resamples, 95%), {a} minus {b}: {r['diff']:+.3f} ppl "
                         f"({rel:+.2f}%), interval [{r['lo']:+.3f}, {r['hi']:+.3f}]"
                         + (" (excludes 0)" if r["lo"] > 0 or r["hi"] < 0 else " (includes 0)"))
    result["bootstrap"] = boot
    if docs:
        train_docs = [by[fits[0]][t]["train_docs"] for t in tasks]
        size_pairs = [p for p in pairs if p[0] == learned] + [("shared", "uncoupled")]
        result["by_size"] = bucket_bootstraps(docs, train_docs, size_pairs)
        md = ["# Paired comparisons by task size (training documents per task; test split)", "",
              "| bucket | tasks | test docs | a | b | ppl a | ppl b | a - b [95%: documents] "
              "| [95%: tasks, documents] |",
              "|---|---|---|---|---|---|---|---|---|"]
        for r in result["by_size"]:
            md.append(f"| {r['bucket']} | {r['tasks']} | {r['test_docs']} | {r['a']} | {r['b']} | {r['ppl_a']:.3f} | "
                      f"{r['ppl_b']:.3f} | {r['diff']:+.3f} ({100 * r['diff'] / r['ppl_b']:+.2f}%) "
                      f"[{r['lo']:+.3f}, {r['hi']:+.3f}] | [{r['tasks_lo']:+.3f}, {r['tasks_hi']:+.3f}] |")
        md += ["", "Intervals (2000 resamples, 95%, the same resample for both settings): documents resampled within "
               "each task (the tasks held fixed: a task with one test document adds no spread, so a bucket of such "
               "tasks gets a zero-width interval), and tasks resampled too, then documents within them (the interval "
               "for other tasks of the same kind). The 1-2 bucket is the cold-start one."]
        (out / "by_size.md").write_text("\n".join(md) + "\n")
    if docs:  # per-document test NLL of every setting: any other comparison can be bootstrapped later
        from bora.core.files import write_json

        write_json(out / "test_doc_nll.json", docs)
    if result.get("docs_by_lr"):  # every (setting, lr) fit's, keyed by setting then f"{lr:g}"
        from bora.core.files import write_json

        write_json(out / "test_doc_nll_by_lr.json", result["docs_by_lr"])
    (out / "table.md").write_text(
        "# Test perplexity by tau (held-out test split; nothing tuned on it)\n\n" + "\n".join(lines) + "\n\n"
        + "\n".join(f"- {n}" for n in notes) + "\n\n"
        + f"Command: `{' '.join(argv)}`  \nWall time: {result['wall_seconds'] / 60:.1f} min  \n"
        + f"Data: {len(tasks)} tasks; documents/scored tokens " + ", ".join(
            f"{k} {v['docs']}/{v['tokens']}" for k, v in result["sizes"].items()) + "\n")

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    xs = [ov[s]["tau"] for s in grid]
    ax.plot(xs, [ov[s]["test"]["ppl_task_mean"] for s in grid], "o-", label="fixed tau")
    for s, style in (("uncoupled", "--"), ("shared", ":")):
        if s in ov:
            ax.axhline(ov[s]["test"]["ppl_task_mean"], ls=style, color="gray", label=s)
    for s, mk in ((learned, "*"), ("learned (mean-field)", "D")):
        if s in ov:
            ax.plot([ov[s]["tau"]], [ov[s]["test"]["ppl_task_mean"]], mk, ms=13, color="C3", label=s)
    if any(0 < float(ov[s]["tau"]) < math.inf for s in grid + [learned] if s in ov):
        ax.set_xscale("log")
    ax.set_xlabel("tau (prior precision of task adapters around the global adapter)")
    ax.set_ylabel("test perplexity, exp(mean per-task NLL)")
    ax.legend(fontsize=8)
    ax.set_title("Test perplexity against tau")
    fig.tight_layout()
    fig.savefig(out / "ppl_vs_tau.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.scatter(sizes, [100 * g for g in gains])
    for t, x, g in zip(tasks, sizes, gains):
        ax.annotate(t.split("/")[-1], (x, 100 * g), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.axhline(0, color="gray", lw=0.8)
    ax.set_xlabel("training tokens of the task")
    ax.set_ylabel(f"perplexity gain over uncoupled (%), {ref}")
    ax.set_title(f"Gain vs task size: Pearson r={pr:.2f}, Spearman r={sr:.2f}")
    fig.tight_layout()
    fig.savefig(out / "gain_vs_size.png", dpi=120)
    plt.close(fig)

    meta = {"command": " ".join(argv), "versions": _versions(), "wall_seconds": result["wall_seconds"],
            "structure": result.get("structure"),
            "sizes": result["sizes"], "tasks": tasks, "config": result["config"],
            "overall": ov, "bootstrap": result.get("bootstrap"), "by_size": result.get("by_size"),
            "lrs": lrs, "lr_selection": ("per setting, the lr of the lowest best_val_nll (validation; never test)"
                                         if lrs else None),
            "best_grid_by_validation": best_grid,
            "machine": {"cpus": __import__("os").cpu_count(), "platform": platform.platform()}}
    from bora.core.files import write_json

    write_json(out / "meta.json", meta)


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description="tau sweep on a held-out test split")
    p.add_argument("--taus", type=float, nargs="+", default=[10.0, 100.0, 1000.0, 10000.0],
                   help="fixed tau values of the grid")
    p.add_argument("--epochs", type=float, default=3.0, help="epoch budget of every fit (early stopping on val)")
    p.add_argument("--patience", type=int, default=1, help="early-stopping patience (validations)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=None, help="data source (default: the embedded Shakespeare subset)")
    p.add_argument("--meanfield", action="store_true", help="also fit learned tau with the mean-field guide")
    p.add_argument("--tiny", action="store_true", help="tiny random model and 3 small tasks (smoke run)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default: analysis/results/<data>/s<seed>; 'tiny' for --tiny)")
    p.add_argument("--hierarchy", default="B", choices=["B", "AB"], help="task-level LoRA factors of every fit")
    p.add_argument("--parameterisation", default="auto", choices=["auto", "noncentred", "offset", "centred"])
    p.add_argument("--only", nargs="+", default=None,
                   help="run only these settings (first word of the name: uncoupled shared two-stage tau=1000 learned; "
                        "two-stage needs shared)")
    p.add_argument("--eval-every", type=int, default=None, help="validate every this many steps (default: per epoch)")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate of every fit")
    p.add_argument("--lrs", type=float, nargs="+", default=None,
                   help="a learning-rate grid instead of --lr: every setting at every lr, each setting's lr chosen "
                        "on validation NLL")
    p.add_argument("--sample-tasks", type=int, default=0, help="keep a random this many of the source's tasks")
    p.add_argument("--sample-seed", type=int, default=0, help="seed of --sample-tasks")
    p.add_argument("--task-updates", default="eager", choices=["eager", "lazy"], help="bora's task updates")
    args = p.parse_args(argv)
    result = run(args)
    if args.out is None:
        corpus = "tiny" if args.tiny else (args.data or "shakespeare")
        args.out = Path("analysis/results") / corpus / f"s{args.seed}"
    write_outputs(args.out, result, ["python", "analysis/tau_sweep.py"] + argv)
    print((args.out / "table.md").read_text())
    return result


if __name__ == "__main__":
    main()
