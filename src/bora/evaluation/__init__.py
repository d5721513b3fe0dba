"""Layer 4: per-task NLL and perplexity, predictive metrics, the document-level BMA."""
