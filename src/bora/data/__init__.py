"""Layer 2: documents, per-task splits, tokenisation, minibatches and feeds on a device."""
