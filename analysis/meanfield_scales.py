"""Mean-field posterior scales against the Laplace posterior of the MAP fit it was warm-started from.

    python analysis/meanfield_scales.py runs/mf runs/shakespeare

For every task coordinate of every adapted module (the task sites ``theta_B`` / ``theta_A``) it compares the
mean-field guide's posterior sd with the Laplace posterior sd ``(F + tau)^-1/2`` of the same coordinate, and
prints the median ratio, its 10%/90% quantiles, both medians, and the two fits' tau. Writes nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def compare(mf_dir: Path, map_dir: Path, load=None) -> dict:
    """The comparison (a dict); ``load(path) -> Bora`` loads a fit (default: ``Bora.load(path, device="cpu")``)."""
    import torch
    from torch.distributions import transform_to

    from bora.api import Bora
    from bora.model.distributions import natural_site
    from bora.model.guides import guide_params

    load = load or (lambda path: Bora.load(path, device="cpu"))
    mf, mp = load(mf_dir), load(map_dir)
    if mf.config.fit.guide != "meanfield":
        sys.exit(f"bora: error: {mf_dir} is not a mean-field fit")
    if mp.laplace is None:
        sys.exit(f"bora: error: {map_dir} has no Laplace posterior (run `bora laplace {map_dir}`)")
    positive = transform_to(mf.guide.scale_constraint)
    order = [mp.tasks.index(t) for t in mf.tasks]
    ratios, sd_mf, sd_lap = [], [], []
    for site, roles in guide_params(mf.guide).items():
        base, form = natural_site(site)
        kind, _, key = base.partition(":")
        if not kind.startswith("theta_") or "scale" not in roles or form not in (None, "centred"):
            continue
        factor = 0 if kind.endswith("_A") else 1
        s_mf = positive(roles["scale"].detach())
        s_lap = mp.laplace.task_sd(key, factor)[order]
        ratios.append((s_mf / s_lap).flatten())
        sd_mf.append(s_mf.flatten())
        sd_lap.append(s_lap.flatten())
    if not ratios:
        sys.exit("bora: error: no centred mean-field task sites to compare")
    r, a, b = torch.cat(ratios), torch.cat(sd_mf), torch.cat(sd_lap)
    q = torch.quantile(r[torch.randperm(len(r), generator=torch.Generator().manual_seed(0))[:1_000_000]],
                       torch.tensor([0.1, 0.5, 0.9]))
    return {"coordinates": len(r), "ratio_q10": float(q[0]), "ratio_median": float(q[1]), "ratio_q90": float(q[2]),
            "median_sd_meanfield": float(a.median()), "median_sd_laplace": float(b.median()),
            "tau_meanfield": mf.tau_estimate(), "tau_map": mp.tau_estimate()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("meanfield", type=Path, help="a mean-field fit folder")
    p.add_argument("map", type=Path, help="the MAP fit folder with a Laplace posterior it started from")
    args = p.parse_args(argv)
    res = compare(args.meanfield, args.map)
    print(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
