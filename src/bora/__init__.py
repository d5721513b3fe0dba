"""bora: Bayesian hierarchical LoRA for multi-task language models, in Pyro."""

__version__ = "0.1.0"

import pyro as _pyro

# Parameters live in the modules that own them (guides, ELBO modules), never in Pyro's global
# param store: bora code and tests do not read or write the global store.
_pyro.settings.set(module_local_params=True)
