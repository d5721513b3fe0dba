"""What read-only consumers of a fit (diagnostics, report) see of it: :class:`FitView`, and its data.

>>> from bora.diagnostics.view import FitView
>>> isinstance(object(), FitView)      # a fitted bora.api.Bora is one, and so is anything with these members
False

:class:`FitView` is the typed interface :mod:`bora.diagnostics.inference_data` and :mod:`bora.diagnostics.report` use
instead of
the whole :class:`~bora.api.Bora`; :func:`load_data` loads, splits and tokenises a config's
documents, and :func:`fit_splits` reloads a fit's own splits (its tasks in its order).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Protocol, Sequence, runtime_checkable

import torch

from ..data.documents import load_documents, split_documents, tokenize_splits

if TYPE_CHECKING:
    from ..core.config import BoraConfig
    from ..data.documents import TokenizedSplit
    from ..data.feed import Feed
    from ..fit.loop import FitResult
    from ..model.hierarchy import BoraModel
    from ..posterior.samples import Posterior

__all__ = ["FitView", "load_data", "fit_splits"]


@runtime_checkable
class FitView(Protocol):
    """The members of a fit that diagnostics and reports read (:class:`bora.api.Bora` has them all)."""

    config: BoraConfig
    tasks: tuple[str, ...]
    tokenizer: object
    model: BoraModel
    metrics: dict
    result: Optional[FitResult]

    def feed(self, split: TokenizedSplit, *, progress: bool = False, desc: str = "") -> Feed:
        """The split on the fit's device, with its frozen-prefix cache."""

    def point(self) -> dict[str, torch.Tensor]:
        """Point estimate of every latent site."""

    def params(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per-task adapters at the point estimate."""

    def posterior(self, num_samples: int = 8, *, seed: int = 0) -> Posterior:
        """``num_samples`` adapter sets from the fit's posterior."""

    def tau_estimate(self) -> Optional[dict[str, float]]:
        """The coupling precision(s) of the fit."""

    def evaluate(self, split, *, base: bool = False) -> dict:
        """Per-task and overall NLL / perplexity of ``split``."""


def load_data(config: BoraConfig, tokenizer, tasks: Optional[Sequence[str]] = None, *,
              splits=None) -> dict[str, TokenizedSplit]:
    """Load, split and tokenize the configured documents: ``{"train", "val", "test"}``."""
    if splits is None:
        splits = split_documents(load_documents(config.data), config.data, tasks=tasks)
    return tokenize_splits(splits, tokenizer, config.data)


def fit_splits(fit: FitView) -> dict[str, TokenizedSplit]:
    """The fit's ``{"train", "val", "test"}`` splits, reloaded from its data config (its tasks, its order)."""
    return load_data(fit.config, fit.tokenizer, tasks=fit.tasks)
