"""Layer 3: the Pyro model (priors, offset reparameterisation, LM likelihood) and its guides."""
