"""bora benchmarks: step time against plain PEFT LoRA, mixed-task batches, memory, frozen-prefix cache.

    python benchmarks/run.py                 # full default run (about 15 minutes on 2 CPU cores)
    python benchmarks/run.py --quick         # smoke run of every section (about 2-3 minutes)
    python benchmarks/run.py --sections step,memory --tasks 64
    python benchmarks/run.py --device cuda   # GPU mode: bf16 autocast, 0.5B-class random-init Llama
    python benchmarks/run.py --sections fit --merge   # + whole fits on the embedded default vs plain PEFT

Every timing section builds its variants in one process on one random-init LM (frozen weights shared
by all variants) and interleaves them: each round runs every variant once, in a fresh random order,
after a warm-up. Reported: the median step time of each variant and its ratio to the reference,
both as a ratio of medians and as the median of the per-round ratios ("paired", the figure the goals
use: a round's variants ran back to back, so load from other processes cancels out in the ratio).
Peak memory is measured in one subprocess per variant (``benchmarks/memory.py``).

Writes ``--json`` (all raw times and summaries) and ``--md`` (tables, the command, the machine and
the goals). See ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shlex
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import common as C  # noqa: E402

SECTIONS = ("step", "mixed", "memory", "prefix", "smollm2", "fit")
DEFAULT_SECTIONS = SECTIONS[:-1]  # whole fits (fit_bench.py, ~20 minutes) run only when asked for
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default=",".join(DEFAULT_SECTIONS),
                    help=f"comma-separated subset of {','.join(SECTIONS)} (default: all but fit)")
    ap.add_argument("--fit-epochs", type=float, default=2.0, help="epochs of each whole fit in the fit section")
    ap.add_argument("--fit-variants", default="plain,fixed,learned,learned_pass,meanfield,laplace")
    ap.add_argument("--quick", action="store_true", help="smoke run: few steps, small grid, 64-token sequences")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (GPU mode: bf16 autocast, preset 'gpu')")
    ap.add_argument("--preset", default=None, help=f"random-init Llama: {', '.join(C.PRESETS)} "
                    "(default: small on CPU, gpu on CUDA)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads on CPU (default 1: on a shared 2-core machine 2 threads "
                         "contend with other processes and run slower and noisier)")
    ap.add_argument("--tasks", type=int, default=64, help="number of tasks for the headline comparisons")
    ap.add_argument("--step-tasks", default="16,64", help="task counts of the step-time section")
    ap.add_argument("--distinct", type=int, default=16, help="distinct tasks per batch in the step section")
    ap.add_argument("--step-variants", default="plain,hand_map,map,hand_mf,meanfield")
    ap.add_argument("--mixed-tasks", default="1,16,64,256")
    ap.add_argument("--mixed-distinct", default="1,4,16")
    ap.add_argument("--loop-tasks", type=int, default=64, help="tasks of the per-task-loop comparison")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--top-layers", type=int, default=0, help="adapt only the top k decoder layers (0: all)")
    ap.add_argument("--targets", default="q_proj,v_proj",
                    help="adapted modules, comma-separated; 'all7' = q,k,v,o,gate,up,down; 'bora' = AdapterConfig's "
                         "default (default: q_proj,v_proj, the setting of the issue)")
    ap.add_argument("--tau-mode", default="learned", help="bora prior tau_mode (the default config's 'learned')")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=20, help="timed rounds (steps per variant) after warm-up")
    ap.add_argument("--mixed-repeats", type=int, default=None, help="rounds of the mixed section (default --repeats)")
    ap.add_argument("--memory-variants", default="lm,plain,map,meanfield,hand_map")
    ap.add_argument("--memory-steps", type=int, default=3)
    ap.add_argument("--memory-repeats", type=int, default=1,
                    help="subprocesses per variant; the median peak is reported")
    ap.add_argument("--memory-malloc", choices=["fixed", "default"], default="fixed",
                    help="'fixed': run memory.py with MALLOC_MMAP_THRESHOLD_=131072, which makes glibc's peak RSS "
                         "reproducible to the MB (with glibc's default dynamic threshold the same variant's peak "
                         "varies by 2-3%% run to run; use --memory-repeats 3 then)")
    ap.add_argument("--prefix-docs", type=int, default=64, help="training documents of the prefix-cache epochs")
    ap.add_argument("--prefix-epochs", type=int, default=3)
    ap.add_argument("--prefix-top", type=int, default=2, help="adapted top layers in the prefix section")
    ap.add_argument("--prefix-tasks", type=int, default=16)
    ap.add_argument("--smollm2-steps", type=int, default=10)
    ap.add_argument("--smollm2-seq-len", type=int, default=64)
    ap.add_argument("--smollm2-top", type=int, default=4)
    ap.add_argument("--smollm2-variants", default="plain,hand_map,map,meanfield")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--render-only", action="store_true", help="re-render --md from --json; run nothing")
    ap.add_argument("--merge", action="store_true",
                    help="keep the other sections of an existing --json and re-render --md (to re-run some sections; "
                         "the tables are rendered with this invocation's settings, so keep them the same)")
    ap.add_argument("--json", default=None, help="output JSON (default benchmarks/results.json; quick: benchmarks/out/)")
    ap.add_argument("--md", default=None, help="output markdown (default benchmarks/RESULTS.md; quick: benchmarks/out/)")
    a = ap.parse_args(argv)
    here = os.path.dirname(os.path.abspath(__file__))
    if a.quick:  # smaller defaults; flags given explicitly still win
        quick = dict(warmup=1, repeats=3, step_tasks="64", step_variants="plain,hand_map,map,meanfield",
                     mixed_tasks="1,64", mixed_distinct="1,16", seq_len=64, memory_variants="lm,plain,map,meanfield",
                     memory_steps=1, prefix_docs=32, prefix_epochs=2, smollm2_steps=2, smollm2_seq_len=32,
                     smollm2_variants="plain,map")
        for k, v in quick.items():
            if getattr(a, k) == ap.get_default(k):
                setattr(a, k, v)
    out = os.path.join(here, "out") if a.quick else here
    a.json = a.json or os.path.join(out, "results_quick.json" if a.quick else "results.json")
    a.md = a.md or os.path.join(out, "RESULTS_quick.md" if a.quick else "RESULTS.md")
    a.preset = a.preset or ("gpu" if torch.device(a.device).type == "cuda" else "small")
    a.sections = [s.strip() for s in a.sections.split(",") if s.strip()]
    bad = set(a.sections) - set(SECTIONS)
    if bad:
        ap.error(f"unknown sections {sorted(bad)}")
    a.mixed_repeats = a.mixed_repeats or a.repeats
    a.targets = C.parse_targets(a.targets)
    return a


# ----------------------------------------------------------------------------- sections


def section_step(a) -> dict:
    """Step time of each variant against plain PEFT LoRA, for each task count."""
    lm = C.make_lm(a.preset, a.seed, a.device)
    L, V = lm.config.num_hidden_layers, lm.config.vocab_size
    layers = C.adapter_layers(L, a.top_layers)
    res = {"lm_params": C.count_params(lm), "runs": {}}
    for T in ints(a.step_tasks):
        batch = C.make_batch(V, T, min(a.distinct, T), batch_size=a.batch_size, seq_len=a.seq_len, seed=a.seed,
                             device=a.device)
        log(f"step: {T} tasks, building {a.step_variants}")
        vs = {k: C.make_variant(k, C.shared_copy(lm), batch, T, layers=layers, device=a.device, tau_mode=a.tau_mode,
                                targets=a.targets)
              for k in a.step_variants.split(",")}
        times = C.interleave({k: v.step for k, v in vs.items()}, warmup=a.warmup, repeats=a.repeats, seed=a.seed,
                             log=log)
        summ = C.summarize(times, "plain" if "plain" in times else None)
        for k, v in vs.items():
            summ[k]["trainable"] = v.num_trainable()
            summ[k]["sites"] = _num_sites(v)
        res["runs"][str(T)] = {"distinct": min(a.distinct, T), "summary": summ, "times": times}
        log("step: " + ", ".join(f"{k} {s['median_ms']:.0f}ms x{s.get('paired_ratio', 1):.3f}" for k, s in summ.items()))
        del vs
        gc.collect()
    return res


def _num_sites(v) -> int | None:
    """Latent sample sites of a bora variant's guide."""
    tr = getattr(getattr(v, "bora", None), "guide", None)
    tr = getattr(tr, "prototype_trace", None)
    if tr is None:
        return None
    return sum(1 for n in tr.nodes.values() if n["type"] == "sample" and not n["is_observed"])


