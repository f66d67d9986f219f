"""Rendered PyTorchJob and JobSet manifests: offline validation against the Kubernetes schemas (kubernetes-validate, strict)
and the CRD schemas in ../shared/schemas/, what they must contain, and the committed examples being current."""
from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import kubernetes_validate  # a required dev dependency (pip install -e '.[dev]'): fail, never skip
import pytest
import yaml

from launcher.cluster import Cluster, LaunchError
from launcher.commands import TrainerCall
from launcher.cli import main as launcher_main
from launcher.manifests import PodSettings, render_examples, render_jobset, render_pytorchjob, toleration
from tests.ops.helpers import ROOT

SCHEMAS = ROOT.parent / "shared" / "schemas"
CRDS = {"PyTorchJob": "kubeflow.org_pytorchjobs.yaml", "JobSet": "jobset.x-k8s.io_jobsets.yaml"}
K8S_VERSION = "1.30"
SECRET = "ops-test-secret-value-7f3a"
EXAMPLES = ROOT / "launcher/k8s/examples"
OUTSIDE = pytest.mark.optional(reason="the CRD schemas live in the project's shared folder, not in a user's clone")


def call() -> TrainerCall:
    return TrainerCall("configs/tiny.yaml", ["data.path=s3://bucket/humove", "train.steps=1000"], base_dir=ROOT)


def pod(name: str = "em-test") -> PodSettings:
    return PodSettings(name=name, image="registry.example.com/echomotion:test", cpus=32, memory="256Gi",
                       node_selector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}, extra_resources={"rdma/ib": "1"})


def scheduled() -> PodSettings:
    """A pod with every shared-cluster setting: taints, priority, a Kueue queue, a service account, a private registry."""
    return replace(pod(), tolerations=[toleration("nvidia.com/gpu=present:NoSchedule"), toleration("spot")],
                   priority_class="training-high", queue="team-a", service_account="echomotion-trainer",
                   image_pull_secrets=["registry-creds"])


def rendered() -> dict[str, dict[str, Any]]:
    return {
        "pytorchjob-scheduled": render_pytorchjob(Cluster(nodes=2, nproc_per_node=8), call(), scheduled()),
        "jobset-scheduled": render_jobset(Cluster(nodes=2, nproc_per_node=8), call(), scheduled()),
        "pytorchjob-1-node": render_pytorchjob(Cluster(nodes=1, nproc_per_node=8), call(), pod()),
        "pytorchjob-4-nodes": render_pytorchjob(Cluster(nodes=4, nproc_per_node=8), call(), pod()),
        "pytorchjob-elastic": render_pytorchjob(Cluster(nodes=4, min_nodes=2, nproc_per_node=8), call(), pod()),
        "jobset-4-nodes": render_jobset(Cluster(nodes=4, nproc_per_node=8), call(), pod()),
        "jobset-cpu": render_jobset(Cluster(nodes=2, nproc_per_node=2, accelerator="cpu"), call(), pod()),
        **{name: yaml.safe_load(text) for name, text in render_examples(ROOT).items()},
    }


@pytest.fixture(scope="module")
def manifests(monkeypatch_module: pytest.MonkeyPatch) -> dict[str, dict[str, Any]]:
    monkeypatch_module.setenv("AWS_SECRET_ACCESS_KEY", SECRET)  # a secret in the environment must not reach a manifest
    return rendered()


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def pod_templates(m: dict[str, Any]) -> list[dict[str, Any]]:
    if m["kind"] == "PyTorchJob":
        return [r["template"] for r in m["spec"]["pytorchReplicaSpecs"].values()]
    return [j["template"]["spec"]["template"] for j in m["spec"]["replicatedJobs"]]


def test_examples_are_current() -> None:
    """launcher/k8s/examples/ is what the code renders now (`python -m launcher examples` rewrites it)."""
    fresh = render_examples(ROOT)
    assert sorted(p.name for p in EXAMPLES.glob("*.yaml")) == sorted(fresh)
    for name, text in fresh.items():
        assert (EXAMPLES / name).read_text() == text, f"{name} is stale: run python -m launcher examples"


def test_core_objects_validate_against_kubernetes(manifests: dict[str, dict[str, Any]]) -> None:
    """Strict schemas (unknown fields are errors): each pod template as a PodTemplate, each JobSet job as a batch/v1 Job."""
    for m in manifests.values():
        for template in pod_templates(m):
            obj = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": m["metadata"]["name"]}, "template": template}
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        if m["kind"] == "JobSet":
            for rjob in m["spec"]["replicatedJobs"]:
                job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": rjob["name"]}, **rjob["template"]}
                kubernetes_validate.validate(job, K8S_VERSION, strict=True)


