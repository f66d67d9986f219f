"""The exact commands that start a run: torchrun (c10d or static rendezvous), the deepspeed launcher with a hostfile, and
an sbatch script for Slurm. Every target starts the same trainer entry point with the same config and overrides."""
from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Collection, Mapping, Optional, Sequence

from echomotion.config import Config, ConfigError, load_config
from echomotion.preflight import check_inputs

from .cluster import OBJECT_STORE_ENV, Cluster, LaunchError

TRAINER_MODULE = "echomotion.train"


@dataclass
class TrainerCall:
    """`echomotion.train --config FILE key=value ...`: what every launcher starts on every process."""

    config: str  # as the launched processes see it (relative to their working directory)
    overrides: list[str] = field(default_factory=list)
    base_dir: Path = Path(".")  # where a relative `config` is found here, to validate it before launching

    def load(self, inputs: bool = False) -> Config:
        """The validated config, so a bad key fails here and not on 64 GPUs after scheduling. `inputs`: also every path
        and object-store location it names (echomotion.preflight, the trainer's own start-up check), for a launch whose
        processes see this machine's files and credentials."""
        try:
            cfg = load_config(self.base_dir / self.config, self.overrides)
            if inputs:
                check_inputs(cfg)
            return cfg
        except ConfigError as e:
            raise LaunchError(f"{self.config}: {e}") from e

    def with_defaults(self, defaults: Mapping[str, str]) -> "TrainerCall":
        """Add `key=value` for each default whose key the overrides do not set already."""
        given = {o.split("=", 1)[0] for o in self.overrides}
        extra = [f"{k}={v}" for k, v in defaults.items() if k not in given]
        return TrainerCall(self.config, [*self.overrides, *extra], self.base_dir)

    def args(self) -> list[str]:
        return ["--config", self.config, *self.overrides]


def torchrun_c10d(cluster: Cluster, call: TrainerCall, endpoint: Optional[str] = None, rdzv_id: Optional[str] = None) -> list[str]:
    """Elastic launch: every node runs this same command; the agents meet at the c10d endpoint, node ranks come from
    the rendezvous, and a failed or re-joining node restarts the worker group (up to max_restarts)."""
    return [
        "torchrun",
        f"--nnodes={cluster.nnodes}",
        f"--nproc_per_node={cluster.nproc_per_node}",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint={endpoint or cluster.endpoint()}",
        f"--rdzv_id={rdzv_id or cluster.rdzv_id}",
        f"--max_restarts={cluster.max_restarts}",
        f"--shutdown_timeout={cluster.shutdown_timeout}",
        "-m", TRAINER_MODULE, *call.args(),
    ]


def torchrun_static(cluster: Cluster, call: TrainerCall, master_addr: str, master_port: int, node_rank: str) -> list[str]:
    """Fixed ranks: node `node_rank` of `nodes`, rank 0's host as master. No in-place restarts (a static group cannot
    re-form without all nodes restarting), so the scheduler restarts the whole job and it resumes from its checkpoint."""
    return [
        "torchrun",
        f"--nnodes={cluster.nodes}",
        f"--nproc_per_node={cluster.nproc_per_node}",
        f"--node_rank={node_rank}",
        f"--master_addr={master_addr}",
        f"--master_port={master_port}",
        "--max_restarts=0",
        f"--shutdown_timeout={cluster.shutdown_timeout}",
        "-m", TRAINER_MODULE, *call.args(),
    ]


def hostfile_text(hosts: list[str], slots: int) -> str:
    """DeepSpeed's hostfile: one `host slots=N` line per node."""
    return "".join(f"{h} slots={slots}\n" for h in hosts)


def deepspeed_hosts(cluster: Cluster, hosts: Optional[list[str]]) -> list[str]:
    if not hosts:
        if cluster.nodes > 1:
            raise LaunchError(f"nodes={cluster.nodes}: list the hosts (--hosts node1,node2,...) for the deepspeed hostfile")
        return ["localhost"]
    if len(hosts) != cluster.nodes:
        raise LaunchError(f"{len(hosts)} hosts given ({', '.join(hosts)}) but nodes={cluster.nodes}")
    return hosts


def deepspeed_command(call: TrainerCall, hostfile: str, hosts: list[str], node_rank: int, master_port: int) -> list[str]:
    """The deepspeed launcher in its per-node mode (`--no_ssh`): run it on every host with that host's rank. It needs no
    passwordless ssh and no pdsh, and each node's environment (object-store credentials included) stays on that node."""
    if not 0 <= node_rank < len(hosts):
        raise LaunchError(f"node_rank={node_rank} is outside 0..{len(hosts) - 1} (the hostfile's hosts)")
    master = "127.0.0.1" if hosts[0] == "localhost" else hosts[0]
    return [
        "deepspeed",
        f"--hostfile={hostfile}",
        "--no_ssh",
        f"--node_rank={node_rank}",
        f"--master_addr={master}",
        f"--master_port={master_port}",
        "--module", TRAINER_MODULE, *call.args(),
    ]


