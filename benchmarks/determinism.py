"""Two fits of the embedded default with one seed, in one process: are their adapters bit-identical?

    python benchmarks/determinism.py --steps 10 --json benchmarks/results_determinism.json

Loads SmolLM2 once, fits the default hierarchy (MAP, fp32, ``--steps`` steps, validating every 10) twice from
the same seed and compares the two guides' parameters. Before the multi-task layer gathered task adapters with
``index_select`` (its backward sums a task's rows in a fixed order), the two fits drifted apart on a 2-thread
CPU within a few steps.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    from bora import Bora, BoraConfig, FitConfig
    from bora.lora.base import load_base_model

    cfg = BoraConfig(fit=FitConfig(guide="map", steps=a.steps, eval_every=10, precision="fp32"))
    lm, tok = load_base_model(cfg.model, device=torch.device("cpu"))
    runs = []
    for _ in range(2):
        bora, data = Bora.from_config(cfg, lm=lm, tokenizer=tok)
        feeds = {k: bora.feed(data[k]) for k in ("train", "val")}
        t0 = time.perf_counter()
        res = bora.fit(feeds["train"], feeds["val"], progress=False)
        runs.append(({k: v.detach().clone() for k, v in bora.guide.state_dict().items()},
                     [h.get("val_nll") for h in res.history], time.perf_counter() - t0))
        bora.remove_adapters_()
    (a0, h0, t0), (a1, h1, t1) = runs
    out = {"command": "python benchmarks/determinism.py " + " ".join(f"--{k} {v}" for k, v in vars(a).items()
                                                                      if v is not None and k != "json"),
           "threads": torch.get_num_threads(), "torch": torch.__version__, "machine": platform.processor()
           or platform.machine(), "steps": a.steps,
           "max_abs_diff": max(float((a0[k] - a1[k]).abs().max()) for k in a0),
           "identical": all(torch.equal(a0[k], a1[k]) for k in a0), "val_nll": [h0, h1], "seconds": [t0, t1]}
    print(json.dumps({k: out[k] for k in ("threads", "steps", "max_abs_diff", "identical")}))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
