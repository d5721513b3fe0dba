"""Layer 5: the fit loop over explicit state, its callbacks, the optimiser step, curvature and tau."""
