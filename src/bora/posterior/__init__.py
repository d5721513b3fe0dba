"""Layer 6: posteriors of a fit (Laplace, samples) and generation with them."""
