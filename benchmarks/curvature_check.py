"""Validate the tau update's cheap curvature against the separate Fisher pass, at the same points.

    python benchmarks/curvature_check.py                 # the embedded default, every default setting
    python benchmarks/curvature_check.py --tiny          # smoke run (seconds)

Runs one learned-tau MAP fit whose tau updates use today's estimator, the separate pass
(``tau_curvature='pass'``: ``fisher_docs`` documents per task at the current point), while
step accumulators (``tau_curvature='steps'``: the plain sum since the last update, and
recency-weighted ones with a memory of 1/2, 1/4 and 1/8 epoch, and the plain sum rescaled by each recency
accumulator's pooled total, and the plain sum corrected by probe documents as ``tau_probe_docs`` does, with
2, 4 and 8 probes per task and a global or per-module ratio) record the same training steps. At
every update each accumulator's Fisher is turned into a tau with the same ``S``, so the estimators
are compared on identical adapters. Prints one JSON line per update (relative difference of each
accumulator's tau to the pass's) and the largest absolute difference of each; ``--json`` saves them.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny random model and data (smoke run)")
    ap.add_argument("--fisher-docs", type=int, default=None, help="documents per task of the reference pass")
    ap.add_argument("--probe-docs", type=int, nargs="*", default=[2, 4, 8],
                    help="probe documents per task of the probe-corrected step estimators")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    from bora.api import Bora
    from bora.core.config import AdapterConfig, BoraConfig, FitConfig, PriorConfig
    from bora.core.seeding import stream_seed
    from bora.fit.fisher import task_fisher
    from bora.fit.tau import evidence_tau

    if a.tiny:
        from bora.lora.base import tiny_model
        from bora.data.documents import TokenizedSplit

        lm, tok = tiny_model()
        g = torch.Generator().manual_seed(0)
        ids = [torch.randint(2, 90, (int(torch.randint(6, 14, (1,), generator=g)),), generator=g) for _ in range(48)]
        tids = torch.tensor([i % 3 for i in range(48)])
        for x, t in zip(ids, tids.tolist()):
            x[::2] = 2 + t
        train = TokenizedSplit(ids, tids, ("a", "b", "c"))
        cfg = BoraConfig(model="tiny", adapter=AdapterConfig(rank=2, targets=("q_proj", "v_proj"), layers=(-1,)),
                         prior=PriorConfig(tau_mode="learned", tau=10.0),
                         fit=FitConfig(guide="map", epochs=4, batch_size=8, lr=2e-2, fisher_docs=16,
                                       tau_curvature="steps", patience=0))
        bora = Bora(cfg, lm, tok, train.tasks, len(train))
        data = {"train": train, "val": train}
    else:
        cfg = BoraConfig(fit=FitConfig(guide="map", tau_curvature="steps"))
        bora, data = Bora.from_config(cfg)
    feeds = {k: bora.feed(data[k]) for k in ("train", "val")}
    docs = a.fisher_docs or bora.config.fit.fisher_docs
    gen = torch.Generator().manual_seed(stream_seed(cfg.fit.seed, "fisher"))
    per_epoch = -(-len(data["train"]) // cfg.fit.batch_size)
    memories = {"epoch sum": None, **{f"memory {m:g} steps": m for m in (per_epoch / 2, per_epoch / 4, per_epoch / 8)}}
    probes = {f"probe {k} docs {by}": (k, by) for k in a.probe_docs for by in ("global", "module")}
    rows = []
    t0 = time.perf_counter()
    import bora.fit.callbacks as callbacks_mod
    from bora.data.batching import distinct_task_batches
    from bora.fit.curvature import StepFisher

    probe_gen = torch.Generator().manual_seed(cfg.fit.seed + 0x9B0E)
    kmax = max(a.probe_docs, default=0)

    class Probe(StepFisher):
        """Feeds several step accumulators; hands the fit the reference pass, so the fit follows today's estimator."""

        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            self.extras = {name: StepFisher(*args, **{**kw, "memory": m}) for name, m in memories.items()}
            self.probed = {name: StepFisher(*args, **kw) for name in probes}

        def _all(self):
            return [*self.extras.values(), *self.probed.values()]

        def begin_step(self, *args, **kw):
            for e in self._all():
                e.begin_step(*args, **kw)

        def sink(self, *args):
            for e in self._all():
                e.sink(*args)

        def reset_(self):
            for e in self._all():
                e.reset_()

        def set_probe_(self, rows, num_docs):
            """Nested probe sets (the first k of kmax per task); the fit itself keeps the reference pass."""
            if not kmax:
                return
            batches = list(distinct_task_batches(feeds["train"].split, kmax, generator=probe_gen))
            for name, (k, _) in probes.items():
                self.probed[name].set_probe_(torch.cat(batches[:k]), num_docs)

        def probe_rows(self):
            return torch.zeros(0, dtype=torch.long)

        def task_fisher(self):
            point = bora.point()
            params = bora.model.params_from_values(point)
            ref = task_fisher(bora.model, params, feeds["train"], max_per_task=docs, generator=gen)
            P = bora.model.prior
            corrected = {}
            for name, (k, by) in probes.items():
                e = self.probed[name]
                end = task_fisher(bora.model, params, feeds["train"], rows=e.probe_rows())
                corrected[name] = e.probe_corrected(end, by)[0]
            for name, keys in bora.model.tau_groups().items():
                S, F = bora.tau.statistics(point, ref, keys)
                row = {"update": len(rows) + 1, "tau_pass": evidence_tau(S, F, P.tau_shape, P.tau_rate),
                       "time": time.perf_counter() - t0}
                fishers = {label: bora.tau.statistics(point, e.task_fisher(), keys)[1]
                           for label, e in self.extras.items()}
                for label, Fe in fishers.items():
                    row[label] = evidence_tau(S, Fe, P.tau_shape, P.tau_rate) / row["tau_pass"] - 1
                # the epoch sum rescaled by one scalar: how much larger the recent steps' Fisher is, pooled over
                # every task and coordinate (per-task recency starves small tasks; a pooled ratio does not)
                total = float(fishers["epoch sum"].sum())
                for label, Fe in fishers.items():
                    if label != "epoch sum" and total > 0:
                        scaled = fishers["epoch sum"] * (float(Fe.sum()) / total)
                        row[f"epoch sum x pooled ratio of {label}"] = (
                            evidence_tau(S, scaled, P.tau_shape, P.tau_rate) / row["tau_pass"] - 1)
                for label, tf in corrected.items():
                    Fe = bora.tau.statistics(point, tf, keys)[1]
                    row[label] = evidence_tau(S, Fe, P.tau_shape, P.tau_rate) / row["tau_pass"] - 1
                rows.append(row)
                print(json.dumps(row), flush=True)
            return ref

    callbacks_mod.StepFisher = Probe  # the learned-tau callback builds its accumulator from this name
    res = bora.fit(feeds["train"], feeds["val"], progress=False)
    labels = [k for k in (rows[0] if rows else {}) if k not in ("update", "tau_pass", "time")]
    worst = {label: max((abs(r[label]) for r in rows if label in r), default=float("nan")) for label in labels}
    out = {"updates": rows, "max_abs_rel_diff": worst, "final_tau": res.tau, "best_step": res.best_step,
           "steps": res.steps, "config": bora.config.to_dict(), "reference_fisher_docs": docs}
    print(json.dumps({"max_abs_rel_diff": worst, "final_tau": res.tau}))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