def section_mixed(a) -> dict:
    """bora MAP step time over task counts and distinct tasks per batch; per-task PEFT loop for comparison."""
    lm = C.make_lm(a.preset, a.seed, a.device)
    L, V = lm.config.num_hidden_layers, lm.config.vocab_size
    layers = C.adapter_layers(L, a.top_layers)
    steps, cells = {}, []
    boras = {}
    for T in ints(a.mixed_tasks):
        first = None
        for d in ints(a.mixed_distinct):
            if d > T:
                continue
            batch = C.make_batch(V, T, d, batch_size=a.batch_size, seq_len=a.seq_len, seed=a.seed, device=a.device)
            if T not in boras:
                log(f"mixed: building bora MAP with {T} tasks")
                boras[T] = C.make_variant("map", C.shared_copy(lm), batch, T, layers=layers, device=a.device,
                                          tau_mode=a.tau_mode, targets=a.targets)
            b = boras[T]
            steps[f"map T={T} d={d}"] = (lambda b=b, batch=batch: b.step(batch))
            cells.append({"name": f"map T={T} d={d}", "tasks": T, "distinct": d, "kind": "map"})
            first = first or batch
    loops = {}
    T = a.loop_tasks
    for d in ints(a.mixed_distinct):
        if d > T:
            continue
        batch = C.make_batch(V, T, d, batch_size=a.batch_size, seq_len=a.seq_len, seed=a.seed, device=a.device)
        if T not in loops:
            log(f"mixed: building PEFT with {T} named adapters")
            loops[T] = C.make_variant("loop", C.shared_copy(lm), batch, T, layers=layers, device=a.device,
                                      targets=a.targets)
        lp = loops[T]
        steps[f"loop T={T} d={d}"] = (lambda lp=lp, batch=batch: lp.step(batch))
        cells.append({"name": f"loop T={T} d={d}", "tasks": T, "distinct": d, "kind": "loop"})
    log(f"mixed: {len(steps)} cells, interleaved")
    times = C.interleave(steps, warmup=a.warmup, repeats=a.mixed_repeats, seed=a.seed, log=log)
    ref = cells[0]["name"]
    summ = C.summarize(times, ref)
    for c in cells:
        c.update(summ[c["name"]])
    bora_cells = [c for c in cells if c["kind"] == "map"]
    pr = [c["paired_ratio"] for c in bora_cells]
    med = [c["median_ms"] for c in bora_cells]
    out = {"reference": ref, "cells": cells, "times": times,
           "flatness_paired": max(pr) / min(pr), "flatness_medians": max(med) / min(med)}
    speed = {}
    for c in cells:
        if c["kind"] == "loop":
            m = f"map T={c['tasks']} d={c['distinct']}"
            if m in times:
                rs = [x / y for x, y in zip(times[c["name"]], times[m])]
                speed[str(c["distinct"])] = {"paired": C.median(rs), "of_medians": C.median(times[c["name"]]) /
                                             C.median(times[m]), "tasks": c["tasks"]}
    out["loop_over_bora"] = speed
    log(f"mixed: flatness {out['flatness_paired']:.3f}, loop/bora {speed}")
    return out


