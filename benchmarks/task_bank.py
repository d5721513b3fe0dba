"""Memory and step time of the task bank (``FitConfig.task_bank``): eager, lazy, lazy + 'cpu' bank, lazy + 'disk'
bank, at T = 1,000 and 10,000 tasks.

    python benchmarks/task_bank.py          # ~1-2 min on 2 CPU cores; writes results_task_bank.json and
                                            # RESULTS_task_bank.md

The setting of ``benchmarks/task_scaling.py`` (its ``build`` and batches: the tiny random-init Llama, rank-4 adapters
on ``q_proj`` / ``v_proj`` of the last layer, a learned tau with the steps' curvature recording, 16 documents of 64
tokens from 16 distinct tasks per step), with ``task_bank`` set for the lazy variants.

* **Step time**: every (T, variant) built in one process, steps interleaved in a fresh random order per round
  (:func:`common.interleave`); the paired ratio to lazy without a bank at the same T.
* **Memory**: one subprocess per point builds the fit, runs 1 + ``--steps`` steps and one full flush (what each
  validation does first), and reports from ``/proc/self/status``: the peak RSS of the whole process (``VmHWM``, the
  model and data included), and at the end ``RssAnon`` (anonymous memory: what the process needs in RAM) and
  ``RssFile`` (file-backed pages mapped and resident: the disk bank's pages in the page cache, which the kernel
  can write back and drop under memory pressure), both after ``malloc_trim(0)``; for 'disk', the bank's file
length and allocated blocks; and the
  wall time of the full flush.

On a CPU-only machine the fit's "device" is the CPU, so 'cpu' keeps the rows in the same memory as 'device' (it
shows the paging's cost, not a saving); the disk bank is the one that changes RSS: its tensors are file-backed,
so they leave ``RssAnon``, and its files stay sparse for the tasks never updated.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from common import (CLIP, LR, BoraStep, Tok, interleave, machine_info, make_lm, run_json, shared_copy,  # noqa: E402
                    summarize)
from task_scaling import BATCH, NUM_DOCS, PRESET, RANK, SEQ, batches, state_bytes  # noqa: E402

from bora.api import Bora  # noqa: E402
from bora.core.config import AdapterConfig, BoraConfig, FitConfig, PriorConfig  # noqa: E402

TASKS = (1000, 10000)
VARIANTS = {"eager": ("eager", "device"), "lazy": ("lazy", "device"), "lazy+cpu": ("lazy", "cpu"),
            "lazy+disk": ("lazy", "disk")}


def build(lm, T: int, variant: str) -> BoraStep:
    updates, bank = VARIANTS[variant]
    cfg = BoraConfig(adapter=AdapterConfig(rank=RANK, alpha=2.0 * RANK, targets=("q_proj", "v_proj"), layers=(-1,)),
                     prior=PriorConfig(tau_mode="learned"),
                     fit=FitConfig(guide="map", lr=LR, clip_norm=CLIP, precision="fp32", cache_prefix=False,
                                   task_updates=updates, task_bank=bank))
    b = Bora(cfg, shared_copy(lm), Tok(), [f"task{t}" for t in range(T)], NUM_DOCS, device="cpu")
    return BoraStep(None, None, T, "map", bora_obj=b, num_docs=NUM_DOCS, ntok_total=NUM_DOCS * (SEQ - 1))


def _status() -> dict:
    """MiB from /proc/self/status, after ``malloc_trim(0)`` (memory freed but kept by the C allocator is not
    counted; glibc only)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(rest.split()[0]) / 1024.0
    return out


