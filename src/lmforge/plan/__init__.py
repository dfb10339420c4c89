"""Memory planning: predict peak memory by component, pick a configuration that fits, measure it.

workload.py (what runs) → params.py, activations.py (its tensors) → estimate.py (the peak) →
hardware.py (FLOPs, GPUs, time) · autofit.py (a plan for a budget) · tracker.py (measured)."""
