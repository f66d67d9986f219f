"""The step loggers beside metrics.jsonl (train.loggers): TensorBoard and W&B get the scalars and the sample grids, checked
by reading what they wrote back with their own formats; and the config checks that guard them."""
from __future__ import annotations

import io
import json
import math
import struct
import zlib
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
from PIL import Image

from echomotion.config import CONFIG_DIR, ConfigError, load_config
from echomotion.metrics import StepLoggers

CONFIG_YAML = "train:\n  lr: 0.0001\n  steps: 4\n"


def records(step: int) -> dict[str, Any]:
    """A step record as the trainer writes it, with the fields scalar loggers must skip (None, NaN, a bool)."""
    return {"step": step, "loss": 1.0 / step, "loss/joint/video": 2.0 / step, "lr": 1e-4 * step, "skipped_steps": 0,
            "mfu": None, "grad_norm": math.nan, "flag": True}


def grid_png(path: Path) -> np.ndarray:
    """A 6 x 10 RGB grid saved as PNG; returns its pixels."""
    pixels = np.random.default_rng(0).integers(0, 256, (6, 10, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return pixels


def test_tensorboard_holds_scalars_and_sample_grids(tmp_path: Path) -> None:
    """TensorBoard's reader finds the grid at its step with the PNG's pixels, and the scalars; metrics.jsonl records the
    step records only (the PNGs stay on disk)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    png = tmp_path / "samples/step-2/joint/grid.png"
    pixels = grid_png(png)
    loggers = StepLoggers(["jsonl", "tensorboard"], tmp_path, CONFIG_YAML, enabled=True)
    for step in (1, 2):
        loggers.write(records(step))
    loggers.images(2, {"samples/joint": png})
    loggers.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    (image,) = events.Images("samples/joint")
    assert (image.step, image.height, image.width) == (2, 6, 10)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(image.encoded_image_string)).convert("RGB")), pixels)
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 1.0), (2, 0.5)]
    assert not {"mfu", "grad_norm", "flag"} & set(events.Tags()["scalars"])
    assert [json.loads(ln)["step"] for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_other_ranks_log_nothing(tmp_path: Path) -> None:
    loggers = StepLoggers(["jsonl", "tensorboard", "wandb"], tmp_path, CONFIG_YAML, enabled=False)
    loggers.write(records(1))
    loggers.images(1, {"samples/joint": tmp_path / "missing.png"})
    loggers.close()
    assert list(tmp_path.iterdir()) == []


def wandb_records(path: Path) -> Iterator[Any]:
    """The protobuf Records of a `.wandb` file. wandb >= 0.2x writes it from its Go core and no longer ships the Python
    reader (wandb.sdk.internal.datastore), so the framing is read here: LevelDB's log format (32 KiB blocks of records,
    each headed by crc32, length, type; FIRST/MIDDLE/LAST pieces join) after a 7-byte ':W&B' header."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, pieces = 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:  # zero padding
            continue
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"{path}: corrupt record at byte {pos}"
        pieces += chunk
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            yield record
            pieces = b""


def wandb_run(run_dir: Path, which: int) -> tuple[str, dict[str, Any], dict[int, dict[str, Any]]]:
    """(run id, config, step -> history row) of the `which`-th offline run in run_dir/wandb."""
    (path,) = sorted(run_dir.glob("wandb/offline-run-*"))[which].glob("run-*.wandb")
    run_id, config, history = "", {}, {}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id = record.run.run_id
            config = {item.key: json.loads(item.value_json) for item in record.run.config.update}
        elif kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history[row.pop("_step")] = {k: v for k, v in row.items() if not k.startswith("_")}
    return run_id, config, history


@pytest.fixture
def wandb_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No network, no prompts, nothing written outside tmp_path."""
    for key, value in {"WANDB_SILENT": "true", "WANDB_MODE": "offline", "WANDB_DISABLE_GIT": "true",
                       "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"), "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
                       "WANDB_DATA_DIR": str(tmp_path / "wandb-data")}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


def test_wandb_offline_run_holds_scalars_images_and_config(tmp_path: Path, wandb_offline: None) -> None:
    """An offline W&B run written by the logger, read back from its .wandb file: each step's finite scalars, the grid as
    an image file, the config; a restarted job (second logger on the same run_dir) continues the same W&B run id."""
    run_dir = tmp_path / "run"
    png = run_dir / "samples/step-3/joint/grid.png"
    grid_png(png)
    loggers = StepLoggers(["jsonl", "wandb"], run_dir, CONFIG_YAML, enabled=True, wandb_project="em-test")
    for step in (1, 2, 3):
        loggers.write(records(step))
    loggers.images(3, {"samples/joint": png})
    loggers.close()
    run_id, config, history = wandb_run(run_dir, 0)
    assert run_id == (run_dir / "wandb_id").read_text() and config["train"] == {"lr": 0.0001, "steps": 4}
    assert sorted(history) == [1, 2, 3]
    for step in (1, 2, 3):
        scalars = {k: v for k, v in history[step].items() if not k.startswith("samples/")}
        assert scalars == pytest.approx({"loss": 1.0 / step, "loss/joint/video": 2.0 / step, "lr": 1e-4 * step,
                                         "skipped_steps": 0}), step
    image = {k.split("/")[-1]: v for k, v in history[3].items() if k.startswith("samples/joint/")}
    assert image["_type"] == "image-file" and (image["width"], image["height"]) == (10, 6)
    assert (next(run_dir.glob("wandb/offline-run-*/files")) / image["path"]).is_file()

    resumed = StepLoggers(["jsonl", "wandb"], run_dir, CONFIG_YAML, enabled=True, resume_step=3, wandb_project="em-test")
    resumed.write(records(4))
    resumed.close()
    again, _, history = wandb_run(run_dir, 1)
    assert again == run_id and history[4]["loss"] == pytest.approx(0.25)


def test_logger_config_errors_name_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    tiny = CONFIG_DIR / "tiny.yaml"
    with pytest.raises(ConfigError, match=r"train.wandb_mode='cloud': choose 'offline' .*`wandb sync`"):
        load_config(tiny, ["train.loggers=[jsonl,wandb]", "train.wandb_mode=cloud"])
    with pytest.raises(ConfigError, match=r"train.termination_grace=0 must be > 0"):
        load_config(tiny, ["train.termination_grace=0"])
    assert load_config(tiny, ["train.loggers=[jsonl,wandb]"]).train.wandb_mode == "offline"
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"'wandb' but the wandb package is not installed: pip install 'echomotion\[loggers\]'"):
        load_config(tiny, ["train.loggers=[jsonl,tensorboard,wandb]"])
