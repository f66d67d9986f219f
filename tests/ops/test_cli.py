"""The launch CLI without training: exact commands, hostfiles, the sbatch script (run against stand-in srun/scontrol),
cluster files, early config and input errors, and object-store secrets never printed or written."""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import pytest

from launcher.cli import main
from tests.ops.helpers import CONFIG, ROOT

SECRET = "ops-test-secret-value-7f3a"


@pytest.fixture(autouse=True)
def tiny_inputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The inputs configs/tiny.yaml names (relative to the working directory), as empty files: torchrun and deepspeed
    check that they exist before printing, and nothing reads them. Returns the data stream's folder."""
    monkeypatch.chdir(tmp_path)
    data = Path("data/humove-mini")
    (data / "train").mkdir(parents=True)
    for name in ("train/index.json", "motion_stats.json", "null_text.pt"):
        (data / name).write_text("{}")
    return tmp_path / data / "train"


@pytest.fixture
def object_store_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("S3_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "ops-test-key-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)


@pytest.fixture(autouse=True)
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The slurm target creates its log folder (default ./logs): keep it out of the checkout."""
    monkeypatch.chdir(tmp_path)


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_torchrun_command_elastic(capsys: pytest.CaptureFixture[str], object_store_env: None, tiny_inputs: Path,
                                  s3_server, monkeypatch: pytest.MonkeyPatch) -> None:
    s3_server.upload(tiny_inputs, "s3://bucket/humove")  # checked before printing: it must exist
    monkeypatch.setenv("S3_ENDPOINT_URL", s3_server.endpoint)
    code, out, err = run_cli(
        capsys, "torchrun", "--config", CONFIG, "--nodes", "4", "--min-nodes", "2", "--nproc-per-node", "8",
        "--accelerator", "gpu", "--rdzv-endpoint", "node0:29400", "--rdzv-id", "job7", "--cpus-per-node", "64",
        "--ifname", "eth0", "data.path=s3://bucket/humove", "train.steps=10",
    )
    assert code == 0, err
    lines = out.splitlines()
    assert lines[-1] == (
        "torchrun --nnodes=2:4 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=node0:29400 --rdzv_id=job7 "
        f"--max_restarts=3 --shutdown_timeout=300 -m echomotion.train --config {CONFIG} data.path=s3://bucket/humove train.steps=10"
    )
    env = dict(w.split("=", 1) for w in shlex.split(lines[-2])[1:])
    assert env["OMP_NUM_THREADS"] == "8" and env["NCCL_SOCKET_IFNAME"] == "eth0"
    assert env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"  # else a re-joining node hangs (docs/operations.md)
    assert "AWS_SECRET_ACCESS_KEY" in out and SECRET not in out + err  # named, never shown


def test_deepspeed_hostfile_per_node(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    hostfile = tmp_path / "hostfile"
    code, out, err = run_cli(
        capsys, "deepspeed", "--config", CONFIG, "--nodes", "3", "--hosts", "gpu-a,gpu-b,gpu-c", "--nproc-per-node", "8",
        "--accelerator", "gpu", "--hostfile", str(hostfile), "--node-rank", "2",
    )
    assert code == 0, err
    assert hostfile.read_text() == "gpu-a slots=8\ngpu-b slots=8\ngpu-c slots=8\n"
    assert out.splitlines()[-1].startswith(
        f"deepspeed --hostfile={hostfile} --no_ssh --node_rank=2 --master_addr=gpu-a --master_port=29500 --module echomotion.train"
    )
    assert "LOCAL_WORLD_SIZE=8" in out  # the deepspeed launcher does not set it; the data loader needs it

    code, _, err = run_cli(capsys, "deepspeed", "--config", CONFIG, "--nodes", "2", "--hosts", "gpu-a",
                           "--hostfile", str(hostfile))
    assert code == 2 and "1 hosts given (gpu-a) but nodes=2" in err


def run_sbatch(script: Path, tmp_path: Path, drop: Sequence[str] = (), **slurm_env: str) -> subprocess.CompletedProcess:
    """Run an sbatch script as Slurm would on the first of nodes gpu-a, gpu-b, with stand-ins for scontrol and srun (srun
    prints the threads it sees and its arguments, one a line)."""
    shims = tmp_path / "bin"
    shims.mkdir(exist_ok=True)
    (shims / "scontrol").write_text("#!/bin/sh\nprintf 'gpu-a\\ngpu-b\\n'\n")
    (shims / "srun").write_text('#!/bin/sh\necho "OMP=$OMP_NUM_THREADS CPUS=$SRUN_CPUS_PER_TASK"\nfor a in "$@"; do echo "$a"; done\n')
    for f in shims.iterdir():
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{shims}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu-[a-b]",
           "SLURM_JOB_ID": "4242", **slurm_env}
    for key in drop:
        env.pop(key)
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done


def test_slurm_script_runs_one_agent_per_node(capsys: pytest.CaptureFixture[str], tmp_path: Path, object_store_env: None) -> None:
    script = tmp_path / "train.sbatch"
    code, _, err = run_cli(
        capsys, "slurm", "--config", CONFIG, "--nodes", "2", "--nproc-per-node", "8", "--cpus-per-node", "96",
        "--shutdown-timeout", "600", "--partition", "h100", "-o", str(script), "data.path=s3://bucket/humove",
    )
    assert code == 0, err
    text = script.read_text()
    for line in ("#SBATCH --nodes=2", "#SBATCH --gpus-per-node=8", "#SBATCH --signal=TERM@660", "#SBATCH --requeue",
                 "#SBATCH --partition=h100", "#SBATCH --export=ALL"):
        assert line in text.splitlines()
    assert SECRET not in text and "ops-test-key-id" not in text

    # Run it with stand-ins for scontrol and srun: the rendezvous must land on the first node and the job id.
    done = run_sbatch(script, tmp_path, SLURM_CPUS_PER_TASK="96", drop=["AWS_SECRET_ACCESS_KEY"])
    args = done.stdout.splitlines()
    assert args[0] == "OMP=12 CPUS=96"
    assert "--rdzv_endpoint=gpu-a:29400" in args and "--rdzv_id=4242" in args and "--shutdown_timeout=600" in args
    assert args[args.index("--config") + 1] == CONFIG
    assert "AWS_SECRET_ACCESS_KEY is not set" in done.stderr  # a warning, the job still starts


def test_slurm_submit_creates_the_log_folder_first(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """Slurm opens `--output` before the script runs, and a missing folder fails the job with no log anywhere: the
    launcher creates the (absolute) log folder before sbatch. The stand-in sbatch refuses like Slurm when the folder is
    missing, then runs the script; the scheduler options arrive as #SBATCH lines."""
    shims = tmp_path / "bin"
    shims.mkdir()
    (shims / "sbatch").write_text(
        '#!/bin/bash\nout=$(sed -n "s/^#SBATCH --output=//p" "$1")\n'
        '[[ -d $(dirname "$out") ]] || { echo "log folder of $out missing" >&2; exit 1; }\n'
        'echo "Submitted batch job 4242"\nexec bash "$1"\n')
    (shims / "sbatch").chmod(0o755)
    (shims / "scontrol").write_text("#!/bin/sh\nprintf 'gpu-a\\ngpu-b\\n'\n")
    (shims / "srun").write_text('#!/bin/sh\necho "srun $*"\n')
    for f in shims.iterdir():
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{shims}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu-[a-b]",
           "SLURM_JOB_ID": "4242", "SLURM_CPUS_ON_NODE": "16", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "launcher", "slurm", "--config", CONFIG, "--nodes", "2", "--nproc-per-node", "8",
         "--log-dir", "runs/logs", "--qos", "high", "--constraint", "h100&ib", "--exclusive", "--mem", "0",
         "--sbatch=--reservation=big", "--submit"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Submitted batch job 4242" in done.stdout and "srun --kill-on-bad-exit=1 torchrun" in done.stdout
    script = (tmp_path / "runs/logs/echomotion.sbatch").read_text().splitlines()
    for line in (f"#SBATCH --output={tmp_path}/runs/logs/%x-%j.out", "#SBATCH --qos=high", "#SBATCH --constraint=h100&ib",
                 "#SBATCH --exclusive", "#SBATCH --mem=0", "#SBATCH --reservation=big"):
        assert line in script, line

    code, _, err = run_cli(capsys, "slurm", "--config", CONFIG, "--sbatch", "reservation=big")
    assert code == 2 and "give an sbatch option as written after #SBATCH" in err


