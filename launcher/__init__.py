"""Multi-node launch, Kubernetes manifests and monitoring: see issue 6."""
