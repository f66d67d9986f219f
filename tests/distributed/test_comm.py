"""parallel.comm.CommCounter on 2 gloo ranks: known collectives give their analytic byte counts, and an FSDP2 step gives
the parameter bytes FSDP2 must move (dim 0 padded to a multiple of the shard-group size)."""
from __future__ import annotations

import json
import math

import pytest

from tests.distributed.comm_worker import FSDP_CASES, FSDP_LAYERS
from tests.distributed.launch import ROOT, run_torchrun

WORLD = 2
F32, BF16, F64, I64 = 4, 2, 8, 8
ZERO = dict(all_gather=0, reduce_scatter=0, all_to_all=0, all_reduce=0, broadcast=0)

# Convention (parallel/comm.py): the bytes of the tensors a rank gives the collective as input.
KNOWN = {
    "all_reduce": ("all_reduce", 10 * F32),
    "all_gather_into_tensor": ("all_gather", 10 * F32),  # the local shard, not the gathered output
    "all_gather_list_bf16": ("all_gather", 6 * BF16),
    "reduce_scatter_tensor": ("reduce_scatter", 5 * WORLD * F32),  # the full input, not the scattered output
    "broadcast_f64": ("broadcast", 3 * F64),  # on the source and the receiver alike
    "all_to_all_single_i64": ("all_to_all", 4 * I64),
    "all_reduce_coalesced": ("all_reduce", (3 + 5) * F32),
    "funcol_all_reduce": ("all_reduce", 7 * F32),
    "funcol_all_gather": ("all_gather", 3 * F32),
    "funcol_reduce_scatter": ("reduce_scatter", 4 * WORLD * F32),
    "funcol_all_to_all": ("all_to_all", 2 * WORLD * F32),
    "dtensor_redistribute": ("all_gather", (4 // WORLD) * 6 * F32),  # Shard(0) -> Replicate of a [4, 6] tensor
    # softmax over the sharded dim of a Shard(1) [4, 6]: DTensor all-gathers the local [4, 3] inside its own dispatch
    "dtensor_implicit": ("all_gather", 4 * (6 // WORLD) * F32),
}


def padded_shard_numel(fan_in: int, fan_out: int) -> int:
    """Elements of one rank's FSDP2 shard of Linear(fan_in, fan_out): weight [out, in] and bias [out] are each split on
    dim 0 into ceil(out / world) rows, the last rank's shard padded to that size."""
    rows = math.ceil(fan_out / WORLD)
    return rows * fan_in + rows


@pytest.fixture(scope="module")
def counts(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("comm")
    run_torchrun(ROOT / "tests/distributed/comm_worker.py", WORLD, [str(out)], timeout=240)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]


@pytest.mark.parametrize("name", sorted(KNOWN))
def test_known_collectives_count_their_input_bytes(counts: list[dict], name: str) -> None:
    kind, nbytes = KNOWN[name]
    for rank in counts:
        assert rank["known"][name]["bytes"] == {**ZERO, kind: nbytes}, f"{name} on rank {counts.index(rank)}"
        assert rank["known"][name]["calls"] == {**ZERO, kind: 1}, name


def test_disabled_counter_installs_nothing(counts: list[dict]) -> None:
    for rank in counts:
        assert rank["known"]["disabled"] == {"bytes": ZERO, "calls": ZERO, "mode_active": False}


@pytest.mark.parametrize("case", sorted(FSDP_CASES))
def test_fsdp2_step_moves_the_padded_parameter_bytes(counts: list[dict], case: str) -> None:
    """Every Linear is its own FSDP group (the last one the root's). Per step and rank: each group's shard is all-gathered
    in the forward and, when resharded after it, again in the backward, in param_dtype; each group's gradient is
    reduce-scattered once from its full padded size (world x shard), in reduce_dtype."""
    reshard, param_dtype, reduce_dtype = FSDP_CASES[case]
    shard = sum(padded_shard_numel(i, o) for i, o in FSDP_LAYERS)
    unpadded = sum(o * i + o for i, o in FSDP_LAYERS)
    assert WORLD * shard > unpadded  # the layer widths are chosen so that padding shows
    gathers = 2 if reshard else 1
    size = {"float32": F32, "bfloat16": BF16}
    expected_bytes = {
        **ZERO,
        "all_gather": gathers * shard * size[str(param_dtype).removeprefix("torch.")],
        "reduce_scatter": WORLD * shard * size[str(reduce_dtype).removeprefix("torch.")],
    }
    expected_calls = {**ZERO, "all_gather": gathers * len(FSDP_LAYERS), "reduce_scatter": len(FSDP_LAYERS)}
    for rank in counts:
        for step in rank["fsdp"][case]:
            assert step == {"bytes": expected_bytes, "calls": expected_calls}