def shell_exports(env: Mapping[str, str]) -> str:
    return "export " + " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())


def shell_join(words: list[str], expand: Collection[str] = ()) -> str:
    """shlex.join, except that the words in `expand` are double-quoted, so their `${VAR}` references expand."""
    return " ".join(f'"{w}"' if w in expand else shlex.quote(w) for w in words)


@dataclass
class SlurmJob:
    """The scheduler's side of an sbatch script: name, limits, placement. `log_dir` is absolute: Slurm opens
    `<log_dir>/%x-%j.out` before the script runs (a relative path from the submission folder, wherever that is), and a
    missing folder fails the job with no output anywhere, so it must exist before sbatch (see `create_log_dir`)."""

    log_dir: Path
    job_name: str = "echomotion"
    time_limit: str = "48:00:00"
    rdzv_port: int = 29400
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None  # node features, e.g. "h100&ib"
    exclusive: bool = False  # whole nodes, no other job's processes beside ours
    mem: Optional[str] = None  # memory per node, e.g. "900G" or "0" (all of it)
    extra: Sequence[str] = ()  # further sbatch options, e.g. "--reservation=big", each its own #SBATCH line

    def directives(self) -> list[str]:
        """The #SBATCH options that come from this job description (the cluster sets the sizes)."""
        optional = {"partition": self.partition, "account": self.account, "qos": self.qos,
                    "constraint": self.constraint, "mem": self.mem}
        lines = [f"--job-name={self.job_name}", f"--time={self.time_limit}"]
        lines += [f"--{k}={v}" for k, v in optional.items() if v]
        lines += (["--exclusive"] if self.exclusive else []) + [f"--output={self.log_dir}/%x-%j.out"]
        for line in self.extra:
            if not line.startswith("-"):
                raise LaunchError(f"--sbatch {line!r}: give an sbatch option as written after #SBATCH, e.g. --reservation=big")
            lines.append(line)
        return [f"#SBATCH {line}" for line in lines]

    def create_log_dir(self) -> None:
        """The folder Slurm writes the job's output into: created by whoever renders or submits the script, since the
        script itself runs only after Slurm has opened the file."""
        self.log_dir.mkdir(parents=True, exist_ok=True)


def slurm_script(cluster: Cluster, call: TrainerCall, env: Mapping[str, str], job: SlurmJob, remote_data: bool = False) -> str:
    """An sbatch script: one torchrun agent per node (srun), c10d rendezvous on the first node, SIGTERM
    `shutdown_timeout` + 60 s before the time limit (the trainer checkpoints and exits), requeue on preemption. The
    submitter's environment is exported to the job (`--export=ALL`), which is how object-store credentials arrive: they
    are not in the script."""
    gpu = cluster.accelerator == "gpu"
    head = [
        "#!/bin/bash",
        f"#SBATCH --nodes={cluster.nodes}",
        "#SBATCH --ntasks-per-node=1",
        *([f"#SBATCH --gpus-per-node={cluster.nproc_per_node}"] if gpu else []),
        *([f"#SBATCH --cpus-per-task={cluster.cpus_per_node}"] if cluster.cpus_per_node else []),
        *job.directives(),
        f"#SBATCH --signal=TERM@{cluster.shutdown_timeout + 60}",
        "#SBATCH --requeue",
        "#SBATCH --export=ALL",
        "set -euo pipefail",
    ]
    body = []
    if remote_data:
        needed = " ".join(OBJECT_STORE_ENV[1:3])  # names only: the values stay in the environment
        body.append(
            f'for v in {needed}; do [[ -n "${{!v:-}}" ]] || echo "warning: $v is not set; data is in an object store" >&2; done'
        )
    if cluster.cpus_per_node:
        body.append('export SRUN_CPUS_PER_TASK="$SLURM_CPUS_PER_TASK"  # srun does not inherit --cpus-per-task since Slurm 22.05')
    body.append(shell_exports(env))
    if cluster.threads() is None:  # counted on the node, not where the script was rendered
        n = cluster.nproc_per_node
        body.append(f"export OMP_NUM_THREADS=$(( SLURM_CPUS_ON_NODE / {n} > 1 ? SLURM_CPUS_ON_NODE / {n} : 1 ))"
                    "  # the allocation's CPUs per node / processes per node")
    body.append('head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)')
    torchrun = torchrun_c10d(cluster, call, endpoint=f"${{head_node}}:{job.rdzv_port}", rdzv_id="${SLURM_JOB_ID}")
    node_vars = [w for w in torchrun if w.startswith(("--rdzv_endpoint=", "--rdzv_id="))]
    body.append("srun --kill-on-bad-exit=1 " + shell_join(torchrun, expand=node_vars))
    return "\n".join(head + body) + "\n"
