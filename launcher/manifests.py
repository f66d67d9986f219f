"""Kubernetes manifests for a training run: a Kubeflow PyTorchJob or a JobSet, rendered from the same cluster description,
trainer call and pod settings.

The two differ in how a failure is survived:
- PyTorchJob: torchrun's c10d rendezvous on the Master pod (or, elastic, on worker 0). A failed container restarts in
  place (`OnFailure`), rejoins, and torchrun restarts every node's worker group, which resumes from the last checkpoint.
- JobSet: fixed node ranks (the Indexed Job's completion index) and a static rendezvous on pod 0's DNS name. Any failed
  pod fails the Job and the JobSet recreates all of them (preemptions do not count against `maxRestarts`); the new pods
  resume from the last checkpoint.

Both mount `/dev/shm` (memory-backed, for the data loader's shared memory), a shared checkpoint volume (every rank writes
its shards into the same folder, so it must be ReadWriteMany), a node-local data cache, read object-store credentials from
a Secret, and give the trainer `terminationGracePeriodSeconds` beyond torchrun's shutdown timeout, so SIGTERM ends in a
checkpoint, and pass that grace to the trainer as `train.termination_grace` (its exporter reports it for the
EchoMotionCheckpointNearGrace alert). Prometheus scrape annotations point at local rank 0's exporter; every rank's port
is declared as `metrics-<local rank>` for the per-rank scrape config in launcher/monitoring/prometheus-scrape.yml.

Scheduling on a shared cluster: node selectors and tolerations (tainted GPU nodes), a priorityClassName, a Kueue queue
(the `kueue.x-k8s.io/queue-name` label on the job, which Kueue admits as a whole), a serviceAccount (workload identity)
and imagePullSecrets (a private registry).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

import yaml

from echomotion import __version__
from echomotion.config import s3_paths

from .cluster import OBJECT_STORE_ENV, Cluster, LaunchError, backend_env
from .commands import TrainerCall, torchrun_c10d, torchrun_static

CHECKPOINT_MOUNT = "/checkpoints"
CACHE_MOUNT = "/cache"
PYTORCHJOB_PORT = 23456  # the training operator's default; it reads the port named pytorchjob-port
COMPLETION_INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
GRACE_MARGIN_S = 60  # beyond torchrun's shutdown timeout: interpreter exit, log flush
# The image the Dockerfile builds: the checkout at this WORKDIR, run as this non-root uid, tagged with the version.
IMAGE_WORKDIR = "/opt/echomotion"
IMAGE_UID = 1000
IMAGE_TAG = __version__
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
TAINT_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")


@dataclass
class PodSettings:
    """What Kubernetes needs beyond the cluster description."""

    name: str
    image: str
    namespace: Optional[str] = None
    cpus: Optional[int] = None  # CPU request per node (pod); also sets the threads per process
    memory: Optional[str] = None  # memory request and limit per pod, e.g. "960Gi"
    shm_size: str = "64Gi"  # /dev/shm (counts against the pod's memory)
    cache_size: str = "200Gi"  # node-local shard cache (emptyDir)
    checkpoint_claim: str = "echomotion-checkpoints"  # a ReadWriteMany PersistentVolumeClaim
    credentials_secret: Optional[str] = "echomotion-object-store"  # keys named like the variables; None = no Secret
    metrics_port: int = 9480  # local rank l serves port + l
    master_port: int = 29500  # JobSet: the static rendezvous port on pod 0
    node_selector: dict[str, str] = field(default_factory=dict)
    extra_resources: dict[str, str] = field(default_factory=dict)  # e.g. {"rdma/ib": "1"}, added to the limits
    workdir: Optional[str] = IMAGE_WORKDIR  # the checkout inside the image (configs/ relative to it); None = WORKDIR
    tolerations: list[dict[str, str]] = field(default_factory=list)  # Kubernetes Toleration objects (see toleration())
    priority_class: Optional[str] = None  # priorityClassName
    queue: Optional[str] = None  # Kueue LocalQueue: the job's kueue.x-k8s.io/queue-name label
    service_account: Optional[str] = None  # serviceAccountName
    image_pull_secrets: list[str] = field(default_factory=list)  # Secret names for a private registry

    def validate(self) -> None:
        if len(self.name) > 40 or not _DNS_LABEL.match(self.name):
            raise LaunchError(
                f"name={self.name!r}: use at most 40 lowercase letters, digits and '-' (pod and DNS names are built from it)"
            )
        if not self.image:
            raise LaunchError("image is required: the container image holding this checkout and its dependencies")


def pull_policy(image: str) -> str:
    """A pinned tag or digest never changes, so a node's copy is current (IfNotPresent); `:latest` or no tag moves, so a
    node could run a stale copy (Always)."""
    if "@" in image:
        return "IfNotPresent"
    name = image.rsplit("/", 1)[-1]
    tag = name.split(":", 1)[1] if ":" in name else "latest"
    return "Always" if tag == "latest" else "IfNotPresent"


def toleration(text: str) -> dict[str, str]:
    """`KEY[=VALUE][:EFFECT]` (kubectl taint's spelling) -> a Toleration: Equal with a value, else Exists; no effect
    tolerates every effect of that key."""
    rest, _, effect = text.partition(":")
    key, eq, value = rest.partition("=")
    if not key or (effect and effect not in TAINT_EFFECTS):
        raise LaunchError(f"--toleration {text!r}: expected KEY[=VALUE][:EFFECT] with EFFECT one of "
                          f"{', '.join(TAINT_EFFECTS)}, e.g. nvidia.com/gpu=present:NoSchedule")
    out = {"key": key, "operator": "Equal" if eq else "Exists", **({"value": value} if eq else {})}
    return {**out, **({"effect": effect} if effect else {})}


def termination_grace(cluster: Cluster) -> int:
    """terminationGracePeriodSeconds: torchrun's shutdown timeout plus a margin, so SIGTERM ends in a checkpoint."""
    return cluster.shutdown_timeout + GRACE_MARGIN_S


def trainer_defaults(pod: PodSettings) -> dict[str, str]:
    """Where a pod keeps its run (the shared volume, so every restart resumes) and serves metrics; overrides win."""
    return {
        "train.run_dir": f"{CHECKPOINT_MOUNT}/{pod.name}",
        "data.cache_dir": f"{CACHE_MOUNT}/shards",
        "train.metrics_port": str(pod.metrics_port),
        "train.progress": "false",
    }


def _env(cluster: Cluster, c10d: bool, pod: PodSettings, remote_data: bool) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in backend_env(cluster, c10d).items()]
    if pod.credentials_secret:
        required = set(OBJECT_STORE_ENV[1:3]) if remote_data else set()
        for key in OBJECT_STORE_ENV:
            ref: dict[str, Any] = {"name": pod.credentials_secret, "key": key}
            if key not in required:
                ref["optional"] = True
            env.append({"name": key, "valueFrom": {"secretKeyRef": ref}})
    return env


