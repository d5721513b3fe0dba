"""Layer 7: fit folders, checkpoints, warm starts and PEFT export."""
