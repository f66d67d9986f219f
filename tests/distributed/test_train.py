"""The trainer end to end on HuMoVe-mini: exact resume after SIGKILL (2 ranks, gloo), crash-safe saves, phases,
SIGTERM, NaN skipping, export; start-up refusals and workers that die with their launcher under torchrun."""
from __future__ import annotations

import json
import re
import shutil
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import psutil
import pytest
import torch
import torch.distributed.checkpoint as dcp
import yaml
from PIL import Image

from echomotion.checkpoint import CheckpointError, CheckpointManager
from echomotion.config import ConfigError, SampleConfig, load_config, to_yaml
from echomotion.data.synthetic import generate_humove_mini
from echomotion.diffusion.sampler import Request, sample
from echomotion.distributed import DistEnv
from echomotion.export import ExportError, export_checkpoint, load_exported, save_exported
from echomotion.metrics import read_metrics
from echomotion.models import EchoMotionDiT, is_motion_parameter
from echomotion.runlock import RunDirLock
from echomotion.sample import main as sample_main
from echomotion.train import Trainer, build_model, ema_update
from tests.distributed.launch import child_env, trainer_overrides
from tests.s3_server import free_port
from tests.tool_scripts import load_tool

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def humove(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("humove") / "mini"
    generate_humove_mini(out, clips=24, seed=0, num_frames=9, heldout_fraction=0.1, progress=False)
    return out


def launch(nproc: int, args: list[str], env: Optional[dict] = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
           "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "echomotion.train",
           "--config", str(ROOT / "configs/tiny.yaml"), *args]
    return subprocess.Popen(cmd, env=child_env(env), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def finish(proc: subprocess.Popen, nproc: int, timeout: float = 300) -> str:
    """Wait; pass when the job exited 0 (what a scheduler trusts) and every rank printed its done line."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"training timed out:\n{out[-5000:]}") from None
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{out[-5000:]}"
    for r in range(nproc):
        assert f"rank {r} done" in out, f"rank {r} did not finish:\n{out[-5000:]}"
    return out


def kill_when(proc: subprocess.Popen, condition: Callable[[], bool], timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"training ended before the kill point:\n{proc.communicate()[0][-5000:]}")
        if time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError("kill point never reached")
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir)}


def logged_step(run_dir: Path, step: int) -> Callable[[], bool]:
    return lambda: step in losses(run_dir)


STRAGGLER_DELAY = 0.4  # seconds rank 1 of the reference run computes longer every step


@pytest.fixture(scope="module")
def straight_run(humove: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 uninterrupted Phase 2 steps on 2 ranks: the reference every interrupted run must reproduce bit for bit. Rank 1
    straggles (a sleep before the step's loss sum): timing cannot change a number, and the records must name it."""
    run = tmp_path_factory.mktemp("straight")
    finish(launch(2, trainer_overrides(humove, run, "train.phase=2", "train.steps=8", "train.checkpoint_every=2"),
                  env={"ECHOMOTION_FAULT_SLOW_RANK": f"1:{STRAGGLER_DELAY}"}), 2)
    return run


@pytest.fixture(scope="module")
def straight(straight_run: Path) -> dict[int, float]:
    ref = losses(straight_run)
    assert sorted(ref) == list(range(1, 9))
    return ref


def test_the_step_records_name_a_straggling_rank(straight_run: Path) -> None:
    """Every step of the reference run: rank 1's compute time is the maximum, longer than rank 0's by about the delay."""
    for rec in read_metrics(straight_run):
        assert rec["compute_s/slowest_rank"] == 1, rec
        fastest = 2 * rec["compute_s/median"] - rec["compute_s/max"]  # two ranks: the median is their mean
        assert rec["compute_s/max"] - fastest >= 0.8 * STRAGGLER_DELAY, rec
        assert rec["compute_s"] == pytest.approx(fastest)  # rank 0 logs its own


@pytest.mark.parametrize("kill_point", ["after_step_3", "after_checkpoint_4"])
def test_resume_after_sigkill_is_bit_exact(humove: Path, tmp_path: Path, straight: dict[int, float], kill_point: str) -> None:
    args = trainer_overrides(humove, tmp_path, "train.phase=2", "train.steps=8", "train.checkpoint_every=2")
    first = launch(2, args)
    if kill_point == "after_step_3":  # and step 2's checkpoint complete: an async save may still be writing at step 3
        kill_when(first, lambda: logged_step(tmp_path, 3)() and (tmp_path / "checkpoints/step-00000002/meta.json").exists())
    else:
        kill_when(first, lambda: (tmp_path / "checkpoints/step-00000004/meta.json").exists())
    resumed_from = CheckpointManager(tmp_path, 3, 0).latest()
    assert resumed_from is not None
    out = finish(launch(2, args), 2)
    assert f"resumed from {resumed_from}" in out
    assert losses(tmp_path) == straight  # every step's loss, bit for bit (float equality of the logged values)


def test_kill_during_save_never_leaves_a_broken_latest(humove: Path, tmp_path: Path, straight: dict[int, float]) -> None:
    args = trainer_overrides(humove, tmp_path, "train.phase=2", "train.steps=8", "train.checkpoint_every=2")
    crashed = launch(2, args, env={"ECHOMOTION_FAULT_KILL_DURING_SAVE": "4"})
    out, _ = crashed.communicate(timeout=300)
    assert "rank 0 done" not in out
    assert (tmp_path / "checkpoints/step-00000004.partial").is_dir()  # shards written, never marked complete
    assert CheckpointManager(tmp_path, 3, 0).latest() == tmp_path / "checkpoints/step-00000002"
    out = finish(launch(2, args), 2)
    assert "step-00000002 at step 2" in out
    assert losses(tmp_path) == straight
    assert not (tmp_path / "checkpoints/step-00000004.partial").exists()


def test_a_user_error_under_torchrun_is_one_message_and_exit_2(humove: Path, tmp_path: Path) -> None:
    """A missing input (the ranks agree over the process group; tests/unit/test_startup.py has the other user errors
    in-process): rank 0 prints one line, the workers exit 2, none prints a traceback."""
    proc = launch(2, trainer_overrides(humove, tmp_path, "data.path=/nonexistent/x"))
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0 and out.count("echomotion: error: ") == 1, out[-5000:]
    # torchrun's report: the first worker to exit is the root cause; one still exiting may be torn down with SIGTERM
    assert re.search(r"Root Cause.*?exitcode\s*: 2 ", out, re.DOTALL), out[-5000:]
    assert set(re.findall(r"exitcode\s*: (-?\d+)", out)) <= {"2", "-15"}, out[-5000:]
    assert "echomotion/train.py" not in out and "ConfigError" not in out, out[-5000:]  # torchrun's own traceback stays
    assert not (tmp_path / "config.yaml").exists()  # refused before the Trainer


def test_workers_do_not_outlive_a_killed_launcher(humove: Path, tmp_path: Path) -> None:
    """SIGKILL torchrun's agent alone (not its process group): its workers die with it instead of training on as
    orphans into the run directory, whose lock is then free for the restarted job."""
    proc = launch(2, trainer_overrides(humove, tmp_path, "train.steps=100000", "train.checkpoint_every=100000"))
    workers: list[psutil.Process] = []
    try:
        deadline = time.time() + 120
        while 1 not in losses(tmp_path):
            assert proc.poll() is None and time.time() < deadline, "training never reached step 1"
            time.sleep(0.1)
        workers = [p for p in psutil.Process(proc.pid).children() if "echomotion.train" in " ".join(p.cmdline())]
        assert len(workers) == 2
        proc.kill()
        proc.wait()
        _, alive = psutil.wait_procs(workers, timeout=10)
        assert not alive, f"workers {[p.pid for p in alive]} outlived their launcher"
        RunDirLock(tmp_path).acquire().release()
    finally:
        for p in [proc, *workers]:  # the workers run in sessions of their own: a group kill would miss them
            try:
                os.kill(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.communicate()


def in_process_trainer(humove: Path, run_dir: Path, *extra: str) -> Trainer:
    cfg = load_config(ROOT / "configs/tiny.yaml", trainer_overrides(humove, run_dir, *extra))
    return Trainer(cfg, DistEnv(0, 1, 0, torch.device("cpu")))


def test_phase1_freezes_video_phase2_trains_both(humove: Path, tmp_path: Path) -> None:
    p1 = tmp_path / "p1"
    trainer = in_process_trainer(humove, p1, "train.phase=1", "train.steps=3", "train.checkpoint_every=3")
    initial = {k: v.clone() for k, v in build_model(trainer.cfg).state_dict().items()}
    trainer.run()
    after1 = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    video_keys = [k for k in after1 if not is_motion_parameter(k)]
    motion_keys = [k for k in after1 if ".motion." in k]
    assert video_keys and motion_keys
    for k in video_keys:
        assert torch.equal(after1[k], initial[k]), f"Phase 1 changed video parameter {k}"
    assert any(not torch.equal(after1[k], initial[k]) for k in motion_keys)

    ckpt = p1 / "checkpoints/step-00000003"
    p2 = in_process_trainer(humove, tmp_path / "p2", "train.phase=2", "train.steps=3", f"train.init_from={ckpt}")
    for k, v in p2.model.state_dict().items():
        assert torch.equal(v, after1[k]), f"Phase 2 did not start from the Phase 1 weights ({k})"
    p2.run()
    after2 = p2.model.state_dict()
    assert any(not torch.equal(after2[k], after1[k]) for k in video_keys if k.startswith("blocks.0.self_attn"))
    assert any(not torch.equal(after2[k], after1[k]) for k in motion_keys)


def test_sigterm_with_a_save_in_flight_exits_zero_with_complete_checkpoints(humove: Path, tmp_path: Path) -> None:
    """Step 2's checkpoint is written in the background (slowed to 3 s) while steps 3.. train; SIGTERM then waits for it,
    saves the last step and exits 0: both folders complete, no .partial left."""
    cmd = [sys.executable, "-m", "echomotion.train", "--config", str(ROOT / "configs/tiny.yaml"),
           *trainer_overrides(humove, tmp_path, "train.phase=1", "train.steps=10000", "train.checkpoint_every=2")]
    proc = subprocess.Popen(cmd, env=child_env({"ECHOMOTION_FAULT_SLOW_SAVE": "3"}), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    in_flight = tmp_path / "checkpoints/step-00000002.partial"
    deadline = time.time() + 120
    while 3 not in losses(tmp_path):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.05)
    assert in_flight.is_dir(), "step 2's save was not in flight while step 3 trained"
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    last = max(losses(tmp_path))
    complete = CheckpointManager(tmp_path, 3, 0).complete()
    assert complete[0] == tmp_path / "checkpoints/step-00000002" and complete[-1].name == f"step-{last:08d}"
    assert not list((tmp_path / "checkpoints").glob("*.partial"))
    assert "SIGTERM: saved step" in out


def test_a_failed_background_write_stops_the_run_naming_the_folder(humove: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Step 2's background write fails (a full disk): a later step raises with the folder and the cause; step 2 was never
    marked complete, and the run's earlier checkpoint stays the newest."""
    monkeypatch.setenv("ECHOMOTION_FAULT_FAIL_SAVE", "4")
    trainer = in_process_trainer(humove, tmp_path, "train.phase=1", "train.steps=8", "train.checkpoint_every=2")
    with pytest.raises(CheckpointError, match=r"background save of step 4 into \S*step-00000004.partial failed: "
                                              r"OSError: .*No space left on device.* newest complete checkpoint is "
                                              r"\S*step-00000002"):
        trainer.run()
    assert 4 < trainer.step < 8  # surfaced by a later step, before the end of the run
    assert CheckpointManager(tmp_path, 3, 0).latest() == tmp_path / "checkpoints/step-00000002"


def test_a_corrupt_newest_checkpoint_is_set_aside_and_the_run_resumes_from_the_one_before(
        humove: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Step 4's checkpoint has a shard truncated to half: the verify tool names the file; resume=auto warns naming it,
    moves the folder to run_dir/corrupt/ and continues from step 2, and steps 3-6 equal an uninterrupted run's bit for
    bit. An explicit train.resume= of the corrupt folder stops with the same finding."""
    extra = ("train.phase=1", "train.checkpoint_every=2")
    in_process_trainer(humove, tmp_path / "ref", *extra, "train.steps=6").run()
    run = tmp_path / "run"
    in_process_trainer(humove, run, *extra, "train.steps=4").run()
    newest = run / "checkpoints/step-00000004"
    shard = sorted(newest.glob("*.distcp"))[0]
    with open(shard, "r+b") as fh:
        fh.truncate(shard.stat().st_size // 2)
    verify_tool = load_tool("verify_checkpoint")
    assert verify_tool.main([str(run)]) == 1
    assert f"FAILED  {newest}" in capsys.readouterr().out
    with pytest.raises(CheckpointError, match=rf"train.resume={newest} fails verification: {shard} has \d+ bytes"):
        in_process_trainer(humove, run, *extra, "train.steps=6", f"train.resume={newest}")
    resumed = in_process_trainer(humove, run, *extra, "train.steps=6")
    assert f"WARNING: checkpoint {newest} fails verification ({shard} has" in capsys.readouterr().out
    assert resumed.step == 2 and [p.name[:13] for p in (run / "corrupt").iterdir()] == ["step-00000004"]
    resumed.run()
    assert losses(run) == losses(tmp_path / "ref")
    assert verify_tool.main([str(run)]) == 0


def test_a_failed_save_names_the_folder_the_free_space_and_the_last_checkpoint(
        humove: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A synchronous save that fails for lack of space stops the run with the folder, the free space and the size of the
    last complete checkpoint, which stays intact; a restart resumes from it and trains to the end."""
    extra = ("train.phase=1", "train.checkpoint_every=2", "train.steps=6", "train.async_checkpoint=false")
    monkeypatch.setenv("ECHOMOTION_FAULT_FAIL_SAVE", "4")
    with pytest.raises(CheckpointError, match=r"the save of step 4 into \S*step-00000004.partial failed: OSError: .*No "
                                              r"space left on device.*\. [\d.e+-]+ GB are free on that filesystem; the newest "
                                              r"complete checkpoint is \S*step-00000002 \([\d.e+-]+ GB\) and stays intact"):
        in_process_trainer(humove, tmp_path, *extra).run()
    monkeypatch.delenv("ECHOMOTION_FAULT_FAIL_SAVE")
    resumed = in_process_trainer(humove, tmp_path, *extra)
    assert resumed.step == 2
    resumed.run()
    assert sorted(losses(tmp_path)) == list(range(1, 7))
    assert CheckpointManager(tmp_path, 3, 0).latest() == tmp_path / "checkpoints/step-00000006"


def test_nan_steps_are_skipped_and_a_streak_stops_the_run(humove: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ECHOMOTION_FAULT_NAN_STEPS", "2")
    trainer = in_process_trainer(humove, tmp_path / "one", "train.phase=1", "train.steps=3", "train.checkpoint_every=10")
    trainer.train_step(trainer_batches := trainer._batches())
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    rec = trainer.train_step(trainer_batches)
    assert rec["skipped_steps"] == 1 and rec["loss"] != rec["loss"]  # NaN logged, step skipped
    assert all(torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())
    rec = trainer.train_step(trainer_batches)
    assert rec["skipped_steps"] == 1 and trainer.train_state.nan_streak == 0

    monkeypatch.setenv("ECHOMOTION_FAULT_NAN_STEPS", "1,2,3")
    trainer = in_process_trainer(humove, tmp_path / "streak", "train.phase=1", "train.steps=5", "train.max_nan_streak=3")
    with pytest.raises(RuntimeError, match="3 steps in a row had a NaN/Inf"):
        trainer.run()


def test_ema_update_is_the_exponential_average() -> None:
    """Three updates against the recurrence written out by hand: ema_k = d * ema_(k-1) + (1 - d) * p_k."""
    gen = torch.Generator().manual_seed(0)
    steps = [{"a": torch.randn(3, 4, generator=gen), "b": torch.randn(5, generator=gen)} for _ in range(3)]
    ema = {k: v.clone() for k, v in steps[0].items()}
    for params in steps[1:]:
        ema_update(ema, params.items(), 0.9)
    for k in ema:
        expected = 0.9 * (0.9 * steps[0][k] + 0.1 * steps[1][k]) + 0.1 * steps[2][k]
        torch.testing.assert_close(ema[k], expected, rtol=0, atol=1e-6)


def test_tensorboard_holds_the_step_records_and_the_config(humove: Path, tmp_path: Path) -> None:
    """`train.loggers=[jsonl,tensorboard]`: TensorBoard's own reader finds every numeric field of every step that
    metrics.jsonl holds, at the same step and value, and the resolved config as text. After a resume from step 2, the
    reader shows step 3 once, with the resumed run's value, as metrics.jsonl does."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    extra = ("train.phase=2", "train.loggers=[jsonl,tensorboard]", "train.checkpoint_every=2")
    in_process_trainer(humove, tmp_path, *extra, "train.steps=3").run()
    in_process_trainer(humove, tmp_path, *extra, "train.steps=4").run()  # resumes from step 2: step 3 is written again
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for key in ("loss", "lr", "grad_norm", "samples_per_s", "loss/video"):
        logged = [(e.step, e.value) for e in events.Scalars(key)]
        want = [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in records if r.get(key) is not None]
        assert logged == want and len(want) >= 2, key
    assert "config/text_summary" in events.Tags()["tensors"]


def test_loggers_are_checked_at_load() -> None:
    for loggers, message in (("[tensorboard]", "must keep 'jsonl'"), ("[jsonl,mlflow]", r"unknown \['mlflow'\]")):
        with pytest.raises(ConfigError, match=message):
            load_config(ROOT / "configs/tiny.yaml", [f"train.loggers={loggers}"])


def test_export_round_trip_and_metrics(humove: Path, tmp_path: Path) -> None:
    trainer = in_process_trainer(humove, tmp_path, "train.phase=2", "train.steps=2", "train.checkpoint_every=2",
                                 "train.ema_decay=0.9")
    trainer.run()
    live = trainer.model.state_dict()
    ckpt = tmp_path / "checkpoints/step-00000002"
    out = export_checkpoint(ckpt, tmp_path / "export.safetensors")
    model, cfg = load_exported(out)
    for k, v in live.items():
        assert torch.equal(model.state_dict()[k], v), k
    ema_model, _ = load_exported(export_checkpoint(ckpt, tmp_path / "ema.safetensors", use_ema=True))
    assert all(torch.equal(ema_model.state_dict()[k], trainer.ema[k]) for k in trainer.ema)

    text = torch.randn(1, 16, 32)
    null = torch.zeros(16, 32)
    request, cfg = Request("t2vm", text, video_shape=[1, 48, 3, 16, 16], motion_frames=9), SampleConfig(steps=3)
    a = sample(trainer.model.eval(), request, null, cfg, generator=torch.Generator().manual_seed(5))
    b = sample(model, request, null, cfg, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])

    rec = read_metrics(tmp_path)[-1]
    for key in ("step", "loss", "grad_norm", "lr", "samples_per_s", "tokens_per_s", "step_time", "data_wait", "mfu"):
        assert key in rec
    assert any(k.startswith("loss/") and k.count("/") == 2 for k in rec)
    assert json.loads((ckpt / "meta.json").read_text())["step"] == 2


@pytest.fixture
def untrained_checkpoint(tmp_path: Path) -> Path:
    """A step-N folder of an untrained one-layer model, laid out like the trainer's DCP save (no training needed)."""
    cfg = load_config(ROOT / "configs/tiny.yaml", ["model.num_layers=1", "model.dim=32", "model.ffn_dim=64"])
    torch.manual_seed(0)
    ckpt = tmp_path / "run/checkpoints/step-00000003"
    dcp.save({"model": EchoMotionDiT(cfg.model).state_dict()}, checkpoint_id=str(ckpt), no_dist=True)
    (ckpt / "meta.json").write_text(json.dumps({"step": 3, "config": yaml.safe_load(to_yaml(cfg)), "has_ema": False}))
    return ckpt


def export_tool():
    return load_tool("export_checkpoint")


def test_export_tool_refusals_are_one_line_and_exit_2(untrained_checkpoint: Path, tmp_path: Path, capsys,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """`export_checkpoint: <message>` and exit 2 instead of a traceback; a bad --out is refused before the checkpoint is
    read (for --wan-layout it used to be checked only after the full merge)."""
    tool, out, ckpt = export_tool(), tmp_path / "out", str(untrained_checkpoint)

    def refused(*args: str) -> str:
        with pytest.raises(SystemExit) as exited:
            tool.main(list(args))
        err = capsys.readouterr().err
        assert exited.value.code == 2 and err.startswith("export_checkpoint: ") and err.count("\n") == 1, err
        return err

    assert "run is not a complete checkpoint (no meta.json): pass a step-N folder" in refused(
        "--checkpoint", str(tmp_path / "run"), "--out", str(out / "m.safetensors"))
    assert "holds no EMA weights (train.ema_decay was 0); export without --ema" in refused(
        "--checkpoint", ckpt, "--ema", "--out", str(out / "m.safetensors"))

    def never(*args: object) -> None:
        pytest.fail("the checkpoint was read before --out was checked")

    monkeypatch.setattr("echomotion.export.load_checkpoint", never)
    monkeypatch.setattr(tool, "load_checkpoint", never)
    for name, layout, message in (
        ("model.yaml", [], "an export is one .safetensors file"),
        ("model", [], "an export is one .safetensors file"),
        ("wan.bin", ["--wan-layout", "original"], "original layout is one .safetensors file"),
        ("wan.safetensors", ["--wan-layout", "diffusers"], "the diffusers layout is a directory"),
    ):
        assert message in refused("--checkpoint", ckpt, "--out", str(out / name), *layout)
    assert not out.exists()


def test_an_export_samples_without_its_dataset(untrained_checkpoint: Path, tmp_path: Path, capsys) -> None:
    """The export carries dataset.json, motion stats, null text and the PCA codec file: with the dataset folder gone,
    t2vm and t2m write their samples from the export alone; only m2v/v2m clips need --data."""
    data = tmp_path / "data"
    generate_humove_mini(data, clips=4, num_frames=9, heldout_fraction=0.5, codec="pca", codec_channels=48, progress=False)
    out = tmp_path / "model.safetensors"
    assert export_tool().main(["--checkpoint", str(untrained_checkpoint), "--out", str(out), "--data", str(data)]) == 0
    shutil.rmtree(data)
    for task in ("t2vm", "t2m"):
        assert sample_main(["--checkpoint", str(out), "--task", task, "--prompt", "a person waves", "--steps", "1",
                            "--out", str(tmp_path / "samples")]) == 0
        written = {p.name for p in (tmp_path / "samples" / task / "a-person-waves").iterdir()}
        assert {"motion.npz", "caption.txt"} <= written and (task == "t2m" or "video.mp4" in written), written
    with pytest.raises(SystemExit):
        sample_main(["--checkpoint", str(out), "--task", "m2v", "--clip", "hm-000000"])
    assert "pass --data <dataset folder>" in capsys.readouterr().err


def test_wan_layout_export_leaves_nothing_behind(untrained_checkpoint: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The video expert goes straight from the checkpoint to the Wan layout: no `<out>.merged.safetensors` (+ .yaml,
    30 GB for the 5B) next to it, also when writing fails."""
    tool, out = export_tool(), tmp_path / "out"
    assert tool.main(["--checkpoint", str(untrained_checkpoint), "--out", str(out / "wan.safetensors"), "--wan-layout", "original"]) == 0
    assert tool.main(["--checkpoint", str(untrained_checkpoint), "--out", str(out / "wan-diffusers"), "--wan-layout", "diffusers"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["wan-diffusers", "wan.safetensors"]

    def disk_full(*args, **kwargs):
        raise OSError("no space left on device")

    monkeypatch.setattr(tool, "save_wan", disk_full)
    with pytest.raises(OSError, match="no space left"):
        tool.main(["--checkpoint", str(untrained_checkpoint), "--out", str(out / "again.safetensors"), "--wan-layout", "original"])
    assert sorted(p.name for p in out.iterdir()) == ["wan-diffusers", "wan.safetensors"]


def test_an_export_is_a_safetensors_file_with_its_own_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`<stem>.safetensors` + `<stem>.yaml`: --out model.yaml used to be overwritten by its own config copy, m.v1 and m.v2
    shared m.yaml. The YAML is renamed into place, so a failed write keeps the previous one."""
    cfg = load_config(ROOT / "configs/tiny.yaml", ["model.num_layers=1", "model.dim=32", "model.ffn_dim=64"])
    model = EchoMotionDiT(cfg.model)
    for bad in ("model.yaml", "m.v1", "model"):
        with pytest.raises(ExportError, match=r"an export is one \.safetensors file .* name ending in \.safetensors"):
            save_exported(model, cfg, tmp_path / bad)
    assert list(tmp_path.iterdir()) == []
    for name in ("m.v1", "m.v2"):
        save_exported(model, cfg, tmp_path / f"{name}.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.v1.safetensors", "m.v1.yaml", "m.v2.safetensors", "m.v2.yaml"]
    assert load_exported(tmp_path / "m.v1.safetensors")[1] == cfg

    yaml_path, before = tmp_path / "m.v1.yaml", (tmp_path / "m.v1.yaml").read_text()

    def torn_write(self: Path, text: str, *args, **kwargs) -> int:
        with open(self, "w") as fh:
            fh.write(text[:20])
        raise OSError("no space left on device")

    monkeypatch.setattr(Path, "write_text", torn_write)
    with pytest.raises(OSError, match="no space left"):
        save_exported(model, cfg, tmp_path / "m.v1.safetensors")
    monkeypatch.undo()
    assert yaml_path.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.v1.safetensors", "m.v1.yaml", "m.v2.safetensors", "m.v2.yaml"]


def test_a_patch_embedding_narrower_than_a_token_is_refused() -> None:
    cfg = load_config(ROOT / "configs/tiny.yaml", ["model.patch_size=[1,2,2]"])  # 48 x 4 = 192 values into 64 dims
    with pytest.raises(RuntimeError, match="192 values but model.dim is 64"):
        build_model(cfg)


def checkpoint_steps(run_dir: Path) -> list[int]:
    return [int(p.name.split("-")[1]) for p in CheckpointManager(run_dir, 0, 0).complete()]


def test_rolling_back_to_an_older_checkpoint_moves_the_newer_ones_aside(humove: Path, tmp_path: Path) -> None:
    """train.resume=<older folder> continues that timeline: the newer checkpoints and metrics lines are archived (not
    deleted, not collided with, not picked by the next resume=auto), and the steps after the rollback point repeat the
    first run's losses exactly."""
    common = ("train.phase=1", "train.warmup_steps=3")
    in_process_trainer(humove, tmp_path, *common, "train.steps=6", "train.checkpoint_every=2", "train.keep_last=0").run()
    first = losses(tmp_path)
    back = tmp_path / "checkpoints/step-00000002"
    rolled = in_process_trainer(humove, tmp_path, *common, "train.steps=5", "train.checkpoint_every=3", "train.keep_last=2",
                                f"train.resume={back}")
    assert rolled.step == 2
    [archive] = list((tmp_path / "superseded").iterdir())
    assert sorted(p.name for p in archive.iterdir()) == ["metrics.jsonl", "step-00000004", "step-00000006"]
    assert all((archive / s / "meta.json").exists() for s in ("step-00000004", "step-00000006"))
    assert [json.loads(ln)["step"] for ln in (archive / "metrics.jsonl").read_text().splitlines()] == [3, 4, 5, 6]
    rolled.run()
    assert checkpoint_steps(tmp_path) == [3, 5]  # keep_last 2 of this timeline; step 2 rotated out
    assert losses(tmp_path) == {s: first[s] for s in range(1, 6)}
    assert in_process_trainer(humove, tmp_path, *common, "train.steps=8").step == 5


def test_resume_never_in_a_used_run_dir_keeps_the_old_run(humove: Path, tmp_path: Path) -> None:
    in_process_trainer(humove, tmp_path, "train.phase=1", "train.steps=2", "train.checkpoint_every=2").run()
    fresh = in_process_trainer(humove, tmp_path, "train.phase=1", "train.steps=2", "train.checkpoint_every=2",
                               "train.resume=never")
    assert fresh.step == 0 and not losses(tmp_path)
    [archive] = list((tmp_path / "superseded").iterdir())
    assert (archive / "step-00000002/meta.json").exists()
    assert len((archive / "metrics.jsonl").read_text().splitlines()) == 2
    fresh.run()  # saves step 2 again: no collision with the archived one
    assert checkpoint_steps(tmp_path) == [2] and sorted(losses(tmp_path)) == [1, 2]


def test_lr_comes_from_the_config_on_resume_and_the_log_shows_the_applied_lr(humove: Path, tmp_path: Path) -> None:
    """Warmup over 10 steps: step s runs at lr * s / 10 (brute-force schedule). A resume with a lower train.lr continues
    the schedule with the new value; the logged lr is the one the step's update used."""
    run = ("train.phase=1", "train.warmup_steps=10", "train.checkpoint_every=2")
    trainer = in_process_trainer(humove, tmp_path, *run, "train.lr=1e-3", "train.steps=2")
    trainer.run()
    resumed = in_process_trainer(humove, tmp_path, *run, "train.lr=1e-5", "train.steps=4")
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(1e-5 * 3 / 10)
    resumed.run()
    logged = {r["step"]: r["lr"] for r in read_metrics(tmp_path)}
    expected = {1: 1e-3 * 0.1, 2: 1e-3 * 0.2, 3: 1e-5 * 0.3, 4: 1e-5 * 0.4}
    assert logged == pytest.approx(expected, rel=1e-12)


def test_a_new_layout_keeps_the_skipped_step_counters(humove: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ECHOMOTION_FAULT_NAN_STEPS", "2,3")
    in_process_trainer(humove, tmp_path, "train.phase=1", "train.steps=3", "train.checkpoint_every=3").run()
    ckpt = tmp_path / "checkpoints/step-00000003"
    meta = json.loads((ckpt / "meta.json").read_text())  # as if written under another layout: no per-rank state applies
    (ckpt / "meta.json").write_text(json.dumps({**meta, "layout": {**meta["layout"], "dp_shard": 2}}))
    resumed = in_process_trainer(humove, tmp_path, "train.phase=1", "train.steps=4")
    assert (resumed.train_state.skipped, resumed.train_state.nan_streak) == (2, 2)


def test_a_torn_metrics_line_does_not_block_the_resume(humove: Path, tmp_path: Path) -> None:
    in_process_trainer(humove, tmp_path, "train.phase=1", "train.steps=2", "train.checkpoint_every=2").run()
    with (tmp_path / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 3, "loss": 0.12')  # a crash mid-write
    assert sorted(losses(tmp_path)) == [1, 2]
    in_process_trainer(humove, tmp_path, "train.phase=1", "train.steps=3").run()
    assert sorted(losses(tmp_path)) == [1, 2, 3]
    [archive] = list((tmp_path / "superseded").iterdir())
    assert (archive / "metrics.jsonl").read_text() == '{"step": 3, "loss": 0.12\n'


def test_a_resumed_phase2_run_no_longer_needs_its_init_from(humove: Path, tmp_path: Path) -> None:
    p1 = tmp_path / "p1"
    in_process_trainer(humove, p1, "train.phase=1", "train.steps=1", "train.checkpoint_every=1").run()
    src = tmp_path / "phase1-step1"
    (p1 / "checkpoints/step-00000001").rename(src)
    p2 = ("train.phase=2", "train.checkpoint_every=1", f"train.init_from={src}")
    in_process_trainer(humove, tmp_path / "p2", *p2, "train.steps=1").run()
    shutil.rmtree(src)  # rotated away by the Phase 1 run's keep_last, say
    assert in_process_trainer(humove, tmp_path / "p2", *p2, "train.steps=2").step == 1
    with pytest.raises(RuntimeError, match="neither an exported .safetensors nor a complete checkpoint"):
        in_process_trainer(humove, tmp_path / "p2-fresh", *p2, "train.steps=1")


def test_resume_refusals_name_the_fix(humove: Path, tmp_path: Path) -> None:
    in_process_trainer(humove, tmp_path, "train.phase=1", "train.steps=1", "train.checkpoint_every=1").run()
    with pytest.raises(RuntimeError, match="holds no EMA weights .* train.init_from="):
        in_process_trainer(humove, tmp_path, "train.phase=1", "train.steps=2", "train.ema_decay=0.9")
    partial = tmp_path / "checkpoints/step-00000001.partial"
    shutil.copytree(tmp_path / "checkpoints/step-00000001", partial)
    (partial / "meta.json").unlink()  # what a kill mid-save leaves
    with pytest.raises(ValueError, match=r"train.resume=.*step-00000001.partial.* nor a complete checkpoint folder"):
        in_process_trainer(humove, tmp_path, "train.phase=1", f"train.resume={partial}")


def test_a_resumed_run_reports_the_age_of_the_checkpoint_it_resumed_from(humove: Path, tmp_path: Path) -> None:
    """What a preemption would lose counts from the resumed checkpoint, so a crash loop that never saves still ages."""
    in_process_trainer(humove, tmp_path, "train.phase=1", "train.steps=1", "train.checkpoint_every=1").run()
    saved_at = json.loads((tmp_path / "checkpoints/step-00000001/meta.json").read_text())["saved_at"]
    resumed = in_process_trainer(humove, tmp_path, "train.phase=1", "train.steps=2", f"train.metrics_port={free_port()}",
                                 "train.metrics_addr=127.0.0.1")
    registry = resumed.exporter.registry
    assert registry.get_sample_value("echomotion_checkpoint_last_success_timestamp_seconds") == saved_at
    assert registry.get_sample_value("echomotion_restarts_total") == 1


# ------------------------------------------------------------------------------------------------------------------------
# In-loop validation and samples (train.eval_every, train.sample_every)

def test_validation_loss_equals_a_hand_computed_flow_loss(humove: Path, tmp_path: Path) -> None:
    """One held-out clip at sigma 0.5: the validation losses of joint and v2m against the flow loss written out from
    flow.py's formulas (x = (1 - s) x0 + s n, target n - x0, timestep 1000 s) on the plain model, with the clip's own
    text for joint and the null text for v2m (whose text is always dropped), video noise drawn before motion noise."""
    from echomotion.data.shards import iter_samples, motion_features
    from echomotion.models import Task
    from echomotion.validation import eval_generator

    trainer = in_process_trainer(humove, tmp_path, "train.phase=2", "train.eval_every=1", "train.eval_clips=1",
                                 "train.eval_sigmas=[0.5]", f"train.eval_data={humove / 'heldout'}")
    got = trainer.validation.losses(trainer.engine.model)
    clip = next(iter(iter_samples(humove / "heldout")))
    video = clip.video_latent.float()[None]
    motion = trainer.dataset.stats.normalize(motion_features(clip)).float()[None]
    text = torch.zeros(1, 16, 32)
    text[0, : clip.text_embedding.shape[0]] = clip.text_embedding.float()
    s = 0.5
    for task, prompt, video_sigma, keys in ((Task.JOINT, text, s, ("video", "motion")),
                                            (Task.V2M, trainer.null_text[None], 0.0, ("motion",))):
        gen = eval_generator(trainer.cfg.train.seed, clip.clip_id, task, 0)
        video_noise = torch.randn(video.shape, generator=gen)
        motion_noise = torch.randn(motion.shape, generator=gen)
        with torch.no_grad():
            out = trainer.model(video=(1 - video_sigma) * video + video_sigma * video_noise,
                                video_timestep=torch.tensor([1000 * video_sigma]), video_mask=torch.tensor([True]),
                                motion=(1 - s) * motion + s * motion_noise, motion_timestep=torch.tensor([1000 * s]),
                                motion_mask=torch.ones(motion.shape[:2], dtype=torch.bool), text=prompt,
                                task=torch.tensor([int(task)]))
        want = {"video": ((out.video - (video_noise - video)) ** 2).mean(),
                "motion": ((out.motion - (motion_noise - motion)) ** 2).mean()}
        for k in keys:
            assert got[f"eval/loss/{task.name.lower()}/{k}"] == pytest.approx(float(want[k]), rel=1e-5), (task, k)
    assert set(got) == {f"eval/loss/{k}" for k in ("joint/video", "joint/motion", "m2v/video", "v2m/motion")}


def test_eval_and_samples_reach_the_loggers_and_leave_training_unchanged(humove: Path, tmp_path: Path) -> None:
    """Phase 2, eval and samples at step 2 (the last): the eval losses and HuMoVe-mini metrics are in metrics.jsonl and
    TensorBoard (scalars, and one sample grid image per task, as PNGs under samples/step-2/); sampling puts the RNG
    state back, and the losses equal, bit for bit, those of a run without validation."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from echomotion.checkpoint import rng_state

    common = ("train.phase=2", "train.steps=2", "train.checkpoint_every=10", "sample.steps=2")
    plain = in_process_trainer(humove, tmp_path / "plain", *common)
    plain.run()
    trainer = in_process_trainer(humove, tmp_path / "eval", *common, "train.eval_every=2", "train.sample_every=2",
                                 f"train.eval_data={humove / 'heldout'}", "train.loggers=[jsonl,tensorboard]")
    states, samples = [], trainer._samples

    def checked() -> dict:  # a sampling must not move any RNG (the model copy's init draws from torch's)
        states.append(rng_state())
        out = samples()
        states.append(rng_state())
        return out

    trainer._samples = checked
    trainer.run()
    assert losses(tmp_path / "eval") == losses(tmp_path / "plain")
    before, after = states
    assert torch.equal(before["torch"], after["torch"]) and before["python"] == after["python"]
    assert all(np.array_equal(a, b) for a, b in zip(before["numpy"], after["numpy"]))

    rec = read_metrics(tmp_path / "eval")[-1]
    eval_keys = {k for k in rec if k.startswith("eval/loss/")}
    assert eval_keys == {f"eval/loss/{k}" for k in ("joint/video", "joint/motion", "m2v/video", "v2m/motion")}
    assert all(0 < rec[k] < 10 for k in eval_keys) and "eval/v2m_mpjpe" in rec and "eval/t2m_action_acc" in rec
    events = EventAccumulator(str(tmp_path / "eval" / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    for key in (*eval_keys, "eval/v2m_mpjpe"):
        assert [(e.step, e.value) for e in events.Scalars(key)] == [(2, pytest.approx(rec[key], rel=1e-6))], key
    tasks = ("t2vm", "t2m", "m2v", "v2m")
    assert set(events.Tags()["images"]) == {f"samples/{t}" for t in tasks}
    for task in tasks:
        png = tmp_path / "eval" / "samples" / "step-2" / task / "grid.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        [image] = events.Images(f"samples/{task}")
        assert image.step == 2 and (image.width, image.height) == Image.open(png).size


def test_validation_config_errors_name_the_fix(humove: Path, tmp_path: Path) -> None:
    for overrides, message in (
        (["train.eval_every=10"], "set train.eval_data to a local folder of MDS shards"),
        (["train.sample_every=10", f"train.eval_data={tmp_path / 'nowhere'}"], r"holds no index.json: point it at"),
        ([f"train.eval_data={humove / 'heldout'}", "train.eval_every=10", "train.eval_sigmas=[0.5,1.0]"],
         r"strictly between 0 \(clean\) and 1 \(pure noise\)"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_config(ROOT / "configs/tiny.yaml", overrides)
