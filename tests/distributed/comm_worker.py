"""Run known collectives and FSDP2 steps under `parallel.comm.CommCounter`; each rank writes what it counted to
OUT_DIR/rank<r>.json (test_comm.py holds the analytic expectations).

    torchrun --nproc_per_node=2 tests/distributed/comm_worker.py OUT_DIR
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from parallel.comm import CommCounter  # noqa: E402

# FSDP2 test model: three Linears with odd output widths, so dim-0 sharding over 2 ranks needs padding.
FSDP_LAYERS = ((5, 7), (7, 3), (3, 2))  # (in, out); the first two are their own FSDP groups, the last belongs to the root
FSDP_CASES = {  # name -> (reshard_after_forward, param_dtype, reduce_dtype)
    "fp32_reshard": (True, torch.float32, torch.float32),
    "fp32_keep": (False, torch.float32, torch.float32),
    "bf16_params_fp32_reduce": (True, torch.bfloat16, torch.float32),
}


def counted(fn: Callable[[], object]) -> dict:
    with CommCounter() as cc:
        fn()
    return {"bytes": cc.bytes_by_kind, "calls": cc.calls_by_kind}


def known_collectives(group: dist.ProcessGroup, world: int) -> dict[str, dict]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    f32 = lambda n: torch.ones(n)  # noqa: E731
    mesh = init_device_mesh("cpu", (world,))
    x_rows = distribute_tensor(torch.randn(4, 6), mesh, [Shard(0)])
    x_cols = distribute_tensor(torch.randn(4, 6), mesh, [Shard(1)])
    out: dict[str, dict] = {
        "all_reduce": counted(lambda: dist.all_reduce(f32(10))),
        "all_gather_into_tensor": counted(lambda: dist.all_gather_into_tensor(torch.empty(10 * world), f32(10))),
        "all_gather_list_bf16": counted(
            lambda: dist.all_gather([torch.empty(6, dtype=torch.bfloat16) for _ in range(world)], torch.ones(6, dtype=torch.bfloat16))
        ),
        "reduce_scatter_tensor": counted(lambda: dist.reduce_scatter_tensor(torch.empty(5), f32(5 * world))),
        "broadcast_f64": counted(lambda: dist.broadcast(torch.ones(3, dtype=torch.float64), src=0)),
        "all_to_all_single_i64": counted(lambda: dist.all_to_all_single(torch.empty(4, dtype=torch.int64), torch.ones(4, dtype=torch.int64))),
        "all_reduce_coalesced": counted(lambda: dist.all_reduce_coalesced([f32(3), f32(5)])),
        "funcol_all_reduce": counted(lambda: funcol.all_reduce(f32(7), "sum", group).wait()),
        "funcol_all_gather": counted(lambda: funcol.all_gather_tensor(f32(3), 0, group).wait()),
        "funcol_reduce_scatter": counted(lambda: funcol.reduce_scatter_tensor(f32(4 * world), "sum", 0, group).wait()),
        "funcol_all_to_all": counted(lambda: funcol.all_to_all_single(f32(2 * world), None, None, group).wait()),
        "dtensor_redistribute": counted(lambda: x_rows.redistribute(mesh, [Replicate()]).to_local()),
        # a redistribution DTensor decides on inside its own dispatch: softmax over the sharded dim gathers the columns
        "dtensor_implicit": counted(lambda: x_cols.softmax(1).to_local()),
    }
    with CommCounter(enabled=False) as off:
        dist.all_reduce(f32(10))
        from torch.utils._python_dispatch import _get_current_dispatch_mode

        out["disabled"] = {"bytes": off.bytes_by_kind, "calls": off.calls_by_kind, "mode_active": _get_current_dispatch_mode() is not None}
    return out


def fsdp_steps(world: int) -> dict[str, list[dict]]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh("cpu", (world,))
    results: dict[str, list[dict]] = {}
    for name, (reshard, param_dtype, reduce_dtype) in FSDP_CASES.items():
        torch.manual_seed(0)
        layers = [nn.Linear(i, o) for i, o in FSDP_LAYERS]
        model = nn.Sequential(layers[0], nn.ReLU(), layers[1], nn.ReLU(), layers[2])
        mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
        for layer in layers[:2]:
            fully_shard(layer, mesh=mesh, reshard_after_forward=reshard, mp_policy=mp)
        fully_shard(model, mesh=mesh, reshard_after_forward=reshard, mp_policy=mp)
        x = torch.randn(4, FSDP_LAYERS[0][0])
        steps = []
        cc = CommCounter()
        for _ in range(2):  # the second step checks that reset() starts from zero and lazy init adds nothing later
            cc.reset()
            with cc:
                model(x).float().square().sum().backward()
            steps.append({"bytes": dict(cc.bytes_by_kind), "calls": dict(cc.calls_by_kind)})
            model.zero_grad()
        results[name] = steps
    return results


def main() -> None:
    out_dir = Path(sys.argv[1])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    record = {"world": world, "known": known_collectives(dist.group.WORLD, world), "fsdp": fsdp_steps(world)}
    (out_dir / f"rank{rank}.json").write_text(json.dumps(record, indent=1))
    dist.barrier()
    print(f"rank {rank} done", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
