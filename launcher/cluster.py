"""The cluster a run goes to, and the environment every launcher gives the trainer.

One description (nodes, processes per node, rendezvous endpoint, restarts) feeds every target: torchrun, the deepspeed
launcher, Slurm and Kubernetes. A run moves between them without re-deriving sizes, and the environment (threads, NCCL or
gloo settings) is chosen in one place.

Object-store settings (`S3_ENDPOINT_URL`, AWS credentials) are never written into commands, scripts, manifests or logs:
a launched run inherits them from the launcher's environment, Slurm passes the submitter's environment on, and Kubernetes
reads them from a Secret.
"""
from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import yaml


class LaunchError(ValueError):
    """A launch cannot be built from these inputs; the message names the setting and a fix."""


# Read by the data loader (mosaicml-streaming through boto3); passed through from the environment, never written out.
OBJECT_STORE_ENV = ("S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION")
ACCELERATORS = ("gpu", "cpu")
LOCAL_RDZV_ENDPOINT = "127.0.0.1:29400"  # torchrun's default port, on this machine: for one node


@dataclass
class Cluster:
    """Where and how many: the part of a launch that does not depend on the training config."""

    nodes: int = 1
    nproc_per_node: int = 1  # processes per node: the GPUs per node on a GPU cluster
    accelerator: str = "gpu"  # "gpu": NCCL | "cpu": gloo
    min_nodes: Optional[int] = None  # elastic: keep training with as few as this many nodes (c10d); None = fixed size
    # host:port of torchrun's c10d rendezvous (any node's address); None = LOCAL_RDZV_ENDPOINT, for one node only. Slurm
    # and Kubernetes launches put the rendezvous on a node of the job themselves.
    rdzv_endpoint: Optional[str] = None
    single_host: bool = False  # all "nodes" run on this machine (a test of multi-node runs): a loopback rendezvous is fine
    rdzv_id: str = "echomotion"  # unique per job, so two jobs on one endpoint never join each other
    max_restarts: int = 3  # times torchrun restarts the worker group (after a failure or a node joining) before giving up
    shutdown_timeout: int = 300  # seconds a worker has after SIGTERM to write its checkpoint before SIGKILL
    threads_per_proc: Optional[int] = None  # OMP_NUM_THREADS; None = cpus_per_node / processes per node
    cpus_per_node: Optional[int] = None  # None = counted where the job runs (see threads())
    ifname: Optional[str] = None  # network interface for NCCL / gloo sockets (NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME)

    @property
    def world_size(self) -> int:
        return self.nodes * self.nproc_per_node

    @property
    def elastic(self) -> bool:
        return self.min_nodes is not None and self.min_nodes < self.nodes

    @property
    def nnodes(self) -> str:
        """torchrun's --nnodes: `N`, or `MIN:MAX` when elastic."""
        return f"{self.min_nodes}:{self.nodes}" if self.elastic else str(self.nodes)

    def threads(self) -> Optional[int]:
        """OMP_NUM_THREADS as far as the description fixes it: threads_per_proc, else cpus_per_node / processes per
        node. None when neither is set: this machine's cores say nothing about a remote node's, so each target counts
        them where the job runs (`on_this_machine` for torchrun and deepspeed, $SLURM_CPUS_ON_NODE in the sbatch
        script, the pod's CPU request in a manifest)."""
        if self.threads_per_proc:
            return self.threads_per_proc
        return max(1, self.cpus_per_node // self.nproc_per_node) if self.cpus_per_node else None

    def on_this_machine(self) -> "Cluster":
        """For the launches that run where they are made (torchrun, deepspeed): an unset cpus_per_node is this
        machine's core count."""
        return self if self.cpus_per_node else replace(self, cpus_per_node=os.cpu_count() or 1)

    def endpoint(self) -> str:
        """torchrun's --rdzv_endpoint when the launch itself does not place the rendezvous: the given one, else this
        machine, which only a one-node run can use."""
        endpoint = self.rdzv_endpoint or LOCAL_RDZV_ENDPOINT
        problem = self._unreachable(endpoint)
        if problem:
            raise LaunchError(problem)
        return endpoint

    def _unreachable(self, endpoint: str) -> Optional[str]:
        """Why the other nodes could not reach `endpoint` (a loopback address with nodes > 1), or None."""
        host = endpoint.rpartition(":")[0].strip("[]")
        if self.nodes == 1 or self.single_host or not _is_loopback(host):
            return None
        given = "" if self.rdzv_endpoint else " (the default)"
        return (
            f"rdzv_endpoint={endpoint}{given} is a loopback address, which the other nodes cannot reach, but "
            f"nodes={self.nodes}: pass --rdzv-endpoint HOST:PORT with the address of one of the nodes (the same on "
            "every node), or --single-host if every node runs on this machine"
        )

    def validate(self) -> None:
        problems = []
        if self.nodes < 1 or self.nproc_per_node < 1:
            problems.append(f"nodes={self.nodes} and nproc_per_node={self.nproc_per_node} must be >= 1")
        if self.accelerator not in ACCELERATORS:
            problems.append(f"accelerator={self.accelerator!r}: choose one of {', '.join(ACCELERATORS)}")
        if self.min_nodes is not None and not 1 <= self.min_nodes <= self.nodes:
            problems.append(f"min_nodes={self.min_nodes} must be between 1 and nodes={self.nodes}")
        if self.rdzv_endpoint is not None:
            host, _, port = self.rdzv_endpoint.rpartition(":")
            if not host or not port.isdigit():
                problems.append(f"rdzv_endpoint={self.rdzv_endpoint!r} must be host:port")
            elif problem := self._unreachable(self.rdzv_endpoint):
                problems.append(problem)
        if self.max_restarts < 0 or self.shutdown_timeout < 1:
            problems.append("max_restarts must be >= 0 and shutdown_timeout >= 1 second")
        for key in ("threads_per_proc", "cpus_per_node"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                problems.append(f"{key}={getattr(self, key)} must be >= 1 (or unset)")
        if problems:
            raise LaunchError("invalid cluster description:\n  - " + "\n  - ".join(problems))


def _is_loopback(host: str) -> bool:
    """localhost or a loopback IP (127.0.0.0/8, ::1); names are not resolved (that is the nodes' business)."""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_cluster(path: Optional[str | Path] = None, defaults: Optional[Mapping[str, Any]] = None, **given: Any) -> Cluster:
    """Cluster's defaults <- `defaults` (the target's) <- the YAML file (keys are Cluster's fields) <- the keyword
    arguments that are not None; validated."""
    known = {f.name for f in fields(Cluster)}
    values: dict[str, Any] = dict(defaults or {})
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise LaunchError(f"cluster file {p} does not exist")
        raw = yaml.safe_load(p.read_text()) or {}
        if not isinstance(raw, dict):
            raise LaunchError(f"cluster file {p} must hold a mapping of settings, e.g. 'nodes: 2'")
        unknown = sorted(set(raw) - known)
        if unknown:
            raise LaunchError(f"cluster file {p}: unknown keys {unknown}; known keys are {sorted(known)}")
        values.update(raw)
    unknown = sorted(set(given) - known)
    if unknown:
        raise LaunchError(f"unknown cluster settings {unknown}")
    values.update({k: v for k, v in given.items() if v is not None})
    cluster = Cluster(**values)
    cluster.validate()
    return cluster


def backend_env(cluster: Cluster, c10d: bool) -> dict[str, str]:
    """Environment for the agents and their workers. c10d: the launch uses torchrun's c10d rendezvous.
    OMP_NUM_THREADS only when the description fixes it (Cluster.threads); otherwise the target sets it where it runs."""
    threads = cluster.threads()
    env = {**({"OMP_NUM_THREADS": str(threads)} if threads else {}), "PYTHONUNBUFFERED": "1"}
    if cluster.accelerator == "gpu":
        env["NCCL_DEBUG"] = "WARN"
        env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "1"  # a failed collective ends the process, so the launcher can restart it
        if cluster.ifname:
            env["NCCL_SOCKET_IFNAME"] = cluster.ifname
    elif cluster.ifname:
        env["GLOO_SOCKET_IFNAME"] = cluster.ifname
    if c10d:
        # torch 2.14 shares the rendezvous TCPStore with the workers by default; a node that joins after another one
        # died then waits forever for MASTER_ADDR (pytorch/pytorch#135712, #147064). Without sharing, restarts work.
        env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    return env


def object_store_note(s3_paths: Sequence[str], environ: Mapping[str, str]) -> Optional[str]:
    """One line saying which object-store variables pass through (names only: values never leave the environment)."""
    if not s3_paths:
        return None
    present = [k for k in OBJECT_STORE_ENV if environ.get(k)]
    missing = [k for k in OBJECT_STORE_ENV if not environ.get(k)]
    return (
        f"data from {', '.join(s3_paths)}: object-store settings pass through from the environment "
        f"(set: {', '.join(present) or 'none'}; unset: {', '.join(missing) or 'none'})"
    )
