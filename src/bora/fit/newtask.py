"""A new task's adapter, fitted on its own documents with the fit's global level held fixed.

>>> adapter = bora.fit_new_task(["First speech.", "Second speech."], steps=50)   # doctest: +SKIP
>>> bora.adapters.use(adapter)                                                   # doctest: +SKIP

:func:`fit_new_task` takes anything with the attributes of :class:`NewTaskSource` (a fitted
:class:`bora.api.Bora` has them).
"""

from __future__ import annotations

from typing import Optional, Protocol

import torch

from ..core.config import BoraConfig, ConfigError
from ..core.seeding import STREAMS, sample_seed, seeded
from ..data.batching import batches
from ..data.documents import TokenizedSplit, tokenize_split
from ..data.feed import Feed
from ..lora.prefix import FrozenPrefix
from ..model.hierarchy import BoraModel
from .step import TrainStep

__all__ = ["NewTaskSource", "fit_new_task"]


class NewTaskSource(Protocol):
    """What :func:`fit_new_task` reads of a fit."""

    config: BoraConfig
    model: BoraModel
    tokenizer: object
    device: torch.device
    prefix: Optional[FrozenPrefix]

    @property
    def pad_id(self) -> int: ...

    def point(self) -> dict[str, torch.Tensor]: ...


def _new_task_split(bora: "NewTaskSource", docs, name: str) -> TokenizedSplit:
    if isinstance(docs, TokenizedSplit):
        return TokenizedSplit(list(docs.input_ids), torch.zeros(len(docs), dtype=torch.long), (name,),
                              loss_mask=None if docs.loss_mask is None else list(docs.loss_mask))
    if isinstance(docs, str):
        docs = [docs]
    docs = list(docs)
    if not docs or not all(isinstance(d, str) for d in docs):
        raise ConfigError("docs must be a TokenizedSplit or a non-empty list of texts")
    if bora.tokenizer is None:
        raise ConfigError("this fit has no tokenizer to tokenise the new task's texts")
    cfg = bora.config.data
    split = tokenize_split([{"text": d, "task": name} for d in docs], (name,), bora.tokenizer, cfg.max_length,
                           cfg.long_documents)
    if len(split) == 0:
        raise ConfigError("none of the new task's texts has 2 or more tokens")
    return split


def fit_new_task(bora: "NewTaskSource", docs, *, steps: int = 100, lr: float = 0.05, batch_size: Optional[int] = None,
                 seed: int = 0, name: str = "new task") -> dict:
    """Fit the adapter of one task that is not in the fit, with the global level held fixed.

    Maximises ``sum_d log p(d | theta_new) + log Normal(theta_new | Theta, tau^-1/2)`` (MAP) over
    ``theta_new``, where ``Theta`` and ``tau`` are the fit's point estimates (posterior medians for
    a mean-field fit). ``docs``: a :class:`~bora.data.documents.TokenizedSplit` (all rows are treated as the
    new task) or a list of texts (tokenised like the fit's data). The optimisation is non-centred:
    Adam (learning rate ``lr``, minibatches of ``batch_size`` documents, the likelihood scaled to the
    whole set) moves ``z = (theta_new - Theta) tau^1/2``, which starts at 0 (the global adapter) and
    has a standard-normal prior, so ``lr`` is in units of the prior's standard deviation whatever
    tau is. Returns ``key -> (A [r, in], B [out, r])``, usable with ``bora.adapters.use(adapter)``
    and :func:`bora.io.export.write_peft_adapter`.

    'shared' returns the global adapter (a task adapter equals it); 'uncoupled' uses the
    ``Normal(0, s)`` prior and starts from the fit's initial point."""
    if not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps must be a positive integer, got {steps!r}")
    if not lr > 0:
        raise ConfigError(f"lr must be > 0, got {lr!r}")
    model = bora.model
    split = _new_task_split(bora, docs, name)
    point = bora.point()
    coupling = model.coupling
    glob = model.global_from_values(point)
    if not coupling.has_tasks:
        return {k: (A.detach().clone(), B.detach().clone()) for k, (A, B) in glob.items()}
    dev = bora.device
    mean, sd, z = _prior_and_start(model, point, glob, dev)
    params = [p for ab in z.values() for p in ab if p.requires_grad]

    def theta() -> dict:
        return {k: (mean[k][0] if model.shared_A else mean[k][0] + sd[k] * zA, mean[k][1] + sd[k] * zB)
                for k, (zA, zB) in z.items()}

    feed = Feed(split, pad_id=bora.pad_id, device=dev, prefix=bora.prefix,
                cache_batch_size=bora.config.fit.eval_batch_size)
    feed.build_cache_()
    bs = batch_size or bora.config.fit.batch_size
    N = len(split)
    n_tok = max(1, split.num_tokens())
    gen = torch.Generator().manual_seed(seed)

    def loss_fn(idx):
        ll = model.loglik(feed.batch(idx), theta()).sum() * (N / len(idx))
        lp = -0.5 * sum(zA.square().sum() + zB.square().sum() for zA, zB in z.values())
        return -(ll + lp) / n_tok

    train_step = TrainStep(loss_fn, params, torch.optim.Adam(params, lr=lr), clip_norm=bora.config.fit.clip_norm)

    def stream():
        while True:
            yield from batches(split, bs, shuffle=True, generator=gen)

    it = stream()
    model.adapters.train(True)
    try:
        with seeded(dev, sample_seed(seed, STREAMS["new_task"])):
            for k in range(1, steps + 1):
                train_step(next(it), k)
    finally:
        model.adapters.train(False)
    with torch.no_grad():
        return {k: (A.detach().clone(), B.detach().clone()) for k, (A, B) in theta().items()}


def _prior_and_start(model: BoraModel, point: dict, glob: dict, dev: torch.device) -> tuple[dict, dict, dict]:
    """Per adapter key: the new task's prior mean ``(A, B)`` and sd, and its starting ``z`` (leaf tensors)."""
    coupling = model.coupling
    tau = model.tau_by_key(point)
    shared_A = model.shared_A_from_values(point) if model.shared_A else None
    mean, sd, z = {}, {}, {}
    for k, (sa, sb) in model.shapes.items():
        if not coupling.has_global:
            mean[k] = (torch.zeros(sa, device=dev), torch.zeros(sb, device=dev))
            sd[k] = float(model.prior.global_scale)
            z0 = (model.init_A[k] / sd[k], torch.zeros(sb, device=dev))
        else:
            mean[k] = (glob[k][0].detach(), glob[k][1].detach())
            sd[k] = float(tau[k]) ** -0.5
            z0 = (torch.zeros(sa, device=dev), torch.zeros(sb, device=dev))
        if model.shared_A:  # A is global: held fixed at the fit's A (z_A unused)
            mean[k] = (shared_A[k].detach(), mean[k][1])
            z0 = (torch.zeros(sa, device=dev), z0[1])
        # plain leaf tensors (the adapter layers store what they are given; an nn.Parameter would register)
        z[k] = (z0[0].clone().requires_grad_(not model.shared_A), z0[1].clone().requires_grad_(True))
    return mean, sd, z
