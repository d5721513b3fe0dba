"""Whole fits on the embedded default, timed against a plain PEFT LoRA training run (``run.py --sections fit``).

    python benchmarks/fit_bench.py                       # every variant, 2 epochs each (about 20 minutes)
    python benchmarks/fit_bench.py --epochs 4 --variants plain,learned,learned_pass

Variants, all on the same base model, data, batches (same seed), steps, learning-rate schedule and
validation schedule (once per epoch; early stopping off so every variant runs the same steps):

* ``plain``: PEFT LoRA, one adapter for all tasks (``get_peft_model`` on the same modules, rank and
  alpha), a plain torch loop: forward with the mean next-token loss, AdamW, clipping, validation of
  the per-task NLL. This is the reference of every ratio;
* ``fixed``: bora MAP at a fixed tau (1000); ``learned``: bora MAP with the learned tau and the
  default cheap curvature (``tau_curvature='steps'``); ``learned_pass``: the same with a separate
  Fisher pass per tau update; ``meanfield``: mean-field (AutoNormal); ``laplace``: the default fit
  (learned tau + the Laplace posterior's curvature pass after the fit).

Each bora variant's time includes what a user waits for in ``Bora.fit``: the frozen-prefix cache,
steps, validation, tau updates, and for ``laplace`` the posterior; the plain run's includes its
steps and validation. Variants run one after another in this process (the machine's load cancels
only partly: rerun to see the spread). Prints and writes a markdown table with each fit's wall
time, its ratio to ``plain``, the share of time in steps / validation / tau updates / posterior,
and the validation perplexity reached.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
VARIANTS = ("plain", "fixed", "learned", "learned_pass", "meanfield", "laplace")


def bora_config(variant: str, epochs: float):
    from bora.core.config import BoraConfig, FitConfig, PriorConfig

    fit = dict(epochs=epochs, patience=0, precision="fp32")  # the plain PEFT run's arithmetic
    prior = {}
    if variant == "fixed":
        fit["guide"], prior = "map", dict(tau_mode="fixed", tau=1000.0)
    elif variant == "learned":
        fit.update(guide="map", tau_curvature="steps")
    elif variant == "learned_pass":
        fit.update(guide="map", tau_curvature="pass")
    elif variant == "meanfield":
        fit["guide"] = "meanfield"
    elif variant == "laplace":
        fit.update(guide="laplace", tau_curvature="steps")
    return BoraConfig(prior=PriorConfig(**prior), fit=FitConfig(**fit))


def run_bora(variant: str, lm, tok, data, epochs: float) -> dict:
    from bora.api import Bora
    from bora.lora.inject import remove_adapters_

    cfg = bora_config(variant, epochs)
    t0 = time.perf_counter()
    bora = Bora(cfg, lm, tok, data["train"].tasks, len(data["train"]), task_sizes=data["train"].task_sizes().tolist())
    feeds = {k: bora.feed(data[k]) for k in ("train", "val")}
    res = bora.fit(feeds["train"], feeds["val"], progress=False)
    wall = time.perf_counter() - t0
    remove_adapters_(bora.adapters)
    return {"wall": wall, "steps": res.steps, "seconds_steps": res.seconds_steps,
            "seconds_validation": res.seconds_validation, "seconds_tau": res.seconds_tau,
            "seconds_posterior": res.seconds_posterior, "step_seconds": res.step_seconds,
            "val_ppl": min(h["val_ppl"] for h in res.history if "val_ppl" in h), "tau": res.tau}


def run_plain(lm, tok, data, epochs: float, adapter_names) -> dict:
    """PEFT LoRA with one adapter, the same batches, schedule and validation as bora's loop."""
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model

    from bora.core.config import AdapterConfig, FitConfig
    from bora.data.batching import BatchStream, collate
    from bora.evaluation.evaluate import summarize
    from bora.fit.loop import num_steps
    from bora.fit.step import make_optimizer, make_scheduler

    fit, ad = FitConfig(epochs=epochs, patience=0), AdapterConfig()
    train, val = data["train"], data["val"]
    pad = tok.pad_token_id or 0
    t0 = time.perf_counter()
    model = get_peft_model(lm, LoraConfig(r=ad.rank, lora_alpha=ad.alpha, lora_dropout=0.0,
                                          target_modules=list(adapter_names)))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, fit)
    total = num_steps(fit, len(train))
    sched = make_scheduler(opt, fit, total)
    per_epoch = math.ceil(len(train) / fit.batch_size)
    stream = BatchStream(len(train), fit.batch_size, torch.Generator().manual_seed(fit.seed))

    def nll(b, reduce=True):
        ids, mask = b["input_ids"], b["attention_mask"]
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        tgt = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="none")
        per_doc = ce.view(ids.shape[0], -1).sum(1)
        return per_doc.sum() / mask[:, 1:].sum() if reduce else per_doc

    t_steps = t_val = 0.0
    vals = []

    def validate():
        model.eval()
        order = torch.argsort(val.lengths, stable=True)
        doc_nll, toks = torch.zeros(len(val)), torch.zeros(len(val), dtype=torch.long)
        with torch.no_grad():
            for s in range(0, len(val), fit.eval_batch_size):
                idx = order[s:s + fit.eval_batch_size]
                b = collate(val, idx, pad)
                doc_nll[idx] = nll(b, reduce=False).float()
                toks[idx] = b["attention_mask"][:, 1:].sum(1)
        vals.append(summarize(doc_nll, toks, val.task_ids, val.tasks)["overall"]["ppl_task_mean"])

    tv = time.perf_counter()
    validate()
    t_val += time.perf_counter() - tv
    for step in range(1, total + 1):
        ts = time.perf_counter()
        model.train()
        b = collate(train, next(stream), pad)
        opt.zero_grad(set_to_none=True)
        loss = nll(b)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, fit.clip_norm)
        opt.step()
        sched.step()
        t_steps += time.perf_counter() - ts
        if step % per_epoch == 0 or step == total:
            tv = time.perf_counter()
            validate()
            t_val += time.perf_counter() - tv
    wall = time.perf_counter() - t0
    model.unload()  # the LM as it was
    return {"wall": wall, "steps": total, "seconds_steps": t_steps, "seconds_validation": t_val, "seconds_tau": 0.0,
            "seconds_posterior": 0.0, "step_seconds": t_steps / total, "val_ppl": min(vals), "tau": None}


