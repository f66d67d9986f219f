"""Cross-checks of the parallel building blocks against independent implementations, on 2 gloo ranks:

- tensor parallel (`parallel.tensor_parallel`): an expert's FFN and its q projection + full-width q RMSNorm against
  megatron-core's ColumnParallelLinear / RowParallelLinear (and a gathered RMSNorm) with the same weights;
- Ulysses (`parallel.ulysses.ulysses_attention`) against DeepSpeed's `DistributedAttention` and against attention over
  the whole sequence in one process.

Each rank prints `check <name> <max abs error>` lines and then `rank <r> done`.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from echomotion.models.attention import sdpa_attention  # noqa: E402
from echomotion.models.wan import WanBlock  # noqa: E402
from parallel.tensor_parallel import TensorParallelRMSNorm, expert_plan  # noqa: E402
from parallel.ulysses import ulysses_attention  # noqa: E402

DIM, FFN, HEADS, TOKENS, BATCH = 32, 64, 4, 12, 2


def report(name: str, a: torch.Tensor, b: torch.Tensor) -> None:
    print(f"check {name} {float((a - b).detach().abs().max()):.3e} rank {dist.get_rank()}", flush=True)


def tensor_parallel_vs_megatron(rank: int, world: int) -> None:
    from megatron.core import parallel_state
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import parallelize_module

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    config = ModelParallelConfig(tensor_model_parallel_size=world, use_cpu_initialization=True, perform_initialization=False)
    mesh = init_device_mesh("cpu", (world,))
    torch.manual_seed(0)
    ours = WanBlock(DIM, FFN, HEADS)
    full = {k: v.detach().clone() for k, v in ours.state_dict().items()}
    x = torch.randn(BATCH, TOKENS, DIM)
    upstream = torch.randn(BATCH, TOKENS, DIM)

    parallelize_module(ours, mesh, expert_plan())
    ours.self_attn.norm_q = TensorParallelRMSNorm(ours.self_attn.norm_q, mesh)
    part = slice(rank * FFN // world, (rank + 1) * FFN // world)
    qpart = slice(rank * DIM // world, (rank + 1) * DIM // world)

    # FFN: column-parallel in, GELU, row-parallel out.
    col = ColumnParallelLinear(DIM, FFN, config=config, init_method=lambda w: None, bias=True, gather_output=False)
    row = RowParallelLinear(FFN, DIM, config=config, init_method=lambda w: None, bias=True, input_is_parallel=True,
                            skip_bias_add=False)
    with torch.no_grad():
        col.weight.copy_(full["ffn.0.weight"][part])
        col.bias.copy_(full["ffn.0.bias"][part])
        row.weight.copy_(full["ffn.2.weight"][:, part])
        row.bias.copy_(full["ffn.2.bias"])
    xm, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    want = row(F.gelu(col(xm)[0], approximate="tanh"))[0]
    got = ours.ffn(xo)
    report("tp_ffn_out", got, want)
    (want * upstream).sum().backward()
    (got * upstream).sum().backward()
    report("tp_ffn_input_grad", xo.grad, xm.grad)
    report("tp_ffn_in_weight_grad", ours.ffn[0].weight.grad.to_local(), col.weight.grad)
    report("tp_ffn_out_weight_grad", ours.ffn[2].weight.grad.to_local(), row.weight.grad)

    # q projection + RMSNorm over the full width: Megatron's column outputs gathered, normalized, sliced back.
    colq = ColumnParallelLinear(DIM, DIM, config=config, init_method=lambda w: None, bias=True, gather_output=False)
    with torch.no_grad():
        colq.weight.copy_(full["self_attn.q.weight"][qpart])
        colq.bias.copy_(full["self_attn.q.bias"][qpart])
        pieces = [torch.empty(BATCH, TOKENS, DIM // world) for _ in range(world)]
        dist.all_gather(pieces, colq(x)[0].contiguous())
    gathered = torch.cat(pieces, dim=-1)
    want_q = (F.rms_norm(gathered, (DIM,), eps=ours.self_attn.norm_q.eps) * full["self_attn.norm_q.weight"])[..., qpart]
    got_q = ours.self_attn.norm_q(ours.self_attn.q(x))
    report("tp_q_rmsnorm", got_q, want_q)


def ulysses_vs_deepspeed(rank: int, world: int) -> None:
    import deepspeed
    from deepspeed.sequence.layer import DistributedAttention

    deepspeed.init_distributed(dist_backend="gloo")
    group = dist.new_group(list(range(world)))
    torch.manual_seed(1)
    q, k, v = (torch.randn(BATCH, TOKENS * world, HEADS, DIM // HEADS) for _ in range(3))
    upstream = torch.randn(BATCH, TOKENS * world, HEADS, DIM // HEADS)
    mine = slice(rank * TOKENS, (rank + 1) * TOKENS)

    def local_slices():
        return [t[:, mine].clone().requires_grad_() for t in (q, k, v)]

    ds_in, our_in, whole_in = local_slices(), local_slices(), [t.clone().requires_grad_() for t in (q, k, v)]
    ds = DistributedAttention(lambda a, b, c, *args, **kw: sdpa_attention(a, b, c, None), group, scatter_idx=2,
                              gather_idx=1)
    want = ds(*ds_in, batch_dim_idx=0)
    got = ulysses_attention(sdpa_attention, group)(*our_in, torch.ones(BATCH, TOKENS, dtype=torch.bool))
    whole = sdpa_attention(*whole_in, None)
    report("ulysses_vs_deepspeed", got, want)
    report("ulysses_vs_one_process", got, whole[:, mine])
    (want * upstream[:, mine]).sum().backward()
    (got * upstream[:, mine]).sum().backward()
    (whole * upstream).sum().backward()
    for name, a, b, c in zip("qkv", our_in, ds_in, whole_in):
        report(f"ulysses_grad_{name}_vs_deepspeed", a.grad, b.grad)
        report(f"ulysses_grad_{name}_vs_one_process", a.grad, c.grad[:, mine])


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    tensor_parallel_vs_megatron(rank, world)
    ulysses_vs_deepspeed(rank, world)
    print(f"rank {rank} done", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