def section_memory(a) -> dict:
    here = os.path.dirname(os.path.abspath(__file__))
    res = {"tasks": a.tasks, "runs": {}, "malloc": a.memory_malloc}
    variants = a.memory_variants.split(",")
    peaks: dict[str, list] = {v: [] for v in variants}
    for i in range(a.memory_repeats):  # round robin, so slow drift of the machine hits every variant alike
        for v in variants:
            cmd = [sys.executable, os.path.join(here, "memory.py"), "--variant", v, "--preset", a.preset, "--tasks",
                   str(a.tasks), "--distinct", str(min(a.distinct, a.tasks)), "--batch-size", str(a.batch_size),
                   "--seq-len", str(a.seq_len), "--top-layers", str(a.top_layers), "--steps", str(a.memory_steps),
                   "--threads", str(a.threads), "--device", a.device, "--tau-mode", a.tau_mode,
                   "--targets", ",".join(a.targets)]
            log(f"memory: {v} ({i + 1}/{a.memory_repeats})")
            env = dict(os.environ)
            if a.memory_malloc == "fixed":
                env["MALLOC_MMAP_THRESHOLD_"] = "131072"
            p = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if p.returncode != 0:
                raise RuntimeError(f"memory.py failed for {v}:\n{p.stderr[-3000:]}")
            peaks[v].append(json.loads(p.stdout.strip().splitlines()[-1]))
    for v in variants:
        r = dict(peaks[v][0])
        r["peak_rss_all_mb"] = [x["peak_rss_mb"] for x in peaks[v]]
        r["peak_rss_mb"] = C.median(r["peak_rss_all_mb"])
        res["runs"][v] = r
    res["command_example"] = " ".join(shlex.quote(x) for x in cmd)
    runs = res["runs"]
    if "plain" in runs:
        base = runs["plain"]["peak_rss_mb"]
        floor = runs.get("lm", {}).get("peak_rss_mb")
        for v, r in runs.items():
            r["ratio_to_plain"] = r["peak_rss_mb"] / base
            if floor is not None:
                r["over_lm_mb"] = r["peak_rss_mb"] - floor
                if v != "plain" and "plain" in runs and base > floor:
                    r["extra_over_plain_increment"] = (r["peak_rss_mb"] - floor) / (base - floor)
    log("memory: " + ", ".join(f"{v} {r['peak_rss_mb']:.0f}MB" for v, r in runs.items()))
    return res


