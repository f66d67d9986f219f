"""Multi-node launch (torchrun, deepspeed, Slurm), Kubernetes manifests (PyTorchJob, JobSet) and monitoring (Prometheus
alerts, Grafana dashboard) for the trainer. `python -m launcher --help`; docs/operations.md."""