def _pod_template(
    cluster: Cluster, pod: PodSettings, container_name: str, command: list[str], env: list[dict[str, Any]],
    rendezvous_port: tuple[str, int], restart_policy: Optional[str] = None,
) -> dict[str, Any]:
    limits: dict[str, Any] = dict(pod.extra_resources)
    requests: dict[str, Any] = {}
    if cluster.accelerator == "gpu":
        limits["nvidia.com/gpu"] = cluster.nproc_per_node
    if pod.cpus:
        requests["cpu"] = str(pod.cpus)
    if pod.memory:
        requests["memory"] = limits["memory"] = pod.memory
    ports = [{"name": rendezvous_port[0], "containerPort": rendezvous_port[1]}]
    ports += [{"name": f"metrics-{i}", "containerPort": pod.metrics_port + i} for i in range(cluster.nproc_per_node)]
    container: dict[str, Any] = {
        "name": container_name,
        "image": pod.image,
        "imagePullPolicy": pull_policy(pod.image),
        "command": command,
        "env": env,
        "ports": ports,
        "resources": {k: v for k, v in (("requests", requests), ("limits", limits)) if v},
        "volumeMounts": [
            {"name": "dshm", "mountPath": "/dev/shm"},
            {"name": "checkpoints", "mountPath": CHECKPOINT_MOUNT},
            {"name": "cache", "mountPath": CACHE_MOUNT},
        ],
    }
    if pod.workdir:
        container["workingDir"] = pod.workdir
    spec: dict[str, Any] = {
        "terminationGracePeriodSeconds": termination_grace(cluster),
        # the image's non-root user; fsGroup makes the checkpoint volume writable by it
        "securityContext": {"runAsNonRoot": True, "runAsUser": IMAGE_UID, "runAsGroup": IMAGE_UID,
                            "fsGroup": IMAGE_UID},
        "containers": [container],
        "volumes": [
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": pod.shm_size}},
            {"name": "checkpoints", "persistentVolumeClaim": {"claimName": pod.checkpoint_claim}},
            {"name": "cache", "emptyDir": {"sizeLimit": pod.cache_size}},
        ],
    }
    if restart_policy:
        spec["restartPolicy"] = restart_policy
    spec.update(_scheduling(pod))
    return {
        "metadata": {
            "labels": _labels(pod),
            "annotations": {
                "prometheus.io/scrape": "true",
                "prometheus.io/port": str(pod.metrics_port),
                "prometheus.io/path": "/metrics",
            },
        },
        "spec": spec,
    }


