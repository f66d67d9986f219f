"""Parallelism applied to the plain model from outside (mesh, TP, Ulysses SP, FSDP2, DeepSpeed, FP8): see issue 5."""
