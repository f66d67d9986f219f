"""`python -m launcher TARGET --config FILE [cluster options] [key=value ...]`: print (or run) the exact launch.

    torchrun    the torchrun command for this node (c10d rendezvous, elastic restarts); --run executes it
    deepspeed   writes the hostfile and prints the deepspeed launcher command for one node; --run executes it
    slurm       an sbatch script (one torchrun agent per node); creates its log folder; --submit runs sbatch on it
    pytorchjob  a Kubeflow PyTorchJob manifest
    jobset      a JobSet manifest
    examples    rewrite launcher/k8s/examples/ (the 1.3B on 1x8 and 5B on 8x8 H100 manifests)

Trainer overrides (`train.steps=100 data.path=s3://...`) go after the options; the config is loaded and validated here,
so a bad key fails before anything is scheduled. torchrun and deepspeed also check every path and object-store location
the config names (echomotion.preflight), as this machine sees them; slurm and the Kubernetes targets do not (the job's
filesystem, volumes and credentials are elsewhere), and the trainer checks them at start-up before building the model.
Object-store credentials are never printed or written (see cluster.py).
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from echomotion.config import s3_paths

from .cluster import LOCAL_RDZV_ENDPOINT, Cluster, LaunchError, backend_env, load_cluster, object_store_note
from .commands import (
    TrainerCall,
    deepspeed_command,
    deepspeed_hosts,
    hostfile_text,
    shell_exports,
    shell_join,
    SlurmJob,
    slurm_script,
    torchrun_c10d,
)
from .manifests import (IMAGE_TAG, IMAGE_WORKDIR, PodSettings, render_examples, render_jobset, render_pytorchjob, to_yaml,
                        toleration)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES_DIR = Path(__file__).resolve().parent / "k8s" / "examples"


def _key_values(items: Optional[list[str]], flag: str) -> dict[str, str]:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise LaunchError(f"{flag} {item!r}: expected KEY=VALUE")
        out[key] = value
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m launcher", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="target", required=True)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", required=True, help="trainer YAML config, e.g. configs/tiny.yaml")
    common.add_argument("--cluster", help="YAML file with cluster settings (the keys below, underscored); flags win")
    common.add_argument("--nodes", type=int)
    common.add_argument("--nproc-per-node", "--gpus-per-node", dest="nproc_per_node", type=int, help="processes (GPUs) per node")
    common.add_argument("--accelerator", choices=("gpu", "cpu"), help="NCCL on GPUs or gloo on CPUs")
    common.add_argument("--max-restarts", type=int, help="torchrun worker-group restarts (also the pod backoff limit)")
    common.add_argument("--shutdown-timeout", type=int, help="seconds a worker has after SIGTERM to checkpoint")
    common.add_argument("--threads-per-proc", type=int,
                        help="OMP_NUM_THREADS (default: cpus per node / processes per node, counted where the job runs)")
    common.add_argument("--cpus-per-node", type=int,
                        help="default: this machine's (torchrun, deepspeed), the allocation's (slurm), --cpus (k8s)")
    common.add_argument("--ifname", help="network interface for NCCL/gloo sockets")
    common.add_argument("overrides", nargs="*", help="trainer overrides, e.g. train.steps=100")

    rdzv = argparse.ArgumentParser(add_help=False)
    rdzv.add_argument("--rdzv-endpoint",
                      help=f"host:port of the c10d rendezvous, on one of the nodes (default for one node: {LOCAL_RDZV_ENDPOINT})")
    rdzv.add_argument("--single-host", action="store_true", default=None,
                      help="every node runs on this machine (a multi-node test): allow a loopback --rdzv-endpoint")
    rdzv.add_argument("--rdzv-id", help="job id shared by all nodes")
    rdzv.add_argument("--min-nodes", type=int, help="elastic: keep going with as few nodes as this")

    t = sub.add_parser("torchrun", parents=[common, rdzv], help="torchrun command for this node")
    t.add_argument("--run", action="store_true", help="execute it (this process becomes torchrun)")

    d = sub.add_parser("deepspeed", parents=[common], help="deepspeed launcher command + hostfile for one node")
    d.add_argument("--hosts", help="comma-separated hostnames, one per node (default: localhost for one node)")
    d.add_argument("--hostfile", required=True, help="where to write the hostfile")
    d.add_argument("--node-rank", type=int, default=0, help="this node's index in --hosts")
    d.add_argument("--master-port", type=int, default=29500)
    d.add_argument("--run", action="store_true", help="execute it (this process becomes the deepspeed launcher)")

    s = sub.add_parser("slurm", parents=[common], help="sbatch script")
    s.add_argument("--job-name", default="echomotion")
    s.add_argument("--time", default="48:00:00", help="time limit; SIGTERM arrives shutdown-timeout + 60 s before it")
    s.add_argument("--partition")
    s.add_argument("--account")
    s.add_argument("--rdzv-port", type=int, default=29400)
    s.add_argument("--qos")
    s.add_argument("--constraint", help="node features, e.g. 'h100&ib'")
    s.add_argument("--exclusive", action="store_true", help="whole nodes only")
    s.add_argument("--mem", help="memory per node, e.g. 900G (0: all of it)")
    s.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                   help="another #SBATCH line, e.g. --sbatch=--reservation=big; repeatable")
    s.add_argument("--log-dir", default="logs",
                   help="where Slurm writes %%x-%%j.out; made absolute and created now, since Slurm opens the file "
                        "before the script runs")
    s.add_argument("--output", "-o", help="write the script here instead of printing it")
    s.add_argument("--submit", action="store_true", help="write the script (to --output, else <log-dir>/<job-name>.sbatch) "
                                                         "and submit it with sbatch")

    k8s = argparse.ArgumentParser(add_help=False)
    k8s.add_argument("--name", required=True, help="job name (DNS label, <= 40 characters)")
    k8s.add_argument("--image", required=True,
                     help=f"the image the Dockerfile builds, tagged with the version: REGISTRY/echomotion:{IMAGE_TAG}")
    k8s.add_argument("--namespace")
    k8s.add_argument("--cpus", type=int, help="CPU request per pod")
    k8s.add_argument("--memory", help="memory request and limit per pod, e.g. 960Gi")
    k8s.add_argument("--shm-size", default="64Gi")
    k8s.add_argument("--cache-size", default="200Gi", help="node-local shard cache")
    k8s.add_argument("--checkpoint-claim", default="echomotion-checkpoints", help="ReadWriteMany PVC for runs")
    k8s.add_argument("--credentials-secret", default="echomotion-object-store",
                     help="Secret holding AWS_* / S3_ENDPOINT_URL keys; '' = none")
    k8s.add_argument("--metrics-port", type=int, default=9480)
    k8s.add_argument("--node-selector", action="append", metavar="KEY=VALUE")
    k8s.add_argument("--toleration", action="append", default=[], metavar="KEY[=VALUE][:EFFECT]",
                     help="tolerate a node taint, e.g. nvidia.com/gpu=present:NoSchedule; repeatable")
    k8s.add_argument("--priority-class", help="priorityClassName")
    k8s.add_argument("--queue", help="Kueue LocalQueue (label kueue.x-k8s.io/queue-name)")
    k8s.add_argument("--service-account", help="serviceAccountName, e.g. for workload identity")
    k8s.add_argument("--image-pull-secret", action="append", default=[], metavar="SECRET", help="repeatable")
    k8s.add_argument("--resource", action="append", metavar="NAME=COUNT", help="extra resource limit, e.g. rdma/ib=1")
    k8s.add_argument("--workdir", default=IMAGE_WORKDIR,
                     help=f"the checkout inside the image (default: the Dockerfile's WORKDIR, {IMAGE_WORKDIR})")
    k8s.add_argument("--output", "-o", help="write the manifest here instead of printing it")
    pj = sub.add_parser("pytorchjob", parents=[common, k8s], help="Kubeflow PyTorchJob manifest")
    pj.add_argument("--min-nodes", type=int, help="elastic: Workers only, with an elasticPolicy")
    js = sub.add_parser("jobset", parents=[common, k8s], help="JobSet manifest")
    js.add_argument("--master-port", type=int, default=29500)

    sub.add_parser("examples", help=f"rewrite {EXAMPLES_DIR.relative_to(ROOT)}/")
    return p


def _cluster(args: argparse.Namespace, default_accelerator: Callable[[], str]) -> Cluster:
    """The cluster from --cluster and the flags; `default_accelerator` is asked only when neither names one."""
    given: dict[str, Any] = {
        k: getattr(args, k, None)
        for k in ("nodes", "nproc_per_node", "accelerator", "max_restarts", "shutdown_timeout", "threads_per_proc",
                  "cpus_per_node", "ifname", "min_nodes")
    }
    for k in ("rdzv_endpoint", "rdzv_id", "single_host"):  # torchrun only
        given[k] = getattr(args, k, None)
    defaults = {} if args.accelerator else {"accelerator": default_accelerator()}
    return load_cluster(args.cluster, defaults, **given)


def _local_accelerator() -> str:
    import torch

    return "gpu" if torch.cuda.is_available() else "cpu"


def _executable(name: str) -> str:
    """The tool installed next to this Python (the same virtualenv), else the one on PATH."""
    sibling = Path(sys.executable).parent / name
    found = str(sibling) if sibling.exists() else shutil.which(name)
    if found is None:
        raise LaunchError(f"{name} is not installed in this environment (pip install -e . installs it)")
    return found


def _emit(text: str, output: Optional[str]) -> None:
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(text)
        print(f"wrote {output}", file=sys.stderr)
    else:
        sys.stdout.write(text)


def _local_launch(
    args: argparse.Namespace, cluster: Cluster, call: TrainerCall, command: list[str], env: dict[str, str], where: str
) -> int:
    """Check the config and its inputs, print the environment and command (runnable as a shell snippet); with --run,
    become that command."""
    cfg = call.load(inputs=True)
    lines = [f"# {cluster.nodes} node(s) x {cluster.nproc_per_node} processes ({cluster.accelerator}){where}"]
    note = object_store_note(s3_paths(cfg.data), os.environ)
    if note:
        lines.append(f"# {note}")
    lines += [shell_exports(env), shell_join(command)]
    print("\n".join(lines), flush=True)
    if not args.run:
        return 0
    argv = [_executable(command[0]), *command[1:]]
    os.execve(argv[0], argv, {**os.environ, **env})  # signals (SIGTERM) now reach torchrun / deepspeed directly


def _slurm(args: argparse.Namespace, call: TrainerCall) -> int:
    """Render the sbatch script, create its log folder and, with --submit, hand it to sbatch."""
    cluster = _cluster(args, lambda: "gpu")
    cfg = call.load()
    job = SlurmJob(
        log_dir=Path(args.log_dir).resolve(), job_name=args.job_name, time_limit=args.time, rdzv_port=args.rdzv_port,
        partition=args.partition, account=args.account, qos=args.qos, constraint=args.constraint,
        exclusive=args.exclusive, mem=args.mem, extra=args.sbatch,
    )
    script = slurm_script(cluster, call, backend_env(cluster, c10d=True), job,
                          remote_data=bool(s3_paths(cfg.data)))
    job.create_log_dir()
    output = args.output or (str(job.log_dir / f"{job.job_name}.sbatch") if args.submit else None)
    _emit(script, output)
    if args.submit:
        sbatch = shutil.which("sbatch")
        if sbatch is None:
            raise LaunchError(f"sbatch is not on PATH: submit {output} from a Slurm login node (sbatch {output})")
        return subprocess.run([sbatch, str(output)]).returncode
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.target == "examples":
            EXAMPLES_DIR.mkdir(parents=True, exist_ok=True)
            for name, text in render_examples(ROOT).items():
                (EXAMPLES_DIR / name).write_text(text)
                print(f"wrote {EXAMPLES_DIR / name}")
            return 0
        call = TrainerCall(args.config, list(args.overrides))
        if args.target == "torchrun":
            cluster = _cluster(args, _local_accelerator).on_this_machine()
            where = f"; run this same command on each of the {cluster.nodes} nodes" if cluster.nodes > 1 else ""
            return _local_launch(args, cluster, call, torchrun_c10d(cluster, call), backend_env(cluster, c10d=True), where)
        if args.target == "deepspeed":
            cluster = _cluster(args, _local_accelerator).on_this_machine()
            hosts = deepspeed_hosts(cluster, args.hosts.split(",") if args.hosts else None)
            command = deepspeed_command(call, args.hostfile, hosts, args.node_rank, args.master_port)
            Path(args.hostfile).parent.mkdir(parents=True, exist_ok=True)
            Path(args.hostfile).write_text(hostfile_text(hosts, cluster.nproc_per_node))
            where = f"; this is node {args.node_rank} ({hosts[args.node_rank]}): on the others change --node_rank"
            # The deepspeed launcher sets LOCAL_SIZE but not LOCAL_WORLD_SIZE, which the data loader needs to find nodes.
            env = {**backend_env(cluster, c10d=False), "LOCAL_WORLD_SIZE": str(cluster.nproc_per_node)}
            return _local_launch(args, cluster, call, command, env, where if len(hosts) > 1 else "")
        if args.target == "slurm":
            return _slurm(args, call)
        cluster = _cluster(args, lambda: "gpu")
        pod = PodSettings(
            name=args.name, image=args.image, namespace=args.namespace, cpus=args.cpus, memory=args.memory,
            shm_size=args.shm_size, cache_size=args.cache_size, checkpoint_claim=args.checkpoint_claim,
            credentials_secret=args.credentials_secret or None, metrics_port=args.metrics_port,
            node_selector=_key_values(args.node_selector, "--node-selector"),
            extra_resources=_key_values(args.resource, "--resource"), workdir=args.workdir,
            tolerations=[toleration(t) for t in args.toleration], priority_class=args.priority_class, queue=args.queue,
            service_account=args.service_account, image_pull_secrets=args.image_pull_secret,
            **({"master_port": args.master_port} if args.target == "jobset" else {}),
        )
        render = render_pytorchjob if args.target == "pytorchjob" else render_jobset
        how = shlex.join(["python", "-m", "launcher", *(sys.argv[1:] if argv is None else argv)])
        _emit(to_yaml(render(cluster, call, pod), how), args.output)
        return 0
    except LaunchError as e:
        print(f"launcher: {e}", file=sys.stderr)
        return 2