def _scheduling(pod: PodSettings) -> dict[str, Any]:
    """The pod spec's placement and identity fields that are set."""
    fields = {
        "nodeSelector": dict(pod.node_selector),
        "tolerations": [dict(t) for t in pod.tolerations],
        "priorityClassName": pod.priority_class,
        "serviceAccountName": pod.service_account,
        "imagePullSecrets": [{"name": n} for n in pod.image_pull_secrets],
    }
    return {k: v for k, v in fields.items() if v}


def _labels(pod: PodSettings) -> dict[str, str]:
    return {"app.kubernetes.io/name": "echomotion", "app.kubernetes.io/instance": pod.name}


def _metadata(pod: PodSettings) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": pod.name, "labels": {**_labels(pod), **({KUEUE_QUEUE_LABEL: pod.queue} if pod.queue else {})}}
    if pod.namespace:
        meta["namespace"] = pod.namespace
    return meta


def _prepare(cluster: Cluster, call: TrainerCall, pod: PodSettings) -> tuple[Cluster, TrainerCall, bool]:
    """Validate everything up front; threads follow the pod's CPU request (this machine's cores say nothing about a
    pod's, so without a request the threads must be given)."""
    pod.validate()
    if pod.cpus and cluster.cpus_per_node is None:
        cluster = replace(cluster, cpus_per_node=pod.cpus)
    if cluster.threads() is None:
        raise LaunchError("OMP_NUM_THREADS is unknown: the pod has no CPU request; pass --cpus N (the pod's CPU request; "
                          "threads = N / processes per node) or --threads-per-proc")
    grace = str(termination_grace(cluster))
    given = [o for o in call.overrides if o.split("=", 1)[0] == "train.termination_grace"]
    if given and given[-1].split("=", 1)[1] != grace:
        raise LaunchError(f"{given[-1]}: the manifest sets train.termination_grace to its terminationGracePeriodSeconds "
                          f"({grace} = --shutdown-timeout + {GRACE_MARGIN_S}); drop the override and change "
                          "--shutdown-timeout instead")
    call = call.with_defaults({**trainer_defaults(pod), "train.termination_grace": grace})
    cfg = call.load()
    return cluster, call, bool(s3_paths(cfg.data))


