"""Memory planning: predict peak memory by component, pick a configuration that fits, measure it."""