def one_point(T: int, variant: str, steps: int) -> dict:
    """This process: build the fit, run ``1 + steps`` steps and one full flush; memory in MiB."""
    torch.manual_seed(0)
    v = build(make_lm(PRESET), T, variant)
    bs = batches(T)
    for k in range(1 + steps):
        v.step(bs[k % len(bs)])
    t0 = time.perf_counter()
    if hasattr(v.train_step, "flush_"):
        v.train_step.flush_()
    flush_s = time.perf_counter() - t0
    st = _status()
    rows = getattr(v.train_step, "rows", None)
    bank = rows.bank if rows is not None else None
    out = {"peak_rss_mb": st["VmHWM"], "rss_mb": st["VmRSS"], "rss_anon_mb": st["RssAnon"],
           "rss_file_mb": st["RssFile"], "rss_shmem_mb": st.get("RssShmem"), "flush_ms": 1e3 * flush_s,
           "bank_file_bytes": bank.file_bytes() if bank is not None else 0,
           "bank_disk_bytes": bank.disk_bytes() if bank is not None else 0,
           **{f"{k}_bytes": b for k, b in state_bytes(v).items()}}
    if bank is not None:
        v.train_step.release_()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, nargs="+", default=list(TASKS))
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--steps", type=int, default=8, help="steps of each memory point (after the first)")
    ap.add_argument("--point", nargs=2, metavar=("T", "VARIANT"), help=argparse.SUPPRESS)  # one subprocess
    ap.add_argument("--out", default=os.path.join(HERE, "results_task_bank.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.point:
        print(json.dumps(one_point(int(args.point[0]), args.point[1], args.steps)))
        return
    t_start = time.perf_counter()
    lm = make_lm(PRESET)
    out = {"setting": {"preset": PRESET, "rank": RANK, "targets": ["q_proj", "v_proj"], "layers": [-1],
                       "batch_size": BATCH, "seq_len": SEQ, "num_docs": NUM_DOCS, "tau_mode": "learned",
                       "precision": "fp32", "torch_threads": 1, "repeats": args.repeats,
                       "memory_steps": 1 + args.steps, "device": "cpu"},
           "machine": machine_info(), "points": {}}
    variants, steps = {}, {}
    for T in args.tasks:
        bs = batches(T)
        for name in VARIANTS:
            variants[f"{T}/{name}"] = v = build(lm, T, name)
            k = iter(range(10**9))
            steps[f"{T}/{name}"] = (lambda v=v, k=k, bs=bs: v.step(bs[next(k) % len(bs)]))
    times = interleave(steps, warmup=3, repeats=args.repeats, seed=0)
    for key in variants:
        T, name = key.split("/")
        s = summarize({key: times[key], "ref": times[f"{T}/lazy"]}, "ref")[key]
        out["points"][key] = {"T": int(T), "variant": name, "step_ms": s["median_ms"], "q25_ms": s["q25_ms"],
                              "q75_ms": s["q75_ms"], "ratio_vs_lazy": s["paired_ratio"]}
        print(f"T={T} {name}: {s['median_ms']:.1f} ms, x{s['paired_ratio']:.2f} vs lazy", flush=True)
    for v in variants.values():
        if hasattr(v.train_step, "release_"):
            v.train_step.release_()
    del variants, steps
    for T in args.tasks:
        for name in VARIANTS:
            out["points"][f"{T}/{name}"]["memory"] = run_json([__file__, "--point", T, name, "--steps", args.steps])
            print(f"T={T} {name}: {out['points'][f'{T}/{name}']['memory']}", flush=True)
    out["seconds"] = time.perf_counter() - t_start
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    write_markdown(out, os.path.join(os.path.dirname(args.out), "RESULTS_task_bank.md"))


def write_markdown(out: dict, path: str) -> None:
    pts = out["points"]
    st = out["setting"]
    lines = ["# The task bank: memory and step time (eager, lazy, lazy + 'cpu' bank, lazy + 'disk' bank)", "",
             "`python benchmarks/task_bank.py` (results_task_bank.json; the setting is benchmarks/task_scaling.py's, "
             f"on the CPU). Machine: {out['machine'].get('cpu_model')}, {st['torch_threads']} torch thread, "
             f"git {out['machine'].get('git')}; the whole run took {out['seconds']:.0f} s.", "",
             f"Step: median ms over {st['repeats']} interleaved rounds; ratio: paired, to lazy without a bank at the "
             f"same T. Memory (one subprocess per row, after {st['memory_steps']} steps and one full flush): peak RSS "
             "of the whole process (model and data included); RssAnon and RssFile at the end (/proc/self/status); "
             "the disk bank's file length and allocated blocks; the state column counts the task rows' and "
             "optimiser's tensors wherever they live.", "",
             "| T | variant | step ms | ratio vs lazy | full flush ms | state MiB | peak RSS MiB | RssAnon MiB | "
             "RssFile MiB | bank file MiB (allocated) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for key, p in pts.items():
        m = p.get("memory", {})
        state = (m.get("params_bytes", 0) + m.get("optimizer_bytes", 0)) / 2**20
        fb = m.get("bank_file_bytes", 0)
        bank = f"{fb / 2**20:.1f} ({m.get('bank_disk_bytes', 0) / 2**20:.1f})" if fb else "-"
        flush = "-" if p["variant"] == "eager" else f"{m.get('flush_ms', float('nan')):.1f}"
        lines.append(f"| {p['T']} | {p['variant']} | {p['step_ms']:.2f} | {p['ratio_vs_lazy']:.2f} | {flush} | "
                     f"{state:.1f} | {m.get('peak_rss_mb', float('nan')):.0f} | "
                     f"{m.get('rss_anon_mb', float('nan')):.0f} | {m.get('rss_file_mb', float('nan')):.0f} | {bank} |")
    lines += ["", READING, ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


READING = (
    "Reading: this machine has no accelerator, so the fit's device is the CPU and 'cpu' holds the rows in the same "
    "memory as 'device': its row shows what paging the batch's rows in and out costs per step, not a saving (on a "
    "GPU it moves the offsets and their moments, 3x the offsets' bytes, out of device memory). The disk bank's "
    "tensors are file-backed: they leave the anonymous memory (RssAnon) and appear, as far as they have been "
    "touched, as resident file pages (RssFile), which the kernel can write back and drop under memory pressure; "
    "peak RSS counts both. Its files start sparse (zero moments and counts, zero-initialised offsets take no "
    "blocks) and fill as tasks are updated; the full flush that each validation starts with reads every task's "
    "last-seen values and rewrites the rows of every task with pending shrinkage. Not moved by the bank: the "
    "global adapter and its AdamW state, the model, the steps' curvature accumulator of a learned tau, and, "
    "during a validation, the point evaluated (copied to the device "
    "whole) and the best state kept (a copy in CPU memory).")


if __name__ == "__main__":
    main()
