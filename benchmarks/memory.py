"""Peak memory of one training variant, measured alone in this process (run by ``run.py --sections memory``).

    python benchmarks/memory.py --variant map --preset small --tasks 64 --steps 3

Prints one JSON line: the process's peak resident set size after building the LM and the variant
and running ``--steps`` optimiser steps (``peak_rss_mb``), the peak before the variant was built
(LM only), and on CUDA ``torch.cuda.max_memory_allocated``.

``peak_rss_mb`` is ``VmHWM`` from ``/proc/self/status``: the high-water mark of this program's own
address space. ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` is reported too (``ru_maxrss_mb``) but
is not used: Linux carries it over fork and exec, so a child started by a large parent (the runner,
about 1 GB) reports at least the parent's size. Both agree when this script is started from a shell.
Variant ``lm`` builds the LM, runs one no-grad forward pass and stops: the floor every variant shares.
Every variant imports the same modules (torch, transformers, peft, pyro, bora), so the
differences are what the variants themselves allocate.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import common as C  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", required=True,
                    choices=["lm", "plain", "map", "map_lazy", "meanfield", "hand_map", "hand_mf", "loop"])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--smollm2", action="store_true", help="use the real SmolLM2-135M instead of --preset")
    ap.add_argument("--tasks", type=int, default=64)
    ap.add_argument("--distinct", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--top-layers", type=int, default=0, help="adapt only the top k layers (0: all)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tau-mode", default="learned")
    ap.add_argument("--targets", default="q_proj,v_proj", help="as in run.py (all7, bora, or a list)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    import peft  # noqa: F401  (same imports in every variant)
    import peft.tuners.lora  # noqa: F401

    if a.smollm2:
        from bora.lora.base import load_base_model

        lm, _ = load_base_model("smollm2", device=a.device)
    else:
        lm = C.make_lm(a.preset, device=a.device)
    L = lm.config.num_hidden_layers
    batch = C.make_batch(lm.config.vocab_size, a.tasks, min(a.distinct, a.tasks), batch_size=a.batch_size,
                         seq_len=a.seq_len, device=a.device)
    gc.collect()
    rss_lm = C.peak_rss_mb()
    if a.variant == "lm":
        with torch.no_grad(), C.autocast(a.device):
            C.token_nll_sum(lm, batch)
    else:
        v = C.make_variant(a.variant, lm, batch, a.tasks, layers=C.adapter_layers(L, a.top_layers),
                           device=a.device, tau_mode=a.tau_mode, targets=C.parse_targets(a.targets))
        for _ in range(a.steps):
            v.step()
    out = {"variant": a.variant, "peak_rss_mb": C.peak_rss_mb(), "peak_rss_before_variant_mb": rss_lm,
           "ru_maxrss_mb": C.maxrss_mb(), "lm_params": C.count_params(lm)}
    if a.variant != "lm":
        out["trainable"] = v.num_trainable()
    if torch.device(a.device).type == "cuda":
        out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
