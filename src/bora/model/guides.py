"""Guides: the only thing that differs between a MAP fit and a mean-field variational fit.

>>> import pyro
>>> import pyro.distributions as dist
>>> from bora.model.guides import AutoNormal
>>> def model(): pyro.sample("x", dist.Normal(0.0, 1.0))
>>> guide = AutoNormal(model)
>>> guide() and sorted(name for name, _ in guide.named_parameters())   # parameters live in the guide ...
['locs.x_unconstrained', 'scales.x_unconstrained']
>>> pyro.settings.get("module_local_params")   # ... and Pyro's global setting is left as it was
False

``make_guide(model, "map")`` (:class:`AutoDelta`, starts exactly at the base model) or ``make_guide(model,
"meanfield", init_scale=1e-3)`` (:class:`AutoNormal`) builds the guide of a :class:`~bora.model.hierarchy.BoraModel`.

Both guides use :meth:`bora.model.hierarchy.BoraModel.init_loc`: every task's ``A`` starts at one shared
random matrix and every ``B`` at zero, so every adapter product ``B A`` is zero and the first loss
equals the base model's. (Pyro's default ``init_to_median`` would draw adapters about ten times
the norm of the base weights; ``init_to_mean`` puts ``A = B = 0`` on a zero-gradient saddle.)
The mean-field guide's initial scale defaults to 1e-3 so that sampled adapters start near the
base model (AutoNormal's default 0.1 gives sampled products larger than the base weights).

bora's :class:`AutoDelta` and :class:`AutoNormal` are Pyro's, with Pyro's ``module_local_params``
setting switched on only while they are built and called: their parameters are their own (never in
Pyro's global param store), and importing or using bora leaves the setting, hence every other Pyro
module of the process, alone.

bora's :class:`AutoDelta` also masks its Delta sites: a MAP guide's log-density is identically 0, and
masking skips computing ``log(x == v)`` over every adapter entry at every step (the ELBO is unchanged).
bora's :class:`AutoNormal` draws every real-valued site directly (Pyro's draws an auxiliary
``<site>_unconstrained`` and adds a Delta site with the identity transform's zero log-Jacobian) and
scores the draw with the noise it was made from: the same draws for the same seed, the same ELBO and
gradients (tested), one site instead of two per adapter; models with a constrained site (a positive
tau) keep Pyro's form.
"""

from __future__ import annotations

import math
from contextlib import ExitStack
from operator import attrgetter
from typing import Optional

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.distributions.transforms import SoftplusTransform
from pyro.infer import autoguide
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch.distributions import transform_to

from ..core.coupling import guide_of

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)

__all__ = ["make_guide", "point_values", "guide_params", "saved_scales", "set_locs_",
           "set_scales_", "param_groups", "AutoDelta", "AutoNormal"]


