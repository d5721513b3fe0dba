"""bora: Bayesian hierarchical LoRA for multi-task language models, in Pyro.

>>> import bora
>>> config = bora.BoraConfig(adapter=bora.AdapterConfig(rank=4), fit=bora.FitConfig(epochs=2))
>>> config.adapter.rank, config.fit.epochs
(4, 2)

The public API is the names below, importable from ``bora`` itself (``from bora import Bora, BoraConfig``).
They load lazily (:pep:`562`): ``import bora`` imports neither torch nor Pyro, and each name imports its
module on first use. Importing bora changes no global state: Pyro's ``module_local_params`` is switched on
only inside bora's own guides (:mod:`bora.model.guides`), and plots draw on their own figures
(:mod:`bora.diagnostics.plots`).

The model:

- :class:`~bora.api.Bora`: a base LM with hierarchical LoRA adapters; fit, evaluate, save and load it.

Configs (frozen, validated, JSON round-tripping) and errors:

- :class:`~bora.core.config.BoraConfig`, made of :class:`~bora.core.config.AdapterConfig`,
  :class:`~bora.core.config.PriorConfig`, :class:`~bora.core.config.FitConfig` and
  :class:`~bora.core.config.DataConfig`; :class:`~bora.core.config.CheckpointConfig` for checkpoints.
- :class:`~bora.core.config.ConfigError`: an invalid value, with a one-line message;
  :class:`~bora.fit.step.NumericalError`: a non-finite loss or gradient stopped the fit.

Fitting:

- :class:`~bora.fit.loop.FitLoop` over an explicit :class:`~bora.fit.state.FitState`, returning a
  :class:`~bora.fit.loop.FitResult`; :class:`~bora.fit.callbacks.Callback` is the base of its callbacks and
  :class:`~bora.io.checkpoint.Checkpointer` the one that writes crash-safe checkpoints.

Posteriors:

- :class:`~bora.posterior.laplace.HierarchicalLaplace`: the Laplace posterior around a MAP fit;
  :class:`~bora.posterior.samples.Posterior`: posterior samples of the adapters.

Data, models for smoke runs, and printing:

- :func:`~bora.data.shakespeare.load_shakespeare`: the embedded Shakespeare corpus;
  :func:`~bora.data.fortunes.category_sizes`: the fortune categories the second corpus can use, and their sizes;
  :func:`~bora.lora.base.tiny_model`: a random-init tiny LM and tokenizer (seconds; for smoke tests).
- :func:`~bora.cli.tables.format_table` and :func:`~bora.cli.tables.format_posterior_table`: the per-task
  perplexity tables the ``bora`` command prints.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# each public name -> the module that defines it (imported on first access)
_EXPORTS = {
    "AdapterConfig": "bora.core.config",
    "Bora": "bora.api",
    "BoraConfig": "bora.core.config",
    "Callback": "bora.fit.callbacks",
    "CheckpointConfig": "bora.core.config",
    "Checkpointer": "bora.io.checkpoint",
    "ConfigError": "bora.core.config",
    "DataConfig": "bora.core.config",
    "FitConfig": "bora.core.config",
    "FitLoop": "bora.fit.loop",
    "FitResult": "bora.fit.loop",
    "FitState": "bora.fit.state",
    "HierarchicalLaplace": "bora.posterior.laplace",
    "NumericalError": "bora.fit.step",
    "Posterior": "bora.posterior.samples",
    "PriorConfig": "bora.core.config",
    "format_posterior_table": "bora.cli.tables",
    "format_table": "bora.cli.tables",
    "category_sizes": "bora.data.fortunes",
    "load_shakespeare": "bora.data.shakespeare",
    "tiny_model": "bora.lora.base",
}

__all__ = [
    "AdapterConfig",
    "Bora",
    "BoraConfig",
    "Callback",
    "CheckpointConfig",
    "Checkpointer",
    "ConfigError",
    "DataConfig",
    "FitConfig",
    "FitLoop",
    "FitResult",
    "FitState",
    "HierarchicalLaplace",
    "NumericalError",
    "Posterior",
    "PriorConfig",
    "category_sizes",
    "format_posterior_table",
    "format_table",
    "load_shakespeare",
    "tiny_model",
]

if TYPE_CHECKING:  # for type checkers and editors; at run time the names load lazily (__getattr__ below)
    from bora.api import Bora
    from bora.cli.tables import format_posterior_table, format_table
    from bora.core.config import (AdapterConfig, BoraConfig, CheckpointConfig, ConfigError, DataConfig, FitConfig,
                                  PriorConfig)
    from bora.data.fortunes import category_sizes
    from bora.data.shakespeare import load_shakespeare
    from bora.fit.callbacks import Callback
    from bora.fit.loop import FitLoop, FitResult
    from bora.fit.state import FitState
    from bora.fit.step import NumericalError
    from bora.io.checkpoint import Checkpointer
    from bora.lora.base import tiny_model
    from bora.posterior.laplace import HierarchicalLaplace
    from bora.posterior.samples import Posterior


def __getattr__(name: str):
    """Import a public name's module on first access and keep the name here (:pep:`562`)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'bora' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
