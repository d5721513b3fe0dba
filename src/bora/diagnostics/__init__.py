"""Layer 8: pooling summaries, ArviZ data, plots and the report folder of a fit."""
