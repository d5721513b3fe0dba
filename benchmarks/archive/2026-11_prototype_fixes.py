"""Measure candidate fixes for bora's Pyro overhead without touching ``src/`` (monkeypatched, per instance).

    python benchmarks/prototype_fixes.py --tasks 64 --repeats 12

Not part of the benchmark runner: evidence for changes to ``src/bora``. Variants, interleaved:

``plain`` / ``hand_map`` / ``hand_mf``  as in ``common.py`` (the references);
``map`` / ``meanfield``                 stock bora;
``map_noval`` / ``mf_noval``            stock, with ``pyro.validation_enabled(False)`` around the step;
``map_fast``   (1) the model's Gaussian priors as a scalar-scale isotropic Normal whose ``log_prob`` sums
               the event dims in three passes (torch's ``Normal`` broadcasts the scalar scale to the full
               shape and spends ~10 elementwise passes: ``scale**2``, ``scale.log()``, ...), no argument
               validation; (2) an AutoDelta whose Delta sites are ``.mask(False)``: the MAP guide's
               log-density is identically 0, masking skips computing ``(x == v).log()`` per site;
               plus validation off;
``mf_fast``    (1) + a mean-field guide that samples each site from a diagonal Normal directly (no
               auxiliary ``_unconstrained`` site, identity transform, zero Jacobian and Delta site, which
               is what AutoNormal does for every real-valued site) and whose ``log_prob`` of its own
               sample reuses the standard-normal draw; plus validation off.
``*_fused``    the same with ``torch.optim.AdamW(..., fused=True)`` instead of the default foreach AdamW.

A variant may name its task count, ``kind@T`` (e.g. ``map@1,map@256,map_fast_fused@256``), to
compare task counts in one interleaved run (the mixed-task flatness).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import types
from contextlib import ExitStack

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import common as C  # noqa: E402
import pyro  # noqa: E402
import pyro.distributions as dist  # noqa: E402
from pyro.distributions import constraints  # noqa: E402
from pyro.infer.autoguide import AutoDelta, AutoNormal  # noqa: E402

import bora.model.hierarchy as bora_model  # noqa: E402

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


class IsoNormal2(dist.TorchDistribution):
    """``Normal(loc, scale).to_event(2)`` for a scalar ``scale``: log_prob in three elementwise passes."""

    arg_constraints = {}
    support = constraints.independent(constraints.real, 2)
    has_rsample = True

    def __init__(self, loc, scale):
        self.loc = loc
        self.scale = torch.as_tensor(scale, dtype=loc.dtype, device=loc.device)
        super().__init__(loc.shape[:-2], loc.shape[-2:], validate_args=False)

    def expand(self, batch_shape, _instance=None):
        return IsoNormal2(self.loc.expand(*batch_shape, *self.event_shape), self.scale)

    def rsample(self, sample_shape=torch.Size()):
        shape = self._extended_shape(sample_shape)
        return self.loc.expand(shape) + self.scale * torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)

    def log_prob(self, value):
        n = value.shape[-1] * value.shape[-2]
        sq = (value - self.loc).square().sum((-2, -1))
        return sq * (-0.5 / self.scale.square()) - n * (self.scale.log() + LOG_SQRT_2PI)


class _FastDist(types.SimpleNamespace):
    """Stands in for ``pyro.distributions`` inside ``bora.model`` while the model runs."""


class _NormalToEvent:
    def __init__(self, loc, scale):
        self.loc, self.scale = loc, scale

    def to_event(self, n):
        assert n == 2
        return IsoNormal2(self.loc, self.scale)


FAST = _FastDist(Normal=_NormalToEvent, Gamma=dist.Gamma)


def fast_prior(model):
    """Per-instance: run ``sample_adapters`` with the isotropic prior."""

    def sample_adapters(self):
        old = bora_model.dist
        bora_model.dist = FAST
        try:
            return type(self).sample_adapters(self)
        finally:
            bora_model.dist = old

    model.sample_adapters = types.MethodType(sample_adapters, model)


class MaskedAutoDelta(AutoDelta):
    def forward(self, *args, **kwargs):
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        plates = self._create_plates(*args, **kwargs)
        result = {}
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            with ExitStack() as stack:
                for frame in site["cond_indep_stack"]:
                    if frame.vectorized:
                        stack.enter_context(plates[frame.name])
                v = getattr(self, name)
                result[name] = pyro.sample(name, dist.Delta(v, event_dim=site["fn"].event_dim).mask(False))
        return result


class DiagNormal(dist.TorchDistribution):
    """Diagonal Normal with ``event_dim`` summed; ``log_prob`` of its own last sample reuses the draw."""

    arg_constraints = {}
    support = constraints.real
    has_rsample = True

    def __init__(self, loc, scale, event_dim):
        self.loc, self.scale = loc, scale
        self._last = None
        super().__init__(loc.shape[: loc.dim() - event_dim], loc.shape[loc.dim() - event_dim:], validate_args=False)
        self.support = constraints.independent(constraints.real, event_dim)

    def rsample(self, sample_shape=torch.Size()):
        eps = torch.randn_like(self.loc)
        z = self.loc + self.scale * eps
        self._last = (z, eps)
        return z

    def log_prob(self, value):
        dims = tuple(range(-len(self.event_shape), 0))
        if self._last is not None and value is self._last[0]:
            eps = self._last[1]
        else:
            eps = (value - self.loc) / self.scale
        n = math.prod(self.event_shape)
        return -0.5 * eps.square().sum(dims) - self.scale.log().sum(dims) - n * LOG_SQRT_2PI


class DirectAutoNormal(AutoNormal):
    def forward(self, *args, **kwargs):
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        plates = self._create_plates(*args, **kwargs)
        result = {}
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            with ExitStack() as stack:
                for frame in site["cond_indep_stack"]:
                    if frame.vectorized:
                        stack.enter_context(plates[frame.name])
                loc, scale = self._get_loc_and_scale(name)
                if site["fn"].support is constraints.real or getattr(site["fn"].support, "base_constraint",
                                                                      None) is constraints.real:
                    result[name] = pyro.sample(name, DiagNormal(loc, scale, site["fn"].event_dim))
                else:  # tau (positive): AutoNormal's way
                    from torch.distributions import biject_to

                    t = biject_to(site["fn"].support)
                    u = pyro.sample(name + "_unconstrained", dist.Normal(loc, scale).to_event(self._event_dims[name]),
                                    infer={"is_auxiliary": True})
                    v = t(u)
                    ld = t.inv.log_abs_det_jacobian(v, u)
                    result[name] = pyro.sample(name, dist.Delta(v, log_density=ld, event_dim=site["fn"].event_dim))
        return result


class NoVal:
    """Wraps a variant's step in ``pyro.validation_enabled(False)``."""

    def __init__(self, v):
        self.v = v

    def step(self):
        with pyro.validation_enabled(False):
            self.v.step()