def render(rows: dict, command: str, epochs: float) -> str:
    ref = rows.get("plain", {}).get("wall")
    out = [f"## Whole fits on the embedded default ({epochs:g} epochs, early stopping off)", "",
           f"Command: `{command}`", "",
           "| variant | wall (s) | ratio to plain PEFT | steps (s) | validation (s) | tau updates (s) | posterior (s) "
           "| other (s) | best val ppl | tau |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        other = r["wall"] - r["seconds_steps"] - r["seconds_validation"] - r["seconds_tau"] - r["seconds_posterior"]
        tau = "" if not r["tau"] else ", ".join(f"{v:.4g}" for v in r["tau"].values())
        ratio = f"{r['wall'] / ref:.3f}" if ref else ""
        cells = [name, f"{r['wall']:.1f}", ratio, *(f"{r[k]:.1f}" for k in ("seconds_steps", "seconds_validation",
                                                                            "seconds_tau", "seconds_posterior")),
                 f"{other:.1f}", f"{r['val_ppl']:.3f}", tau]
        out.append("| " + " | ".join(cells) + " |")
    if "learned" in rows and "fixed" in rows:
        ratio = rows["learned"]["wall"] / rows["fixed"]["wall"]
        out += ["", f"learned tau (cheap curvature) / fixed tau: {ratio:.3f}"]
    if "learned_pass" in rows and "fixed" in rows:
        out += [f"learned tau (separate Fisher pass) / fixed tau: "
                f"{rows['learned_pass']['wall'] / rows['fixed']['wall']:.3f}"]
    return "\n".join(out) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--json", default=str(HERE / "results_fit.json"))
    ap.add_argument("--md", default=str(HERE / "RESULTS_fit.md"))
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    bad = set(variants) - set(VARIANTS)
    if bad:
        ap.error(f"unknown variants {sorted(bad)}")
    from bora.api import load_data
    from bora.lora.base import load_base_model
    from bora.core.config import BoraConfig
    from bora.lora.inject import inject_adapters_, remove_adapters_

    lm, tok = load_base_model("smollm2")
    data = load_data(BoraConfig(), tok)
    probe = inject_adapters_(lm, BoraConfig().adapter)
    names = list(probe.names.values())
    remove_adapters_(probe)
    rows = {}
    for v in variants:
        t = time.perf_counter()
        rows[v] = run_plain(lm, tok, data, a.epochs, names) if v == "plain" else run_bora(v, lm, tok, data, a.epochs)
        print(f"[{time.perf_counter() - t:.0f} s] {v}: {json.dumps(rows[v])}", file=sys.stderr, flush=True)
    command = "python benchmarks/fit_bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    md = render(rows, command.strip(), a.epochs)
    Path(a.json).write_text(json.dumps({"command": command, "epochs": a.epochs, "rows": rows}, indent=1))
    Path(a.md).write_text(md)
    print(md)
    return rows


if __name__ == "__main__":
    main()
