"""Config files: `include:` merges other YAML files (the old `defaults:` warns, a Hydra-style entry is refused with the
fix), and the ready cluster configs load, validate, carry the paper's hyper-parameters and the planner's layout."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from echomotion.config import CONFIG_DIR, ConfigError, load_config, model_preset
from parallel.plan import Workload, plan

SHIPPED = sorted(CONFIG_DIR.rglob("*.yaml"))
# name: (model preset, GPUs, the paper's sample (Tables 7-8; 704 for Table 8's 708), batch per GPU, phase, steps)
READY = {
    "wan2.1-1.3b-phase1": ("wan2.1-1.3b", 8, Workload(81, 480, 832, micro_batch=2), 2, 1, 15000),
    "wan2.1-1.3b-phase2": ("wan2.1-1.3b", 8, Workload(81, 480, 832, micro_batch=2), 2, 2, 12000),
    "wan2.2-5b-phase1": ("wan2.2-5b", 64, Workload(121, 704, 1280, micro_batch=1), 1, 1, 15000),
    "wan2.2-5b-phase2": ("wan2.2-5b", 64, Workload(121, 704, 1280, micro_batch=1), 1, 2, 12000),
}


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_include_merges_files_in_order_then_the_file_itself(tmp_path: Path) -> None:
    write(tmp_path / "model/small.yaml", "model:\n  num_layers: 3\n  dim: 96\n")
    write(tmp_path / "wide.yaml", "model:\n  dim: 128\n  num_heads: 4\n")
    top = write(tmp_path / "run.yaml", "include:\n  - model/small.yaml\n  - wide.yaml\ntrain:\n  steps: 7\n")
    cfg = load_config(top)
    assert (cfg.model.num_layers, cfg.model.dim, cfg.model.num_heads, cfg.train.steps) == (3, 128, 4, 7)


def test_defaults_still_includes_but_warns(tmp_path: Path) -> None:
    write(tmp_path / "model/small.yaml", "model:\n  num_layers: 3\n")
    top = write(tmp_path / "run.yaml", "defaults:\n  - model/small.yaml\n")
    with pytest.warns(FutureWarning, match="rename it to `include:`"):
        assert load_config(top).model.num_layers == 3


def test_a_hydra_style_entry_is_refused_naming_the_fix(tmp_path: Path) -> None:
    top = write(tmp_path / "run.yaml", "include:\n  - model: wan2.1-1.3b\n")
    with pytest.raises(ConfigError, match=r"not a file path.*e\.g\. `- model/wan2\.1-1\.3b\.yaml`"):
        load_config(top)


def test_both_keys_or_a_non_list_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="merge them into `include:`"):
        load_config(write(tmp_path / "a.yaml", "include: []\ndefaults: []\n"))
    with pytest.raises(ConfigError, match="must be a list of YAML paths"):
        load_config(write(tmp_path / "b.yaml", "include: model/tiny.yaml\n"))


def test_no_shipped_config_uses_defaults() -> None:
    assert SHIPPED and not [p for p in SHIPPED if "\ndefaults:" in "\n" + p.read_text()]


@pytest.fixture(scope="module")
def heldout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The smallest folder validation accepts as held-out clips: index.json, and dataset.json beside it for sampling."""
    root = tmp_path_factory.mktemp("data")
    write(root / "heldout/index.json", json.dumps({"version": 2, "shards": []}))
    write(root / "dataset.json", "{}")
    return root / "heldout"


@pytest.mark.parametrize("name", READY)
def test_ready_configs_hold_the_paper_values_and_the_planners_layout(name: str, heldout: Path) -> None:
    preset, gpus, workload, per_gpu, phase, steps = READY[name]
    cfg = load_config(CONFIG_DIR / f"{name}.yaml", [f"train.eval_data={heldout}"])
    t, p = cfg.train, cfg.parallel
    assert cfg.model == model_preset(preset)
    assert (t.phase, t.steps, t.lr, t.weight_decay, cfg.diffusion.shift, t.precision) == (phase, steps, 8e-6, 1e-3, 8.0,
                                                                                            "bf16")
    assert (cfg.sample.steps, cfg.sample.shift, cfg.sample.text_guidance) == (50, 8.0, 6.0)
    assert (t.init_wan is not None) == (phase == 1) and (t.init_from is not None) == (phase == 2)
    assert t.checkpoint_every < t.steps and t.eval_every > 0 and t.sample_every > 0
    best = next(e for e in plan(cfg.model, gpus, workload) if e.feasible).layout
    assert (p.tp, p.sp, p.dp_shard, p.dp_replicate, p.activation_checkpointing) == (
        best.tp, best.sp, best.dp_shard, best.dp_replicate, best.ac)
    assert p.activation_checkpointing != "every_k" or p.ac_every == workload.ac_every
    assert cfg.data.batch_size == workload.micro_batch and cfg.data.sp_multiple == p.sp
    # samples per optimizer step = the paper's batch per GPU x GPUs (docs/method-decisions.md reads it per GPU)
    assert cfg.data.batch_size * t.grad_accum * p.dp_shard * p.dp_replicate == per_gpu * gpus


def test_phase2_starts_from_phase1s_last_checkpoint(heldout: Path) -> None:
    for model in ("wan2.1-1.3b", "wan2.2-5b"):
        one, two = (load_config(CONFIG_DIR / f"{model}-phase{k}.yaml", [f"train.eval_data={heldout}"]) for k in (1, 2))
        assert two.train.init_from == f"{one.train.run_dir}/checkpoints/step-{one.train.steps:08d}"