def fuse(v):
    inner = v.v if isinstance(v, NoVal) else v
    inner.opt = torch.optim.AdamW(inner.params, lr=C.LR, weight_decay=0.0, fused=True)
    inner.sched = torch.optim.lr_scheduler.LambdaLR(inner.opt, lambda s: 1.0)
    return v


def build(kind, lm, batch, T, tau_mode, targets=C.TARGETS):
    if kind.endswith("_fused"):
        return fuse(build(kind[: -len("_fused")], lm, batch, T, tau_mode, targets))
    if kind in ("plain", "hand_map", "hand_mf", "map", "meanfield"):
        return C.make_variant(kind, lm, batch, T, tau_mode=tau_mode, targets=targets)
    if kind in ("map_noval", "mf_noval"):
        return NoVal(C.make_variant("map" if kind == "map_noval" else "meanfield", lm, batch, T, tau_mode=tau_mode,
                                    targets=targets))
    guide = "map" if kind == "map_fast" else "meanfield"
    b = C.Bora(C.bora_config(guide, tau_mode=tau_mode, targets=targets), lm, C.Tok(),
               [f"task{t}" for t in range(T)], 4096)
    fast_prior(b.model)
    target = b.tau.model if b.tau is not None else b.model
    if guide == "map":
        b.guide = MaskedAutoDelta(target, init_loc_fn=b.model.init_loc)
    else:
        b.guide = DirectAutoNormal(target, init_loc_fn=b.model.init_loc, init_scale=1e-3)
    b._setup_guide()
    return NoVal(C.BoraStep(None, batch, T, guide, bora_obj=b))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="plain,hand_map,map,map_noval,map_fast,hand_mf,meanfield,mf_noval,mf_fast")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--tasks", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=12)
    ap.add_argument("--tau-mode", default="learned")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--targets", default="q_proj,v_proj", help="as in run.py (all7, bora, or a list)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    lm = C.make_lm(a.preset)
    vs = {}
    for spec in a.variants.split(","):
        kind, _, t = spec.partition("@")
        T = int(t) if t else a.tasks
        batch = C.make_batch(lm.config.vocab_size, T, min(16, T), seq_len=a.seq_len)
        vs[spec] = build(kind, C.shared_copy(lm), batch, T, a.tau_mode, C.parse_targets(a.targets))
    ref = "plain" if "plain" in vs else next(iter(vs))
    # same loss as stock (first step from the same init), as a correctness check
    losses = {}
    times = C.interleave({k: v.step for k, v in vs.items()}, warmup=2, repeats=a.repeats)
    summ = C.summarize(times, ref)
    for k, v in vs.items():
        inner = v.v if isinstance(v, NoVal) else v
        losses[k] = inner.last_loss
    for k, e in summ.items():
        print(f"{k:20s} median {e['median_ms']:7.1f} ms  paired ratio to {ref} {e['paired_ratio']:.3f} "
              f"[{e['paired_ratio_q25']:.3f}-{e['paired_ratio_q75']:.3f}]  last loss {losses[k]:.4f}")


if __name__ == "__main__":
    main()
