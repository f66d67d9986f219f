"""Tensor parallel against megatron-core and Ulysses against DeepSpeed's DistributedAttention (and against one process),
on 2 gloo ranks; see reference_worker.py for what each check computes."""
from __future__ import annotations

import re

from tests.distributed.launch import ROOT, run_torchrun

CHECKS = {  # name: max abs error allowed (values and gradients are O(1))
    "tp_ffn_out": 1e-6,
    "tp_ffn_input_grad": 1e-6,
    "tp_ffn_in_weight_grad": 1e-6,
    "tp_ffn_out_weight_grad": 1e-6,
    "tp_q_rmsnorm": 1e-6,
    "ulysses_vs_deepspeed": 1e-6,
    "ulysses_vs_one_process": 1e-6,
    **{f"ulysses_grad_{t}_vs_{ref}": 1e-6 for t in "qkv" for ref in ("deepspeed", "one_process")},
}


def test_tensor_parallel_and_ulysses_match_megatron_and_deepspeed() -> None:
    out = run_torchrun(ROOT / "tests/distributed/reference_worker.py", 2, timeout=300).output
    found = {(name, int(rank)): float(err) for name, err, rank in re.findall(r"check (\w+) (\S+) rank (\d)", out)}
    for name, tol in CHECKS.items():
        for rank in (0, 1):
            assert (name, rank) in found, f"check {name} missing on rank {rank}:\n{out[-3000:]}"
            assert found[name, rank] <= tol, f"{name} on rank {rank}: max error {found[name, rank]:.3e} > {tol}"
