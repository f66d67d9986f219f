#!/usr/bin/env python
"""Merge a sharded training checkpoint into one safetensors file for inference (plus its config as YAML).

    python tools/export_checkpoint.py --checkpoint runs/x/checkpoints/step-00012000 --out echomotion.safetensors [--dtype bf16] [--ema]
    python tools/export_checkpoint.py --checkpoint ... --out video.safetensors --wan-layout original   # video expert only, Wan keys
    python tools/export_checkpoint.py --checkpoint ... --out wan-diffusers/ --wan-layout diffusers      # diffusers folder

The checkpoint may come from any layout (one process, DDP, FSDP2, TP/SP): DCP stores global tensor metadata and reshards
on load. Sampling loads the merged file on one device (`python -m echomotion.sample --checkpoint FILE ...`).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from echomotion.export import DTYPES, export_checkpoint, load_exported  # noqa: E402
from echomotion.models.wan_io import save_wan  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a complete checkpoint folder (runs/<run>/checkpoints/step-N)")
    p.add_argument("--out", required=True, help="output .safetensors (or a folder for --wan-layout diffusers)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--ema", action="store_true", help="export the EMA weights (train.ema_decay > 0)")
    p.add_argument("--wan-layout", choices=["original", "diffusers"],
                   help="write only the video expert, with Wan's original keys or as a diffusers folder")
    a = p.parse_args(argv)
    out = Path(a.out)
    if a.wan_layout is None:
        written = export_checkpoint(a.checkpoint, out, a.dtype, a.ema)
    else:
        merged = export_checkpoint(a.checkpoint, out.with_name(out.name + ".merged.safetensors"), "fp32", a.ema)
        model, _ = load_exported(merged)
        written = save_wan(model, out, layout=a.wan_layout, dtype=DTYPES[a.dtype])
        merged.unlink()
        merged.with_suffix(".yaml").unlink(missing_ok=True)
    print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
