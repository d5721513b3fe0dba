"""Memory bora needs per task at scale: computed from the shapes, checked against measured peaks.

    python benchmarks/memory_scale.py                      # the table for 1B / 8B Llamas (no runs)
    python benchmarks/memory_scale.py --measure            # + measured peaks on this machine (~3 min)

Writes ``benchmarks/MEMORY.md``. Model shapes are the public configurations of Llama-3.2-1B
(hidden 2048, 16 layers, 32 query / 8 key-value heads of 64, MLP 8192) and Llama-3.1-8B (hidden
4096, 32 layers, 32 / 8 heads of 128, MLP 14336); adapters on all seven projections (bora's default
targets) of every layer, hierarchy B (one global ``A`` per module, a task-level ``B_t``). Bytes per
trainable fp32 value (bora keeps adapters and every Pyro site in fp32 whatever the base precision):

* MAP (AutoDelta): value + gradient + AdamW's two moments = 16 B;
* mean-field (AutoNormal): a location and a scale per value, each with gradient and two moments = 32 B;
* Laplace: the MAP fit's 16 B during training, then the posterior keeps the point and the
  per-coordinate Fisher (8 B; the Fisher pass itself holds one gradient per task coordinate, +4 B);
* the global adapter (``Theta_A``, ``Theta_B``) is counted once, not per task.

``--measure`` runs ``benchmarks/memory.py`` (one process per point, peak resident set size) for the
random-init "small" preset at two task counts per guide and compares the measured growth per task
with the computed bytes per task of that model.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: (hidden, layers, query heads, key-value heads, head dim, MLP width)
MODELS = {"Llama-3.2-1B": (2048, 16, 32, 8, 64, 8192), "Llama-3.1-8B": (4096, 32, 32, 8, 128, 14336)}
# per trainable value during the fit (Laplace: + Fisher); a lazy MAP step (--task-updates lazy) holds the value and
# AdamW's two moments per task value, and gradients only for the batch's rows
BYTES = {"map": 16, "map_lazy": 12, "meanfield": 32, "laplace": 16 + 4}
#: a learned tau of a point fit also accumulates every task value's Fisher from the steps (tau_curvature='steps')
CURVATURE_BYTES = 4
TASKS = (10, 100, 1000, 10000)
RANKS = (8, 16)


def module_shapes(hidden, layers, heads, kv, hd, mlp, targets=("q", "k", "v", "o", "gate", "up", "down")):
    """``(in, out)`` of every adapted projection of one decoder layer, times the number of layers."""
    shapes = {"q": (hidden, heads * hd), "k": (hidden, kv * hd), "v": (hidden, kv * hd), "o": (heads * hd, hidden),
              "gate": (hidden, mlp), "up": (hidden, mlp), "down": (mlp, hidden)}
    return [shapes[t] for t in targets] * layers


def per_task_values(shapes, r: int, hierarchy: str = "B") -> int:
    """Trainable values one task adds: ``B_t`` (out x r) per module, and ``A_t`` (r x in) for 'AB'."""
    return sum(out * r + (r * i if hierarchy == "AB" else 0) for i, out in shapes)


def global_values(shapes, r: int) -> int:
    return sum(out * r + r * i for i, out in shapes)


BEYOND = [
    "## Past one GPU's memory", "",
    "What bora supports today:",
    "- the default top-4-layer adapters (1B, rank 8: about 11 MiB of MAP state per task, so ~1,000 tasks in 12 GiB "
    "of state; the measured peak per task on CPU is about 1.0x the counted bytes for a lazy MAP step and "
    "1.2-1.5x for an eager MAP or mean-field step, below);",
    "- data-parallel fits (`torchrun`, README \"Many GPUs\"): `--parallel documents` splits the documents, "
    "`--parallel tasks` the tasks (each rank fits only its own tasks' rows; only the global adapter's gradients are "
    "all-reduced); every rank holds every task's offsets, and with `--parallel tasks --task-updates lazy` a rank "
    "keeps the optimiser state and step Fisher of its own tasks only (4 B per task value on every rank plus 12 on "
    "its owner: `4 + 12/N` B instead of 16 with N balanced ranks; measured with bora.fit.sharding.task_state_bytes "
    "on the tests' tiny 3-task fit, 9,456 B of task state in one process against 4,688 and 7,072 B on the two "
    "ranks owning 1 and 2 tasks), otherwise (documents, or eager updates) every rank holds every task's optimiser "
    "state too, the single-GPU figure above;",
    "- lazy task updates (`--task-updates lazy`): a step touches only the batch's tasks, so its time and transient "
    "memory do not grow with T (`benchmarks/RESULTS_task_scaling.md`); the state itself is still O(T);",
    "- a task bank for lazy fits (`--task-bank cpu|disk`, bora.fit.bank): every task's offsets and lazy-Adam state "
    "(the lazy step's 12 bytes per task value, not a learned tau's 4 of curvature) kept in CPU memory (pinned "
    "on CUDA) or in memory-mapped files, "
    "the batch's rows paged to the device per step, bit-identical to the fit without it "
    "(`benchmarks/RESULTS_task_bank.md`); validation still copies the point to the device whole;",
    "- a 4-/8-bit frozen base (`--load-in-4bit`/`--load-in-8bit`), which shrinks the base model, not the adapters.", "",
    "What it does not support (not implemented; the ways to get there):",
    "- task-sharded *offsets*: `--parallel tasks` keeps only a rank's own tasks' optimiser state, but every rank "
    "still holds every task's offsets (validation evaluates the whole point on every rank); validating each "
    "rank's own tasks and gathering to rank 0 only for writing would divide the last 4 B per value as well;",
    "- optimiser state sharded across ranks for eager updates or `--parallel documents` (ZeRO-1, e.g. "
    "`torch.distributed.optim.ZeroRedundancyOptimizer`), which divides the 12 of MAP's 16 bytes per value by the "
    "number of ranks;",
    "- a task bank in a multi-process fit (refused: `--parallel tasks` gathers every task's offsets on the "
    "device), and "
    "validation streamed through the bank by blocks of tasks (it evaluates the whole point on the device).", ""]


def gib(x: float) -> str:
    return f"{x / 2**30:.3g}"


def table() -> list[str]:
    lines = ["| model | rank | per-task values | MAP / task | mean-field / task | "
             + " | ".join(f"MAP T={t:,}" for t in TASKS) + " | " + " | ".join(f"MF T={t:,}" for t in TASKS) + " |",
             "|" + "---|" * (5 + 2 * len(TASKS))]
    for name, dims in MODELS.items():
        sh = module_shapes(*dims)
        for r in RANKS:
            n, g = per_task_values(sh, r), global_values(sh, r)
            row = [name, str(r), f"{n / 1e6:.2f} M", f"{n * BYTES['map'] / 2**20:.0f} MiB",
                   f"{n * BYTES['meanfield'] / 2**20:.0f} MiB"]
            row += [gib((t * n + g) * BYTES["map"]) + " GiB" for t in TASKS]
            row += [gib((t * n + g) * BYTES["meanfield"]) + " GiB" for t in TASKS]
            lines.append("| " + " | ".join(row) + " |")
    return lines


def measure(tasks=(16, 512), variants=("map", "map_lazy", "meanfield"), steps=2) -> list[dict]:
    """Peak RSS of ``memory.py`` per (variant, T) on the small preset (all seven targets, all layers)."""
    out = []
    for v in variants:
        for t in tasks:
            cmd = [sys.executable, str(HERE / "memory.py"), "--variant", v, "--preset", "small", "--tasks", str(t),
                   "--targets", "all7", "--steps", str(steps), "--seq-len", "64", "--batch-size", "8"]
            env = dict(os.environ, MALLOC_ARENA_MAX="2", OMP_NUM_THREADS="1")
            res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
                             .stdout.strip().splitlines()[-1])
            res["tasks"] = t
            out.append(res)
            print(json.dumps(res), file=sys.stderr, flush=True)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--measure", action="store_true", help="also measure peaks on the small preset")
    ap.add_argument("--md", default=str(HERE / "MEMORY.md"))
    a = ap.parse_args(argv)
    lines = ["# Memory per task at scale", "",
             f"Computed by `python benchmarks/memory_scale.py{' --measure' if a.measure else ''}` "
             "(see its docstring for the assumptions). Adapters on all 7 projections of every layer, hierarchy B, "
             "fp32 adapters and optimiser state; the frozen base model, activations and the frozen-prefix cache "
             "come on top and do not grow with the number of tasks (the cache grows with the documents).", ""]
    lines += table()
    ab = {name: per_task_values(module_shapes(*d), 8, "AB") / per_task_values(module_shapes(*d), 8)
          for name, d in MODELS.items()}
    lines += ["", "bora's default adapts only the top 4 layers: divide the per-task figures by 4 (1B) or 8 (8B). "
              "Hierarchy 'AB' (task-level A_t too) multiplies them by "
              + ", ".join(f"{v:.2f} ({k})" for k, v in ab.items()) + ".", "", *BEYOND]
    if a.measure:
        from common import PRESETS  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

        p = PRESETS["small"]
        hd = p["hidden_size"] // p["num_attention_heads"]
        sh = module_shapes(p["hidden_size"], p["num_hidden_layers"], p["num_attention_heads"],
                           p["num_key_value_heads"], hd, p["intermediate_size"])
        n = per_task_values(sh, 8)
        rows = measure()
        lines += ["## Measured on this machine (random-init 'small' Llama, rank 8, all 7 targets, all 4 layers)", "",
                  "| guide | T | peak RSS (MiB) | trainable values |", "|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['variant']} | {r['tasks']} | {r['peak_rss_mb']:.0f} | {r.get('trainable', 0):,} |")
        lines += ["", "| guide | computed MiB per task | measured MiB per task (slope between the two T) | ratio |",
                  "|---|---|---|---|"]
        ratios = {}
        for v in ("map", "map_lazy", "meanfield"):
            a_, b_ = [r for r in rows if r["variant"] == v]
            slope = (b_["peak_rss_mb"] - a_["peak_rss_mb"]) / (b_["tasks"] - a_["tasks"])
            calc = n * (BYTES[v] + (CURVATURE_BYTES if v.startswith("map") else 0)) / 2**20
            ratios[v] = slope / calc
            lines.append(f"| {v} | {calc:.3f} | {slope:.3f} | {slope / calc:.2f} |")
        lines += ["", "The measured growth per task against the bytes counted for it: "
                  + ", ".join(f"{v} {r:.2f}x" for v, r in ratios.items())
                  + " (counted: 16 B per value for an eager MAP step, 12 B for a lazy one, 32 B for mean-field, "
                  "and for the point fits' learned tau 4 B more: the Fisher accumulated from the steps, for the "
                  "task-level factor only, B_t under hierarchy B). "
                  "An eager step also holds every task's adapter in natural coordinates (theta_t = Theta + delta_t), "
                  "its gradient and the prior's elementwise temporaries, each T x values x 4 B; a lazy step "
                  "(`--task-updates lazy`, bora.fit.lazy) touches only the batch's tasks."]
        lines += ["", f"Per-task trainable values computed from the shapes: {n:,} (memory.py counts "
                  f"{(rows[1]['trainable'] - rows[0]['trainable']) // (rows[1]['tasks'] - rows[0]['tasks']):,}).", ""]
    Path(a.md).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    main()
