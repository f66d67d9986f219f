"""Real CPU training through the launch CLI: torchrun (2 ranks), the deepspeed launcher with a generated hostfile, and two
torchrun "nodes" on loopback where one is killed mid-run and comes back (elastic restart, resume from the checkpoint)."""
from __future__ import annotations

import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from echomotion.checkpoint import CheckpointManager
from echomotion.metrics import read_metrics
from tests.ops.helpers import CONFIG, finish, kill_tree, launcher, start, trainer_overrides, wait_for
from tests.s3_server import free_port

SECRET = "ops-test-secret-value-7f3a"  # must pass through to the run, and never appear in what the launcher prints


def test_torchrun_two_ranks_through_the_cli(humove: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cmd = launcher("torchrun", "--run", "--config", CONFIG, "--nproc-per-node", "2", "--accelerator", "cpu",
                   "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-id", "ops-torchrun",
                   *trainer_overrides(humove, run, "train.steps=4", "train.checkpoint_every=2"))
    log = tmp_path / "torchrun.log"
    out = finish([start(cmd, log, {"AWS_SECRET_ACCESS_KEY": SECRET})], [log], ranks=2)
    assert "torchrun --nnodes=1 --nproc_per_node=2 --rdzv_backend=c10d" in out  # the printed command is what ran
    assert SECRET not in out
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4]
    assert CheckpointManager(run, 3, 0).latest() == run / "checkpoints/step-00000004"


def test_deepspeed_launcher_with_a_hostfile(humove: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    hostfile = tmp_path / "hostfile"
    cmd = launcher("deepspeed", "--run", "--config", CONFIG, "--nproc-per-node", "2", "--accelerator", "cpu",
                   "--hostfile", str(hostfile), "--master-port", str(free_port()),
                   *trainer_overrides(humove, run, "train.steps=3", "train.checkpoint_every=3", "parallel.engine=deepspeed"))
    log = tmp_path / "deepspeed.log"
    out = finish([start(cmd, log)], [log], ranks=2)
    assert hostfile.read_text() == "localhost slots=2\n"
    assert "--local_rank=1" in out  # started by deepspeed.launcher.launch, which passes the local rank as an argument
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3]
    assert (run / "checkpoints" / "step-00000003" / "deepspeed").is_dir()  # ZeRO-3 trained and saved it


def _private_shm_works() -> bool:
    """Each simulated node needs its own /dev/shm, as on real machines: mosaicml-streaming names its shared memory per
    host, and two nodes' local leaders on one /dev/shm collide (FileExistsError on the same name)."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs tmpfs /dev/shm"], capture_output=True)
    return probe.returncode == 0


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.optional(reason="a private /dev/shm per simulated node needs root")
@pytest.mark.skipif(not _private_shm_works(),
                    reason="needs `unshare -m` and mount (root) to give each simulated node its own /dev/shm")
def test_two_nodes_survive_one_killed_and_restarted(humove: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    port = free_port()
    agent = launcher("torchrun", "--run", "--config", CONFIG, "--nodes", "2", "--nproc-per-node", "1", "--accelerator", "cpu",
                     "--single-host", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "ops-two-nodes", "--max-restarts", "3",
                     *trainer_overrides(humove, run, "train.steps=14", "train.checkpoint_every=4"))

    def node(name: str) -> list[str]:
        tmp = tmp_path / f"tmp-{name}"
        tmp.mkdir(exist_ok=True)
        return ["unshare", "-m", "sh", "-c", 'mount -t tmpfs -o size=256m tmpfs /dev/shm && exec "$@"', name,
                "env", f"TMPDIR={tmp}", *agent]

    logs = {n: tmp_path / f"{n}.log" for n in ("a", "b", "b-again")}
    a = start(node("a"), logs["a"])
    wait_for(lambda: _listening(port), [a], [logs["a"]], 60, "agent a to host the rendezvous store")
    b = start(node("b"), logs["b"])
    checkpoint = run / "checkpoints/step-00000004"
    wait_for(lambda: (checkpoint / "meta.json").exists() and 5 in {r["step"] for r in read_metrics(run)},
             [a, b], [logs["a"], logs["b"]], 180, "a checkpoint and a step past it")

    kill_tree(b)  # node b dies: its agent and its worker, with no chance to save
    b_again = start(node("b"), logs["b-again"])
    out = finish([a, b_again], [logs["a"], logs["b-again"]], ranks=2)

    resumed = re.search(r"resumed from (\S+) at step (\d+)", out)
    assert resumed, out[-6000:]
    assert resumed.group(1) == str(run / f"checkpoints/step-{int(resumed.group(2)):08d}") and int(resumed.group(2)) >= 4
    a_log = logs["a"].read_text()
    # Agent a was never restarted by the test: its first worker failed with the lost peer, torchrun restarted it in place
    # when b came back, and that second worker finished.
    assert re.search(r"failed \(exitcode.*^rank \d done$", a_log, flags=re.DOTALL | re.MULTILINE), a_log[-4000:]
    assert [r["step"] for r in read_metrics(run)] == list(range(1, 15))  # each step once: the log was cut at the resume point
    assert CheckpointManager(run, 3, 0).latest() == run / "checkpoints/step-00000014"
