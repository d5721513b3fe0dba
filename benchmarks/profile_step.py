"""Profile one or more benchmark variants: where does a step's time go?

    python benchmarks/profile_step.py --variants plain,hand_map,map --tasks 64 --steps 5
    python benchmarks/profile_step.py --variants map --torch      # also a torch.profiler operator table

For each variant: the interleaved median step time, then (after the timing) a cProfile of ``--steps``
steps, summarised as time spent in Python frames of pyro / torch.optim / bora / transformers / peft
(cumulative) and the top functions by own time; with ``--torch``, a torch.profiler table of the top
operators by self CPU time. Pieces of the bora step are also timed separately (``--pieces``): the
guide alone, the model's prior alone (``sample_adapters`` under the guide's values), the Trace_ELBO
bookkeeping, the optimiser and the gradient clipping; ``--pieces-torch`` profiles that Pyro side
with torch.profiler.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import common as C  # noqa: E402


def cprofile_groups(stats: pstats.Stats, total: float) -> dict:
    """Cumulative time of the outermost frames of each package (approximate: counts each package once per stack)."""
    groups = {"pyro": "/pyro/", "torch.optim": "/torch/optim/", "bora": "/bora/", "transformers": "/transformers/",
              "peft": "/peft/", "torch.distributions": "/torch/distributions/", "clip_grad": "clip_grad"}
    out = {}
    for g, pat in groups.items():
        best = 0.0
        for (file, line, fn), (cc, nc, tt, ct, callers) in stats.stats.items():
            if pat in file:
                # a frame whose callers are all outside the package is an entry point
                if not any(pat in c[0] for c in callers):
                    best += ct
        out[g] = best
    out["total"] = total
    return out


def time_pieces(v: C.BoraStep, n: int) -> dict:
    """Separate timings of the pieces of a bora step (no backward through the LM)."""
    from pyro import poutine

    guide = v.bora.guide
    model = v.model
    batch = v.batch
    res = {}

    def t(f, k):
        f()
        ts = []
        for _ in range(n):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
        res[k] = C.median(ts) * 1e3

    t(lambda: guide(batch), "guide forward (ms)")

    def prior_only():
        tr = poutine.trace(guide).get_trace(batch)
        with poutine.replay(trace=tr):
            model.sample_adapters()

    t(prior_only, "guide + model prior sites, no LM (ms)")

    def prior_logprob():
        tr = poutine.trace(guide).get_trace(batch)
        with poutine.trace() as tm, poutine.replay(trace=tr):
            model.sample_adapters()
        mt = tm.trace
        mt.log_prob_sum()
        tr.log_prob_sum()

    t(prior_logprob, "guide + prior sites + log_prob sums, no LM (ms)")

    def prior_logprob_bwd():
        tr = poutine.trace(guide).get_trace(batch)
        with poutine.trace() as tm, poutine.replay(trace=tr):
            model.sample_adapters()
        (tm.trace.log_prob_sum() - tr.log_prob_sum()).backward()

    v.opt.zero_grad(set_to_none=True)
    t(prior_logprob_bwd, "... + backward (ms)")
    v.opt.zero_grad(set_to_none=True)
    v.step()
    t(lambda: torch.nn.utils.clip_grad_norm_(v.params, C.CLIP), "clip_grad_norm_ (ms)")
    t(lambda: v.opt.step(), "AdamW step (ms)")
    return res


def torch_table_pieces(v: C.BoraStep, n: int = 5) -> str:
    """torch.profiler operator table of the Pyro side of a bora step alone (guide, prior, log-probs, backward)."""
    from pyro import poutine
    from torch.profiler import ProfilerActivity, profile

    guide, model, batch = v.bora.guide, v.model, v.batch

    def piece():
        tr = poutine.trace(guide).get_trace(batch)
        with poutine.trace() as tm, poutine.replay(trace=tr):
            model.sample_adapters()
        (tm.trace.log_prob_sum() - tr.log_prob_sum()).backward()

    for _ in range(2):
        piece()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(n):
            piece()
    v.opt.zero_grad(set_to_none=True)
    return f"({n} repetitions)\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="plain,hand_map,map")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--tasks", type=int, default=64)
    ap.add_argument("--distinct", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tau-mode", default="learned")
    ap.add_argument("--targets", default="q_proj,v_proj", help="as in run.py (all7, bora, or a list)")
    ap.add_argument("--torch", action="store_true", help="torch.profiler operator table")
    ap.add_argument("--pieces", action="store_true", help="time the pieces of bora steps separately")
    ap.add_argument("--pieces-torch", action="store_true",
                    help="torch.profiler table of the Pyro side of bora steps alone (no LM)")
    ap.add_argument("--no-validation", action="store_true", help="pyro.enable_validation(False) first")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.no_validation:
        import pyro

        pyro.enable_validation(False)
    lm = C.make_lm(a.preset)
    batch = C.make_batch(lm.config.vocab_size, a.tasks, min(a.distinct, a.tasks), batch_size=a.batch_size,
                         seq_len=a.seq_len)
    vs = {k: C.make_variant(k, C.shared_copy(lm), batch, a.tasks, tau_mode=a.tau_mode,
                            targets=C.parse_targets(a.targets))
          for k in a.variants.split(",")}
    times = C.interleave({k: v.step for k, v in vs.items()}, warmup=2, repeats=a.repeats)
    summ = C.summarize(times, "plain" if "plain" in vs else None)
    print("== interleaved step times")
    for k, e in summ.items():
        print(f"  {k:10s} median {e['median_ms']:7.1f} ms  paired ratio {e.get('paired_ratio', float('nan')):.3f}")
    for k, v in vs.items():
        pr = cProfile.Profile()
        t0 = time.perf_counter()
        pr.enable()
        for _ in range(a.steps):
            v.step()
        pr.disable()
        total = (time.perf_counter() - t0) / a.steps * 1e3
        st = pstats.Stats(pr)
        g = cprofile_groups(st, total * a.steps / 1e3)
        print(f"== cProfile {k}: {total:.1f} ms/step (with profiler overhead)")
        print("  cumulative ms/step in entry frames: " +
              ", ".join(f"{n} {x / a.steps * 1e3:.1f}" for n, x in g.items() if n != "total"))
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(18)
        print("\n".join("  " + line for line in s.getvalue().splitlines()[6:32]))
        if a.torch:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(2):
                    v.step()
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
        if a.pieces and isinstance(v, C.BoraStep):
            print(f"== pieces of {k}")
            for n, x in time_pieces(v, 10).items():
                print(f"  {n:50s} {x:8.2f}")
        if a.pieces_torch and isinstance(v, C.BoraStep):
            print(f"== torch.profiler of the Pyro side of {k}")
            print(torch_table_pieces(v))


if __name__ == "__main__":
    main()
