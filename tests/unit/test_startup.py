"""Start-up refusals before any model is built: a bad config or a missing input is one line and exit 2 (no traceback),
object-store locations are checked with the loader's downloader, a second job on a used run_dir is refused naming the
holder, and a dead holder's lock is taken over."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from echomotion.config import load_config
from echomotion.preflight import check_inputs, input_problems, will_resume
from echomotion.runlock import RunDirLock
from echomotion.train import main
from tests.distributed.launch import child_env

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs/tiny.yaml")


@pytest.fixture
def inputs(tmp_path: Path) -> list[str]:
    """Overrides naming inputs that exist (nothing reads their contents before the model is built)."""
    data = tmp_path / "data"
    data.mkdir()
    for name in ("index.json", "motion_stats.json", "null_text.pt"):
        (data / name).write_text("{}")
    return [f"data.path={data}", f"data.stats_path={data / 'motion_stats.json'}", f"data.null_text_path={data / 'null_text.pt'}",
            f"train.run_dir={tmp_path / 'run'}"]


@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """A refused start must never reach the Trainer (the model, FSDP, the loader)."""
    def never(*args: object, **kwargs: object) -> None:
        pytest.fail("the Trainer was built")

    monkeypatch.setattr("echomotion.train.Trainer", never)


def refused(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """main's stderr, asserting exit code 2 and exactly one line `echomotion: error: ...`."""
    code = main(["--config", TINY, *args])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("echomotion: error: ") and err.count("\n") == 1, (code, err)
    return err


BAD_CONFIGS = {
    "train.stepz=5": "train.stepz: Key 'stepz' not in 'TrainConfig'. Did you mean: 'steps'?",
    "train.steps=abc": "train.steps: Value 'abc' of type 'str' could not be converted to Integer",
    "train.phase=3": "train.phase=3: choose 1",
    "parallel.tp=3": "model.num_heads=2 is not divisible by parallel.tp x parallel.sp = 3 x 1",
    "data.path=/nonexistent/x": "data.path: /nonexistent/x/index.json does not exist",
    "model.num_heads=5": "model.dim=64 is not divisible by model.num_heads=5",
    "train.lr=-1": "train.lr must be > 0",
}


@pytest.mark.parametrize("override", BAD_CONFIGS)
def test_a_bad_config_is_one_line_and_exit_2(override: str, inputs: list[str], no_training: None,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    assert BAD_CONFIGS[override] in refused(capsys, *inputs, override)


def test_every_missing_input_is_named_at_once(tmp_path: Path, no_training: None, capsys: pytest.CaptureFixture[str]) -> None:
    err = refused(capsys, f"data.path={tmp_path}", f"data.stats_path={tmp_path / 's.json'}", "data.null_text_path=null",
                  "train.init_wan=/nope",
                  f"model.motion.smpl_model_path={tmp_path}", f"train.run_dir={tmp_path / 'run'}")
    for problem in (f"data.path: {tmp_path}/index.json does not exist", f"data.stats_path: {tmp_path}/s.json does not exist",
                    f"data.path (its null_text.pt; or set data.null_text_path): {tmp_path}/null_text.pt does not exist",
                    "train.init_wan: /nope does not exist", f"model.motion.smpl_model_path: {tmp_path} is a folder"):
        assert problem in err


def test_a_resumed_run_does_not_need_its_starting_weights(inputs: list[str], tmp_path: Path) -> None:
    """train.init_from may have been rotated away once the run has checkpoints of its own (build_model skips it then)."""
    cfg = load_config(TINY, [*inputs, f"train.init_from={tmp_path / 'gone'}"])
    assert not will_resume(cfg) and input_problems(cfg, resuming=False) == [
        f"train.init_from: {tmp_path / 'gone'} does not exist"]
    (tmp_path / "run/checkpoints/step-00000002").mkdir(parents=True)
    (tmp_path / "run/checkpoints/step-00000002/meta.json").write_text("{}")
    assert will_resume(cfg)
    check_inputs(cfg)


def test_object_store_locations_are_fetched(tmp_path: Path, inputs: list[str], s3_server) -> None:
    local = Path(inputs[0].split("=", 1)[1])
    s3_server.upload(local, "s3://humove/train")
    cfg = load_config(TINY, [*inputs, "data.path=s3://humove/train", "data.stats_path=null"])
    check_inputs(cfg)
    cfg.data.path, cfg.data.download_retry = "s3://humove/elsewhere", 0
    problems = input_problems(cfg, resuming=False)
    assert len(problems) == 2 and all("non-retryable error" in p for p in problems)
    assert problems[0].startswith("data.path: downloading s3://humove/elsewhere/index.json")
    assert "s3://humove/elsewhere/motion_stats.json" in problems[1]


HOLD = "import sys, time; from echomotion.runlock import RunDirLock; RunDirLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)"


def test_a_second_job_on_a_used_run_dir_is_refused_and_a_dead_holders_lock_is_taken(
        inputs: list[str], tmp_path: Path, no_training: None, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], env=child_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        err = refused(capsys, *inputs)
        assert f"train.run_dir={run} is in use by another job (host {socket.gethostname()}, pid {holder.pid}, started " in err
    finally:
        holder.kill()
        holder.wait()
    lock = RunDirLock(run).acquire()  # the kernel dropped the killed holder's lock; its record is rewritten
    assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    lock.release()
