"""Layout resolution and its start-up errors (no process group needed)."""
from __future__ import annotations

import pytest

from echomotion.config import ConfigError, ParallelConfig, load_config, model_preset
from parallel.mesh import Layout, resolve_layout

parallel = ParallelConfig  # built by hand: resolve_layout must catch what load-time validation would


def test_dp_shard_fills_the_world() -> None:
    m = model_preset("wan2.1-1.3b")
    assert resolve_layout(parallel(), 8, m) == Layout(1, 8, 1, 1)
    assert resolve_layout(parallel(tp=2, sp=2), 16, m) == Layout(1, 4, 2, 2)
    layout = resolve_layout(parallel(dp_replicate=2, sp=3), 12, m)
    assert (layout.dp, layout.replication, layout.shard_group, layout.world) == (4, 3, 6, 12)


def test_twelve_heads_with_sp_eight_names_the_constraint_and_the_choices() -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.num_heads=12", "model.dim=1536", "parallel.tp=1", "parallel.sp=8"])
    msg = str(e.value)
    assert "model.num_heads=12" in msg and "parallel.tp x parallel.sp = 1 x 8" in msg
    assert "(1, 4)" in msg and "(2, 6)" in msg and "(1, 8)" not in msg  # valid pairs listed, the bad one not
    # the same rule at start-up, where the world size is known
    with pytest.raises(ConfigError, match=r"valid \(tp, sp\) on 16 processes"):
        resolve_layout(parallel(tp=1, sp=8), 16, model_preset("wan2.1-1.3b"))


def test_suggested_pairs_divide_the_world_size() -> None:
    """On 10 processes only tp x sp in {1, 2} fits both the 12 heads and the world (brute force over the divisors)."""
    with pytest.raises(ConfigError) as e:
        resolve_layout(parallel(tp=1, sp=5), 10, model_preset("wan2.1-1.3b"))
    listed = str(e.value).split("valid (tp, sp) on 10 processes: ")[1]
    want = [(t, s) for t in range(1, 13) for s in range(1, 13) if 12 % (t * s) == 0 and 10 % (t * s) == 0]
    assert listed == ", ".join(f"({t}, {s})" for t, s in want)


def test_world_size_mismatches_are_explained() -> None:
    m = model_preset("tiny")
    with pytest.raises(ConfigError, match=r"needs 8 processes but the job has 4.*dp_shard=-1"):
        resolve_layout(parallel(dp_shard=4, tp=2), 4, m)
    with pytest.raises(ConfigError, match=r"world size 6 is not divisible by .* = 4.*divisors: \[1, 2, 3, 6\]"):
        resolve_layout(parallel(dp_replicate=2, sp=2), 6, m)


def test_deepspeed_with_tensor_parallel_is_refused() -> None:
    with pytest.raises(ConfigError, match="engine=deepspeed does not combine with tensor parallel"):
        load_config(None, ["parallel.engine=deepspeed", "parallel.tp=2"])


@pytest.mark.parametrize("key,value,needle", [
    ("sp", 0, "parallel.sp=0 must be >= 1"),
    ("dp_shard", 0, "parallel.dp_shard=0"),
    ("activation_checkpointing", "some", "choose 'none', 'full' or 'every_k'"),
    ("fp8", "e4m3", "parallel.fp8='e4m3': choose 'none', 'te' .* or 'torchao'"),
    ("engine", "megatron", "choose 'fsdp'"),
])
def test_bad_values_fail_at_load(key: str, value, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_config(None, [f"parallel.{key}={value}"])
