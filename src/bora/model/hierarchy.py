"""The hierarchical LoRA model: priors over global and per-task adapters, and the LM likelihood (inherited from
:class:`bora.model.likelihood.LMLikelihood`).

>>> import pyro, torch
>>> from transformers import LlamaConfig, LlamaForCausalLM
>>> from bora.core.config import AdapterConfig, PriorConfig
>>> from bora.lora.inject import inject_adapters_
>>> from bora.model.hierarchy import BoraModel
>>> lm = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
...                                   num_hidden_layers=2, num_attention_heads=4))
>>> adapters = inject_adapters_(lm, AdapterConfig(rank=2, layers=None))
>>> model = BoraModel(lm, adapters, tasks=("a", "b", "c"), num_docs=30,
...                   prior=PriorConfig(tau_mode="fixed", tau=100.0))
>>> batch = {"input_ids": torch.randint(0, 64, (4, 6)), "attention_mask": torch.ones(4, 6, dtype=torch.long),
...          "task_ids": torch.tensor([0, 1, 2, 2]), "index": torch.tensor([0, 5, 17, 29])}
>>> trace = pyro.poutine.trace(model).get_trace(batch)
>>> trace.nodes["theta_B:model_layers_0_self_attn_q_proj"]["value"].shape   # [tasks, out, r]
torch.Size([3, 32, 2])

Generative story (``tau_mode`` picks the coupling, ``hierarchy`` the task-level factors; every mode is
the same code path):

* global adapters ``Theta_A:<m> ~ Normal(0, s)`` and ``Theta_B:<m> ~ Normal(0, s)`` for each adapted
  module ``m`` (outside every plate); with ``hierarchy='B'`` (default) ``Theta_A`` is the one ``A`` every
  task uses, its rows orthonormalised (:func:`orthonormal_rows`);
* precision ``tau``: a constant (``fixed``), or ``tau ~ Gamma(a, b)`` (``learned``; one site, or
  ``tau:<m>`` per module, or one site ``tau`` of shape ``[T]`` with ``tau_per_task``: task ``t``'s sites then
  have prior sd ``tau_t^-1/2``);
* in ``plate("tasks", T)``: ``theta_B:<m> ~ Normal(Theta_B:<m>, tau^-1/2)`` (and ``theta_A`` for
  ``hierarchy='AB'``); ``uncoupled`` draws them from ``Normal(0, s)`` with no global ``B``, ``shared``
  has no task sites and every task uses the global adapter. In the offset form (the default for point
  fits) each task site is reparameterised as ``Theta + delta`` with ``delta ~ Normal(0, tau^-1/2)`` (site
  ``theta_B:<m>_offset``, :class:`~bora.model.distributions.OffsetReparam`; ``theta_B:<m>`` becomes
  deterministic), the same model; non-centred, Pyro's ``LocScaleReparam`` writes it as
  ``Theta + tau^-1/2 z`` with ``z ~ Normal(0, 1)`` (site ``theta_B:<m>_decentered``);
  :meth:`BoraModel.complete` maps a guide's values back to natural coordinates;
* in ``plate("data", N, subsample=batch["index"])``: ``factor("loglik", log p(doc | theta_task(doc)))``,
  the sum of the document's next-token log-probabilities (padding masked), so a uniform minibatch
  gives an unbiased estimate of the full-data log-likelihood (the plate scales by ``N / batch``).
"""

from __future__ import annotations

import contextlib
import math
from typing import Mapping, Optional, Sequence

import pyro
import pyro.distributions as dist
from pyro import poutine
from pyro.infer.reparam import LocScaleReparam
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
import torch
from torch import nn

from ..core.config import PriorConfig
from ..core.coupling import Coupling, coupling_of, guide_of
from ..data.batching import scored_positions
from .distributions import IsotropicNormal, OffsetReparam, natural_site
from ..lora.inject import AdapterSet
from .likelihood import LMLikelihood, Params
from ..lora.prefix import FrozenPrefix

__all__ = ["BoraModel", "Params", "site_names", "orthonormal_rows", "MaskGlobalSites"]


class MaskGlobalSites(Messenger):
    """Mask the log-density of every sample site outside all plates (the global adapter's, a learned tau's):
    they count as 0 in the ELBO. The task sites (in ``plate('tasks')``) and the likelihood are left alone."""

    def _pyro_sample(self, msg):
        if not msg["cond_indep_stack"] and not site_is_subsample(msg):
            msg["mask"] = False

def site_names(key: str) -> dict[str, str]:
    return {"GA": f"Theta_A:{key}", "GB": f"Theta_B:{key}", "TA": f"theta_A:{key}", "TB": f"theta_B:{key}"}