def render_pytorchjob(cluster: Cluster, call: TrainerCall, pod: PodSettings) -> dict[str, Any]:
    """A kubeflow.org/v1 PyTorchJob. Fixed size: Master + (nodes - 1) Workers, rendezvous at the Master
    ($MASTER_ADDR:$MASTER_PORT, set by the operator). Elastic (min_nodes < nodes): Workers only with an elasticPolicy;
    the operator sets PET_RDZV_ENDPOINT to worker 0."""
    cluster, call, remote = _prepare(cluster, call, pod)
    endpoint = "$(PET_RDZV_ENDPOINT)" if cluster.elastic else "$(MASTER_ADDR):$(MASTER_PORT)"
    command = torchrun_c10d(cluster, call, endpoint=endpoint, rdzv_id=pod.name)
    template = _pod_template(cluster, pod, "pytorch", command, _env(cluster, True, pod, remote), ("pytorchjob-port", PYTORCHJOB_PORT))

    def replica(n: int) -> dict[str, Any]:
        return {"replicas": n, "restartPolicy": "OnFailure", "template": template}

    spec: dict[str, Any] = {"nprocPerNode": str(cluster.nproc_per_node)}
    if cluster.elastic:
        spec["elasticPolicy"] = {
            "rdzvBackend": "c10d",
            "rdzvId": pod.name,
            "minReplicas": cluster.min_nodes,
            "maxReplicas": cluster.nodes,
            "maxRestarts": cluster.max_restarts,
        }
        spec["pytorchReplicaSpecs"] = {"Worker": replica(cluster.nodes)}
    else:
        spec["pytorchReplicaSpecs"] = {"Master": replica(1), **({"Worker": replica(cluster.nodes - 1)} if cluster.nodes > 1 else {})}
    spec["runPolicy"] = {"cleanPodPolicy": "None", "backoffLimit": cluster.max_restarts}
    return {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": _metadata(pod), "spec": spec}


def render_jobset(cluster: Cluster, call: TrainerCall, pod: PodSettings) -> dict[str, Any]:
    """A jobset.x-k8s.io/v1alpha2 JobSet: one Indexed Job of `nodes` pods; completion index = node rank; pod 0 is the
    master at `<name>-node-0-0.<name>` (JobSet's DNS hostnames)."""
    if cluster.elastic:
        raise LaunchError("a JobSet launch has fixed node ranks (the completion index); for elastic training render a pytorchjob")
    cluster, call, remote = _prepare(cluster, call, pod)
    master = f"{pod.name}-node-0-0.{pod.name}"
    command = torchrun_static(cluster, call, master, pod.master_port, "$(NODE_RANK)")
    env = [{"name": "NODE_RANK", "valueFrom": {"fieldRef": {"fieldPath": COMPLETION_INDEX}}}, *_env(cluster, False, pod, remote)]
    template = _pod_template(cluster, pod, "trainer", command, env, ("rendezvous", pod.master_port), restart_policy="Never")
    job_spec = {
        "parallelism": cluster.nodes,
        "completions": cluster.nodes,
        "completionMode": "Indexed",
        "backoffLimit": 0,
        # A pod evicted or preempted fails the Job with reason PodFailurePolicy; the JobSet rule below restarts the
        # whole set for it without spending maxRestarts, which are for real failures.
        "podFailurePolicy": {"rules": [{"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}]},
        "template": template,
    }
    spec = {
        "network": {"enableDNSHostnames": True, "publishNotReadyAddresses": True},
        "failurePolicy": {
            "maxRestarts": cluster.max_restarts,
            "rules": [
                {"name": "disruption", "action": "RestartJobSetAndIgnoreMaxRestarts", "onJobFailureReasons": ["PodFailurePolicy"]},
            ],
        },
        "replicatedJobs": [{"name": "node", "replicas": 1, "template": {"spec": job_spec}}],
    }
    return {"apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet", "metadata": _metadata(pod), "spec": spec}


class _NoAliases(yaml.SafeDumper):
    """Writes a dict used twice (the Master's and Workers' pod template) out twice instead of as &id001 / *id001, which
    some tools (kustomize patches, kubectl diff readers, people) handle badly."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def to_yaml(manifest: dict[str, Any], how: str) -> str:
    """The manifest as YAML, headed by the command that renders it (edit the inputs, not the file)."""
    body = yaml.dump(manifest, Dumper=_NoAliases, sort_keys=False, width=120, default_flow_style=False)
    return f"# Rendered by: {how}\n# Edit the inputs and render again rather than editing this file.\n{body}"


# ------------------------------------------------------------------------------------------------------------ examples
H100_NODE = {"cpus": 96, "memory": "960Gi", "shm_size": "128Gi", "cache_size": "1Ti",
             "node_selector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}}
COMMON_OVERRIDES = [
    "data.path=s3://humove/train",
    "data.null_text_path=/checkpoints/humove/null_text.pt",  # streamed data keeps the empty prompt's embedding local
    "data.num_workers=8",
    "train.phase=1",
    "train.precision=bf16",
]
EXAMPLES: dict[str, tuple[Cluster, list[str], str]] = {
    # name: (cluster, overrides, model config)
    "wan2.1-1.3b-1x8": (
        Cluster(nodes=1, nproc_per_node=8, shutdown_timeout=300),
        [*COMMON_OVERRIDES, "train.init_wan=/checkpoints/pretrained/Wan2.1-T2V-1.3B"],
        "configs/model/wan2.1-1.3b.yaml",
    ),
    "wan2.2-5b-8x8": (
        Cluster(nodes=8, nproc_per_node=8, shutdown_timeout=600),
        # HSDP, one replica per node: FSDP all-gathers stay on NVLink, only gradient shards cross nodes (tools/plan.py;
        # for Phase 2's 33k-token samples add parallel.sp=8, docs/parallelism.md)
        [*COMMON_OVERRIDES, "train.init_wan=/checkpoints/pretrained/Wan2.2-TI2V-5B", "data.num_canonical_nodes=8",
         "parallel.dp_replicate=8"],
        "configs/model/wan2.2-5b.yaml",
    ),
}
EXAMPLE_IMAGE = f"registry.example.com/echomotion:{IMAGE_TAG}"


def render_examples(root: Path) -> dict[str, str]:
    """File name -> YAML of every example manifest; `root` is the checkout (configs are read from it)."""
    out = {}
    for key, (cluster, overrides, config) in EXAMPLES.items():
        name = "em-" + key.replace(".", "")
        for kind, render in (("pytorchjob", render_pytorchjob), ("jobset", render_jobset)):
            pod = PodSettings(name=name, image=EXAMPLE_IMAGE, **H100_NODE)  # type: ignore[arg-type]
            manifest = render(cluster, TrainerCall(config, overrides, base_dir=root), pod)
            out[f"{key}-{kind}.yaml"] = to_yaml(manifest, f"python -m launcher examples  (launcher/manifests.py EXAMPLES[{key!r}])")
    return out