def strict(schema: Any) -> Any:
    """An openAPIV3Schema where unknown fields are errors. The API server silently prunes them, so a misspelt field
    (say `nProcPerNode`) would be dropped without a word; here it fails."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) if k in ("properties", "items", "additionalProperties", "anyOf", "allOf", "oneOf") else v
           for k, v in schema.items()}
    if "properties" in out:
        out["properties"] = {k: strict(v) for k, v in schema["properties"].items()}
        if "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def crd_validators() -> dict[str, jsonschema.Validator]:
    if not SCHEMAS.is_dir():
        pytest.skip(f"{SCHEMAS} is absent (the CRD schemas live in the project's shared folder, not in a user's clone)")
    validators = {}
    for kind, filename in CRDS.items():
        crd = yaml.load((SCHEMAS / filename).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        (version,) = [v for v in crd["spec"]["versions"] if v.get("storage")]
        schema = strict(version["schema"]["openAPIV3Schema"])
        validators[kind] = (f"{crd['spec']['group']}/{version['name']}", jsonschema.Draft7Validator(schema))
    return validators


@OUTSIDE
def test_custom_resources_validate_against_crd_schemas(manifests: dict[str, dict[str, Any]], crd_validators) -> None:
    for name, m in manifests.items():
        api_version, validator = crd_validators[m["kind"]]
        assert m["apiVersion"] == api_version, name
        errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(m)]
        assert not errors, f"{name}:\n" + "\n".join(errors[:10])


@OUTSIDE
def test_crd_validation_catches_a_misspelt_field(manifests: dict[str, dict[str, Any]], crd_validators) -> None:
    broken = copy.deepcopy(manifests["pytorchjob-elastic"])
    broken["spec"]["elasticPolicy"]["nProcsPerNode"] = 8
    assert not crd_validators["PyTorchJob"][1].is_valid(broken)


def test_scheduling_settings_reach_every_pod_and_the_queue_label_the_job(manifests: dict[str, dict[str, Any]]) -> None:
    for name in ("pytorchjob-scheduled", "jobset-scheduled"):
        m = manifests[name]
        assert m["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"  # Kueue admits the job as a whole
        for template in pod_templates(m):
            spec = template["spec"]
            assert spec["tolerations"] == [
                {"key": "nvidia.com/gpu", "operator": "Equal", "value": "present", "effect": "NoSchedule"},
                {"key": "spot", "operator": "Exists"}]
            assert (spec["priorityClassName"], spec["serviceAccountName"]) == ("training-high", "echomotion-trainer")
            assert spec["imagePullSecrets"] == [{"name": "registry-creds"}]
            assert "kueue.x-k8s.io/queue-name" not in template["metadata"]["labels"]


def test_cli_flags_render_without_yaml_anchors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The Master and Workers share one pod template: PyYAML wrote it once as &id001 and then *id001."""
    out = tmp_path / "job.yaml"
    assert launcher_main([
        "pytorchjob", "--config", "configs/tiny.yaml", "--name", "em-cli", "--image", "img:1", "--nodes", "3", "--cpus", "8",
        "--toleration", "nvidia.com/gpu:NoSchedule", "--priority-class", "p", "--queue", "q", "--service-account", "sa",
        "--image-pull-secret", "a", "--image-pull-secret", "b", "-o", str(out)]) == 0
    text = out.read_text()
    assert "&id" not in text and "*id" not in text
    m = yaml.safe_load(text)
    assert m["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "q"
    for template in pod_templates(m):
        assert template["spec"]["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        assert template["spec"]["imagePullSecrets"] == [{"name": "a"}, {"name": "b"}]
    assert launcher_main(["jobset", "--config", "configs/tiny.yaml", "--name", "x", "--image", "i", "--cpus", "8",
                          "--toleration", "gpu:Never"]) == 2
    assert "expected KEY[=VALUE][:EFFECT]" in capsys.readouterr().err


def test_pytorchjob_contents(manifests: dict[str, dict[str, Any]]) -> None:
    fixed, elastic = manifests["pytorchjob-4-nodes"]["spec"], manifests["pytorchjob-elastic"]["spec"]
    assert fixed["nprocPerNode"] == "8"
    assert {k: v["replicas"] for k, v in fixed["pytorchReplicaSpecs"].items()} == {"Master": 1, "Worker": 3}
    assert list(manifests["pytorchjob-1-node"]["spec"]["pytorchReplicaSpecs"]) == ["Master"]
    container = fixed["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]
    assert container["name"] == "pytorch" and container["ports"][0] == {"name": "pytorchjob-port", "containerPort": 23456}
    assert "--rdzv_endpoint=$(MASTER_ADDR):$(MASTER_PORT)" in container["command"]
    assert "--nnodes=4" in container["command"]

    assert list(elastic["pytorchReplicaSpecs"]) == ["Worker"] and elastic["pytorchReplicaSpecs"]["Worker"]["replicas"] == 4
    assert elastic["elasticPolicy"] == {
        "rdzvBackend": "c10d", "rdzvId": "em-test", "minReplicas": 2, "maxReplicas": 4, "maxRestarts": 3,
    }
    command = elastic["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["command"]
    assert "--nnodes=2:4" in command and "--rdzv_endpoint=$(PET_RDZV_ENDPOINT)" in command


def test_jobset_contents(manifests: dict[str, dict[str, Any]]) -> None:
    spec = manifests["jobset-4-nodes"]["spec"]
    assert spec["network"]["enableDNSHostnames"] is True
    (rjob,) = spec["replicatedJobs"]
    job = rjob["template"]["spec"]
    assert (job["parallelism"], job["completions"], job["completionMode"]) == (4, 4, "Indexed")
    container = job["template"]["spec"]["containers"][0]
    index = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    assert {"name": "NODE_RANK", "valueFrom": {"fieldRef": {"fieldPath": index}}} in container["env"]
    assert "--node_rank=$(NODE_RANK)" in container["command"]
    assert "--master_addr=em-test-node-0-0.em-test" in container["command"]  # <jobset>-<job>-<job index>-<pod index>.<jobset>
    assert job["template"]["spec"]["restartPolicy"] == "Never" and job["backoffLimit"] == 0
    assert spec["failurePolicy"]["maxRestarts"] == 3
    cpu = manifests["jobset-cpu"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in cpu["resources"].get("limits", {})
    with pytest.raises(LaunchError, match="fixed node ranks"):
        render_jobset(Cluster(nodes=4, min_nodes=2), call(), pod())


def test_threads_follow_the_pods_cpu_request(manifests: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    """OMP_NUM_THREADS comes from the pod's CPU request (32 / 8 processes), never from the rendering machine's cores;
    without a request it must be given."""
    for name in ("pytorchjob-4-nodes", "jobset-4-nodes"):
        for template in pod_templates(manifests[name]):
            assert {"name": "OMP_NUM_THREADS", "value": "4"} in template["spec"]["containers"][0]["env"], name
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    no_request = PodSettings(name="em-test", image="registry.example.com/echomotion:test")
    for render in (render_pytorchjob, render_jobset):
        with pytest.raises(LaunchError, match="no CPU request; pass --cpus N .* or --threads-per-proc"):
            render(Cluster(nodes=2, nproc_per_node=8), call(), no_request)
        for template in pod_templates(render(Cluster(nodes=2, nproc_per_node=8, threads_per_proc=6), call(), no_request)):
            assert {"name": "OMP_NUM_THREADS", "value": "6"} in template["spec"]["containers"][0]["env"]


def test_every_pod_checkpoints_on_sigterm_and_reads_secrets_from_a_secret(manifests: dict[str, dict[str, Any]]) -> None:
    for name, m in manifests.items():
        assert SECRET not in yaml.safe_dump(m), name
        for template in pod_templates(m):
            spec = template["spec"]
            (container,) = spec["containers"]
            shutdown = int(next(w for w in container["command"] if w.startswith("--shutdown_timeout=")).split("=")[1])
            assert spec["terminationGracePeriodSeconds"] > shutdown, name
            # the trainer reports the grace it runs under (echomotion_termination_grace_seconds, alert CheckpointNearGrace)
            assert f"train.termination_grace={spec['terminationGracePeriodSeconds']}" in container["command"], name
            volumes = {v["name"]: v for v in spec["volumes"]}
            assert volumes["dshm"]["emptyDir"]["medium"] == "Memory"
            assert "persistentVolumeClaim" in volumes["checkpoints"]
            mounts = {v["mountPath"] for v in container["volumeMounts"]}
            assert {"/dev/shm", "/checkpoints"} <= mounts
            run_dir = next(w for w in container["command"] if w.startswith("train.run_dir="))
            assert run_dir.startswith("train.run_dir=/checkpoints/"), name  # restarts resume from the shared volume
            secret_env = {e["name"] for e in container["env"] if "secretKeyRef" in e.get("valueFrom", {})}
            assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "S3_ENDPOINT_URL"} <= set(secret_env), name
            assert all("value" not in e for e in container["env"] if e["name"].startswith(("AWS_", "S3_")))
            annotations = template["metadata"]["annotations"]
            assert annotations["prometheus.io/scrape"] == "true"
            port = int(annotations["prometheus.io/port"])
            assert f"train.metrics_port={port}" in container["command"]
            assert {"name": "metrics-0", "containerPort": port} in container["ports"]


def test_a_termination_grace_override_must_match_the_manifests() -> None:
    """The manifest owns terminationGracePeriodSeconds, so a different train.termination_grace would make the exporter
    report a grace the pods do not have: refused, naming the fix; the same value is accepted."""
    cluster = Cluster(nodes=1, nproc_per_node=8, shutdown_timeout=300)
    for render in (render_pytorchjob, render_jobset):
        wrong = TrainerCall("configs/tiny.yaml", ["train.termination_grace=900"], base_dir=ROOT)
        with pytest.raises(LaunchError, match=r"terminationGracePeriodSeconds \(360 = --shutdown-timeout \+ 60\); drop"):
            render(cluster, wrong, pod())
        same = TrainerCall("configs/tiny.yaml", ["train.termination_grace=360"], base_dir=ROOT)
        (template, *_) = pod_templates(render(cluster, same, pod()))
        assert template["spec"]["containers"][0]["command"].count("train.termination_grace=360") == 1
