"""Multi-process tests, launched with torchrun on gloo (CPU)."""