def _prefix_split(n_docs, n_tasks, vocab, max_len, seed):
    from bora.data.documents import TokenizedSplit

    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(1, vocab, (int(torch.randint(max_len // 2, max_len + 1, (1,), generator=g)),), generator=g)
           for _ in range(n_docs)]
    return TokenizedSplit(ids, torch.arange(n_docs) % n_tasks, [f"task{t}" for t in range(n_tasks)])


def section_prefix(a) -> dict:
    """Epoch time of a MAP fit adapting the top layers, with and without the frozen-prefix cache."""
    from bora.data.batching import batches

    preset = "prefix" if a.preset == "small" else a.preset
    lm = C.make_lm(preset, a.seed, a.device)
    L, V = lm.config.num_hidden_layers, lm.config.vocab_size
    split = _prefix_split(a.prefix_docs, a.prefix_tasks, V, a.seq_len, a.seed)
    layers = tuple(range(-a.prefix_top, 0))
    runs = {}
    for cache in (True, False):
        cfg = C.bora_config("map", layers=layers, tau_mode=a.tau_mode, cache_prefix=cache, targets=a.targets,
                            device=a.device)
        b = C.Bora(cfg, C.shared_copy(lm), C.Tok(), split.tasks, len(split), device=a.device)
        feed = b.feed(split)
        st = C.BoraStep(None, None, len(split.tasks), "map", bora_obj=b, device=a.device, num_docs=len(split),
                        ntok_total=split.num_tokens())
        runs["cached" if cache else "uncached"] = {"bora": b, "feed": feed, "step": st, "epochs": [],
                                                   "has_prefix": b.prefix is not None}
    log(f"prefix: {L} layers, top {a.prefix_top} adapted, {len(split)} docs, {a.prefix_epochs} epochs each")
    gen = torch.Generator().manual_seed(a.seed)
    order = list(runs)
    for e in range(a.prefix_epochs):
        for name in (order if e % 2 == 0 else order[::-1]):
            r = runs[name]
            t0 = time.perf_counter()
            tb = None
            if e == 0:
                r["feed"].build_cache_()  # no-op without a prefix
                tb = time.perf_counter() - t0
                r["cache_build_s"] = tb
            for idx in batches(split, a.batch_size, shuffle=True, generator=gen):
                r["step"].step(r["feed"].batch(idx))
            r["epochs"].append(time.perf_counter() - t0)
        log("prefix: epoch %d: %s" % (e + 1, ", ".join(f"{n} {runs[n]['epochs'][-1]:.1f}s" for n in order)))
    out = {"layers": L, "adapted_top": a.prefix_top, "docs": len(split), "tokens": split.num_tokens(),
           "batch_size": a.batch_size, "preset": preset}
    for n, r in runs.items():
        out[n] = {"epochs_s": r["epochs"], "cache_build_s": r.get("cache_build_s", 0.0), "has_prefix": r["has_prefix"],
                  "steady_epoch_s": C.median(r["epochs"][1:]) if len(r["epochs"]) > 1 else r["epochs"][0]}
    out["speedup_first_epoch"] = out["uncached"]["epochs_s"][0] / out["cached"]["epochs_s"][0]
    out["speedup_steady"] = out["uncached"]["steady_epoch_s"] / out["cached"]["steady_epoch_s"]
    return out


def section_fit(a) -> dict:
    """Whole fits on the embedded default against plain PEFT LoRA (benchmarks/fit_bench.py; own markdown)."""
    import fit_bench

    return {"rows": fit_bench.main(["--epochs", str(a.fit_epochs), "--variants", a.fit_variants])}


def section_smollm2(a) -> dict:
    from bora.lora.base import load_base_model

    log("smollm2: loading")
    lm, tok = load_base_model("smollm2", device=a.device)
    L, V = lm.config.num_hidden_layers, lm.config.vocab_size
    layers = C.adapter_layers(L, a.smollm2_top)
    T = a.tasks
    batch = C.make_batch(V, T, min(a.distinct, T), batch_size=a.batch_size, seq_len=a.smollm2_seq_len, seed=a.seed,
                         device=a.device)
    vs = {k: C.make_variant(k, C.shared_copy(lm), batch, T, layers=layers, device=a.device, tau_mode=a.tau_mode,
                            targets=a.targets)
          for k in a.smollm2_variants.split(",")}
    times = C.interleave({k: v.step for k, v in vs.items()}, warmup=1, repeats=a.smollm2_steps, seed=a.seed, log=log)
    summ = C.summarize(times, "plain" if "plain" in times else None)
    for k, v in vs.items():
        summ[k]["trainable"] = v.num_trainable()
    log("smollm2: " + ", ".join(f"{k} {s['median_ms']:.0f}ms x{s.get('paired_ratio', 1):.3f}" for k, s in summ.items()))
    return {"lm_params": C.count_params(lm), "layers": L, "adapted_top": a.smollm2_top, "tasks": T,
            "distinct": min(a.distinct, T), "seq_len": a.smollm2_seq_len, "summary": summ, "times": times}


# ----------------------------------------------------------------------------- goals and report


def goals(res: dict, a) -> list[dict]:
    g = []
    step = res.get("step", {}).get("runs", {}).get(str(a.tasks), {}).get("summary", {})
    for v, lim, what in (("map", 1.05, "MAP"), ("meanfield", 1.15, "mean-field")):
        if v in step:
            e = step[v]
            g.append({"goal": f"{what} step / plain PEFT step <= {lim} at {a.tasks} tasks", "value": e["paired_ratio"],
                      "met": e["paired_ratio"] <= lim,
                      "detail": f"paired ratio, quartiles {e['paired_ratio_q25']:.3f}-{e['paired_ratio_q75']:.3f}; "
                                f"ratio of medians {e['ratio_of_medians']:.3f}"})
    mixed = res.get("mixed")
    if mixed:
        x = mixed["flatness_paired"]
        worst = max((c for c in mixed["cells"] if c["kind"] == "map"), key=lambda c: c["paired_ratio"])
        g.append({"goal": "MAP step time flat within 10% over tasks x distinct tasks per batch (max/min)",
                  "value": x, "met": x <= 1.10,
                  "detail": f"slowest cell T={worst['tasks']} d={worst['distinct']}; of medians "
                            f"{mixed['flatness_medians']:.3f}"})
        sp = mixed["loop_over_bora"].get("16")
        if sp:
            g.append({"goal": f"per-task PEFT loop / bora MAP >= 1.4 at 16 distinct tasks ({sp['tasks']} tasks)",
                      "value": sp["paired"], "met": sp["paired"] >= 1.4,
                      "detail": f"ratio of medians {sp['of_medians']:.3f}"})
    mem = res.get("memory", {}).get("runs", {})
    if "plain" in mem:
        for v, lim in (("map", 1.05), ("meanfield", 1.25)):
            if v in mem:
                x = mem[v]["ratio_to_plain"]
                g.append({"goal": f"peak RSS {v} / plain <= {lim} at {a.tasks} tasks", "value": x, "met": x <= lim,
                          "detail": f"{mem[v]['peak_rss_mb']:.0f} vs {mem['plain']['peak_rss_mb']:.0f} MB"})
    return g


def fmt(x, nd=3):
    return "-" if x is None else f"{x:.{nd}f}"


def render(res: dict, a) -> str:
    m = res["machine"]
    s = []
    s.append("# bora benchmark results\n")
    cmds = res["runs_log"]
    s.append(f"Generated by `benchmarks/run.py`; {len(cmds)} invocation(s):\n")
    for c in cmds:
        s.append(f"- `{c['command']}` — {c['date']}, {c['wall_s'] / 60:.1f} minutes, sections "
                 f"{', '.join(c['sections'])}, load average at start {' '.join(f'{x:.2f}' for x in c['loadavg_start'])}"
                 f", at end {' '.join(f'{x:.2f}' for x in c['loadavg_end'])}" + (f". {c['note']}" if c.get("note") else ""))
    s.append("")
    s.append("## Machine\n")
    s.append("| | |\n|---|---|")
    for k in ("git", "cpu_model", "nproc", "sched_affinity", "torch_threads", "mem_total_gb", "gpu", "torch", "pyro",
              "transformers", "peft", "bora", "python", "pyro_validation", "platform"):
        if k in m:
            s.append(f"| {k} | {m[k]} |")
    s.append("")
    s.append("The machine is shared with other work, so absolute times are noisy; the ratios come from "
             "variants interleaved in one process (one step of each per round, in a random order), and the "
             "**paired** ratio is the median over rounds of (variant time / reference time in the same round).\n")
    st = res["settings"]
    s.append("## Settings\n")
    s.append(f"Random-init Llama preset `{st['preset']}`: {json.dumps(C.PRESETS[st['preset']])}; "
             f"batch {a.batch_size} x {a.seq_len} tokens (no padding); LoRA rank {C.RANK}, alpha {C.ALPHA:g}, "
             f"targets {', '.join(st.get('targets') or C.TARGETS)}, layers {'all' if not a.top_layers else f'top {a.top_layers}'}; "
             f"AdamW lr {C.LR:g}, weight decay 0, clip {C.CLIP:g}; prior tau_mode `{a.tau_mode}` "
             f"(MAP: the empirical-Bayes tau-conditioned model, as `Bora` builds it); {a.warmup} warm-up rounds, "
             f"{a.repeats} timed rounds; device `{a.device}`.\n")
    s.append("Variants: `plain` = PEFT LoRA (one adapter, no prior, token NLL sum / n_tokens); `hand_map` = "
             "bora's gather layer + per-task torch tensors + the Gaussian prior written by hand (no Pyro); "
             "`map` = bora MAP (AutoDelta) step exactly as `bora.fit.loop.fit` runs it; `hand_mf` = hand-written "
             "reparameterised mean-field (no Pyro); `meanfield` = bora AutoNormal (init_scale 1e-3); `loop` = PEFT "
             "with one named adapter per task, `set_adapter` + forward/backward per distinct task of the batch.\n")
    if "step" in res:
        s.append("## 1-2. Step time against plain PEFT LoRA\n")
        s.append(f"LM: {res['step']['lm_params'] / 1e6:.2f}M parameters.\n")
        s.append("| tasks | distinct/batch | variant | trainable params | median ms | q25-q75 ms | ratio of medians | "
                 "paired ratio | paired q25-q75 |")
        s.append("|---:|---:|---|---:|---:|---:|---:|---:|---:|")
        for T, r in res["step"]["runs"].items():
            for k, e in r["summary"].items():
                s.append(f"| {T} | {r['distinct']} | {k} | {e['trainable']:,} | {e['median_ms']:.0f} | "
                         f"{e['q25_ms']:.0f}-{e['q75_ms']:.0f} | {fmt(e.get('ratio_of_medians'))} | "
                         f"**{fmt(e.get('paired_ratio'))}** | {fmt(e.get('paired_ratio_q25'))}-"
                         f"{fmt(e.get('paired_ratio_q75'))} |")
        s.append("")
    if "mixed" in res:
        mx = res["mixed"]
        s.append("## 3. Mixed-task batches\n")
        s.append(f"bora MAP step time by number of tasks (T) and distinct tasks per batch (d), all cells "
                 f"interleaved; paired ratio against `{mx['reference']}`. PEFT per-task loop at T={a.loop_tasks}.\n")
        s.append("| kind | T | d | median ms | q25-q75 ms | paired ratio to reference |")
        s.append("|---|---:|---:|---:|---:|---:|")
        for c in mx["cells"]:
            s.append(f"| {c['kind']} | {c['tasks']} | {c['distinct']} | {c['median_ms']:.0f} | {c['q25_ms']:.0f}-"
                     f"{c['q75_ms']:.0f} | {fmt(c['paired_ratio'])} |")
        s.append("")
        s.append(f"Flatness of the bora cells (max/min): paired {mx['flatness_paired']:.3f}, "
                 f"of medians {mx['flatness_medians']:.3f}.\n")
        if mx["loop_over_bora"]:
            s.append("| distinct tasks per batch | loop / bora MAP (paired) | loop / bora MAP (of medians) |")
            s.append("|---:|---:|---:|")
            for d, e in mx["loop_over_bora"].items():
                s.append(f"| {d} | **{e['paired']:.3f}** | {e['of_medians']:.3f} |")
            s.append("")
    if "memory" in res:
        mm = res["memory"]
        s.append(f"## 4. Peak memory ({mm['tasks']} tasks)\n")
        s.append("One subprocess per variant (`benchmarks/memory.py`): peak RSS of the whole process (python, "
                 f"torch, the LM, the variant) after building the LM and the variant and {a.memory_steps} steps. "
                 "`lm` = LM + one no-grad forward (the floor every variant shares). Peak RSS is `VmHWM` "
                 "(`/proc/self/status`); `getrusage` `ru_maxrss` is in the JSON but inherits the runner's ~1 GB "
                 "over fork+exec on Linux, so it cannot separate the variants when they are started by the runner.\n")
        if mm.get("malloc") == "fixed":
            s.append("The subprocesses ran with `MALLOC_MMAP_THRESHOLD_=131072` (allocations above 128 KiB are "
                     "mmapped and returned to the system when freed): with glibc's default dynamic threshold the "
                     "peak of the same variant varies by 2-3% from run to run, with the fixed one it repeats to "
                     "the MB (`--memory-malloc default` for the default allocator behaviour).\n")
        s.append(f"Each variant ran in {len(next(iter(mm['runs'].values())).get('peak_rss_all_mb', [0]))} separate "
                 "subprocesses; the table gives the median peak (all values in the last column).\n")
        s.append("| variant | trainable params | peak RSS MB | over `lm` MB | ratio to plain | "
                 "increment over `lm`, relative to plain's | all runs MB |")
        s.append("|---|---:|---:|---:|---:|---:|---|")
        for v, r in mm["runs"].items():
            runs_s = ", ".join(f"{x:.0f}" for x in r.get("peak_rss_all_mb", [r["peak_rss_mb"]]))
            s.append(f"| {v} | {r.get('trainable', 0):,} | {r['peak_rss_mb']:.0f} | {fmt(r.get('over_lm_mb'), 0)} | "
                     f"**{fmt(r.get('ratio_to_plain'))}** | {fmt(r.get('extra_over_plain_increment'), 2)} | {runs_s} |")
        s.append("")
    if "prefix" in res:
        p = res["prefix"]
        s.append("## 5. Frozen-prefix cache\n")
        s.append(f"MAP fit epochs (preset `{p['preset']}`: top {p['adapted_top']} of {p['layers']} layers adapted, "
                 f"{p['docs']} documents of {a.seq_len // 2}-{a.seq_len} tokens, batch {p['batch_size']}), "
                 "alternating cached and uncached epochs; epoch 1 of the cached run includes building the cache.\n")
        s.append("| FitConfig.cache_prefix | cache build s | epoch times s | steady epoch s |")
        s.append("|---|---:|---|---:|")
        for n, lab in (("cached", "True"), ("uncached", "False")):
            r = p[n]
            s.append(f"| {lab} | {r['cache_build_s']:.2f} | {', '.join(f'{x:.1f}' for x in r['epochs_s'])} | "
                     f"{r['steady_epoch_s']:.2f} |")
        s.append("")
        s.append(f"Speed-up from the cache: first epoch (incl. build) {p['speedup_first_epoch']:.2f}x, later epochs "
                 f"{p['speedup_steady']:.2f}x.\n")
    if "smollm2" in res:
        sm = res["smollm2"]
        s.append("## SmolLM2-135M (the default base model)\n")
        s.append(f"{sm['lm_params'] / 1e6:.0f}M parameters, {sm['layers']} layers, top {sm['adapted_top']} adapted, "
                 f"{sm['tasks']} tasks ({sm['distinct']} distinct per batch), batch {a.batch_size} x {sm['seq_len']}, "
                 f"1 warm-up + {len(next(iter(sm['times'].values())))} timed rounds (no prefix cache).\n")
        s.append("| variant | trainable params | median ms | ratio of medians | paired ratio |")
        s.append("|---|---:|---:|---:|---:|")
        for k, e in sm["summary"].items():
            s.append(f"| {k} | {e['trainable']:,} | {e['median_ms']:.0f} | {fmt(e.get('ratio_of_medians'))} | "
                     f"**{fmt(e.get('paired_ratio'))}** |")
        s.append("")
    s.append("## Goals\n")
    for g in res["goals"]:
        s.append(f"- {'MET' if g['met'] else 'NOT MET'}: {g['goal']} — measured **{g['value']:.3f}**"
                 + (f" ({g['detail']})" if g.get("detail") else ""))
    s.append("")
    if "fit" in res:
        import fit_bench

        s.append(fit_bench.render(res["fit"]["rows"], "python benchmarks/run.py --sections fit --merge",
                                  a.fit_epochs))
    s.append("## GPU mode\n")
    if torch.device(a.device).type == "cuda":
        s.append("This run used the GPU mode.\n")
    else:
        s.append("`--device cuda` (bf16 autocast in every variant, preset `gpu`: a random-init 0.5B-class Llama, "
                 "CUDA-synchronised step times, `torch.cuda.max_memory_allocated` in the memory section) exists but "
                 "has **not been run**: this machine has no GPU.\n")
    here = os.path.dirname(os.path.abspath(a.md))
    others = sorted(f for f in os.listdir(here) if f.startswith("RESULTS") and f.endswith(".md")
                    and f != os.path.basename(a.md))
    if others:
        s.append("## Other result files\n")
        s.append("Runs with other settings (their own command and settings inside): "
                 + ", ".join(f"[{f}]({f})" for f in others) + ".\n")
    if os.path.exists(os.path.join(here, "PROFILE.md")):
        s.append("## Analysis\n")
        s.append("Profiles of the variants and what stands in the way of the unmet goals: see "
                 "[PROFILE.md](PROFILE.md).\n")
    return "\n".join(s)


def main(argv=None):
    a = parse(argv)
    if a.render_only:
        with open(a.json) as f:
            res = json.load(f)
        res["goals"] = goals(res, a)
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1, default=str)
        with open(a.md, "w") as f:
            f.write(render(res, a))
        log(f"rendered {a.md}")
        return
    if torch.device(a.device).type == "cpu":
        torch.set_num_threads(a.threads)
    command = ("python benchmarks/run.py " + " ".join(shlex.quote(x) for x in (sys.argv[1:] if argv is None
                                                                               else argv))).strip()
    entry = {"command": command, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "sections": a.sections,
             "loadavg_start": os.getloadavg()}
    res = {}
    if a.merge and os.path.exists(a.json):
        with open(a.json) as f:
            res = json.load(f)
        if "runs_log" not in res and "command" in res:  # written before runs_log existed
            res["runs_log"] = [{"command": res.pop("command"), "date": res.pop("date"),
                                "sections": [x for x in SECTIONS if x in res],
                                "loadavg_start": res["machine"]["loadavg"], "loadavg_end": res.pop("loadavg_end"),
                                "wall_s": res.pop("wall_s")}]
        res.setdefault("runs_log", [])
    else:
        res = {"runs_log": []}
    res["machine"] = C.machine_info()
    res["settings"] = {k: v for k, v in vars(a).items()}
    for sec in SECTIONS:
        if sec not in a.sections:
            continue
        t = time.perf_counter()
        res[sec] = globals()[f"section_{sec}"](a)
        res[sec]["section_s"] = time.perf_counter() - t
        log(f"{sec} done in {res[sec]['section_s']:.0f}s")
        gc.collect()
    res["goals"] = goals(res, a)
    entry["wall_s"] = time.perf_counter() - T0
    entry["loadavg_end"] = os.getloadavg()
    res["runs_log"].append(entry)
    os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
    with open(a.json, "w") as f:
        json.dump(res, f, indent=1, default=str)
    with open(a.md, "w") as f:
        f.write(render(res, a))
    log(f"wrote {a.json} and {a.md}")
    for g in res["goals"]:
        log(f"{'MET    ' if g['met'] else 'NOT MET'} {g['value']:.3f}  {g['goal']}")


if __name__ == "__main__":
    main()