class _ModuleLocal:
    """Build and call a Pyro module with ``module_local_params`` on, restoring the setting afterwards."""

    def __init__(self, *args, **kwargs):
        with pyro.settings.context(module_local_params=True):
            super().__init__(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        with pyro.settings.context(module_local_params=True):
            return super().__call__(*args, **kwargs)


class _ZeroLogDensity(Messenger):
    """Mask every sample site's distribution: its log-density counts as 0 and is never computed."""

    def _pyro_sample(self, msg):
        if not site_is_subsample(msg):
            msg["fn"] = msg["fn"].mask(False)


def _is_real(support) -> bool:
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    return support is constraints.real


class _DirectSites:
    """Draw every site of a Pyro autoguide directly (mixed into :class:`AutoDelta` and :class:`AutoNormal`)."""

    def _direct_sites(self, args, kwargs, draw) -> Optional[dict]:
        """``{site: pyro.sample(site, draw(site, event_dim))}`` under each site's plates, when every site of this
        guide is real-valued (its parameters are then used unconstrained, as they are); None otherwise."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        sites = list(self.prototype_trace.iter_stochastic_nodes())
        if not all(_is_real(site["fn"].support) for _, site in sites):
            return None
        plates = self._create_plates(*args, **kwargs)
        result = {}
        for name, site in sites:
            with ExitStack() as stack:
                for frame in site["cond_indep_stack"]:
                    if frame.vectorized:
                        stack.enter_context(plates[frame.name])
                result[name] = pyro.sample(name, draw(name, site["fn"].event_dim))
        return result


class AutoDelta(_ModuleLocal, _DirectSites, autoguide.AutoDelta):
    """Pyro's ``AutoDelta`` (MAP point estimates) with module-local parameters and masked (zero, uncomputed)
    log-densities (see the module docstring)."""

    def forward(self, *args, **kwargs):
        result = self._direct_sites(args, kwargs, lambda name, event_dim: dist.Delta(
            attrgetter(name + "_unconstrained")(self), event_dim=event_dim).mask(False))
        if result is not None:
            return result
        with _ZeroLogDensity():  # a constrained site: Pyro's form, masked
            return super().forward(*args, **kwargs)


def _event_sum(x: torch.Tensor, event_dim: int) -> torch.Tensor:
    return x.sum(tuple(range(-event_dim, 0))) if event_dim else x


class _SoftplusDraw(torch.autograd.Function):
    """``(loc + eps * softplus(u), sum of log softplus(u) over the event dims)`` as one autograd node: the
    mean-field draw and its entropy term without the intermediate tensors and passes of separate operators."""

    @staticmethod
    def forward(ctx, loc, u, eps, event_dim: int):
        sd = torch.nn.functional.softplus(u)
        ctx.save_for_backward(u, sd, eps)
        ctx.event_dim = event_dim
        return torch.addcmul(loc, eps, sd), _event_sum(sd.log(), event_dim)

    @staticmethod
    def backward(ctx, grad_value, grad_log_sd):
        u, sd, eps = ctx.saved_tensors
        grad_log_sd = grad_log_sd.reshape(grad_log_sd.shape + (1,) * ctx.event_dim)
        # d softplus(u) / du = sigmoid(u); d log softplus(u) / d softplus(u) = 1 / softplus(u)
        grad_u = torch.addcdiv(grad_value * eps, grad_log_sd, sd).mul_(torch.sigmoid(u))
        return grad_value, grad_u, None, None


class _DiagNormal(dist.TorchDistribution):
    """``Normal(loc, softplus(u))`` with its rightmost ``event_dim`` dims an event; the log-density of its own
    last draw reuses that draw's standard-normal noise and ``log softplus(u)`` (:class:`_SoftplusDraw`)."""

    arg_constraints: dict = {}
    has_rsample = True

    def __init__(self, loc: torch.Tensor, u: torch.Tensor, event_dim: int):
        self.loc, self.u = loc, u
        self._last: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None
        cut = loc.dim() - event_dim
        super().__init__(loc.shape[:cut], loc.shape[cut:], validate_args=False)

    @property
    def scale(self) -> torch.Tensor:
        return torch.nn.functional.softplus(self.u)

    def expand(self, batch_shape, _instance=None):
        # a plate's broadcast asks for the shape the site already has: keep this distribution (and so the
        # scoring of its own draw by its noise) instead of wrapping it in an ExpandedDistribution
        batch_shape = torch.Size(batch_shape)
        if batch_shape == self.batch_shape:
            return self
        shape = batch_shape + self.event_shape
        return _DiagNormal(self.loc.expand(shape), self.u.expand(shape), len(self.event_shape))

    @property
    def support(self):
        return constraints.independent(constraints.real, len(self.event_shape))

    def rsample(self, sample_shape=torch.Size()):
        if sample_shape:
            raise NotImplementedError("one draw per call (bora vectorises particles with plates)")
        # the noise as Normal.rsample draws it (torch's _standard_normal outside JIT tracing)
        eps = torch.empty(self.loc.shape, dtype=self.loc.dtype, device=self.loc.device).normal_()
        value, log_sd = _SoftplusDraw.apply(self.loc, self.u, eps, len(self.event_shape))
        self._last = (value, eps, log_sd)
        return value

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        k = len(self.event_shape)
        if self._last is not None and value is self._last[0]:
            _, eps, log_sd = self._last
            sq, n = _event_sum(eps.square(), k), self.event_shape.numel()
            return -0.5 * sq - log_sd - n * _LOG_SQRT_2PI
        scale = self.scale
        return _event_sum(-0.5 * ((value - self.loc) / scale).square() - scale.log() - _LOG_SQRT_2PI, k)


class AutoNormal(_ModuleLocal, _DirectSites, autoguide.AutoNormal):
    """Pyro's ``AutoNormal`` (mean-field) with module-local parameters and real-valued sites drawn directly
    (see the module docstring)."""

    def forward(self, *args, **kwargs):
        result = None
        if isinstance(transform_to(self.scale_constraint), SoftplusTransform):  # bora keeps Pyro's default
            # the unconstrained parameters themselves (a real loc's transform is the identity; the scale's
            # softplus happens inside the draw)
            result = self._direct_sites(args, kwargs, lambda name, event_dim: _DiagNormal(
                attrgetter(name + "_unconstrained")(self.locs), attrgetter(name + "_unconstrained")(self.scales),
                event_dim))
        # a constrained site (a positive tau): Pyro's auxiliary-variable form
        return super().forward(*args, **kwargs) if result is None else result


def make_guide(model, kind: str = "map", *, init_scale: float = 1e-3, target=None):
    """An autoguide for ``target`` (default ``model``; e.g. the tau-conditioned model for MAP).

    For the mean-field guide, ``init_scale`` is the initial posterior sd of the global sites and tau;
    non-centred task sites ``z_t`` start at their prior sd, 1, offset ones ``delta_t`` at ``tau^-1/2`` (see
    :func:`set_scales_`)."""
    target = model if target is None else target
    if guide_of(kind).point:  # a Laplace posterior is built around the MAP point after the fit
        return AutoDelta(target, init_loc_fn=model.init_loc)
    return AutoNormal(target, init_loc_fn=model.init_loc, init_scale=init_scale)


@torch.no_grad()
def point_values(guide, batch: Optional[dict] = None) -> dict[str, torch.Tensor]:
    """Point estimate of every guide site: the MAP value, or the posterior median (AutoNormal: the mean of
    each real-valued site; for tau, exp of its log-normal location)."""
    args = () if batch is None else (batch,)
    return {k: v.detach() for k, v in guide.median(*args).items()}


def _site_of(param_name: str) -> str:
    name = param_name.split(".", 1)[1] if param_name.startswith(("locs.", "scales.")) else param_name
    return name[: -len("_unconstrained")] if name.endswith("_unconstrained") else name


def guide_params(guide) -> dict[str, dict[str, torch.nn.Parameter]]:
    """The guide's parameters by site: ``{site: {"loc": p, "scale": p}}`` (``"scale"`` only for mean-field).

    The one place that knows how Pyro's autoguides name their parameters: AutoDelta keeps a site's
    value as ``<site>_unconstrained``, AutoNormal its location and scale as ``locs.<site>_unconstrained``
    and ``scales.<site>_unconstrained``; all are unconstrained (``loc`` through the site's support
    transform, ``scale`` through ``guide.scale_constraint``). Everything else in bora goes through this
    mapping, :func:`set_locs_` and :func:`set_scales_`."""
    out: dict[str, dict[str, torch.nn.Parameter]] = {}
    for pname, p in guide.named_parameters():
        role = "scale" if pname.startswith("scales.") else "loc"
        out.setdefault(_site_of(pname), {})[role] = p
    return out


def saved_scales(state) -> dict[str, torch.Tensor]:
    """Posterior sds by site from a saved mean-field guide's state (``guide.safetensors``), through the same
    naming as :func:`guide_params` and AutoNormal's default ``scale_constraint`` (softplus), which bora keeps."""
    positive = transform_to(autoguide.AutoNormal.scale_constraint)
    return {_site_of(k): positive(u) for k, u in state.items() if k.startswith("scales.")}


@torch.no_grad()
def set_locs_(guide, values: dict) -> list[str]:
    """Set each guide site's location (MAP value or mean-field mean) to ``values[site]``, given in the site's
    own (constrained) coordinates; returns the sites set."""
    params, done = guide_params(guide), []
    for name, site in guide.prototype_trace.iter_stochastic_nodes():
        if name in values and name in params:
            p = params[name]["loc"]
            v = torch.as_tensor(values[name], dtype=p.dtype, device=p.device)
            p.copy_(transform_to(site["fn"].support).inv(v).expand(p.shape))
            done.append(name)
    return done


@torch.no_grad()
def set_scales_(guide, scales: dict) -> list[str]:
    """Set a mean-field (AutoNormal) guide's posterior sd per site: ``{site: float or tensor}``; returns the
    sites set. A MAP guide has no scales (nothing is set)."""
    done = []
    for site, roles in guide_params(guide).items():
        p = roles.get("scale")
        if p is not None and site in scales:
            value = torch.as_tensor(scales[site], dtype=p.dtype, device=p.device).expand(p.shape)
            p.copy_(transform_to(guide.scale_constraint).inv(value.clamp_min(1e-8)))
            done.append(site)
    return done


def param_groups(guide, lr: float, scale_lr: float) -> list[dict]:
    """Optimizer groups: the posterior means at ``lr``; the mean-field scales and a learned tau at
    ``scale_lr``. Both move on a log scale, where Adam's step of about ``lr`` per step would otherwise
    cap how far they can travel in a fit (``sum_k lr_k``, 0.2 nats for bora's default schedule)."""
    main, log_scale = [], []
    for pname, p in guide.named_parameters():
        if not p.requires_grad:
            continue
        site = _site_of(pname)
        is_scale = pname.startswith("scales.") or (pname.startswith("locs.") and site.partition(":")[0] == "tau")
        (log_scale if is_scale else main).append(p)
    groups = [{"params": main, "lr": lr}]
    if log_scale:
        groups.append({"params": log_scale, "lr": scale_lr})
    return groups