class BoraModel(LMLikelihood):
    """Callable Pyro model ``model(batch)``; the LM is plain torch code and never enters the param store."""

    def __init__(
        self,
        lm: nn.Module,
        adapters: AdapterSet,
        tasks: Sequence[str],
        num_docs: int,
        prior: PriorConfig,
        *,
        prefix: Optional[FrozenPrefix] = None,
        init_seed: int = 0,
        autocast_dtype: Optional[torch.dtype] = None,
        guide_kind: str = "map",
    ):
        if len(tasks) < 1:
            raise ValueError("need at least one task")
        super().__init__(lm, adapters, prefix=prefix, autocast_dtype=autocast_dtype)
        self.tasks = tuple(tasks)
        self.num_docs = int(num_docs)
        self.prior = prior
        self.guide_kind = guide_kind
        self.last_nll = float("nan")
        self.shapes = adapters.shapes()
        # Shared random A (as in LoRA: kaiming-uniform with bound 1/sqrt(in)); B starts at 0 so that
        # every adapter product B A is exactly zero at initialisation: step 0 is the base model.
        g = torch.Generator().manual_seed(init_seed)
        self.init_A = {
            k: ((torch.rand(sa, generator=g) * 2 - 1) / math.sqrt(sa[1])).to(self.device)
            for k, (sa, _) in self.shapes.items()
        }

    # ----------------------------------------------------------------- structure
    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    @property
    def coupling(self) -> Coupling:
        """The coupling of the task adapters (:mod:`bora.core.coupling`), from ``prior.tau_mode``."""
        return coupling_of(self.prior)

    @property
    def has_global(self) -> bool:
        """Whether a global ``Theta_B`` exists (every coupling but 'uncoupled')."""
        return self.coupling.has_global

    @property
    def has_tasks(self) -> bool:
        return self.coupling.has_tasks

    @property
    def shared_A(self) -> bool:
        """``hierarchy='B'``: one global ``A`` per module (orthonormal rows) shared by every task."""
        return self.prior.hierarchy == "B"

    @property
    def parameterisation(self) -> str:
        """How the task sites are parameterised: 'centred', 'noncentred' or 'offset' ('auto' resolved:
        offset for point fits, centred for mean-field; always 'centred' without a tau)."""
        p = self.prior.parameterisation
        if p == "auto":
            p = "offset" if guide_of(self.guide_kind).point else "centred"
        return p if self.coupling.has_tau else "centred"

    @property
    def noncentred(self) -> bool:
        """Whether the task sites are ``Theta + tau^-1/2 z`` (guide sites ``<name>_decentered``)."""
        return self.parameterisation == "noncentred"

    def task_factors(self) -> tuple[int, ...]:
        """Which adapter factors are task-level: ``(1,)`` (B only) or ``(0, 1)`` (A and B)."""
        return (1,) if self.shared_A else (0, 1)

    def task_sites(self, key: str) -> list[tuple[int, str, str]]:
        """``(factor, task site, global site)`` of every task-level factor of adapter ``key``
        (factor 0 is ``A``, 1 is ``B``); empty when the tasks share one adapter."""
        if not self.has_tasks:
            return []
        n = site_names(key)
        return [(i, n["TA" if i == 0 else "TB"], n["GA" if i == 0 else "GB"]) for i in self.task_factors()]

    def tau_groups(self) -> dict[str, list[str]]:
        """``tau site name -> adapter keys`` it governs (empty unless tau_mode is 'learned')."""
        if not self.coupling.learned:
            return {}
        if self.prior.tau_per_module:
            return {f"tau:{k}": [k] for k in self.shapes}
        return {"tau": list(self.shapes)}

    @property
    def tau_per_task(self) -> bool:
        """Whether every task has its own learned tau (``prior.tau_per_task``: the tau site is ``[T]``)."""
        return self.coupling.learned and bool(getattr(self.prior, "tau_per_task", False))

    def tau_by_key(self, values: Optional[Mapping[str, torch.Tensor]] = None, *,
                   per_task: bool = False) -> dict[str, float | list[float]]:
        """Per adapter key, the precision tying a task to the global adapter: 0 for 'uncoupled', inf for
        'shared', the configured value for 'fixed', and the tau site's value in ``values`` for 'learned'
        (the configured starting value if ``values`` lacks it).

        A per-task tau (:attr:`tau_per_task`) has one value per task: with ``per_task=True`` each key maps to the
        list of the tasks' taus (every other fit still gives one float); without it a per-task fit raises, so that
        no caller takes one number for all tasks by mistake."""
        if self.tau_per_task and not per_task:
            raise ValueError("this fit has one tau per task (tau_per_task); a single tau per adapter key is "
                             "undefined here")
        t = self.coupling.tau_value(self.prior)
        if t is not None:
            return {k: float(t) for k in self.shapes}
        values = values or {}
        out = {}
        for name, keys in self.tau_groups().items():
            v = values[name] if name in values else float(self.prior.tau)
            if self.tau_per_task:
                v = torch.as_tensor(v, dtype=torch.float64).flatten()
                t = (v.expand(self.num_tasks) if v.numel() == 1 else v).tolist()
            else:
                t = float(v)
            out.update({k: t for k in keys})
        return out

    def _zeros(self, shape) -> torch.Tensor:
        return torch.zeros(shape, device=self.device)

    # ----------------------------------------------------------------- priors
    def _tau(self) -> dict[str, torch.Tensor]:
        """Per-adapter-key precision (a tensor), sampling the tau sites when learned."""
        P = self.prior
        if self.coupling.fixed:
            t = torch.tensor(float(P.tau), device=self.device)
            return {k: t for k in self.shapes}
        out = {}
        for name, keys in self.tau_groups().items():
            conc = torch.tensor(float(P.tau_shape), device=self.device)
            rate = torch.tensor(float(P.tau_rate), device=self.device)
            prior = dist.Gamma(conc, rate)
            if self.tau_per_task:  # one tau per task, [T]: each task site's prior scale tau_t^-1/2
                prior = prior.expand([self.num_tasks]).to_event(1)
            t = pyro.sample(name, prior)
            for k in keys:
                out[k] = t
        return out

    def reparam_config(self) -> dict:
        """Pyro reparameterisers of the task sites: non-centred ``theta_t = Theta + tau^-1/2 z_t`` with
        ``z_t ~ Normal(0, 1)`` (site ``<name>_decentered``), offset ``theta_t = Theta + delta_t`` (site
        ``<name>_offset``), or none for the centred form."""
        p = self.parameterisation
        if p == "centred":
            return {}
        return {site: LocScaleReparam(centered=0.0) if p == "noncentred" else OffsetReparam()
                for k in self.shapes for _, site, _ in self.task_sites(k)}

    def sample_adapters(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Sample every adapter site; returns ``key -> (A, B)`` with a leading task dim on the task-level
        factors (a shared ``A`` is ``[r, in]``; every factor is 2-D when tasks share one adapter)."""
        with poutine.reparam(config=self.reparam_config()):
            return self._sample_adapters()

    def _sample_adapters(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        P = self.prior
        s = P.global_scale
        glob = {}
        for k, (sa, sb) in self.shapes.items():
            n = site_names(k)
            GA = (pyro.sample(n["GA"], IsotropicNormal(self._zeros(sa), s))
                  if self.has_global or self.shared_A else None)
            GB = pyro.sample(n["GB"], IsotropicNormal(self._zeros(sb), s)) if self.has_global else None
            glob[k] = (orthonormal_rows(GA) if self.shared_A else GA, GB)
        if not self.has_tasks:
            return glob
        tau = self._tau() if self.coupling.has_tau else None
        T = self.num_tasks
        out = {}
        with pyro.plate("tasks", T, dim=-1):
            for k, shapes in self.shapes.items():
                pair = list(glob[k])
                for i, site, _ in self.task_sites(k):
                    if tau is None:  # uncoupled: no coupling
                        d = IsotropicNormal(self._zeros((T, *shapes[i])), s)
                    else:
                        d = IsotropicNormal(glob[k][i].expand(T, *shapes[i]), tau[k].rsqrt())
                    pair[i] = pyro.sample(site, d)
                out[k] = tuple(pair)
        return out

    # ----------------------------------------------------------------- the model
    def __call__(self, batch: Mapping[str, torch.Tensor]) -> None:
        # a task-sharded rank other than 0 leaves out the global sites' prior (bora.core.distributed: the ranks'
        # gradients of the global adapter are summed, and the prior must count once)
        with contextlib.nullcontext() if batch.get("global_prior", True) else MaskGlobalSites():
            params = self.sample_adapters()
        ll = self.loglik(batch, params)
        # for progress display only: the minibatch's mean next-token NLL
        self.last_nll = float(-ll.detach().sum() / scored_positions(batch).sum().clamp_min(1))
        # a data-parallel rank's shard of the global batch weighs a share of it (bora.core.distributed); a rank
        # without rows of the batch runs a placeholder row at weight 0 (masked: poutine.scale refuses 0)
        scale = float(batch.get("loglik_scale", 1.0))
        with poutine.scale(scale=scale) if scale > 0 else poutine.mask(mask=False), \
                pyro.plate("data", self.num_docs, subsample=batch["index"], dim=-1):
            pyro.factor("loglik", ll)

    # ----------------------------------------------------------------- initialisation
    def init_loc(self, site: dict) -> torch.Tensor:
        """``init_loc_fn`` for autoguides: shared random A, zero B, tau at its configured value."""
        name = site["name"]
        kind, _, key = name.partition(":")
        if natural_site(name)[1] is not None:  # z_t = 0 / delta_t = 0: every task starts at the global adapter
            return torch.zeros(site["fn"].shape(), device=self.device)
        if kind == "Theta_A":
            return self.init_A[key].clone()
        if kind == "theta_A":
            return self.init_A[key].expand(self.num_tasks, *self.init_A[key].shape).clone()
        if kind in ("Theta_B", "theta_B"):
            return torch.zeros(site["fn"].shape(), device=self.device)
        if kind == "tau":
            return torch.full(site["fn"].shape(), float(self.prior.tau), device=self.device)
        raise KeyError(f"unknown site {name}")

    def complete(self, values: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every adapter site's value in natural coordinates from a guide's latent values.

        ``values`` holds the guide's sites (for the non-centred form ``theta_B:<m>_decentered``, for the
        offset form ``theta_B:<m>_offset``, not ``theta_B:<m>``) plus tau when it is learned; the result adds
        the task adapters ``theta_*`` (``Theta + tau^-1/2 z`` or ``Theta + delta``). Costs no LM pass."""
        sites = [site for k in self.shapes for _, site, _ in self.task_sites(k)]
        if self.parameterisation == "centred" or all(site in values for site in sites):
            return dict(values)
        missing = [n for n in self.tau_groups() if n not in values]
        if missing:
            raise KeyError(f"values lack the tau site(s) {missing}")
        tr = poutine.trace(poutine.condition(self.sample_adapters, data=dict(values))).get_trace()
        out = dict(values)
        out.update({name: node["value"] for name, node in tr.nodes.items()
                    if node["type"] == "sample" and not site_is_subsample(node)})
        return out

    def params_from_values(self, values: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Adapter tensors ``key -> (A [T, r, in], B [T, out, r])`` from site values (e.g. a guide's median);
        ``[r, in]`` / ``[out, r]`` when the tasks share one adapter. A shared ``A`` is expanded (a view)."""
        values = self.complete(values)
        out = {}
        for k in self.shapes:
            n = site_names(k)
            if not self.has_tasks:
                out[k] = (self._A_of(values[n["GA"]]), values[n["GB"]])
                continue
            B = values[n["TB"]]
            A = (self._A_of(values[n["GA"]]).expand(B.shape[0], -1, -1) if self.shared_A else values[n["TA"]])
            out[k] = (A, B)
        return out

    def _A_of(self, value: torch.Tensor) -> torch.Tensor:
        return orthonormal_rows(value) if self.shared_A else value

    def shared_A_from_values(self, values: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``key -> A [r, in]``: the one ``A`` every task uses (``hierarchy='B'``), rows orthonormalised."""
        if not self.shared_A:
            raise ValueError("hierarchy='AB' has no shared A")
        return {k: orthonormal_rows(values[site_names(k)["GA"]]) for k in self.shapes}

    def global_from_values(self, values: Mapping[str, torch.Tensor]) -> Optional[dict]:
        """The global adapter ``key -> (A, B)`` (``None`` for 'uncoupled', which has no global ``B``)."""
        if not self.has_global:
            return None
        return {k: (self._A_of(values[site_names(k)["GA"]]), values[site_names(k)["GB"]]) for k in self.shapes}


def orthonormal_rows(A: torch.Tensor) -> torch.Tensor:
    """``A [r, in]`` with its rows orthonormalised (Gram-Schmidt order, a smooth function of ``A``).

    Used for the shared ``A`` of ``hierarchy='B'``: then ``||(B_t - Theta_B) A||_F = ||B_t - Theta_B||_F``, so
    tau is the precision of a task's weight change ``Delta W_t`` around the global one, whatever scale
    ``A`` has (``A -> cA`` changes nothing).

    >>> A = torch.randn(3, 7)
    >>> Q = orthonormal_rows(A)
    >>> torch.allclose(Q @ Q.T, torch.eye(3), atol=1e-5), torch.allclose(orthonormal_rows(5 * A), Q, atol=1e-5)
    (True, True)
    """
    Q, R = torch.linalg.qr(A.transpose(-1, -2))
    sign = torch.sign(torch.diagonal(R, dim1=-2, dim2=-1))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return (Q * sign.unsqueeze(-2)).transpose(-1, -2)
