"""Layer 1: the base LM and its LoRA adapters (layers, injection, frozen prefix, LM head, linearisation)."""
