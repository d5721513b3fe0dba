"""Layer 0: configs, the coupling, devices and arithmetic, processes, seeds and safe file writes."""