def test_cluster_file_and_flags(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text("nodes: 2\nnproc_per_node: 4\naccelerator: cpu\nrdzv_endpoint: head:29400\n")
    code, out, err = run_cli(capsys, "torchrun", "--config", CONFIG, "--cluster", str(cluster), "--nproc-per-node", "2")
    assert code == 0, err
    assert "--nnodes=2 --nproc_per_node=2 --rdzv_backend=c10d --rdzv_endpoint=head:29400" in out
    assert "NCCL" not in out  # cpu: gloo

    cluster.write_text("nodes: 2\ngpus: 8\n")
    code, _, err = run_cli(capsys, "torchrun", "--config", CONFIG, "--cluster", str(cluster))
    assert code == 2 and "unknown keys ['gpus']" in err


def test_bad_config_fails_before_anything_starts(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "torchrun", "--run", "--config", CONFIG, "--accelerator", "cpu", "train.lr=-1")
    assert code == 2 and out == "" and "train.lr must be > 0" in err
    code, _, err = run_cli(capsys, "torchrun", "--config", CONFIG, "--accelerator", "cpu", "--nodes", "2", "--min-nodes", "3")
    assert code == 2 and "min_nodes=3 must be between 1 and nodes=2" in err


def test_missing_inputs_fail_before_anything_is_printed(capsys: pytest.CaptureFixture[str]) -> None:
    """The trainer's start-up input check runs here first: a user sees one message and exit 2, not a launch command."""
    code, out, err = run_cli(capsys, "torchrun", "--config", CONFIG, "--accelerator", "cpu", "data.path=/nonexistent/x",
                             "train.init_wan=/nope")
    assert code == 2 and out == "" and err.count("\n") == 1, (out, err)
    assert err.startswith(f"launcher: {CONFIG}: cannot start: data.path: /nonexistent/x/index.json does not exist; "
                          "train.init_wan: /nope does not exist"), err


def test_slurm_threads_are_counted_on_the_node(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --cpus-per-node the script divides the allocation's CPUs ($SLURM_CPUS_ON_NODE) by the processes per node;
    the rendering machine's core count (2 here) used to be baked in."""
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    script = tmp_path / "train.sbatch"
    code, _, err = run_cli(capsys, "slurm", "--config", CONFIG, "--nodes", "2", "--nproc-per-node", "8", "-o", str(script))
    assert code == 0, err
    assert "SLURM_CPUS_ON_NODE" in script.read_text() and "--cpus-per-task" not in script.read_text()
    assert run_sbatch(script, tmp_path, SLURM_CPUS_ON_NODE="64").stdout.splitlines()[0] == "OMP=8 CPUS="
    assert run_sbatch(script, tmp_path, SLURM_CPUS_ON_NODE="4").stdout.splitlines()[0] == "OMP=1 CPUS="  # never 0

    code, _, err = run_cli(capsys, "slurm", "--config", CONFIG, "--nproc-per-node", "8", "--threads-per-proc", "6",
                           "-o", str(script))
    assert code == 0, err
    assert run_sbatch(script, tmp_path, SLURM_CPUS_ON_NODE="64").stdout.splitlines()[0] == "OMP=6 CPUS="  # the flag wins


def test_local_launches_count_this_machines_cores(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    code, out, err = run_cli(capsys, "torchrun", "--config", CONFIG, "--nproc-per-node", "2", "--accelerator", "cpu")
    assert code == 0, err
    assert dict(w.split("=", 1) for w in shlex.split(out.splitlines()[-2])[1:])["OMP_NUM_THREADS"] == "3"


@pytest.mark.parametrize("endpoint", [None, "127.0.0.1:29400", "localhost:29500", "127.0.1.1:29400", "[::1]:29400"])
def test_several_nodes_refuse_a_loopback_rendezvous(capsys: pytest.CaptureFixture[str], endpoint: str | None) -> None:
    """The other nodes cannot reach this machine's loopback address: such a launch would never rendezvous."""
    given = ["--rdzv-endpoint", endpoint] if endpoint else []
    code, out, err = run_cli(capsys, "torchrun", "--config", CONFIG, "--nodes", "2", "--nproc-per-node", "2",
                             "--accelerator", "cpu", *given)
    assert code == 2 and out == "", out
    assert err.startswith("launcher: ") and "is a loopback address" in err and "--rdzv-endpoint HOST:PORT" in err
    assert ("(the default)" in err) == (endpoint is None)

    # Allowed: one node, a reachable address, every "node" on this machine (tests/ops/test_launch.py).
    for ok in (["--nodes", "1", *given], ["--nodes", "2", "--rdzv-endpoint", "node0:29400"],
               ["--nodes", "2", "--single-host", "--rdzv-endpoint", endpoint or "127.0.0.1:29400"]):
        code, out, err = run_cli(capsys, "torchrun", "--config", CONFIG, "--nproc-per-node", "2", "--accelerator", "cpu", *ok)
        assert code == 0, (ok, err)
    assert "--rdzv_endpoint=127.0.0.1:29400" in run_cli(capsys, "torchrun", "--config", CONFIG, "--accelerator", "cpu")[1]
    # Slurm places the rendezvous on the allocation's first node itself.
    assert run_cli(capsys, "slurm", "--config", CONFIG, "--nodes", "2", "--cpus-per-node", "8")[0] == 0
