"""Settings of several tau_sweep runs compared over fitting seeds: a paired bootstrap over documents and seeds.

    python analysis/sweep_seeds.py \
        --a "analysis/results/fortunes/integrated_s0::learned (MAP, evidence)" \
        --a "analysis/results/fortunes/integrated_s1::learned (MAP, evidence)" \
        --b "analysis/results/fortunes/s0::shared" --b "analysis/results/fortunes/s1::shared" \
        --out analysis/results/fortunes/integrated_vs_shared_3seeds.json

Each ``--a``/``--b`` is ``FOLDER::SETTING``: one setting's per-document test NLL in an ``analysis/tau_sweep.py``
output folder (``test_doc_nll.json``), or a baseline's JSON written by ``analysis/per_task_lora.py`` (``doc_nll``,
``tokens``, ``task_ids``), one per fitting seed, paired by position (the k-th ``--a`` with the k-th
``--b``). Every run must hold the same test documents in the same order (checked: the data split does not depend
on the fitting seed). The JSON holds both sides' per-seed perplexity, the interval of
:func:`bora.evaluation.evaluate.seeds_bootstrap` (2000 resamples of documents within tasks and of seeds, 95%) and
the sources, so that the figure can be recomputed from the committed files.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _read(spec: str) -> tuple[list, list, list]:
    """``(per-document NLL, tokens, task ids)`` of one ``FOLDER::SETTING`` or baseline ``FILE.json`` spec."""
    folder, sep, setting = spec.partition("::")
    if not sep and spec.endswith(".json"):  # analysis/per_task_lora.py's output
        base = json.loads(Path(spec).read_text())
        if not {"doc_nll", "tokens", "task_ids"} <= set(base):
            sys.exit(f"sweep_seeds: {spec} holds no doc_nll/tokens/task_ids (written by analysis/per_task_lora.py?)")
        return base["doc_nll"], base["tokens"], base["task_ids"]
    if not sep:
        sys.exit(f"sweep_seeds: expected FOLDER::SETTING or a baseline's FILE.json, got {spec!r}")
    docs = json.loads((Path(folder) / "test_doc_nll.json").read_text())
    if setting not in docs:
        sys.exit(f"sweep_seeds: {folder} has no setting {setting!r} (it has {sorted(docs)})")
    return docs[setting], docs["_tokens"], docs["_task_ids"]


def _side(specs: list[str]) -> tuple[list, list, list]:
    """``(per-seed NLL lists, tokens, task ids)`` of ``FOLDER::SETTING`` (or baseline ``FILE.json``) specs."""
    rows, toks, tids = [], None, None
    for spec in specs:
        nll, tk, ti = _read(spec)
        if toks is None:
            toks, tids = tk, ti
        elif tk != toks or ti != tids:
            sys.exit(f"sweep_seeds: {spec} holds other test documents than {specs[0]}")
        rows.append(nll)
    return rows, toks, tids


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--a", action="append", required=True, help="FOLDER::SETTING, once per seed")
    p.add_argument("--b", action="append", required=True, help="FOLDER::SETTING, once per seed (the reference)")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    if len(a.a) != len(a.b):
        sys.exit(f"sweep_seeds: {len(a.a)} --a runs against {len(a.b)} --b runs; give one of each per seed")
    from bora.core.files import write_json
    from bora.evaluation.evaluate import seeds_bootstrap

    na, toks, tids = _side(a.a)
    nb, toks_b, tids_b = _side(a.b)
    if toks_b != toks or tids_b != tids:
        sys.exit("sweep_seeds: the --a and --b runs hold other test documents")
    r = seeds_bootstrap(na, nb, toks, tids, resamples=2000, level=0.95)
    out = {"a": a.a, "b": a.b, "ppl_a": r["a"], "ppl_b": r["b"], "diff": r["diff"], "lo": r["lo"], "hi": r["hi"],
           "rel": r["diff"] / r["b"], "per_seed": r["per_seed"], "frac_a_lower": r["frac_a_lower"],
           "seeds": r["seeds"], "resamples": r["resamples"], "level": r["level"]}
    write_json(a.out, out)
    print(f"a - b = {r['diff']:+.3f} ppl ({100 * out['rel']:+.2f}%), 95% interval [{r['lo']:+.3f}, {r['hi']:+.3f}] "
          f"over {r['seeds']} seeds (a {r['a']:.3f}, b {r['b']:.3f}; per seed "
          + ", ".join(f"{d:+.3f}" for d in r["per_seed"]) + ")")
    return out


if __name__ == "__main__":
    main()
