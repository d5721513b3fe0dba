"""bora: Bayesian hierarchical LoRA for multi-task language models, in Pyro.

Importing bora changes no global state: Pyro's ``module_local_params`` is switched on only inside
bora's own guides (:mod:`bora.model.guides`), and plots draw on their own figures (:mod:`bora.diagnostics.plots`).
"""

__version__ = "0.1.0"
